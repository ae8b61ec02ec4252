"""The example workflows: every JSON is well formed, its nodes exist, its widget counts and links
match the node signatures, and the UI and API twins describe the same graph.

Core node signatures come from tests/data/core_nodes.json (recorded from ComfyUI 0.3.64, 0.8.0 and 0.33.0
by scripts/snapshot_core_nodes.py; a node newer than 0.3.64 carries the version it first appears in as "since");
the live-server check, per declared minimum ComfyUI version, is in test_comfyui_integration.py.
"""

import json
from pathlib import Path

import pytest
from distorch_pack.nodes.catalog import NODE_TITLES, output_type, widget_inputs
from distorch_pack.nodes.settings import DisTorchSettings

from scripts.make_workflows import MIN_COMFYUI, OLDEST_COMFYUI
from scripts.snapshot_core_nodes import version_key

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted(p for p in (ROOT / "workflows").glob("*.json") if not p.name.endswith("_api.json"))
CORE = json.loads((ROOT / "tests" / "data" / "core_nodes.json").read_text())


def signature(class_type: str) -> dict:
    if class_type in NODE_TITLES:
        return {"sockets": [], "widgets": [(n, False) for n in widget_inputs(class_type)], "uploads": set(),
                "outputs": [output_type(class_type)]}
    assert class_type in CORE, f"{class_type} is neither a core node nor a DisTorch node"
    spec = CORE[class_type]
    return {"sockets": [(s["name"], s["type"], s["optional"]) for s in spec["inputs"] if not s["widget"]],
            "widgets": [(s["name"], s["control_after_generate"]) for s in spec["inputs"] if s["widget"]],
            "uploads": {s["name"] for s in spec["inputs"] if s.get("upload")},
            "outputs": spec["outputs"]}


def test_all_example_workflows_exist():
    names = {p.stem for p in WORKFLOWS}
    assert names == {"flux1_dev_gguf", "wan22_14b_t2v", "wan22_14b_t2v_gguf", "hunyuan_video_t2v", "sd35_large",
                     "ltx2_t2v_gguf", "flux2_dev_gguf", "qwen_image_edit_gguf"}
    assert all((p.parent / f"{p.stem}_api.json").exists() for p in WORKFLOWS)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_ui_workflow_links_and_widgets(path):
    workflow = json.loads(path.read_text())
    nodes = {n["id"]: n for n in workflow["nodes"]}
    assert len(nodes) == len(workflow["nodes"]) and workflow["last_node_id"] >= max(nodes)
    for node in nodes.values():
        sig = signature(node["type"])
        assert [(i["name"], i["type"]) for i in node["inputs"]] == [(n, t) for n, t, _ in sig["sockets"]], node["type"]
        expected_widgets = sum(1 + int(control) for _, control in sig["widgets"]) + len(sig["uploads"])
        assert len(node["widgets_values"]) == expected_widgets, f"{node['type']}: widget count"
        assert [o["type"] for o in node["outputs"]] == sig["outputs"]
        for socket, (_, _, optional) in zip(node["inputs"], sig["sockets"]):
            assert optional or socket["link"] is not None, f"{node['type']}.{socket['name']} is not connected"
    link_ids = set()
    for link_id, origin, origin_slot, target, target_slot, kind in workflow["links"]:
        link_ids.add(link_id)
        assert nodes[origin]["outputs"][origin_slot]["type"] == kind
        assert link_id in nodes[origin]["outputs"][origin_slot]["links"]
        assert nodes[target]["inputs"][target_slot]["type"] == kind
        assert nodes[target]["inputs"][target_slot]["link"] == link_id
    assert workflow["last_link_id"] == max(link_ids)
    referenced = {i["link"] for n in nodes.values() for i in n["inputs"] if i["link"] is not None}
    assert referenced == link_ids


