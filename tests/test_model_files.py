"""A model file changed under a loaded model (issue #17): the pack's one-line error naming the file, or the planned
weights; never a signal (SIGBUS) and never the new weights. And memory that only looks like a file (tmpfs, a memfd,
a deleted file) is counted as memory staging copies, never streamed as a disk.

A truncation runs in a child process: before the fix the child died of SIGBUS, which would kill pytest itself.
Models and faults: file_faults.py (the rest of each model is in RAM, as a GPU run moves it to VRAM).
"""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from file_faults import (
    ROOMY,
    load,
    open_descriptors,
    plan,
    ram_usable,
    replace_by_rename,
    rewrite_in_place,
    write_aged,
)
from memory_models import forward

import distorch
from distorch import CpuCopyEngine, ModelFileChanged, ModelSizes, PlanError, Tier
from distorch.files import Backing, MappedFiles, _maps_this_file
from distorch.ledger import Ledger
from distorch.memory import RAM_RESERVE_FIXED, RAM_RESERVE_SHARE, DeviceMemory, MemoryInventory
from distorch.pages import MappingTable, memory_filesystem
from distorch.placement import Placement
from distorch.request import PlacementRequest
from distorch.units import GIB

KINDS = ["gguf", "safetensors_mmap"]
CHILD = Path(__file__).with_name("file_faults.py")


def changed(path: Path, how: str) -> str:
    return f"the model file '{path}' {how} since the model was loaded; reload the model"


@pytest.fixture(scope="module")
def truncated(tmp_path_factory):
    """The truncation children, started together: (kind, tier) -> (file, finished child)."""
    started = {}
    for kind, tier in (("gguf", "disk"), ("safetensors_mmap", "disk"), ("gguf", "staging")):
        path = write_aged(kind, tmp_path_factory.mktemp(f"{kind}-{tier}") / "model")
        started[kind, tier] = path, subprocess.Popen([sys.executable, str(CHILD), kind, str(path), tier, "0.5"],
                                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finished = {}
    for key, (path, child) in started.items():
        stdout, stderr = child.communicate(timeout=120)
        finished[key] = path, subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr)
    return finished


def assert_clean_error(result: subprocess.CompletedProcess, path: Path) -> None:
    assert result.returncode >= 0, f"the child died of signal {-result.returncode}: {result.stderr[-500:]}"
    assert result.returncode == 1, result.stdout + result.stderr[-2000:]
    line = result.stdout.strip()
    assert "\n" not in line
    assert line.startswith("error ModelFileChanged: distorch: the model file") and f"'{path}' was truncated" in line
    assert line.endswith("reload the model")


