"""DisTorch: block-level virtual VRAM for torch models.

    plan = distorch.plan(model, compute_device="cuda:0", virtual_vram_gb=8)
    print(plan.report())
    with distorch.stream(model, plan):
        out = model(x)          # same result as the resident model, 8 GB less VRAM

Imports nothing from ComfyUI; the node pack in `nodes/` adapts it.
"""

import importlib

from .allocation import AllocationError, AllocationMode, AllocationSpec, parse_allocation
from .memory import MemoryInventory, safe_pinned_bytes
from .planner import ModelSizes, Plan, Tier, plan_sizes
from .request import PlacementRequest, PlanError, StreamFormat

# The runtime half (torch) loads on first use: `python -m distorch plan` answers from a file header
# without importing torch. `plan` (of a live model) is runtime: it discovers the model's blocks.
_LAZY = {
    "StreamHandle": "apply_plan", "stream": "apply_plan",
    "LayoutMismatch": "placement", "Placement": "placement", "plan": "placement",
    "ModelLayout": "blocks", "discover": "blocks",
    "CpuCopyEngine": "engine", "CudaCopyEngine": "engine",
    "BlockStreamer": "streamer", "StreamStats": "streamer",
    "ModelFileChanged": "files", "ModelFileError": "files",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'distorch' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "AllocationError",
    "AllocationMode",
    "AllocationSpec",
    "BlockStreamer",
    "CpuCopyEngine",
    "CudaCopyEngine",
    "LayoutMismatch",
    "MemoryInventory",
    "ModelFileChanged",
    "ModelFileError",
    "ModelLayout",
    "ModelSizes",
    "Plan",
    "PlanError",
    "Placement",
    "PlacementRequest",
    "StreamHandle",
    "StreamFormat",
    "StreamStats",
    "Tier",
    "discover",
    "parse_allocation",
    "plan",
    "plan_sizes",
    "safe_pinned_bytes",
    "stream",
]