def ui_to_api(workflow: dict) -> dict:
    """An independent UI → API conversion (what the frontend's "Export (API)" does for these graphs)."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in nodes.values():
        sig = signature(node["type"])
        values = iter(node["widgets_values"])
        inputs = {}
        for name, control in sig["widgets"]:
            inputs[name] = next(values)
            if control:
                next(values)
            if name in sig["uploads"]:
                assert next(values) == "image"  # LoadImage's upload button, not an input
        for socket in node["inputs"]:
            if socket["link"] is not None:
                link = links[socket["link"]]
                inputs[socket["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_api_twin_describes_the_same_graph(path):
    api = json.loads((path.parent / f"{path.stem}_api.json").read_text())
    expected = ui_to_api(json.loads(path.read_text()))
    assert {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()} == expected
    for node_id, node in api.items():
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                source = api[value[0]]
                assert value[1] < len(signature(source["class_type"])["outputs"]), f"{node_id}.{name}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_distorch_settings_in_workflows_are_valid(path):
    api = json.loads((path.parent / f"{path.stem}_api.json").read_text())
    loaders = [n for n in api.values() if n["class_type"] in NODE_TITLES]
    assert loaders, "every example uses the DisTorch loaders"
    for node in loaders:
        i = node["inputs"]
        settings = DisTorchSettings.validate(i["compute_device"], i["virtual_vram_gb"], i["donor_device"],
                                             i["expert_mode_allocations"], ("cuda:0", "cuda:1", "cpu"),
                                             i["auto_placement"])
        assert settings.auto, "the examples leave placement on auto"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_readme_says_where_each_model_file_comes_from(path):
    readme = (ROOT / "README.md").read_text()
    api = json.loads((path.parent / f"{path.stem}_api.json").read_text())
    files = [v for n in api.values() if n["class_type"] in NODE_TITLES for k, v in n["inputs"].items()
             if k in ("unet_name", "vae_name") or k.startswith("clip_name")]
    missing = [f for f in files if f not in readme]
    assert not missing, f"README does not list {missing}"


def test_wan22_gguf_builds_its_text_encoder_from_a_umt5_gguf():
    api = json.loads((ROOT / "workflows" / "wan22_14b_t2v_gguf_api.json").read_text())
    (clip,) = [n["inputs"] for n in api.values() if n["class_type"] == "DisTorchCLIPLoader"]
    assert clip["clip_name"].endswith(".gguf") and clip["type"] == "wan"
    assert all(n["inputs"]["unet_name"].endswith(".gguf") for n in api.values()
               if n["class_type"] == "DisTorchUNetLoader")


def test_wan22_has_two_diffusion_models_with_their_own_virtual_vram():
    api = json.loads((ROOT / "workflows" / "wan22_14b_t2v_api.json").read_text())
    unets = [n["inputs"] for n in api.values() if n["class_type"] == "DisTorchUNetLoader"]
    assert {u["unet_name"] for u in unets} == {"wan2.2_t2v_high_noise_14B_fp16.safetensors",
                                                "wan2.2_t2v_low_noise_14B_fp16.safetensors"}
    assert all(u["virtual_vram_gb"] > 0 for u in unets)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_nodes_do_not_overlap_and_loaders_have_room_for_their_plan(path):
    """The frontend grows a node to fit its widgets: a DisTorch loader saved without room for its plan view
    (188 px, nodes/web/js/distorch.js) would grow over the node below it when the workflow is loaded."""
    title = 30
    boxes = [(n["id"], n["pos"][0], n["pos"][1] - title, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in json.loads(path.read_text())["nodes"]]
    for i, (a, left, top, right, bottom) in enumerate(boxes):
        for b, left2, top2, right2, bottom2 in boxes[i + 1:]:
            assert right <= left2 or right2 <= left or bottom <= top2 or bottom2 <= top, f"nodes {a} and {b} overlap"
    for node in json.loads(path.read_text())["nodes"]:
        if node["type"] in NODE_TITLES:
            rows = len(node["widgets_values"]) + len(node.get("inputs", []))
            assert node["size"][1] >= 60 + 26 * rows + 188, f"{node['type']} has no room for its plan view"


def core_nodes_of(path: Path) -> set[str]:
    return {n["type"] for n in json.loads(path.read_text())["nodes"] if n["type"] not in NODE_TITLES}


def declared_minimum(path: Path) -> str:
    return json.loads(path.read_text())["extra"]["distorch"]["min_comfyui"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_each_workflow_declares_the_oldest_comfyui_its_core_nodes_exist_in(path):
    """The declared minimum is the newest "since" of the workflow's core nodes: lower and an older ComfyUI would be
    offered a graph it cannot run, higher and it would be withheld from one that can."""
    declared = declared_minimum(path)
    assert declared == MIN_COMFYUI.get(path.stem, OLDEST_COMFYUI)
    needed = max((CORE[n].get("since", OLDEST_COMFYUI) for n in core_nodes_of(path)), key=version_key)
    assert declared == needed, f"{path.stem} declares ComfyUI {declared}, its core nodes need {needed}"


def test_minimum_versions_are_recorded_versions():
    assert set(MIN_COMFYUI) <= {p.stem for p in WORKFLOWS}
    recorded = {spec.get("since", OLDEST_COMFYUI) for spec in CORE.values()}
    assert set(MIN_COMFYUI.values()) <= recorded


def api_of(name: str) -> dict:
    return json.loads((ROOT / "workflows" / f"{name}_api.json").read_text())


def test_flux2_builds_its_text_encoder_from_a_mistral_gguf():
    (clip,) = [n["inputs"] for n in api_of("flux2_dev_gguf").values() if n["class_type"] == "DisTorchCLIPLoader"]
    assert clip["type"] == "flux2" and clip["clip_name"].endswith(".gguf") and "Mistral" in clip["clip_name"]


def test_ltx2_builds_its_text_encoder_from_a_gemma_gguf_and_the_text_projection():
    (clip,) = [n["inputs"] for n in api_of("ltx2_t2v_gguf").values() if n["class_type"] == "DisTorchDualCLIPLoader"]
    assert clip["type"] == "ltxv" and clip["clip_name1"].startswith("gemma-3-12b") and \
        clip["clip_name1"].endswith(".gguf") and "embeddings_connector" in clip["clip_name2"]


def test_qwen_image_edit_pairs_the_qwen25vl_gguf_with_its_mmproj():
    api = api_of("qwen_image_edit_gguf")
    (clip_id,) = [k for k, n in api.items() if n["class_type"] == "DisTorchDualCLIPLoader"]
    clip = api[clip_id]["inputs"]
    assert clip["type"] == "qwen_image" and clip["clip_name1"].startswith("Qwen2.5-VL-7B")
    assert "mmproj" not in clip["clip_name1"] and "mmproj" in clip["clip_name2"]
    assert all(name.endswith(".gguf") for name in (clip["clip_name1"], clip["clip_name2"]))
    encoders = [n["inputs"] for n in api.values() if n["class_type"] == "TextEncodeQwenImageEdit"]
    assert len(encoders) == 2 and all(e["clip"] == [clip_id, 0] and "image" in e and "vae" in e for e in encoders)


@pytest.mark.parametrize("name", ["ltx2_t2v_gguf", "flux2_dev_gguf", "qwen_image_edit_gguf"])
def test_new_gguf_workflows_stream_their_diffusion_model(name):
    (unet,) = [n["inputs"] for n in api_of(name).values() if n["class_type"] == "DisTorchUNetLoader"]
    assert unet["unet_name"].endswith(".gguf") and unet["virtual_vram_gb"] > 0
