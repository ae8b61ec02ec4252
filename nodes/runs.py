"""Each run's placement: the budget ComfyUI gives a DisTorch model, and the re-placement that fits it.

Core decides, per run, how many bytes of a model's weights may stay on the compute device: `load_models_gpu`
computes `lowvram_model_memory` from the free memory and the sampler's activation estimate for this run's latent
(`sampler_helpers.estimate_memory`, batch x 1: `minimum_memory_required`) and hands it to the patcher's `load`
(through `partially_load`, as `loaded + extra`). On ComfyUI 0.8+ a smaller budget than what the model holds
comes as `partially_unload(memory_to_free)`, and `free_memory` asks a loaded model for room the same way on every
core. The DisTorch patcher answers all of these here, and never with core's per-layer path:

- plan for the budget (`Placement.replan` with a `ComputeBudget`): auto mode fits it with the fewest streamed
  blocks; a fixed amount that does not fit streams more;
- move only the blocks whose tier changes (`Placement.move_to`), and only when the hysteresis rule of
  `distorch.budget.replacement_reason` says so (over budget, or more than a block's worth to gain);
- LoRA side paths (nodes/lora.py) belong to streamed layers: they are removed on a re-placement and installed
  again for the new plan by the caller;
- core's bookkeeping for them: a block leaving the compute device first gets its LoRA-baked weights back from
  core's backups (the streamer must stage the original weights, never baked ones) and loses core's "patched" mark,
  and the patcher then marks its layers cast-on-use with `LowVramPatch` (as for every streamed block); a block
  coming back is on core's load list again, and core's load drops those marks (`wipe_lowvram_weight`) and loads and
  patches it as any resident layer (a mutant that skipped doing it here too changed nothing: core always does).

The sampler's activation estimate is recorded for the report by a PREPARE_SAMPLING wrapper, and the plan a run
chose goes to the loader node in the browser (`distorch.plan` message).
"""

import logging
import sys

import comfy.model_management as mm
import comfy.model_patcher
import comfy.sampler_helpers
import comfy.utils

from ..distorch.budget import NO_LIMIT, ComputeBudget, replacement_reason
from ..distorch.report import plan_to_dict
from ..distorch.units import GIB
from . import lora
from .memory_policy import loader_inventory, may_pin, outside_memory_compiler
from .progress import StagingProgressBar, in_running_prompt
from .state import DisTorchState, SamplerWorkload

logger = logging.getLogger("distorch.nodes")

UNLIMITED = 1e31  # core's "no limit": model_load turns a budget of 0 into 1e32
PLAN_EVENT = "distorch.plan"  # the message nodes/web/js/distorch.js listens for


def run_budget(state: DisTorchState, lowvram_model_memory: float, extra_bytes: int, device,
               loaded: int) -> ComputeBudget | None:
    """This run's budget from core's `lowvram_model_memory` (None: core sets no limit: --highvram, a forced full
    load, compute on the CPU), with the sampler's activation estimate recorded for this run.

    A loaded model that core gives no room beyond what it holds may have a smaller budget that core does not pass
    on: 0.3.64 clamps it to `loaded + 0.1` (0.8+ sends it as a partial unload instead). Core's own formula with this
    run's estimate (`core_budget`) then says how much smaller.
    """
    workload, state.workload = state.workload, None
    if lowvram_model_memory <= 0 or lowvram_model_memory >= UNLIMITED:
        return None
    budget, source = int(lowvram_model_memory), "ComfyUI's lowvram_model_memory for this run"
    if workload is not None and loaded > 0 and lowvram_model_memory - loaded <= 1:
        budget = min(budget, core_budget(device, loaded, workload.minimum_bytes))
        source = "ComfyUI's budget formula for this run's estimate (core passed none below what the model holds)"
    return ComputeBudget(budget, extra_bytes, workload.minimum_bytes if workload else None, source)


def core_budget(device, loaded: int, minimum_required: int) -> int:
    """`load_models_gpu`'s weight budget for a model holding `loaded` bytes, from core's own numbers."""
    free = mm.get_free_memory(device) + loaded
    minimum = max(mm.minimum_inference_memory(), minimum_required + mm.extra_reserved_memory())
    share = min(free * mm.MIN_WEIGHT_MEMORY_RATIO, free - mm.minimum_inference_memory())
    return int(max(0, free - minimum, share))


