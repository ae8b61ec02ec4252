"""Interrupts at every instant of the streamer, shared by tests/test_streamer_faults.py and bench/faults_streamer.py.

A trial streams the quirky DiT (half its blocks streamed, half resident) on the CPU engine, through a
BlockStreamer with a ledger account as `distorch.stream` and the ComfyUI loader drive it, and raises a
KeyboardInterrupt (`Injected`) at one injection point of one forward, of `open()`, `distorch.stream()` or `close()`;
then it checks what must still hold and names the first thing that does not:

    ok        the next two forwards equal the resident model bit for bit, close() works, restores every weight
              and leaves no hook on any module and no ledger entry (after a failed open(): no hook survives
              while the exception object lives, and a second open() streams bit-exact)
    wrong     a forward returned other bits than the resident model, or between forwards a streamed block's
              weights do not view its host buffer (the silent failures)
    stuck     a forward or close() raised
    degraded  the forwards were right, but afterwards a pass or a slot is still marked running (its prefetching
              lost) or the ledger entry does not say staged
    leftover  close() returned but a hook is still installed, a weight differs or the ledger entry stayed

Injection points are the lines executed in distorch/streamer.py and distorch/engine.py (comprehensions count as
the line that runs them): `every="line"` numbers each executed line (N = 1..total, loops counted per iteration),
`every="site"` numbers distinct sites, a line together with the chain of streamer functions that led to it
(`_load:551 <- _refill <- _release <- _post_hook`), each interrupted the first time it runs. `every="progress"`
(open only) raises from the staging progress callback at its N-th call, as ComfyUI's cancel does.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch
from dit_models import make_quirky
from stream_reference import with_format_values

import distorch
from distorch import CpuCopyEngine, engine, stream_format, streamer
from distorch.ledger import Ledger
from distorch.request import StreamFormat
from distorch.units import GIB

INSTRUMENTED = (streamer.__file__, engine.__file__, stream_format.__file__)
SHARE = 0.5  # of the block bytes on the compute device: half the blocks streamed, half resident
ROOMY = {"cpu": 64 * GIB, "cuda:0": 64 * GIB, "pinned": 32 * GIB}
FORWARD_PHASES = ("cold", "warm")  # interrupt the first forward after open(), or the second (schedule learned)
CLOSE_MODES = ("close", "unload")  # close(unstage=True), or close(unstage=False) as ComfyUI unloads
OPEN_WAYS = ("open", "stream")  # BlockStreamer.open() directly, or through distorch.stream()
KINDS = ("ok", "wrong", "stuck", "degraded", "leftover")


class Injected(KeyboardInterrupt):
    """The harness's interrupt: a BaseException, so torch runs no `always_call` hook for it, as for Ctrl+C."""


@dataclass(frozen=True)
class Config:
    prefetch: int
    deferred: bool  # CpuCopyEngine(deferred=True): a copy lands only when something waits for it
    stream_format: str = "stored"  # "q8_0": blocks staged encoded and decoded before they run (the decode path)

    def __str__(self) -> str:
        fmt = "" if self.stream_format == "stored" else f", {self.stream_format}"
        return f"prefetch {self.prefetch}, {'deferred' if self.deferred else 'eager'} engine{fmt}"


CONFIGS = tuple(Config(prefetch, deferred, fmt) for fmt in ("stored", "q8_0") for prefetch in (1, 2)
                for deferred in (False, True))


@dataclass(frozen=True)
class Outcome:
    kind: str  # one of KINDS
    site: str  # where the interrupt was raised
    detail: str = ""


@dataclass
class Sweep:
    """Outcomes of one sweep, in injection-point order."""

    name: str
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def counts(self) -> Counter:
        return Counter(o.kind for o in self.outcomes)

    def failures(self, limit: int = 10) -> list[str]:
        bad = [o for o in self.outcomes if o.kind != "ok"]
        return [f"{o.kind} at {o.site}: {o.detail}" for o in bad[:limit]]


