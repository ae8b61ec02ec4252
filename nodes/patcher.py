"""`DisTorchModelPatcher`: ComfyUI's ModelPatcher with the streamed blocks handed to the DisTorch streamer.

Core keeps doing what it does for the resident part of the model (loading, LoRA baking, pinning, accounting);
the override of `_load_list()` hides the streamed blocks from it. For those blocks this patcher does what core's
lowvram path does for an offloaded layer (mark it cast-on-use) and opens the streamer, which copies their weights
into a slot just before each block runs. A LoRA on a streamed or GGUF layer runs as a low-rank side path beside the
layer (nodes/lora.py) when it is a plain LoRA, else core's `LowVramPatch` merges it on the compute device each
forward. `loaded_size()` counts the resident weights (core) plus the slots and the side paths' factors (here).

Core's per-layer lowvram path never runs on a model with blocks: each load is planned against the budget core
computed for the run (runs.py; the side paths' factors count in it), core is then asked to load everything left
resident, and a partial unload streams more blocks instead of casting layers (`partially_unload`). A model without
blocks has nothing to stream and is left to core.

With Dynamic VRAM (ComfyUI 2026) a DisTorch model stays a classic, non-dynamic patcher beside the
dynamic ones: core's block prefetch queue and its weight faulting never touch it (the streamer
places its blocks), and core's memory manager sees true sizes for it. docs/comfyui_memory_management.md has
the reasoning.
"""

import dataclasses
import inspect
import logging

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import torch

from ..distorch import PlanError
from ..distorch.budget import ComputeBudget
from ..distorch.calibrate import RunTimer
from ..distorch.units import format_gb
from ..gguf_loader import is_quantized
from . import lora, runs
from .memory_policy import loader_inventory, may_pin, outside_memory_compiler
from .progress import StagingProgressBar
from .state import DisTorchState

logger = logging.getLogger("distorch.nodes")

_FUNCTION_LISTS = (("weight", "weight_function"), ("bias", "bias_function"))
_WRAPPER_KEY = "distorch"
_EVERYTHING = 1e32  # the budget handed to core's load: every module it is given fits, none is cast per layer


