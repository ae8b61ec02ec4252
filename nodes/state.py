"""The node pack's attachment on a model: its `distorch.Placement`, and what only the nodes need (the UI node).

It lives on the torch module ComfyUI wraps (BaseModel, a CLIP's cond_stage_model, a VAE's
first_stage_model), so every ModelPatcher clone of that model shares it and nothing is stored on a
class. The placement owns the plan, the ledger entry and the streamer and holds no reference back to
the model (weakrefs only), so the model is freed by reference counting, with its staged and pinned
memory and its ledger entry, the moment ComfyUI drops it. ComfyUI places the weights outside the
streamed blocks itself, so the placement leaves them alone. No ComfyUI import: the patcher in
`patcher.py` calls into this.
"""

import dataclasses
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from ..distorch import MemoryInventory, PlacementRequest, Plan
from ..distorch.calibrate import RunTimer
from ..distorch.costmodel import Timings
from ..distorch.placement import LayoutMismatch, Placement, StagingProgress

logger = logging.getLogger("distorch.nodes")

_ATTRIBUTE = "_distorch_state"


@dataclass(frozen=True)
class SamplerWorkload:
    """What ComfyUI's sampler estimated for the run about to load the model (`sampler_helpers.estimate_memory`)."""

    noise_shape: tuple[int, ...]
    minimum_bytes: int  # batch x 1: what ComfyUI's weight budget left room for
    cfg_bytes: int  # batch x 2


class DisTorchState:
    """A loaded model's placement, as the node pack drives it, and the loader node that planned it."""

    def __init__(self, placement: Placement):
        self.placement = placement  # the model's plan, ledger entry and streamer
        self.ui_node: str | None = None  # id of the loader node that planned it: its progress bar shows staging
        self.label: str = ""  # the file name(s) the loader node shows
        self.amount_widget = "virtual_vram_gb"  # the loader's widget that shows the amount an auto run chose
        self.workload: SamplerWorkload | None = None  # the sampler run about to load the model, until it loads
        self.timer: RunTimer | None = None  # times the current run's first passes (auto mode)
        self.timings: Timings | None = None  # what the last timed run measured: the cost model's input
        self._streamed: tuple[Plan, frozenset[str], tuple[str, ...]] | None = None  # per plan: names, prefixes

    @classmethod
    def of(cls, model: nn.Module) -> "DisTorchState | None":
        return getattr(model, _ATTRIBUTE, None)

    @classmethod
    def attach(cls, model: nn.Module, settings: PlacementRequest, inventory: MemoryInventory,
               prefetch: int | None = None) -> "DisTorchState":
        """Plans `model` for `settings` (reserving it in the ledger) and stores the state on it."""
        if prefetch is not None:
            settings = dataclasses.replace(settings, prefetch=prefetch)
        state = cls(Placement.planned(model, settings, memory=inventory))
        setattr(model, _ATTRIBUTE, state)
        return state

    @property
    def settings(self) -> PlacementRequest:
        """The loader's inputs, validated (what the plan was made for)."""
        return self.placement.request

    @property
    def plan(self) -> Plan:
        return self.placement.plan

    @property
    def streamer(self):
        """The placement's streamer: None until the model is first loaded."""
        return self.placement.streamer

    @property
    def streams(self) -> bool:
        return bool(self.plan.streamed)

    @property
    def slot_bytes(self) -> int:
        """Compute-device bytes the streaming slots (and, with a stream format, the decode buffer) take while the model
        is loaded."""
        return self.plan.prefetch * self.plan.slot_bytes + self.plan.decode_bytes if self.streams else 0

    @property
    def stream_format(self) -> str:
        """The stream format its streamed blocks are held and copied in ("stored" when none is smaller)."""
        return self.plan.stream_format if any(b.decodes for b in self.plan.blocks) else "stored"

    def encoded_saving(self) -> int:
        """RAM its staged encoded blocks save now: core's `module_size` counts their placeholders as stored."""
        streamer = self.placement.streamer
        if streamer is None:
            return 0
        stored = {b.name: b.nbytes for b in self.plan.blocks}
        return sum(stored[name] - held for name, (_, held) in streamer.staged_encoded().items())

    def is_streamed(self, module_name: str) -> bool:
        names, prefixes = self._streamed_names()
        return module_name in names or module_name.startswith(prefixes)

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

    def block_modules(self, model: nn.Module, blocks: Iterable[str]) -> list[tuple[str, nn.Module]]:
        """The modules inside `blocks` (block names), the blocks' own modules included."""
        prefixes = tuple(f"{name}." for name in blocks)
        names = set(blocks)
        return [(name, module) for name, module in model.named_modules() if name in names or name.startswith(prefixes)]

    def finish_timing(self) -> None:
        """Takes what the last run's timer measured (after the run: it waits for the timing events) and detaches it."""
        if self.timer is None:
            return
        self.timer.detach()
        measured = self.timer.timings()
        if measured is not None:
            self.timings = measured
        self.timer = None

    def open(self, model: nn.Module, pin: bool = True, progress: StagingProgress | None = None) -> bool:
        """Starts streaming `model` (the model this state is attached to), staging the weights the first time and
        reporting to `progress`. Returns True when it was not open."""
        if not self.streams:
            return False
        try:
            return self.placement.open(progress, pin=pin)
        except LayoutMismatch as error:
            raise RuntimeError(f"DisTorch: blocks {list(error.names[:3])} changed size since the loader planned "
                               "them; re-run the loader node") from None

    def close(self, unstage: bool = False) -> None:
        """Stops streaming; staged weights stay in their flat buffers (`Placement.pause`) unless `unstage`, which
        gives every weight back and drops the ledger entry (`Placement.release`)."""
        if unstage:
            self.placement.release()
        else:
            self.placement.pause()

    def _streamed_names(self) -> tuple[frozenset[str], tuple[str, ...]]:
        # Asked for every module of the model on each load: derived once per plan (a re-placement brings a new one).
        if self._streamed is None or self._streamed[0] is not self.plan:
            names = self.plan.streamed
            self._streamed = (self.plan, names, tuple(f"{name}." for name in names))
        return self._streamed[1], self._streamed[2]


def _entry_name(entry: tuple) -> str:
    # (size, name, module, params) before ComfyUI 0.6, (offload_size, size, name, module, params) after.
    return next(item for item in entry if isinstance(item, str))
