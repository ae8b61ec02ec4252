"""The stand-in table for ComfyUI-MultiGPU / ComfyUI-GGUF loader ids, the check for installed packs, and the converter.

The expected signatures below are transcribed from the originals, independently of distorch/legacy_loaders.py:
ComfyUI-MultiGPU 2.6.3 `wrappers.py` (DisTorch2 wrappers add the optional inputs `compute_device` — named
`device` on CLIP loaders —, `virtual_vram_gb` 4.0, `donor_device` 'cpu', `expert_mode_allocations` '',
`eject_models` True, False on CLIP loaders; DisTorch v1 wrappers add `device`, `virtual_vram_gb` 4.0 (max 24),
`use_other_vram` False, `expert_mode_allocations`; plain wrappers add `device`) on top of the wrapped
loader's own inputs (core's, ComfyUI-GGUF's `nodes.py`), and `checkpoint_multigpu.py` for the checkpoint loaders.
"""

import json

import pytest

from distorch.catalog import NODE_TITLES, widget_inputs
from distorch.convert import ConvertError, convert_workflow
from distorch.legacy_loaders import GGUF, LEGACY_LOADERS, MULTIGPU, Machine, loaders_of

DISTORCH2 = [("compute_device", None), ("virtual_vram_gb", 4.0), ("donor_device", "cpu"),
             ("expert_mode_allocations", ""), ("eject_models", True)]
DISTORCH2_CLIP = [("device", None), ("virtual_vram_gb", 4.0), ("donor_device", "cpu"),
                  ("expert_mode_allocations", ""), ("eject_models", False)]
DISTORCH1 = [("device", None), ("virtual_vram_gb", 4.0), ("use_other_vram", False), ("expert_mode_allocations", "")]
DEVICE = [("device", None)]
UNET = [("unet_name", None), ("weight_dtype", "default")]
UNET_GGUF = [("unet_name", None)]
UNET_GGUF_ADVANCED = UNET_GGUF + [("dequant_dtype", "default"), ("patch_dtype", "default"), ("patch_on_device", False)]
CLIP = [("clip_name", None), ("type", "stable_diffusion")]
DUAL = [("clip_name1", None), ("clip_name2", None), ("type", "sdxl")]
TRIPLE = [("clip_name1", None), ("clip_name2", None), ("clip_name3", None)]
QUAD = TRIPLE + [("clip_name4", None)]
VAE = [("vae_name", None)]
CKPT = [("ckpt_name", None)]

