"""Decides, block by block, where each repeated block of a model lives.

Tiers: the compute GPU (resident), a donor GPU (kept in its VRAM, streamed to the compute GPU), pinned
RAM, pageable RAM once the shared pinned budget is used up, and the disk (a block left in the model
file's mapping) when RAM itself is short. Streamed blocks are spread among resident ones rather than taken as a
contiguous tail: while a resident block computes, the copy engine fetches the next streamed one, so
with copy time > compute time per block an interleaved plan reaches max(compute, transfer) per pass
where a tail plan stalls on every tail block (research/prefetch.md §4.2).

RAM is counted as staging uses it: a streamed block already in ordinary RAM is moved into its staging
buffer, so it adds nothing; a block in a file mapping or on a GPU adds its bytes. With a stream format
(`PlacementRequest.stream_format`, stream_format.py) a streamed block is staged, held and copied smaller: every
count of a streamed block's host buffer, donor VRAM, slot and copy uses its size as streamed (`_stream_nbytes`),
and the compute device also holds one decode buffer (the largest decoded block). How many bytes leave the compute
device is still counted as stored: that is what the user asked to move off it. What other DisTorch
models reserved and have not allocated yet comes from the ledger (ledger.py), as does the pinned RAM
they hold.

Everything here is pure arithmetic on block sizes and free memory, so it is deterministic and runs
without a GPU; `ModelSizes` can come from a live model or from a file header (the CLI). The inputs arrive
validated (`request.PlacementRequest`); the ledger is read only for `plan_sizes`'s default `others` and never
written: reserving a plan for a model is the placement's job (placement.py).
"""

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from .allocation import AllocationMode, AllocationSpec
from .budget import ComputeBudget
from .costmodel import MAX_PREFETCH, PassEstimate, Timings, choose_prefetch, copy_times, estimate_pass, hide_copies
from .ledger import LEDGER, Holding
from .memory import MemoryInventory
from .report import format_report
from .request import PlacementRequest, PlanError
from .units import format_gb, gb_to_bytes

if TYPE_CHECKING:  # torch stays unimported when plans come from file headers (the CLI)
    from .blocks import ModelLayout
    from .files import FileIdentity

@dataclass(frozen=True)
class ModelSizes:
    """What the planner needs to know about a model: block sizes in execution order and the rest.

    `bytes_on` says where the weights are now (device -> bytes). Per block, `in_ram` counts bytes in
    ordinary RAM (staging them into RAM moves them), `in_file` bytes in a mapping of a file on a disk (staging
    copies them, and a block wholly there may stay on the disk tier) and `in_shared_ram` bytes in memory a mapping
    keeps, tmpfs, /dev/shm, a memfd or a file deleted since it was loaded (staging copies them, the source stays,
    never the disk tier). Sizes from a file header leave all three empty: every staged byte is new.
    """

    name: str
    blocks: tuple[tuple[str, int], ...]
    rest_bytes: int
    bytes_on: Mapping[str, int] = field(default_factory=dict)
    in_ram: Mapping[str, int] = field(default_factory=dict)
    in_file: Mapping[str, int] = field(default_factory=dict)
    in_shared_ram: Mapping[str, int] = field(default_factory=dict)
    files: tuple["FileIdentity", ...] = ()  # the model files the weights lie in, as discovered (files.py)
    # The weight formats these sizes count (dtype label -> bytes) and where they were read: "file" (a
    # header: the file's dtype) or "model" (a live model: the dtype the loader built, e.g. fp8 from bf16).
    dtype_bytes: Mapping[str, int] = field(default_factory=dict)
    dtype_source: str = ""
    # Per stream format, the blocks it makes smaller: block name -> (bytes as streamed, decode scratch bytes on a
    # GPU). Blocks a format leaves as stored are absent; sizes from a file header have none (everything as stored).
    encoded: Mapping[str, Mapping[str, tuple[int, int]]] = field(default_factory=dict)
    # Blocks left out because they hold weights without storage of their own (blocks.ModelLayout.opaque_blocks).
    opaque_blocks: tuple[str, ...] = ()

    @property
    def block_bytes(self) -> int:
        return sum(n for _, n in self.blocks)

    @property
    def total_bytes(self) -> int:
        return self.block_bytes + self.rest_bytes

    @classmethod
    def from_layout(cls, name: str, layout: "ModelLayout") -> "ModelSizes":
        devices = {c.device for b in layout.blocks for c in b.clusters} | {c.device for c in layout.rest}
        return cls(name, tuple((b.name, b.nbytes) for b in layout.blocks), layout.rest_bytes,
                   {d: layout.bytes_on(d) for d in devices},
                   {b.name: b.ram_bytes for b in layout.blocks if b.ram_bytes},
                   {b.name: b.file_bytes for b in layout.blocks if b.file_bytes},
                   {b.name: b.shared_ram_bytes for b in layout.blocks if b.shared_ram_bytes},
                   layout.files, opaque_blocks=layout.opaque_blocks)

    def file_backed(self, name: str, nbytes: int) -> bool:
        return nbytes > 0 and self.in_file.get(name, 0) == nbytes

    def on_host(self, name: str) -> int:
        """Bytes of block `name` already in host memory (RAM or a mapping)."""
        return self.in_ram.get(name, 0) + self.in_file.get(name, 0) + self.in_shared_ram.get(name, 0)


class Tier(str, enum.Enum):
    """Where a block's weights live between forwards; the names the report, the CLI's JSON and the UI share."""

    RESIDENT = "resident"  # on the compute device for good
    DONOR = "donor_gpu"  # in a donor GPU's VRAM, streamed
    PINNED = "pinned_ram"  # page-locked RAM, streamed
    PAGEABLE = "pageable_ram"  # ordinary RAM, streamed (slower copies)
    DISK = "disk"  # left in the model file's mapping, read on demand


