"""Free and total memory per device, and how much host RAM may be pinned safely.

The planner only ever sees a `MemoryInventory`, so tests and the CLI can describe any machine
(`MemoryInventory.from_free_bytes({"cuda:0": 12 * GIB, "cpu": 64 * GIB})`) without a GPU.
"""

import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

import psutil

from .units import GIB, MIB

logger = logging.getLogger("distorch.memory")

# Kept free on a GPU for activations, cuDNN/cuBLAS workspaces and the CUDA context of other libraries.
GPU_RESERVE_FIXED = 256 * MIB
GPU_RESERVE_SHARE = 0.05
# Kept free in RAM for the OS, ComfyUI itself and the page cache of files being read.
RAM_RESERVE_FIXED = 1 * GIB
RAM_RESERVE_SHARE = 0.10

_CGROUP_LIMIT_FILES = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")
_CGROUP_USAGE_FILES = ("/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory/memory.usage_in_bytes")


@dataclass(frozen=True)
class DeviceMemory:
    """Free and total bytes of one device at the time of the probe."""

    device: str
    free: int
    total: int

    @property
    def reserve(self) -> int:
        """Bytes the planner leaves untouched on this device."""
        if self.device == "cpu":
            return int(RAM_RESERVE_FIXED + RAM_RESERVE_SHARE * self.total)
        return int(GPU_RESERVE_FIXED + GPU_RESERVE_SHARE * self.total)

    @property
    def usable(self) -> int:
        return max(0, self.free - self.reserve)


@dataclass(frozen=True)
class MemoryInventory:
    """Memory of every device the planner may use, plus the pinned-RAM budget and what others pinned of it.

    DisTorch models share `pinned_budget` through the ledger; `pinned_elsewhere` is what the host program
    (ComfyUI's own offloaded weights, on cores that report it) already page-locked.
    """

    devices: Mapping[str, DeviceMemory] = field(default_factory=dict)
    pinned_budget: int = 0
    pinned_elsewhere: int = 0

    def get(self, device: str) -> DeviceMemory:
        try:
            return self.devices[device]
        except KeyError:
            known = ", ".join(sorted(self.devices)) or "none"
            raise ValueError(f"device {device!r} is not available (known devices: {known})") from None

    @classmethod
    def from_free_bytes(cls, free: Mapping[str, int], pinned_budget: int | None = None) -> "MemoryInventory":
        """An inventory from free bytes per device (totals are taken equal to the free bytes).

        A `"pinned"` key, if present, sets the pinned-RAM budget; otherwise it follows from the
        "cpu" entry with the same rule as a real probe.
        """
        devices = {}
        for device, nbytes in free.items():
            if device == "pinned":
                continue
            devices[device] = DeviceMemory(device, int(nbytes), int(nbytes))
        if pinned_budget is None:
            pinned_budget = free.get("pinned")
        if pinned_budget is None:
            cpu = devices.get("cpu")
            pinned_budget = safe_pinned_bytes(cpu.total, 0) if cpu else 0
        return cls(devices, int(pinned_budget))

    @classmethod
    def probe(cls) -> "MemoryInventory":
        """Reads the machine: every CUDA device and system RAM (clamped to a cgroup limit)."""
        import torch  # only here: planning from a file header must not pay for importing torch

        devices = {"cpu": _probe_ram()}
        if torch.cuda.is_available():
            for index in range(torch.cuda.device_count()):
                devices[f"cuda:{index}"] = _probe_cuda(index)
        swap = psutil.swap_memory().total
        return cls(devices, safe_pinned_bytes(devices["cpu"].total, swap))


def safe_pinned_bytes(ram_total: int, swap_total: int) -> int:
    """How much RAM may be page-locked without starving the OS.

    Windows (WDDM) refuses pinning well before RAM is full, so the cap there is 40% of RAM; on Linux
    pinning up to RAM - 4 GB is fine unless swap is counted on, which pinned pages cannot use.
    """
    if sys.platform == "win32":
        return int(0.4 * ram_total)
    linux_cap = min(0.9 * ram_total, ram_total - 4 * GIB, ram_total + swap_total - 16 * GIB)
    return int(max(0.4 * ram_total, linux_cap))


def _probe_ram() -> DeviceMemory:
    vm = psutil.virtual_memory()
    total, free = vm.total, vm.available
    limit = _read_cgroup(_CGROUP_LIMIT_FILES)
    if limit is not None and limit < total:
        # psutil reports the host's RAM; inside a container the cgroup limit is what counts.
        usage = _read_cgroup(_CGROUP_USAGE_FILES) or 0
        total, free = limit, min(free, max(0, limit - usage))
    return DeviceMemory("cpu", int(free), int(total))


def _probe_cuda(index: int) -> DeviceMemory:
    import torch

    free, total = torch.cuda.mem_get_info(index)
    # Blocks cached by torch's allocator are free for our tensors too, though the driver counts them used.
    cached = torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
    return DeviceMemory(f"cuda:{index}", int(free + cached), int(total))


def _read_cgroup(paths: tuple[str, ...]) -> int | None:
    for path in paths:
        if not os.path.exists(path):
            continue
        try:
            with open(path) as handle:
                text = handle.read().strip()
        except OSError:
            continue
        if text.isdigit():
            return int(text)
    return None