# node id → (required inputs, optional inputs), each (name, default); None: the machine's device or the first file.
ORIGINALS = {
    "UNETLoaderDisTorch2MultiGPU": (UNET, DISTORCH2),
    "VAELoaderDisTorch2MultiGPU": (VAE, DISTORCH2),
    "CLIPLoaderDisTorch2MultiGPU": (CLIP, DISTORCH2_CLIP),
    "DualCLIPLoaderDisTorch2MultiGPU": (DUAL, DISTORCH2_CLIP),
    "TripleCLIPLoaderDisTorch2MultiGPU": (TRIPLE, DISTORCH2_CLIP),
    "QuadrupleCLIPLoaderDisTorch2MultiGPU": (QUAD, DISTORCH2_CLIP),
    "CheckpointLoaderSimpleDisTorch2MultiGPU": (CKPT, DISTORCH2),
    "CheckpointLoaderAdvancedDisTorch2MultiGPU": (
        CKPT + [("unet_compute_device", None), ("unet_virtual_vram_gb", 4.0), ("unet_donor_device", "cpu"),
                ("clip_compute_device", "cpu"), ("clip_virtual_vram_gb", 2.0), ("clip_donor_device", "cpu"),
                ("vae_device", None)],
        [("unet_expert_mode_allocations", ""), ("clip_expert_mode_allocations", ""), ("high_precision_loras", True),
         ("eject_models", True)]),
    "UnetLoaderGGUFDisTorch2MultiGPU": (UNET_GGUF, DISTORCH2),
    "UnetLoaderGGUFAdvancedDisTorch2MultiGPU": (UNET_GGUF_ADVANCED, DISTORCH2),
    "CLIPLoaderGGUFDisTorch2MultiGPU": (CLIP, DISTORCH2_CLIP),
    "DualCLIPLoaderGGUFDisTorch2MultiGPU": (DUAL, DISTORCH2_CLIP),
    "TripleCLIPLoaderGGUFDisTorch2MultiGPU": (TRIPLE, DISTORCH2_CLIP),
    "QuadrupleCLIPLoaderGGUFDisTorch2MultiGPU": (QUAD, DISTORCH2_CLIP),
    "UnetLoaderGGUFDisTorchMultiGPU": (UNET_GGUF, DISTORCH1),
    "UnetLoaderGGUFAdvancedDisTorchMultiGPU": (UNET_GGUF_ADVANCED, DISTORCH1),
    "CLIPLoaderGGUFDisTorchMultiGPU": (CLIP, DISTORCH1),
    "DualCLIPLoaderGGUFDisTorchMultiGPU": (DUAL, DISTORCH1),
    "TripleCLIPLoaderGGUFDisTorchMultiGPU": (TRIPLE, DISTORCH1),
    "QuadrupleCLIPLoaderGGUFDisTorchMultiGPU": (QUAD, DISTORCH1),
    "UNETLoaderMultiGPU": (UNET, DEVICE),
    "VAELoaderMultiGPU": (VAE, DEVICE),
    "CLIPLoaderMultiGPU": (CLIP, DEVICE),
    "DualCLIPLoaderMultiGPU": (DUAL, DEVICE),
    "TripleCLIPLoaderMultiGPU": (TRIPLE, DEVICE),
    "QuadrupleCLIPLoaderMultiGPU": (QUAD, DEVICE),
    "CheckpointLoaderSimpleMultiGPU": (CKPT, DEVICE),
    "CheckpointLoaderAdvancedMultiGPU": (CKPT + [("unet_device", None), ("clip_device", None), ("vae_device", None)],
                                         []),
    "UnetLoaderGGUFMultiGPU": (UNET_GGUF, DEVICE),
    "UnetLoaderGGUFAdvancedMultiGPU": (UNET_GGUF_ADVANCED, DEVICE),
    "CLIPLoaderGGUFMultiGPU": (CLIP, DEVICE),
    "DualCLIPLoaderGGUFMultiGPU": (DUAL, DEVICE),
    "TripleCLIPLoaderGGUFMultiGPU": (TRIPLE, DEVICE),
    "QuadrupleCLIPLoaderGGUFMultiGPU": (QUAD, DEVICE),
    "UnetLoaderGGUF": (UNET_GGUF, []),
    "UnetLoaderGGUFAdvanced": (UNET_GGUF_ADVANCED, []),
    "CLIPLoaderGGUF": (CLIP, []),
    "DualCLIPLoaderGGUF": (DUAL, []),
    "TripleCLIPLoaderGGUF": (TRIPLE, []),
    "QuadrupleCLIPLoaderGGUF": (QUAD, []),
}


def test_every_original_loader_id_has_a_stand_in_and_nothing_else_does():
    stand_ins = {e.node_id for e in loaders_of(MULTIGPU) + loaders_of(GGUF)}
    assert stand_ins == set(ORIGINALS)


@pytest.mark.parametrize("node_id", sorted(ORIGINALS))
def test_stand_in_inputs_match_the_original(node_id):
    required, optional = ORIGINALS[node_id]
    entry = LEGACY_LOADERS[node_id]
    assert [(i.name, i.default) for i in entry.inputs if not i.optional] == required
    assert [(i.name, i.default) for i in entry.inputs if i.optional] == optional
    legacy_v1 = [i for i in entry.inputs if i.name == "virtual_vram_gb" and "DisTorchMultiGPU" in node_id]
    assert all(i.maximum == 24.0 for i in legacy_v1)


@pytest.mark.parametrize("entry", list(LEGACY_LOADERS.values()), ids=lambda e: e.node_id)
def test_every_entry_maps_its_defaults_onto_all_inputs_of_its_target(entry):
    native = entry.to_native({}, Machine("cuda:0", ("cuda:0", "cuda:1")))
    assert tuple(native) == widget_inputs(entry.target)
    assert entry.target in NODE_TITLES
    assert all(name in entry.input_names for name in entry.carried())