def place_for_run(patcher, state: DisTorchState, budget: ComputeBudget | None) -> str | None:
    """Plans the model for `budget` and re-places it when the hysteresis rule says so; returns why it moved.

    Raises:
        PlanError: the plan for this budget does not fit RAM or a donor GPU.
    """
    settings = state.settings
    state.finish_timing()  # what the last run measured feeds this plan
    if budget is None and not settings.auto:
        # No limit from core: a fixed amount is what it asks for (and comes back to it after a partial unload).
        budget = ComputeBudget(NO_LIMIT, patcher.device_extra_bytes(), source="no limit from ComfyUI")
    target = state.placement.replan(settings, memory=loader_inventory(settings), budget=budget,
                                    timings=state.timings)
    # Weights have been placed once the blocks are staged, or core has loaded the model (nothing streamed yet).
    placed = state.placement.is_staged or patcher.loaded_size() > 0
    reason = replacement_reason(state.plan, target, budget, placed)
    if not placed:
        state.placement.move_to(target, request=settings)  # nothing placed yet: only the plan changes
        return reason
    if reason is None:
        return None
    re_place(patcher, state, target)
    logger.info("distorch: re-placed %s for this run: %s\n%s", state.label or type(patcher.model).__name__,
                reason, target.report())
    return reason


def re_place(patcher, state: DisTorchState, target) -> None:
    """Moves the staged model to plan `target`, with core's bookkeeping for the blocks whose tier changes."""
    demoted = target.streamed - state.plan.streamed
    with patcher.use_ejected():
        release_core_weights(patcher, state, demoted)
    newly_pinned = sum(b.nbytes for b in target.blocks if b.pinned and b.name in demoted)
    progress = StagingProgressBar(state.ui_node)
    with outside_memory_compiler():
        state.placement.move_to(target, request=state.settings, progress=progress, pin=may_pin(newly_pinned))
        if not state.placement.is_staged and target.streamed:
            # Loaded whole until now: nothing was staged, so the blocks that leave are staged (and streamed) here.
            state.open(patcher.model, pin=may_pin(target.pinned_bytes), progress=progress)
    # LoRA side paths follow the plan (on streamed layers only): the caller installs them again for the new one.
    lora.remove(patcher.model)


def release_core_weights(patcher, state: DisTorchState, blocks) -> None:
    """Blocks about to be streamed: core's backups of their LoRA-baked weights go back in place (the streamer stages
    the weights as loaded, and applies LoRA per forward), and core forgets it patched them."""
    if not blocks:
        return
    prefixes = tuple(f"{name}." for name in blocks)
    keys = [key for key in patcher.backup if key.startswith(prefixes)]
    if keys:
        patcher.unpatch_hooks()  # as core's own partial unload does before it restores a backup
    for key in keys:
        saved = patcher.backup.pop(key)
        if saved.inplace_update:
            comfy.utils.copy_to_param(patcher.model, key, saved.weight)
        else:
            comfy.utils.set_attr_param(patcher.model, key, saved.weight)
    for _, module in state.block_modules(patcher.model, blocks):
        if hasattr(module, "comfy_patched_weights"):
            del module.comfy_patched_weights


def record_workload(executor, model, noise_shape, conds, *args, **kwargs):
    """PREPARE_SAMPLING wrapper: the sampler's activation estimate for this run, for the budget's report."""
    state = DisTorchState.of(model.model)
    estimate = getattr(comfy.sampler_helpers, "estimate_memory", None)
    if state is not None and estimate is not None:
        cfg_bytes, minimum_bytes = estimate(model, noise_shape, conds)
        state.workload = SamplerWorkload(tuple(noise_shape), int(minimum_bytes), int(cfg_bytes))
    return executor(model, noise_shape, conds, *args, **kwargs)


def show_plan(state: DisTorchState) -> None:
    """Sends the plan a run chose to the loader node in the browser (its plan view, and in auto mode the amount in
    the part's virtual_vram_gb widget: `unet_`/`clip_` on the checkpoint loader). Only when ComfyUI's server runs
    (never in a script that imports ComfyUI)."""
    server = getattr(getattr(sys.modules.get("server"), "PromptServer", None), "instance", None)
    if server is None or not in_running_prompt(state.ui_node):
        return  # a model from the cache of another workflow: its loader's id may now be another node
    plan, label = state.plan, state.label or state.plan.model_name
    text = plan.report().replace(f"DisTorch plan for {plan.model_name}",
                                 f"DisTorch plan for {label} ({plan.model_name})", 1)
    server.send_sync(PLAN_EVENT, {"node": state.ui_node, "plan": plan_to_dict(plan, label), "text": text,
                                  "auto": state.settings.auto, "amount_widget": state.amount_widget,
                                  "virtual_vram_gb": round(plan.streamed_stored_bytes / GIB, 2)})
