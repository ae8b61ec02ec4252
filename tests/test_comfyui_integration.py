"""The node pack inside a real headless ComfyUI (CPU), compared with ComfyUI's own loaders.

Runs once per ComfyUI install (tests/comfyui_harness.py `installs`: COMFYUI_PATH, or the versions
scripts/setup_comfyui.sh built); skipped when there is none. The `server` fixture is in conftest.py.
"""

import json
import re
import subprocess

import pytest
import torch
from comfyui_harness import REPO, core_unet, distorch_unet, sampling_prompt
from distorch_pack.nodes.catalog import FILE_INPUTS, NODE_TITLES, widget_inputs
from safetensors.torch import load_file

from scripts.snapshot_core_nodes import compatibility_problems, signature, version_key

pytestmark = pytest.mark.comfyui

NODES = {node_id: NODE_TITLES[node_id] for node_id in FILE_INPUTS}  # the single-model loaders
HALF = 0.0015  # GB: about half of the tiny Wan model's blocks
WAN = "tiny_wan21.safetensors"


def run_ok(server, prompt):
    result = server.run(prompt)
    assert result.ok, f"{result.error_text()[:3000]}\n--- server log ---\n{server.log()[-3000:]}"
    return result


def test_nodes_are_registered_with_the_distorch_inputs(server):
    info = server.get("/object_info")
    for node_id, title in NODES.items():
        node = info[node_id]
        assert node["display_name"] == title and node["category"] == "DisTorch"
        required, optional = node["input"]["required"], node["input"].get("optional", {})
        assert ["compute_device", "virtual_vram_gb", "donor_device"] == [
            k for k in required if k in ("compute_device", "virtual_vram_gb", "donor_device")]
        assert "expert_mode_allocations" in optional
        vram = required["virtual_vram_gb"][1]
        assert (vram["min"], vram["max"], vram["step"]) == (0.0, 128.0, 0.1)
        assert vram["default"] == (4.0 if node_id == "DisTorchUNetLoader" else 0.0)
        assert all(spec[1].get("tooltip") for spec in list(required.values()) + list(optional.values()))
    assert WAN in info["DisTorchUNetLoader"]["input"]["required"]["unet_name"][1]["options"]
    assert "tiny_wan21_Q8_0.gguf" in info["DisTorchUNetLoader"]["input"]["required"]["unet_name"][1]["options"]
    assert "tiny_wan21_Q8_0.gguf" not in json.dumps(info["UNETLoader"]), "core's extension set must stay untouched"


@pytest.mark.parametrize("family, file", [("wan", WAN), ("sd3", "tiny_sd3.safetensors")])
@pytest.mark.parametrize("virtual_vram_gb", [0.0, HALF, 1.0])
def test_latents_equal_core_loader(server, family, file, virtual_vram_gb):
    core = server.latent(run_ok(server, sampling_prompt(core_unet(file), family, f"core_{family}")))
    result = run_ok(server, sampling_prompt(distorch_unet(file, virtual_vram_gb), family, f"dt_{family}"))
    assert torch.equal(core, server.latent(result))
    plan_text = result.body["outputs"]["1"]["text"][0]
    assert "DisTorch plan for" in plan_text and ("streamed" in plan_text) == (virtual_vram_gb > 0)


def test_gguf_bf16_copy_matches_core(server):
    core = server.latent(run_ok(server, sampling_prompt(core_unet(WAN), "wan", "core_bf16")))
    ours = server.latent(run_ok(server, sampling_prompt(distorch_unet("tiny_wan21_BF16.gguf", HALF), "wan", "g16")))
    torch.testing.assert_close(ours, core, rtol=1e-4, atol=1e-5)