class Injector:
    """Raises `Injected` at the `target`-th injection point of the code run inside `with` (0: never; then
    `points` counts them all)."""

    def __init__(self, target: int, every: str = "line"):
        if every not in ("line", "site"):
            raise ValueError(f"every must be 'line' or 'site', got {every!r}")
        self.target = target
        self.every = every
        self.points = 0
        self.fired_at: str | None = None
        self._seen: set = set()

    def __enter__(self) -> Injector:
        sys.settrace(self._call)
        return self

    def __exit__(self, *exc) -> None:
        sys.settrace(None)

    def _call(self, frame, event, arg):
        code = frame.f_code
        if code.co_filename in INSTRUMENTED and not code.co_name.startswith("<"):
            return self._line
        return None

    def _line(self, frame, event, arg):
        if event != "line":
            return self._line
        if self.every == "site":
            site = _site(frame)
            if site in self._seen:
                return self._line
            self._seen.add(site)
        self.points += 1
        if self.points == self.target:
            self.fired_at = _site(frame)
            raise Injected(f"injected at {self.fired_at}")  # CPython drops the trace function here
        return self._line


def _site(frame) -> str:
    chain = []
    caller = frame.f_back
    while caller is not None:
        if caller.f_code.co_filename in INSTRUMENTED:
            chain.append(caller.f_code.co_name)
        caller = caller.f_back
    where = f"{frame.f_code.co_name}:{frame.f_lineno}"
    return " <- ".join([where, *chain])


