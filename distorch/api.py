"""`distorch.stream`: applies a plan to a live model and gives back a handle that undoes it."""

import logging
import re
import weakref

import torch
from torch import nn

from .blocks import TensorCluster, cluster_tensors, device_name, discover, live_bytes, point_into
from .ledger import LEDGER, Ledger
from .pages import MappingTable, release_file_pages, trim_heap
from .planner import Plan, PlanError
from .streamer import BlockStreamer, StoragePlacement, StreamStats

logger = logging.getLogger("distorch.api")

_HANDLE_ATTRIBUTE = "_distorch_stream"


class ResidentPlacement:
    """Moves the resident weights (rest + resident blocks) to the compute device, tied tensors once.

    One copy: each cluster's original memory is released as it moves (file pages dropped, heap trimmed);
    `undo` copies the weights back to the devices they came from. Owns the moved copies (`_homes`).
    """

    def __init__(self, model: nn.Module, clusters: list[TensorCluster], device: torch.device):
        self.device = device
        target = device_name(device)
        self._moved = [(c, cluster_tensors(model, c)) for c in clusters if c.device != target]
        self._homes: list[torch.Tensor] = []  # each moved cluster's bytes on the compute device

    def apply(self) -> None:
        mappings = MappingTable.read()
        for cluster, tensors in self._moved:
            source = live_bytes(cluster, tensors)
            mapping = mappings.file_mapping(source.data_ptr(), cluster.nbytes) if source.device.type == "cpu" \
                else None
            address = source.data_ptr()
            home = source.to(self.device)
            del source
            point_into(cluster, tensors, home)
            self._homes.append(home)
            if mapping is not None:
                release_file_pages(address, cluster.nbytes, mapping)
        if self._moved:
            trim_heap()

    def undo(self) -> None:
        for (cluster, tensors), home in zip(self._moved, self._homes):
            point_into(cluster, tensors, home.to(torch.device(cluster.device)))
        self._homes = []


class StreamHandle:
    """A model being streamed; `close()` restores every tensor to its original device.

    The model keeps the handle (so a second `stream` is refused); the handle reaches the model by weakref.
    """

    def __init__(self, model: nn.Module, plan: Plan, streamer: BlockStreamer, resident: ResidentPlacement,
                 ledger: Ledger):
        self._model = weakref.ref(model)
        self.plan = plan
        self.streamer = streamer
        self._resident = resident
        self._ledger = ledger

    @property
    def model(self) -> nn.Module | None:
        return self._model()

    def stats(self) -> StreamStats:
        return self.streamer.stats()

    def close(self) -> None:
        self.streamer.close()
        self._resident.undo()
        model = self._model()
        if model is not None:
            self._ledger.release(model)
            if getattr(model, _HANDLE_ATTRIBUTE, None) is self:
                delattr(model, _HANDLE_ATTRIBUTE)

    def __enter__(self) -> "StreamHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def stream(model: nn.Module, plan: Plan, *, prefetch: int = 2, debug: bool = False, engine=None,
           ledger: Ledger | None = None) -> StreamHandle:
    """Places `model` by `plan`: resident weights on the compute device, streamed blocks copied in per forward.

    Args:
        model: the model `plan` was made for.
        plan: from `distorch.plan`.
        prefetch: streaming slots on the compute device: how many streamed blocks may be loaded or loading
            at once (1 = no overlap between consecutive streamed blocks; resident blocks still hide copies).
        debug: poison released slots with NaN bytes so a missing wait shows up as a wrong output.
        engine: copy engine override (tests pass `CpuCopyEngine(deferred=True)`).
        ledger: where the placement is recorded while the handle is open (default: the process-wide ledger).

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
    storage = {b.name: StoragePlacement(b.device, b.pinned, b.disk) for b in plan.blocks if b.streamed}
    _check_disk_blocks(plan, layout)
    resident_clusters = list(layout.rest) + [c for b in layout.blocks if b.name not in streamed_names
                                             for c in b.clusters]
    if prefetch > plan.prefetch and streamed:
        logger.warning("distorch: prefetch %d exceeds the plan's %d slots; VRAM use is above the plan",
                       prefetch, plan.prefetch)
    ledger = LEDGER if ledger is None else ledger
    account = ledger.reserve(model, plan.holding())
    resident = ResidentPlacement(model, resident_clusters, device)
    resident.apply()
    streamer = BlockStreamer(model, streamed, storage, device, prefetch=prefetch, debug=debug, engine=engine,
                             account=account)
    try:
        streamer.open()
    except BaseException:
        streamer.close()
        resident.undo()
        ledger.release(model)
        raise
    handle = StreamHandle(model, plan, streamer, resident, ledger)
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


def _check_disk_blocks(plan: Plan, layout) -> None:
    """A disk-tier block is streamed from the file mapping it lies in; it must still lie there."""
    moved = [b.name for b in plan.blocks if b.disk and not layout.block(b.name).file_backed]
    if moved:
        raise ValueError(f"the plan streams {moved[:3]} from the model file, but their weights are no longer in "
                         "a file mapping; plan it again")


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
