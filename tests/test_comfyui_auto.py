"""Auto placement in a real headless ComfyUI (`--cpu`): a DisTorch UNet in auto mode sampled at two latent sizes in
two queue runs re-places between them (only the blocks whose tier changes move, the report line says why), and
both latents equal core's.

Under `--cpu` core sets no weight budget, so the test node DisTorchTestSimulatedGpu (tests/comfyui/
distorch_test_nodes) puts the model on a simulated GPU: each load gets the budget core's formula gives that card
for the run's own activation estimate. It sets the model's memory_usage_factor so that one latent frame more takes a
few blocks of activations (with the real factor a small latent of the 290 MB test model takes kilobytes).
"""

import re

import pytest
from comfyui_harness import sampling_prompt

from distorch.headers import read_model_sizes
from distorch.units import GIB, MIB

pytestmark = pytest.mark.comfyui

MEDIUM = "medium_wan21.safetensors"
RESERVED = 400 * MIB  # core's EXTRA_RESERVED_VRAM on Linux
FLOOR = int(0.8 * GIB) + RESERVED  # minimum_inference_memory()
LATENT_CELLS = 8 * 8  # a 64x64 Wan latent frame


def run_ok(server, prompt):
    result = server.run(prompt)
    assert result.ok, f"{result.error_text()[:3000]}\n--- server log ---\n{server.log()[-3000:]}"
    return result


def one_step(prompt: dict, frames: int) -> dict:
    """One sampling step, without CFG: the placement is what is tested, and a CPU shared by CI is slow."""
    prompt["3"]["inputs"]["length"] = frames
    prompt["5"]["inputs"].update(steps=1, cfg=1.0)
    return prompt


def auto_prompt(frames: int, prefix: str, vram: float, per_cell: float) -> dict:
    loader = {"class_type": "DisTorchUNetLoader", "inputs": {
        "unet_name": MEDIUM, "weight_dtype": "default", "compute_device": "cpu", "virtual_vram_gb": 0.0,
        "donor_device": "cpu", "expert_mode_allocations": "", "auto_placement": True}}
    prompt = sampling_prompt(loader, "wan", prefix)
    prompt["6"] = {"class_type": "DisTorchTestSimulatedGpu", "inputs": {"model": ["1", 0], "vram_gb": vram,
                                                                        "bytes_per_cell": per_cell}}
    prompt["5"]["inputs"]["model"] = ["6", 0]
    return one_step(prompt, frames)


def core_prompt(frames: int, prefix: str) -> dict:
    prompt = sampling_prompt({"class_type": "UNETLoader", "inputs": {"unet_name": MEDIUM, "weight_dtype": "default"}},
                             "wan", prefix)
    return one_step(prompt, frames)


def test_two_queue_runs_at_two_latent_sizes_re_place_and_match_core(server):
    sizes = read_model_sizes(str(server.base / "models" / "diffusion_models" / MEDIUM))
    assert set(sizes.dtype_bytes) == {"bf16"}
    block, rest = 2 * max(n for _, n in sizes.blocks), 2 * sizes.rest_bytes  # the CPU loads the bf16 file as fp32
    short, long = 57, 61  # 15 and 16 latent frames: one frame of 64 cells more
    per_frame = 3.8 * block  # activations the longer latent adds
    per_cell = per_frame / LATENT_CELLS
    minimum = ((short - 1) // 4 + 1) * per_frame  # core's estimate for the shorter latent, above core's floor
    assert minimum + RESERVED > FLOOR
    # The shorter run leaves room for the other weights, 10.5 blocks and two slots.
    vram = (minimum + RESERVED + rest + 12.5 * block) / GIB
    start = len(server.log())
    first = server.latent(run_ok(server, auto_prompt(short, "auto_short", vram, per_cell)))
    second = server.latent(run_ok(server, auto_prompt(long, "auto_long", vram, per_cell)))
    log = server.log()[start:]
    assert "placement: automatic, fitted to the run's budget" in log
    moves = re.findall(r"distorch: re-placed .*?: (\d+) blocks now streamed, (\d+) resident again", log)
    assert moves and int(moves[-1][0]) >= 3 and moves[-1][1] == "0", log[-3000:]
    assert "distorch: re-placed medium_wan21.safetensors for this run: the current placement needs" in log
    assert "loaded partially" not in log, "core's per-layer lowvram path must not run on the DisTorch model"
    assert torch_equal(first, server.latent(run_ok(server, core_prompt(short, "core_short"))))
    assert torch_equal(second, server.latent(run_ok(server, core_prompt(long, "core_long"))))


def torch_equal(a, b) -> bool:
    import torch

    return a.shape == b.shape and torch.equal(a, b)