MACHINE = Machine("cuda:0", ("cuda:0", "cuda:1", "cuda:2"))


@pytest.mark.parametrize(
    "node_id, values, expected",
    [
        ("UNETLoaderDisTorch2MultiGPU",
         {"unet_name": "q.safetensors", "weight_dtype": "fp8_e4m3fn", "compute_device": "cuda:1",
          "virtual_vram_gb": 14, "donor_device": "cuda:0", "expert_mode_allocations": "", "eject_models": True},
         {"unet_name": "q.safetensors", "weight_dtype": "fp8_e4m3fn", "compute_device": "cuda:1",
          "virtual_vram_gb": 14, "donor_device": "cuda:0", "expert_mode_allocations": "", "auto_placement": False}),
        ("CLIPLoaderDisTorch2MultiGPU",
         {"clip_name": "t.gguf", "type": "wan", "device": "cuda:1", "virtual_vram_gb": 3.9,
          "expert_mode_allocations": "cuda:1,1gb;cpu,*"},
         {"clip_name": "t.gguf", "type": "wan", "compute_device": "cuda:1", "virtual_vram_gb": 3.9,
          "donor_device": "cpu", "expert_mode_allocations": "cuda:1,1gb;cpu,*", "auto_placement": False}),
        ("VAELoaderMultiGPU", {"vae_name": "ae.safetensors", "device": "cuda:1"},
         {"vae_name": "ae.safetensors", "compute_device": "cuda:1", "virtual_vram_gb": 0.0, "donor_device": "cpu",
          "expert_mode_allocations": "", "auto_placement": False}),
        ("UnetLoaderGGUFDisTorchMultiGPU",
         {"unet_name": "f.gguf", "device": "cuda:1", "virtual_vram_gb": 6, "use_other_vram": True,
          "expert_mode_allocations": ""},
         {"unet_name": "f.gguf", "weight_dtype": "default", "compute_device": "cuda:1", "virtual_vram_gb": 6,
          "donor_device": "cuda:0", "expert_mode_allocations": "", "auto_placement": False}),
        ("UnetLoaderGGUFDisTorchMultiGPU",
         {"unet_name": "f.gguf", "device": "cuda:0", "virtual_vram_gb": 6, "use_other_vram": False},
         {"unet_name": "f.gguf", "weight_dtype": "default", "compute_device": "cuda:0", "virtual_vram_gb": 6,
          "donor_device": "cpu", "expert_mode_allocations": "", "auto_placement": False}),
        ("UnetLoaderGGUFAdvanced", {"unet_name": "f.gguf", "dequant_dtype": "float32", "patch_on_device": True},
         {"unet_name": "f.gguf", "weight_dtype": "default", "compute_device": "cuda:0", "virtual_vram_gb": 0.0,
          "donor_device": "cpu", "expert_mode_allocations": "", "auto_placement": False}),
        ("CLIPLoader", {"clip_name": "c.safetensors", "type": "sd3", "device": "cpu"},
         {"clip_name": "c.safetensors", "type": "sd3", "compute_device": "cpu", "virtual_vram_gb": 0.0,
          "donor_device": "cpu", "expert_mode_allocations": "", "auto_placement": False}),
        ("CheckpointLoaderSimpleDisTorch2MultiGPU",
         {"ckpt_name": "ltx.safetensors", "compute_device": "cuda:0", "virtual_vram_gb": 5, "donor_device": "cuda:1"},
         {"ckpt_name": "ltx.safetensors", "unet_compute_device": "cuda:0", "unet_virtual_vram_gb": 5,
          "unet_donor_device": "cuda:1", "clip_compute_device": "cuda:0", "clip_virtual_vram_gb": 0.0,
          "clip_donor_device": "cpu", "vae_device": "cuda:0", "unet_expert_mode_allocations": "",
          "clip_expert_mode_allocations": "", "unet_auto_placement": False, "clip_auto_placement": False}),
        ("CheckpointLoaderAdvancedMultiGPU",
         {"ckpt_name": "x.safetensors", "unet_device": "cuda:0", "clip_device": "cpu", "vae_device": "cuda:1"},
         {"ckpt_name": "x.safetensors", "unet_compute_device": "cuda:0", "unet_virtual_vram_gb": 0.0,
          "unet_donor_device": "cpu", "clip_compute_device": "cpu", "clip_virtual_vram_gb": 0.0,
          "clip_donor_device": "cpu", "vae_device": "cuda:1", "unet_expert_mode_allocations": "",
          "clip_expert_mode_allocations": "", "unet_auto_placement": False, "clip_auto_placement": False}),
    ],
)
def test_values_map_onto_the_distorch_node(node_id, values, expected):
    """Every converted node places by the original's numbers (auto placement off); inputs the originals never had
    (the stream format) get their defaults, as the last widgets."""
    native = LEGACY_LOADERS[node_id].to_native(values, MACHINE)
    assert native == {**expected, "stream_format": "stored"} and list(native)[-1] == "stream_format"