class DisTorchModelPatcher(comfy.model_patcher.ModelPatcher):
    """A ModelPatcher for models loaded by the DisTorch nodes (clones keep the class)."""

    @classmethod
    def adopt(cls, patcher: comfy.model_patcher.ModelPatcher, load_device: torch.device,
              factory: tuple | None = None) -> "DisTorchModelPatcher":
        """Takes over a freshly built core patcher (same model, devices, options, hooks).

        Core loaders construct a plain ModelPatcher; copying its attributes wholesale (as copy.copy
        would) keeps whatever newer cores add to it without listing fields here.

        Args:
            factory: `(function, args)` that loads this model again with its DisTorch plan; stored as
                `cached_patcher_init`, through which ComfyUI 2026 rebuilds models (`clone(disable_dynamic=True)`,
                `deepclone_multigpu` for its multi-GPU work split and device selection).
        """
        patcher = _without_dynamic_vram(patcher)
        adopted = cls.__new__(cls)
        adopted.__dict__.update(vars(patcher))
        adopted.load_device = load_device
        # Core may already track the patcher it built (CLIP init loads it when its device is the load device);
        # as our parent, like a core clone's, it lives as long as we do, so core never sees it die before the model.
        adopted.parent = patcher
        if factory is not None:
            adopted.cached_patcher_init = factory
        adopted.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, _WRAPPER_KEY,
                                     _without_core_prefetch)
        adopted.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, _WRAPPER_KEY,
                                     runs.record_workload)
        return adopted

    def is_dynamic(self) -> bool:
        """Never a Dynamic VRAM patcher: the streamer places the streamed blocks and core places the rest;
        core's VBAR faulting and block prefetch queue would move the same weights a second time."""
        return False

    def model_size(self) -> int:
        """Bytes on the compute device when core has loaded the model, LoRA side paths' factors included.

        Auto mode: the whole model, as core counts its own models, so core makes room for all of it (other models
        go, as for its own) and the budget it computes is the most this card allows the run. (Core takes a model it
        loads again out of its list before freeing memory, so this never makes core unload the model it is
        loading.) Fixed mode: what the placement holds there, the layers core loads and the slots, so a text
        encoder beside a streamed model is not evicted for bytes the model never puts there (a weight of a module
        with children, such as Wan's `modulation`, is cast per use and not counted, as core's load does not).
        """
        state = DisTorchState.of(self.model)
        extras = self.device_extra_bytes()
        if state is None or not state.plan.blocks or state.settings.auto:
            return self._weights_size() + extras
        return self._resident_size() + state.slot_bytes + extras

    def device_extra_bytes(self) -> int:
        """Bytes the model keeps on the compute device besides its weights while loaded (the LoRA side paths'
        factors for the current plan): counted in `model_size`, in `loaded_size` and against each run's budget."""
        return self._lora_routing(DisTorchState.of(self.model)).nbytes

    def get_ram_usage(self) -> int:
        """RAM the model holds (ComfyUI 0.8's RAM cache asks): all of it, streamed blocks included (as encoded)."""
        state = DisTorchState.of(self.model)
        return comfy.model_management.module_size(self.model) - (state.encoded_saving() if state is not None else 0)

    def _weights_size(self) -> int:
        """The model's weights, as core's own `model_size()` counts them, cached. Not core's `self.size`: from
        ComfyUI 0.8 a clone starts with its parent's `model_size()`, side paths of the parent's LoRAs included."""
        cached = self.__dict__.get("_distorch_weights_size")
        if cached is None:
            cached = self._distorch_weights_size = comfy.model_management.module_size(self.model)
        return cached

    def _resident_size(self) -> int:
        """What core counts for the modules it loads (`module_size` of every `_load_list()` entry), cached:
        the set of modules and their dtypes are fixed once the loader has run."""
        state = DisTorchState.of(self.model)
        cached = self.__dict__.get("_distorch_resident_size")
        if cached is None or cached[0] is not state.plan:  # a new plan (a re-placement) hides other blocks
            modules = (next(item for item in entry if isinstance(item, torch.nn.Module)) for entry in self._load_list())
            cached = (state.plan, sum(comfy.model_management.module_size(module) for module in modules))
            self._distorch_resident_size = cached
        return cached[1]

    # -- what core manages ---------------------------------------------------------------------------

    def _load_list(self, *args, **kwargs):
        entries = super()._load_list(*args, **kwargs)
        state = DisTorchState.of(self.model)
        return entries if state is None or not state.streams else state.without_streamed(entries)

    def patch_weight_to_device(self, key, device_to=None, *args, **kwargs):
        weight, _, _ = comfy.model_patcher.get_key_weight(self.model, key)
        if is_quantized(weight):
            # GGUF bytes cannot hold a baked LoRA; `_attach_quantized_patches` applies it after dequantizing.
            return None
        # Newer cores add arguments (0.33: return_weight, force_cast); pass on whatever this core uses.
        return super().patch_weight_to_device(key, device_to, *args, **kwargs)

    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False, **kwargs):
        state = DisTorchState.of(self.model)
        if state is None or not state.plan.blocks:
            side_paths = self._lora_routing(state, device_to).nbytes
            if not full_load and side_paths and lowvram_model_memory > 0:
                lowvram_model_memory = max(lowvram_model_memory - side_paths, 1)
            super().load(device_to, lowvram_model_memory, force_patch_weights=force_patch_weights, full_load=full_load,
                         **kwargs)
            self._attach_quantized_patches(state)
            # A full load counts model_size(), which has the side paths in it already.
            weights = min(self.model.model_loaded_weight_memory, self._weights_size())
            self.model.model_loaded_weight_memory = weights + lora.install(self, self._lora_routing(state, device_to))
            return
        if force_patch_weights:  # how core's checkpoint save before ComfyUI 0.33 loads the model it reads
            _refuse_saving(state)
        state = _planned_for(self.model, state, torch.device(device_to or self.load_device))
        budget = self._run_budget(state, lowvram_model_memory)
        try:
            moved = runs.place_for_run(self, state, budget)
        except BaseException:
            self.detach()  # interrupted while re-placing (see `_open_streaming`): the next load starts over
            raise
        routing = self._lora_routing(state, device_to)
        # Everything the plan keeps resident is loaded whole: core's per-layer cast-on-use path never starts here.
        super().load(device_to, lowvram_model_memory=_EVERYTHING, force_patch_weights=force_patch_weights,
                     full_load=False, **kwargs)
        self._attach_quantized_patches(state)
        if state.streams:
            self._prepare_streamed_modules(state)
        side_path_bytes = lora.install(self, routing)
        opened = self._open_streaming(state) if state.streams else False
        self.model.model_loaded_weight_memory += state.slot_bytes + side_path_bytes
        if opened or moved:
            self._log_load(state)
            runs.show_plan(state)
        self._start_timing(state, budget)

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        if unpatch_weights:
            state = DisTorchState.of(self.model)
            if state is not None:
                # Frees the slots; streamed weights stay staged in pinned RAM for the next load.
                state.close(unstage=False)
            self._detach_quantized_patches()
            lora.remove(self.model)
        return super().unpatch_model(device_to, unpatch_weights)

    def model_state_dict_for_saving(self, *args, **kwargs):
        """ComfyUI 0.33+'s checkpoint save reads the weights here."""
        _refuse_saving(DisTorchState.of(self.model))
        return super().model_state_dict_for_saving(*args, **kwargs)

    def partially_unload(self, device_to, memory_to_free=0, *args, **kwargs):
        """Core wants `memory_to_free` bytes of the compute device back (`free_memory` for another model or this
        run's activations; on 0.8+ also a smaller budget for this model's next load): more blocks are streamed,
        never layers cast from RAM. Returns the bytes freed; when they are too few, core unloads the model."""
        state = DisTorchState.of(self.model)
        if state is None or not state.plan.blocks:
            # Core gives each layer it moves off the device a LowVramPatch per patched key, beside the one a GGUF
            # layer already has (and beside a side path): the chains are set again from the patch routing.
            freed = super().partially_unload(device_to, memory_to_free, *args, **kwargs)  # 0.3.64 takes no more
            self._attach_quantized_patches(state)
            return freed
        before = self.loaded_size()
        budget = ComputeBudget(max(0, int(before - memory_to_free)), self.device_extra_bytes(),
                               source=f"ComfyUI asked for {format_gb(memory_to_free)} back")
        try:
            moved = runs.place_for_run(self, state, budget)
        except PlanError as error:
            logger.warning("distorch: cannot stream more of %s (%s); ComfyUI unloads it instead", state.label, error)
            return 0
        if moved and state.streams:
            self._prepare_streamed_modules(state)
            self.model.model_lowvram = True
        side_path_bytes = lora.install(self, self._lora_routing(state))  # the re-placement removed the old ones
        self.model.model_loaded_weight_memory = self._resident_size() + state.slot_bytes + side_path_bytes
        if moved:
            runs.show_plan(state)
        return max(0, before - self.loaded_size())

    def _run_budget(self, state: DisTorchState, lowvram_model_memory: float) -> ComputeBudget | None:
        """This run's budget for the model (None: core sets no limit)."""
        return runs.run_budget(state, lowvram_model_memory, self.device_extra_bytes(), self.load_device,
                               self.loaded_size())

    def _open_streaming(self, state: DisTorchState) -> bool:
        """Starts streaming (staging the blocks the first time); returns whether it was not streaming before."""
        pin = state.streamer is not None or may_pin(state.plan.pinned_bytes)
        try:
            with outside_memory_compiler():
                opened = state.open(self.model, pin=pin, progress=StagingProgressBar(state.ui_node))
        except BaseException:
            # The user interrupted staging (ComfyUI's progress hook raises). Leave the patcher unloaded so the next
            # load starts over: cores from 0.33 make the interrupt a BaseException, which their own
            # `except Exception: detach()` around load() does not catch.
            self.detach()
            raise
        self.model.model_lowvram = True
        return opened

    def _start_timing(self, state: DisTorchState, budget: ComputeBudget | None) -> None:
        """In auto mode, times this run's first passes (blocks' forwards, streamed copies) for the next plan."""
        if not state.settings.auto or state.timer is not None:
            return
        blocks = [self.model.get_submodule(b.name) for b in state.plan.blocks]
        activation = budget.activation_bytes if budget is not None else None
        state.timer = RunTimer(blocks, torch.device(state.plan.compute_device), state.streamer,
                               activation_bytes=activation or 0).attach()

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
        routing = self._lora_routing(DisTorchState.of(self.model))
        for param, functions in _FUNCTION_LISTS:
            key = f"{name}.{param}"
            chain = []
            if key in self.patches and not routing.on_side_path(key):
                _, set_func, convert_func = comfy.model_patcher.get_key_weight(self.model, key)
                chain.append(comfy.model_patcher.LowVramPatch(key, self.patches, convert_func, set_func))
            chain.extend(self.weight_wrapper_patches.get(key, []))
            setattr(module, functions, chain)

    # -- LoRA on GGUF layers, and which keys run as a side path -------------------------------------------

    def _attach_quantized_patches(self, state: DisTorchState | None) -> None:
        """LoRA for resident GGUF layers: a side path, or merged on the compute device after dequantization.

        Core's load clears `weight_function` of every fully loaded layer on each call (and its lowvram branch
        and partial unload set core's own chain, a merge for every patched key), so this runs after both.
        """
        for name, module in self.model.named_modules():
            if state is not None and state.is_streamed(name):
                continue
            if not hasattr(module, "comfy_cast_weights"):
                continue
            patched = [p for p, _ in _FUNCTION_LISTS if f"{name}.{p}" in self.patches]
            if any(is_quantized(getattr(module, p, None)) for p in patched):
                self._set_weight_functions(name, module)

    def _lora_routing(self, state: DisTorchState | None, device_to=None) -> lora.LoraRouting:
        """Which LoRA keys of this patcher run as a side path (nodes/lora.py), for its patch set and plan; cached.

        Only keys core would merge on every forward qualify: on streamed layers and on GGUF weights.
        """
        if not getattr(self, "patches", None):  # none, or core's __init__ asking for model_size() before it set them
            return lora.NO_ROUTING
        device = torch.device(device_to or self.load_device)
        dtype = lora.compute_dtype(self.model)
        plan = state.plan if state is not None else None
        cached = self.__dict__.get("_distorch_lora_routing")
        if cached is not None and cached[0] is plan and cached[1].signature == (self.patches_uuid, str(device), dtype):
            return cached[1]
        streamed = state.is_streamed if state is not None and state.streams else (lambda name: False)
        routing = lora.route(self, lora.candidates(self.model, streamed), device, dtype)
        self._distorch_lora_routing = (plan, routing)
        return routing

    def _detach_quantized_patches(self) -> None:
        for module in self.model.modules():
            if hasattr(module, "comfy_cast_weights") and any(is_quantized(getattr(module, p, None))
                                                               for p, _ in _FUNCTION_LISTS):
                module.weight_function = []
                module.bias_function = []

    def _log_load(self, state: DisTorchState) -> None:
        logger.info("distorch: loaded %s on %s\n%s", type(self.model).__name__, state.plan.compute_device,
                    state.plan.report())


