"""One owner for a placed model's life: request -> plan -> reserve -> stage -> stream -> re-plan/re-place -> release.

`Placement` is the only writer of a model's ledger entry, the only place a plan is checked against the model
and the only builder of a `BlockStreamer`. `distorch.plan` and `distorch.stream` are built on it, and the node
pack attaches one to every model it loads (nodes/state.py).

Two ways to own the weights outside the streamed blocks ("the rest" and the resident blocks):
- `distorch.stream` places them itself (`places_resident=True`): moved to the compute device, moved back on
  `release()`;
- the node pack leaves them to ComfyUI, which loads, patches and offloads them around the streamed blocks.

With a stream format (`PlacementRequest.stream_format`) the streamed blocks are staged encoded and the model's
tensors of their encoded weights are placeholders between forwards (streamer.py). What a placed model looks like
is then the streamer's to say: `_layout_now` puts the staged encoded blocks back into a fresh discovery as they
were taken over, lying in their staging buffers, and `model_sizes` counts the bytes they hold there.
"""

import logging
import re
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import replace

import torch
from torch import nn

from .blocks import (
    Block,
    ModelLayout,
    TensorCluster,
    bytes_by_dtype,
    cluster_tensors,
    device_name,
    discover,
    live_bytes,
    point_into,
)
from .budget import ComputeBudget
from .costmodel import Timings
from .files import Backing, FileReader, copy_to
from .ledger import LEDGER, Account, Ledger
from .memory import MemoryInventory
from .pages import MappingTable, release_file_pages, trim_heap
from .planner import ModelSizes, Plan, plan_request
from .request import PlacementRequest, PlanError, StreamFormat
from .stream_format import BlockCodec
from .streamer import BlockStreamer, StagingProgress, StoragePlacement, StreamStats

logger = logging.getLogger("distorch.placement")

STREAM_ATTRIBUTE = "_distorch_stream"  # where `distorch.stream` keeps its placement on the model

__all__ = ["LayoutMismatch", "Placement", "PlacementRequest", "ResidentPlacement", "StagingProgress", "plan"]


class LayoutMismatch(PlanError):
    """The plan describes other blocks than the model has now; `names` are the blocks that differ."""

    def __init__(self, message: str, names: tuple[str, ...]):
        super().__init__(message)
        self.names = names


class ResidentPlacement:
    """Moves the resident weights (rest + resident blocks) to the compute device, tied tensors once.

    One copy: each cluster's original memory is released as it moves (file pages dropped, heap trimmed);
    `undo` copies the weights back to the devices they came from. Owns the moved copies (`_homes`).
    """

    def __init__(self, model: nn.Module, clusters: list[TensorCluster], device: torch.device):
        self.device = device
        target = device_name(device)
        # Where the bytes lie now, not at discovery: a block streamed until a re-placement lies in its staging buffer.
        self._moved = [(c, tensors) for c, tensors in ((c, cluster_tensors(model, c)) for c in clusters)
                       if device_name(tensors[0].device) != target]
        self._homes: list[torch.Tensor] = []  # each moved cluster's bytes on the compute device

    def apply(self) -> None:
        mappings = MappingTable.read()
        with FileReader() as files:
            self._move_all(mappings, files)
        if self._moved:
            trim_heap()

    def _move_all(self, mappings: MappingTable, files: FileReader) -> None:
        for cluster, tensors in self._moved:
            source = live_bytes(cluster, tensors)
            mapping = mappings.file_mapping(source.data_ptr(), cluster.nbytes) if source.device.type == "cpu" \
                else None
            address = source.data_ptr()
            home = copy_to(source, cluster.source, self.device, mappings, files)  # a model file through its descriptor
            del source
            point_into(cluster, tensors, home)
            self._homes.append(home)
            if mapping is not None:
                release_file_pages(address, cluster.nbytes, mapping)

    def undo(self) -> None:
        for (cluster, tensors), home in zip(self._moved, self._homes):
            point_into(cluster, tensors, home.to(torch.device(cluster.device)))
        self._homes = []

    def give_up(self, clusters: Iterable[TensorCluster]) -> None:
        """Stops owning `clusters` (a block that is streamed now): their bytes stay where they are for the streamer
        to stage, and `undo` leaves them alone."""
        leaving = {id(c) for c in clusters}
        kept = [(moved, home) for moved, home in zip(self._moved, self._homes) if id(moved[0]) not in leaving]
        self._moved = [moved for moved, _ in kept]
        self._homes = [home for _, home in kept]