def test_gguf_q8_0_matches_core_on_the_dequantized_weights(server):
    reference = core_unet("tiny_wan21_Q8_0_dequant.safetensors")
    core = server.latent(run_ok(server, sampling_prompt(reference, "wan", "cq8")))
    ours = server.latent(run_ok(server, sampling_prompt(distorch_unet("tiny_wan21_Q8_0.gguf", HALF), "wan", "gq8")))
    torch.testing.assert_close(ours, core, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("virtual_vram_gb", [0.0, HALF], ids=["resident", "streamed"])
@pytest.mark.parametrize("file", [WAN, "tiny_wan21_Q8_0.gguf"])
def test_lora_matches_core_and_removing_it_restores_the_weights(server, file, virtual_vram_gb):
    reference = WAN if file == WAN else "tiny_wan21_Q8_0_dequant.safetensors"
    core_lora = server.latent(run_ok(server, sampling_prompt(core_unet(reference), "wan", "cl", lora=0.8)))
    loader = distorch_unet(file, virtual_vram_gb)
    plain = server.latent(run_ok(server, sampling_prompt(loader, "wan", "dp")))
    with_lora = server.latent(run_ok(server, sampling_prompt(loader, "wan", "dl", lora=0.8)))
    again = server.latent(run_ok(server, sampling_prompt(loader, "wan", "da")))
    assert not torch.allclose(plain, with_lora, atol=1e-3), "the LoRA must change the output"
    torch.testing.assert_close(with_lora, core_lora, rtol=1e-3, atol=1e-4)
    assert torch.equal(plain, again), "removing the LoRA must restore the original weights exactly"


def test_model_is_placed_once_across_queue_runs(server):
    loader = distorch_unet(WAN, 0.0011)  # a loader input no other test uses: a fresh model
    before = server.log().count("distorch: loaded ")
    first = server.latent(run_ok(server, sampling_prompt(loader, "wan", "once", seed=1)))
    second = server.latent(run_ok(server, sampling_prompt(loader, "wan", "once", seed=2)))
    assert server.log().count("distorch: loaded ") == before + 1, "a new seed must not reload or re-place the model"
    assert not torch.equal(first, second)


@pytest.mark.parametrize(
    "loader, message",
    [
        (distorch_unet(WAN, 1.0, expert="cuda:0,1.5t;cpu,*"), "unknown unit 't'"),
        (distorch_unet(WAN, 1.0, donor="cuda:3"), "donor_device 'cuda:3' is not available"),
        (distorch_unet(WAN, 500.0), "virtual_vram_gb must be between 0 and 128"),
        (distorch_unet("nope.safetensors", 1.0), "nope.safetensors"),
        ({**distorch_unet(WAN, 1.0), "inputs": {**distorch_unet(WAN, 1.0)["inputs"], "weight_dtype": "fp4"}}, "'fp4'"),
    ],
)
def test_bad_inputs_are_clear_node_errors_and_the_server_keeps_running(server, loader, message):
    result = server.run(sampling_prompt(loader, "wan", "bad"))
    assert not result.ok
    assert message in json.dumps(result.body)
    assert "Traceback" not in json.dumps(result.body.get("node_errors", {}))
    run_ok(server, sampling_prompt(distorch_unet(WAN, HALF), "wan", "after_error"))


def test_comfyui_accounting_stays_true(server):
    result = subprocess.run([server.python, str(REPO / "tests" / "comfyui" / "accounting_probe.py"), "--comfyui",
                             str(server.comfyui), "--models", str(server.base / "models"), "--virtual-vram-gb",
                             str(HALF)], capture_output=True, text=True, timeout=600)
    match = re.search(r"^RESULT (.*)$", result.stdout, re.MULTILINE)
    assert match, f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    report = json.loads(match.group(1))
    assert report["streamed_blocks"] >= 1
    assert report["loaded"] == report["expected_loaded"] == report["state_resident_layers"]
    assert report["open_after_load"] and report["equal_after_load"]
    assert report["same_streamer_after_second_load"]
    # Core asks for a byte back: one more block is streamed (never a layer cast by core), and the count follows.
    assert report["partially_unloaded"] > 0 and report["streamed_after_partial_unload"] == report["streamed_blocks"] + 1
    assert report["loaded_after_partial_unload"] == report["loaded"] - report["partially_unloaded"]
    assert report["equal_after_partial_unload"]
    assert report["loaded_after_unload"] == 0 and not report["open_after_unload"] and report["staged_after_unload"]
    # Reloaded without a limit: one block to gain back is within the hysteresis, so the placement stays as it is.
    assert report["streamed_after_reload"] == report["streamed_after_partial_unload"]
    assert report["loaded_after_reload"] == report["expected_after_reload"] == report["loaded_after_partial_unload"]
    assert report["open_after_reload"] and report["equal_after_reload"]


def test_recorded_core_signatures_and_catalog_match_the_live_server(server):
    """The core nodes the example workflows use still take them on this ComfyUI (newer cores may add to a
    node, e.g. 0.33 gave SaveAnimatedWEBP an output; see compatibility_problems), and the DisTorch nodes'
    widgets are the catalog's."""
    info = server.get("/object_info")
    core = json.loads((REPO / "tests" / "data" / "core_nodes.json").read_text())
    newer = {name for name, recorded in core.items() if version_key(recorded.get("since", "0")) >
             version_key(server.install.version)}
    assert not {name for name in newer if name in info}, "a node recorded as newer than this ComfyUI is here"
    problems = {name: compatibility_problems(recorded, signature(info[name])) for name, recorded in core.items()
                if name not in newer}
    assert not {name: p for name, p in problems.items() if p}
    for node_id in NODES:
        live = info[node_id]["input_order"]
        assert tuple(live["required"] + live.get("optional", [])) == widget_inputs(node_id)


@pytest.mark.parametrize("workflow", sorted((REPO / "workflows").glob("*_api.json")), ids=lambda p: p.stem)
def test_api_workflows_validate_except_for_the_absent_model_files(server, workflow):
    """The server accepts each example graph; the only complaints are the big model files (and the input image) not
    being installed and, on a machine without CUDA, the GPU the examples compute on. A ComfyUI older than the
    workflow's declared minimum must really lack one of its core nodes (or have an incompatible one): otherwise the
    declared minimum is too high."""
    prompt = json.loads(workflow.read_text())
    minimum = json.loads(workflow.with_name(workflow.name.replace("_api.json", ".json")).read_text())[
        "extra"]["distorch"]["min_comfyui"]
    if version_key(server.install.version) < version_key(minimum):
        info = server.get("/object_info")
        core = json.loads((REPO / "tests" / "data" / "core_nodes.json").read_text())
        used = {n["class_type"] for n in prompt.values() if n["class_type"] not in NODE_TITLES}
        lacking = {name for name in used if name not in info or
                   compatibility_problems(core[name], signature(info[name]))}
        assert lacking, f"ComfyUI {server.install.version} has every core node of {workflow.stem[:-4]}, which " \
                        f"declares ComfyUI {minimum} as its minimum"
        return
    status, body = server.post("/prompt", {"prompt": prompt})
    if status == 200:  # 0.3.64 does not validate V3 combo values; nothing runs without the files anyway
        server.post("/interrupt", {})
        server.post("/queue", {"clear": True})
        return
    errors = [e for node in body.get("node_errors", {}).values() for e in node["errors"]]
    assert errors, body
    for error in errors:
        if error["type"] == "custom_validation_failed":
            assert "'cuda:0' is not available on this machine" in error["details"] or \
                error["details"].endswith("Invalid image file: example.png"), error
            continue
        assert error["type"] == "value_not_in_list", error
        assert error["extra_info"]["input_name"] in ("unet_name", "vae_name", "ckpt_name") or \
            error["extra_info"]["input_name"].startswith("clip_name"), error


def vae_prompt(loader: dict, prefix: str) -> dict:
    """A fixed SD latent → VAEDecode → the decoded pixels saved as a tensor (output/<prefix>.safetensors)."""
    return {
        "1": loader,
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "LatentAdd", "inputs": {"samples1": ["2", 0], "samples2": ["2", 0]}},
        "4": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 0]}},
        "9": {"class_type": "DisTorchTestSaveImageTensor", "inputs": {"images": ["4", 0], "filename": prefix}},
    }


