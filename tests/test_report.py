"""The plan as people and the UI see it: net totals, the weight format counted, and the JSON the node sends."""

import json

import pytest
import torch
from safetensors.torch import save_file

import distorch
from distorch import ModelSizes, Tier, plan_sizes
from distorch.headers import read_model_sizes
from distorch.report import PLAN_DICT_VERSION, TIER_ORDER, plan_to_dict, plan_totals
from distorch.toy import make_toy_dit
from distorch.units import GIB, MIB

DOUBLE, SINGLE = 640 * MIB, 320 * MIB
ROOMY = {"cuda:0": 80 * GIB, "cuda:1": 80 * GIB, "cpu": 256 * GIB}


def flux_2_2() -> ModelSizes:
    blocks = (("double_blocks.0", DOUBLE), ("double_blocks.1", DOUBLE), ("single_blocks.0", SINGLE),
              ("single_blocks.1", SINGLE))
    return ModelSizes("Flux", blocks, 400 * MIB, dtype_bytes={"bf16": 2 * DOUBLE + 2 * SINGLE + 400 * MIB},
                      dtype_source="file")


def test_vram_freed_is_net_of_the_streaming_slots():
    """The issue's case: one 0.63 GB block streamed through two slots of its size grows the footprint."""
    result = plan_sizes(flux_2_2(), compute_device="cuda:0", virtual_vram_gb=0.6, memory=ROOMY)
    assert [b.name for b in result.blocks if b.streamed] == ["double_blocks.1"]
    totals = plan_totals(result)
    assert totals.moved_off_bytes == DOUBLE and totals.slots_bytes == 2 * DOUBLE
    assert totals.vram_freed_bytes == -DOUBLE
    assert totals.compute_bytes == totals.model_bytes + DOUBLE
    text = result.report()
    assert "VRAM freed: -0.62 GB (0.62 GB moved off - 1.25 GB streaming slots)" in text
    assert "streaming frees no VRAM here" in text


def test_totals_add_up_for_every_tier():
    memory = {"cuda:0": 80 * GIB, "cuda:1": 4 * GIB, "cpu": 256 * GIB, "pinned": 3 * GIB}
    sizes = ModelSizes("WanModel", tuple((f"blocks.{i}", 700 * MIB) for i in range(40)), 600 * MIB)
    result = plan_sizes(sizes, compute_device="cuda:0", virtual_vram_gb=14, donor_device="cuda:1", memory=memory)
    tiers = {b.tier for b in result.blocks}
    assert {Tier.RESIDENT, Tier.DONOR, Tier.PINNED, Tier.PAGEABLE} <= tiers
    totals = plan_totals(result)
    by_tier = {t: sum(b.nbytes for b in result.blocks if b.tier is t) for t in Tier}
    assert totals.donor_bytes == by_tier[Tier.DONOR] > 0
    assert totals.pinned_bytes == by_tier[Tier.PINNED] > 0 and totals.pageable_bytes == by_tier[Tier.PAGEABLE] > 0
    assert totals.ram_bytes == totals.pinned_bytes + totals.pageable_bytes
    assert totals.moved_off_bytes == totals.ram_bytes + totals.donor_bytes + totals.disk_bytes
    assert totals.vram_freed_bytes == totals.moved_off_bytes - 2 * 700 * MIB
    assert totals.model_bytes == 40 * 700 * MIB + 600 * MIB
    assert totals.per_pass_bytes == totals.moved_off_bytes


def test_cpu_compute_frees_no_vram_and_says_nothing_about_it():
    result = plan_sizes(flux_2_2(), compute_device="cpu", virtual_vram_gb=1.0, memory=ROOMY)
    assert plan_totals(result).vram_freed_bytes == 0
    assert "VRAM freed" not in result.report() and "streaming frees no VRAM" not in result.report()


def test_plan_dict_is_plain_json_with_blocks_in_order_and_their_tiers():
    result = plan_sizes(flux_2_2(), compute_device="cuda:0", virtual_vram_gb=1.5, memory=ROOMY)
    data = plan_to_dict(result, label="flux1-dev.safetensors")
    assert json.loads(json.dumps(data)) == data
    assert data["version"] == PLAN_DICT_VERSION and data["label"] == "flux1-dev.safetensors"
    assert [b["name"] for b in data["blocks"]] == [b.name for b in result.blocks]
    assert [b["tier"] for b in data["blocks"]] == [b.tier.value for b in result.blocks]
    assert {b["tier"] for b in data["blocks"]} <= set(TIER_ORDER) == {t.value for t in Tier}
    assert data["totals"]["vram_freed_bytes"] == plan_totals(result).vram_freed_bytes
    assert data["dtype"] == {"source": "file", "bytes": {"bf16": 2 * DOUBLE + 2 * SINGLE + 400 * MIB},
                             "note": "sizes in the file's format (bf16); a loader that builds another dtype "
                                     "changes them"}
    assert sum(t["blocks"] for t in data["tiers"]) == len(data["blocks"])


@pytest.mark.parametrize("built", [torch.float32, torch.float8_e4m3fn])
def test_file_plan_and_loaded_plan_say_which_format_they_count(tmp_path, built):
    """The CLI plans a bf16 file; the node plans what the loader built from it (fp32 or fp8): sizes differ,
    and each report says which format it counted."""
    model = make_toy_dit(dim=32, depth=4, heads=2, dtype=torch.bfloat16)
    path = tmp_path / "dit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    file_plan = plan_sizes(read_model_sizes(str(path)), compute_device="cpu", memory=ROOMY)
    loaded = model.to(built)
    loaded_plan = distorch.plan(loaded, compute_device="cpu", memory=ROOMY)
    assert "sizes in the file's format (bf16)" in file_plan.report()
    label = {torch.float32: "fp32", torch.float8_e4m3fn: "fp8_e4m3fn"}[built]
    assert f"sizes as loaded ({label}" in loaded_plan.report()
    ratio = loaded_plan.blocks[0].nbytes / file_plan.blocks[0].nbytes
    assert ratio == {torch.float32: 2.0, torch.float8_e4m3fn: 0.5}[built]


def test_gguf_quantized_weights_are_named_by_their_type():
    from gguf_loader.quantize import quantize_q8_0

    model = make_toy_dit(dim=32, depth=2, heads=2)
    layer = model.blocks[0].fc1
    layer.weight = torch.nn.Parameter(quantize_q8_0(layer.weight.data), requires_grad=False)
    result = distorch.plan(model, compute_device="cpu", memory=ROOMY)
    assert "Q8_0" in result.dtype_bytes and "fp32" in result.dtype_bytes
