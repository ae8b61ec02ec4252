"""Copy engines: the streams and events the streamer orders its copies with.

The streamer speaks to one small interface: `copy` (enqueue on the copy stream after an event,
then record an event), `compute_wait` / `compute_record` (on the compute stream), `mark_reading`,
`poison` and `synchronize`. `CudaCopyEngine` maps it onto a side CUDA stream; `CpuCopyEngine` runs
the same protocol between CPU buffers so CI exercises the streamer without a GPU. It models both
streams lagging the host, as on a GPU: the kernels of a forward count as running until a wait
orders something after them, so a copy that skips the wait on a slot's `free` event, or a forward
that skips the wait on its `ready` event, raises instead of passing by luck.

A copy's source is a tensor, or a host read (`files.FileRead`: a disk-tier block read from its model file
through a descriptor). The host performs the read where the engine says: straight into the slot on the CPU,
into a page-locked bounce buffer on a GPU, whose copy into the slot is then ordered like any other.
"""

from collections import deque
from dataclasses import dataclass, field

import torch

from .hostbuf import FlatBuffer

POISON_BYTE = 0xFF  # all-ones bytes read as NaN in fp32/fp16/bf16 and in GGUF block scales


class CudaCopyEngine:
    """Copies on one side stream of the compute device; ordering is done with events on the GPU."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.copy_stream = torch.cuda.Stream(self.device)
        self._donor_streams: dict[torch.device, torch.cuda.Stream] = {}
        self._bounce: FlatBuffer | None = None  # page-locked host buffer host reads land in (disk tier), a slot's size
        self._bounce_free = torch.cuda.Event()  # recorded on the copy stream after the latest copy out of `_bounce`

    def new_event(self) -> torch.cuda.Event:
        return torch.cuda.Event()

    def copy(self, dst: torch.Tensor, src, *, after: torch.cuda.Event, ready: torch.cuda.Event) -> None:
        if not isinstance(src, torch.Tensor):
            self._read(dst, src, after=after, ready=ready)
            return
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

    def _read(self, dst: torch.Tensor, src, *, after: torch.cuda.Event, ready: torch.cuda.Event) -> None:
        """The host reads `src` into the bounce buffer; the copy stream moves it into the slot after `after`."""
        bounce = self._bounce_for(dst)[:src.nbytes]
        # The host overwrites the bounce buffer: the copy that last read it must have landed, or that copy would
        # move part of this block into the other slot. The streaming loop's only host wait, on the disk tier only.
        self._bounce_free.synchronize()
        src.read_into(bounce)  # raises, with nothing enqueued, when the file changed
        with torch.cuda.stream(self.copy_stream):
            # As for every copy: the slot may still be read by queued kernels of its previous block.
            self.copy_stream.wait_event(after)
            dst.copy_(bounce, non_blocking=True)
            ready.record(self.copy_stream)
            self._bounce_free.record(self.copy_stream)

    def _bounce_for(self, dst: torch.Tensor) -> torch.Tensor:
        size = dst.untyped_storage().nbytes()  # the whole slot: every block fits
        if self._bounce is None or self._bounce.nbytes < size:
            self._drop_bounce()
            self._bounce = FlatBuffer(size, "cpu", pin=True)
        return self._bounce.tensor

    def _drop_bounce(self) -> None:
        if self._bounce is not None:
            self._bounce_free.synchronize()  # never unpin memory a copy may still read
            self._bounce.release()
            self._bounce = None

    def compute_wait(self, event: torch.cuda.Event) -> None:
        torch.cuda.current_stream(self.device).wait_event(event)

    def compute_record(self, event: torch.cuda.Event) -> None:
        event.record(torch.cuda.current_stream(self.device))

    def poison(self, buffer: torch.Tensor) -> None:
        buffer.fill_(POISON_BYTE)  # on the compute stream, after the kernels that read the slot

    def mark_reading(self, buffer: torch.Tensor, delta: int) -> None:
        """Bookkeeping hook of the CPU engine's overwrite check; the GPU orders this with events."""

    def synchronize(self) -> None:
        """Teardown only: waits for every copy and for the compute kernels that may still read a slot, and frees the
        bounce buffer."""
        self.copy_stream.synchronize()
        for stream in self._donor_streams.values():
            stream.synchronize()
        torch.cuda.synchronize(self.device)
        self._drop_bounce()

    def _donor_stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._donor_streams:
            self._donor_streams[device] = torch.cuda.Stream(device)
        return self._donor_streams[device]


@dataclass(eq=False)
class _CpuMark:
    """A point in one of the CPU engine's streams; `done` once that stream has run past it."""

    done: bool = False


@dataclass(eq=False)
class CpuEvent:
    """A CUDA-like event: a wait covers its latest record (and, streams being FIFO, all work before it)."""

    latest: _CpuMark | None = None


@dataclass(eq=False)
class _CpuCopy:
    dst: torch.Tensor
    src: torch.Tensor
    after: _CpuMark | None  # the `after` event's latest record when the copy was issued: the wait covers only it
    landed: _CpuMark = field(default_factory=_CpuMark)  # done once the copy ran (what its `ready` event records)


@dataclass(eq=False)
class _CpuRead:
    """Compute work reading a byte range: from the forward's start until the first compute record issued after
    its end is done."""

    start: int
    end: int
    ended: bool = False  # the host issued the forward's last kernel
    until: _CpuMark | None = None  # that first record after the end; None until it is issued