@dataclass(frozen=True)
class BlockPlacement:
    """Where one block's weights are stored, and whether they are streamed to the compute device."""

    name: str
    nbytes: int
    device: str
    streamed: bool
    pinned: bool = False
    disk: bool = False  # left in the model file's mapping and streamed from there
    reason: str = field(default="", compare=False)  # why the block got its tier, for the report (not the placement)
    encoded_nbytes: int = 0  # streamed smaller in the plan's stream format: its bytes so (0: streamed as stored)
    decode_scratch: int = 0  # temporaries its decode takes on the compute device beside the decode buffer

    @property
    def stream_nbytes(self) -> int:
        """Bytes its host buffer (or donor VRAM), its slot and each copy take: `nbytes` unless it is encoded."""
        return self.encoded_nbytes or self.nbytes

    @property
    def decodes(self) -> bool:
        """Streamed encoded: decoded into the compute device's decode buffer before it runs."""
        return self.streamed and self.encoded_nbytes > 0

    @property
    def tier(self) -> Tier:
        if not self.streamed:
            return Tier.RESIDENT
        if self.device != "cpu":
            return Tier.DONOR
        if self.disk:
            return Tier.DISK
        return Tier.PINNED if self.pinned else Tier.PAGEABLE


@dataclass(frozen=True)
class Plan:
    """A placement of every block; `report()` renders it for people."""

    model_name: str
    compute_device: str
    blocks: tuple[BlockPlacement, ...]
    rest_bytes: int
    prefetch: int
    requested_offload: int
    warnings: tuple[str, ...] = ()
    # What the machine looked like when this was planned; two plans that place every block alike are equal.
    others: tuple[Holding, ...] = field(default=(), compare=False)  # other DisTorch models' holdings/reservations
    ram_added: int = 0  # RAM this placement adds to what the model's weights already take
    pinned_elsewhere: int = field(default=0, compare=False)  # RAM the host program (ComfyUI) had pinned itself
    dtype_bytes: Mapping[str, int] = field(default_factory=dict)  # as in ModelSizes: what the sizes count
    dtype_source: str = ""
    # The model files as planned: reads check a file is still the same (a rewrite after planning raises).
    files: tuple["FileIdentity", ...] = field(default=(), compare=False)
    stream_format: str = "stored"  # how streamed blocks travel (a request.StreamFormat value)
    # How it was chosen (the report's "why"): a fixed amount or automatic, against which run budget, the pass the
    # cost model predicts for it, and why it has `prefetch` slots.
    mode: str = field(default="fixed", compare=False)  # "fixed" (virtual_vram_gb / expert string) or "auto"
    budget: ComputeBudget | None = field(default=None, compare=False)
    schedule: PassEstimate | None = field(default=None, compare=False)
    prefetch_reason: str = field(default="", compare=False)
    streamed_reason: str = field(default="", compare=False)  # when the cost model chose which blocks stream
    # The pass the placement this plan would replace predicts with the same timings (a re-plan of a placed model).
    current_schedule: PassEstimate | None = field(default=None, compare=False)

    @property
    def placement(self) -> dict[str, str]:
        """Block name → device that stores the block's weights."""
        return {b.name: b.device for b in self.blocks}

    @property
    def streamed(self) -> frozenset[str]:
        """Names of the blocks copied to the compute device just before their forward."""
        return frozenset(b.name for b in self.blocks if b.streamed)

    @property
    def streamed_bytes(self) -> int:
        """Bytes of the streamed blocks as they stream (held off the compute device, copied per forward): encoded in
        the plan's stream format; `streamed_stored_bytes` as stored."""
        return sum(b.stream_nbytes for b in self.blocks if b.streamed)

    @property
    def streamed_stored_bytes(self) -> int:
        """Bytes the streamed blocks take as stored: what leaves the compute device."""
        return sum(b.nbytes for b in self.blocks if b.streamed)

    @property
    def saved_bytes(self) -> int:
        """What the stream format saves in RAM (or donor VRAM) and on every forward's copies."""
        return self.streamed_stored_bytes - self.streamed_bytes

    @property
    def resident_bytes(self) -> int:
        """Weights kept on the compute device: resident blocks plus everything outside the blocks."""
        return self.rest_bytes + sum(b.nbytes for b in self.blocks if not b.streamed)

    @property
    def slot_bytes(self) -> int:
        """Bytes of one streaming slot: the largest streamed block as it streams."""
        return max((b.stream_nbytes for b in self.blocks if b.streamed), default=0)

    @property
    def decode_bytes(self) -> int:
        """The decode buffer on the compute device (the largest encoded block as stored) and its decode's scratch;
        0 when nothing streams encoded."""
        return _decode_footprint(self.blocks)

    @property
    def compute_bytes(self) -> int:
        """Planned weight memory on the compute device: resident weights, the streaming slots, the decode buffer."""
        return self.resident_bytes + self.prefetch * self.slot_bytes + self.decode_bytes

    @property
    def pinned_bytes(self) -> int:
        return sum(b.stream_nbytes for b in self.blocks if b.pinned)

    @property
    def disk_bytes(self) -> int:
        return sum(b.nbytes for b in self.blocks if b.tier is Tier.DISK)

    @property
    def bounce_bytes(self) -> int:
        """The page-locked host buffer a GPU reads disk-tier blocks into (a block's size as stored; none on the CPU
        or without a disk tier): pinned RAM beside the blocks' own, counted in `ram_added` and in the ledger."""
        if self.compute_device == "cpu" or not self.disk_bytes:
            return 0
        return max(b.nbytes for b in self.blocks if b.streamed)

    def holding(self, staged: bool = False) -> Holding:
        """This placement as a ledger entry."""
        donors: dict[str, int] = {}
        for block in self.blocks:
            if block.tier is Tier.DONOR:
                donors[block.device] = donors.get(block.device, 0) + block.stream_nbytes
        pageable = sum(b.stream_nbytes for b in self.blocks if b.tier is Tier.PAGEABLE)
        return Holding(self.model_name, self.pinned_bytes + self.bounce_bytes, pageable, self.disk_bytes,
                       tuple(sorted(donors.items())), self.ram_added, staged)

    def report(self) -> str:
        return format_report(self)


