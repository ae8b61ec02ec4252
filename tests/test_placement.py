"""`distorch.Placement`: re-planning a placed model and re-placing it by the new plan (issue 21, for issue 18).

Only the blocks whose tier changes move, the file is not read again, the output equals a fresh `distorch.stream` of
the same plan bit for bit, the model keeps one host copy, and the ledger keeps one entry with the new numbers. On
the CPU (compute "cpu" streams between CPU buffers through the lagging CPU copy engine, with poisoned slots);
device changes are planned against injected CUDA inventories.
"""

import builtins
import dataclasses
import gc
import weakref

import pytest
import torch
from dit_models import make_quirky, sampling_run
from memory_models import forward, load_model, rss, touch, write_model

import distorch
from distorch import CpuCopyEngine, Placement, PlacementRequest, Tier
from distorch import streamer as streamer_module
from distorch.ledger import Ledger
from distorch.memory import RAM_RESERVE_FIXED, RAM_RESERVE_SHARE, DeviceMemory, MemoryInventory
from distorch.pages import MappingTable
from distorch.units import GIB

MIB = 1 << 20
ROOMY = {"cpu": 64 * GIB}
RUN = dict(steps=2, cfg=True, skip_pattern=(False, True))


def inputs():
    return torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(1))


def request(model, share: float, device: str = "cpu") -> PlacementRequest:
    return PlacementRequest(device, share * distorch.discover(model).block_bytes / GIB)


@dataclasses.dataclass
class FreshRun:
    """A fresh model of the same seed streamed by the same plan from the start: what a re-placed model must equal."""

    outputs: list
    slot_bytes: int
    holding: object  # its ledger entry while streaming


def streamed_run(model, plan) -> FreshRun:
    ledger = Ledger()
    with distorch.stream(model, plan, debug=True, engine=CpuCopyEngine(deferred=True), ledger=ledger) as handle:
        return FreshRun(sampling_run(model, inputs(), **RUN), handle.streamer.slot_bytes, ledger.holdings()[0])


def buffers(placement) -> dict[str, int]:
    """Streamed block -> address of its staging buffer."""
    return {b.name: b.host.data_ptr() for b in placement.streamer._blocks if b.host is not None}


@pytest.mark.parametrize("shares", [(0.25, 0.75, 0.25), (0.5, 0.0, 1.0), (1.0, 0.5, 0.5)])
def test_replace_equals_a_fresh_stream_and_moves_only_what_changes(shares, monkeypatch):
    """A -> B -> A: after each move the forward is bit-exact with a fresh stream of that plan, blocks streamed
    before and after keep their buffers, only the newly streamed ones are staged, and the slots follow the plan."""
    staged = []
    real_stage = streamer_module._StreamedBlock.stage
    monkeypatch.setattr(streamer_module._StreamedBlock, "stage",
                        lambda block, *a, **k: staged.append(block.name) or real_stage(block, *a, **k))
    ledger = Ledger()
    model = make_quirky()
    first = distorch.plan(model, compute_device="cpu", virtual_vram_gb=request(model, shares[0]).virtual_vram_gb,
                          memory=ROOMY, ledger=ledger)
    placement = distorch.stream(model, first, debug=True, engine=CpuCopyEngine(deferred=True), ledger=ledger)
    sampling_run(model, inputs(), **RUN)
    for share in shares[1:]:
        new_plan = placement.replan(request(model, share), memory=ROOMY)
        before, old_streamed = buffers(placement), placement.plan.streamed
        staged.clear()
        placement.move_to(new_plan)
        copied = list(staged)
        got = sampling_run(model, inputs(), **RUN)
        fresh = make_quirky()
        fresh_plan = distorch.plan(fresh, compute_device="cpu", virtual_vram_gb=request(fresh, share).virtual_vram_gb,
                                   memory=ROOMY, ledger=Ledger())
        assert new_plan == fresh_plan, "a re-plan of the placed model equals a plan of the model as loaded"
        reference = streamed_run(fresh, fresh_plan)
        for expected, output in zip(reference.outputs, got, strict=True):
            assert torch.equal(expected, output)
        kept = old_streamed & new_plan.streamed
        assert {n: a for n, a in buffers(placement).items() if n in kept} == {n: before[n] for n in kept}
        assert sorted(copied) == sorted(new_plan.streamed - old_streamed), "only newly streamed blocks are copied"
        assert all(slot.buffer.numel() == reference.slot_bytes for slot in placement.streamer._slots)
        assert ledger.holdings() == (reference.holding,), "one entry, as a fresh stream of the plan holds"
    placement.close()
    assert ledger.holdings() == ()
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_a_paused_model_is_replaced_in_its_buffers_and_streams_on_the_next_open():
    """How the node pack drives it: ComfyUI places the rest, the model is unloaded (paused) between runs, and the
    new plan's blocks are staged by `move_to`, so the next load only makes the slots."""
    ledger = Ledger()
    model = make_quirky()
    expected = sampling_run(make_quirky(), inputs(), **RUN)
    placement = Placement.planned(model, request(model, 0.25), memory=ROOMY, ledger=ledger,
                                  engine=CpuCopyEngine(deferred=True), debug=True)
    placement.open()
    sampling_run(model, inputs(), **RUN)
    placement.pause()
    placement.move_to(placement.replan(request(model, 0.75), memory=ROOMY))
    assert not placement.streamer.is_open and all(b.is_staged for b in placement.streamer._blocks)
    held, = ledger.holdings()
    assert held.staged and held.pageable == sum(b.nbytes for b in placement.streamer._blocks)
    assert placement.open() is True
    for e, g in zip(expected, sampling_run(model, inputs(), **RUN), strict=True):
        assert torch.equal(e, g)
    placement.release()


