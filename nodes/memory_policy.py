"""ComfyUI's memory policy, read in one place: what DisTorch may take of the compute GPU and of pinned RAM.

Everything core decides about memory and DisTorch must honour is read here, feature-checked so every core
from 0.3.64 on works:
- the compute GPU: its total memory (`get_total_memory`, which ComfyUI frees for the model it loads) minus core's
  minimum inference reserve and `--vram-headroom` (ComfyUI 2026);
- pinned RAM, one rule (`CorePinning`): `--disable-pinned-memory` (or a cap <= 0) turns pinning off; otherwise
  core's cap (`MAX_PINNED_MEMORY`, 0.8+) bounds what core (`TOTAL_PINNED_MEMORY`) and DisTorch page-lock together.
  0.3.64 sets no cap and pins nothing itself.
The rule is applied at two moments. When the loader plans, the budget is that cap (never above DisTorch's own
OS-safe share of RAM, `distorch.memory.safe_pinned_bytes`) with core's pinned bytes counted as taken, and the
ledger subtracts what other DisTorch models pinned. When the model is staged, maybe minutes later, core may have
pinned more: the streamer pins only if core's cap still has room, after core's Dynamic VRAM models are asked to
give up registrations (`ensure_pin_registerable`, 0.33+); the plan already kept DisTorch within its safe share.
"""

import contextlib
from dataclasses import dataclass

import comfy.model_management as mm
import torch

from ..distorch import MemoryInventory, PlacementRequest, safe_pinned_bytes
from ..distorch.memory import DeviceMemory


@dataclass(frozen=True)
class CorePinning:
    """Core's pinned-RAM policy at one moment."""

    allowed: bool  # False with --disable-pinned-memory, or a cap <= 0 (a GPU core does not pin on)
    cap: int | None  # bytes core and DisTorch may page-lock together; None: core sets no cap (0.3.64)
    pinned_by_core: int  # of the cap, what core has pinned itself

    @classmethod
    def read(cls) -> "CorePinning":
        if getattr(getattr(mm, "args", None), "disable_pinned_memory", False):
            return cls(False, 0, 0)
        limit = getattr(mm, "MAX_PINNED_MEMORY", None)
        if limit is None:
            return cls(True, None, 0)
        return cls(int(limit) > 0, max(0, int(limit)), max(0, int(getattr(mm, "TOTAL_PINNED_MEMORY", 0))))

    def budget(self, ram_total: int) -> int:
        """The pinned RAM DisTorch models may plan with (shared through the ledger), core's part included."""
        if not self.allowed:
            return 0
        safe = safe_pinned_bytes(ram_total, 0)
        return safe if self.cap is None else min(safe, self.cap)

    def has_room(self, nbytes: int) -> bool:
        return self.allowed and (self.cap is None or self.pinned_by_core + nbytes <= self.cap)


def pinned_budget(ram_total: int) -> tuple[int, int]:
    """(budget, pinned by core) for planning: see `CorePinning.budget`."""
    pinning = CorePinning.read()
    return pinning.budget(ram_total), pinning.pinned_by_core


def may_pin(nbytes: int) -> bool:
    """Whether the streamer may page-lock `nbytes` of staging memory now (the same rule, at staging time)."""
    pinning = CorePinning.read()
    if not pinning.allowed or pinning.cap is None:
        return pinning.allowed
    make_room = getattr(mm, "ensure_pin_registerable", None)
    if make_room is not None and nbytes > 0:
        make_room(nbytes)
        pinning = CorePinning.read()
    return pinning.has_room(nbytes)


def loader_inventory(request: PlacementRequest) -> MemoryInventory:
    """Memory as DisTorch plans it: the compute GPU as ComfyUI can free it, donors and RAM as they are.

    ComfyUI evicts other models before loading this one, so the compute GPU counts with its total
    memory minus ComfyUI's own inference reserve; a donor GPU is not managed by ComfyUI for us, so
    only its free memory counts.
    """
    probed = MemoryInventory.probe()
    devices = dict(probed.devices)
    compute = request.compute_device
    if compute != "cpu":
        total = int(mm.get_total_memory(torch.device(compute)))
        devices[compute] = DeviceMemory(compute, max(0, total - int(mm.minimum_inference_memory()) - _headroom()),
                                        total)
    budget, pinned_by_core = pinned_budget(devices["cpu"].total)
    return MemoryInventory(devices, budget, pinned_elsewhere=pinned_by_core)


def _headroom() -> int:
    """--vram-headroom (ComfyUI 2026): VRAM core keeps completely free, counting other applications."""
    gigabytes = getattr(getattr(mm, "args", None), "vram_headroom", 0) or 0
    return int(gigabytes * 1024**3)


def outside_memory_compiler():
    """Slots and staging buffers live as long as the model, so ComfyUI's memory compiler (0.35+: it records
    the allocations made inside a model's forward and replays them) must not record them: they are made
    with its recording paused. Cores without the compiler have nothing to pause."""
    try:
        from comfy.model_prefetch import pause_malloc_graph
    except ImportError:
        return contextlib.nullcontext()
    return pause_malloc_graph()