def descriptors_of(path: Path) -> int:
    """This process's descriptors open on `path` (gguf_loader's mapping keeps one of its own)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == str(path)
        except OSError:
            continue
    return count


@pytest.mark.parametrize("kind", KINDS)
def test_a_file_truncated_under_the_disk_tier_is_an_error_not_a_signal(truncated, kind):
    """Regression: the next forward read the truncated mapping and the process died of SIGBUS."""
    path, result = truncated[kind, "disk"]
    assert_clean_error(result, path)


def test_a_file_truncated_before_staging_is_an_error_not_a_signal(truncated):
    """Regression: staging copied the blocks from the truncated mapping (SIGBUS)."""
    path, result = truncated["gguf", "staging"]
    assert_clean_error(result, path)


def block_page(path: Path, weight: torch.Tensor) -> tuple[int, int]:
    """The file bytes of a page holding `weight` (found by its first bytes)."""
    head = weight.as_subclass(torch.Tensor).contiguous().view(torch.uint8).flatten()[:256].numpy().tobytes()
    offset = path.read_bytes().find(head)
    assert offset > 0
    return offset, offset + 4096


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("part", ["whole file", "one page of a block"])
def test_a_file_rewritten_in_place_is_an_error_never_new_weights(tmp_path, kind, part):
    """Regression: disk-tier blocks were read from the shared mapping each forward, so `cp other model` (same inode)
    made the loaded model compute with the other weights, without an error."""
    path, other = write_aged(kind, tmp_path / "model"), write_aged(kind, tmp_path / "other", seed=1)
    model = load(kind, path)
    expected = forward(model)
    start, end = (0, None) if part == "whole file" else block_page(path, model.blocks[3].fc1.weight)
    with distorch.stream(model, plan(model, "disk"), ledger=Ledger()):
        assert torch.equal(forward(model), expected)
        inode = path.stat().st_ino
        rewrite_in_place(path, other, start, end)
        assert path.stat().st_ino == inode
        for _ in range(2):  # every later forward too: a failed read leaves no slot holding the new bytes
            with pytest.raises(ModelFileChanged, match=changed(path, "was rewritten")):
                forward(model)


def test_a_read_that_failed_leaves_no_slot_holding_the_block(tmp_path):
    """One streamed block, one slot: after its read failed, the next forward must read it again (and fail again), not
    find it loaded and compute on what the failed read left in the slot."""
    path, other = write_aged("gguf", tmp_path / "model"), write_aged("gguf", tmp_path / "other", seed=1)
    model = load("gguf", path)
    block = distorch.discover(model).blocks[0].nbytes
    model_plan = distorch.plan(model, compute_device="cpu", virtual_vram_gb=block / GIB, prefetch=1,
                               memory=ram_usable(block), ledger=Ledger())
    assert [b.tier for b in model_plan.blocks if b.streamed] == [Tier.DISK]
    with distorch.stream(model, model_plan, prefetch=1, ledger=Ledger()):
        rewrite_in_place(path, other)
        for _ in range(2):
            with pytest.raises(ModelFileChanged, match=changed(path, "was rewritten")):
                forward(model)


def test_a_file_rewritten_between_plan_and_stream_is_refused(tmp_path):
    """The loader plans, the first run stages: the identity taken when planning is the one every read checks."""
    path, other = write_aged("gguf", tmp_path / "model"), write_aged("gguf", tmp_path / "other", seed=1)
    model = load("gguf", path)
    model_plan = plan(model, "staging")
    rewrite_in_place(path, other)
    with pytest.raises(ModelFileChanged, match=changed(path, "was rewritten")):
        distorch.stream(model, model_plan, ledger=Ledger())


def test_a_file_rewritten_after_planning_is_not_staged_and_nothing_stays_half_staged(tmp_path):
    """The loader plans, the first run stages: a file rewritten in between (or while staging) is refused at the block
    that reads it; the blocks staged before stay consistent and release() gives every weight back."""
    path, other = write_aged("gguf", tmp_path / "model"), write_aged("gguf", tmp_path / "other", seed=1)
    model = load("gguf", path)
    reference = {n: t.clone() for n, t in model.state_dict().items()}
    blocks = distorch.discover(model).block_bytes / GIB
    placement = Placement.planned(model, PlacementRequest("cpu", blocks), memory=ROOMY, ledger=Ledger(),
                                  places_resident=True)
    before = open_descriptors()

    def rewrite_after_two_blocks(done, total):
        if done == 2 * total // 6:
            rewrite_in_place(path, other)

    with pytest.raises(ModelFileChanged, match=changed(path, "was rewritten")):
        placement.open(progress=rewrite_after_two_blocks)
    staged = [b.name for b in placement.streamer._blocks if b.is_staged]
    assert staged == ["blocks.0", "blocks.1"], "the block that read the changed file is not staged"
    placement.release()
    assert open_descriptors() == before
    state = model.state_dict()
    for name in reference:  # the staged blocks hold the planned bytes, the others never moved
        if name.startswith(("blocks.0.", "blocks.1.")):
            assert torch.equal(state[name], reference[name]), name
    mappings = MappingTable.read()
    weight = model.blocks[2].fc1.weight
    assert mappings.file_mapping(weight.data_ptr(), weight.numel() * weight.element_size()) is not None


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("how", ["renamed over", "deleted"])
def test_a_file_replaced_or_deleted_keeps_the_planned_weights_and_replans_as_memory(tmp_path, kind, how):
    """The old file stays open (descriptor and mapping) and no name reaches it: streaming it gives the planned weights.
    Re-planned, its blocks are memory that staging copies (regression: counted as RAM that staging only moves)."""
    path, other = write_aged(kind, tmp_path / "model"), write_aged(kind, tmp_path / "other", seed=1)
    model = load(kind, path)
    expected = forward(model)
    with distorch.stream(model, plan(model, "disk"), ledger=Ledger()):
        assert torch.equal(forward(model), expected)
        replace_by_rename(path, other) if how == "renamed over" else path.unlink()
        for _ in range(2):
            assert torch.equal(forward(model), expected)
    sizes = ModelSizes.from_layout("M", distorch.discover(model))
    assert not sizes.in_file and not sizes.in_ram
    assert sizes.in_shared_ram == dict(sizes.blocks)
    roomy = distorch.plan(model, compute_device="cpu", virtual_vram_gb=sizes.block_bytes / GIB, memory=ROOMY,
                          ledger=Ledger())
    assert roomy.ram_added == roomy.streamed_bytes + roomy.prefetch * roomy.slot_bytes
    with pytest.raises(PlanError, match="need room on cpu"):  # no disk tier for a file no name reaches
        distorch.plan(model, compute_device="cpu", virtual_vram_gb=sizes.block_bytes / GIB, ledger=Ledger(),
                      memory=ram_usable(roomy.prefetch * roomy.slot_bytes))
    with distorch.stream(model, roomy, ledger=Ledger()):
        assert torch.equal(forward(model), expected)


def test_a_block_staged_after_its_file_was_replaced_is_copied_from_its_mapping(tmp_path):
    """Half the blocks stay with the model (as ComfyUI places resident weights), then the file is renamed over and a
    re-placement streams them all: the newly staged blocks come from the old file's mapping (no name reaches it, no
    descriptor is open), never from the new file under the old name."""
    path, other = write_aged("gguf", tmp_path / "model"), write_aged("gguf", tmp_path / "other", seed=1)
    model = load("gguf", path)
    expected = forward(model)
    blocks = distorch.discover(model).block_bytes / GIB
    placement = Placement.planned(model, PlacementRequest("cpu", blocks / 2), memory=ROOMY, ledger=Ledger())
    placement.open()
    assert torch.equal(forward(model), expected)
    replace_by_rename(path, other)
    placement.move_to(placement.replan(PlacementRequest("cpu", blocks), memory=ROOMY))
    assert placement.plan.streamed == {b.name for b in placement.plan.blocks}
    assert torch.equal(forward(model), expected)
    placement.release()


def test_a_file_moved_away_keeps_streaming_from_the_disk_across_a_re_placement(tmp_path):
    """`mv model.gguf elsewhere/`: the file is the same, under another name. A re-placement that keeps the disk tier
    hands its open descriptor to the new streamer, which never looks the old name up again."""
    path = write_aged("gguf", tmp_path / "model")
    model = load("gguf", path)
    expected = forward(model)
    request = PlacementRequest("cpu", distorch.discover(model).block_bytes / GIB)
    slots_only = ram_usable(plan(model, "disk").prefetch * plan(model, "disk").slot_bytes)
    placement = Placement.planned(model, request, memory=slots_only, ledger=Ledger())
    placement.open()
    assert torch.equal(forward(model), expected)
    path.rename(tmp_path / "moved")
    placement.move_to(placement.replan(memory=slots_only))
    assert {b.tier for b in placement.plan.blocks} == {Tier.DISK}
    assert torch.equal(forward(model), expected)
    placement.release()


def test_a_model_on_tmpfs_is_memory_that_staging_copies(tmp_path):
    """/dev/shm is tmpfs: its pages are RAM the file keeps. Staging adds its bytes (plan and ledger) and it is no disk
    to stream from. Regression: /dev/shm paths counted as anonymous RAM that staging moves."""
    shm = Path("/dev/shm")
    fd = os.open(shm, os.O_RDONLY) if shm.is_dir() else None
    if fd is None or not memory_filesystem(fd):
        pytest.skip("no tmpfs at /dev/shm")
    os.close(fd)
    path = shm / f"distorch-test-{os.getpid()}.gguf"
    try:
        write_aged("gguf", path)
        model = load("gguf", path)
        expected = forward(model)
        layout = distorch.discover(model)
        assert {c.backing for b in layout.blocks for c in b.clusters} == {Backing.SHARED}
        assert all(c.source is not None for b in layout.blocks for c in b.clusters), "read through its descriptor"
        sizes = ModelSizes.from_layout("M", layout)
        assert sizes.in_shared_ram == dict(sizes.blocks) and not sizes.in_file and not sizes.in_ram
        ledger = Ledger()
        roomy = distorch.plan(model, compute_device="cpu", virtual_vram_gb=layout.block_bytes / GIB, memory=ROOMY,
                              ledger=ledger)
        assert roomy.ram_added == roomy.streamed_bytes + roomy.prefetch * roomy.slot_bytes
        assert ledger.holdings()[0].ram_added == roomy.ram_added
        with pytest.raises(PlanError, match="need room on cpu"):
            distorch.plan(model, compute_device="cpu", virtual_vram_gb=layout.block_bytes / GIB, ledger=Ledger(),
                          memory=ram_usable(roomy.prefetch * roomy.slot_bytes))
        with distorch.stream(model, roomy, ledger=ledger):
            assert torch.equal(forward(model), expected)
            assert ledger.holdings()[0].pageable == roomy.streamed_bytes
    finally:
        path.unlink(missing_ok=True)


def test_a_memfd_is_memory_that_staging_copies(tmp_path):
    source = write_aged("gguf", tmp_path / "model")
    fd = os.memfd_create("distorch-model")
    try:
        os.write(fd, source.read_bytes())
        model = load("gguf", Path(f"/proc/self/fd/{fd}"))
    finally:
        os.close(fd)  # the mapping keeps the memfd
    layout = distorch.discover(model)
    assert {(c.backing, c.source) for b in layout.blocks for c in b.clusters} == {(Backing.SHARED, None)}
    assert ModelSizes.from_layout("M", layout).in_shared_ram == {b.name: b.nbytes for b in layout.blocks}


def test_shared_memory_blocks_are_copied_and_never_left_on_disk():
    """The planner's arithmetic for the third kind of host bytes (compute on the CPU: the slots are RAM too)."""
    block = 100 << 20
    blocks = tuple((f"b.{i}", block) for i in range(10))
    sizes = ModelSizes("M", blocks, 0, {"cpu": 10 * block}, in_shared_ram=dict(blocks))
    fits = distorch.plan_sizes(sizes, compute_device="cpu", virtual_vram_gb=10 * block / GIB,
                               memory=ram_usable(12 * block), others=())
    assert fits.ram_added == 12 * block and fits.disk_bytes == 0
    with pytest.raises(PlanError):
        distorch.plan_sizes(sizes, compute_device="cpu", virtual_vram_gb=10 * block / GIB,
                            memory=ram_usable(11 * block), others=())
    # Compute on the CPU with the rest on a GPU: the resident blocks lie in host memory already, the rest does not.
    half = dataclasses.replace(sizes, rest_bytes=3 * block, bytes_on={"cpu": 10 * block, "cuda:0": 3 * block})
    resident_rest = distorch.plan_sizes(half, compute_device="cpu", virtual_vram_gb=5 * block / GIB,
                                        memory=ram_usable(20 * block), others=())
    assert resident_rest.ram_added == 5 * block + 2 * block + 3 * block  # staged, slots, the rest coming to RAM
    as_file = dataclasses.replace(sizes, in_shared_ram={}, in_file=dict(blocks))
    spilled = distorch.plan_sizes(as_file, compute_device="cpu", virtual_vram_gb=10 * block / GIB,
                                  memory=ram_usable(11 * block), others=())
    assert spilled.disk_bytes > 0, "the control: the same blocks in a file on a disk may stay there"


