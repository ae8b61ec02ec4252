"""Decides, block by block, where each repeated block of a model lives.

Tiers: the compute GPU (resident), a donor GPU (kept in its VRAM, streamed to the compute GPU) and
pinned RAM (streamed). Streamed blocks are spread among resident ones rather than taken as a
contiguous tail: while a resident block computes, the copy engine fetches the next streamed one, so
with copy time > compute time per block an interleaved plan reaches max(compute, transfer) per pass
where a tail plan stalls on every tail block (research/prefetch.md §4.2).

Everything here is pure arithmetic on block sizes and free memory, so it is deterministic and runs
without a GPU; `ModelSizes` can come from a live model or from a file header (the CLI).
"""

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .allocation import AllocationMode, AllocationSpec, is_device_name, parse_allocation
from .memory import MemoryInventory
from .report import format_report
from .units import format_gb, gb_to_bytes

if TYPE_CHECKING:  # torch stays unimported when plans come from file headers (the CLI)
    from torch import nn

    from .blocks import ModelLayout



class PlanError(ValueError):
    """The requested placement cannot be honoured; the message says why and what to change."""

    __module__ = "distorch"  # the import path users see in ComfyUI's error (not the custom_nodes file path)


@dataclass(frozen=True)
class ModelSizes:
    """What the planner needs to know about a model: block sizes in execution order and the rest."""

    name: str
    blocks: tuple[tuple[str, int], ...]
    rest_bytes: int
    bytes_on: Mapping[str, int] = field(default_factory=dict)
    # The weight formats these sizes count (dtype label -> bytes) and where they were read: "file" (a
    # header: the file's dtype) or "model" (a live model: the dtype the loader built, e.g. fp8 from bf16).
    dtype_bytes: Mapping[str, int] = field(default_factory=dict)
    dtype_source: str = ""

    @property
    def block_bytes(self) -> int:
        return sum(n for _, n in self.blocks)

    @property
    def total_bytes(self) -> int:
        return self.block_bytes + self.rest_bytes

    @classmethod
    def from_layout(cls, name: str, layout: "ModelLayout") -> "ModelSizes":
        from .blocks import device_name

        devices = {device_name(c.device) for b in layout.blocks for c in b.clusters}
        devices |= {device_name(c.device) for c in layout.rest}
        return cls(name, tuple((b.name, b.nbytes) for b in layout.blocks), layout.rest_bytes,
                   {d: layout.bytes_on(d) for d in devices})


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

    @property
    def tier(self) -> Tier:
        if not self.streamed:
            return Tier.RESIDENT
        if self.device != "cpu":
            return Tier.DONOR
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
    dtype_bytes: Mapping[str, int] = field(default_factory=dict)  # as in ModelSizes: what the sizes count
    dtype_source: str = ""

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
        return sum(b.nbytes for b in self.blocks if b.streamed)

    @property
    def resident_bytes(self) -> int:
        """Weights kept on the compute device: resident blocks plus everything outside the blocks."""
        return self.rest_bytes + sum(b.nbytes for b in self.blocks if not b.streamed)

    @property
    def slot_bytes(self) -> int:
        """Bytes of one streaming slot: the largest streamed block."""
        return max((b.nbytes for b in self.blocks if b.streamed), default=0)

    @property
    def compute_bytes(self) -> int:
        """Planned weight memory on the compute device: resident weights plus the streaming slots."""
        return self.resident_bytes + self.prefetch * self.slot_bytes

    @property
    def pinned_bytes(self) -> int:
        return sum(b.nbytes for b in self.blocks if b.pinned)

    def report(self) -> str:
        return format_report(self)


