"""The block streamer: copies each streamed block into a compute-device slot just before its forward.

Per streamed block, one flat buffer on its storage device (pinned or pageable RAM, or a donor GPU)
holds all its weights. Staging copies the block into it and re-points the block's parameters and
buffers there, block by block: nothing of ours keeps the original memory, so it is freed as each block
is staged and a streamed byte lives in one place (peak: the model plus one block). A block on the disk
tier is not copied at all: it stays in the model file, and each load reads it into its slot through a
descriptor of that file, never through the mapping, so a file changed under the model raises
`ModelFileChanged` instead of a SIGBUS or new weights (files.py). Staging reads a file-backed block the same way.
The streamer holds no reference to the model: hooks reach it through a weakref, so dropping the model
frees the streamer and its pinned memory without waiting for the garbage collector.

A fixed number of slots (flat buffers on the compute device, each the size of the largest streamed
block) is allocated once. Per slot, two events carry the ordering:

    copy into slot s:   copy_stream waits slot.free   -> copy -> record slot.ready
    forward of block:   compute waits slot.ready      -> kernels -> record slot.free

so no copy overwrites a slot still read by queued kernels, and no kernel reads a slot before its
copy lands, without ever blocking the host. The execution order is learned per pass (a pass is one
forward of the module that owns the block lists) and the next `prefetch` streamed blocks are kept
loaded or loading, wrapping around into the next pass. A block called twice, skipped or out of
order is loaded synchronously on demand and counted; it is never computed on the wrong bytes.
Passes that alternate (CFG with skip-layer guidance) are predicted from the period of recent passes.

With a stream format (`StoragePlacement.format`, stream_format.py) a block is staged encoded: its host buffer, its
slot and its copy hold the smaller encoded bytes. Its pre-hook waits for the slot's copy, decodes the block on the
compute stream into the one decode buffer (the stored layout, every weight in its stored dtype), records the slot's
`free` event right after the decode, so the slot refills while the block runs, and points the block's tensors into
the decode buffer. What the decode buffer holds is tagged, set only once its decode is enqueued: a block called
again before another decode runs on its bytes without decoding twice, and no block runs on another's.

Between forwards an encoded weight has no stored bytes anywhere, so the model's tensor is a placeholder: its shape,
dtype and device over one NaN element (zero strides; its own storage, so nothing aliases). Shapes, dtypes,
`nbytes` and ComfyUI's size accounting are right, and moving the model to its own device is free; a value read
outside the block's forward (a saved state_dict, a model merge) reads NaN, never plausible weights. While the
streamer is closed and the block still staged (ComfyUI's unload, or a `close()` an interrupt cut short), a pair of
hooks installed with the staging decodes the block on its buffer's device for each call instead, so the model
still computes the same values. `close()` gives the stored weights back (`_StreamedBlock.unstage`).
"""

import functools
import logging
import sys
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .blocks import Block, TensorCluster, TensorView, cluster_tensors, device_name, live_bytes
from .engine import CpuCopyEngine, CudaCopyEngine
from .files import Backing, FileRead, FileReader, FileSpan, ModelFileChanged, ModelFileError, readable_span
from .hostbuf import FlatBuffer
from .ledger import Account
from .pages import MappingTable, release_file_pages, trim_heap
from .request import StreamFormat
from .stream_format import BlockCodec
from .units import GIB, align_up

logger = logging.getLogger("distorch.streamer")

_PROGRESS_MIN_BYTES = 1 * GIB  # show a terminal progress bar when staging at least this much

# progress(done_bytes, total_bytes) while blocks are staged; the node pack drives ComfyUI's progress bar with it.
StagingProgress = Callable[[int, int], None]


@dataclass
class StreamStats:
    """Counters since the streamer opened; `sync_loads` are the copies a forward had to wait for."""

    passes: int = 0
    copies: int = 0
    prefetches: int = 0
    sync_loads: int = 0
    hits: int = 0
    bytes_copied: int = 0
    mispredicted: int = 0
    unscheduled: int = 0
    decodes: int = 0  # encoded blocks decoded into the decode buffer (a block found there already is a hit)


@dataclass(frozen=True)
class StoragePlacement:
    """Where a streamed block's bytes live between forwards: a flat buffer on `device` (page-locked or not),
    or, with `disk`, the model file's mapping they already lie in; and in which stream format (a disk-tier block
    streams as stored)."""

    device: str
    pinned: bool = False
    disk: bool = False
    format: StreamFormat = StreamFormat.STORED


@dataclass(eq=False)
class _Slot:
    buffer: torch.Tensor  # flat uint8 on the compute device, as large as the largest streamed block
    ready: object  # event recorded on the copy stream after the latest copy into `buffer`
    free: object  # event recorded on the compute stream after the last forward that read `buffer`
    block: int | None = None  # streamed block whose copy into `buffer` is enqueued and `ready` recorded after it
    readers: list = field(default_factory=list)  # module-call frames of the forwards of `block` running on it
    last_used: int = 0  # tick of the last release, for least-recently-used replacement
    views: dict = field(default_factory=dict)  # block index -> its tensors as views of `buffer` (they go with it)

    @property
    def users(self) -> int:
        return len(self.readers)


@dataclass(eq=False)
class _DecodeBuffer:
    """Where encoded blocks are decoded for their forwards, on the compute device: written and read only on the
    compute stream, so the next decode is ordered after the kernels of the block before it without an event."""

    buffer: torch.Tensor  # flat uint8, the largest encoded block as stored
    block: int | None = None  # block whose decode into `buffer` is enqueued (None while one is written, or debug)
    readers: list = field(default_factory=list)  # module-call frames of the forwards of `block` running on it
    views: dict = field(default_factory=dict)  # block index -> its tensors as views of `buffer`


@dataclass(eq=False)
class _Pass:
    """The module whose forward is one pass over a group of blocks, and the order learned for it."""

    name: str
    module: weakref.ref  # the module (often the model itself): a weakref, so the streamer never keeps it alive
    schedule: list[int]  # streamed block calls predicted for the running (or next) pass
    seen: list[int] = field(default_factory=list)  # calls observed in the running pass
    history: deque = field(default_factory=lambda: deque(maxlen=8))  # call sequences of recent complete passes
    cursor: int = 0  # position in `schedule` of the next expected call
    depth: int = 0  # > 0 while the pass module's forward is running
    frame: object = None  # module-call frame of the outermost running forward (None when idle or unknown)


