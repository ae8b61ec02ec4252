"""The planner: budgets, interleaving, tiers, capacity checks and the report."""

import pytest
import torch
from torch import nn

import distorch
from distorch import ModelSizes, PlanError, plan, plan_sizes
from distorch.memory import DeviceMemory, MemoryInventory
from distorch.planner import choose_streamed
from distorch.toy import make_toy_dit
from distorch.units import GIB, MIB

BLOCK = 700 * MIB  # a Wan-14B-sized block in bf16


def wan_like(blocks: int = 40, rest: int = 600 * MIB) -> ModelSizes:
    return ModelSizes("WanModel", tuple((f"blocks.{i}", BLOCK) for i in range(blocks)), rest)


ROOMY = {"cuda:0": 80 * GIB, "cuda:1": 80 * GIB, "cpu": 256 * GIB}


def test_no_virtual_vram_keeps_everything_resident():
    result = plan_sizes(wan_like(), compute_device="cuda:0", memory=ROOMY)
    assert result.streamed == frozenset()
    assert set(result.placement.values()) == {"cuda:0"}
    assert result.compute_bytes == result.resident_bytes == 40 * BLOCK + 600 * MIB


@pytest.mark.parametrize("gb", [0.1, 1.0, 6.5, 13.6, 20.0, 27.3])
def test_budget_honoured_within_one_block(gb):
    result = plan_sizes(wan_like(), compute_device="cuda:0", virtual_vram_gb=gb, memory=ROOMY)
    target = int(gb * GIB)
    assert target <= result.streamed_bytes < target + BLOCK
    assert all(result.placement[name] == "cpu" for name in result.streamed)


def test_streamed_blocks_are_interleaved_not_a_tail():
    result = plan_sizes(wan_like(40), compute_device="cuda:0", virtual_vram_gb=20 * BLOCK / GIB, memory=ROOMY)
    indices = sorted(int(name.split(".")[1]) for name in result.streamed)
    assert len(indices) == 20
    gaps = {b - a for a, b in zip(indices, indices[1:])}
    assert gaps == {2}, indices


def test_interleaving_spreads_a_quarter_evenly():
    chosen = choose_streamed([1] * 40, 10)
    assert len(chosen) == 10
    assert max(b - a for a, b in zip(chosen, chosen[1:])) == 4
    assert chosen[0] > 0, "the first block of a pass should be resident when not all blocks stream"


def test_choose_streamed_with_unequal_blocks_meets_target_within_one_block():
    sizes = [3, 1, 1, 5, 2, 2, 8, 1, 1, 4] * 3
    for target in range(0, sum(sizes) + 3):
        chosen = choose_streamed(sizes, target)
        streamed = sum(sizes[i] for i in chosen)
        if target >= sum(sizes):
            assert streamed == sum(sizes)
        else:
            assert target <= streamed < target + max(sizes)
        assert chosen == sorted(set(chosen))


def test_deterministic():
    a = plan_sizes(wan_like(), compute_device="cuda:0", virtual_vram_gb=9.3, memory=ROOMY)
    b = plan_sizes(wan_like(), compute_device="cuda:0", virtual_vram_gb=9.3, memory=ROOMY)
    assert a == b and a.report() == b.report()


def test_virtual_vram_larger_than_model_streams_all_blocks_and_warns():
    result = plan_sizes(wan_like(8), compute_device="cuda:0", virtual_vram_gb=100, memory=ROOMY)
    assert result.streamed == {f"blocks.{i}" for i in range(8)}
    assert result.resident_bytes == 600 * MIB
    assert any("all blocks are streamed" in w for w in result.warnings)
    assert "warning: asked to move" in result.report()


def test_model_without_repeated_blocks():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    result = plan(model, compute_device="cpu", virtual_vram_gb=1, memory={"cpu": 8 * GIB})
    assert result.blocks == ()
    assert result.streamed == frozenset()
    assert any("no repeated blocks" in w for w in result.warnings)
    assert result.resident_bytes == sum(p.numel() * 4 for p in model.parameters())


