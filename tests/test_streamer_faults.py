"""Interrupts at every instant of the streamer (issue #17, item 2): Ctrl+C, or ComfyUI's cancel raised from a hook.

tests/fault_injection.py raises a KeyboardInterrupt at each distinct site the streamer executes (a line of
distorch/streamer.py or engine.py with the chain of streamer calls that reached it) in a forward, open() or
close(), one trial per site, and checks the next two forwards bit for bit against the resident model, that no
pass or slot is left marked running and every block's weights view its host buffer between forwards, then
close(): it works, restores every weight, leaves no hook and no ledger entry. On main a random line gave a
silently wrong next forward, a model stuck until close() (which raised too), or hooks left running.
`python bench/faults_streamer.py` sweeps every executed line of every configuration (docs/fuzzing.md has the
counts).
"""

import sys

import pytest
import torch
from dit_models import make_quirky
from fault_injection import CLOSE_MODES, Config, close_trial, forward_trial, one_thread, open_trial, run_sweep
from stream_reference import with_format_values

import distorch
from distorch import CpuCopyEngine
from distorch.ledger import Ledger
from distorch.streamer import BlockStreamer

# Each engine mode and each prefetch once per phase, and the decode path (blocks streamed as q8_0) once; the bench
# runs all eight configurations of both phases.
FORWARD_SWEEPS = [("warm", Config(prefetch=1, deferred=True)), ("cold", Config(prefetch=2, deferred=False)),
                  ("warm", Config(prefetch=1, deferred=True, stream_format="q8_0"))]


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def assert_all_ok(sweep, at_least: int) -> None:
    assert len(sweep.outcomes) >= at_least, f"{sweep.name}: only {len(sweep.outcomes)} injection points reached"
    assert sweep.counts["ok"] == len(sweep.outcomes), f"{sweep.name}: {dict(sweep.counts)}\n" + "\n".join(
        sweep.failures())


@pytest.mark.parametrize(("phase", "config"), FORWARD_SWEEPS, ids=[f"{p}-{c}" for p, c in FORWARD_SWEEPS])
def test_an_interrupt_at_any_site_of_a_forward_leaves_the_next_forwards_exact(phase, config):
    """Covers the acquire/load/release/refill/pass-begin/pass-end paths: a slot marked as holding a block before
    its copy was enqueued (wrong output), `_where` and `slot.block` split (KeyError on every later eviction),
    a reader dropped before the slot's free event (every later forward and close() raising)."""
    assert_all_ok(run_sweep(forward_trial, config, phase, "site"), at_least=200)


@pytest.mark.parametrize("stream_format", ["stored", "q8_0"])
def test_an_interrupt_at_any_site_of_open_takes_back_what_it_installed(stream_format):
    """Also from the progress callback; the exception is kept alive meanwhile (a REPL's sys.last_value): no hook
    may survive it, and a second open() streams bit-exact. In q8_0 the cut may land inside a block's encoding."""
    config = Config(prefetch=2, deferred=True, stream_format=stream_format)
    assert_all_ok(run_sweep(open_trial, config, "open", "site"), at_least=60)
    assert_all_ok(run_sweep(open_trial, config, "open", "progress"), at_least=3)


@pytest.mark.parametrize(("mode", "stream_format"), [*((m, "stored") for m in CLOSE_MODES), ("close", "q8_0")])
def test_an_interrupt_at_any_site_of_close_leaves_a_usable_model_and_close_works_again(mode, stream_format):
    """close(unstage=True) as distorch.stream's handle calls it, close(unstage=False) as ComfyUI unloads: after the
    interrupt a forward is still right, close() and a new open() work, and the model is restored after all. In q8_0
    a block still staged computes decoded on the host, and one cut inside its unstaging is restored again."""
    config = Config(prefetch=2, deferred=True, stream_format=stream_format)
    assert_all_ok(run_sweep(close_trial, config, mode, "site"), at_least=20)


def _raise_keyboard_interrupt(*args):
    raise KeyboardInterrupt


def half_plan(model):
    return distorch.plan(model, compute_device="cpu", virtual_vram_gb=distorch.discover(model).block_bytes / 2**31,
                         memory={"cpu": 2**36}, ledger=Ledger())


def test_a_stream_interrupted_while_installing_hooks_leaves_none_behind(monkeypatch):
    """The hooks installed before the interrupt ran on every forward while the exception object lived, also
    beside a new stream()'s own hooks; close() removed hooks only when open."""
    model = make_quirky()
    plan = half_plan(model)
    x, t = torch.randn(2, 16, 8), torch.tensor([300.0, 20.0])
    expected = model(x, t)
    with monkeypatch.context() as patch:
        patch.setattr(BlockStreamer, "_make_pass_begin", _raise_keyboard_interrupt)  # after every block's hooks
        with pytest.raises(KeyboardInterrupt) as failed:
            distorch.stream(model, plan, ledger=Ledger())
    assert not [name for name, m in model.named_modules() if m._forward_pre_hooks or m._forward_hooks]
    ledger = Ledger()
    with distorch.stream(model, plan, debug=True, engine=CpuCopyEngine(deferred=True), ledger=ledger):
        assert torch.equal(model(x, t), expected) and torch.equal(model(x, t), expected)
    assert failed.value is not None and ledger.holdings() == ()
    assert not [name for name, m in model.named_modules() if m._forward_pre_hooks or m._forward_hooks]