class _StreamedBlock:
    """One streamed block: where its bytes live between forwards, and the views of its tensors on each buffer.

    Owns its staging buffer (`buffer`): the block's tensors view it while staged (an encoded weight views a
    placeholder); `unstage` hands the weights back to the model (CPU weights as views of the unpinned buffer, others
    copied to their original device; encoded weights re-read from their model file, or decoded), and the buffer's
    memory is freed when the last view of it goes.
    """

    def __init__(self, index: int, block: Block, placement: StoragePlacement, module: nn.Module, files: FileReader):
        self.index = index
        self.name = block.name
        self.module = weakref.ref(module)  # the block's module; the model owns it
        self.placement = placement
        self.files = files  # the streamer's descriptors of the model files (it owns them)
        self.clusters = block.clusters
        self.offsets = _cluster_offsets(block.clusters)
        # The stored layout: what a slot holds of a block streamed as stored, and the decode buffer of an encoded one.
        self.stored_nbytes = align_up(self.offsets[-1] + block.clusters[-1].nbytes) if block.clusters else 0
        self.codec = _codec(block, placement, self.offsets)  # None: it streams as stored
        self.nbytes = self.codec.encoded_nbytes if self.codec is not None else self.stored_nbytes  # as it streams
        self.buffer: FlatBuffer | None = None  # the staging buffer (RAM or donor GPU), None on the disk tier
        self.homes: list[torch.Tensor] = []  # per cluster, its bytes between forwards (empty: not staged)
        self.spans: list[FileSpan] = []  # on the disk tier: per cluster, where its bytes lie in its model file
        self.tensors: list[list[torch.Tensor]] = []  # per cluster, the model's tensors of its views
        self.host_views: list[torch.Tensor] = []  # what the tensors view between forwards (placeholders if encoded)
        # Taken over from a streamer that stored it encoded in another tier: `stage` moves the bytes into this tier.
        self.misplaced = False
        self.host_readers: list = []  # module-call frames of forwards running on it decoded on the host (closed)

    @property
    def host(self) -> torch.Tensor | None:
        """The flat staging buffer, or None when unstaged or on the disk tier."""
        return self.buffer.tensor if self.buffer is not None else None

    @property
    def is_staged(self) -> bool:
        return bool(self.homes) or self.buffer is not None

    def stage(self, buffer: FlatBuffer, mappings: MappingTable) -> int:
        """Copies the block into `buffer` (encoding it in its stream format) and points its tensors there, releasing
        the originals. Bytes that lie in their model file are read through its descriptor; a changed file raises
        `ModelFileChanged` before anything points into the buffer (the block stays unstaged).

        Returns the bytes that came from ordinary RAM (now free for the heap to give back).
        """
        if self.misplaced:
            return self._move_encoded(buffer)
        self.tensors = self._resolve()
        flat, from_ram, file_ranges, read = buffer.tensor, 0, [], []
        for index, (cluster, tensors) in enumerate(zip(self.clusters, self.tensors)):
            source = live_bytes(cluster, tensors)
            span = readable_span(cluster.source, source.data_ptr(), mappings, self.files) \
                if source.device.type == "cpu" else None
            if span is not None:
                read.append(span.file)
            self._stage_cluster(index, flat, source, span)
            if source.device.type == "cpu":
                mapping = mappings.file_mapping(source.data_ptr(), cluster.nbytes)
                if mapping is None:
                    from_ram += cluster.nbytes
                else:
                    file_ranges.append((source.data_ptr(), cluster.nbytes, mapping))
            del source  # the last reference of ours to the original memory
        for file in dict.fromkeys(read):
            self.files.check(file)
        homes = [flat[start:start + nbytes] for start, nbytes in self._staged_ranges()]
        # One statement: an interrupt leaves the block unstaged (its tensors untouched) or staged with its views.
        self.buffer, self.homes, self.host_views = buffer, homes, self._views_on_homes(homes)
        self.point_to(self.host_views)  # the original storages lose the model's references here
        for address, nbytes, mapping in file_ranges:
            release_file_pages(address, nbytes, mapping)
        return from_ram

    def _stage_cluster(self, index: int, flat: torch.Tensor, source: torch.Tensor, span: FileSpan | None) -> None:
        """Writes cluster `index` into the staging buffer: as stored, or encoded (a file span read first, alone)."""
        if self.codec is not None and self.codec.codings[index].format is not StreamFormat.STORED:
            if span is not None:
                source = torch.empty(span.nbytes, dtype=torch.uint8)  # one tensor's stored bytes, freed after
                self.files.read(span, source)
            self.codec.encode_cluster(index, flat, source)
            return
        start, nbytes = self._staged_ranges()[index]
        destination = flat[start:start + nbytes]
        if span is None:
            destination.copy_(source)
        else:
            self.files.read(span, destination)

    def _move_encoded(self, buffer: FlatBuffer) -> int:
        """Moves the encoded bytes taken over from another tier's buffer into `buffer` (no decode: bit for bit)."""
        old = self.buffer
        buffer.tensor[:self.nbytes].copy_(old.tensor[:self.nbytes])
        homes = [buffer.tensor[start:start + nbytes] for start, nbytes in self._staged_ranges()]
        views = self._views_on_homes(homes)
        # One statement: an interrupt leaves the block in the old buffer (still staged there) or in the new one.
        self.buffer, self.homes, self.host_views, self.misplaced = buffer, homes, views, False
        self.point_to(self.host_views)
        old.release()
        return 0

    def stay_on_disk(self, mappings: MappingTable) -> None:
        """Leaves the block where it is, in its model file; each load reads it from there through the file's
        descriptor, opened (and checked to be the file discovered) now."""
        tensors = self._resolve()
        homes = [live_bytes(cluster, group) for cluster, group in zip(self.clusters, tensors)]
        spans = [readable_span(cluster.source, home.data_ptr(), mappings, self.files)
                 for cluster, home in zip(self.clusters, homes)]
        for cluster, span in zip(self.clusters, spans):
            if span is None and cluster.source is not None:
                raise ModelFileChanged(f"distorch: block {self.name!r} streams from the model file "
                                       f"{cluster.source.file.path!r}, which was deleted or replaced since the model "
                                       "was loaded; reload the model")
            if span is None:
                raise ValueError(f"distorch: block {self.name!r} is planned on the disk tier but its weights do not "
                                 "lie in a model file; plan it again")
        for file in dict.fromkeys(span.file for span in spans):
            self.files.check(file)
        # One statement: an interrupt leaves the block unstaged or staged with its views.
        self.tensors, self.homes, self.spans, self.host_views = tensors, homes, spans, self._views_on_homes(homes)

    def copies(self, slot: torch.Tensor) -> list[tuple[torch.Tensor, object]]:
        """(destination, source) pairs that load this block into `slot`: from the staging buffer, or on the disk
        tier a read of its clusters from the model file (`FileRead`, which the copy engine performs)."""
        if self.buffer is not None:
            return [(slot[:self.nbytes], self.buffer.tensor[:self.nbytes])]
        return [(slot[:self.nbytes], FileRead(self.files, tuple(zip(self.offsets, self.spans)), self.nbytes))]

    def views_on(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        """Its tensors as views of `buffer` holding the block as stored (a slot, or the decode buffer)."""
        return [
            view.rebuild_on(buffer, offset + view.offset)
            for cluster, offset in zip(self.clusters, self.offsets)
            for view in cluster.views
        ]

    def point_to(self, views: list[torch.Tensor]) -> None:
        for tensor, view in zip((t for tensors in self.tensors for t in tensors), views):
            tensor.data = view

    def unstage(self) -> None:
        """Gives the weights back to the model on the devices they came from: CPU weights keep their views of
        the (unpinned) buffer, others are copied back; disk-tier weights never left their file. Encoded weights come
        back as stored: re-read from the model file they were read from (the weights as loaded), else decoded (the
        stream format's values, in the stored dtype)."""
        if self.buffer is not None:
            self.buffer.release()
            homes = self._stored_homes() if self.codec is not None else self.homes
            for cluster, tensors, home in zip(self.clusters, self.tensors, homes):
                moved = torch.device(cluster.device) != home.device
                if moved:
                    home = home.to(cluster.device)
                if moved or self.codec is not None:
                    for view, tensor in zip(cluster.views, tensors):
                        tensor.data = view.rebuild_on(home, view.offset)
        # One statement: an interrupt leaves it staged (restored again by the next unstage) or unstaged, never a block
        # without a buffer whose views a close() would point its tensors back to.
        self.buffer, self.misplaced, self.homes, self.tensors, self.host_views, self.spans = None, False, [], [], [], []

    def take_over(self, other: "_StreamedBlock") -> None:
        """Adopts `other`'s staged bytes as they lie (the same block, stored alike): no copy, `other` keeps nothing.
        Encoded bytes of another tier are adopted too, `misplaced`: `stage` then moves them into this tier."""
        self.misplaced = other.placement != self.placement
        self.buffer, self.homes, self.spans = other.buffer, other.homes, other.spans
        self.tensors, self.host_views = other.tensors, other.host_views
        other.buffer, other.homes, other.tensors, other.host_views, other.spans = None, [], [], [], []

    def let_go(self) -> None:
        """Forgets the staged bytes without moving them: the model's tensors keep viewing them (unpinned now, freed
        with the last view), so whoever places the block next copies it from there. Encoded weights are pointed at
        their stored bytes first (as `unstage` gives them back, on the buffer's device)."""
        if self.buffer is not None and self.codec is not None:
            for cluster, tensors, home in zip(self.clusters, self.tensors, self._stored_homes()):
                for view, tensor in zip(cluster.views, tensors):
                    tensor.data = view.rebuild_on(home, view.offset)
        if self.buffer is not None:
            self.buffer.release()
        # One statement: an interrupt leaves it staged (restored again by the next unstage) or unstaged, never a block
        # without a buffer whose views a close() would point its tensors back to.
        self.buffer, self.misplaced, self.homes, self.tensors, self.host_views, self.spans = None, False, [], [], [], []

    def enter_on_host(self, frame) -> None:
        """A forward while the streamer is closed: the staged encoded block decoded on its buffer's device for it
        (the first forward of a nesting; readers whose frames are gone, cut by an interrupt, no longer count)."""
        if self.codec is None or self.buffer is None:
            return
        live = _stack_frame_ids()
        self.host_readers = [r for r in self.host_readers if _is_live(r, live)]
        if not self.host_readers:
            self.point_to(self.views_on(self._decoded_on_host()))
        self.host_readers.append(frame)

    def exit_on_host(self) -> None:
        if not self.host_readers:
            return
        self.host_readers.pop()
        if not self.host_readers and self.buffer is not None:
            self.point_to(self.host_views)  # the decoded bytes go with their last view

    def _decoded_on_host(self) -> torch.Tensor:
        stored = FlatBuffer(self.stored_nbytes, self.buffer.tensor.device).tensor
        self.codec.decode_into(self.buffer.tensor[:self.nbytes], stored)
        return stored

    def _resolve(self) -> list[list[torch.Tensor]]:
        module = self.module()
        if module is None:
            raise RuntimeError(f"distorch: block {self.name!r} is gone; the model was freed")
        return [cluster_tensors(module, cluster, prefix=f"{self.name}.") for cluster in self.clusters]

    def _staged_ranges(self) -> list[tuple[int, int]]:
        """(start, nbytes) of each cluster in the staging buffer: the stored layout, or the encoded one."""
        if self.codec is None:
            return [(offset, cluster.nbytes) for cluster, offset in zip(self.clusters, self.offsets)]
        return [(coding.encoded_offset, coding.encoded_nbytes) for coding in self.codec.codings]

    def _views_on_homes(self, homes: list[torch.Tensor]) -> list[torch.Tensor]:
        encoded = [self.codec is not None and c.format is not StreamFormat.STORED
                   for c in (self.codec.codings if self.codec is not None else self.clusters)]
        return [_placeholder(view, home.device) if is_encoded else view.rebuild_on(home, view.offset)
                for cluster, home, is_encoded in zip(self.clusters, homes, encoded) for view in cluster.views]

    def _stored_homes(self) -> list[torch.Tensor]:
        """Per cluster, its bytes as stored in a new buffer on the staging buffer's device: decoded from the encoded
        bytes, and those the model read from a file read from it again. A file changed since keeps the decoded
        values (with a warning): the stored bytes are gone, and giving the weights back must not fail."""
        encoded = self.buffer.tensor
        stored = FlatBuffer(self.stored_nbytes, encoded.device).tensor
        self.codec.decode_into(encoded[:self.nbytes], stored)
        rereads = [(c, coding) for c, coding in zip(self.clusters, self.codec.codings)
                   if coding.format is not StreamFormat.STORED and c.backing is Backing.FILE and c.source is not None]
        try:
            for cluster, coding in rereads:
                start = coding.stored_offset
                self.files.read(cluster.source, stored[start:start + coding.stored_nbytes])
            for file in dict.fromkeys(cluster.source.file for cluster, _ in rereads):
                self.files.check(file)
        except ModelFileError as error:
            logger.warning("%s; block %r gets its %s values back instead", error, self.name, self.codec.format.value)
            self.codec.decode_into(encoded[:self.nbytes], stored)
        return [stored[c.stored_offset:c.stored_offset + c.stored_nbytes] for c in self.codec.codings]


class BlockStreamer:
    """Streams a set of blocks of `model` through `prefetch` slots on `compute_device`.

    Use `open()` / `close()` (or `distorch.stream`, which also places the resident weights). The streamer
    keeps no reference to `model` (only weakrefs to its block modules), so the model can be freed while the
    streamer is attached to it; `account` is the model's ledger entry, marked staged with what was allocated.

    An interrupt (Ctrl+C, or ComfyUI's cancel raised from a hook or from `progress`) may land between any two
    steps of a hook, of `open()` or of `close()`. Every change of state is ordered so that each prefix of its
    steps is consistent: a slot says it holds a block only once the block's copy is enqueued and the slot's
    `ready` event recorded after it; a forward stays a reader of its slot until the block's weights point back
    to their host views and the slot's `free` event is recorded, and the interrupt recovery ends such a
    leftover reader by repeating those steps; `open()` takes back what it installed when it fails.
    """

    def __init__(self, model: nn.Module, blocks: Sequence[Block], storage: Mapping[str, StoragePlacement],
                 compute_device: str | torch.device, *, prefetch: int = 2, debug: bool = False, engine=None,
                 account: Account | None = None):
        if prefetch < 1:
            raise ValueError(f"prefetch must be at least 1, got {prefetch}")
        self.device = torch.device(compute_device)
        self.prefetch = prefetch
        self.debug = debug  # poison released slots so a missing wait reads NaN
        self.engine = engine or _default_engine(self.device)
        # Descriptors of the model files read from: open while disk-tier blocks stream from them (and while staging).
        self._files = FileReader()
        self._blocks = [_StreamedBlock(i, b, storage[b.name], model.get_submodule(b.name), self._files)
                        for i, b in enumerate(blocks)]
        self._passes = _make_passes(model, blocks)
        self._pass_of = {i: p for p in self._passes for i in p.schedule}
        self._account = account  # the model's ledger entry, or None
        self._slots: list[_Slot] = []  # the one record of which block each slot holds (`_slot_holding`)
        self._decode: _DecodeBuffer | None = None  # while open, when a block streams encoded
        self._current: _Pass | None = None  # pass whose schedule predicts the next calls
        self._hooks: list = []
        # Per block staged encoded, from its staging until it is unstaged: the hooks that decode it on the host while
        # the streamer is closed (`_StreamedBlock.enter_on_host`).
        self._host_hooks: dict[int, list] = {}
        # Hooks hold only a weakref to the streamer; if it is dropped while attached, its hooks go with it.
        weakref.finalize(self, _remove_hooks, self._hooks)
        weakref.finalize(self, _remove_host_hooks, self._host_hooks)
        self._tick = 0
        self._stats = StreamStats()
        self._open = False  # True only between a complete open() and the start of close(); hooks act only then

    @property
    def slot_bytes(self) -> int:
        """The largest streamed block as it streams (encoded in its stream format)."""
        return max((b.nbytes for b in self._blocks), default=0)

    @property
    def decode_bytes(self) -> int:
        """The decode buffer: the largest encoded block as stored (0 when none streams encoded)."""
        return max((b.stored_nbytes for b in self._blocks if b.codec is not None), default=0)

    def stats(self) -> StreamStats:
        return StreamStats(**vars(self._stats))

    @property
    def is_open(self) -> bool:
        return self._open

    def open(self, progress: StagingProgress | None = None) -> "BlockStreamer":
        """Stages the blocks (unless still staged from an earlier `close(unstage=False)`), allocates the
        slots and installs the hooks.

        Args:
            progress: called as `progress(done_bytes, total_bytes)` when staging starts and after each staged
                block (not at all when nothing needs staging). It may raise to cancel, e.g. on a user
                interrupt: the blocks staged so far stay staged and consistent, the streamer stays closed,
                and the next `open()` stages the rest.

        Whatever raises (also KeyboardInterrupt), a failed `open()` removes the hooks it installed and frees
        the slots before the exception leaves it, so none survives while the exception object lives.
        """
        if self._open:
            return self
        try:
            self._detach()  # what an interrupted close() may have left
            self._stage_all(progress)
            self._slots = [
                _Slot(torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device),
                      self.engine.new_event(), self.engine.new_event())
                for _ in range(self.prefetch if self._blocks else 0)
            ]
            if self.decode_bytes:
                self._decode = _DecodeBuffer(torch.empty(self.decode_bytes, dtype=torch.uint8, device=self.device))
            self._install_hooks()
            logger.info("distorch: streaming %d blocks (%.2f GB%s) through %d x %.2f GB slots on %s%s",
                        len(self._blocks), sum(b.nbytes for b in self._blocks) / GIB, self._format_note(),
                        len(self._slots), self.slot_bytes / GIB, self.device,
                        f", decoded into {self.decode_bytes / GIB:.2f} GB" if self._decode is not None else "")
            self._open = True
            return self  # inside the try: an interrupt at any statement of open() rolls it back
        except BaseException:
            self._open = False
            self._detach()
            raise

    def close(self, unstage: bool = True) -> None:
        """Removes the hooks, waits for copies in flight and frees the slots. Works in any state an
        interrupted forward, `open()` or `close()` left, and may be called again.

        Args:
            unstage: also move the weights back where they came from and unpin. With False they stay in
                their flat buffers (pinned RAM or donor VRAM), so the next `open()` skips staging; ComfyUI
                uses this when it unloads a model it will load again.
        """
        self._open = False  # first: from here the hooks do nothing, also if removing them is interrupted
        self._detach()
        if unstage:
            for block in self._blocks:
                if block.is_staged:
                    block.unstage()
                self._remove_host_hooks(block)  # after: until the weights are back, a forward decodes on the host
            self._files.close()
            if self._account is not None:
                self._account.update(staged=False)

    def _format_note(self) -> str:
        encoded = [b for b in self._blocks if b.codec is not None]
        if not encoded:
            return ""
        stored = sum(b.stored_nbytes for b in encoded)
        return (f"; {len(encoded)} as {encoded[0].codec.format.value}, {sum(b.nbytes for b in encoded) / GIB:.2f} GB "
                f"of their {stored / GIB:.2f} GB as stored")

    def staged_encoded(self) -> dict[str, tuple[str, int]]:
        """Blocks staged encoded (their tensors view placeholders): name -> (device, bytes its buffer holds)."""
        return {b.name: (device_name(b.buffer.tensor.device), b.nbytes) for b in self._blocks
                if b.codec is not None and b.buffer is not None}

    def stage(self, progress: StagingProgress | None = None) -> None:
        """Stages the blocks not staged yet without starting to stream (`open()` does both)."""
        self._stage_all(progress)

    def hand_over(self, successor: "BlockStreamer") -> None:
        """Passes the staged blocks that `successor` (a streamer of the same model) stores alike to it, without a copy.

        Re-placing a model: this streamer must be closed. Its other staged blocks are let go where they lie, their
        tensors still viewing the staging buffers, so `successor` (or the resident placement) copies them from there.
        Afterwards this streamer holds nothing, and the ledger entry says what `successor` holds.
        """
        if self._open:
            raise RuntimeError("distorch: close() the streamer before handing its blocks over")
        staged = {block.name: block for block in self._blocks if block.is_staged}
        for block in successor._blocks:
            mine = staged.get(block.name)
            if mine is not None and (mine.placement == block.placement or _moves_encoded(mine, block)):
                if block.codec is not None:
                    successor._install_host_hooks(block)  # before: it views placeholders from the take-over on
                block.take_over(staged.pop(block.name))
        for block in staged.values():
            block.let_go()
        for block in self._blocks:
            self._remove_host_hooks(block)
        successor._files.adopt(self._files)  # its disk-tier blocks keep reading the files they were planned on
        if successor._account is not None and any(b.is_staged for b in successor._blocks):
            successor._account.update(staged=True, **successor._held())

    def _detach(self) -> None:
        """Removes the hooks, ends the forwards an interrupt left on the slots, waits for the queued copies
        and kernels, points every block back to its host views (also a staging an interrupt cut between two
        tensors) and drops the slots. Each step may repeat."""
        _remove_hooks(self._hooks)
        if self._slots:
            self._release_all()
            self.engine.synchronize()
        for block in self._blocks:
            if block.is_staged:
                block.point_to(block.host_views)
            block.host_readers = []
        self._slots, self._decode = [], None
        for streaming_pass in self._passes:
            streaming_pass.depth, streaming_pass.frame, streaming_pass.cursor = 0, None, 0

    # -- staging -----------------------------------------------------------------------------------

    @property
    def _arenas(self) -> list[FlatBuffer]:
        """The staging buffers (one per staged block)."""
        return [b.buffer for b in self._blocks if b.buffer is not None]

    def _stage_all(self, progress: StagingProgress | None = None) -> None:
        """Stages every block not staged yet, one at a time, each into a buffer of its own.

        Block by block, so the original memory of one block is freed before the next buffer is filled (peak:
        the model plus one block). Blocks bound for a donor GPU go first: their RAM frees room for the rest.
        Host buffers are page-locked after they are filled, never before (pinning faults in every page).
        """
        pending = sorted((b for b in self._blocks if not b.is_staged or b.misplaced),
                         key=lambda b: b.placement.device == "cpu")
        mappings = MappingTable.read() if pending else None
        total = sum(b.nbytes for b in pending)
        done = 0
        if progress is not None and total:
            progress(0, total)
        pin = True  # until a registration fails: then the rest stays pageable without a warning per block
        with tqdm(total=total, unit="B", unit_scale=True, desc="distorch: staging streamed blocks",
                  disable=total < _PROGRESS_MIN_BYTES, leave=False) as bar:
            try:
                for block in pending:
                    if block.placement.disk:
                        block.stay_on_disk(mappings)
                    else:
                        if block.codec is not None:
                            self._install_host_hooks(block)  # before its tensors view placeholders
                        buffer = FlatBuffer(block.nbytes, block.placement.device)
                        if block.stage(buffer, mappings):
                            trim_heap()  # the freed sources go back to the OS now, not at the end
                        if block.placement.pinned and pin:
                            pin = buffer.pin()
                    done += block.nbytes
                    bar.update(block.nbytes)
                    if progress is not None:
                        progress(done, total)
            finally:
                self._keep_needed_files()
        # Every donor holding a staged block, also those staged by an earlier open() that `progress` cancelled.
        donors = {torch.device(b.placement.device) for b in self._blocks
                  if b.is_staged and b.placement.device != "cpu"}
        for device in donors:
            # Staging writes to a donor GPU run on its default stream (and from pageable memory may still be in
            # flight when cudaMemcpy returns); the copy stream must not read them before they land.
            torch.cuda.synchronize(device)
        holding = self._account.holding if self._account is not None else None
        # Also when nothing was pending: an open() interrupted after staging never marked the entry staged.
        if holding is not None and (pending or (not holding.staged and any(b.is_staged for b in self._blocks))):
            self._account.update(staged=True, **self._held())

    def _keep_needed_files(self) -> None:
        """Keeps descriptors open only while disk-tier blocks stream from them: a staged block never reads its file
        again, and an open descriptor would hold on to a deleted file's disk space."""
        self._files.finish()
        if not any(block.spans for block in self._blocks):
            self._files.close()

    def _held(self) -> dict:
        """What the staged blocks actually hold, by the ledger's fields."""
        held = {"pinned": 0, "pageable": 0, "disk": 0}
        donors: dict[str, int] = {}
        for block in self._blocks:
            if block.buffer is None:
                held["disk"] += block.nbytes if block.is_staged else 0
            elif block.buffer.tensor.device.type == "cpu":
                held["pinned" if block.buffer.pinned else "pageable"] += block.nbytes
            else:
                donors[block.placement.device] = donors.get(block.placement.device, 0) + block.nbytes
        if self.device.type == "cuda" and held["disk"]:
            # The engine's page-locked bounce buffer for disk reads, a slot's size (allocated at the first read).
            held["pinned"] += self.slot_bytes
        return {**held, "donor": tuple(sorted(donors.items()))}

    def _install_hooks(self) -> None:
        # Each handle is kept in the statement that registers its hook: an interrupt cannot lose one.
        for block in self._blocks:
            module = block.module()
            if module is None:
                raise RuntimeError(f"distorch: block {block.name!r} is gone; the model was freed")
            self._hooks.append(module.register_forward_pre_hook(self._make_pre_hook(block.index)))
            self._hooks.append(module.register_forward_hook(self._make_post_hook(block.index), always_call=True))
        for streaming_pass in self._passes:
            module = streaming_pass.module()
            if module is None:
                continue
            self._hooks.append(module.register_forward_pre_hook(self._make_pass_begin(streaming_pass)))
            self._hooks.append(module.register_forward_hook(self._make_pass_end(streaming_pass), always_call=True))

    def _install_host_hooks(self, block: _StreamedBlock) -> None:
        """Hooks that run a staged encoded block decoded on the host while the streamer is closed (idempotent)."""
        if block.index in self._host_hooks:
            return
        module = block.module()
        if module is None:
            raise RuntimeError(f"distorch: block {block.name!r} is gone; the model was freed")
        handles = self._host_hooks.setdefault(block.index, [])
        # Each handle kept in the statement that registers it: an interrupt cannot lose one.
        handles.append(module.register_forward_pre_hook(functools.partial(_host_pre_hook, weakref.ref(self),
                                                                          block.index)))
        handles.append(module.register_forward_hook(functools.partial(_host_post_hook, weakref.ref(self), block.index),
                                                    always_call=True))

    def _remove_host_hooks(self, block: _StreamedBlock) -> None:
        handles = self._host_hooks.get(block.index)
        if handles is not None:
            _remove_hooks(handles)
            del self._host_hooks[block.index]

    # Hooks live in the model's modules and reach the streamer through a weakref: a strong one would make
    # module -> hook -> streamer -> module a cycle that only the garbage collector frees (with the pinned RAM).

    def _make_pre_hook(self, index: int):
        return functools.partial(_pre_hook, weakref.ref(self), index)

    def _make_post_hook(self, index: int):
        return functools.partial(_post_hook, weakref.ref(self), index)

    def _make_pass_begin(self, streaming_pass: _Pass):
        return functools.partial(_pass_begin, weakref.ref(self), streaming_pass)

    def _make_pass_end(self, streaming_pass: _Pass):
        return functools.partial(_pass_end, weakref.ref(self), streaming_pass)

    # -- passes and schedule -------------------------------------------------------------------------

    def _begin_pass(self, streaming_pass: _Pass, frame) -> None:
        if streaming_pass.depth or any(slot.readers for slot in self._slots) or self._decode_readers():
            self._end_interrupted()
        if streaming_pass.depth:  # the pass module called again inside its own running forward
            streaming_pass.depth += 1
            return
        streaming_pass.seen, streaming_pass.cursor, streaming_pass.frame = [], 0, frame
        streaming_pass.depth = 1  # last: interrupted before it, no pass is left running
        self._current = streaming_pass
        self._stats.passes += 1
        self._refill()

    def _end_pass(self, streaming_pass: _Pass, completed: bool) -> None:
        if streaming_pass.depth > 1:
            streaming_pass.depth -= 1
            return
        if completed and streaming_pass.seen:
            if streaming_pass.seen != streaming_pass.schedule:
                self._stats.mispredicted += 1
            streaming_pass.history.append(tuple(streaming_pass.seen))
            streaming_pass.schedule = list(_predict_next(streaming_pass.history))
        # Interrupted before this, the pass stays open on a frame that is gone: the next pass ends it.
        streaming_pass.depth, streaming_pass.frame, streaming_pass.cursor = 0, None, 0
        self._current = streaming_pass
        if not completed:
            # The forward raised (an interrupt, a changed model file): no prefetch now, which would raise the same
            # error again inside torch's always_call hook; the next pass starts its loads itself.
            self._release_all()
            return
        self._refill()  # wrap around: start fetching the first blocks of the next pass now

    def _end_interrupted(self) -> None:
        """Ends the forwards a BaseException (KeyboardInterrupt, SystemExit) unwound.

        torch runs `always_call` hooks for Exception only, so after Ctrl+C inside a block its slot stayed
        marked running and its pass stayed open: with prefetch=1 every later forward failed, with more
        slots one slot was lost for good. A forward is still running exactly when its module-call frame
        is on the current stack; checked only when a pass starts over state left running, or when no
        slot is free.
        """
        live = _stack_frame_ids()
        for slot_index, slot in enumerate(self._slots):
            for reader in [r for r in slot.readers if not _is_live(r, live)]:
                self._end_read(slot_index, reader)
        for reader in [r for r in self._decode_readers() if not _is_live(r, live)]:
            self._end_decoded_read(reader)
        for streaming_pass in self._passes:
            if streaming_pass.depth and not _is_live(streaming_pass.frame, live):
                streaming_pass.depth, streaming_pass.frame, streaming_pass.cursor = 0, None, 0

    def _track_call(self, index: int) -> None:
        streaming_pass = self._pass_of.get(index)
        if streaming_pass is None or not streaming_pass.depth:
            self._stats.unscheduled += 1
            return
        streaming_pass.seen.append(index)
        schedule, cursor = streaming_pass.schedule, streaming_pass.cursor
        if cursor < len(schedule) and schedule[cursor] == index:
            streaming_pass.cursor += 1
        elif index in schedule[cursor:]:
            streaming_pass.cursor = schedule.index(index, cursor) + 1  # blocks were skipped

    def _upcoming(self) -> list[int]:
        """The next distinct streamed blocks expected, as many as there are idle slots."""
        streaming_pass = self._current
        if streaming_pass is None or not streaming_pass.schedule:
            return []
        wanted = len(self._slots) - sum(1 for s in self._slots if s.users)
        sequence = streaming_pass.schedule[streaming_pass.cursor:] + streaming_pass.schedule
        upcoming = []
        for index in sequence:
            if len(upcoming) >= wanted:
                break
            if index not in upcoming and not self._is_running(index):
                upcoming.append(index)
        return upcoming

    def _is_running(self, index: int) -> bool:
        if self._decode is not None and self._decode.block == index and self._decode.readers:
            return True
        slot = self._slot_holding(index)
        return slot is not None and self._slots[slot].users > 0

    # -- slots ---------------------------------------------------------------------------------------

    def _slot_holding(self, index: int) -> int | None:
        # A scan of the few slots instead of a second map: one record of what each slot holds cannot disagree
        # with itself when an interrupt splits an update.
        for slot_index, slot in enumerate(self._slots):
            if slot.block == index:
                return slot_index
        return None

    def _acquire(self, index: int, frame) -> None:
        self._track_call(index)
        if self._blocks[index].codec is not None:
            self._acquire_decoded(index, frame)
            return
        slot_index = self._loaded_slot(index)
        slot = self._slots[slot_index]
        # The reader first: from here an interrupt leaves a forward whose frame is gone, which the recovery ends.
        slot.readers.append(frame)
        # The forward's kernels must not read the slot before its copy has landed.
        self.engine.compute_wait(slot.ready)
        self.engine.mark_reading(slot.buffer, +1)
        self._blocks[index].point_to(self._slot_views(index, slot))
        self._refill()

    def _loaded_slot(self, index: int) -> int:
        """The slot holding block `index`, loaded now (the forward waits for it) when none does."""
        slot_index = self._slot_holding(index)
        if slot_index is not None:
            self._stats.hits += 1
            return slot_index
        slot_index = self._victim(protected=set())
        if slot_index is None:
            self._end_interrupted()
            slot_index = self._victim(protected=set())
        if slot_index is None:
            raise RuntimeError(f"distorch: block {self._blocks[index].name!r} needs a slot but all "
                               f"{len(self._slots)} are running blocks; raise prefetch")
        self._load(index, slot_index)
        self._stats.sync_loads += 1
        return slot_index

    def _acquire_decoded(self, index: int, frame) -> None:
        """The pre-hook of an encoded block: decoded into the decode buffer unless it holds the block already (called
        again, or re-entered), its slot free again right after the decode, its tensors pointed at the decoded bytes."""
        decode = self._decode
        if decode.block != index:
            if decode.readers:
                self._end_interrupted()
            if decode.readers:
                raise RuntimeError(f"distorch: block {self._blocks[index].name!r} runs inside the forward of block "
                                   f"{self._blocks[decode.block].name!r}; blocks streamed in a stream format share one "
                                   "decode buffer and must run one after another: stream this model as stored")
            self._decode_into_buffer(index, self._loaded_slot(index), frame)
        else:
            self._stats.hits += 1
        # The reader before the views: from here an interrupt leaves a forward whose frame is gone (recovery ends it).
        decode.readers.append(frame)
        self._blocks[index].point_to(self._decoded_views(index))
        self._refill()

    def _decode_into_buffer(self, index: int, slot_index: int, frame) -> None:
        slot, decode, block = self._slots[slot_index], self._decode, self._blocks[index]
        slot.readers.append(frame)  # the decode reads the slot: it stays off the victims until the free event
        # The decode must not read the slot before its copy has landed.
        self.engine.compute_wait(slot.ready)
        self.engine.mark_reading(slot.buffer, +1)
        decode.block = None  # emptied before its bytes change: interrupted mid-decode, it holds nothing
        block.codec.decode_into(slot.buffer[:block.nbytes], decode.buffer[:block.stored_nbytes])
        # Only now: the decode is enqueued (on the compute stream, after the block before it and its own copy).
        decode.block = index
        self._stats.decodes += 1
        # The slot's free event after the decode, not after the block: its next copy may start while the block runs.
        self._end_read(slot_index, frame)

    def _decoded_views(self, index: int) -> list[torch.Tensor]:
        views = self._decode.views.get(index)
        if views is None:
            views = self._decode.views[index] = self._blocks[index].views_on(self._decode.buffer)
        return views

    def _decode_readers(self) -> list:
        return self._decode.readers if self._decode is not None else []

    def _end_decoded_read(self, reader) -> None:
        """Ends one forward on the decode buffer; as `_end_read` for a slot, the reader goes last."""
        decode = self._decode
        if len(decode.readers) == 1:
            if decode.block is not None:
                block = self._blocks[decode.block]
                block.point_to(block.host_views)
            if self.debug:
                decode.block = None  # before the poison: it never says it holds bytes it no longer has
                self.engine.poison(decode.buffer)
        decode.readers.remove(reader)

    def _release(self, index: int) -> None:
        """The post-hook: ends the innermost forward of block `index` and refills once its slot is idle."""
        if self._blocks[index].codec is not None:
            decode = self._decode
            if decode is None or decode.block != index or not decode.readers:
                return  # the pre-hook failed before its forward began; nothing to undo
            self._end_decoded_read(decode.readers[-1])
            if not decode.readers:
                self._refill()
            return
        slot_index = self._slot_holding(index)
        if slot_index is None or not self._slots[slot_index].readers:
            return  # the pre-hook failed before acquiring; nothing to undo
        slot = self._slots[slot_index]
        self._end_read(slot_index, slot.readers[-1])
        if not slot.readers:
            self._refill()

    def _end_read(self, slot_index: int, reader) -> None:
        """Ends one forward on a slot. The reader goes last, after the block's weights point back to their
        host views and the slot's `free` event is recorded: until then the slot is never reused, and an
        interrupt in between leaves the reader for the recovery, which repeats these steps (each may)."""
        slot = self._slots[slot_index]
        self.engine.mark_reading(slot.buffer, -1)
        if len(slot.readers) == 1:
            if slot.block is not None:
                block = self._blocks[slot.block]
                block.point_to(block.host_views)
            if self.debug:
                slot.block = None  # before the poison: a slot never says it holds bytes it no longer has
                self.engine.poison(slot.buffer)
            # Recorded after the block's kernels (and the poison fill): the next copy into the slot waits for it.
            self.engine.compute_record(slot.free)
            self._tick += 1
            slot.last_used = self._tick
        slot.readers.remove(reader)

    def _release_all(self) -> None:
        for slot_index, slot in enumerate(self._slots):
            while slot.readers:
                self._end_read(slot_index, slot.readers[-1])
        while self._decode_readers():
            self._end_decoded_read(self._decode.readers[-1])

    def _refill(self) -> None:
        upcoming = self._upcoming()
        for index in upcoming:
            if self._slot_holding(index) is not None:
                continue
            slot_index = self._victim(protected=set(upcoming))
            if slot_index is None:
                return
            self._load(index, slot_index)
            self._stats.prefetches += 1

    def _victim(self, protected: set[int]) -> int | None:
        """An idle slot, preferring empty ones, then the least recently used; never one in `protected`."""
        candidates = [i for i, s in enumerate(self._slots) if not s.users and s.block not in protected]
        if not candidates:
            return None
        return min(candidates, key=lambda i: (self._slots[i].block is not None, self._slots[i].last_used))

    def _load(self, index: int, slot_index: int) -> None:
        slot = self._slots[slot_index]
        slot.block = None  # emptied before its bytes change: interrupted mid-copy, the slot holds nothing
        for destination, source in self._blocks[index].copies(slot.buffer):
            self.engine.copy(destination, source, after=slot.free, ready=slot.ready)
        # Only now: the copy is enqueued and `ready` recorded after it; a read that failed (a changed model file)
        # or an interrupt mid-copy leaves the slot empty.
        slot.block = index
        self._stats.copies += 1
        self._stats.bytes_copied += self._blocks[index].nbytes  # as streamed: encoded in its stream format

    def _slot_views(self, index: int, slot: _Slot) -> list[torch.Tensor]:
        views = slot.views.get(index)
        if views is None:
            views = slot.views[index] = self._blocks[index].views_on(slot.buffer)
        return views