def plan_sizes(sizes: ModelSizes, *, compute_device: str, virtual_vram_gb: float = 0.0, donor_device: str = "cpu",
               expert_mode_allocations: str = "", memory: Mapping[str, int] | MemoryInventory | None = None,
               prefetch: int = 2, others: tuple[Holding, ...] | None = None, stream_format: str = "stored") -> Plan:
    """Plans which blocks stay on `compute_device` and which are streamed from where, on block sizes alone (from a
    live model or from a file header); reserves nothing (`distorch.plan` plans a live model and reserves it).

    Args:
        sizes: the model's blocks in execution order and the rest (`ModelSizes`).
        compute_device: where the forward runs, "cuda:N" or "cpu" (then streaming copies between CPU buffers).
        virtual_vram_gb: GB (GiB) of the model to move off the compute device (normal mode).
        donor_device: where moved blocks are stored in normal mode: "cpu" (pinned RAM) or another GPU;
            a donor GPU without room for all of them overflows into RAM.
        expert_mode_allocations: ComfyUI-MultiGPU expert string; when non-empty it replaces the two above.
        memory: free bytes per device (plus an optional "pinned" budget), or an inventory; probed when None.
        prefetch: streaming slots (blocks in flight) the plan reserves on the compute device.
        others: the memory other models hold or reserved (default: every entry of the process-wide ledger).
        stream_format: how streamed blocks are held and copied ("stored", "q8_0", "fp8_e4m3fn"); sizes without
            encoded sizes for it (`ModelSizes.encoded`) stream as stored.

    Raises:
        PlanError: when the placement does not fit the free memory, or the devices are unusable.
        AllocationError: when the expert string is malformed.
    """
    request = PlacementRequest.validate(compute_device, virtual_vram_gb, donor_device, expert_mode_allocations,
                                        prefetch=prefetch, stream_format=stream_format)
    return plan_request(sizes, request, memory=memory, others=LEDGER.holdings() if others is None else others)


def plan_request(sizes: ModelSizes, request: PlacementRequest, *,
                 memory: Mapping[str, int] | MemoryInventory | None = None, others: tuple[Holding, ...] = (),
                 budget: ComputeBudget | None = None, timings: Timings | None = None,
                 current: "Plan | None" = None) -> Plan:
    """The plan for a validated request: `plan_sizes` without the checks, and `others` given, never looked up.

    Args:
        budget: what this run may keep on the compute device (ComfyUI's weight budget for its workload). Auto mode
            plans the fewest streamed blocks that fit it; a fixed amount that does not fit it streams more (and
            says so). Without a budget, auto mode plans for the compute device's usable memory (no workload known
            yet) and a fixed amount is checked against that memory as before.
        timings: what a run measured (per-block forward times, copy rates); auto mode picks the prefetch depth
            that predicts the fastest pass with them (distorch.costmodel).
        current: the placement now (a staged model): a budget plan grows or shrinks its streamed set rather than
            spreading anew, so re-placing moves only the blocks the budget needs moved; with timings the plan also
            predicts the current placement's pass (`Plan.current_schedule`), to weigh a move by time.
    """
    compute_device = request.compute_device
    inventory = _inventory(memory)
    device = inventory_device(inventory, compute_device)
    others = tuple(others)
    spec = request.allocation
    if spec is not None:
        requested, tiers = _expert_targets(sizes, compute_device, spec, inventory)
    else:
        requested, tiers = _normal_targets(sizes, 0.0 if request.auto else request.virtual_vram_gb,
                                           request.donor_device)
    if request.auto and budget is None:
        budget = ComputeBudget(device.usable, source=f"{compute_device}'s usable memory (no run seen yet)")
    if budget is None:
        return _fixed_plan(sizes, request, inventory, others, tiers, requested)
    return _budget_plan(sizes, request, inventory, others, tiers, requested, budget, timings, current)


def _fixed_plan(sizes: ModelSizes, request: PlacementRequest, inventory: MemoryInventory, others: tuple,
                tiers: list, requested: int) -> Plan:
    """A fixed amount with no run budget known (the loader, the CLI without a workload): checked against the
    compute device's usable memory, a PlanError naming the amount that fits when it does not."""
    streamed = choose_streamed([n for _, n in sizes.blocks], requested)
    stream = _stream_nbytes(sizes, request.stream_format)
    option = _Option.of(sizes, request.compute_device, streamed, request.prefetch, tiers, inventory, others, stream)
    result = _make_plan(sizes, request, inventory, option, requested, tuple(_offload_warnings(sizes, requested)))
    _check_capacity(result, sizes, inventory, option.host)
    return result