def test_the_plan_counts_the_bounce_buffer_a_gpu_reads_the_disk_tier_through():
    """On a GPU the disk tier is read into one page-locked host buffer of a slot's size before its copy: RAM the plan
    adds (and makes room for, by leaving one more block in the file)."""
    block = 100 << 20
    blocks = tuple((f"b.{i}", block) for i in range(10))
    sizes = ModelSizes("M", blocks, 0, {"cpu": 10 * block}, in_file=dict(blocks))
    machine = {"cpu": 6 * block + int(RAM_RESERVE_FIXED + RAM_RESERVE_SHARE * 64 * GIB), "cuda:0": 64 * GIB}
    memory = MemoryInventory({"cpu": DeviceMemory("cpu", machine["cpu"], 64 * GIB),
                              "cuda:0": DeviceMemory("cuda:0", machine["cuda:0"], 64 * GIB)})
    gpu = distorch.plan_sizes(sizes, compute_device="cuda:0", virtual_vram_gb=10 * block / GIB, memory=memory,
                              others=())
    staged = sum(b.nbytes for b in gpu.blocks if b.tier in (Tier.PINNED, Tier.PAGEABLE))
    assert gpu.disk_bytes == 5 * block and staged == 5 * block, "one block more on the disk for the bounce buffer"
    assert gpu.ram_added == staged + block
    # The bounce buffer is page-locked: it takes its share of the pinned budget and the ledger counts it.
    budget = MemoryInventory(memory.devices, pinned_budget=3 * block)
    pinned = distorch.plan_sizes(sizes, compute_device="cuda:0", virtual_vram_gb=10 * block / GIB, memory=budget,
                                 others=())
    assert pinned.pinned_bytes == 2 * block and pinned.bounce_bytes == block
    assert pinned.holding().pinned == 3 * block