class Placement:
    """One model's placement for its whole life; holds the model by weakref only (the model keeps the placement).

    Owns the model's ledger entry (`Account`), the layout it took over (discovered when it first stages: where
    each weight came from), the streamer, and with `places_resident` the resident weights' moved copies.

    Lifecycle:
        Placement.planned(model, request)  a plan, reserved in the ledger under the model
        open(progress)                     the plan checked, blocks staged (the first time), streaming
        pause()                            streaming stops, blocks stay staged (ComfyUI unloads it between runs)
        replan(request, memory=...)        a new plan for the model as it lies now; nothing moves
        move_to(plan)                      only the blocks whose tier changes move; no file is read again
        release() / close()                every weight back where it came from, the ledger entry gone

    Example:
        >>> placement = Placement.planned(model, PlacementRequest.validate("cuda:0", 8))
        >>> placement.open()
        >>> placement.move_to(placement.replan(PlacementRequest.validate("cuda:0", 4)))  # 4 GB of blocks back
        >>> placement.release()
    """

    def __init__(self, model: nn.Module, plan: Plan, *, request: PlacementRequest | None = None,
                 ledger: Ledger | None = None, places_resident: bool = False, prefetch: int | None = None,
                 debug: bool = False, engine=None):
        self._model = weakref.ref(model)
        self.plan = plan  # the placement the model has (or will have at the next open)
        self.request = request  # what `plan` was made for; `replan` plans it again (None: given a plan)
        self._ledger = LEDGER if ledger is None else ledger
        self._account: Account | None = None  # the model's ledger entry, once reserved
        self._places_resident = places_resident  # move the rest and resident blocks to the compute device
        self._prefetch = prefetch  # slots when they differ from the plan's (`distorch.stream(prefetch=)`)
        self._debug = debug
        self._engine = engine
        self._layout: ModelLayout | None = None  # as taken over: what the streamers are built from
        self.streamer: BlockStreamer | None = None  # built when the model is first staged
        self._resident: list[ResidentPlacement] = []  # with `places_resident`: the weights moved to the device
        if prefetch is not None and prefetch > plan.prefetch and plan.streamed:
            logger.warning("distorch: prefetch %d exceeds the plan's %d slots; VRAM use is above the plan",
                           prefetch, plan.prefetch)

    @classmethod
    def planned(cls, model: nn.Module, request: PlacementRequest, *,
                memory: Mapping[str, int] | MemoryInventory | None = None, ledger: Ledger | None = None,
                **options) -> "Placement":
        """Plans `model` for `request` against `memory` (probed when None) and what the ledger's other models hold,
        and reserves the plan under the model until it is freed. `options` as in the constructor."""
        ledger = LEDGER if ledger is None else ledger
        model_plan = plan_request(model_sizes(model), request, memory=memory, others=ledger.others(model))
        placement = cls(model, model_plan, request=request, ledger=ledger, **options)
        placement.reserve()
        return placement

    @property
    def model(self) -> nn.Module | None:
        return self._model()

    @property
    def is_staged(self) -> bool:
        """Whether it has taken over the weights (staged blocks, moved resident weights) since the last release."""
        return self.streamer is not None or bool(self._resident)

    def stats(self) -> StreamStats:
        return self.streamer.stats() if self.streamer is not None else StreamStats()

    # -- ledger ----------------------------------------------------------------------------------------

    def reserve(self) -> None:
        """Records the plan as the model's one ledger entry (replacing what it held before)."""
        self._account = self._ledger.reserve(self._live_model(), self.plan.holding())

    # -- stage, stream, pause, release -------------------------------------------------------------------

    def check(self) -> None:
        """Checks the plan against the model as it is now (devices, blocks, disk tier); nothing moves.

        Raises:
            LayoutMismatch: the model's blocks differ from the plan's (names or sizes).
            ValueError: a disk-tier block no longer lies in its file.
            RuntimeError: a device of the plan is not on this machine.
        """
        layout = discover(self._live_model(), self.plan.files)  # every read checks the files are still as planned
        _check_against(self.plan, layout)
        self._layout = layout

    def open(self, progress: StagingProgress | None = None, *, pin: bool = True) -> bool:
        """Starts streaming: the first time checks the plan, places the resident weights (with `places_resident`)
        and stages the streamed blocks (reporting to `progress`). Returns True when it was not streaming.

        A `progress` that raises (a user interrupt) stops staging between two blocks: what is staged stays staged,
        and the next `open()` stages the rest. `pin=False` keeps this first staging in pageable RAM.
        """
        if self.streamer is not None and self.streamer.is_open:
            return False
        if self.streamer is None:
            self._take_over(pin)
        self.streamer.open(progress)
        return True

    def pause(self) -> None:
        """Stops streaming (hooks and slots go); staged blocks stay in their buffers, so `open()` skips staging."""
        if self.streamer is not None:
            self.streamer.close(unstage=False)

    def release(self) -> None:
        """Stops streaming and gives every weight back to the device it came from; the ledger entry goes."""
        if self.streamer is not None:
            self.streamer.close(unstage=True)
        for resident in reversed(self._resident):
            resident.undo()
        self.streamer, self._resident, self._layout = None, [], None
        model = self._model()
        if model is not None:
            self._ledger.release(model)
            if getattr(model, STREAM_ATTRIBUTE, None) is self:
                delattr(model, STREAM_ATTRIBUTE)
        self._account = None

    close = release  # `distorch.stream`'s handle protocol

    def __enter__(self) -> "Placement":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # -- re-plan, re-place -------------------------------------------------------------------------------

    def replan(self, request: PlacementRequest | None = None, *,
               memory: Mapping[str, int] | MemoryInventory | None = None, budget: ComputeBudget | None = None,
               timings: Timings | None = None) -> Plan:
        """A new plan for this model as its weights lie now (staged blocks count as in RAM or on their donor,
        resident ones as on the compute device), against `memory` (probed when None); nothing moves.

        Plan while paused: an open streamer's slots count as used memory in a probe. `request` defaults to the
        one this placement was planned for (another amount, another inventory, another compute device). `budget`
        and `timings` as in `distorch.planner.plan_request`: a run's budget on the compute device (which then
        replaces the probe of that device) and what a run measured. A budget plan of a staged model grows or
        shrinks the streamed set it has, so `move_to` moves only the blocks the budget needs moved.
        """
        request = self.request if request is None else request
        if request is None:
            raise ValueError("distorch: this placement was given a plan, not a request; pass the request to plan")
        model = self._live_model()
        current = self.plan if budget is not None and self.is_staged else None
        sizes = model_sizes(model, self._layout_now(model), self._held_encoded())
        return plan_request(sizes, request, memory=memory, others=self._ledger.others(model),
                            budget=budget, timings=timings, current=current)

    def move_to(self, new_plan: Plan, *, request: PlacementRequest | None = None,
                progress: StagingProgress | None = None, pin: bool = True) -> None:
        """Re-places the model by `new_plan`, moving only the blocks whose tier changes; the file is not read again.

        resident -> streamed: the block's bytes go into a staging buffer of their new tier and leave the compute
        device; streamed -> resident: from the staging buffer to the compute device (or, when ComfyUI places the
        resident weights, back to the device the block came from), the buffer freed; streamed -> streamed on
        another tier: copied from one buffer into the other. Blocks stored alike keep their buffers. The slots are
        made anew (their size follows the largest streamed block), and the ledger entry holds the new numbers.
        Streaming resumes if it was running.

        Args:
            request: what `new_plan` was made for (kept for the next `replan`).
            progress: as for `open`, for the blocks staged here.
            pin: page-lock the newly staged blocks the plan pins.

        Raises:
            RuntimeError: `new_plan` is for another compute device while the model is staged.
            LayoutMismatch: `new_plan` is for other blocks.
        """
        model = self._live_model()
        if new_plan.compute_device != self.plan.compute_device and self.is_staged:
            raise RuntimeError(f"distorch: {type(model).__name__} streams to {self.plan.compute_device} and cannot "
                               f"move to {new_plan.compute_device} while staged; release() it first")
        if new_plan.stream_format != self.plan.stream_format and self.is_staged:
            raise RuntimeError(f"distorch: {type(model).__name__} streams as {self.plan.stream_format} and cannot "
                               f"change to {new_plan.stream_format} while staged; release() it first")
        layout = self._layout_now(model)
        check_layout(new_plan, layout)
        old_plan, old = self.plan, self.streamer
        if old is None:  # nothing taken over yet: the next open checks the rest and places by the new plan
            self.plan, self.request, self._layout = new_plan, request or self.request, None
            self.reserve()
            return
        _check_devices_exist(new_plan)
        _check_disk_blocks(new_plan, layout)
        self.plan, self.request = new_plan, request or self.request
        self.reserve()
        was_open = old.is_open
        old.close(unstage=False)
        self.streamer = self._build_streamer(new_plan, pin)
        old.hand_over(self.streamer)
        demoted = [self._layout.block(n) for n in new_plan.streamed - old_plan.streamed]
        promoted = [self._layout.block(n) for n in old_plan.streamed - new_plan.streamed]
        for resident in self._resident:
            resident.give_up(c for block in demoted for c in block.clusters)
        try:
            self.streamer.stage(progress)  # first: demoted blocks leave the compute device before others arrive
        finally:
            self._place_promoted(model, promoted)
        if was_open:
            self.streamer.open(progress)
        logger.info("distorch: re-placed %s: %d blocks now streamed, %d resident again, %d kept their buffers",
                    type(model).__name__, len(demoted), len(promoted), _kept(old_plan, new_plan))

    # -- the one layout, the one streamer builder ---------------------------------------------------------

    def _take_over(self, pin: bool) -> None:
        if self._layout is None:
            self.check()
        if self._account is None or self._account.holding is None:
            self.reserve()
        model = self._live_model()
        if self._places_resident:
            streamed = self.plan.streamed
            clusters = list(self._layout.rest) + [c for b in self._layout.blocks if b.name not in streamed
                                                  for c in b.clusters]
            self._place_resident(model, clusters)
        self.streamer = self._build_streamer(self.plan, pin)

    def _layout_now(self, model: nn.Module) -> ModelLayout:
        """The model as it lies now: a fresh discovery, in which the blocks staged encoded (whose tensors view
        placeholders) are the blocks taken over, lying in their staging buffers."""
        layout = discover(model)
        staged = self.streamer.staged_encoded() if self.streamer is not None else {}
        if not staged:
            return layout
        return replace(layout, blocks=tuple(_lying_in(block, self._layout.block(block.name), staged[block.name][0])
                                            if block.name in staged else block for block in layout.blocks))

    def _held_encoded(self) -> dict[str, tuple[str, int]]:
        return self.streamer.staged_encoded() if self.streamer is not None else {}

    def _build_streamer(self, plan: Plan, pin: bool) -> BlockStreamer:
        """The streamer for `plan` over the layout taken over (its clusters say where each weight came from)."""
        blocks = [b for b in self._layout.blocks if b.name in plan.streamed]
        fmt = StreamFormat.parse(plan.stream_format)
        storage = {b.name: StoragePlacement(b.device, b.pinned and pin, b.disk,
                                            fmt if b.decodes else StreamFormat.STORED)
                   for b in plan.blocks if b.streamed}
        return BlockStreamer(self._live_model(), blocks, storage, plan.compute_device,
                             prefetch=self._prefetch or plan.prefetch, debug=self._debug, engine=self._engine,
                             account=self._account)

    def _place_resident(self, model: nn.Module, clusters: list[TensorCluster]) -> None:
        resident = ResidentPlacement(model, clusters, torch.device(self.plan.compute_device))
        self._resident.append(resident)
        resident.apply()

    def _place_promoted(self, model: nn.Module, blocks: list) -> None:
        """Blocks streamed no more: to the compute device, or where they came from when ComfyUI places them."""
        clusters = [c for block in blocks for c in block.clusters]
        if self._places_resident:
            self._place_resident(model, clusters)
            return
        for cluster in clusters:
            tensors = cluster_tensors(model, cluster)
            source = live_bytes(cluster, tensors)
            if device_name(source.device) != cluster.device:
                point_into(cluster, tensors, source.to(torch.device(cluster.device)))

    def _live_model(self) -> nn.Module:
        model = self._model()
        if model is None:
            raise RuntimeError("distorch: the placed model was freed")
        return model