def test_streamed_blocks_change_tier_between_buffers(monkeypatch):
    """pinned -> pageable -> pinned: each block is copied into a buffer of its new tier and the old one is unpinned;
    cudaHostRegister is recorded instead of called (no GPU needed)."""
    from distorch import hostbuf

    registered, unregistered, staged = [], [], []
    monkeypatch.setattr(hostbuf, "_register", lambda tensor: registered.append(tensor.data_ptr()) or True)
    monkeypatch.setattr(hostbuf, "_unregister_storage", lambda storage: unregistered.append(storage.data_ptr()))
    real_stage = streamer_module._StreamedBlock.stage
    monkeypatch.setattr(streamer_module._StreamedBlock, "stage",
                        lambda block, *a, **k: staged.append(block.name) or real_stage(block, *a, **k))
    model = make_quirky()
    expected = sampling_run(make_quirky(), inputs(), **RUN)
    pageable = distorch.plan(model, compute_device="cpu", virtual_vram_gb=request(model, 0.5).virtual_vram_gb,
                             memory=ROOMY, ledger=Ledger())
    pinned = dataclasses.replace(pageable, blocks=tuple(dataclasses.replace(b, pinned=b.streamed)
                                                        for b in pageable.blocks))
    placement = distorch.stream(model, pinned, debug=True, engine=CpuCopyEngine(deferred=True), ledger=Ledger())
    assert len(registered) == len(pinned.streamed) and {b.tier for b in pinned.blocks if b.streamed} == {Tier.PINNED}
    staged.clear()
    placement.move_to(pageable)
    assert sorted(unregistered) == sorted(registered), "the pinned buffers were let go"
    assert sorted(staged) == sorted(pageable.streamed), "each block copied once, into its pageable buffer"
    assert not any(b.buffer.pinned for b in placement.streamer._blocks)
    assert placement._ledger.holdings()[0].pinned == 0
    placement.move_to(pinned)
    assert len(registered) == 2 * len(pinned.streamed)
    for e, g in zip(expected, sampling_run(model, inputs(), **RUN), strict=True):
        assert torch.equal(e, g)
    placement.close()


def ram_usable(nbytes: int) -> MemoryInventory:
    """A machine whose RAM has exactly `nbytes` left after the safety reserve."""
    total = 8 * GIB
    return MemoryInventory({"cpu": DeviceMemory("cpu", nbytes + int(RAM_RESERVE_FIXED + RAM_RESERVE_SHARE * total),
                                                total)})


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    return write_model("gguf", tmp_path_factory.mktemp("placement") / "toy.gguf", 128, 6)


