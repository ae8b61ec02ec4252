"""`distorch.stream`: applies a plan to a live model and gives back a handle that undoes it."""

import logging
import re

import torch
from torch import nn

from .blocks import TensorCluster, discover
from .planner import Plan, PlanError
from .streamer import BlockStreamer, StoragePlacement, StreamStats

logger = logging.getLogger("distorch.api")

_HANDLE_ATTRIBUTE = "_distorch_stream"


class ResidentPlacement:
    """Moves the resident weights (rest + resident blocks) to the compute device, tied tensors once."""

    def __init__(self, clusters: list[TensorCluster], device: torch.device):
        self.device = device
        self._moved = [c for c in clusters if c.device != device]
        self._copies: list[torch.Tensor] = []  # each moved cluster's bytes on the compute device

    def apply(self) -> None:
        self._copies = [cluster.source().to(self.device) for cluster in self._moved]
        for cluster, flat in zip(self._moved, self._copies):
            cluster.point_into(flat)

    def undo(self) -> None:
        for cluster, flat in zip(self._moved, self._copies):
            cluster.point_into(flat.to(cluster.device))
        self._copies = []


class StreamHandle:
    """A model being streamed; `close()` restores every tensor to its original device."""

    def __init__(self, model: nn.Module, plan: Plan, streamer: BlockStreamer, resident: ResidentPlacement):
        self.model = model
        self.plan = plan
        self.streamer = streamer
        self._resident = resident

    def stats(self) -> StreamStats:
        return self.streamer.stats()

    def close(self) -> None:
        self.streamer.close()
        self._resident.undo()
        if getattr(self.model, _HANDLE_ATTRIBUTE, None) is self:
            delattr(self.model, _HANDLE_ATTRIBUTE)

    def __enter__(self) -> "StreamHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def stream(model: nn.Module, plan: Plan, *, prefetch: int = 2, debug: bool = False, engine=None) -> StreamHandle:
    """Places `model` by `plan`: resident weights on the compute device, streamed blocks copied in per forward.

    Args:
        model: the model `plan` was made for.
        plan: from `distorch.plan`.
        prefetch: streaming slots on the compute device: how many streamed blocks may be loaded or loading
            at once (1 = no overlap between consecutive streamed blocks; resident blocks still hide copies).
        debug: poison released slots with NaN bytes so a missing wait shows up as a wrong output.
        engine: copy engine override (tests pass `CpuCopyEngine(deferred=True)`).

    Returns:
        A handle; while it is open, the model's forward gives the same result as before. `close()` undoes it.

    Example:
        >>> with distorch.stream(model, distorch.plan(model, compute_device="cuda:0", virtual_vram_gb=4)):
        ...     out = model(x)
    """
    if getattr(model, _HANDLE_ATTRIBUTE, None) is not None:
        raise RuntimeError(f"{type(model).__name__} is already being streamed; close() the first handle")
    device = torch.device(plan.compute_device)
    _check_device_available(plan)
    layout = discover(model)
    _check_plan_matches(plan, layout)
    streamed_names = plan.streamed
    streamed = [b for b in layout.blocks if b.name in streamed_names]
    storage = {b.name: StoragePlacement(b.device, b.pinned) for b in plan.blocks if b.streamed}
    resident_clusters = list(layout.rest) + [c for b in layout.blocks if b.name not in streamed_names
                                             for c in b.clusters]
    if prefetch > plan.prefetch and streamed:
        logger.warning("distorch: prefetch %d exceeds the plan's %d slots; VRAM use is above the plan",
                       prefetch, plan.prefetch)
    resident = ResidentPlacement(resident_clusters, device)
    resident.apply()
    streamer = BlockStreamer(model, streamed, storage, device, prefetch=prefetch, debug=debug, engine=engine)
    try:
        streamer.open()
    except BaseException:
        resident.undo()
        raise
    handle = StreamHandle(model, plan, streamer, resident)
    setattr(model, _HANDLE_ATTRIBUTE, handle)
    return handle


def _check_device_available(plan: Plan) -> None:
    devices = {plan.compute_device} | {b.device for b in plan.blocks if b.streamed}
    for device in sorted(devices):
        if device == "cpu":
            continue
        index = int(device.split(":")[1])
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            available = torch.cuda.device_count() if torch.cuda.is_available() else 0
            raise RuntimeError(f"distorch: the plan uses {device} but this machine has {available} CUDA device(s)")


def _check_plan_matches(plan: Plan, layout) -> None:
    found = {b.name: b.nbytes for b in layout.blocks}
    planned = {b.name: b.nbytes for b in plan.blocks}
    if found != planned:
        missing = _first_names(set(planned) - set(found))
        extra = _first_names(set(found) - set(planned))
        changed = _first_names(n for n in set(planned) & set(found) if planned[n] != found[n])
        raise PlanError(f"the plan ({len(planned)} blocks) does not match this model ({len(found)} blocks): "
                         f"blocks missing: {missing}, not in the plan: {extra}, sizes changed: {changed}; "
                         f"plan it again")


def _first_names(names, shown: int = 3) -> str:
    """'blocks.8, blocks.9 and 3 more' ('none' when empty): a long list of names must not flood the message."""
    ordered = sorted(names, key=lambda name: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)])
    if not ordered:
        return "none"
    listed = ", ".join(ordered[:shown])
    return listed if len(ordered) <= shown else f"{listed} and {len(ordered) - shown} more"