@pytest.mark.parametrize("virtual_vram_gb", [0.0, 0.001], ids=["resident", "streamed"])
def test_vae_loader_decodes_like_core(server, virtual_vram_gb):
    run_ok(server, vae_prompt({"class_type": "VAELoader", "inputs": {"vae_name": "tiny_taesd.safetensors"}},
                              "vae_core"))
    ours = run_ok(server, vae_prompt({"class_type": "DisTorchVAELoader", "inputs": {
        "vae_name": "tiny_taesd.safetensors", "compute_device": "cpu", "virtual_vram_gb": virtual_vram_gb,
        "donor_device": "cpu", "expert_mode_allocations": ""}}, f"vae_dt_{virtual_vram_gb}"))
    decoded = [load_file(str(server.base / "output" / f"{name}.safetensors"))["images"]
               for name in ("vae_core", f"vae_dt_{virtual_vram_gb}")]
    assert decoded[0].shape == (1, 64, 64, 3)
    assert torch.equal(decoded[0], decoded[1])
    assert ("streamed" in ours.body["outputs"]["1"]["text"][0]) == (virtual_vram_gb > 0)


def clip_prompt(loader: dict, prefix: str) -> dict:
    """Text encoder → CLIPTextEncode → the conditioning saved as tensors (output/<prefix>.safetensors)."""
    return {
        "1": loader,
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 0], "text": "a photo of a red fox in the snow"}},
        "9": {"class_type": "DisTorchTestSaveConditioning", "inputs": {"conditioning": ["2", 0], "filename": prefix}},
    }


@pytest.mark.parametrize("file, virtual_vram_gb", [("random_clip_l.safetensors", 0.0),
                                                   ("random_clip_l.safetensors", 0.1), ("random_clip_l_F16.gguf", 0.1)])
def test_clip_loader_encodes_like_core(server, file, virtual_vram_gb):
    run_ok(server, clip_prompt({"class_type": "CLIPLoader", "inputs": {
        "clip_name": "random_clip_l.safetensors", "type": "stable_diffusion"}}, "clip_core"))
    name = f"clip_dt_{file}_{virtual_vram_gb}"
    result = run_ok(server, clip_prompt({"class_type": "DisTorchCLIPLoader", "inputs": {
        "clip_name": file, "type": "stable_diffusion", "compute_device": "cpu", "virtual_vram_gb": virtual_vram_gb,
        "donor_device": "cpu", "expert_mode_allocations": ""}}, name))
    core, ours = (load_file(str(server.base / "output" / f"{n}.safetensors")) for n in ("clip_core", name))
    assert core["context"].shape == (1, 77, 768) and set(core) == set(ours)
    for key in core:
        assert torch.equal(core[key], ours[key]), key
    plan = result.body["outputs"]["1"]["text"][0]
    assert ("streamed" in plan) == (virtual_vram_gb > 0)
