"""ComfyUI-MultiGPU's and ComfyUI-GGUF's users in a real headless ComfyUI (CPU), on every install found.

Their loader ids run here with the originals' inputs; workflows in the shapes MultiGPU's examples use
(built here from the node signatures) validate against the live /object_info and give core's image bit
for bit; converted workflows (the /distorch/convert route behind the canvas menu action, the same
converter as `python -m distorch convert`) run and equal the unconverted ones; the checkpoint loader
equals CheckpointLoaderSimple; and an installed pack is never shadowed.
"""

import json
import shutil

import pytest
import torch
from comfyui_harness import PACK_DIR_NAME, ComfyServer, distorch_unet, sampling_prompt
from safetensors.torch import load_file
from test_compat import ORIGINALS

pytestmark = pytest.mark.comfyui

SD3, CLIP_L, TAESD3 = "tiny_sd3.safetensors", "random_clip_l.safetensors", "tiny_taesd3.safetensors"
CHECKPOINT = "tiny_sd3_checkpoint.safetensors"
ONE_BLOCK = 0.001  # GB: about one of the tiny SD3's two joint blocks (its text encoder: a tenth of CLIP-L)
MULTIGPU_OR_GGUF = ("MultiGPU", "GGUF")


def run_ok(server, prompt):
    result = server.run(prompt)
    assert result.ok, f"{result.error_text()[:3000]}\n--- server log ---\n{server.log()[-3000:]}"
    return result


