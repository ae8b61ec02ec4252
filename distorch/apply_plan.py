"""`distorch.stream`: applies a plan to a live model and gives back the placement, whose `close()` undoes it."""

from torch import nn

from .ledger import Ledger
from .placement import STREAM_ATTRIBUTE, Placement
from .planner import Plan

# The handle `stream` returns is the model's `Placement`: `close()` (or the `with` block) restores every tensor,
# `stats()`, `.plan` and `.streamer` as before, and `move_to` re-places it.
StreamHandle = Placement


def stream(model: nn.Module, plan: Plan, *, prefetch: int = 2, debug: bool = False, engine=None,
           ledger: Ledger | None = None) -> Placement:
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
        The model's placement; while it is open, the model's forward gives the same result as before. `close()`
        undoes it. The model keeps it (so a second `stream` is refused); it reaches the model by weakref.

    Example:
        >>> with distorch.stream(model, distorch.plan(model, compute_device="cuda:0", virtual_vram_gb=4)):
        ...     out = model(x)
    """
    if getattr(model, STREAM_ATTRIBUTE, None) is not None:
        raise RuntimeError(f"{type(model).__name__} is already being streamed; close() the first handle")
    placement = Placement(model, plan, ledger=ledger, places_resident=True, prefetch=prefetch, debug=debug,
                          engine=engine)
    placement.check()  # before anything moves: a refused plan leaves the model and its ledger entry alone
    try:
        placement.open()
    except BaseException:
        placement.release()
        raise
    setattr(model, STREAM_ATTRIBUTE, placement)
    return placement