def _refuse_saving(state: DisTorchState | None) -> None:
    """A model streamed in a stream format holds no stored bytes of its encoded weights (placeholders read NaN):
    saving it must fail clearly, never write NaN."""
    if state is not None and state.stream_format != "stored":
        raise RuntimeError(f"DisTorch: this model streams its blocks as {state.stream_format}, so their stored weights "
                           "are not in memory and it cannot be saved; load it with stream_format 'stored' to save it")


def _without_dynamic_vram(patcher):
    """A non-dynamic patcher over the same model, without reading the file again.

    The loaders ask core for one (`disable_dynamic=True`) where core's loader takes that argument; this
    covers the rest (the VAE: `comfy.sd.VAE` has no such argument in ComfyUI 0.33). Core's own
    `clone(disable_dynamic=True)` would re-run the loader (a second read of the whole file) unless it is
    given the model to wrap; a model built for Dynamic VRAM holds the file's tensors as they were stored
    (`load_state_dict(assign=True)`), so they are converted to the dtypes core archived for them, as a
    non-dynamic load would have copied them. Older cores have no Dynamic VRAM and pass through.
    """
    is_dynamic = getattr(patcher, "is_dynamic", None)
    if not callable(is_dynamic) or not is_dynamic():
        return patcher
    logger.info("distorch: this model is placed by DisTorch; ComfyUI's Dynamic VRAM is not used for it")
    if "model_override" not in inspect.signature(patcher.clone).parameters:
        logger.warning("distorch: this ComfyUI cannot switch a loaded model off Dynamic VRAM in place; "
                       "reading the model file again")
        return patcher.clone(disable_dynamic=True)
    plain = patcher.clone(disable_dynamic=True, model_override=patcher.get_clone_model_override())
    _convert_to_archived_dtypes(plain.model)
    return plain


