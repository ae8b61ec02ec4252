"""A model whose block list holds a single block streams it inside real ComfyUI, and matches core's loader."""

import pytest
import torch
from comfyui_harness import core_unet, distorch_unet, sampling_prompt

pytestmark = pytest.mark.comfyui

ONE_BLOCK = "tiny_wan21_1block.safetensors"


def run_ok(server, prompt):
    result = server.run(prompt)
    assert result.ok, f"{result.error_text()[:3000]}\n--- server log ---\n{server.log()[-3000:]}"
    return result


def test_a_one_block_wan_streams_its_lone_block_and_matches_core(server):
    core = server.latent(run_ok(server, sampling_prompt(core_unet(ONE_BLOCK), "wan", "core_lone")))
    result = run_ok(server, sampling_prompt(distorch_unet(ONE_BLOCK, 1.0), "wan", "dt_lone"))
    plan = result.body["outputs"]["1"]["distorch_plan"][0]
    assert [(b["name"], b["tier"]) for b in plan["blocks"]] == [("diffusion_model.blocks.0", "pageable_ram")]
    assert "no repeated blocks" not in result.body["outputs"]["1"]["text"][0]
    assert torch.equal(core, server.latent(result))