def plan(model: nn.Module, *, compute_device: str, virtual_vram_gb: float = 0.0, donor_device: str = "cpu",
         expert_mode_allocations: str = "", memory: Mapping[str, int] | MemoryInventory | None = None,
         prefetch: int = 2, ledger: Ledger | None = None, stream_format: str = "stored") -> Plan:
    """Plans which blocks of `model` stay on `compute_device` and which are streamed from where.

    The plan is reserved in the ledger under `model` (replacing its earlier plan) until the model is
    freed, so later plans of other models leave room for it.

    Args:
        model: any torch model; its repeated blocks are found by `distorch.blocks.discover`.
        compute_device: where the forward runs, "cuda:N" or "cpu" (then streaming copies between CPU buffers).
        virtual_vram_gb: GB (GiB) of the model to move off the compute device (normal mode).
        donor_device: where moved blocks are stored in normal mode: "cpu" (pinned RAM) or another GPU;
            a donor GPU without room for all of them overflows into RAM.
        expert_mode_allocations: ComfyUI-MultiGPU expert string; when non-empty it replaces the two above.
        memory: free bytes per device (plus an optional "pinned" budget), or an inventory; probed when None.
        prefetch: streaming slots (blocks in flight) the plan reserves on the compute device.
        ledger: where models' memory is recorded; the process-wide `distorch.ledger.LEDGER` by default.
        stream_format: how streamed blocks are held and copied: "stored" (as loaded), "q8_0" (GGUF Q8_0 blocks,
            ~0.53 x bf16, near-lossless) or "fp8_e4m3fn" (~0.5 x bf16, ~2.5 % weight error); decoded on the
            compute device before each block runs. Resident blocks stay as loaded.

    Raises:
        PlanError: when the placement does not fit the free memory, or the devices are unusable.
        AllocationError: when the expert string is malformed.

    Example:
        >>> p = plan(model, compute_device="cuda:0", virtual_vram_gb=6, memory={"cuda:0": 12 << 30, "cpu": 64 << 30})
        >>> print(p.report())
    """
    request = PlacementRequest.validate(compute_device, virtual_vram_gb, donor_device, expert_mode_allocations,
                                        prefetch=prefetch, stream_format=stream_format)
    return Placement.planned(model, request, memory=memory, ledger=ledger).plan


