"""The streamer against the resident model: bit-exact outputs under every awkward pattern.

On the CPU the copy engine runs the same stream/event protocol between CPU buffers; in deferred mode
a copy only lands when something waits for it, and released slots are poisoned with NaN bytes, so a
missing wait shows up as a wrong output (see test_missing_wait_is_caught). The same tests run on CUDA
when a GPU is present.
"""

import pytest
import torch
from dit_models import KeyboardInterruptLike, make_quirky, sampling_run
from torch import nn

import distorch
from distorch import CpuCopyEngine
from distorch.toy import ToyDiT
from distorch.units import GIB

DEVICES = ["cpu", pytest.param("cuda:0", marks=pytest.mark.cuda)]
ROOMY = {"cpu": 64 * GIB, "cuda:0": 64 * GIB, "pinned": 32 * GIB}


def inputs(device="cpu"):
    return torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(1)).to(device)


def plan_share(model, share, device="cpu", prefetch=2):
    target = share * distorch.discover(model).block_bytes
    return distorch.plan(model, compute_device=device, virtual_vram_gb=target / GIB, memory=ROOMY, prefetch=prefetch)


def engines(device):
    return [CpuCopyEngine(deferred=False), CpuCopyEngine(deferred=True)] if device == "cpu" else [None]


def reference_outputs(device="cpu", **run):
    model = make_quirky().to(device)
    return sampling_run(model, inputs(device), **run)


def assert_all_equal(expected, got):
    assert len(expected) == len(got)
    for index, (e, g) in enumerate(zip(expected, got)):
        assert torch.equal(e, g), f"output {index} differs: max abs diff {(e - g).abs().max().item()}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prefetch", [1, 2, 3, 4])
@pytest.mark.parametrize("share", [0.25, 0.5, 1.0])
def test_streamed_equals_resident(device, prefetch, share):
    run = dict(steps=3, cfg=True, skip_pattern=(False, True))
    expected = reference_outputs(device, **run)
    for engine in engines(device):
        model = make_quirky()
        plan = plan_share(model, share, device, prefetch)
        assert plan.streamed
        with distorch.stream(model, plan, prefetch=prefetch, debug=True, engine=engine):
            got = sampling_run(model, inputs(device), **run)
        assert_all_equal(expected, got)


@pytest.mark.parametrize("device", DEVICES)
def test_close_restores_the_original_tensors(device):
    model = make_quirky()
    before = {
        name: (id(t), t.device, t.dtype, t.size(), t.stride(), t.detach().clone())
        for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers())
    }
    handle = distorch.stream(model, plan_share(model, 0.5, device))
    sampling_run(model, inputs(device), steps=1)
    handle.close()
    after = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers())
    assert {name for name, _ in after} == set(before)
    for name, tensor in after:
        ident, dev, dtype, size, stride, values = before[name]
        assert (id(tensor), tensor.device, tensor.dtype, tensor.size(), tensor.stride()) == (ident, dev, dtype, size,
                                                                                             stride), name
        assert torch.equal(tensor.detach(), values), name
    block = model.blocks[3]
    assert block.pair_view.data_ptr() == block.pair_storage[1].data_ptr(), "views of one storage must stay views"
    assert model.blocks[3].fc2.bias is model.shared_bias
    assert_all_equal(reference_outputs("cpu", steps=2), sampling_run(model, inputs("cpu"), steps=2))


@pytest.mark.parametrize("device", DEVICES)
def test_exception_mid_pass_leaves_the_model_usable(device):
    expected = reference_outputs(device, steps=2)
    for engine in engines(device):
        model = make_quirky()
        with distorch.stream(model, plan_share(model, 0.5, device), debug=True, engine=engine) as handle:
            sampling_run(model, inputs(device), steps=1)
            model.fail_at_block = 5
            with pytest.raises(KeyboardInterruptLike):
                model(inputs(device), torch.tensor([500.0, 500.0]))
            model.fail_at_block = None
            assert all(slot.users == 0 for slot in handle.streamer._slots)
            got = sampling_run(model, inputs(device), steps=2)
        assert_all_equal(expected, got)


