"""Two stacked LoRAs on streamed and GGUF UNets in a real headless ComfyUI, against core's own loader (issue #19).

Core's `UNETLoader` merges the LoRAs into its resident weights once; DisTorch runs them as a low-rank side path
beside its streamed and GGUF layers. The latents agree within 1 % (relative, Frobenius): the side path and the
merge are the same arithmetic, rounded differently (distorch/lowrank.py states the per-layer tolerance).
Runs once per ComfyUI install (the session `server` fixture, tests/conftest.py).
"""

import pytest
import torch
from comfyui_harness import core_unet, distorch_unet, sampling_prompt

pytestmark = pytest.mark.comfyui

HALF = 0.0015  # GB: about half of the tiny Wan model's blocks streamed
LORAS = (("tiny_wan21_lora_r32_a.safetensors", 0.8), ("tiny_wan21_lora_r32_b.safetensors", -0.5))
CORE_REFERENCE = {"tiny_wan21.safetensors": "tiny_wan21.safetensors",
                  "tiny_wan21_Q8_0.gguf": "tiny_wan21_Q8_0_dequant.safetensors"}


def run_ok(server, prompt):
    result = server.run(prompt)
    assert result.ok, f"{result.error_text()[:3000]}\n--- server log ---\n{server.log()[-3000:]}"
    return result


def with_loras(prompt: dict, loras=LORAS) -> dict:
    """`prompt` (tests/comfyui_harness.py sampling_prompt) with LoraLoaderModelOnly nodes chained before the sampler."""
    model = ["1", 0]
    for index, (name, strength) in enumerate(loras):
        node = f"lora{index}"
        prompt[node] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": model, "lora_name": name,
                                                                         "strength_model": strength}}
        model = [node, 0]
    prompt["5"]["inputs"]["model"] = model
    return prompt


def relative_difference(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.double() - reference.double()).norm() / reference.double().norm()).item()


@pytest.mark.parametrize("file, virtual_vram_gb", [("tiny_wan21.safetensors", HALF), ("tiny_wan21_Q8_0.gguf", 0.0),
                                                   ("tiny_wan21_Q8_0.gguf", HALF)],
                         ids=["streamed", "gguf-resident", "gguf-streamed"])
def test_two_stacked_loras_match_cores_loader_within_one_percent(server, file, virtual_vram_gb):
    reference = CORE_REFERENCE[file]
    core = server.latent(run_ok(server, with_loras(sampling_prompt(core_unet(reference), "wan", "core_l2"))))
    core_plain = server.latent(run_ok(server, sampling_prompt(core_unet(reference), "wan", "core_p2")))
    ours = server.latent(run_ok(server, with_loras(sampling_prompt(distorch_unet(file, virtual_vram_gb), "wan",
                                                                   "dt_l2"))))
    assert relative_difference(core, core_plain) > 0.05, "the LoRAs must change the latent"
    assert relative_difference(ours, core) <= 0.01
