"""Copy engines: the streams and events the streamer orders its copies with.

The streamer speaks to one small interface: `copy` (enqueue on the copy stream after an event,
then record an event), `compute_wait` / `compute_record` (on the compute stream), `poison` and
`synchronize`. `CudaCopyEngine` maps it onto a side CUDA stream; `CpuCopyEngine` runs the same
protocol between CPU buffers so CI exercises the streamer without a GPU. In deferred mode it runs
each copy only when a consumer waits for it, so a missing wait leaves the slot's old (poisoned)
bytes in place and shows up as a wrong output instead of passing by luck.
"""

from collections import deque
from dataclasses import dataclass, field

import torch

POISON_BYTE = 0xFF  # all-ones bytes read as NaN in fp32/fp16/bf16 and in GGUF block scales


class CudaCopyEngine:
    """Copies on one side stream of the compute device; ordering is done with events on the GPU."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.copy_stream = torch.cuda.Stream(self.device)
        self._donor_streams: dict[torch.device, torch.cuda.Stream] = {}

    def new_event(self) -> torch.cuda.Event:
        return torch.cuda.Event()

    def copy(self, dst: torch.Tensor, src: torch.Tensor, *, after: torch.cuda.Event, ready: torch.cuda.Event) -> None:
        with torch.cuda.stream(self.copy_stream):
            # Write-after-read guard: the slot may still be read by kernels queued on the compute stream
            # for its previous block; without this wait the copy would overwrite weights in use.
            self.copy_stream.wait_event(after)
            if src.device.type == "cuda" and src.device != self.device:
                # GPU->GPU copies run on the source device's current stream; give it a side stream too so
                # they never queue behind (or block) work on the donor's default stream.
                with torch.cuda.stream(self._donor_stream(src.device)):
                    dst.copy_(src, non_blocking=True)
            else:
                dst.copy_(src, non_blocking=True)
            # Consumers wait for this event, never for the host: no synchronisation in steady state.
            ready.record(self.copy_stream)

    def compute_wait(self, event: torch.cuda.Event) -> None:
        torch.cuda.current_stream(self.device).wait_event(event)

    def compute_record(self, event: torch.cuda.Event) -> None:
        event.record(torch.cuda.current_stream(self.device))

    def poison(self, buffer: torch.Tensor) -> None:
        buffer.fill_(POISON_BYTE)  # on the compute stream, after the kernels that read the slot

    def mark_reading(self, buffer: torch.Tensor, delta: int) -> None:
        """Bookkeeping hook of the CPU engine's overwrite check; the GPU orders this with events."""

    def synchronize(self) -> None:
        """Teardown only: waits for every copy and for the compute kernels that may still read a slot."""
        self.copy_stream.synchronize()
        for stream in self._donor_streams.values():
            stream.synchronize()
        torch.cuda.synchronize(self.device)

    def _donor_stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._donor_streams:
            self._donor_streams[device] = torch.cuda.Stream(device)
        return self._donor_streams[device]


@dataclass(eq=False)
class CpuEvent:
    """A CUDA-like event: a wait covers the records enqueued before it."""

    enqueued: int = 0  # records issued (copy records are queued, compute records complete at once)
    completed: int = 0  # records that have run


@dataclass(eq=False)
class _CpuCopy:
    dst: torch.Tensor
    src: torch.Tensor
    after: CpuEvent
    after_target: int
    ready: CpuEvent


@dataclass(eq=False)
class CpuCopyEngine:
    """The streamer's copy protocol between CPU buffers, with an optional deferred copy queue.

    Compute on the CPU is synchronous, so compute records complete immediately. Copies go into a
    FIFO "copy stream": eagerly they run as soon as their `after` event allows, deferred they run
    only when something waits for their `ready` event (or on `synchronize`). The engine also checks
    that no copy lands in a buffer that a running forward is reading.
    """

    deferred: bool = False
    _queue: deque = field(default_factory=deque)
    _in_use: dict = field(default_factory=dict)  # data_ptr of a slot buffer -> forwards reading it

    device = torch.device("cpu")

    def new_event(self) -> CpuEvent:
        return CpuEvent()

    def copy(self, dst: torch.Tensor, src: torch.Tensor, *, after: CpuEvent, ready: CpuEvent) -> None:
        ready.enqueued += 1
        self._queue.append(_CpuCopy(dst, src, after, after.enqueued, ready))
        if not self.deferred:
            self._run_queue()

    def compute_wait(self, event: CpuEvent) -> None:
        target = event.enqueued
        while event.completed < target:
            if not self._queue or not self._run_next():
                raise RuntimeError("distorch: deadlock, waiting for a copy that waits for compute not yet issued")

    def compute_record(self, event: CpuEvent) -> None:
        event.enqueued += 1
        event.completed = event.enqueued
        if not self.deferred:
            self._run_queue()

    def poison(self, buffer: torch.Tensor) -> None:
        buffer.fill_(POISON_BYTE)

    def synchronize(self) -> None:
        self._run_queue()
        if self._queue:
            raise RuntimeError("distorch: copies left waiting for compute that was never recorded")

    def mark_reading(self, buffer: torch.Tensor, delta: int) -> None:
        """The streamer reports forwards starting (+1) and ending (-1) on a slot buffer."""
        key = buffer.data_ptr()
        self._in_use[key] = self._in_use.get(key, 0) + delta

    def _run_queue(self) -> None:
        while self._queue and self._run_next():
            pass

    def _run_next(self) -> bool:
        op = self._queue[0]
        if op.after.completed < op.after_target:
            return False
        if self._in_use.get(op.dst.data_ptr(), 0) > 0:
            raise RuntimeError("distorch: a copy overwrote a slot while a forward was reading it")
        self._queue.popleft()
        op.dst.copy_(op.src)
        op.ready.completed += 1
        return True