def test_use_other_vram_without_another_gpu_keeps_ram_as_donor():
    entry = LEGACY_LOADERS["CLIPLoaderGGUFDisTorchMultiGPU"]
    native = entry.to_native({"device": "cuda:0", "use_other_vram": True}, Machine("cuda:0", ("cuda:0",)))
    assert native["donor_device"] == "cpu"


# -- which packs ComfyUI loads ------------------------------------------------------------------------------------

def test_installed_packs_found_by_folder_name_or_project_name(tmp_path):
    from distorch_pack.nodes.installed_packs import installed_packs

    custom = tmp_path / "custom_nodes"
    (custom / "comfyui-multigpu").mkdir(parents=True)
    (custom / "my_gguf_fork").mkdir()
    (custom / "my_gguf_fork" / "pyproject.toml").write_text('[project]\nname = "ComfyUI-GGUF"\nversion = "1"\n')
    found = installed_packs([str(custom)])
    assert set(found) == {"ComfyUI-MultiGPU", "ComfyUI-GGUF"}
    assert found["ComfyUI-GGUF"].endswith("my_gguf_fork")
    other = tmp_path / "other_custom_nodes"
    (other / "unrelated").mkdir(parents=True)
    (other / "unrelated" / "pyproject.toml").write_text('[tool.x]\nname = "comfyui-gguf"\n[project]\nname = "x"\n')
    assert installed_packs([str(other)]) == {}, "only the [project] table names the project"


@pytest.mark.parametrize(
    "entries, whitelist, expected",
    [
        (["ComfyUI-MultiGPU.disabled"], None, set()),
        (["ComfyUI_MultiGPU"], None, {"ComfyUI-MultiGPU"}),
        (["ComfyUI-GGUF"], ["ComfyUI-DisTorch"], set()),
        (["ComfyUI-GGUF"], ["ComfyUI-GGUF"], {"ComfyUI-GGUF"}),
        (["comfyui_gguf.py"], None, {"ComfyUI-GGUF"}),
        (["ComfyUI-GGUF.zip"], None, set()),
        (["ComfyUI-GGUF-extras"], None, set()),
    ],
)
def test_installed_packs_follow_comfyuis_loading_rules(tmp_path, entries, whitelist, expected):
    from distorch_pack.nodes.installed_packs import installed_packs

    for name in entries:
        path = tmp_path / name
        path.write_text("") if "." in name and not name.endswith(".disabled") else path.mkdir()
    assert set(installed_packs([str(tmp_path), str(tmp_path / "missing")], whitelist)) == expected


# -- the converter ------------------------------------------------------------------------------------------------

def ui_node(node_id, node_type, widgets, inputs=(), outputs=("MODEL",), title=None, pos=(0, 0), **extra):
    node = {"id": node_id, "type": node_type, "pos": list(pos), "size": [300, 100], "flags": {}, "order": node_id,
            "mode": 0, "inputs": list(inputs), "outputs": [{"name": t, "type": t, "links": []} for t in outputs],
            "properties": {"Node name for S&R": node_type, "cnr_id": "comfyui-multigpu", "ver": "2.6.3"},
            "widgets_values": list(widgets), **extra}
    if title:
        node["title"] = title
    return node