class InterruptInside:
    """Raises KeyboardInterrupt at the `line`-th line run in `function` while it is called from `caller`."""

    def __init__(self, function: str, caller: str, line: int):
        self.function, self.caller, self.line, self.seen = function, caller, line, 0

    def __enter__(self):
        sys.settrace(self._call)

    def __exit__(self, *exc):
        sys.settrace(None)

    def _call(self, frame, event, arg):
        if frame.f_code.co_name == self.function and frame.f_back.f_code.co_name == self.caller:
            return self._line
        return None

    def _line(self, frame, event, arg):
        if event == "line":
            self.seen += 1
            if self.seen == self.line:
                raise KeyboardInterrupt
        return self._line


def test_a_staging_cut_between_two_tensors_is_pointed_back_by_close():
    """Interrupted inside staging's re-pointing, a block's tensors were split between its new buffer and the
    original storages (two views of one storage on two storages); close() re-pointed blocks only when slots
    existed, so the next stream() refused the model: "sizes changed: blocks.1; plan it again" (found by the
    every-line sweep of distorch.stream)."""
    model = make_quirky()
    plan = half_plan(model)
    x, t = torch.randn(2, 16, 8), torch.tensor([300.0, 20.0])
    expected = model(x, t)
    # Line 7: three tensors of blocks.1 re-pointed, the fourth (a view of the third's storage) not yet.
    with InterruptInside("point_to", "stage", line=7), pytest.raises(KeyboardInterrupt):
        distorch.stream(model, plan, ledger=Ledger())
    with distorch.stream(model, plan, debug=True, engine=CpuCopyEngine(deferred=True), ledger=Ledger()):
        assert torch.equal(model(x, t), expected)


def test_a_hook_whose_handle_was_lost_does_nothing_once_closed():
    """torch inserts a hook before it returns its handle: a signal in between loses the handle, and close() cannot
    remove that hook. It must not act on the closed streamer (it raised "needs a slot" on every forward)."""
    model = make_quirky()
    plan = half_plan(model)
    x, t = torch.randn(2, 16, 8), torch.tensor([300.0, 20.0])
    expected = model(x, t)
    handle = distorch.stream(model, plan, ledger=Ledger())
    first = handle.streamer._blocks[0]
    lost = first.module().register_forward_pre_hook(handle.streamer._make_pre_hook(first.index))
    handle.close()
    try:
        assert torch.equal(model(x, t), expected)
    finally:
        lost.remove()


def test_a_decode_cut_midway_leaves_the_decode_buffer_holding_nothing():
    """Interrupted inside block 3's decode (its first weight decoded over block 1's bytes, the second half done), the
    decode buffer must not still say it holds block 1: block 1, called next, would run on block 3's bytes."""
    model = make_quirky()
    plan = distorch.plan(model, compute_device="cpu", virtual_vram_gb=distorch.discover(model).block_bytes / 2**30,
                         memory={"cpu": 2**36}, ledger=Ledger(), stream_format="q8_0")
    reference = make_quirky()
    with_format_values(reference, plan.streamed, "q8_0")
    h, t_emb = torch.randn(2, 16, 64), reference.embed_time(torch.tensor([300.0, 20.0]))
    with distorch.stream(model, plan, ledger=Ledger()) as handle:
        assert torch.equal(model.blocks[1](h, t_emb), reference.blocks[1](h, t_emb))
        with InterruptInside("_decode_q8_0", "decode_into", line=8), pytest.raises(KeyboardInterrupt):
            model.blocks[3](h, t_emb)
        assert handle.streamer._decode.block is None
        assert torch.equal(model.blocks[1](h, t_emb), reference.blocks[1](h, t_emb))


def _load_marking_first(self, index, slot_index):
    slot = self._slots[slot_index]
    slot.block = index
    for destination, source in self._blocks[index].copies(slot.buffer):
        self.engine.copy(destination, source, after=slot.free, ready=slot.ready)


def test_the_sweep_finds_a_slot_marked_before_its_copy(monkeypatch):
    """The harness can fail: with a slot marked as holding its block before the copy is enqueued (main's order),
    an interrupt inside the copy leaves the next forward computing on another block's bytes."""
    monkeypatch.setattr(BlockStreamer, "_load", _load_marking_first)
    sweep = run_sweep(forward_trial, Config(prefetch=2, deferred=False), "cold", "site", until_failure=True)
    assert sweep.outcomes[-1].kind == "wrong", sweep.failures()
