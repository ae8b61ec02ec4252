"""The example UI workflows in the real ComfyUI frontend (headless Chromium, tests/browser_harness.py): loaded as
dropping the file does, each keeps its declared minimum ComfyUI (`extra.distorch.min_comfyui`, a key the
frontend does not know) when saved again, and the prompt the frontend builds from it carries every input of the
API twin with the same value (newer frontends may add the defaults of widgets added since, nothing else).

Runs on each ComfyUI at least as new as a workflow's declared minimum (test_comfyui_integration.py checks that
older ones lack one of its nodes). About 2 s per workflow.
"""

import json

import pytest
from browser_harness import open_comfy_page
from comfyui_harness import REPO

from distorch.catalog import widget_inputs
from scripts.snapshot_core_nodes import version_key

pytestmark = pytest.mark.comfyui

WORKFLOWS = sorted(p for p in (REPO / "workflows").glob("*.json") if not p.name.endswith("_api.json"))


@pytest.fixture(scope="module")
def page(browser, server):
    with open_comfy_page(browser, server) as opened:
        yield opened


def load_ui_workflow(page, workflow: dict, name: str) -> None:
    page.page.evaluate("""([text, name]) => {
        window.app.graph.clear();
        window.app.handleFile(new File([text], name, { type: "application/json" }));
    }""", [json.dumps(workflow), name])
    page.page.wait_for_function("(n) => window.app.graph.nodes.length >= n", arg=len(workflow["nodes"]))
    page.page.wait_for_timeout(300)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_the_frontend_keeps_the_minimum_and_sends_the_api_twin(page, server, path):
    workflow = json.loads(path.read_text())
    minimum = workflow["extra"]["distorch"]["min_comfyui"]
    if version_key(server.install.version) < version_key(minimum):
        pytest.skip(f"{path.stem} needs ComfyUI {minimum}")
    load_ui_workflow(page, workflow, f"{path.stem}_{server.install.version}.json")
    built = page.page.evaluate("""async () => {
        const { output, workflow } = await window.app.graphToPrompt();
        return { output, extra: workflow.extra };
    }""")
    assert built["extra"].get("distorch") == {"min_comfyui": minimum}
    api = json.loads(path.with_name(f"{path.stem}_api.json").read_text())
    assert set(built["output"]) == set(api)
    for node_id, node in api.items():
        sent = built["output"][node_id]
        assert sent["class_type"] == node["class_type"]
        differing = {k: (v, sent["inputs"].get(k)) for k, v in node["inputs"].items() if sent["inputs"].get(k) != v}
        assert not differing, f"{path.stem} node {node_id} ({node['class_type']}): file vs frontend {differing}"


_AUTO_VALUES = """() => Object.fromEntries(window.app.graph.nodes.filter((n) => n.type.startsWith("DisTorch"))
    .map((n) => [String(n.id), Object.fromEntries(n.widgets.filter((w) => w.name.endsWith("auto_placement"))
        .map((w) => [w.name, w.value]))]))"""


def test_a_workflow_saved_before_auto_placement_loads_in_fixed_mode_and_a_new_node_starts_in_auto(page, server):
    """UI workflows match widget values by position: one saved before the switch existed lacks its value, and the
    frontend would leave the switch at its default (auto). The pack's extension switches it off, so such a workflow
    keeps placing its models by the amounts it was saved with; a current save keeps its value; new nodes start in
    auto mode."""
    path = REPO / "workflows" / "wan22_14b_t2v.json"
    current = json.loads(path.read_text())
    old = json.loads(path.read_text())
    loaders = [n for n in old["nodes"] if n["type"].startswith("DisTorch")]
    for node in loaders:
        assert node["widgets_values"][-2:] == [True, "stored"]
        node["widgets_values"] = node["widgets_values"][:-2]  # as saved before the switch (and stream_format) existed
    load_ui_workflow(page, old, f"old_{server.install.version}.json")
    values = page.page.evaluate(_AUTO_VALUES)
    assert values == {str(n["id"]): {"auto_placement": False} for n in loaders}
    sent = page.page.evaluate("async () => (await window.app.graphToPrompt()).output")
    assert all(sent[str(n["id"])]["inputs"]["auto_placement"] is False for n in loaders)
    assert all(sent[str(n["id"])]["inputs"]["stream_format"] == "stored" for n in loaders)
    assert all(sent[str(n["id"])]["inputs"]["virtual_vram_gb"] ==
               n["widgets_values"][widget_inputs(n["type"]).index("virtual_vram_gb")] for n in loaders)
    before_formats = json.loads(path.read_text())
    for node in before_formats["nodes"]:
        if node["type"].startswith("DisTorch"):
            node["widgets_values"] = node["widgets_values"][:-1]  # saved with the switch, before stream_format
    load_ui_workflow(page, before_formats, f"before_formats_{server.install.version}.json")
    assert page.page.evaluate(_AUTO_VALUES) == {str(n["id"]): {"auto_placement": True} for n in loaders}
    sent = page.page.evaluate("async () => (await window.app.graphToPrompt()).output")
    assert all(sent[str(n["id"])]["inputs"]["stream_format"] == "stored" for n in loaders)
    load_ui_workflow(page, current, f"current_{server.install.version}.json")
    assert page.page.evaluate(_AUTO_VALUES) == {str(n["id"]): {"auto_placement": True} for n in loaders}
    created = page.page.evaluate("""() => {
        const node = window.LiteGraph.createNode("DisTorchCheckpointLoader");
        window.app.graph.add(node);
        const unet = window.LiteGraph.createNode("DisTorchUNetLoader");
        window.app.graph.add(unet);
        const values = (n) => Object.fromEntries(n.widgets.filter((w) => w.name.endsWith("auto_placement"))
            .map((w) => [w.name, w.value]));
        return [values(node), values(unet)];
    }""")
    assert created == [{"unet_auto_placement": True, "clip_auto_placement": True}, {"auto_placement": True}]