def _budget_plan(sizes: ModelSizes, request: PlacementRequest, inventory: MemoryInventory, others: tuple,
                 tiers: list, requested: int, budget: ComputeBudget, timings: Timings | None,
                 current_plan: "Plan | None") -> Plan:
    block_bytes = [n for _, n in sizes.blocks]
    stream = _stream_nbytes(sizes, request.stream_format)
    as_streamed = [stream[name] for name, _ in sizes.blocks]
    copied = [n for n, _ in as_streamed]  # a copy moves the bytes as they stream
    keep = None if current_plan is None else current_plan.streamed
    current = None if keep is None else [i for i, (name, _) in enumerate(sizes.blocks) if name in keep]
    compute_s = _compute_times(timings, budget, len(block_bytes))
    resident_reason = _resident_reason(request, budget)
    depths = range(1, MAX_PREFETCH + 1) if request.auto and compute_s else (request.prefetch,)
    options: list[_Option] = []
    for depth in depths:
        streamed, fits = streamed_within(block_bytes, sizes.rest_bytes, budget.room, requested, depth, current,
                                         as_streamed)
        try:
            option = _Option.of(sizes, request.compute_device, streamed, depth, tiers, inventory, others, stream, fits,
                                resident_reason=resident_reason)
        except PlanError:
            if options:
                break  # a deeper prefetch streams blocks the storage tiers have no room for
            raise
        option = replace(option, estimate=estimate_pass(compute_s, copy_times(copied, option.tiers, timings), depth))
        if request.auto and compute_s:
            option = _hiding_copies(option, compute_s, copied, timings, block_bytes,
                                    lambda chosen, o=option: _Option.of(sizes, request.compute_device, chosen,
                                                                        o.prefetch, tiers, inventory, others, stream,
                                                                        o.fits, resident_reason=resident_reason))
        options.append(option)
    prefetch, why = (choose_prefetch([o.estimate for o in options], request.prefetch) if request.auto else
                     (request.prefetch, f"{request.prefetch} slots, as requested"))
    chosen = next(o for o in options if o.prefetch == prefetch)
    warnings = _offload_warnings(sizes, requested) + _budget_warnings(sizes, request, budget, chosen, requested)
    result = _make_plan(sizes, request, inventory, chosen, requested, tuple(warnings),
                        budget=budget, schedule=chosen.estimate, prefetch_reason=why,
                        streamed_reason=_streamed_reason(chosen),
                        current_schedule=_current_schedule(current_plan, sizes, compute_s, copied, timings))
    _check_capacity(result, sizes, inventory, chosen.host, compute_checked=False)
    return result


@dataclass(frozen=True)
class _Option:
    """One way to place the model: its streamed blocks at a prefetch depth, their storage, and its predicted pass."""

    prefetch: int
    placements: tuple[BlockPlacement, ...]
    host: "_HostRoom"
    fits: bool = True  # the compute-device part fits the run's budget
    estimate: PassEstimate | None = None
    spread: PassEstimate | None = None  # the even spread's pass, when the cost model chose other blocks

    @classmethod
    def of(cls, sizes, compute, streamed, prefetch, tiers, inventory, others, stream, fits=True,
           resident_reason: str = "not needed to reach the requested offload") -> "_Option":
        host = _HostRoom.of(sizes, compute, streamed, prefetch, inventory, others, stream)
        placements = _assign_storage(sizes, compute, streamed, tiers, inventory, host, stream, resident_reason)
        return cls(prefetch, placements, host, fits)

    @property
    def tiers(self) -> dict[int, str]:
        """Streamed block index -> tier value."""
        return {i: b.tier.value for i, b in enumerate(self.placements) if b.streamed}


def _make_plan(sizes: ModelSizes, request: PlacementRequest, inventory: MemoryInventory, option: _Option,
               requested: int, warnings: tuple[str, ...], **extra) -> Plan:
    return Plan(sizes.name, request.compute_device, option.placements, sizes.rest_bytes, option.prefetch, requested,
                warnings, option.host.others, option.host.added(option.placements), inventory.pinned_elsewhere,
                dtype_bytes=dict(sizes.dtype_bytes), dtype_source=sizes.dtype_source, files=sizes.files,
                stream_format=str(request.stream_format.value), mode="auto" if request.auto else "fixed", **extra)


def _stream_nbytes(sizes: ModelSizes, stream_format) -> dict[str, tuple[int, int]]:
    """Per block, (bytes as it streams in `stream_format`, decode scratch): its host buffer, donor VRAM, slot and copy.

    A block the format leaves as stored, or any block of sizes without encoded sizes (a file header), streams its
    stored bytes with no decode. A block left on the disk tier streams as stored too (`_assign_storage`).
    """
    encoded = sizes.encoded.get(str(getattr(stream_format, "value", stream_format)), {})
    return {name: encoded.get(name, (nbytes, 0)) for name, nbytes in sizes.blocks}


def _hiding_copies(option: _Option, compute_s, copied: list[int], timings: Timings | None, block_bytes: list[int],
                   rebuild) -> _Option:
    """`option` with the streamed blocks the cost model prefers (costmodel.hide_copies: blocks of the same size
    swapped to where their copies hide), when its storage allows them and they predict a faster pass."""
    def swappable(streamed: int, resident: int) -> bool:
        return block_bytes[streamed] == block_bytes[resident] and copied[streamed] == copied[resident]

    chosen, _ = hide_copies(compute_s, copy_times(copied, option.tiers, timings), option.prefetch, swappable)
    if set(chosen) == set(option.tiers):
        return option
    try:
        moved = rebuild(sorted(chosen))
    except PlanError:
        return option
    estimate = estimate_pass(compute_s, copy_times(copied, moved.tiers, timings), option.prefetch)
    if estimate.pass_s >= option.estimate.pass_s:
        return option
    return replace(moved, estimate=estimate, spread=option.estimate)


def _streamed_reason(option: _Option) -> str:
    if option.spread is None:
        return ""
    return (f"placed where their copies hide behind the forwards before them (cost model): predicted pass "
            f"{option.estimate.pass_s * 1000:.0f} ms, {option.spread.pass_s * 1000:.0f} ms spread evenly")


def _current_schedule(current: "Plan | None", sizes: ModelSizes, compute_s, copied: list[int],
                      timings: Timings | None) -> PassEstimate | None:
    """The pass the current placement predicts with these timings (None without a placement or measurements)."""
    if current is None or not compute_s:
        return None
    index = {name: i for i, (name, _) in enumerate(sizes.blocks)}
    tiers = {index[b.name]: b.tier.value for b in current.blocks if b.streamed and b.name in index}
    return estimate_pass(compute_s, copy_times(copied, tiers, timings), current.prefetch)


def _compute_times(timings: Timings | None, budget: ComputeBudget, blocks: int) -> tuple[float, ...]:
    """Measured forward times scaled to this run's activations; none when they were measured on other blocks."""
    if timings is None or len(timings.compute_s) != blocks:
        return ()
    return timings.compute_for(budget.activation_bytes)