def plan(model: "nn.Module", *, compute_device: str, virtual_vram_gb: float = 0.0, donor_device: str = "cpu",
         expert_mode_allocations: str = "", memory: Mapping[str, int] | MemoryInventory | None = None,
         prefetch: int = 2) -> Plan:
    """Plans which blocks of `model` stay on `compute_device` and which are streamed from where.

    Args:
        model: any torch model; its repeated blocks are found by `distorch.blocks.discover`.
        compute_device: where the forward runs, "cuda:N" or "cpu" (then streaming copies between CPU buffers).
        virtual_vram_gb: GB (GiB) of the model to move off the compute device (normal mode).
        donor_device: where moved blocks are stored in normal mode: "cpu" (pinned RAM) or another GPU;
            a donor GPU without room for all of them overflows into RAM.
        expert_mode_allocations: ComfyUI-MultiGPU expert string; when non-empty it replaces the two above.
        memory: free bytes per device (plus an optional "pinned" budget), or an inventory; probed when None.
        prefetch: streaming slots (blocks in flight) the plan reserves on the compute device.

    Raises:
        PlanError: when the placement does not fit the free memory, or the devices are unusable.
        AllocationError: when the expert string is malformed.

    Example:
        >>> p = plan(model, compute_device="cuda:0", virtual_vram_gb=6, memory={"cuda:0": 12 << 30, "cpu": 64 << 30})
        >>> print(p.report())
    """
    from .blocks import bytes_by_dtype, discover

    sizes = ModelSizes.from_layout(type(model).__name__, discover(model))
    sizes = dataclasses.replace(sizes, dtype_bytes=bytes_by_dtype(model), dtype_source="model")
    return plan_sizes(sizes, compute_device=compute_device, virtual_vram_gb=virtual_vram_gb,
                      donor_device=donor_device, expert_mode_allocations=expert_mode_allocations,
                      memory=memory, prefetch=prefetch)


def plan_sizes(sizes: ModelSizes, *, compute_device: str, virtual_vram_gb: float = 0.0, donor_device: str = "cpu",
               expert_mode_allocations: str = "", memory: Mapping[str, int] | MemoryInventory | None = None,
               prefetch: int = 2) -> Plan:
    """`plan` on block sizes alone (from a live model or from a file header)."""
    compute_device = _check_device(compute_device, "compute_device")
    if prefetch < 1:
        raise PlanError(f"prefetch must be at least 1, got {prefetch}")
    inventory = _inventory(memory)
    inventory_device(inventory, compute_device)
    expert = (expert_mode_allocations or "").strip()
    if expert:
        offload, tiers = _expert_targets(sizes, compute_device, parse_allocation(expert), inventory)
    else:
        offload, tiers = _normal_targets(sizes, compute_device, virtual_vram_gb, donor_device)
    warnings = _offload_warnings(sizes, offload)
    streamed = choose_streamed([n for _, n in sizes.blocks], offload)
    placements = _assign_storage(sizes, compute_device, streamed, tiers, inventory)
    result = Plan(sizes.name, compute_device, placements, sizes.rest_bytes, prefetch, offload, tuple(warnings),
                  dtype_bytes=dict(sizes.dtype_bytes), dtype_source=sizes.dtype_source)
    _check_capacity(result, sizes, inventory)
    return result


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