# The hook bodies, compiler-disabled once at import: the first `torch.compiler.disable` imports torch._dynamo,
# and that import leaves the frames on the stack in a reference cycle; at import time they hold no model.
# A hook whose streamer is gone or not open does nothing: none can act on a streamer that is being torn down.

@torch.compiler.disable
def _pre_hook(streamer: weakref.ref, index: int, module, args) -> None:
    owner = streamer()
    if owner is not None and owner._open:
        owner._acquire(index, _module_call_frame())


@torch.compiler.disable
def _post_hook(streamer: weakref.ref, index: int, module, args, output) -> None:
    owner = streamer()
    if owner is not None and owner._open:
        owner._release(index)


@torch.compiler.disable
def _pass_begin(streamer: weakref.ref, streaming_pass: _Pass, module, args) -> None:
    owner = streamer()
    if owner is not None and owner._open:
        owner._begin_pass(streaming_pass, _module_call_frame())


@torch.compiler.disable
def _pass_end(streamer: weakref.ref, streaming_pass: _Pass, module, args, output) -> None:
    # always_call hooks see output=None when the forward raised (e.g. ComfyUI's interrupt).
    owner = streamer()
    if owner is not None and owner._open:
        owner._end_pass(streaming_pass, completed=output is not None)


@torch.compiler.disable
def _host_pre_hook(streamer: weakref.ref, index: int, module, args) -> None:
    owner = streamer()
    if owner is not None and not owner._open:
        owner._blocks[index].enter_on_host(_module_call_frame())


