"""An fp8-scaled diffusion model (the format Comfy-Org ships: float8_e4m3fn weights, a `scale_weight` per layer,
the `scaled_fp8` marker) in the DisTorch UNet loader, with and without a LoRA, against core's `UNETLoader`.

ComfyUI 0.3.64 builds such layers as plain fp8 weights (its scaled-fp8 operations): DisTorch streams their blocks.
ComfyUI 0.8 and later hold them as `QuantizedTensor`s, tensor subclasses without storage of their own that nothing
can view or copy as bytes: DisTorch leaves those blocks to ComfyUI and says so in the plan (it crashed on them
before: "Attempted to access the data pointer on an invalid python storage"). Either way the latent is
core's, bit for bit. Runs once per ComfyUI install (the session `server` fixture, tests/conftest.py).
"""

from pathlib import Path

import pytest
import torch
from comfyui_harness import core_unet, distorch_unet, sampling_prompt
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.comfyui

FILE = "tiny_wan21_fp8_scaled.safetensors"
ALL = 1.0  # GB: every block of the tiny Wan asked to stream


def run_ok(server, prompt):
    result = server.run(prompt)
    assert result.ok, f"{result.error_text()[:3000]}\n--- server log ---\n{server.log()[-3000:]}"
    return result


def write_fp8_scaled(source: Path, target: Path, converted) -> None:
    """`source` with each matrix `converted(name)` selects as float8 and a per-tensor `scale_weight`, plus the
    `scaled_fp8` marker: the layout Comfy-Org's fp8_scaled files have."""
    tensors = {}
    for name, tensor in load_file(str(source)).items():
        if converted(name) and name.endswith(".weight") and tensor.ndim == 2:
            scale = tensor.float().abs().max() / 448.0
            tensors[name] = (tensor.float() / scale).to(torch.float8_e4m3fn)
            tensors[name.removesuffix("weight") + "scale_weight"] = scale.reshape(())
        else:
            tensors[name] = tensor
    tensors["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(tensors, str(target))


@pytest.fixture(scope="module")
def fp8_scaled(server) -> str:
    """The tiny Wan's block matrices as fp8 with a per-tensor scale, written as Comfy-Org's fp8_scaled files are."""
    folder = server.base / "models" / "diffusion_models"
    write_fp8_scaled(folder / "tiny_wan21.safetensors", folder / FILE, lambda name: name.startswith("blocks."))
    return FILE


@pytest.mark.parametrize("lora", [None, 0.8], ids=["plain", "lora"])
def test_an_fp8_scaled_model_gives_cores_latent(server, fp8_scaled, lora):
    core = server.latent(run_ok(server, sampling_prompt(core_unet(fp8_scaled), "wan", f"fp8s_core_{lora}",
                                                        lora=lora)))
    result = run_ok(server, sampling_prompt(distorch_unet(fp8_scaled, ALL), "wan", f"fp8s_ours_{lora}", lora=lora))
    assert torch.equal(server.latent(result), core)
    plan = result.body["outputs"]["1"]["distorch_plan"][0]
    left = [w for w in plan["warnings"] if "blocks are left to ComfyUI" in w]
    streamed = [b for b in plan["blocks"] if b["tier"] != "resident"]
    if left:  # QuantizedTensor layers (0.8+): the blocks are ComfyUI's
        assert left[0].startswith("4 blocks of") and not plan["blocks"], plan["warnings"]
    else:
        assert len(streamed) == 4, plan["blocks"]
    quantized_tensors = tuple(int(p) for p in server.install.version.split(".")[:2]) >= (0, 8)
    assert bool(left) == quantized_tensors, (server.install.version, plan["warnings"])


def test_an_fp8_scaled_text_encoder_encodes_as_cores(server):
    """The example Wan workflows load `umt5_xxl_fp8_e4m3fn_scaled` into the DisTorch CLIP loader: an fp8-scaled
    text encoder (here CLIP-L's layers) encodes as core's `CLIPLoader` does on every core."""
    folder = server.base / "models" / "text_encoders"
    write_fp8_scaled(folder / "random_clip_l.safetensors", folder / "clip_l_fp8_scaled.safetensors",
                     lambda name: ".layers." in name)

    def encode(loader: dict, name: str) -> dict:
        run_ok(server, {"1": loader,
                        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 0], "text": "a red fox"}},
                        "9": {"class_type": "DisTorchTestSaveConditioning",
                              "inputs": {"conditioning": ["2", 0], "filename": name}}})
        return load_file(str(server.base / "output" / f"{name}.safetensors"))

    core = encode({"class_type": "CLIPLoader", "inputs": {"clip_name": "clip_l_fp8_scaled.safetensors",
                                                          "type": "stable_diffusion"}}, "fp8s_clip_core")
    ours = encode({"class_type": "DisTorchCLIPLoader", "inputs": {
        "clip_name": "clip_l_fp8_scaled.safetensors", "type": "stable_diffusion", "compute_device": "cpu",
        "virtual_vram_gb": 0.1, "donor_device": "cpu", "expert_mode_allocations": ""}}, "fp8s_clip_ours")
    assert set(core) == set(ours) and all(torch.equal(core[k], ours[k]) for k in core)