def model_sizes(model: nn.Module, layout: ModelLayout | None = None,
                held_encoded: Mapping[str, tuple[str, int]] | None = None) -> ModelSizes:
    """What the planner needs of a live model: its blocks and where their weights lie now, in the loaded dtypes, and
    each block's size in every stream format that makes it smaller.

    Args:
        layout: the model as it lies now (`Placement._layout_now`); discovered when None.
        held_encoded: blocks staged encoded: name -> (device, bytes their staging buffer holds there).
    """
    layout = discover(model) if layout is None else layout
    sizes = ModelSizes.from_layout(type(model).__name__, layout)
    encoded = {fmt.value: _encoded_sizes(layout, fmt) for fmt in StreamFormat if fmt is not StreamFormat.STORED}
    sizes = replace(sizes, dtype_bytes=bytes_by_dtype(model), dtype_source="model", encoded=encoded)
    return _holding_encoded(sizes, held_encoded or {})


def _encoded_sizes(layout: ModelLayout, fmt: StreamFormat) -> dict[str, tuple[int, int]]:
    """Block name -> (bytes in `fmt`, decode scratch on a GPU), for the blocks `fmt` makes smaller."""
    codecs = {block.name: BlockCodec.build(block.clusters, fmt) for block in layout.blocks if block.clusters}
    return {name: (codec.encoded_nbytes, codec.decode_scratch_bytes("cuda"))
            for name, codec in codecs.items() if codec.encoded}