@torch.compiler.disable
def _host_post_hook(streamer: weakref.ref, index: int, module, args, output) -> None:
    owner = streamer()
    if owner is not None and not owner._open:
        owner._blocks[index].exit_on_host()


def _remove_host_hooks(handles: dict[int, list]) -> None:
    for index in list(handles):
        _remove_hooks(handles.pop(index))


def _moves_encoded(mine: _StreamedBlock, successor: _StreamedBlock) -> bool:
    """`successor` stores the block encoded alike in another tier: it takes the encoded bytes over and moves them."""
    return mine.buffer is not None and mine.codec is not None and mine.codec == successor.codec


def _remove_hooks(handles: list) -> None:
    # Removing a handle twice is harmless: interrupted, the next call removes the rest.
    for handle in handles:
        handle.remove()
    handles.clear()


_MODULE_CALL_CODE = nn.Module._call_impl.__code__
_MAX_HOOK_DEPTH = 16  # frames between a hook and its module call (torch's inner(), compiler.disable wrappers)


def _module_call_frame():
    """The frame of the nn.Module call whose hook runs now: it lives exactly as long as that call.

    None when torch's call machinery is not found (another torch layout): such forwards are always
    treated as running, the behaviour without interrupt recovery.
    """
    frame = sys._getframe(2)
    for _ in range(_MAX_HOOK_DEPTH):
        if frame is None or frame.f_code is _MODULE_CALL_CODE:
            return frame
        frame = frame.f_back
    return None


