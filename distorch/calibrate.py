"""Times a run's first passes for the cost model: each block's forward and each streamed block's copy.

On CUDA, timing events are recorded on the compute stream around every block's forward (after the streamer's wait
for the block's copy, so the time excludes the wait) and on the copy stream around every copy (after the copy's
wait for its slot, so the time is the transfer alone). Nothing waits for them while the run goes on: `timings()`
reads them afterwards (the node pack asks at the model's next load, between runs). On the CPU a clock is read
instead (injectable, so tests give exact times). The first pass is not measured: it includes one-time work
(kernel selection, allocator growth).

A `RunTimer` holds no reference to the model: its hooks reach it through a weakref, and it keeps the streamer's
engine only while attached.
"""

import functools
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .costmodel import Timings

MEASURED_PASSES = 3


@dataclass
class _Span:
    """One timed interval: events on a CUDA stream, or clock readings on the CPU."""

    start: object
    end: object = None


@dataclass
class _Record:
    forwards: dict = field(default_factory=dict)  # block index -> list of _Span
    copies: list = field(default_factory=list)  # (tier, bytes, _Span)


class RunTimer:
    """Measures `passes` passes (after the first) of a model's blocks and its streamer's copies.

    Args:
        blocks: the block modules in execution order (all of them, resident and streamed).
        device: the compute device (CUDA: events; CPU: `clock`).
        streamer: the model's streamer, whose copy engine is wrapped while attached (None: nothing streams).
        activation_bytes: ComfyUI's activation estimate of the run (stored with the timings, to scale them).
        clock: seconds, for CPU timing (default `time.perf_counter`).
    """

    def __init__(self, blocks: Sequence[nn.Module], device: torch.device, streamer=None, *, activation_bytes: int = 0,
                 passes: int = MEASURED_PASSES, clock: Callable[[], float] | None = None):
        self.device = torch.device(device)
        self.passes = passes
        self.activation_bytes = activation_bytes
        self._clock = clock or time.perf_counter
        self._cuda = self.device.type == "cuda"
        self._blocks = [weakref.ref(b) for b in blocks]
        self._streamer = weakref.ref(streamer) if streamer is not None else None
        self._engine = None  # the streamer's own engine while ours wraps it
        self._handles: list = []
        self._pass = -1  # passes started (block 0's forwards); 0 is the warm-up pass
        self._open: dict[int, _Span] = {}  # block index -> its running forward's span
        self._record = _Record()

    @property
    def recording(self) -> bool:
        return 1 <= self._pass <= self.passes

    @property
    def done(self) -> bool:
        return self._pass > self.passes

    def attach(self) -> "RunTimer":
        for index, ref in enumerate(self._blocks):
            module = ref()
            if module is None:
                continue
            me = weakref.ref(self)
            # The start after the streamer's pre-hook (its wait for the block's copy), the end before its post-hook
            # (which issues the next copies): the forward alone, on an engine that copies synchronously too.
            self._handles.append(module.register_forward_pre_hook(functools.partial(_before, me, index)))
            self._handles.append(module.register_forward_hook(functools.partial(_after, me, index), prepend=True,
                                                              always_call=True))
        streamer = self._streamer() if self._streamer is not None else None
        if streamer is not None:
            self._engine = streamer.engine
            streamer.engine = _TimedEngine(self._engine, weakref.ref(self))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        streamer = self._streamer() if self._streamer is not None else None
        if streamer is not None and self._engine is not None and isinstance(streamer.engine, _TimedEngine):
            streamer.engine = self._engine
        self._engine = None

    def timings(self) -> Timings | None:
        """What the measured passes took (None until at least one pass was measured). Waits for the recorded CUDA
        events: call it after the run, not during one."""
        measured = min(self._pass, self.passes) if self._pass > 0 else 0
        if measured < 1 or not self._record.forwards:
            return None
        compute = []
        for index in range(len(self._blocks)):
            spans = [s for s in self._record.forwards.get(index, []) if s.end is not None]
            compute.append(sum(self._seconds(s) for s in spans) / len(spans) if spans else 0.0)
        moved: dict[str, list[float]] = {}
        for tier, nbytes, span in self._record.copies:
            if span.end is not None:
                totals = moved.setdefault(tier, [0.0, 0.0])
                totals[0] += nbytes
                totals[1] += self._seconds(span)
        rates = {tier: nbytes / seconds for tier, (nbytes, seconds) in moved.items() if seconds > 0}
        return Timings(tuple(compute), rates, self.activation_bytes, measured)

    # -- recording ---------------------------------------------------------------------------------------------------

    def _mark(self):
        if not self._cuda:
            return self._clock()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def _seconds(self, span: _Span) -> float:
        if not self._cuda:
            return max(0.0, span.end - span.start)
        span.end.synchronize()
        return span.start.elapsed_time(span.end) / 1000.0

    def _before(self, index: int) -> None:
        if index == 0:
            self._pass += 1
        if self.recording:
            self._open[index] = _Span(self._mark())

    def _after(self, index: int) -> None:
        span = self._open.pop(index, None)
        if span is not None and self.recording:
            span.end = self._mark()
            self._record.forwards.setdefault(index, []).append(span)

    def _copied(self, tier: str, nbytes: int, span: _Span) -> None:
        self._record.copies.append((tier, nbytes, span))


class _TimedEngine:
    """The streamer's copy engine with each copy timed while its timer records; everything else passes through."""

    def __init__(self, inner, timer: weakref.ref):
        self._inner = inner
        self._timer = timer

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, *, after, ready) -> None:
        timer = self._timer()
        if timer is None or not timer.recording:
            self._inner.copy(dst, src, after=after, ready=ready)
            return
        stream = getattr(self._inner, "copy_stream", None)
        if stream is None:  # the CPU engine: copies run when issued (or when waited for, deferred)
            start = timer._clock()
            self._inner.copy(dst, src, after=after, ready=ready)
            timer._copied(_tier(src), dst.numel() * dst.element_size(), _Span(start, timer._clock()))
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            # Timed from when the slot is free (the copy's own wait), so the time is the transfer alone.
            stream.wait_event(after)
            start.record(stream)
        self._inner.copy(dst, src, after=after, ready=ready)
        end.record(stream)
        timer._copied(_tier(src), dst.numel() * dst.element_size(), _Span(start, end))


def _tier(source: torch.Tensor) -> str:
    if source.device.type == "cuda":
        return "donor_gpu"
    return "pinned_ram" if source.is_pinned() else "pageable_ram"


# Hook bodies at module level: a closure over the timer would keep it alive from the model's modules.

@torch.compiler.disable
def _before(timer: weakref.ref, index: int, module, args) -> None:
    live = timer()
    if live is not None:
        live._before(index)


@torch.compiler.disable
def _after(timer: weakref.ref, index: int, module, args, output) -> None:
    live = timer()
    if live is not None:
        live._after(index)