def _holding_encoded(sizes: ModelSizes, held: Mapping[str, tuple[str, int]]) -> ModelSizes:
    """`sizes` with each block staged encoded counted as what its buffer holds (RAM it takes, bytes on its device)."""
    if not held:
        return sizes
    stored = dict(sizes.blocks)
    in_ram, bytes_on = dict(sizes.in_ram), dict(sizes.bytes_on)
    for name, (device, nbytes) in held.items():
        bytes_on[device] = bytes_on.get(device, 0) - stored[name] + nbytes
        if device == "cpu":
            in_ram[name] = nbytes
    return replace(sizes, in_ram=in_ram, bytes_on=bytes_on)


def _lying_in(found: Block, taken_over: Block, device: str) -> Block:
    """`taken_over` (the block as first discovered) lying in its staging buffer on `device`, in `found`'s order."""
    clusters = tuple(replace(c, device=device, backing=Backing.RAM, source=None) for c in taken_over.clusters)
    return replace(found, nbytes=taken_over.nbytes, clusters=clusters)


def check_layout(plan: Plan, layout: ModelLayout) -> None:
    """The one check that a plan describes a model: the same blocks (by name) of the same sizes."""
    found = {b.name: b.nbytes for b in layout.blocks}
    planned = {b.name: b.nbytes for b in plan.blocks}
    if found == planned:
        return
    missing = set(planned) - set(found)
    extra = set(found) - set(planned)
    changed = {n for n in set(planned) & set(found) if planned[n] != found[n]}
    raise LayoutMismatch(f"the plan ({len(planned)} blocks) does not match this model ({len(found)} blocks): "
                         f"blocks missing: {_first_names(missing)}, not in the plan: {_first_names(extra)}, "
                         f"sizes changed: {_first_names(changed)}; plan it again",
                         tuple(_natural(changed) + _natural(missing) + _natural(extra)))


