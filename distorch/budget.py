"""The weight budget of one run on the compute device.

Auto placement plans against the bytes ComfyUI allows a model's weights for the run at hand (its
`lowvram_model_memory`, computed from this run's latent; distorch.workload repeats that arithmetic for the CLI):
resident blocks + the rest + the streaming slots + what the model keeps on the device besides its weights must fit.
A fixed `virtual_vram_gb` that does not fit that budget streams more blocks rather than leaving the overflow to
ComfyUI's per-layer cast-on-use path (distorch.planner `streamed_within`). Pure data.
"""

from dataclasses import dataclass

from .costmodel import MOVE_GAIN
from .units import format_gb

NO_LIMIT = 1 << 62  # the weight budget of a run the host set no limit for: no model reaches it


@dataclass(frozen=True)
class ComputeBudget:
    """What one run may keep of a model on the compute device, and where the number comes from.

    `weight_bytes` holds the resident weights, the streaming slots and `extra_bytes` (non-weight bytes the model
    keeps on the device: LoRA factors and the like). `activation_bytes` is the activation estimate the budget left
    room for, when known (the report shows it).
    """

    weight_bytes: int
    extra_bytes: int = 0
    activation_bytes: int | None = None
    source: str = ""

    @property
    def limited(self) -> bool:
        """Whether the host set a limit for this run (`NO_LIMIT` is none)."""
        return self.weight_bytes < NO_LIMIT

    @property
    def room(self) -> int:
        """Bytes left for weights and slots."""
        return max(0, self.weight_bytes - self.extra_bytes)

    def as_dict(self) -> dict:
        return {"weight_bytes": int(self.weight_bytes), "extra_bytes": int(self.extra_bytes),
                "activation_bytes": None if self.activation_bytes is None else int(self.activation_bytes),
                "source": self.source}


def replacement_reason(current, target, budget: ComputeBudget | None, staged: bool) -> str | None:
    """Why the model should move from plan `current` to `target` for this run, or None to keep `current`.

    The hysteresis rule: a staged model moves only when its placement does not fit the run's budget, when the
    target keeps more than one block's worth more on the compute device (so a budget that wobbles by less than a
    block, as activations do between similar runs, moves nothing), or when the cost model predicts the target's pass
    at least `MOVE_GAIN` faster than the current placement's with the same measurements. Until the model is staged
    nothing has moved, so it always takes the target.
    """
    if current.streamed == target.streamed and current.prefetch == target.prefetch:
        return None
    if not staged:
        return "planned for this run before the first load"
    extra = budget.extra_bytes if budget is not None else 0
    if budget is not None and current.compute_bytes + extra > budget.weight_bytes:
        return (f"the current placement needs {format_gb(current.compute_bytes + extra)} on {current.compute_device}, "
                f"over this run's budget of {format_gb(budget.weight_bytes)}")
    block = max((b.nbytes for b in current.blocks), default=0)
    gained = target.compute_bytes - current.compute_bytes
    if gained > block:
        return f"this run's budget keeps {format_gb(gained)} more on {current.compute_device} (more than one block)"
    now, then = target.current_schedule, target.schedule
    if now is not None and then is not None and now.pass_s and then.pass_s is not None:
        if then.pass_s <= now.pass_s * (1 - MOVE_GAIN):
            return (f"the cost model predicts a pass of {then.pass_s * 1000:.0f} ms instead of "
                    f"{now.pass_s * 1000:.0f} ms with the current placement")
    return None
