"""`DisTorchModelPatcher`: ComfyUI's ModelPatcher with the streamed blocks handed to the DisTorch streamer.

Core keeps doing everything it does for the rest of the model (loading, LoRA baking, partial unloads,
pinning, accounting); the override of `_load_list()` hides the streamed blocks from it. For those
blocks this patcher does what core's lowvram path does for an offloaded layer (mark it cast-on-use,
attach `LowVramPatch` for LoRA so the patch is applied on the compute device each forward) and opens
the streamer, which copies their weights into a slot just before each block runs. `loaded_size()`
counts the resident weights (core) plus the slots (here).
"""

import logging

import comfy.model_management
import comfy.model_patcher
import torch

from ..distorch.units import format_gb
from ..gguf_loader import is_quantized
from .progress import StagingProgressBar
from .state import DisTorchState

logger = logging.getLogger("distorch.nodes")

_FUNCTION_LISTS = (("weight", "weight_function"), ("bias", "bias_function"))


class DisTorchModelPatcher(comfy.model_patcher.ModelPatcher):
    """A ModelPatcher for models loaded by the DisTorch nodes (clones keep the class)."""

    @classmethod
    def adopt(cls, patcher: comfy.model_patcher.ModelPatcher, load_device: torch.device) -> "DisTorchModelPatcher":
        """Takes over a freshly built core patcher (same model, devices, options, hooks).

        Core loaders construct a plain ModelPatcher; copying its attributes wholesale (as copy.copy
        would) keeps whatever newer cores add to it without listing fields here.
        """
        patcher = _without_dynamic_vram(patcher)
        adopted = cls.__new__(cls)
        adopted.__dict__.update(vars(patcher))
        adopted.load_device = load_device
        return adopted

    # -- what core manages ---------------------------------------------------------------------------

    def _load_list(self, *args, **kwargs):
        entries = super()._load_list(*args, **kwargs)
        state = DisTorchState.of(self.model)
        return entries if state is None or not state.streams else state.without_streamed(entries)

    def patch_weight_to_device(self, key, device_to=None, inplace_update=False):
        weight, _, _ = comfy.model_patcher.get_key_weight(self.model, key)
        if is_quantized(weight):
            # GGUF bytes cannot hold a baked LoRA; `_attach_quantized_patches` applies it after dequantizing.
            return None
        return super().patch_weight_to_device(key, device_to=device_to, inplace_update=inplace_update)

    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
        state = DisTorchState.of(self.model)
        if state is None or not state.streams:
            super().load(device_to, lowvram_model_memory, force_patch_weights=force_patch_weights, full_load=full_load)
            self._attach_quantized_patches(state)
            return
        unlimited = full_load or lowvram_model_memory <= 0
        budget = 1e32 if unlimited else max(lowvram_model_memory - state.slot_bytes, 1)
        super().load(device_to, lowvram_model_memory=budget, force_patch_weights=force_patch_weights, full_load=False)
        self._attach_quantized_patches(state)
        self._prepare_streamed_modules(state)
        try:
            opened = state.open(self.model, pin=_pinning_allowed(), progress=StagingProgressBar(state.ui_node))
        except BaseException:
            # The user interrupted staging (ComfyUI's progress hook raises). Leave the patcher unloaded so the next
            # load starts over: cores from 0.33 make the interrupt a BaseException, which their own
            # `except Exception: detach()` around load() does not catch.
            self.detach()
            raise
        self.model.model_lowvram = True
        self.model.model_loaded_weight_memory += state.slot_bytes
        if opened:
            self._log_load(state)

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        if unpatch_weights:
            state = DisTorchState.of(self.model)
            if state is not None:
                # Frees the slots; streamed weights stay staged in pinned RAM for the next load.
                state.close(unstage=False)
            self._detach_quantized_patches()
        return super().unpatch_model(device_to, unpatch_weights)

    # -- streamed blocks ----------------------------------------------------------------------------

    def _prepare_streamed_modules(self, state: DisTorchState) -> None:
        """What core's lowvram branch does for an offloaded layer, for every layer of a streamed block."""
        for name, module in state.streamed_modules(self.model):
            if not hasattr(module, "comfy_cast_weights"):
                continue  # plain torch layers: their weights are on the compute device while the block runs
            self._set_weight_functions(name, module)
            if not hasattr(module, "prev_comfy_cast_weights"):
                module.prev_comfy_cast_weights = module.comfy_cast_weights
                module.comfy_cast_weights = True

    def _set_weight_functions(self, name: str, module: torch.nn.Module) -> None:
        for param, functions in _FUNCTION_LISTS:
            key = f"{name}.{param}"
            chain = []
            if key in self.patches:
                _, set_func, convert_func = comfy.model_patcher.get_key_weight(self.model, key)
                chain.append(comfy.model_patcher.LowVramPatch(key, self.patches, convert_func, set_func))
            chain.extend(self.weight_wrapper_patches.get(key, []))
            setattr(module, functions, chain)

    # -- LoRA on resident GGUF layers -----------------------------------------------------------------

    def _attach_quantized_patches(self, state: DisTorchState | None) -> None:
        """LoRA for resident GGUF layers, applied on the compute device after dequantization each forward.

        Core's load clears `weight_function` of every fully loaded layer on each call, so this runs
        after every `load()`.
        """
        for name, module in self.model.named_modules():
            if state is not None and state.is_streamed(name):
                continue
            if hasattr(module, "prev_comfy_cast_weights") or not hasattr(module, "comfy_cast_weights"):
                continue  # core's lowvram path already attached its LowVramPatch
            patched = [p for p, _ in _FUNCTION_LISTS if f"{name}.{p}" in self.patches]
            if any(is_quantized(getattr(module, p, None)) for p in patched):
                self._set_weight_functions(name, module)

    def _detach_quantized_patches(self) -> None:
        for module in self.model.modules():
            if hasattr(module, "comfy_cast_weights") and any(is_quantized(getattr(module, p, None))
                                                               for p, _ in _FUNCTION_LISTS):
                module.weight_function = []
                module.bias_function = []

    def _log_load(self, state: DisTorchState) -> None:
        logger.info("distorch: loaded %s on %s\n%s", type(self.model).__name__, state.plan.compute_device,
                    state.plan.report())
        loaded = self.model.model_loaded_weight_memory - state.slot_bytes
        planned = state.resident_layer_bytes(self.model)
        if loaded < planned:
            logger.warning("distorch: only %s of the planned %s resident layers fit now; ComfyUI casts the rest "
                           "from RAM each step. Raise virtual_vram_gb to stream them with prefetch instead.",
                           format_gb(loaded), format_gb(planned))


def _without_dynamic_vram(patcher):
    """A patcher that is not under Dynamic VRAM (ComfyUI 2026+), whose on-demand weight faulting would fight
    the streamer for the same layers; older cores have no such mode and pass through unchanged."""
    is_dynamic = getattr(patcher, "is_dynamic", None)
    if not callable(is_dynamic) or not is_dynamic():
        return patcher
    logger.info("distorch: this model is placed by DisTorch; ComfyUI's Dynamic VRAM is not used for it")
    return patcher.clone(disable_dynamic=True)


def _pinning_allowed() -> bool:
    """Honours --disable-pinned-memory on cores that have it; older cores never pin, so we may."""
    limit = getattr(comfy.model_management, "MAX_PINNED_MEMORY", None)
    return limit is None or limit > 0