def _farthest_resident(block_bytes: list[int], chosen: list[int]) -> int:
    taken = set(chosen)
    candidates = [i for i in range(len(block_bytes)) if i not in taken and block_bytes[i]]
    if not chosen:
        return candidates[len(candidates) // 2]
    # Ties go to the later block: the early blocks of a pass are the ones with the least time to prefetch.
    return max(candidates, key=lambda i: (min(abs(i - c) for c in chosen), i))


@dataclass(frozen=True)
class _Tier:
    device: str
    quota: int | None  # None: no limit beyond the device's free memory


def _normal_targets(sizes: ModelSizes, compute: str, virtual_vram_gb: float, donor: str):
    if virtual_vram_gb < 0:
        raise PlanError(f"virtual_vram_gb must not be negative, got {virtual_vram_gb}")
    donor = _check_device(donor, "donor_device")
    if compute == "cpu" and donor != "cpu":
        raise PlanError(f"compute_device 'cpu' streams from RAM only; donor_device {donor!r} is not usable")
    if donor == compute and compute != "cpu":
        raise PlanError(f"donor_device {donor!r} is the compute device; choose 'cpu' or another GPU")
    tiers = [_Tier(donor, None)]
    if donor != "cpu":
        tiers.append(_Tier("cpu", None))  # what does not fit the donor GPU spills into RAM
    return min(gb_to_bytes(virtual_vram_gb), sizes.total_bytes), tiers


def _expert_targets(sizes: ModelSizes, compute: str, spec: AllocationSpec, inventory: MemoryInventory):
    if compute == "cpu":
        raise PlanError("expert allocations place blocks across devices for a GPU compute device; "
                        "with compute_device 'cpu' use virtual_vram_gb instead")
    amounts = _expert_amounts(sizes, spec, inventory)
    remainder = spec.remainder_device
    # The remainder device has no cap: what another device has no room for spills there.
    tiers = [_Tier(d, None if d == remainder else amount) for d, amount in amounts.items() if d != compute]
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
    if offload <= 0:
        return []
    if not sizes.blocks:
        return [f"no repeated blocks found in {sizes.name}: nothing can be streamed, the whole model stays "
                "on the compute device"]
    if offload > sizes.block_bytes:
        return [f"asked to move {format_gb(offload)} but the blocks hold {format_gb(sizes.block_bytes)}: all blocks "
                f"are streamed and {format_gb(sizes.rest_bytes)} of other weights stay on the compute device"]
    return []


def _assign_storage(sizes, compute, streamed, tiers, inventory) -> tuple[BlockPlacement, ...]:
    """Spreads the streamed blocks over the storage tiers (by error diffusion, within each tier's room)."""
    streamed_bytes = sum(sizes.blocks[i][1] for i in streamed)
    largest = max((sizes.blocks[i][1] for i in streamed), default=0)
    room = _tier_rooms(tiers, sizes, inventory, largest)
    if streamed_bytes > sum(room.values()):
        raise PlanError(
            f"{format_gb(streamed_bytes)} of streamed blocks need room on {', '.join(room)} but only "
            f"{format_gb(sum(room.values()))} is usable there (free memory minus the safety reserve); "
            "lower virtual_vram_gb or choose another donor_device")
    planned = _planned_amounts(tiers, room, streamed_bytes)
    assigned = {t.device: 0 for t in tiers}
    pinned_left = inventory.pinned_budget if compute != "cpu" else 0
    streamed_set, placements, done = set(streamed), [], 0
    for index, (name, nbytes) in enumerate(sizes.blocks):
        if index not in streamed_set:
            placements.append(BlockPlacement(name, nbytes, compute, streamed=False))
            continue
        device = _pick_tier(tiers, planned, assigned, room, nbytes, done, name)
        assigned[device] += nbytes
        done += nbytes
        pinned = device == "cpu" and compute != "cpu" and nbytes <= pinned_left
        pinned_left -= nbytes if pinned else 0
        placements.append(BlockPlacement(name, nbytes, device, streamed=True, pinned=pinned))
    return tuple(placements)


def _tier_rooms(tiers, sizes: ModelSizes, inventory: MemoryInventory, largest_block: int) -> dict[str, int]:
    rooms = {}
    for tier in tiers:
        mem = inventory_device(inventory, tier.device)
        rooms[tier.device] = mem.usable + sizes.bytes_on.get(tier.device, 0)
    bounded = [t for t in tiers if t.quota is not None]
    for tier in bounded:
        quota = tier.quota
        if len(bounded) == len(tiers) and tier is bounded[-1]:
            # Without a '*' the last device absorbs the rounding to whole blocks (at most one block).
            quota += largest_block
        rooms[tier.device] = min(rooms[tier.device], quota)
    return rooms


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


def _check_capacity(result: Plan, sizes: ModelSizes, inventory: MemoryInventory) -> None:
    needed = {result.compute_device: result.compute_bytes}
    for block in result.blocks:
        if block.streamed:
            needed[block.device] = needed.get(block.device, 0) + block.nbytes
    for device, nbytes in needed.items():
        mem = inventory_device(inventory, device)
        room = mem.usable + sizes.bytes_on.get(device, 0)
        if nbytes > room:
            raise PlanError(_capacity_message(result, device, nbytes, room))


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


def _check_device(device: str, what: str) -> str:
    name = str(device).strip().lower()
    if name == "cuda":
        name = "cuda:0"
    if not is_device_name(name):
        raise PlanError(f"{what} {device!r} is not a device DisTorch can use: write 'cpu' or 'cuda:N'")
    return name