def test_donor_gpu_tier_and_overflow_to_ram():
    memory = {"cuda:0": 24 * GIB, "cuda:1": 4 * GIB, "cpu": 128 * GIB}
    result = plan_sizes(wan_like(), compute_device="cuda:0", virtual_vram_gb=14, donor_device="cuda:1",
                        memory=memory)
    on_donor = [n for n in result.streamed if result.placement[n] == "cuda:1"]
    on_ram = [n for n in result.streamed if result.placement[n] == "cpu"]
    donor_room = DeviceMemory("cuda:1", 4 * GIB, 4 * GIB).usable
    assert on_donor and on_ram
    assert len(on_donor) * BLOCK <= donor_room < (len(on_donor) + 1) * BLOCK
    assert "donor GPU, streamed" in result.report()


def test_nothing_placed_on_a_device_without_room():
    memory = {"cuda:0": 24 * GIB, "cuda:1": 0, "cpu": 128 * GIB}
    result = plan_sizes(wan_like(), compute_device="cuda:0", virtual_vram_gb=10, donor_device="cuda:1",
                        memory=memory)
    assert "cuda:1" not in set(result.placement.values())


def test_compute_device_too_small_suggests_virtual_vram():
    memory = {"cuda:0": 12 * GIB, "cpu": 128 * GIB}
    with pytest.raises(PlanError, match=r"needs .* on cuda:0 .*raise virtual_vram_gb to about \d+\.\d"):
        plan_sizes(wan_like(), compute_device="cuda:0", virtual_vram_gb=2, memory=memory)


def test_suggested_virtual_vram_fits():
    memory = {"cuda:0": 12 * GIB, "cpu": 128 * GIB}
    with pytest.raises(PlanError) as error:
        plan_sizes(wan_like(), compute_device="cuda:0", virtual_vram_gb=2, memory=memory)
    suggestion = float(str(error.value).rsplit("about ", 1)[1])
    fitted = plan_sizes(wan_like(), compute_device="cuda:0", virtual_vram_gb=suggestion + 1, memory=memory)
    assert fitted.compute_bytes <= DeviceMemory("cuda:0", 12 * GIB, 12 * GIB).usable


def test_ram_too_small_for_streamed_blocks():
    sizes = wan_like()
    memory = {"cuda:0": 80 * GIB, "cpu": 4 * GIB}
    with pytest.raises(PlanError, match="need room on cpu but only"):
        plan_sizes(sizes, compute_device="cuda:0", virtual_vram_gb=10, memory=memory)


def test_weights_already_on_a_device_count_as_room():
    sizes = ModelSizes("M", tuple((f"blocks.{i}", BLOCK) for i in range(10)), 0, {"cpu": 10 * BLOCK})
    result = plan_sizes(sizes, compute_device="cuda:0", virtual_vram_gb=5, memory={"cuda:0": 80 * GIB, "cpu": 2 * GIB})
    assert result.streamed_bytes >= 5 * GIB


def test_pinned_budget_overflow_is_pageable():
    memory = {"cuda:0": 80 * GIB, "cpu": 256 * GIB, "pinned": 3 * BLOCK}
    result = plan_sizes(wan_like(), compute_device="cuda:0", virtual_vram_gb=7 * BLOCK / GIB, memory=memory)
    pinned = [b for b in result.blocks if b.pinned]
    assert len(pinned) == 3 and result.pinned_bytes == 3 * BLOCK
    assert "pageable RAM" in result.report()


def test_expert_bytes_mode_puts_the_stated_bytes_on_the_compute_device():
    result = plan_sizes(wan_like(), compute_device="cuda:0", expert_mode_allocations="cuda:0,10gb;cpu,*",
                        memory=ROOMY)
    assert 10 * GIB - BLOCK < result.resident_bytes <= 10 * GIB


def test_expert_ratio_mode():
    sizes = wan_like()
    result = plan_sizes(sizes, compute_device="cuda:0", expert_mode_allocations="cuda:0,25%;cpu,75%", memory=ROOMY)
    assert sizes.total_bytes * 0.25 - BLOCK < result.resident_bytes <= sizes.total_bytes * 0.25


def test_expert_fraction_mode_uses_device_totals():
    inventory = MemoryInventory({"cuda:0": DeviceMemory("cuda:0", 20 * GIB, 24 * GIB),
                                 "cpu": DeviceMemory("cpu", 100 * GIB, 128 * GIB)}, pinned_budget=100 * GIB)
    result = plan_sizes(wan_like(), compute_device="cuda:0", expert_mode_allocations="cuda:0,0.25;cpu,0.5",
                        memory=inventory)
    assert 6 * GIB - BLOCK < result.resident_bytes <= 6 * GIB


