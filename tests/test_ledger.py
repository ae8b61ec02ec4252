"""The ledger: every DisTorch model's RAM, pinned RAM, donor VRAM and disk bytes, shared by all plans (issue #8).

Each test uses a private Ledger and an injected memory inventory, so the numbers are exact and no other
test's models are counted.
"""

import gc
import weakref

import pytest
import torch
from memory_models import forward, load_model, write_model

import distorch
from distorch import CpuCopyEngine, Tier
from distorch.ledger import Holding, Ledger
from distorch.memory import RAM_RESERVE_FIXED, RAM_RESERVE_SHARE, DeviceMemory, MemoryInventory
from distorch.pages import MappingTable
from distorch.report import plan_to_dict
from distorch.toy import make_toy_dit
from distorch.units import GIB

TOTAL = 8 * GIB


def inventory(ram_usable: int, pinned: int = 0, pinned_elsewhere: int = 0) -> MemoryInventory:
    """A machine whose RAM has exactly `ram_usable` bytes left after the safety reserve, and a big GPU."""
    reserve = int(RAM_RESERVE_FIXED + RAM_RESERVE_SHARE * TOTAL)
    return MemoryInventory({"cpu": DeviceMemory("cpu", ram_usable + reserve, TOTAL),
                            "cuda:0": DeviceMemory("cuda:0", 64 * GIB, 64 * GIB)}, pinned, pinned_elsewhere)


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    return write_model("gguf", tmp_path_factory.mktemp("ledger") / "toy.gguf", 128, 6)


def gguf_model(path):
    return load_model("gguf", path, 128, 6)


def all_blocks(model) -> float:
    return distorch.discover(model).block_bytes / GIB


def test_a_second_plan_sees_the_first_reservation_before_it_stages(gguf_file):
    """Both GGUF models stage into new RAM; the second one's plan must leave the first one's share alone."""
    ledger = Ledger()
    first, second = gguf_model(gguf_file), gguf_model(gguf_file)
    alone = distorch.plan(second, compute_device="cpu", virtual_vram_gb=all_blocks(second), ledger=Ledger(),
                          memory=inventory(10 << 30))
    machine = inventory(int(1.5 * alone.ram_added))
    plan_a = distorch.plan(first, compute_device="cpu", virtual_vram_gb=all_blocks(first), memory=machine,
                           ledger=ledger)
    assert plan_a.disk_bytes == 0 and plan_a.ram_added == alone.ram_added
    assert ledger.holdings() == (plan_a.holding(),) and not ledger.holdings()[0].staged
    plan_b = distorch.plan(second, compute_device="cpu", virtual_vram_gb=all_blocks(second), memory=machine,
                           ledger=ledger)
    assert plan_b.others == (plan_a.holding(),)
    assert plan_b.disk_bytes > 0, "the first model's reservation leaves no room to stage all of the second"
    assert plan_a.ram_added + plan_b.ram_added <= 1.5 * alone.ram_added
    report = plan_b.report()
    assert "other DisTorch models: ToyDiT (reserved: pageable" in report
    assert "disk: " in report and "RAM short" in report
    ledger_view = plan_to_dict(plan_b)["ledger"]  # what the node's plan view gets
    assert ledger_view["others"] == [report.split("other DisTorch models: ")[1].split(";")[0]]
    assert ledger_view["ram_added"] == plan_b.ram_added
    assert any("RAM short" in b["reason"] for b in plan_to_dict(plan_b)["blocks"] if b["tier"] == "disk")


def test_a_staged_model_is_no_longer_pending_and_closing_releases_it(gguf_file):
    """Once staged, a fresh memory probe sees the bytes: the ledger must stop subtracting them a second time."""
    ledger = Ledger()
    model = gguf_model(gguf_file)
    plan = distorch.plan(model, compute_device="cpu", virtual_vram_gb=all_blocks(model) / 2,
                         memory=inventory(1 << 30), ledger=ledger)
    assert ledger.holdings()[0].pending_ram == plan.ram_added > 0
    with distorch.stream(model, plan, ledger=ledger):
        held = ledger.holdings()[0]
        assert held.staged and held.pending_ram == 0 and held.pageable == plan.streamed_bytes
    assert ledger.holdings() == ()