@contextlib.contextmanager
def one_thread():
    """Tiny matmuls on a busy 2-core machine: torch's thread pool makes each forward 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _Subject:
    """The model's inputs, the resident model's outputs and the plan, made once per process and stream format.

    In a stream format the reference is the resident model with the format's values (each encoded weight replaced
    by decode(encode(w)), tests/stream_reference.py): streaming must add nothing to what the format changed. The model
    is built in memory, so close() gives those values back, and a float32 model encoded again keeps them.
    """

    def __init__(self, stream_format: str = "stored"):
        generator = torch.Generator().manual_seed(3)
        self.calls = [(torch.randn(2, 16, 8, generator=generator), torch.tensor([900.0 - 200 * i, 50.0 + i]),
                       i % 2 == 1) for i in range(4)]  # odd calls skip block 4 (a streamed block)
        self.stream_format = stream_format
        resident = make_quirky()
        self.plan = distorch.plan(resident, compute_device="cpu", memory=ROOMY, ledger=Ledger(),
                                  virtual_vram_gb=SHARE * distorch.discover(resident).block_bytes / GIB,
                                  stream_format=stream_format)
        assert 0 < len(self.plan.streamed) < len(self.plan.blocks), "the sweep needs streamed and resident blocks"
        if stream_format != "stored":
            assert any(b.decodes for b in self.plan.blocks), "the sweep needs encoded blocks"
            with_format_values(resident, self.plan.streamed, stream_format)
        self.expected = [resident(x, t, skip=skip) for x, t, skip in self.calls]
        self.weights = {name: t.detach().clone() for name, t in _tensors(resident)}
        self.spare: list = [resident]  # models a trial closed and checked restored: the next trials reuse them

    def model(self):
        return self.spare.pop() if self.spare else make_quirky()

    def done_with(self, model, outcome: Outcome | None) -> None:
        if outcome is None or outcome.kind == "ok":
            self.spare.append(model)


_SUBJECTS: dict[str, _Subject] = {}
_FORMAT = "stored"  # the stream format of the sweep running now (run_sweep sets it from its Config)


def subject() -> _Subject:
    if _FORMAT not in _SUBJECTS:
        _SUBJECTS[_FORMAT] = _Subject(_FORMAT)
    return _SUBJECTS[_FORMAT]


def forward_trial(config: Config, phase: str, target: int, every: str = "line") -> Outcome | None:
    """Interrupts the `phase` forward at injection point `target`; None once `target` is past the last point."""
    s = subject()
    model, ledger = s.model(), Ledger()
    streamer_ = _streamer(model, ledger, config, CpuCopyEngine(deferred=config.deferred)).open()
    first = 1 if phase == "warm" else 0
    for x, t, skip in s.calls[:first]:
        model(x, t, skip=skip)
    x, t, skip = s.calls[first]
    with Injector(target, every) as injector:
        try:
            model(x, t, skip=skip)
        except Injected:
            pass
    outcome = None
    if injector.fired_at is None:
        _closer(streamer_, ledger, model)()
    else:
        outcome = _after_interrupt(model, streamer_, _closer(streamer_, ledger, model), ledger, first + 1,
                                   injector.fired_at)
    s.done_with(model, outcome)
    return outcome


def open_trial(config: Config, way: str, target: int, every: str = "line") -> Outcome | None:
    """Interrupts `open()` (or `distorch.stream`) at injection point `target` (`every="progress"`: the progress
    callback raises at its `target`-th call); None once `target` is past the last point."""
    s = subject()
    model, ledger = s.model(), Ledger()
    engine_ = CpuCopyEngine(deferred=config.deferred)
    calls = 0

    def progress(done: int, total: int) -> None:
        nonlocal calls
        calls += 1
        if calls == target:
            raise Injected(f"progress callback, call {calls}")

    streamer_ = _streamer(model, ledger, config, engine_) if way == "open" else None
    kept = None  # the exception, alive as a REPL's sys.last_value keeps it: no hook may outlive it
    with Injector(0 if every == "progress" else target, "line" if every == "progress" else every) as injector:
        try:
            if way == "stream":
                handle = distorch.stream(model, s.plan, prefetch=config.prefetch, engine=engine_, ledger=ledger)
            else:
                streamer_.open(progress=progress if every == "progress" else None)
        except Injected as error:
            kept = error
    site = injector.fired_at or (f"progress call {target}" if kept is not None else None)
    if kept is None:
        if way == "stream":
            handle.close()
        else:
            _closer(streamer_, ledger, model)()
        s.done_with(model, None)
        return None
    if _hooks_left(model, host_too=False):
        return Outcome("leftover", site, f"hooks left on {_hooks_left(model, host_too=False)[:3]} after the failed "
                                         "open")
    try:
        if way == "stream":
            handle = distorch.stream(model, s.plan, prefetch=config.prefetch,
                                     engine=CpuCopyEngine(deferred=config.deferred), ledger=ledger)
            streamer_, close = handle.streamer, handle.close
        else:
            close = _closer(streamer_.open(), ledger, model)
    except Exception as error:  # noqa: BLE001  (any failure of the second open is the finding)
        return Outcome("stuck", site, f"second open raised {type(error).__name__}: {error}")
    outcome = _after_interrupt(model, streamer_, close, ledger, 0, site)
    del kept
    s.done_with(model, outcome)
    return outcome


def close_trial(config: Config, mode: str, target: int, every: str = "line") -> Outcome | None:
    """Interrupts `close()` (`mode` "close": unstaging, as distorch.stream's handle; "unload": keeping the staged
    buffers, as ComfyUI's unload) after a forward; then a forward must still be right, and close() again, a new
    open() and the checks of a forward trial must work. None once `target` is past the last point."""
    s = subject()
    model, ledger = s.model(), Ledger()
    streamer_ = _streamer(model, ledger, config, CpuCopyEngine(deferred=config.deferred)).open()
    x, t, skip = s.calls[0]
    model(x, t, skip=skip)
    with Injector(target, every) as injector:
        try:
            streamer_.close(unstage=mode == "close")
        except Injected:
            pass
    if injector.fired_at is None:
        _closer(streamer_, ledger, model)()
        s.done_with(model, None)
        return None
    site = injector.fired_at
    x, t, skip = s.calls[1]
    try:
        got = model(x, t, skip=skip)
        streamer_.close(unstage=mode == "close")
        close = _closer(streamer_.open(), ledger, model)
    except Exception as error:  # noqa: BLE001
        return Outcome("stuck", site, f"forward, close() or open() after it raised {type(error).__name__}: {error}")
    if not torch.equal(got, s.expected[1]):
        return Outcome("wrong", site, "the forward after the interrupted close() differs")
    outcome = _after_interrupt(model, streamer_, close, ledger, 2, site)
    s.done_with(model, outcome)
    return outcome


def _streamer(model, ledger: Ledger, config: Config, engine_) -> streamer.BlockStreamer:
    s = subject()
    blocks = [b for b in distorch.discover(model).blocks if b.name in s.plan.streamed]
    fmt = StreamFormat.parse(s.plan.stream_format)
    storage = {b.name: streamer.StoragePlacement(b.device, b.pinned, b.disk, fmt if b.decodes else StreamFormat.STORED)
               for b in s.plan.blocks if b.streamed}
    account = ledger.reserve(model, s.plan.holding())
    return streamer.BlockStreamer(model, blocks, storage, "cpu", prefetch=config.prefetch, engine=engine_,
                                  account=account)


def _closer(streamer_: streamer.BlockStreamer, ledger: Ledger, model):
    def close():  # what the streamer's owner does: close, then give the ledger entry back
        streamer_.close()
        ledger.release(model)
    return close


def _after_interrupt(model, streamer_: streamer.BlockStreamer, close, ledger: Ledger, next_call: int,
                     site: str) -> Outcome:
    s = subject()
    for index in (next_call, next_call + 1):
        x, t, skip = s.calls[index]
        try:
            got = model(x, t, skip=skip)
        except Exception as error:  # noqa: BLE001
            return Outcome("stuck", site, f"forward {index} raised {type(error).__name__}: {error}")
        if not torch.equal(got, s.expected[index]):
            return Outcome("wrong", site, f"forward {index} differs by {(got - s.expected[index]).abs().max():.3g}")
    if not _views_host_buffers(streamer_):
        return Outcome("wrong", site, "between forwards a streamed block's weights do not view its host buffer "
                                      "(they show whatever the slot holds next, also after close())")
    state = _recovered(streamer_, ledger)
    if state:
        return Outcome("degraded", site, state)
    try:
        close()
    except Exception as error:  # noqa: BLE001
        return Outcome("stuck", site, f"close() raised {type(error).__name__}: {error}")
    hooks = _hooks_left(model)
    if hooks:
        return Outcome("leftover", site, f"hooks left on {hooks[:3]} after close()")
    changed = [name for name, t in _tensors(model) if t.device.type != "cpu" or not torch.equal(t, s.weights[name])]
    if changed:
        return Outcome("leftover", site, f"weights not restored after close(): {changed[:3]}")
    if ledger.holdings():
        return Outcome("leftover", site, "the ledger entry stayed after close()")
    return Outcome("ok", site)


def _views_host_buffers(streamer_: streamer.BlockStreamer) -> bool:
    for block in streamer_._blocks:
        tensors = [tensor for tensors in block.tensors for tensor in tensors]
        if len(tensors) != len(block.host_views) or any(
                t.data_ptr() != view.data_ptr() for t, view in zip(tensors, block.host_views)):
            return False
    return True


def _recovered(streamer_: streamer.BlockStreamer, ledger: Ledger) -> str:
    """What is still off once the forwards after the interrupt are done ("" when nothing)."""
    if any(p.depth or p.frame is not None for p in streamer_._passes):
        return "a pass is still marked running: nothing is prefetched for it any more"
    if any(slot.readers for slot in streamer_._slots):
        return "a slot still has a reader: it is lost to prefetching"
    if not all(holding.staged for holding in ledger.holdings()):
        return "the ledger entry does not say staged: other plans count its RAM twice"
    return ""


def _tensors(model) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer, tied ones under each name, non-persistent buffers too."""
    return list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))