def test_a_weight_written_in_memory_is_streamed_as_written(tmp_path):
    """A private mapping (safetensors) whose pages were written differs from its file: never read through the
    descriptor (that would undo the write), so not the disk tier either."""
    path = write_aged("safetensors_mmap", tmp_path / "model")
    model = load("safetensors_mmap", path)
    with torch.no_grad():
        model.blocks[2].fc1.weight[0, 0] += 1.0  # copy-on-write: the file keeps its bytes
    expected = forward(model)
    layout = distorch.discover(model)
    assert not any(b.file_backed for b in layout.blocks)
    assert {c.backing for b in layout.blocks for c in b.clusters} == {Backing.SHARED}
    with distorch.stream(model, plan(model, "staging"), ledger=Ledger()):
        assert torch.equal(forward(model), expected)


def test_descriptors_are_closed_with_the_streamer_and_with_the_model(tmp_path):
    """One descriptor per file while disk-tier blocks stream from it; none after close() or once the model is freed."""
    path = write_aged("gguf", tmp_path / "model")
    model = load("gguf", path)
    model_plan = plan(model, "disk")
    loader = descriptors_of(path)  # gguf_loader's mapping holds one
    for _ in range(5):
        with distorch.stream(model, model_plan, ledger=Ledger()) as handle:
            streamer = handle.streamer  # kept alive: close() itself must close the descriptor
            forward(model)
            assert descriptors_of(path) == loader + 1
        assert descriptors_of(path) == loader
        del streamer
    handle = distorch.stream(model, model_plan, ledger=Ledger())
    handle.pause()  # ComfyUI unloads between runs: the disk-tier blocks stay ready, their descriptor too
    assert descriptors_of(path) == loader + 1
    handle.open()
    forward(model)
    del model, handle  # freed without close(): the streamer's descriptor goes with it
    assert descriptors_of(path) == 0