def test_a_file_backed_model_is_replaced_without_reading_its_file(gguf_file, monkeypatch):
    """Disk tier -> RAM -> resident -> RAM on a GGUF in its mapping: the file is never opened again and no new mapping
    of it appears; a block leaving the file drops its pages, and a block once staged never goes back to the disk
    tier (its bytes are no longer in the file)."""
    model = load_model("gguf", gguf_file, 128, 6)
    expected = forward(model)
    layout = distorch.discover(model)
    roomy = distorch.plan(model, compute_device="cpu", virtual_vram_gb=layout.block_bytes / GIB, memory=ROOMY,
                          ledger=Ledger())
    ram_short = ram_usable(roomy.prefetch * roomy.slot_bytes)  # room for the slots only
    on_disk = Placement.planned(model, PlacementRequest("cpu", layout.block_bytes / GIB), memory=ram_short,
                                ledger=Ledger(), places_resident=True)
    assert {b.tier for b in on_disk.plan.blocks} == {Tier.DISK}
    on_disk.open()
    mappings = lambda: sorted((m.start, m.end) for m in MappingTable.read()._mappings  # noqa: E731
                              if m.path == str(gguf_file))
    before = mappings()
    opened = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda file, *a, **k: opened.append(str(file)) or real_open(file, *a, **k))
    for share in (1.0, 0.0, 0.5):
        on_disk.move_to(on_disk.replan(PlacementRequest("cpu", share * layout.block_bytes / GIB), memory=ROOMY))
        assert torch.equal(forward(model), expected)
        assert all(b.tier is not Tier.DISK for b in on_disk.plan.blocks)
    assert str(gguf_file) not in opened and mappings() == before
    weight = model.blocks[0].fc1.weight
    assert MappingTable.read().file_mapping(weight.data_ptr(), weight.numel() * weight.element_size()) is None
    back_to_disk = dataclasses.replace(roomy, blocks=tuple(dataclasses.replace(b, disk=True) for b in roomy.blocks))
    with pytest.raises(ValueError, match="no longer in a file mapping"):
        on_disk.move_to(back_to_disk)
    on_disk.release()


SHAPE = (512, 10)  # ~120 MB in RAM (float32)


@pytest.fixture(scope="module")
def safetensors_file(tmp_path_factory):
    return write_model("safetensors", tmp_path_factory.mktemp("placement") / "model.safetensors", *SHAPE)


def test_replacing_keeps_one_host_copy(safetensors_file):
    """A -> B -> A -> B on a model in RAM: the process grows by no more than the slots and allocator noise; a block
    staged twice, or a buffer kept after its block moved, would add its bytes."""
    model = load_model("safetensors", safetensors_file, *SHAPE)
    touch(model)
    expected = forward(model)
    before = rss()
    ledger = Ledger()
    placement = Placement.planned(model, request(model, 0.3), memory=ROOMY, ledger=ledger, places_resident=True)
    placement.open()
    largest = 0
    for share in (0.9, 0.3, 0.9):
        placement.move_to(placement.replan(request(model, share), memory=ROOMY))
        assert torch.equal(forward(model), expected)
        largest = max(largest, placement.plan.prefetch * placement.plan.slot_bytes)
        growth = rss() - before
        allowed = largest + int(0.05 * placement.plan.streamed_bytes) + 8 * MIB
        assert growth <= allowed, f"RSS grew {growth / MIB:.1f} MiB (allowed {allowed / MIB:.1f})"
    placement.release()


def test_the_ledger_keeps_one_entry_with_the_new_numbers():
    ledger = Ledger()
    model = make_quirky()
    placement = Placement.planned(model, request(model, 0.25), memory=ROOMY, ledger=ledger, places_resident=True)
    assert ledger.holdings() == (placement.plan.holding(),)
    placement.open()
    for share in (1.0, 0.0, 0.5):
        placement.move_to(placement.replan(request(model, share), memory=ROOMY))
        held, = ledger.holdings()
        staged = sum(b.nbytes for b in placement.streamer._blocks)  # aligned within each staging buffer
        # Nothing streamed, nothing staged: the entry stays a reservation, as for a fresh stream of that plan.
        assert (held.pageable, held.ram_added, held.staged) == (staged, placement.plan.ram_added,
                                                                 bool(placement.plan.streamed))
        assert placement.plan.streamed_bytes <= staged < placement.plan.streamed_bytes + 64 * 1024
    placement.release()
    assert ledger.holdings() == ()