def _resident_reason(request: PlacementRequest, budget: ComputeBudget) -> str:
    if request.auto:
        return "fits the budget"
    return "kept by the requested virtual_vram_gb"


def _budget_warnings(sizes: ModelSizes, request: PlacementRequest, budget: ComputeBudget, chosen: _Option,
                     requested: int) -> list[str]:
    compute = request.compute_device
    needed = sizes.rest_bytes + _block_footprint(chosen) + budget.extra_bytes
    if not chosen.fits:
        return [f"even with every block streamed {sizes.name} needs {format_gb(needed)} on {compute} (other "
                f"weights, {chosen.prefetch} slots, {format_gb(budget.extra_bytes)} of extras) but the budget for "
                f"this run is {format_gb(budget.weight_bytes)}: the other weights are loaded in full anyway (never "
                "cast layer by layer from RAM), so this run may run out of memory; lower the resolution, frames or "
                "batch, or free VRAM"]
    if request.auto:
        return []
    base = choose_streamed([n for _, n in sizes.blocks], requested)
    streamed = [i for i, b in enumerate(chosen.placements) if b.streamed]
    if len(streamed) <= len(base):
        return []
    extra = sum(b.nbytes for b in chosen.placements if b.streamed) - sum(sizes.blocks[i][1] for i in base)
    return [f"virtual_vram_gb {request.virtual_vram_gb:g} does not fit the budget for this run "
            f"({format_gb(budget.weight_bytes)} on {compute}): {len(streamed) - len(base)} more blocks streamed "
            f"({format_gb(extra)}) rather than cast layer by layer from RAM"]


def _block_footprint(option: _Option) -> int:
    """Compute-device bytes of the blocks: the resident ones, the slots and the decode buffer."""
    resident = sum(b.nbytes for b in option.placements if not b.streamed)
    slot = max((b.stream_nbytes for b in option.placements if b.streamed), default=0)
    return resident + option.prefetch * slot + _decode_footprint(option.placements)


def _decode_footprint(placements) -> int:
    """The decode buffer and scratch the encoded streamed blocks of `placements` need on the compute device."""
    return _decode_need((b.nbytes, b.decode_scratch) for b in placements if b.decodes)


def _decode_need(encoded) -> int:
    """The compute device's decode buffer for encoded blocks given as (bytes as stored, decode scratch): the largest
    block as stored plus the largest scratch; 0 without encoded blocks."""
    encoded = list(encoded)
    return max(n for n, _ in encoded) + max(s for _, s in encoded) if encoded else 0


def streamed_within(block_bytes: list[int], rest_bytes: int, room: int, requested: int,
                    prefetch: int, current: list[int] | None = None,
                    as_streamed: list[tuple[int, int]] | None = None) -> tuple[list[int], bool]:
    """Indices of the blocks to stream (at least `requested` bytes, spread evenly as `choose_streamed` spreads
    them) so that the rest, the resident blocks and `prefetch` slots fit `room`; and whether they fit at all
    (False: every block streamed and still over `room`).

    The slots are as large as the largest streamed block, so each block size is tried as the slot size (streaming
    only blocks up to it): a large block streamed would cost `prefetch` slots of its size. Of the choices that fit,
    the one streaming the fewest bytes wins; equal blocks (the usual model) make this a single choice.

    With `current` (the blocks streamed now), the choice grows or shrinks that set (`adjust_streamed`) rather than
    spreading anew, so a re-placement moves only the blocks the new budget needs moved.

    `as_streamed` (per block: bytes as streamed, decode scratch) sizes the slots of a stream format, plus the decode
    buffer its encoded blocks need; without it every block streams as stored.
    """
    as_streamed = as_streamed or [(n, 0) for n in block_bytes]

    def decode(chosen) -> int:
        return _decode_need((block_bytes[i], as_streamed[i][1]) for i in chosen if as_streamed[i][0] != block_bytes[i])

    def choose(sizes: list[int], target: int) -> list[int]:
        if current is None:
            return choose_streamed(sizes, target)
        return adjust_streamed(sizes, [i for i in current if sizes[i]], target)

    def fits(chosen: list[int]) -> bool:
        slot = max((as_streamed[i][0] for i in chosen), default=0)
        resident = sum(block_bytes) - sum(block_bytes[i] for i in chosen)
        return rest_bytes + resident + prefetch * slot + decode(chosen) <= room

    requested_only = choose(block_bytes, requested)
    if fits(requested_only):
        return requested_only, True
    must_leave = rest_bytes + sum(block_bytes) - room
    fitting = []
    for cap in sorted({as_streamed[i][0] for i, n in enumerate(block_bytes) if n}):
        eligible = [n if as_streamed[i][0] <= cap else 0 for i, n in enumerate(block_bytes)]
        target = max(requested, must_leave + prefetch * cap + decode([i for i, n in enumerate(eligible) if n]))
        if target <= sum(eligible):
            chosen = choose(eligible, target)
            if fits(chosen):
                fitting.append(chosen)
    if not fitting:
        return [i for i, n in enumerate(block_bytes) if n], False
    return min(fitting, key=lambda chosen: (sum(block_bytes[i] for i in chosen), len(chosen))), True


def choose_streamed(block_bytes: list[int], target: int) -> list[int]:
    """Indices of the blocks to stream so that at least `target` bytes leave, spread evenly in order.

    Error diffusion: block i is streamed when the streamed total, counting half of block i, stays below
    the target's pro-rata share up to and including block i; a short fix-up adds the resident block
    farthest from any streamed one until the target is met. The result exceeds the target by less
    than one block.
    """
    total = sum(block_bytes)
    if target <= 0 or total == 0:
        return []
    if target >= total:
        return [i for i, nbytes in enumerate(block_bytes) if nbytes]
    share = target / total
    chosen, desired, streamed = [], 0.0, 0
    for index, nbytes in enumerate(block_bytes):
        desired += share * nbytes
        if nbytes and streamed + nbytes / 2 < desired:
            chosen.append(index)
            streamed += nbytes
    while streamed < target:
        index = _farthest_resident(block_bytes, chosen)
        chosen.append(index)
        streamed += block_bytes[index]
    return sorted(chosen)