def test_staging_keeps_no_descriptor(tmp_path):
    path = write_aged("gguf", tmp_path / "model")
    model = load("gguf", path)
    loader = descriptors_of(path)
    with distorch.stream(model, plan(model, "staging"), ledger=Ledger()) as handle:
        assert all(b.tier is Tier.PAGEABLE for b in handle.plan.blocks)
        assert descriptors_of(path) == loader


class _Ones:
    """A host read of 8 bytes of ones (what `files.FileRead` is to the copy engines)."""

    nbytes = 8

    def read_into(self, flat: torch.Tensor) -> None:
        flat.fill_(1)


@pytest.mark.parametrize("deferred", [False, True])
def test_a_read_into_a_slot_must_wait_for_the_compute_work_that_read_it(deferred):
    """The disk tier's host read lands in the slot itself on the CPU: it must be ordered after the slot's free event
    like any copy (the compute stream lags the host)."""
    engine = CpuCopyEngine(deferred=deferred)
    slot = torch.zeros(8, dtype=torch.uint8)
    free, ready = engine.new_event(), engine.new_event()
    engine.mark_reading(slot, +1)
    engine.mark_reading(slot, -1)
    engine.compute_record(free)
    with pytest.raises(RuntimeError, match="not ordered after the slot's free event"):
        engine.copy(slot, _Ones(), after=engine.new_event(), ready=ready)  # a fresh event orders nothing
    engine.copy(slot, _Ones(), after=free, ready=ready)
    engine.compute_wait(ready)
    assert torch.equal(slot, torch.ones(8, dtype=torch.uint8))


def test_a_file_whose_stat_and_maps_disagree_is_matched_through_a_probe_mapping(tmp_path):
    """btrfs subvolumes and overlayfs report another device in stat than in /proc/self/maps: a probe mapping of the
    descriptor shows what maps calls the file."""
    path, other = write_aged("gguf", tmp_path / "model"), write_aged("gguf", tmp_path / "other", seed=1)
    model = load("gguf", path)
    weight = model.blocks[0].fc1.weight
    mapping = MappingTable.read().file_mapping(weight.data_ptr(), 1)
    for name, expected in ((path, True), (other, False)):
        fd = os.open(name, os.O_RDONLY)
        try:
            now = os.fstat(fd)
            fake = os.stat_result((now.st_mode, now.st_ino, now.st_dev + 1, *now[3:]))
            assert _maps_this_file(fd, fake, mapping) is expected
        finally:
            os.close(fd)
    assert MappedFiles(MappingTable.read()).locate(weight.data_ptr(), 16)[0] is Backing.FILE
