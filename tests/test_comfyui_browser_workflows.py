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