def test_exception_inside_a_streamed_block_releases_its_slot():
    model = make_quirky()
    plan = plan_share(model, 1.0)
    failing = model.blocks[1]
    with distorch.stream(model, plan, debug=True, engine=CpuCopyEngine(deferred=True)) as handle:
        hook = failing.register_forward_pre_hook(lambda module, args: (_ for _ in ()).throw(KeyboardInterruptLike()))
        with pytest.raises(KeyboardInterruptLike):
            model(inputs(), torch.tensor([1.0, 2.0]))
        hook.remove()
        assert all(slot.users == 0 for slot in handle.streamer._slots)
        got = sampling_run(model, inputs(), steps=1)
    assert_all_equal(reference_outputs(steps=1), got)


def _raise_keyboard_interrupt(module, args):
    raise KeyboardInterrupt


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prefetch", [1, 3])
@pytest.mark.parametrize("where", ["inside a block", "between blocks", "block outside a pass"])
def test_keyboard_interrupt_releases_everything(device, prefetch, where):
    """torch runs always_call hooks for Exception only: Ctrl+C inside a streamed block left its slot marked
    running (prefetch=1: "all 1 are running blocks" on every later forward; more slots: one lost for good)
    and its pass open. The next pass must find every slot free and be bit-exact (issue #13, escape 2)."""
    expected = reference_outputs(device, steps=2)
    for engine in engines(device)[-1:]:  # the deferred CPU engine: a copy lands only when waited for
        model = make_quirky()
        with distorch.stream(model, plan_share(model, 1.0, device, prefetch), prefetch=prefetch, debug=True,
                             engine=engine) as handle:
            sampling_run(model, inputs(device), steps=1)
            hook = model.blocks[1].fc1.register_forward_pre_hook(_raise_keyboard_interrupt)
            with pytest.raises(KeyboardInterrupt):
                if where == "block outside a pass":
                    model.blocks[1](torch.zeros(2, 16, 64, device=device), torch.zeros(2, 64, device=device))
                elif where == "between blocks":
                    hook.remove()
                    model.fail_at_block, model.fail_with = 5, KeyboardInterrupt
                    model(inputs(device), torch.tensor([500.0, 500.0]))
                else:
                    model(inputs(device), torch.tensor([500.0, 500.0]))
            hook.remove()
            model.fail_at_block = None
            if where == "block outside a pass":  # no pass begins: the next block must find the slot freed itself
                model.blocks[2](torch.zeros(2, 16, 64, device=device), torch.zeros(2, 64, device=device))
            got = sampling_run(model, inputs(device), steps=2)
            assert all(slot.users == 0 for slot in handle.streamer._slots)
            assert all(p.depth == 0 and p.frame is None for p in handle.streamer._passes)
        assert_all_equal(expected, got)


def test_a_running_block_is_never_taken_for_an_interrupted_one():
    """Interrupt recovery releases only forwards whose module call has left the stack: a streamed block
    called from inside another one's forward with a single slot still gets the clear error, and the
    outer block keeps its slot."""
    model = make_quirky()
    with distorch.stream(model, plan_share(model, 1.0, prefetch=1), prefetch=1, debug=True) as handle:
        inner = model.blocks[1]
        nested = model.blocks[0].fc1.register_forward_hook(lambda module, args, out: inner(out, out[:, 0]))
        with pytest.raises(RuntimeError, match="'blocks.1' needs a slot but all 1 are running blocks"):
            model(inputs(), torch.tensor([1.0, 2.0]))
        nested.remove()
        assert all(slot.users == 0 for slot in handle.streamer._slots)
        got = sampling_run(model, inputs(), steps=1)
    assert_all_equal(reference_outputs(steps=1), got)


