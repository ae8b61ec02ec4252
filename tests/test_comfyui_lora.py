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


def test_torch_compile_of_a_streamed_model_with_loras_matches_eager_and_settles(server):
    """ComfyUI's own TorchCompileModel (inductor, on the CPU) over a UNet with half its blocks streamed and two
    LoRAs on the side path: the latent equals the eager run's to float32 rounding, and a second queue run with
    another seed captures no new graph (nothing of ours changes identity between steps or runs). Cores without
    the node skip."""
    if "TorchCompileModel" not in server.get("/object_info"):
        pytest.skip(f"ComfyUI {server.install.version} has no TorchCompileModel node")

    def compiled(seed: int, prefix: str) -> dict:
        prompt = with_loras(sampling_prompt(distorch_unet("tiny_wan21.safetensors", HALF), "wan", prefix, seed))
        prompt["7"] = {"class_type": "TorchCompileModel", "inputs": {"model": prompt["5"]["inputs"]["model"],
                                                                     "backend": "inductor"}}
        prompt["5"]["inputs"]["model"] = ["7", 0]
        prompt["8"] = {"class_type": "DisTorchTestDynamoGraphs", "inputs": {"samples": ["5", 0]}}
        return prompt

    first = run_ok(server, compiled(5, "compiled_a"))
    second = run_ok(server, compiled(6, "compiled_b"))
    graphs = [r.body["outputs"]["8"]["graphs"][0] for r in (first, second)]
    assert graphs[0] > 0 and graphs[1] == graphs[0], graphs
    eager = server.latent(run_ok(server, with_loras(sampling_prompt(distorch_unet("tiny_wan21.safetensors", HALF),
                                                                    "wan", "eager_b", 6))))
    assert relative_difference(server.latent(second), eager) <= 1e-4