def test_expert_three_devices_spread_and_quota():
    result = plan_sizes(wan_like(), compute_device="cuda:0", expert_mode_allocations="cuda:0,8gb;cuda:1,6gb;cpu,*",
                        memory=ROOMY)
    on_donor = sum(b.nbytes for b in result.blocks if b.device == "cuda:1")
    assert 6 * GIB - BLOCK < on_donor <= 6 * GIB
    donor_positions = [i for i, b in enumerate(result.blocks) if b.device == "cuda:1"]
    assert donor_positions[-1] - donor_positions[0] > 20, "donor blocks should be spread, not bunched"


def test_expert_overrides_slider():
    result = plan_sizes(wan_like(), compute_device="cuda:0", virtual_vram_gb=0,
                        expert_mode_allocations="cuda:0,50%;cpu,*", memory=ROOMY)
    assert result.streamed


def test_expert_fraction_that_does_not_cover_the_model():
    inventory = MemoryInventory({"cuda:0": DeviceMemory("cuda:0", 20 * GIB, 24 * GIB),
                                 "cpu": DeviceMemory("cpu", 100 * GIB, 128 * GIB)}, pinned_budget=100 * GIB)
    with pytest.raises(PlanError, match="covers 2.25 GB .* give one device '\\*'"):
        plan_sizes(wan_like(), compute_device="cuda:0", expert_mode_allocations="cuda:0,0.0625;cpu,0.005859375",
                   memory=inventory)


def bytes_on(result, device: str) -> int:
    """Weights stored on `device`: its blocks, plus the non-block weights on the compute device."""
    stored = sum(b.nbytes for b in result.blocks if b.device == device)
    return stored + (result.rest_bytes if device == result.compute_device else 0)


def small_rest(blocks: int = 40) -> ModelSizes:
    return ModelSizes("DiT", tuple((f"blocks.{i}", 64 * MIB) for i in range(blocks)), 4 * MIB)


def test_ratios_are_normalised_across_three_devices():
    """MultiGPU's README: 'cuda:0,8%;cuda:1,8%;cpu,4%' uses an 8:8:4 ratio, 40 % / 40 % / 20 % of the model."""
    sizes = small_rest()
    result = plan_sizes(sizes, compute_device="cuda:0", expert_mode_allocations="cuda:0,8%;cuda:1,8%;cpu,4%",
                        memory=ROOMY)
    for device, share in {"cuda:0": 0.4, "cuda:1": 0.4, "cpu": 0.2}.items():
        assert abs(bytes_on(result, device) - share * sizes.total_bytes) < 64 * MIB, device


def test_starred_last_entry_fills_the_listed_devices_in_order_and_takes_the_rest():
    """'cpu,5gb*' is "5 GB or the remainder": here the remainder is far more than 5 GB, and cpu takes it all."""
    sizes = wan_like()
    result = plan_sizes(sizes, compute_device="cuda:0", expert_mode_allocations="cuda:0,10gb;cuda:1,6gb;cpu,5gb*",
                        memory=ROOMY)
    assert 10 * GIB - BLOCK < bytes_on(result, "cuda:0") <= 10 * GIB
    assert 6 * GIB - BLOCK < bytes_on(result, "cuda:1") <= 6 * GIB
    assert bytes_on(result, "cpu") == sizes.total_bytes - bytes_on(result, "cuda:0") - bytes_on(result, "cuda:1")
    assert bytes_on(result, "cpu") > 11 * GIB


def test_listed_devices_fill_in_order_when_the_amounts_cover_more_than_the_model():
    sizes = small_rest()  # 2.5 GB
    result = plan_sizes(sizes, compute_device="cuda:0", expert_mode_allocations="cuda:1,2gb;cuda:0,2gb;cpu,5gb*",
                        memory=ROOMY)
    assert 2 * GIB - 64 * MIB < bytes_on(result, "cuda:1") <= 2 * GIB
    assert bytes_on(result, "cuda:0") <= sizes.total_bytes - 2 * GIB + 64 * MIB
    assert bytes_on(result, "cpu") < 64 * MIB