def test_missing_wait_is_caught():
    """The CPU harness can fail: a forward that does not wait for its slot's copy is refused (deferred copies
    would otherwise leave the poisoned bytes in the slot)."""
    model = make_quirky()
    engine = CpuCopyEngine(deferred=True)
    engine.compute_wait = lambda event: None
    with pytest.raises(RuntimeError, match="before its copy landed"):
        with distorch.stream(model, plan_share(model, 1.0), debug=True, engine=engine):
            model(inputs(), torch.tensor([100.0, 100.0]))


def test_copy_into_a_running_slot_is_refused():
    engine = CpuCopyEngine()
    buffer, source = torch.zeros(8, dtype=torch.uint8), torch.ones(8, dtype=torch.uint8)
    engine.mark_reading(buffer, +1)
    with pytest.raises(RuntimeError, match="overwrote a slot while a forward was reading it"):
        engine.copy(buffer, source, after=engine.new_event(), ready=engine.new_event())


@pytest.mark.parametrize("deferred", [False, True])
def test_copy_must_wait_for_the_compute_work_that_read_the_slot(deferred):
    """The compute stream lags the host: after the last forward on a slot returns, its kernels still read the
    slot until the slot's `free` record completes, so only a copy ordered after that record may land."""
    engine = CpuCopyEngine(deferred=deferred)
    slot, source = torch.zeros(8, dtype=torch.uint8), torch.ones(8, dtype=torch.uint8)
    free, ready = engine.new_event(), engine.new_event()
    engine.mark_reading(slot, +1)
    engine.mark_reading(slot, -1)
    engine.compute_record(free)
    with pytest.raises(RuntimeError, match="not ordered after the slot's free event"):
        engine.copy(slot, source, after=engine.new_event(), ready=ready)  # a fresh event orders nothing
        engine.compute_wait(ready)
    ordered = CpuCopyEngine(deferred=deferred)
    free, ready = ordered.new_event(), ordered.new_event()
    ordered.mark_reading(slot, +1)
    ordered.mark_reading(slot, -1)
    ordered.compute_record(free)
    ordered.copy(slot, source, after=free, ready=ready)
    ordered.compute_wait(ready)
    assert torch.equal(slot, source)


def test_steady_state_needs_no_synchronous_loads():
    model = make_quirky()
    with distorch.stream(model, plan_share(model, 0.5), prefetch=2) as handle:
        sampling_run(model, inputs(), steps=1, cfg=False)
        warm = handle.stats()
        sampling_run(model, inputs(), steps=3, cfg=True)
        steady = handle.stats()
    assert steady.passes == warm.passes + 6
    # cond and uncond passes differ (block 4 skipped in one): two passes to learn the alternation, then none
    assert steady.sync_loads - warm.sync_loads <= 2
    with distorch.stream(model, plan_share(model, 0.5), prefetch=2) as handle:
        sampling_run(model, inputs(), steps=2, cfg=True)
        warm = handle.stats()
        sampling_run(model, inputs(), steps=3, cfg=True)
        steady = handle.stats()
    assert steady.sync_loads == warm.sync_loads
    assert steady.mispredicted == warm.mispredicted


class ReversedDiT(ToyDiT):
    def forward(self, x, t):
        t_emb = self.embed_time(t)
        h = self.patch_in(x)
        for block in reversed(self.blocks):
            h = block(h, t_emb)
        return self.head(self.norm_out(h))


def test_execution_order_is_learned_on_the_first_pass():
    torch.manual_seed(0)
    model = ReversedDiT(dim=64, depth=8, heads=2, channels=8)
    x, t = inputs(), torch.tensor([3.0, 4.0])
    expected = model(x, t)
    with distorch.stream(model, plan_share(model, 0.5)) as handle:
        assert torch.equal(model(x, t), expected)
        first = handle.stats()
        for _ in range(3):
            assert torch.equal(model(x, t), expected)
        later = handle.stats()
    assert first.mispredicted == 1 and first.sync_loads > 0
    assert later.sync_loads == first.sync_loads and later.mispredicted == 1