def ui_workflow(nodes, links=()):
    return {"last_node_id": max(n["id"] for n in nodes), "last_link_id": len(links), "nodes": nodes,
            "links": list(links), "groups": [], "config": {}, "extra": {}, "version": 0.4}


def qwen_ui():
    """The shape of MultiGPU's 'qwen_image unet clip distorch2' example: three loaders feeding core nodes."""
    nodes = [
        ui_node(70, "VAELoaderMultiGPU", ["qwen_image_vae.safetensors", "cuda:1"], outputs=("VAE",), pos=(-30, 400)),
        ui_node(78, "UNETLoaderDisTorch2MultiGPU",
                ["qwen_image_fp8_e4m3fn.safetensors", "default", "cuda:0", 14, "cpu", "", True], title="Big UNet"),
        ui_node(79, "CLIPLoaderDisTorch2MultiGPU",
                ["qwen_2.5_vl_7b_fp8_scaled.safetensors", "qwen_image", "cuda:1", 3.9, "cpu", "", False],
                outputs=("CLIP",)),
        ui_node(80, "CLIPTextEncode", ["a fox"], inputs=[{"name": "clip", "type": "CLIP", "link": 2}],
                outputs=("CONDITIONING",)),
        ui_node(81, "VAEDecode", [], inputs=[{"name": "samples", "type": "LATENT", "link": None},
                                             {"name": "vae", "type": "VAE", "link": 1}], outputs=("IMAGE",)),
    ]
    return ui_workflow(nodes, [[1, 70, 0, 81, 1, "VAE"], [2, 79, 0, 80, 0, "CLIP"]])


def test_ui_conversion_keeps_ids_links_titles_positions_and_values():
    workflow = qwen_ui()
    result = convert_workflow(workflow, MACHINE)
    converted = result.workflow
    assert converted["links"] == workflow["links"] and len(converted["nodes"]) == len(workflow["nodes"])
    by_id = {n["id"]: n for n in converted["nodes"]}
    assert by_id[78]["type"] == "DisTorchUNetLoader" and by_id[78]["title"] == "Big UNet"
    assert by_id[78]["widgets_values"] == ["qwen_image_fp8_e4m3fn.safetensors", "default", "cuda:0", 14, "cpu", "",
                                           False, "stored"]
    assert by_id[79]["widgets_values"] == ["qwen_2.5_vl_7b_fp8_scaled.safetensors", "qwen_image", "cuda:1", 3.9,
                                           "cpu", "", False, "stored"]
    assert by_id[70]["widgets_values"] == ["qwen_image_vae.safetensors", "cuda:1", 0.0, "cpu", "", False, "stored"]
    assert by_id[70]["pos"] == [-30, 400] and "title" not in by_id[70]
    assert by_id[78]["properties"] == {"Node name for S&R": "DisTorchUNetLoader"}
    assert by_id[80] == workflow["nodes"][3] and by_id[81] == workflow["nodes"][4]
    assert workflow["nodes"][1]["type"] == "UNETLoaderDisTorch2MultiGPU", "the input must not be modified"
    report = result.report()
    assert "node 78: UNETLoaderDisTorch2MultiGPU -> DisTorchUNetLoader" in report and "eject_models=True" in report
    assert "3 loader node(s) converted" in report