def _convert_to_archived_dtypes(model: torch.nn.Module) -> None:
    for module in model.modules():
        for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            archived = getattr(module, f"{name}_comfy_model_dtype", None)
            if archived is not None and tensor.dtype != archived:
                tensor.data = tensor.data.to(archived)


def _without_core_prefetch(executor, *args, **kwargs):
    """DIFFUSION_MODEL wrapper: core's block prefetch queue (ComfyUI 2026, `comfy/model_prefetch.py`) stays off.

    Core enables it per forward with `transformer_options["prefetch_dynamic_vbars"] = patcher.is_dynamic()`,
    False for this patcher; forcing it here keeps it off should a core derive it otherwise. Module-level
    (no closure) so the wrapper holds no reference to a model.
    """
    for value in (*args, *kwargs.values()):  # models pass transformer_options at different positions
        if isinstance(value, dict) and value.get("prefetch_dynamic_vbars"):
            value["prefetch_dynamic_vbars"] = False
    return executor(*args, **kwargs)


def _planned_for(model: torch.nn.Module, state: DisTorchState, device: torch.device) -> DisTorchState:
    """The model's state, re-placed by a new plan when core moved the patcher to another compute device.

    ComfyUI 2026's `deepclone_multigpu` rebuilds a DisTorch model through its `cached_patcher_init`
    factory (the plan targets the loader's compute device) and then sets the clone's `load_device`.
    """
    planned = torch.device(state.plan.compute_device)
    if planned.type == device.type and (device.type == "cpu" or planned.index == device.index):
        return state
    if state.placement.is_staged:
        raise RuntimeError(f"DisTorch: this model streams to {planned} and cannot move to {device} while staged; "
                           "load it again with compute_device set to the new device")
    settings = dataclasses.replace(state.settings, compute_device=str(device))
    logger.info("distorch: planning %s again for %s", type(model).__name__, device)
    state.placement.move_to(state.placement.replan(settings, memory=loader_inventory(settings)), request=settings)
    return state