def test_skipped_and_repeated_blocks_are_counted_and_correct():
    model = make_quirky()
    expected = reference_outputs(steps=4, skip_pattern=(False, True, True, False))
    with distorch.stream(model, plan_share(model, 1.0), debug=True, engine=CpuCopyEngine(deferred=True)) as handle:
        got = sampling_run(model, inputs(), steps=4, skip_pattern=(False, True, True, False))
        stats = handle.stats()
    assert_all_equal(expected, got)
    assert stats.mispredicted >= 2  # irregular skips cannot all be predicted, yet every output is exact


def test_blocks_called_outside_a_pass_are_loaded_on_demand():
    model = make_quirky()
    x, t = inputs(), torch.tensor([5.0, 5.0])
    t_emb = model.embed_time(t)
    h = model.patch_in(x)
    expected = model.blocks[3](h, t_emb)
    with distorch.stream(model, plan_share(model, 1.0), debug=True, engine=CpuCopyEngine(deferred=True)) as handle:
        assert torch.equal(model.blocks[3](h, t_emb), expected)
        assert handle.stats().unscheduled == 1


def test_stream_twice_is_refused_and_plan_must_match():
    model = make_quirky()
    plan = plan_share(model, 0.5)
    with distorch.stream(model, plan):
        with pytest.raises(RuntimeError, match="already being streamed"):
            distorch.stream(model, plan)
    other = make_quirky(dim=32)
    with pytest.raises(distorch.PlanError, match="does not match this model"):
        distorch.stream(other, plan)


@pytest.mark.parametrize(("depth", "message"), [
    (12, r"the plan \(8 blocks\) does not match this model \(12 blocks\): blocks missing: none, "
         r"not in the plan: blocks.8, blocks.9, blocks.10 and 1 more, sizes changed: none; plan it again"),
    (7, r"\(7 blocks\): blocks missing: blocks.7, not in the plan: none, sizes changed: none"),
])
def test_plan_for_another_depth_names_the_blocks(depth, message):
    """A plan for a model with fewer blocks said "blocks missing: none, sizes changed: none" (issue #13, escape 6)."""
    with pytest.raises(distorch.PlanError, match=message):
        distorch.stream(make_quirky(depth=depth), plan_share(make_quirky(), 0.5))


def test_unavailable_device_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    model = make_quirky()
    plan = distorch.plan(model, compute_device="cuda:0", virtual_vram_gb=0.0001, memory=ROOMY)
    with pytest.raises(RuntimeError, match="uses cuda:0 but this machine has 0 CUDA device"):
        distorch.stream(model, plan)


def test_streamed_weights_are_not_duplicated_in_ram():
    model = make_quirky()
    plan = plan_share(model, 1.0)
    with distorch.stream(model, plan) as handle:
        storages = {p.untyped_storage().data_ptr() for name, p in model.named_parameters()
                    if name.startswith("blocks.0.")}
        flat = handle.streamer._blocks[0].host
        assert storages == {flat.untyped_storage().data_ptr()}


def test_model_without_blocks_streams_nothing():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    x = torch.randn(2, 4)
    expected = model(x)
    plan = distorch.plan(model, compute_device="cpu", virtual_vram_gb=1, memory=ROOMY)
    with distorch.stream(model, plan) as handle:
        assert torch.equal(model(x), expected)
        assert handle.stats().copies == 0


@pytest.mark.cuda
def test_cuda_steady_state_has_no_allocations_and_no_host_syncs():
    model = make_quirky()
    x = inputs("cuda:0")
    with distorch.stream(model, plan_share(model, 0.5, "cuda:0")) as handle:
        sampling_run(model, x, steps=2)
        torch.cuda.synchronize()
        segments = torch.cuda.memory_stats()["segment.all.allocated"]
        torch.cuda.set_sync_debug_mode("error")
        try:
            sampling_run(model, x, steps=3)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        assert torch.cuda.memory_stats()["segment.all.allocated"] == segments
        assert all(arena.pinned for arena in handle.streamer._arenas)