def test_ui_conversion_renames_a_linked_widget_input_and_keeps_its_slot():
    """Newer frontends list widgets as inputs; a link into one (here `device`) must stay on the same slot."""
    inputs = [{"name": "clip_name", "type": "COMBO", "widget": {"name": "clip_name"}, "link": None},
              {"name": "type", "type": "COMBO", "widget": {"name": "type"}, "link": None},
              {"name": "device", "type": "COMBO", "widget": {"name": "device"}, "link": 5},
              {"name": "eject_models", "type": "BOOLEAN", "widget": {"name": "eject_models"}, "link": None}]
    nodes = [ui_node(1, "PrimitiveNode", ["cuda:1"], outputs=("COMBO",)),
             ui_node(2, "CLIPLoaderDisTorch2MultiGPU", ["t5.safetensors", "wan", "cuda:1", 2.0, "cpu", "", False],
                     inputs=inputs, outputs=("CLIP",))]
    workflow = ui_workflow(nodes, [[5, 1, 0, 2, 2, "COMBO"]])
    converted = convert_workflow(workflow, MACHINE).workflow
    node = converted["nodes"][1]
    assert [i["name"] for i in node["inputs"]] == ["clip_name", "type", "compute_device"]
    assert node["inputs"][2] == {"name": "compute_device", "type": "COMBO", "widget": {"name": "compute_device"},
                                 "link": 5}
    assert converted["links"] == workflow["links"]


def test_ui_conversion_keeps_an_unused_input_that_a_linked_one_follows():
    """Dropping `eject_models` here would move the linked `compute_device` from slot 1 to slot 0."""
    inputs = [{"name": "eject_models", "type": "BOOLEAN", "widget": {"name": "eject_models"}, "link": None},
              {"name": "compute_device", "type": "COMBO", "widget": {"name": "compute_device"}, "link": 4}]
    nodes = [ui_node(1, "PrimitiveNode", ["cpu"], outputs=("COMBO",)),
             ui_node(2, "UNETLoaderDisTorch2MultiGPU", ["u.safetensors", "default", "cpu", 4, "cpu", "", True],
                     inputs=inputs)]
    workflow = ui_workflow(nodes, [[4, 1, 0, 2, 1, "COMBO"]])
    node = convert_workflow(workflow, MACHINE).workflow["nodes"][1]
    assert node["type"] == "DisTorchUNetLoader"
    assert [i["name"] for i in node["inputs"]] == ["eject_models", "compute_device"]
    assert node["inputs"][1]["link"] == 4


def test_ui_node_with_a_link_into_an_input_without_counterpart_is_left_alone():
    inputs = [{"name": "eject_models", "type": "BOOLEAN", "widget": {"name": "eject_models"}, "link": 9}]
    nodes = [ui_node(2, "UNETLoaderDisTorch2MultiGPU", ["u.safetensors", "default", "cuda:0", 4, "cpu", "", True],
                     inputs=inputs)]
    result = convert_workflow(ui_workflow(nodes, [[9, 1, 0, 2, 0, "BOOLEAN"]]), MACHINE)
    assert result.workflow["nodes"][0]["type"] == "UNETLoaderDisTorch2MultiGPU"
    assert "'eject_models' is driven by a link" in result.report()


def test_ui_conversion_fills_widgets_an_older_version_did_not_save():
    nodes = [ui_node(44, "CheckpointLoaderAdvancedDisTorch2MultiGPU",
                     ["mochi.safetensors", "cuda:0", 5, "cpu", "cuda:1", 2, "cpu", "cuda:1", "", "", True],
                     outputs=("MODEL", "CLIP", "VAE"))]
    node = convert_workflow(ui_workflow(nodes), MACHINE).workflow["nodes"][0]
    assert node["type"] == "DisTorchCheckpointLoader"
    assert node["widgets_values"] == ["mochi.safetensors", "cuda:0", 5, "cpu", "cuda:1", 2, "cpu", "cuda:1", "", "",
                                      False, False, "stored"], "converted nodes place by their numbers: auto off"


def test_ui_node_with_more_widgets_than_known_is_left_alone():
    nodes = [ui_node(3, "VAELoaderMultiGPU", ["ae.safetensors", "cuda:0", "surprise"], outputs=("VAE",))]
    result = convert_workflow(ui_workflow(nodes), MACHINE)
    assert result.workflow["nodes"][0]["type"] == "VAELoaderMultiGPU"
    assert "3 widget values where VAELoaderMultiGPU has 2 widgets" in result.report()