def _hooks_left(model, host_too: bool = True) -> list[str]:
    """Modules with a hook; with `host_too=False` not counting the hooks of a staged encoded block that decode it on the
    host while the streamer is closed (they stay from staging until the block is unstaged, by design)."""
    return [name or "<model>" for name, module in model.named_modules()
            if any(host_too or not _is_host_hook(hook)
                   for hook in (*module._forward_pre_hooks.values(), *module._forward_hooks.values()))]


def _is_host_hook(hook) -> bool:
    return getattr(hook, "func", None) in (streamer._host_pre_hook, streamer._host_post_hook)


def run_sweep(trial, config: Config, mode: str, every: str, until_failure: bool = False) -> Sweep:
    """Every injection point in turn, `trial(config, mode, target, every)` each (with `until_failure`, up to the
    first outcome that is not "ok")."""
    global _FORMAT
    sweep = Sweep(f"{mode} {every}s, {config}")
    _FORMAT = config.stream_format
    with one_thread(), warnings.catch_warnings():
        # torch's note that an always_call hook raised while another error unwound: the outcome says it all
        warnings.filterwarnings("ignore", message="module forward hook with ``always_call=True`` raised")
        target = 1
        while True:
            outcome = trial(config, mode, target, every)
            if outcome is None:
                break
            sweep.outcomes.append(outcome)
            if until_failure and outcome.kind != "ok":
                break
            target += 1
    return sweep
