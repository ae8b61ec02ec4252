"""Per-model DisTorch state: the settings, the plan and the streamer of one loaded model.

It lives on the torch module ComfyUI wraps (BaseModel, a CLIP's cond_stage_model, a VAE's
first_stage_model), so every ModelPatcher clone of that model shares it and nothing is stored on a
class. No ComfyUI import: the patcher in `patcher.py` calls into this.
"""

import logging
from collections.abc import Iterable, Mapping

from torch import nn

from ..distorch import BlockStreamer, MemoryInventory, Plan, discover, plan
from ..distorch.streamer import StagingProgress, StoragePlacement
from .settings import DisTorchSettings

logger = logging.getLogger("distorch.nodes")

_ATTRIBUTE = "_distorch_state"


class DisTorchState:
    """What DisTorch decided for one model, and the streamer that carries it out."""

    def __init__(self, settings: DisTorchSettings, model_plan: Plan):
        self.settings = settings  # the loader's inputs, validated
        self.plan = model_plan  # fixed when the loader ran; the same placement on every queue run
        self.streamer: BlockStreamer | None = None  # created at the first load, kept while the model lives
        self.ui_node: str | None = None  # id of the loader node that planned it: its progress bar shows staging
        self._streamed_prefixes = tuple(f"{name}." for name in model_plan.streamed)
        self._streamed_names = model_plan.streamed

    @classmethod
    def of(cls, model: nn.Module) -> "DisTorchState | None":
        return getattr(model, _ATTRIBUTE, None)

    @classmethod
    def attach(cls, model: nn.Module, settings: DisTorchSettings, inventory: MemoryInventory,
               prefetch: int = 2) -> "DisTorchState":
        """Plans `model` for `settings` and stores the state on it."""
        model_plan = plan(model, compute_device=settings.compute_device, virtual_vram_gb=settings.virtual_vram_gb,
                          donor_device=settings.donor_device, expert_mode_allocations=settings.expert_mode_allocations,
                          memory=inventory, prefetch=prefetch)
        state = cls(settings, model_plan)
        setattr(model, _ATTRIBUTE, state)
        return state

    @property
    def streams(self) -> bool:
        return bool(self.plan.streamed)

    @property
    def slot_bytes(self) -> int:
        """Compute-device bytes the streaming slots take while the model is loaded."""
        return self.plan.prefetch * self.plan.slot_bytes if self.streams else 0

    def is_streamed(self, module_name: str) -> bool:
        return module_name in self._streamed_names or module_name.startswith(self._streamed_prefixes)

    def without_streamed(self, load_list: Iterable[tuple]) -> list[tuple]:
        """ComfyUI's `_load_list()` minus the modules inside streamed blocks, whatever its tuple layout.

        Core loads, patches, partially unloads and pins what is on this list; streamed modules are the
        streamer's, so core never moves them (two offloaders on one layer fight).
        """
        return [entry for entry in load_list if not self.is_streamed(_entry_name(entry))]

    def resident_layer_bytes(self, model: nn.Module) -> int:
        """Bytes of the layers ComfyUI itself loads for this plan: modules holding only their own weights,
        outside streamed blocks (weights of non-leaf modules, like Wan's `modulation`, are cast per use)."""
        total = 0
        for name, module in model.named_modules():
            own = [p for _, p in module.named_parameters(recurse=False)]
            if own and len(own) == sum(1 for _ in module.parameters()) and not self.is_streamed(name):
                total += sum(p.numel() * p.element_size() for p in own)
        return total

    def streamed_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(name, module) for name, module in model.named_modules() if self.is_streamed(name)]

    def open(self, model: nn.Module, pin: bool = True, progress: StagingProgress | None = None) -> bool:
        """Starts streaming (staging the weights the first time, reporting to `progress`). Returns True when it
        was not open."""
        if not self.streams or (self.streamer is not None and self.streamer.is_open):
            return False
        if self.streamer is None:
            self.streamer = self._make_streamer(model, pin)
        self.streamer.open(progress=progress)
        return True

    def close(self, unstage: bool = False) -> None:
        """Stops streaming; staged weights stay in their flat buffers unless `unstage`."""
        if self.streamer is not None:
            self.streamer.close(unstage=unstage)

    def _make_streamer(self, model: nn.Module, pin: bool) -> BlockStreamer:
        layout = discover(model)
        found = {b.name: b.nbytes for b in layout.blocks}
        changed = [b.name for b in self.plan.blocks if b.streamed and found.get(b.name) != b.nbytes]
        if changed:
            raise RuntimeError(f"DisTorch: blocks {changed[:3]} changed size since the loader planned them; "
                               "re-run the loader node")
        blocks = [b for b in layout.blocks if b.name in self.plan.streamed]
        storage: Mapping[str, StoragePlacement] = {
            b.name: StoragePlacement(b.device, b.pinned and pin) for b in self.plan.blocks if b.streamed
        }
        return BlockStreamer(model, blocks, storage, self.plan.compute_device, prefetch=self.plan.prefetch)


def _entry_name(entry: tuple) -> str:
    # (size, name, module, params) before ComfyUI 0.6, (offload_size, size, name, module, params) after.
    return next(item for item in entry if isinstance(item, str))