@dataclass(eq=False)
class CpuCopyEngine:
    """The streamer's copy protocol between CPU buffers, with both streams lagging the host.

    The CPU computes synchronously, but the engine keeps the GPU's timing model: a compute record
    (a slot's `free` event) is queued and completes only when something waits for it (a copy
    ordered after it, or `synchronize`), so the kernels that read a slot count as still running
    until then. A copy that lands in such a slot without waiting for its `free` event raises, as
    does a forward that starts reading a slot whose copy is still queued (no wait on `ready`).
    Copies go into a FIFO "copy stream": eagerly they run when issued, deferred they run only when
    something waits for their `ready` event (or on `synchronize`), so a missing wait also leaves
    the slot's poisoned bytes in place.

    An interrupt may cut any method, as it may cut the streamer between two CUDA calls: what it leaves is
    what a GPU would hold after part of the calls (a copy queued but its event not recorded; a record
    queued but not yet the event's latest), and the steps that run queued work can simply run again.
    """

    deferred: bool = False
    _copies: deque = field(default_factory=deque)  # copy stream: issued, not yet run
    _compute: deque = field(default_factory=deque)  # compute stream: records issued, not yet done
    _reads: list = field(default_factory=list)  # _CpuRead of slot buffers by compute work not yet done

    device = torch.device("cpu")

    def new_event(self) -> CpuEvent:
        return CpuEvent()

    def copy(self, dst: torch.Tensor, src, *, after: CpuEvent, ready: CpuEvent) -> None:
        if not isinstance(src, torch.Tensor):
            self._read(dst, src, after=after, ready=ready)
            return
        op = _CpuCopy(dst, src, after.latest)
        self._copies.append(op)
        ready.latest = op.landed
        if not self.deferred:
            self._run_copies()

    def _read(self, dst: torch.Tensor, src, *, after: CpuEvent, ready: CpuEvent) -> None:
        """A host read straight into the slot: the host itself waits for what a copy would wait for."""
        self._run_copies()  # it joins the copy stream behind the copies issued before it
        # The slot's free event: the compute work still reading the slot completes first (the write-after-read
        # guard of every copy; a read that skips it is refused by the overwrite check below).
        mark = after.latest
        while mark is not None and not mark.done:
            self._complete_next_compute()
        self._check_no_reader(dst)
        src.read_into(dst)  # raises when the file changed; the event then orders nothing new
        ready.latest = _CpuMark(done=True)

    def compute_wait(self, event: CpuEvent) -> None:
        mark = event.latest
        while mark is not None and not mark.done:
            if self._copies:
                self._run_next_copy()
            else:
                self._complete_next_compute()

    def compute_record(self, event: CpuEvent) -> None:
        mark = _CpuMark()
        self._compute.append(mark)
        for read in self._reads:
            if read.ended and read.until is None:
                read.until = mark
        event.latest = mark

    def poison(self, buffer: torch.Tensor) -> None:
        buffer.fill_(POISON_BYTE)

    def synchronize(self) -> None:
        self._run_copies()
        while self._compute:
            self._complete_next_compute()
        self._reads = [r for r in self._reads if not r.ended]

    def mark_reading(self, buffer: torch.Tensor, delta: int) -> None:
        """The streamer reports a forward starting (+1) or ending (-1) on a slot buffer.

        The end is where the host stops issuing kernels; on the compute stream the read lasts until
        the next compute record completes.
        """
        start, end = _byte_range(buffer)
        if delta > 0:
            if any(_overlaps(start, end, *_byte_range(op.dst)) for op in self._copies if not op.landed.done):
                raise RuntimeError("distorch: a forward read a slot before its copy landed (no wait on the slot's "
                                   "ready event)")
            self._reads.append(_CpuRead(start, end))
            return
        running = [r for r in self._reads if not r.ended and (r.start, r.end) == (start, end)]
        if running:
            running[-1].ended = True

    def _run_copies(self) -> None:
        while self._copies:
            self._run_next_copy()

    def _run_next_copy(self) -> None:
        op = self._copies[0]
        if not op.landed.done:
            # The copy stream waits for `after`: the compute stream runs on until it is recorded.
            while op.after is not None and not op.after.done:
                self._complete_next_compute()
            self._check_no_reader(op.dst)
            op.dst.copy_(op.src)
            op.landed.done = True
        self._copies.popleft()

    def _complete_next_compute(self) -> None:
        if not self._compute:
            raise RuntimeError("distorch: deadlock, waiting for an event that no stream will record")
        self._compute[0].done = True
        self._compute.popleft()
        self._reads = [r for r in self._reads if r.until is None or not r.until.done]

    def _check_no_reader(self, dst: torch.Tensor) -> None:
        start, end = _byte_range(dst)
        for read in self._reads:
            if not _overlaps(start, end, read.start, read.end) or (read.until is not None and read.until.done):
                continue
            if not read.ended:
                raise RuntimeError("distorch: a copy overwrote a slot while a forward was reading it")
            raise RuntimeError("distorch: a copy overwrote a slot that queued compute work still reads (the copy "
                               "is not ordered after the slot's free event)")


def _byte_range(tensor: torch.Tensor) -> tuple[int, int]:
    start = tensor.data_ptr()
    return start, start + tensor.numel() * tensor.element_size()


def _overlaps(start: int, end: int, other_start: int, other_end: int) -> bool:
    return start < other_end and other_start < end