def sd3_image(server, loaders: dict, model, clip, vae, name: str) -> torch.Tensor:
    """Text → SD3 sampling → VAE decode, the pixels saved as a tensor; `model`/`clip`/`vae` are [node, slot]."""
    prompt = {
        **loaders,
        "10": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": "a lighthouse on a cliff"}},
        "11": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": "blurry"}},
        "12": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "13": {"class_type": "KSampler", "inputs": {"model": model, "positive": ["10", 0], "negative": ["11", 0],
                                                   "latent_image": ["12", 0], "seed": 7, "steps": 2, "cfg": 3.0,
                                                   "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "14": {"class_type": "VAEDecode", "inputs": {"samples": ["13", 0], "vae": vae}},
        "15": {"class_type": "DisTorchTestSaveImageTensor", "inputs": {"images": ["14", 0], "filename": name}},
    }
    run_ok(server, prompt)
    return load_file(str(server.base / "output" / f"{name}.safetensors"))["images"]


def node(class_type: str, **inputs) -> dict:
    return {"class_type": class_type, "inputs": inputs}


CORE_FILES = {"1": node("UNETLoader", unet_name=SD3, weight_dtype="default"),
              "2": node("CLIPLoader", clip_name=CLIP_L, type="sd3"),
              "3": node("VAELoader", vae_name=TAESD3)}


def multigpu_files(unet_vram: float) -> dict:
    """The SD3 graph as a MultiGPU user writes it: DisTorch2 UNet and CLIP loaders, the VAE on a chosen device."""
    return {"1": node("UNETLoaderDisTorch2MultiGPU", unet_name=SD3, weight_dtype="default", compute_device="cpu",
                      virtual_vram_gb=unet_vram, donor_device="cpu", expert_mode_allocations="", eject_models=True),
            "2": node("CLIPLoaderDisTorch2MultiGPU", clip_name=CLIP_L, type="sd3", device="cpu", virtual_vram_gb=3.9,
                      donor_device="cpu", expert_mode_allocations="", eject_models=False),
            "3": node("VAELoaderMultiGPU", vae_name=TAESD3, device="cpu")}


SEPARATE = (["1", 0], ["2", 0], ["3", 0])
FROM_CHECKPOINT = (["1", 0], ["1", 1], ["1", 2])


@pytest.fixture(scope="module")
def core_image(server):
    return sd3_image(server, CORE_FILES, *SEPARATE, "mg_core")


@pytest.fixture(scope="module")
def core_checkpoint_image(server):
    return sd3_image(server, {"1": node("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)}, *FROM_CHECKPOINT,
                     "mg_core_ckpt")


# -- the ids and their inputs -------------------------------------------------------------------------------------

def test_stand_ins_are_registered_with_the_originals_inputs(server):
    info = server.get("/object_info")
    for node_id, (required, optional) in ORIGINALS.items():
        spec = info[node_id]
        assert spec["category"] == "DisTorch/compat", node_id
        assert spec["input_order"]["required"] == [name for name, _ in required], node_id
        assert spec["input_order"].get("optional", []) == [name for name, _ in optional], node_id
        for section, names in (("required", required), ("optional", optional)):
            for name, default in names:
                options = spec["input"][section][name][1]
                if default is not None:
                    assert options.get("default") == default, f"{node_id}.{name}"
                assert options.get("tooltip"), f"{node_id}.{name}"
    assert "distorch: ComfyUI-MultiGPU is not installed: 34 of its loader ids run on DisTorch" in server.log()
    assert "distorch: ComfyUI-GGUF is not installed: 6 of its loader ids run on DisTorch" in server.log()


def _first_valid(spec_options, default):
    if isinstance(spec_options, dict) and spec_options.get("options"):
        return default if default in spec_options["options"] else spec_options["options"][0]
    return default


def multigpu_shaped_node(info: dict, node_id: str) -> dict:
    """A node with every input the original has (as MultiGPU's API examples give them), valid on this server."""
    required, optional = ORIGINALS[node_id]
    inputs = {}
    for section, names in (("required", required), ("optional", optional)):
        for name, default in names:
            kind, options = (info[node_id]["input"][section][name] + [{}])[:2]
            if name.endswith("device") and name != "patch_on_device":
                inputs[name] = "cpu"
            else:
                inputs[name] = _first_valid(options, default)
    return node(node_id, **inputs)


def validate_against_object_info(prompt: dict, info: dict) -> None:
    """What /prompt checks for each node, from the live signatures: names, required inputs, combo values, ranges."""
    for node_id, entry in prompt.items():
        spec = info[entry["class_type"]]
        sections = {**spec["input"].get("optional", {}), **spec["input"]["required"]}
        assert set(entry["inputs"]) <= set(sections), (node_id, set(entry["inputs"]) - set(sections))
        assert set(spec["input"]["required"]) <= set(entry["inputs"]), node_id
        for name, value in entry["inputs"].items():
            if isinstance(value, list):
                continue  # a link
            kind, options = sections[name][0], (sections[name] + [{}])[1]
            if isinstance(kind, list) or kind == "COMBO":
                choices = kind if isinstance(kind, list) else options["options"]
                assert value in choices, f"{node_id}.{name}={value!r} not in {choices[:8]}"
            elif kind in ("FLOAT", "INT"):
                assert options.get("min", -1e30) <= value <= options.get("max", 1e30), f"{node_id}.{name}"
            elif kind == "BOOLEAN":
                assert isinstance(value, bool), f"{node_id}.{name}"
            elif kind == "STRING":
                assert isinstance(value, str), f"{node_id}.{name}"


def test_workflows_in_multigpu_shapes_validate_against_object_info(server):
    info = server.get("/object_info")
    prompt = {str(i): multigpu_shaped_node(info, node_id) for i, node_id in enumerate(sorted(ORIGINALS), start=1)}
    validate_against_object_info(prompt, info)
    ui = ui_workflow_from(prompt, info)
    assert validate_ui_against_object_info(ui, info) == len(prompt)


# -- bit for bit against core -------------------------------------------------------------------------------------

def test_sd3_graph_in_multigpu_nodes_gives_cores_image(server, core_image):
    """The diffusion model streams one block, the text encoder all of its blocks (MultiGPU's 3.9 GB)."""
    image = sd3_image(server, multigpu_files(ONE_BLOCK), *SEPARATE, "mg_multigpu")
    assert image.shape == (1, 64, 64, 3)
    assert torch.equal(image, core_image)


def test_gguf_pack_ids_run_the_gguf_engine(server):
    ours = server.latent(run_ok(server, sampling_prompt(distorch_unet("tiny_wan21_Q8_0.gguf", 0.0), "wan", "g_dt")))
    gguf = {"class_type": "UnetLoaderGGUF", "inputs": {"unet_name": "tiny_wan21_Q8_0.gguf"}}
    legacy = {"class_type": "UnetLoaderGGUFDisTorchMultiGPU", "inputs": {
        "unet_name": "tiny_wan21_Q8_0.gguf", "device": "cpu", "virtual_vram_gb": 0.0015, "use_other_vram": True,
        "expert_mode_allocations": ""}}
    for loader, prefix in ((gguf, "g_pack"), (legacy, "g_legacy")):
        assert torch.equal(server.latent(run_ok(server, sampling_prompt(loader, "wan", prefix))), ours), prefix


@pytest.mark.parametrize(
    "loader",
    [
        node("DisTorchCheckpointLoader", ckpt_name=CHECKPOINT, unet_compute_device="cpu",
             unet_virtual_vram_gb=ONE_BLOCK, unet_donor_device="cpu", clip_compute_device="cpu",
             clip_virtual_vram_gb=0.1, clip_donor_device="cpu", vae_device="cpu", unet_expert_mode_allocations="",
             clip_expert_mode_allocations=""),
        node("CheckpointLoaderAdvancedDisTorch2MultiGPU", ckpt_name=CHECKPOINT, unet_compute_device="cpu",
             unet_virtual_vram_gb=5, unet_donor_device="cpu", clip_compute_device="cpu", clip_virtual_vram_gb=2,
             clip_donor_device="cpu", vae_device="cpu", unet_expert_mode_allocations="",
             clip_expert_mode_allocations="", high_precision_loras=True),
        node("CheckpointLoaderSimpleMultiGPU", ckpt_name=CHECKPOINT, device="cpu"),
    ],
    ids=["distorch", "advanced-distorch2", "simple-multigpu"],
)
def test_checkpoint_loaders_give_checkpointloadersimples_image(server, core_checkpoint_image, loader):
    name = f"mg_ckpt_{loader['class_type']}"
    image = sd3_image(server, {"1": loader}, *FROM_CHECKPOINT, name)
    assert torch.equal(image, core_checkpoint_image)


def vae_graph(loader: dict, vae) -> dict:
    """A loader whose VAE decodes an empty SD3 latent, so ComfyUI validates it (only nodes feeding an output are)."""
    return {"1": loader, "2": node("EmptySD3LatentImage", width=64, height=64, batch_size=1),
            "3": node("VAEDecode", samples=["2", 0], vae=vae),
            "4": node("DisTorchTestSaveImageTensor", images=["3", 0], filename="never_written")}


@pytest.mark.parametrize(
    "prompt, message",
    [
        (sampling_prompt(node("UNETLoaderDisTorch2MultiGPU", unet_name=SD3, weight_dtype="default",
                              compute_device="cpu", virtual_vram_gb=4.0, donor_device="cpu",
                              expert_mode_allocations="cpu,1.5t", eject_models=True), "sd3", "bad_expert"),
         "expert_mode_allocations: unknown unit 't'"),
        (vae_graph(node("VAELoaderMultiGPU", vae_name=TAESD3, device="cuda:3"), ["1", 0]), "'cuda:3'"),
        (vae_graph(node("CheckpointLoaderAdvancedMultiGPU", ckpt_name=CHECKPOINT, unet_device="cpu",
                        clip_device="cuda:2", vae_device="cpu"), ["1", 2]),
         "clip_compute_device 'cuda:2' is not available"),
    ],
    ids=["expert", "device", "checkpoint-device"],
)
def test_bad_values_in_old_nodes_are_clear_node_errors(server, prompt, message):
    result = server.run(prompt)
    assert not result.ok
    assert message in json.dumps(result.body)
    assert "Traceback" not in json.dumps(result.body.get("node_errors", {}))


# -- the converter behind the canvas menu action ------------------------------------------------------------------

def convert(server, workflow) -> dict:
    status, body = server.post("/distorch/convert", {"workflow": workflow})
    assert status == 200, body
    return body


def test_converted_api_workflow_runs_and_equals_the_original(server, core_image):
    original = multigpu_files(ONE_BLOCK)
    answer = convert(server, original)
    converted = answer["workflow"]
    assert [converted[k]["class_type"] for k in ("1", "2", "3")] == ["DisTorchUNetLoader", "DisTorchCLIPLoader",
                                                                     "DisTorchVAELoader"]
    assert len(answer["changes"]) == 3 and not answer["skipped"]
    # The original gives core's image (test_sd3_graph_in_multigpu_nodes_gives_cores_image).
    assert torch.equal(sd3_image(server, converted, *SEPARATE, "mg_api_converted"), core_image)


@pytest.mark.parametrize("name, loaders, refs", [
    ("multigpu", multigpu_files(ONE_BLOCK), SEPARATE),
    ("core", CORE_FILES, SEPARATE),
    ("checkpoint", {"1": node("CheckpointLoaderAdvancedDisTorch2MultiGPU", ckpt_name=CHECKPOINT,
                              unet_compute_device="cpu", unet_virtual_vram_gb=ONE_BLOCK, unet_donor_device="cpu",
                              clip_compute_device="cpu", clip_virtual_vram_gb=0.1, clip_donor_device="cpu",
                              vae_device="cpu")}, FROM_CHECKPOINT),
], ids=lambda v: v if isinstance(v, str) else "")
def test_converted_ui_workflow_keeps_the_graph_and_runs_like_the_original(server, core_image, core_checkpoint_image,
                                                                          name, loaders, refs):
    """The originals give core's images (the tests above), so the converted ones are compared with those."""
    info = server.get("/object_info")
    original = ui_workflow_from(sd3_prompt(loaders, *refs), info)
    converted = convert(server, original)["workflow"]
    assert not [n["type"] for n in converted["nodes"] if n["type"].endswith(MULTIGPU_OR_GGUF)]
    assert not [n["type"] for n in converted["nodes"] if n["type"] in ("UNETLoader", "CLIPLoader", "VAELoader")]
    assert len(converted["nodes"]) == len(original["nodes"]) and converted["links"] == original["links"]
    assert [(n["id"], n["pos"]) for n in converted["nodes"]] == [(n["id"], n["pos"]) for n in original["nodes"]]
    assert validate_ui_against_object_info(converted, info) == len(original["nodes"])
    expected = core_checkpoint_image if refs == FROM_CHECKPOINT else core_image
    assert torch.equal(run_image(server, api_from_ui(converted, info), f"mg_ui_{name}"), expected)


@pytest.mark.parametrize("body", [{"workflow": [1, 2]}, {"nothing": 1}, "text"])
def test_convert_route_refuses_what_is_not_a_workflow(server, body):
    status, answer = server.post("/distorch/convert", body)
    assert status == 400 and "not a ComfyUI workflow" in answer["error"]


def sd3_prompt(loaders: dict, model, clip, vae) -> dict:
    return {**loaders,
            "10": node("CLIPTextEncode", clip=clip, text="a lighthouse on a cliff"),
            "11": node("CLIPTextEncode", clip=clip, text="blurry"),
            "12": node("EmptySD3LatentImage", width=64, height=64, batch_size=1),
            "13": node("KSampler", model=model, positive=["10", 0], negative=["11", 0], latent_image=["12", 0], seed=7,
                       steps=2, cfg=3.0, sampler_name="euler", scheduler="simple", denoise=1.0),
            "14": node("VAEDecode", samples=["13", 0], vae=vae),
            "15": node("DisTorchTestSaveImageTensor", images=["14", 0], filename="placeholder")}


def run_image(server, prompt: dict, name: str) -> torch.Tensor:
    saver = next(k for k, v in prompt.items() if v["class_type"] == "DisTorchTestSaveImageTensor")
    prompt[saver]["inputs"]["filename"] = name
    run_ok(server, prompt)
    return load_file(str(server.base / "output" / f"{name}.safetensors"))["images"]


# -- UI format from and to the live signatures --------------------------------------------------------------------

def _widgets(spec: dict) -> list[tuple[str, bool]]:
    """(name, has a control_after_generate value) of a node's widget inputs, in ComfyUI's order."""
    widgets = []
    for section in ("required", "optional"):
        for name in spec["input_order"].get(section, []):
            kind, options = (spec["input"][section][name] + [{}])[:2]
            if isinstance(kind, list) or kind in ("COMBO", "INT", "FLOAT", "STRING", "BOOLEAN"):
                widgets.append((name, bool(options.get("control_after_generate"))))
    return widgets


def _sockets(spec: dict) -> list[tuple[str, str]]:
    widget_names = {n for n, _ in _widgets(spec)}
    return [(n, spec["input"][s][n][0]) for s in ("required", "optional") for n in spec["input_order"].get(s, [])
            if n not in widget_names]


def ui_workflow_from(prompt: dict, info: dict) -> dict:
    """The UI-format twin of an API prompt, laid out from the live signatures (what the frontend saves)."""
    nodes, links = [], []
    for order, (node_id, entry) in enumerate(prompt.items()):
        spec = info[entry["class_type"]]
        inputs = []
        for slot, (name, kind) in enumerate(_sockets(spec)):
            source = entry["inputs"].get(name)
            link = None
            if isinstance(source, list):
                link = len(links) + 1
                links.append([link, int(source[0]), source[1], int(node_id), slot, kind])
            inputs.append({"name": name, "type": kind, "link": link})
        values = []
        for name, control in _widgets(spec):
            if name in entry["inputs"]:
                values.append(entry["inputs"][name])
                if control:
                    values.append("fixed")
        outputs = [{"name": kind, "type": kind, "links": []} for kind in spec["output"]]
        nodes.append({"id": int(node_id), "type": entry["class_type"], "pos": [300 * order, 40 * order],
                      "size": [300, 120], "flags": {}, "order": order, "mode": 0, "inputs": inputs,
                      "outputs": outputs, "properties": {"Node name for S&R": entry["class_type"]},
                      "widgets_values": values})
    for item in nodes:  # a node's outputs link to nodes listed after it
        for slot, output in enumerate(item["outputs"]):
            output["links"] = [ln[0] for ln in links if ln[1] == item["id"] and ln[2] == slot]
    return {"last_node_id": max(n["id"] for n in nodes), "last_link_id": len(links), "nodes": nodes,
            "links": links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


def validate_ui_against_object_info(workflow: dict, info: dict) -> int:
    """Every node's widget values fit its live signature; returns the number of nodes checked."""
    for item in workflow["nodes"]:
        spec = info[item["type"]]
        widgets = _widgets(spec)
        optional = set(spec["input_order"].get("optional", []))
        needed = sum(1 + control for name, control in widgets if name not in optional)
        assert needed <= len(item["widgets_values"]) <= sum(1 + c for _, c in widgets), item["type"]
        assert [i["type"] for i in item["inputs"]] == [k for _, k in _sockets(spec)][:len(item["inputs"])]
    validate_against_object_info(api_from_ui(workflow, info), info)
    return len(workflow["nodes"])


def api_from_ui(workflow: dict, info: dict) -> dict:
    links = {ln[0]: ln for ln in workflow["links"]}
    prompt = {}
    for item in workflow["nodes"]:
        values, inputs = iter(item["widgets_values"]), {}
        for name, control in _widgets(info[item["type"]]):
            value = next(values, None)
            if value is None:
                break
            inputs[name] = value
            if control:
                next(values, None)
        for socket in item["inputs"]:
            if socket["link"] is not None:
                ln = links[socket["link"]]
                inputs[socket["name"]] = [str(ln[1]), ln[2]]
        prompt[str(item["id"])] = node(item["type"], **inputs)
    return prompt


# -- an installed pack is never shadowed --------------------------------------------------------------------------

def stub_pack(node_id: str, category: str) -> str:
    """A pack registering one loader id, standing in for the real pack (test-only, written here)."""
    return f'''
class Stub:
    CATEGORY = "{category}"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {{"required": {{"unet_name": (["stub.safetensors"],)}}}}


NODE_CLASS_MAPPINGS = {{"{node_id}": Stub}}
'''


@pytest.fixture(scope="module")
def server_with_packs(tmp_path_factory):
    """The newest ComfyUI, also loading a "ComfyUI-GGUF" folder and a MultiGPU fork under another folder name.

    Pack detection reads folders and pyproject files the same way on every version, so one install
    (without the tiny models) is enough for this extra server.
    """
    from comfyui_harness import TEST_NODES, install_pack_copy, installs

    found = installs()
    if not found:
        pytest.skip("no ComfyUI install: run scripts/setup_comfyui.sh, or set COMFYUI_PATH (and COMFYUI_PYTHON)")
    comfy_install = found[-1]
    base = tmp_path_factory.mktemp(f"packs-{comfy_install.version}")
    custom = base / "custom_nodes"
    install_pack_copy(custom)
    shutil.copytree(TEST_NODES, custom / "distorch_test_nodes")
    gguf = custom / "ComfyUI-GGUF"  # found by its folder name
    gguf.mkdir()
    (gguf / "__init__.py").write_text(stub_pack("UnetLoaderGGUF", "bootleg"))
    fork = custom / "mgpu_fork"  # found by the project name in its pyproject.toml
    fork.mkdir()
    (fork / "pyproject.toml").write_text('[project]\nname = "comfyui-multigpu"\nversion = "0.0.0"\n')
    (fork / "__init__.py").write_text(stub_pack("UNETLoaderDisTorch2MultiGPU", "multigpu/distorch_2"))
    (base / "user").mkdir()
    (base / "frontend").mkdir()
    instance = ComfyServer(base, comfy_install)
    instance.custom_nodes = [PACK_DIR_NAME, "distorch_test_nodes", "ComfyUI-GGUF", "mgpu_fork"]
    instance.start()
    yield instance
    instance.stop()


def test_installed_packs_keep_their_ids(server_with_packs):
    info = server_with_packs.get("/object_info")
    assert info["UNETLoaderDisTorch2MultiGPU"]["category"] == "multigpu/distorch_2"
    assert info["UnetLoaderGGUF"]["category"] == "bootleg"
    assert "CLIPLoaderDisTorch2MultiGPU" not in info, "no MultiGPU id may be registered beside the installed pack"
    assert "CLIPLoaderGGUF" not in info, "no ComfyUI-GGUF id may be registered beside the installed pack"
    assert info["DisTorchCheckpointLoader"]["category"] == "DisTorch"
    log = server_with_packs.log()
    assert "distorch: ComfyUI-MultiGPU is installed" in log and "distorch: ComfyUI-GGUF is installed" in log