def test_subgraph_nodes_are_converted_too():
    workflow = qwen_ui()
    workflow["definitions"] = {"subgraphs": [{"id": "abc", "nodes": [ui_node(5, "UnetLoaderGGUF", ["f.gguf"])],
                                              "links": []}]}
    converted = convert_workflow(workflow, MACHINE).workflow
    inner = converted["definitions"]["subgraphs"][0]["nodes"][0]
    assert inner["type"] == "DisTorchUNetLoader"
    assert inner["widgets_values"] == ["f.gguf", "default", "cuda:0", 0.0, "cpu", "", False, "stored"]


def test_core_loaders_are_converted_unless_kept_and_builtin_vaes_stay():
    nodes = [ui_node(1, "UNETLoader", ["u.safetensors", "fp8_e4m3fn"]),
             ui_node(2, "VAELoader", ["taesd"], outputs=("VAE",)),
             ui_node(3, "CheckpointLoaderSimple", ["sd15.safetensors"], outputs=("MODEL", "CLIP", "VAE"))]
    result = convert_workflow(ui_workflow(nodes), Machine("cpu", ()))
    types = [n["type"] for n in result.workflow["nodes"]]
    assert types == ["DisTorchUNetLoader", "VAELoader", "DisTorchCheckpointLoader"]
    assert result.workflow["nodes"][0]["widgets_values"] == ["u.safetensors", "fp8_e4m3fn", "cpu", 0.0, "cpu", "",
                                                                 False, "stored"]
    assert "built-in VAEs" in result.report()
    kept = convert_workflow(ui_workflow(nodes), include_core=False)
    assert [n["type"] for n in kept.workflow["nodes"]] == ["UNETLoader", "VAELoader", "CheckpointLoaderSimple"]
    assert not kept.changes and not kept.skipped


def test_api_conversion_keeps_links_and_renames_linked_device():
    prompt = {
        "78": {"class_type": "UNETLoaderDisTorch2MultiGPU", "_meta": {"title": "Big UNet"},
               "inputs": {"unet_name": "q.safetensors", "weight_dtype": "default", "compute_device": "cuda:0",
                          "virtual_vram_gb": 14, "donor_device": "cpu", "expert_mode_allocations": "",
                          "eject_models": True}},
        "79": {"class_type": "CLIPLoaderMultiGPU", "inputs": {"clip_name": "u.safetensors", "type": "wan",
                                                              "device": ["90", 0]}},
        "80": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["79", 0], "text": "x"}},
    }
    result = convert_workflow(prompt, MACHINE)
    converted = result.workflow
    assert converted["78"] == {"class_type": "DisTorchUNetLoader", "_meta": {"title": "Big UNet"}, "inputs": {
        "unet_name": "q.safetensors", "weight_dtype": "default", "compute_device": "cuda:0", "virtual_vram_gb": 14,
        "donor_device": "cpu", "expert_mode_allocations": "", "auto_placement": False, "stream_format": "stored"}}
    assert converted["79"]["inputs"]["compute_device"] == ["90", 0] and "device" not in converted["79"]["inputs"]
    assert converted["80"] == prompt["80"]


def test_api_node_with_unknown_inputs_is_left_alone():
    prompt = {"1": {"class_type": "VAELoaderMultiGPU", "inputs": {"vae_name": "a.safetensors", "device": "cpu",
                                                                  "tiling" * 100: "x" * 500}}}
    result = convert_workflow(prompt, MACHINE)
    assert result.workflow == prompt
    assert "unknown inputs 'tilingtiling" in result.report() and len(result.report()) < 300


@pytest.mark.parametrize("workflow", [[1, 2], {}, {"nodes": "x"}, {"1": {"inputs": {}}}, "text", None,
                                      {"1": {"class_type": "X", "inputs": []}}])
def test_not_a_workflow_is_a_convert_error(workflow):
    with pytest.raises(ConvertError, match="not a ComfyUI workflow"):
        convert_workflow(workflow)


def test_malformed_widgets_values_name_the_node():
    with pytest.raises(ConvertError, match="node 7 \\(UnetLoaderGGUF\\): widgets_values"):
        convert_workflow(ui_workflow([ui_node(7, "UnetLoaderGGUF", [], widgets_values="x")]))


# -- the command line ----------------------------------------------------------------------------------------------