def test_replan_for_another_compute_device_and_move_only_while_unstaged():
    """The plan follows a new compute device (a fake 16 GB cuda:1 here) exactly as a fresh plan would; a staged
    model refuses to move there (its buffers and slots belong to the old device)."""
    gpus = {"cpu": 64 * GIB, "cuda:0": 16 * GIB, "cuda:1": 16 * GIB, "pinned": 8 * GIB}
    model, fresh = make_quirky(), make_quirky()
    placement = Placement.planned(model, request(model, 0.5), memory=ROOMY, ledger=Ledger())
    placement.open()
    sampling_run(model, inputs(), steps=1)
    on_gpu = placement.replan(request(model, 0.5, "cuda:1"), memory=gpus)
    assert on_gpu == distorch.plan(fresh, compute_device="cuda:1", virtual_vram_gb=request(fresh, 0.5).virtual_vram_gb,
                                   memory=gpus, ledger=Ledger())
    assert on_gpu.compute_device == "cuda:1" and on_gpu.pinned_bytes == on_gpu.streamed_bytes
    with pytest.raises(RuntimeError, match="cannot move to cuda:1 while staged"):
        placement.move_to(on_gpu)
    placement.release()
    placement.move_to(on_gpu, request=request(model, 0.5, "cuda:1"))
    assert placement.plan is on_gpu and placement.request.compute_device == "cuda:1"
    assert placement._ledger.holdings() == (on_gpu.holding(),)


def test_a_replaced_model_is_freed_with_its_buffers_at_once():
    gc.collect()
    gc.disable()
    try:
        model = make_quirky()
        placement = distorch.stream(model, distorch.plan(model, compute_device="cpu", memory=ROOMY, ledger=Ledger(),
                                                         virtual_vram_gb=request(model, 0.25).virtual_vram_gb))
        placement.move_to(placement.replan(request(model, 0.75), memory=ROOMY))
        sampling_run(model, inputs(), steps=1)
        references = [weakref.ref(model), weakref.ref(placement), weakref.ref(placement.streamer)]
        references += [weakref.ref(b) for b in placement.streamer._arenas]
        del placement, model
        assert all(r() is None for r in references)
    finally:
        gc.enable()


def test_a_plan_for_other_blocks_is_refused_before_anything_moves():
    model = make_quirky()
    placement = distorch.stream(model, distorch.plan(model, compute_device="cpu", memory=ROOMY, ledger=Ledger(),
                                                     virtual_vram_gb=request(model, 0.5).virtual_vram_gb))
    other = distorch.plan(make_quirky(dim=32), compute_device="cpu", memory=ROOMY, ledger=Ledger())
    before = buffers(placement)
    with pytest.raises(distorch.LayoutMismatch, match="does not match this model"):
        placement.move_to(other)
    assert buffers(placement) == before and placement.streamer.is_open
    placement.close()


def test_validation_is_one_rule_for_every_entry_point():
    """The planner's and the nodes' checks are one (distorch/request.py): a single problem raises as itself, several
    at once name each, and nothing that moves no bytes is refused for an unused donor."""
    with pytest.raises(distorch.AllocationError, match="expert_mode_allocations: unknown unit"):
        PlacementRequest.validate("cuda:0", expert_mode_allocations="cuda:0,1t")
    with pytest.raises(distorch.PlanError, match="not a device DisTorch can use.*must not be negative"):
        PlacementRequest.validate("tpu", -1)
    assert PlacementRequest.validate("CUDA", 0, "cuda:0") == PlacementRequest("cuda:0", 0.0, "cuda:0")
    with pytest.raises(distorch.PlanError, match="between 0 and 128"):
        PlacementRequest.validate("cpu", 200, max_virtual_vram_gb=128)