def _check_against(plan: Plan, layout: ModelLayout) -> None:
    """Everything a plan needs of the model as it lies now and of this machine."""
    _check_devices_exist(plan)
    check_layout(plan, layout)
    _check_disk_blocks(plan, layout)


def _check_devices_exist(plan: Plan) -> None:
    devices = {plan.compute_device} | {b.device for b in plan.blocks if b.streamed}
    for device in sorted(devices):
        if device == "cpu":
            continue
        index = int(device.split(":")[1])
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            available = torch.cuda.device_count() if torch.cuda.is_available() else 0
            raise RuntimeError(f"distorch: the plan uses {device} but this machine has {available} CUDA device(s)")


def _check_disk_blocks(plan: Plan, layout: ModelLayout) -> None:
    """A disk-tier block is streamed from the file mapping it lies in; it must still lie there."""
    moved = [b.name for b in plan.blocks if b.disk and not layout.block(b.name).file_backed]
    if moved:
        raise ValueError(f"the plan streams {moved[:3]} from the model file, but their weights are no longer in "
                         "a file mapping; plan it again")


def _kept(old: Plan, new: Plan) -> int:
    """Streamed blocks stored alike by both plans (their buffers are kept)."""
    before = {b.name: (b.device, b.pinned, b.disk) for b in old.blocks if b.streamed}
    return sum(1 for b in new.blocks if b.streamed and before.get(b.name) == (b.device, b.pinned, b.disk))


def _natural(names) -> list[str]:
    return sorted(names, key=lambda name: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)])


def _first_names(names, shown: int = 3) -> str:
    """'blocks.8, blocks.9 and 3 more' ('none' when empty): a long list of names must not flood the message."""
    ordered = _natural(names)
    if not ordered:
        return "none"
    listed = ", ".join(ordered[:shown])
    return listed if len(ordered) <= shown else f"{listed} and {len(ordered) - shown} more"