def test_cli_converts_a_file_and_prints_the_changes(tmp_path, capsys):
    from distorch.cli import main

    source, target = tmp_path / "in.json", tmp_path / "out.json"
    source.write_text(json.dumps(qwen_ui()))
    assert main(["convert", str(source), "-o", str(target), "--compute-device", "cpu"]) == 0
    converted = json.loads(target.read_text())
    assert [n["type"] for n in converted["nodes"][:3]] == ["DisTorchVAELoader", "DisTorchUNetLoader",
                                                           "DisTorchCLIPLoader"]
    assert "3 loader node(s) converted" in capsys.readouterr().out


def test_cli_writes_json_to_stdout_and_the_report_to_stderr(tmp_path, capsys):
    from distorch.cli import main

    source = tmp_path / "in.json"
    source.write_text(json.dumps({"1": {"class_type": "UnetLoaderGGUF", "inputs": {"unet_name": "f.gguf"}}}))
    assert main(["convert", str(source), "--compute-device", "cuda:1", "--gpus", "2"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["1"]["inputs"]["compute_device"] == "cuda:1"
    assert "UnetLoaderGGUF -> DisTorchUNetLoader" in err


@pytest.mark.parametrize(
    "content, args, message",
    [
        (None, [], "No such file"),
        (b"\x00\x01 not json", [], "not JSON"),
        (b"[" * 100000, [], "not JSON"),
        (b"[1, 2]", [], "not a ComfyUI workflow"),
        (b"{}", ["--compute-device", "gpu0"], "--compute-device 'gpu0'"),
        (b"{}", ["--gpus", "-1"], "--gpus must be between 0 and 64"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, content, args, message):
    from distorch.cli import main

    path = tmp_path / "workflow.json"
    if content is not None:
        path.write_bytes(content)
    assert main(["convert", str(path), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_refuses_a_huge_file_without_parsing_it(tmp_path, capsys, monkeypatch):
    import distorch.cli

    monkeypatch.setattr(distorch.cli, "MAX_WORKFLOW_BYTES", 100)
    path = tmp_path / "big.json"
    path.write_text(json.dumps(qwen_ui()))
    assert distorch.cli.main(["convert", str(path)]) == 2
    assert "larger than" in capsys.readouterr().err



# -- the checkpoint loader's settings -------------------------------------------------------------------------------

CHECKPOINT_VALUES = {"unet_compute_device": "cuda:0", "unet_virtual_vram_gb": 6.0, "unet_donor_device": "cpu",
                     "clip_compute_device": "cuda:1", "clip_virtual_vram_gb": 0.5, "clip_donor_device": "cpu",
                     "vae_device": "cuda:1", "unet_expert_mode_allocations": "",
                     "clip_expert_mode_allocations": "cuda:1,1gb;cpu,*"}


def test_checkpoint_settings_hold_one_setting_per_model():
    from distorch_pack.nodes.settings import CheckpointSettings

    settings = CheckpointSettings.validate(CHECKPOINT_VALUES, ("cuda:0", "cuda:1", "cpu"))
    assert (settings.unet.compute_device, settings.unet.virtual_vram_gb) == ("cuda:0", 6.0)
    assert (settings.clip.compute_device, settings.clip.expert_mode_allocations) == ("cuda:1", "cuda:1,1gb;cpu,*")
    assert settings.vae_device == "cuda:1"


def test_checkpoint_settings_name_every_bad_input_with_its_model():
    from distorch_pack.nodes.settings import CheckpointSettings

    values = {**CHECKPOINT_VALUES, "unet_donor_device": "cuda:0", "clip_expert_mode_allocations": "cuda:1,2t",
              "vae_device": "cuda:7"}
    with pytest.raises(ValueError) as error:
        CheckpointSettings.validate(values, ("cuda:0", "cuda:1", "cpu"))
    message = str(error.value)
    assert message.startswith("DisTorch: ") and "\n" not in message
    assert "unet_donor_device 'cuda:0' is the compute device" in message
    assert "clip_expert_mode_allocations: unknown unit 't'" in message
    assert "vae_device 'cuda:7' is not available" in message