def adjust_streamed(block_bytes: list[int], current: list[int], target: int) -> list[int]:
    """`current` streamed blocks grown or shrunk to the fewest that reach `target` bytes, moving as few blocks as
    possible: a block is added where it is farthest from any streamed one (as `choose_streamed`'s fix-up does), and
    removed where streamed blocks crowd most (the earlier of equals: a pass's first blocks have the least time to
    prefetch)."""
    chosen = sorted(current)
    streamed = sum(block_bytes[i] for i in chosen)
    while streamed < target and len(chosen) < sum(1 for n in block_bytes if n):
        index = _farthest_resident(block_bytes, chosen)
        chosen.append(index)
        streamed += block_bytes[index]
    while chosen:
        removable = [i for i in chosen if streamed - block_bytes[i] >= target]
        if not removable:
            break
        index = min(removable, key=lambda i: (min((abs(i - c) for c in chosen if c != i), default=0), i))
        chosen.remove(index)
        streamed -= block_bytes[index]
    return sorted(chosen)


def _farthest_resident(block_bytes: list[int], chosen: list[int]) -> int:
    taken = set(chosen)
    candidates = [i for i in range(len(block_bytes)) if i not in taken and block_bytes[i]]
    if not chosen:
        return candidates[len(candidates) // 2]
    # Ties go to the later block: the early blocks of a pass are the ones with the least time to prefetch.
    return max(candidates, key=lambda i: (min(abs(i - c) for c in chosen), i))


@dataclass(frozen=True)
class _StorageQuota:
    """A device that may hold streamed blocks (a donor GPU or "cpu") and its cap on their bytes; the `Tier` each
    block gets there (donor, pinned, pageable, disk) is chosen per block by `_assign_storage`."""

    device: str
    quota: int | None  # None: no limit beyond the device's free memory


def _normal_targets(sizes: ModelSizes, virtual_vram_gb: float, donor: str):
    tiers = [_StorageQuota(donor, None)]
    if donor != "cpu":
        tiers.append(_StorageQuota("cpu", None))  # what does not fit the donor GPU spills into RAM
    return min(gb_to_bytes(virtual_vram_gb), sizes.total_bytes), tiers


def _expert_targets(sizes: ModelSizes, compute: str, spec: AllocationSpec, inventory: MemoryInventory):
    amounts = _expert_amounts(sizes, spec, inventory)
    remainder = spec.remainder_device
    # The remainder device has no cap: what another device has no room for spills there.
    tiers = [_StorageQuota(d, None if d == remainder else amount) for d, amount in amounts.items() if d != compute]
    return sizes.total_bytes - amounts.get(compute, 0), tiers


def _expert_amounts(sizes: ModelSizes, spec: AllocationSpec, inventory: MemoryInventory) -> dict[str, int]:
    """Bytes of the model per device: the amounts in the order written, what is left to the remainder device.

    In order, as ComfyUI-MultiGPU fills them: 'cpu,8gb;cuda:0,8gb' on a 10 GB model keeps 2 GB on cuda:0.
    """
    if spec.mode is AllocationMode.RATIO:
        return _ratio_amounts(spec.ratio_shares(), sizes.total_bytes)
    amounts, left = {}, sizes.total_bytes
    for entry in spec.entries:
        take = 0 if entry.is_rest else min(left, _quota(spec, entry.amount, entry.device, inventory))
        amounts[entry.device] = take
        left -= take
    remainder = spec.remainder_device
    if remainder is not None:
        amounts[remainder] = amounts.get(remainder, 0) + left
    elif left > 0:
        covered = sizes.total_bytes - left
        raise PlanError(
            f"allocation {str(spec)!r} covers {format_gb(covered)} of the model's {format_gb(sizes.total_bytes)}: "
            "give one device '*' to take the rest")
    return amounts


def _ratio_amounts(shares: dict[str, float], total: int) -> dict[str, int]:
    # Cumulative rounding, so the amounts add up to the model's bytes exactly.
    amounts, done, cumulative = {}, 0, 0.0
    for device, share in shares.items():
        cumulative += share
        end = min(total, round(total * cumulative))
        amounts[device] = end - done
        done = end
    amounts[device] += total - done
    return amounts


def _quota(spec: AllocationSpec, amount, device: str, inventory: MemoryInventory) -> int:
    if spec.mode is AllocationMode.BYTES:
        return int(amount)
    return int(inventory_device(inventory, device).total * amount)


def _offload_warnings(sizes: ModelSizes, offload: int) -> list[str]:
    opaque = ([f"{len(sizes.opaque_blocks)} blocks of {sizes.name} hold weights DisTorch cannot stream yet (tensors "
               "without storage of their own: ComfyUI 0.8+ loads fp8-scaled and mixed-precision files so): those "
               "blocks are left to ComfyUI, which places them itself"] if sizes.opaque_blocks else [])
    if offload <= 0:
        return opaque
    if not sizes.blocks:
        return opaque or [f"no repeated blocks found in {sizes.name}: nothing can be streamed, the whole model stays "
                          "on the compute device"]
    if offload > sizes.block_bytes:
        return opaque + [f"asked to move {format_gb(offload)} but the blocks hold {format_gb(sizes.block_bytes)}: all "
                         f"blocks are streamed and {format_gb(sizes.rest_bytes)} of other weights stay on the compute "
                         "device"]
    return opaque


@dataclass(frozen=True)
class _HostRoom:
    """Host RAM and pinned RAM as this placement would use them, after what other models hold or reserved."""

    usable: int  # free RAM minus the safety reserve and other models' reservations not allocated yet
    moved: int  # streamed bytes already in ordinary RAM: staging moves them, adding nothing
    spillable: int  # streamed bytes in a file mapping, which may stay there (disk tier) if RAM is short
    compute_extra: int  # compute on the CPU: the slots plus resident weights not in host memory yet
    disk_bounce: int  # compute on a GPU: the page-locked host buffer (a slot's size) disk-tier blocks are read into
    pinned_budget: int  # the shared page-locking budget (0 when computing on the CPU)
    pinned_elsewhere: int  # of it, pinned by the host program (ComfyUI)
    pinned_by_others: int  # of it, held or reserved by other DisTorch models
    others: tuple[Holding, ...]  # the ledger's entries for the other models

    @classmethod
    def of(cls, sizes: ModelSizes, compute: str, streamed: list[int], prefetch: int, inventory: MemoryInventory,
           others: tuple[Holding, ...], stream: Mapping[str, tuple[int, int]]) -> "_HostRoom":
        blocks = [sizes.blocks[i] for i in streamed]
        extra = 0
        if compute == "cpu":
            slots = prefetch * max((stream[name][0] for name, _ in blocks), default=0) + _decode_bytes(blocks, stream)
            resident = sizes.total_bytes - sum(n for _, n in blocks)
            resident_on_host = max(0, sizes.bytes_on.get("cpu", 0) - sum(sizes.on_host(name) for name, _ in blocks))
            extra = slots + max(0, resident - resident_on_host)
        usable = inventory_device(inventory, "cpu").usable if "cpu" in inventory.devices else 0
        return cls(usable=max(0, usable - sum(h.pending_ram for h in others)),
                   moved=sum(sizes.in_ram.get(name, 0) for name, _ in blocks),
                   spillable=sum(n for name, n in blocks if sizes.file_backed(name, n)),
                   compute_extra=extra,
                   disk_bounce=max((n for _, n in blocks), default=0) if compute != "cpu" else 0,
                   pinned_budget=inventory.pinned_budget if compute != "cpu" else 0,
                   pinned_elsewhere=inventory.pinned_elsewhere,
                   pinned_by_others=sum(h.pinned for h in others),
                   others=others)

    @property
    def pinned_left(self) -> int:
        return max(0, self.pinned_budget - self.pinned_elsewhere - self.pinned_by_others)

    @property
    def tier_room(self) -> int:
        """Streamed bytes the RAM tier can take: blocks that move within RAM or may stay in their file count free."""
        return max(0, self.usable + self.moved + self.spillable - self.compute_extra)

    def added(self, placements) -> int:
        """RAM the placement adds beyond what the model's weights already take."""
        staged = sum(b.stream_nbytes for b in placements if b.streamed and b.device == "cpu" and not b.disk)
        bounce = self.disk_bounce if any(b.disk for b in placements) else 0
        return max(0, staged - self.moved + self.compute_extra) + bounce


def _decode_bytes(blocks, stream: Mapping[str, tuple[int, int]]) -> int:
    """The decode buffer and scratch the encoded ones of `blocks` (name, stored bytes) need on the compute device."""
    return _decode_need((nbytes, stream[name][1]) for name, nbytes in blocks if stream[name][0] != nbytes)


def _assign_storage(sizes, compute, streamed, tiers, inventory, host: _HostRoom, stream: Mapping[str, tuple[int, int]],
                    resident_reason: str = "not needed to reach the requested offload") -> tuple[BlockPlacement, ...]:
    """Spreads the streamed blocks over the storage tiers (by error diffusion, within each tier's room), leaves
    file-backed blocks on the disk tier while RAM is short, and page-locks RAM blocks within the pinned budget.
    Sizes as streamed (`stream`); a block left on the disk tier streams its stored bytes from the file."""
    streamed_bytes = sum(stream[sizes.blocks[i][0]][0] for i in streamed)
    largest = max((stream[sizes.blocks[i][0]][0] for i in streamed), default=0)
    room = _tier_rooms(tiers, sizes, inventory, largest, host)
    if streamed_bytes > sum(room.values()):
        raise PlanError(
            f"{format_gb(streamed_bytes)} of streamed blocks need room on {', '.join(room)} but only "
            f"{format_gb(sum(room.values()))} is usable there (free memory minus the safety reserve and what "
            "other DisTorch models reserved); lower virtual_vram_gb or choose another donor_device")
    planned = _planned_amounts(tiers, room, streamed_bytes)
    assigned = {t.device: 0 for t in tiers}
    devices, done = {}, 0
    for index in streamed:
        name = sizes.blocks[index][0]
        nbytes = stream[name][0]
        devices[index] = _pick_tier(tiers, planned, assigned, room, nbytes, done, name)
        assigned[devices[index]] += nbytes
        done += nbytes
    on_disk = _disk_blocks(sizes, devices, host, stream)
    # A GPU reading a disk tier pins its bounce buffer out of the same budget.
    placements, pinned_left = [], max(0, host.pinned_left - (host.disk_bounce if on_disk else 0))
    for index, (name, nbytes) in enumerate(sizes.blocks):
        if index not in devices:
            placements.append(BlockPlacement(name, nbytes, compute, streamed=False, reason=resident_reason))
            continue
        device, disk = devices[index], index in on_disk
        encoded, scratch = (0, 0) if disk or stream[name][0] == nbytes else stream[name]
        held = encoded or nbytes
        pinned = device == "cpu" and not disk and held <= pinned_left and compute != "cpu"
        pinned_left -= held if pinned else 0
        block = BlockPlacement(name, nbytes, device, streamed=True, pinned=pinned, disk=disk, encoded_nbytes=encoded,
                               decode_scratch=scratch)
        placements.append(replace(block, reason=_reason(block, compute, tiers, host)))
    return tuple(placements)


def _disk_blocks(sizes: ModelSizes, devices: dict[int, str], host: _HostRoom,
                 stream: Mapping[str, tuple[int, int]]) -> set[int]:
    """Blocks that stay in their file mapping because staging all RAM-tier blocks (as streamed) would not fit, spread
    evenly."""
    in_ram = [i for i, device in devices.items() if device == "cpu"]
    staged = sum(stream[sizes.blocks[i][0]][0] for i in in_ram)
    shortfall = max(0, staged - host.moved + host.compute_extra) - host.usable
    candidates = [i for i in in_ram if sizes.file_backed(*sizes.blocks[i])]
    if shortfall <= 0 or not candidates:
        return set()
    shortfall += host.disk_bounce  # reading from the disk needs its bounce buffer too
    picked = choose_streamed([stream[sizes.blocks[i][0]][0] for i in candidates], shortfall)
    return {candidates[j] for j in picked}


def _reason(block: BlockPlacement, compute: str, tiers, host: _HostRoom) -> str:
    if block.tier is Tier.DONOR:
        return f"donor GPU {block.device} has room"
    spilled = next((f"beyond donor GPU {t.device}'s share; " for t in tiers if t.device != "cpu"), "")
    if block.tier is Tier.DISK:
        return (f"{spilled}RAM short: {format_gb(host.usable)} usable after the safety reserve and other "
                "models' reservations; streamed from the model file")
    if block.tier is Tier.PINNED:
        return f"{spilled}within the pinned budget"
    if compute == "cpu":
        return "compute on the CPU: copies stay in RAM, nothing to pin"
    return (f"{spilled}pinned budget used up ({format_gb(host.pinned_budget)}: "
            f"{format_gb(host.pinned_by_others)} other DisTorch models, {format_gb(host.pinned_elsewhere)} ComfyUI)")


def _tier_rooms(tiers, sizes: ModelSizes, inventory: MemoryInventory, largest_block: int,
                host: _HostRoom) -> dict[str, int]:
    rooms = {}
    for tier in tiers:
        if tier.device == "cpu":
            rooms["cpu"] = host.tier_room
        else:
            rooms[tier.device] = _device_room(tier.device, sizes, inventory, host)
    bounded = [t for t in tiers if t.quota is not None]
    for tier in bounded:
        quota = tier.quota
        if len(bounded) == len(tiers) and tier is bounded[-1]:
            # Without a '*' the last device absorbs the rounding to whole blocks (at most one block).
            quota += largest_block
        rooms[tier.device] = min(rooms[tier.device], quota)
    return rooms


def _device_room(device: str, sizes: ModelSizes, inventory: MemoryInventory, host: _HostRoom) -> int:
    """A GPU's usable memory, plus the model's weights already there, minus other models' pending reservations."""
    pending = sum(h.pending_on(device) for h in host.others)
    return inventory_device(inventory, device).usable + sizes.bytes_on.get(device, 0) - pending


def _planned_amounts(tiers, room, total) -> dict[str, int]:
    # Devices with a stated amount first (in order), then the uncapped ones take what is left.
    planned, left = {}, total
    for tier in sorted(tiers, key=lambda t: t.quota is None):
        planned[tier.device] = min(room[tier.device], left)
        left -= planned[tier.device]
    return planned


def _pick_tier(tiers, planned, assigned, room, nbytes, done, name) -> str:
    total = sum(planned.values()) or 1
    progress = (done + nbytes) / total
    fitting = [t.device for t in tiers if assigned[t.device] + nbytes <= room[t.device]]
    if not fitting:
        rooms = ", ".join(f"{d} {format_gb(room[d] - assigned[d])}" for d in room)
        raise PlanError(f"block {name!r} ({format_gb(nbytes)}) fits on no storage device (room left: {rooms}); "
                        "lower virtual_vram_gb or give the allocation more room")
    return max(fitting, key=lambda d: (planned[d] * progress - assigned[d], -fitting.index(d)))


def _check_capacity(result: Plan, sizes: ModelSizes, inventory: MemoryInventory, host: _HostRoom,
                    compute_checked: bool = True) -> None:
    """Raises when a device or RAM cannot hold its part; the compute device only when `compute_checked` (a run's
    budget replaces that check: what does not fit it is a warning, see `_budget_warnings`)."""
    needed: dict[str, int] = {}
    if result.compute_device != "cpu" and compute_checked:
        needed[result.compute_device] = result.compute_bytes
    for block in result.blocks:
        if block.streamed and block.device != "cpu":
            needed[block.device] = needed.get(block.device, 0) + block.stream_nbytes
    for device, nbytes in needed.items():
        room = _device_room(device, sizes, inventory, host)
        if nbytes > room:
            raise PlanError(_capacity_message(result, device, nbytes, room))
    if result.ram_added > host.usable:
        raise PlanError(f"{result.model_name} needs {format_gb(result.ram_added)} more RAM (staged blocks not "
                        f"in RAM yet{', streaming slots, resident weights' if result.compute_device == 'cpu' else ''})"
                        f" but only {format_gb(host.usable)} is usable (free memory minus the safety reserve and "
                        "what other DisTorch models reserved); lower virtual_vram_gb or free RAM")


def _capacity_message(result: Plan, device: str, nbytes: int, room: int) -> str:
    message = (f"{result.model_name} needs {format_gb(nbytes)} on {device} but only {format_gb(room)} is usable "
               "(free memory minus the safety reserve)")
    if device == result.compute_device and device != "cpu":
        shortfall = nbytes - room
        suggestion = (result.requested_offload + shortfall) / (1024**3)
        message += f"; raise virtual_vram_gb to about {suggestion + 0.05:.1f}"
    return message


def _inventory(memory) -> MemoryInventory:
    if memory is None:
        return MemoryInventory.probe()
    if isinstance(memory, MemoryInventory):
        return memory
    return MemoryInventory.from_free_bytes(memory)


def inventory_device(inventory: MemoryInventory, device: str):
    try:
        return inventory.get(device)
    except ValueError as error:
        raise PlanError(str(error)) from None