@pytest.mark.cuda
@pytest.mark.parametrize("prefetch", [1, 2])
def test_cuda_copies_wait_for_the_lagging_compute_stream(prefetch):
    """Each block's kernels queue behind a ~1 ms spin on the compute stream, so the host runs far ahead: a copy
    into a slot not ordered after the slot's free event would overwrite weights its last block still reads."""
    expected = reference_outputs("cuda:0", steps=2)
    model = make_quirky()
    with distorch.stream(model, plan_share(model, 1.0, "cuda:0", prefetch), prefetch=prefetch):
        # Registered after the streamer's pre-hooks: the spin runs after the wait for `ready`, before the kernels.
        spins = [block.register_forward_pre_hook(lambda module, args: torch.cuda._sleep(2_000_000))
                 for block in model.blocks]
        got = sampling_run(model, inputs("cuda:0"), steps=2)
        for spin in spins:
            spin.remove()
    assert_all_equal(expected, got)


@pytest.mark.cuda
def test_cuda_peak_memory_follows_the_plan():
    model = make_quirky()
    plan = plan_share(model, 0.75, "cuda:0")
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with distorch.stream(model, plan):
        weights = torch.cuda.memory_allocated() - base
    assert weights <= plan.compute_bytes * 1.05 + 64 * 1024


def test_close_without_unstaging_keeps_the_flat_buffers_for_the_next_open():
    """ComfyUI unloads and reloads models between runs; re-staging would copy every streamed byte again."""
    model = make_quirky()
    plan = plan_share(model, 0.5)
    streamed = [b for b in distorch.discover(model).blocks if b.name in plan.streamed]
    storage = {b.name: distorch.streamer.StoragePlacement("cpu") for b in streamed}
    streamer = distorch.BlockStreamer(model, streamed, storage, "cpu", debug=True,
                                      engine=CpuCopyEngine(deferred=True)).open()
    expected = reference_outputs(steps=1)
    assert_all_equal(expected, sampling_run(model, inputs(), steps=1))
    buffers = [b.host.data_ptr() for b in streamer._blocks]
    streamer.close(unstage=False)
    assert_all_equal(expected, sampling_run(model, inputs(), steps=1))  # staged weights stay usable while closed
    streamer.open()
    assert [b.host.data_ptr() for b in streamer._blocks] == buffers
    assert_all_equal(expected, sampling_run(model, inputs(), steps=1))
    streamer.close()
    assert all(b.host is None for b in streamer._blocks)


def test_quantized_gguf_blocks_stream_their_bytes():
    """GGUF weights stay GGMLTensors: the streamer moves their raw blocks and the layers dequantize in the slot."""
    from quantized_toy import quantize_toy_dit

    from gguf_loader import GGMLTensor

    with torch.device("meta"):
        shape_only = ToyDiT(dim=64, depth=6, heads=2, channels=8)
    model = quantize_toy_dit(shape_only, "cpu", dtype=torch.float32)
    x, t = inputs().to(torch.float32), torch.tensor([7.0, 300.0])
    expected = [model(x, t) for _ in range(2)]
    quantized = {n: p for n, p in model.named_parameters() if isinstance(p, GGMLTensor)}
    assert quantized
    plan = plan_share(model, 1.0)
    q8_bytes = sum(p.numel() for n, p in quantized.items() if n.startswith("blocks."))
    assert plan.streamed_bytes < 1.05 * q8_bytes + sum(
        p.numel() * p.element_size() for n, p in model.named_parameters() if n.startswith("blocks.")
        and n not in quantized)
    with distorch.stream(model, plan, debug=True, engine=CpuCopyEngine(deferred=True)) as handle:
        got = [model(x, t) for _ in range(2)]
        assert handle.stats().bytes_copied >= 2 * q8_bytes
    assert_all_equal(expected, got)
    for name, param in model.named_parameters():
        if name in quantized:
            assert isinstance(param, GGMLTensor) and param.qtype_name == "Q8_0" and param is quantized[name]
