"""DisTorch: block-level virtual VRAM for torch models.

    plan = distorch.plan(model, compute_device="cuda:0", virtual_vram_gb=8)
    print(plan.report())
    with distorch.stream(model, plan):
        out = model(x)          # same result as the resident model, 8 GB less VRAM

Imports nothing from ComfyUI; the node pack in `nodes/` adapts it.
"""

from .allocation import AllocationError, AllocationMode, AllocationSpec, parse_allocation
from .api import StreamHandle, stream
from .blocks import ModelLayout, discover
from .engine import CpuCopyEngine, CudaCopyEngine
from .memory import MemoryInventory, safe_pinned_bytes
from .planner import ModelSizes, Plan, PlanError, plan, plan_sizes
from .streamer import BlockStreamer, StreamStats

__all__ = [
    "AllocationError",
    "AllocationMode",
    "AllocationSpec",
    "BlockStreamer",
    "CpuCopyEngine",
    "CudaCopyEngine",
    "MemoryInventory",
    "ModelLayout",
    "ModelSizes",
    "Plan",
    "PlanError",
    "StreamHandle",
    "StreamStats",
    "discover",
    "parse_allocation",
    "plan",
    "plan_sizes",
    "safe_pinned_bytes",
    "stream",
]