def test_three_models_share_the_pinned_budget():
    ledger = Ledger()
    models = [make_toy_dit(dim=64, depth=8, heads=2, seed=i) for i in range(3)]
    block = distorch.discover(models[0]).blocks[0].nbytes
    machine = inventory(4 * GIB, pinned=6 * block, pinned_elsewhere=block)
    plans = [distorch.plan(m, compute_device="cuda:0", virtual_vram_gb=3 * block / GIB, memory=machine, ledger=ledger)
             for m in models]
    assert [len(p.streamed) for p in plans] == [3, 3, 3]
    assert [p.pinned_bytes // block for p in plans] == [3, 2, 0], "5 blocks of budget left after ComfyUI's one"
    assert sum(h.pinned for h in ledger.holdings()) <= 5 * block
    last = plans[2]
    assert all(b.tier is Tier.PAGEABLE for b in last.blocks if b.streamed)
    assert "pinned budget used up" in last.report() and "ComfyUI pinned" in last.report()


def test_entries_leave_when_the_model_is_freed(gguf_file):
    """No explicit call: the entry goes with the model, by reference counting alone."""
    ledger = Ledger()
    gc.disable()
    try:
        planned, streamed = gguf_model(gguf_file), gguf_model(gguf_file)
        distorch.plan(planned, compute_device="cpu", virtual_vram_gb=0.0001, memory=inventory(1 << 30),
                      ledger=ledger)
        plan = distorch.plan(streamed, compute_device="cpu", virtual_vram_gb=0.0001, memory=inventory(1 << 30),
                             ledger=ledger)
        handle = distorch.stream(streamed, plan, ledger=ledger)  # left open: the model keeps it
        assert len(ledger.holdings()) == 2
        del planned
        assert len(ledger.holdings()) == 1
        del streamed, handle
        assert ledger.holdings() == ()
    finally:
        gc.enable()


def slots_only(model) -> MemoryInventory:
    """RAM for the streaming slots (compute on the CPU) and nothing more."""
    roomy = distorch.plan(model, compute_device="cpu", virtual_vram_gb=all_blocks(model), ledger=Ledger(),
                          memory=inventory(GIB))
    return inventory(roomy.prefetch * roomy.slot_bytes)


def test_ram_short_leaves_file_backed_blocks_on_disk_and_streams_them_bit_exact(gguf_file):
    model = gguf_model(gguf_file)
    expected = [forward(model) for _ in range(2)]
    plan = distorch.plan(model, compute_device="cpu", virtual_vram_gb=all_blocks(model), memory=slots_only(model),
                         ledger=Ledger())
    on_disk = {b.name for b in plan.blocks if b.tier is Tier.DISK}
    assert on_disk == plan.streamed, "RAM for the slots only: every streamed block stays in the file"
    mappings = MappingTable.read()
    with distorch.stream(model, plan, debug=True, engine=CpuCopyEngine(deferred=True)) as handle:
        got = [forward(model) for _ in range(2)]
        assert handle.stats().bytes_copied >= 2 * plan.streamed_bytes
        assert all(block.buffer is None for block in handle.streamer._blocks), "nothing staged into RAM"
        weight = model.blocks[1].fc1.weight
        assert mappings.file_mapping(weight.data_ptr(), weight.numel() * weight.element_size()) is not None
    for e, g in zip(expected, got):
        assert torch.equal(e, g)


def test_a_disk_plan_needs_the_weights_still_in_their_file(gguf_file):
    model = gguf_model(gguf_file)
    plan = distorch.plan(model, compute_device="cpu", virtual_vram_gb=all_blocks(model), memory=slots_only(model),
                         ledger=Ledger())
    copied = gguf_model(gguf_file)
    for parameter in copied.blocks[0].parameters():
        parameter.data = parameter.data.clone()  # now in ordinary RAM
    with pytest.raises(ValueError, match=r"streams \['blocks.0'\] from the model file, but"):
        distorch.stream(copied, plan)


def test_holding_counts_each_tier():
    blocks = distorch.plan_sizes(distorch.ModelSizes("M", tuple((f"b.{i}", 100) for i in range(4)), 0),
                                 compute_device="cuda:0", virtual_vram_gb=300 / GIB, memory=inventory(GIB, pinned=100),
                                 others=())
    holding = blocks.holding()
    assert (holding.pinned, holding.pageable, holding.disk, holding.staged) == (100, 200, 0, False)
    assert Holding("x", ram_added=5, staged=True).pending_ram == 0


def test_ledger_entry_is_replaced_by_a_new_plan_of_the_same_model():
    ledger = Ledger()
    model = make_toy_dit(dim=32, depth=4, heads=2)
    reference = weakref.ref(model)
    for gb in (0.00001, 0.00002):
        distorch.plan(model, compute_device="cpu", virtual_vram_gb=gb, memory=inventory(GIB), ledger=ledger)
    assert len(ledger.holdings()) == 1
    del model
    assert reference() is None and ledger.holdings() == ()