def test_bytes_without_a_star_send_the_rest_to_cpu():
    """MultiGPU's README: "The CPU acts as the default wildcard if none are specified"."""
    result = plan_sizes(wan_like(), compute_device="cuda:0", expert_mode_allocations="cuda:0,8gb;cuda:1,4gb",
                        memory=ROOMY)
    assert 4 * GIB - BLOCK < bytes_on(result, "cuda:1") <= 4 * GIB
    assert bytes_on(result, "cpu") > 15 * GIB


def test_a_star_written_first_still_leaves_the_stated_amounts_to_the_others():
    result = plan_sizes(wan_like(), compute_device="cuda:0", expert_mode_allocations="cpu,*;cuda:1,3gb;cuda:0,8gb",
                        memory=ROOMY)
    assert 3 * GIB - BLOCK < bytes_on(result, "cuda:1") <= 3 * GIB
    assert 8 * GIB - BLOCK < bytes_on(result, "cuda:0") <= 8 * GIB


def test_bad_expert_string_raises_allocation_error():
    with pytest.raises(distorch.AllocationError, match="unknown unit"):
        plan_sizes(wan_like(), compute_device="cuda:0", expert_mode_allocations="cuda:0,3tb;cpu,*", memory=ROOMY)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"compute_device": "cuda:7"}, "'cuda:7' is not available"),
        ({"compute_device": "tpu"}, "not a device DisTorch can use"),
        ({"compute_device": "cuda:0", "donor_device": "cuda:0", "virtual_vram_gb": 1}, "is the compute device"),
        ({"compute_device": "cuda:0", "donor_device": "cuda:3", "virtual_vram_gb": 1}, "'cuda:3' is not available"),
        ({"compute_device": "cpu", "donor_device": "cuda:0", "virtual_vram_gb": 1}, "streams from RAM only"),
        ({"compute_device": "cpu", "expert_mode_allocations": "cpu,*"}, "use virtual_vram_gb instead"),
        ({"compute_device": "cuda:0", "virtual_vram_gb": -1}, "must not be negative"),
        ({"compute_device": "cuda:0", "prefetch": 0}, "prefetch must be at least 1"),
    ],
)
def test_bad_options(kwargs, message):
    with pytest.raises(PlanError, match=message):
        plan_sizes(wan_like(), memory=ROOMY, **kwargs)


def test_cpu_compute_plans_with_real_model():
    model = make_toy_dit(dim=64, depth=6)
    block_bytes = sum(p.numel() * 4 for p in model.blocks[0].parameters())
    result = plan(model, compute_device="cpu", virtual_vram_gb=3 * block_bytes / GIB, memory={"cpu": 8 * GIB})
    assert len(result.streamed) == 3
    assert set(result.placement.values()) == {"cpu"}
    assert result.slot_bytes == block_bytes


def test_report_lists_tiers_and_freed_vram():
    result = plan_sizes(wan_like(), compute_device="cuda:0", virtual_vram_gb=14, donor_device="cuda:1",
                        memory={"cuda:0": 24 * GIB, "cuda:1": 6 * GIB, "cpu": 128 * GIB})
    text = result.report()
    assert "cuda:0" in text and "resident" in text and "pinned RAM, streamed" in text
    assert "VRAM freed" in text and "streaming slots on cuda:0: 2 x 0.68 GB" in text
    freed_total = sum(b.nbytes for b in result.blocks if b.streamed)
    assert freed_total >= 14 * GIB


def test_plan_real_model_counts_tied_weights_once():
    model = make_toy_dit(dim=64, depth=4)
    model.blocks[3].fc2.weight = model.blocks[2].fc2.weight  # tied across two blocks: must stay resident
    layout = distorch.discover(model)
    tied = model.blocks[2].fc2.weight
    assert layout.block("blocks.2").nbytes == layout.block("blocks.3").nbytes
    assert layout.total_bytes == sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())
    assert layout.rest_bytes >= tied.numel() * 4


def test_memory_override_accepts_inventory_and_probe_runs():
    inventory = MemoryInventory.probe()
    assert inventory.get("cpu").total > 0
    assert inventory.pinned_budget > 0
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'cuda:0' is not available"):
            inventory.get("cuda:0")