def _stack_frame_ids() -> set[int]:
    frame, ids = sys._getframe(1), set()
    while frame is not None:
        ids.add(id(frame))
        frame = frame.f_back
    return ids


def _is_live(frame, live_ids: set[int]) -> bool:
    # `frame` is held by the streamer, so no other live object shares its id.
    return frame is None or id(frame) in live_ids


def _default_engine(device: torch.device):
    if device.type == "cuda":
        return CudaCopyEngine(device)
    if device.type == "cpu":
        return CpuCopyEngine()
    raise ValueError(f"distorch cannot stream to {device}: use a CUDA device or the CPU")


def _predict_next(history: deque) -> tuple[int, ...]:
    """The next pass's calls: the shortest period (up to 4) the recent passes repeat with, else the last pass.

    CFG with skip-layer guidance alternates two call sequences (cond, uncond); period 2 predicts both.
    """
    passes = list(history)
    for period in range(1, 5):
        if len(passes) >= 2 * period and passes[-period:] == passes[-2 * period:-period]:
            return passes[-period]
    return passes[-1]


def _make_passes(model: nn.Module, blocks: Sequence[Block]) -> list[_Pass]:
    passes: dict[str, _Pass] = {}
    for index, block in enumerate(blocks):
        if block.root not in passes:
            passes[block.root] = _Pass(block.root, weakref.ref(model.get_submodule(block.root)), [])
        # Until a pass has been observed, predict registration order: most models run their blocks so.
        passes[block.root].schedule.append(index)
    return list(passes.values())


def _codec(block: Block, placement: StoragePlacement, offsets: list[int]) -> BlockCodec | None:
    """The block's codec in its stream format, or None when it streams as stored (the format, the disk tier, or no
    tensor of it that the format encodes)."""
    if placement.format is StreamFormat.STORED or placement.disk or not block.clusters:
        return None
    codec = BlockCodec.build(block.clusters, placement.format, offsets)
    return codec if codec.encoded else None


def _placeholder(view: TensorView, device: torch.device) -> torch.Tensor:
    """What an encoded weight views between forwards: its dtype and size, every element one NaN of its own storage."""
    return torch.full((), float("nan"), dtype=view.dtype, device=device).expand(view.size)


def _cluster_offsets(clusters: Sequence[TensorCluster]) -> list[int]:
    offsets, cursor = [], 0
    for cluster in clusters:
        offset = align_up(cursor)
        offsets.append(offset)
        cursor = offset + cluster.nbytes
    return offsets
