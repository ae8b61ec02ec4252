"""Core's LoRA patches on streamed and GGUF layers, run as a low-rank side path (distorch.lowrank).

ComfyUI keeps a patcher's LoRAs as `patches[key] = [(strength_patch, adapter, strength_model, offset,
function), ...]` and merges them into the weight: once for a resident layer (kept: `patch_weight_to_device`),
on every forward for a layer whose weight it cannot keep merged (`LowVramPatch`). DisTorch's streamed
layers and GGUF layers are of the second kind. For them a key goes one of two ways, as a whole:

* side path: every patch on it is a plain low-rank adapter (core's `LoRAAdapter`, or the older
  `("lora", (up, down, alpha, mid, dora_scale, reshape))` tuple) with no DoRA scale, no reshape, no
  `function`, `strength_model` 1 and an offset on output rows only, on a Linear (or a Conv1d/Conv2d,
  a LoCon) whose operation merges plainly (no `convert_weight`/`set_weight`, no weight wrappers);
* merge: anything else (LoHa, LoKr, OFT, DoRA, diff and `set` patches, model-as-LoRA, shape changes),
  through core's own `LowVramPatch`, exactly as before.

Biases are never low-rank: a bias patch always merges. The side paths live on the model (shared by
every clone, like the model's weights) and carry the signature of the patch set they came from, so a
load by another clone, with other strengths or LoRAs, replaces them and a load with the same patches
keeps them (no upload per queue run, none per step).
"""

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..distorch.lowrank import (
    LayerGeometry,
    LowRankTerm,
    SidePaths,
    check_term,
    combine_tucker,
    layer_geometry,
    side_path_nbytes,
    stack_terms,
)
from ..gguf_loader import is_quantized

try:  # core's adapter classes (ComfyUI 0.3.4x on); older cores keep LoRAs as tuples
    from comfy.weight_adapter import LoRAAdapter
except ImportError:  # pragma: no cover - cores older than every supported one
    LoRAAdapter = None

logger = logging.getLogger("distorch.nodes")

_ATTRIBUTE = "_distorch_side_paths"
_LORA_WEIGHTS = 6  # (up, down, alpha, mid, dora_scale, reshape): the layout of a LoRA adapter's weights


@dataclass(frozen=True)
class LoraRouting:
    """Which weights of one patch set run as a side path: layer names and stacked ranks, plain values.

    The LoRA tensors stay in core's patches; `install` reads them again when it uploads.
    """

    signature: tuple  # (patches_uuid, compute device, dtype): a load with the same keeps the installed factors
    ranks: tuple[tuple[str, int], ...]  # (layer name, stacked rank) per side-path layer
    nbytes: int  # compute-device bytes of the stacked factors
    layers: frozenset[str] = frozenset()  # the layer names of `ranks`

    def on_side_path(self, key: str) -> bool:
        name, _, param = key.rpartition(".")
        return param == "weight" and name in self.layers


NO_ROUTING = LoraRouting((), (), 0)


def route(patcher, candidates: Iterable[tuple[str, nn.Module]], device: torch.device,
          dtype: torch.dtype) -> LoraRouting:
    """Decides, for the patched weights of `candidates` (streamed or GGUF layers), which run as a side path."""
    ranks, geometries = {}, {}
    for name, module in candidates:
        geometry = side_path_geometry(patcher, name, module)
        terms = None if geometry is None else low_rank_terms(patcher.patches.get(f"{name}.weight", ()), geometry)
        if terms is None:
            continue
        ranks[name] = sum(t.rank for t in terms if t.scale != 0.0)
        geometries[name] = geometry
    nbytes = side_path_nbytes(ranks, geometries, dtype)
    return LoraRouting((patcher.patches_uuid, str(device), dtype), tuple(ranks.items()), nbytes, frozenset(ranks))


def side_path_geometry(patcher, name: str, module: nn.Module) -> LayerGeometry | None:
    """The layer's geometry when its weight may run a side path; None when core must merge it."""
    key = f"{name}.weight"
    if key not in patcher.patches or patcher.weight_wrapper_patches.get(key):
        return None
    if hasattr(module, "convert_weight") or hasattr(module, "set_weight"):
        return None  # core merges through the operation's own conversion (scaled or quantized formats)
    return layer_geometry(module)


def low_rank_terms(patches: Iterable[tuple], geometry: LayerGeometry) -> tuple[LowRankTerm, ...] | None:
    """The low-rank terms of one key's patches, or None when any of them is not a plain low-rank adapter."""
    terms = []
    for patch in patches:
        strength, adapter, strength_model, offset, function = patch[:5]
        if function is not None or strength_model != 1.0:
            return None
        term = _lora_term(adapter, strength, offset, geometry)
        if term is None or check_term(term, geometry) is not None:
            return None
        terms.append(term)
    return tuple(terms) if terms else None


def _lora_term(adapter, strength: float, offset, geometry: LayerGeometry) -> LowRankTerm | None:
    weights = _lora_weights(adapter)
    if weights is None:
        return None
    up, down, alpha, mid, dora_scale, reshape = weights
    if dora_scale is not None or reshape is not None:
        return None
    row_start = _row_start(offset)
    if row_start is None:
        return None
    rank = down.shape[0]  # core's alpha / rank is taken before a mid joins the down projection
    if mid is not None:
        if geometry.conv_dims != 2 or mid.dim() != 4:
            return None  # core combines a mid with 2-D kernels only
        down = combine_tucker(down.float(), mid.float())  # in float32, rounded once when stacked
    scale = strength * (alpha / rank if alpha is not None else 1.0)
    return LowRankTerm(up, down, float(scale), row_start)


def _lora_weights(adapter) -> tuple | None:
    """(up, down, alpha, mid, dora_scale, reshape) of a plain LoRA adapter in either of core's forms."""
    if LoRAAdapter is not None and type(adapter) is LoRAAdapter:
        weights = adapter.weights
    elif isinstance(adapter, tuple) and len(adapter) == 2 and adapter[0] == "lora":
        weights = adapter[1]
    else:
        return None
    if not isinstance(weights, (tuple, list)) or not 2 <= len(weights) <= _LORA_WEIGHTS:
        return None
    weights = tuple(weights) + (None,) * (_LORA_WEIGHTS - len(weights))
    up, down = weights[:2]
    if not (isinstance(up, torch.Tensor) and isinstance(down, torch.Tensor)):
        return None
    return weights


def _row_start(offset) -> int | None:
    """First output row of an offset patch `(dim, start, length)`, 0 without one; None when it narrows another
    dimension (the side path adds to output rows only)."""
    if offset is None:
        return 0
    dim, start, _ = offset
    return int(start) if dim == 0 else None


def candidates(model: nn.Module, is_streamed) -> Iterator[tuple[str, nn.Module]]:
    """Layers whose LoRA core would merge per forward: inside streamed blocks, or with a GGUF weight."""
    for name, module in model.named_modules():
        if is_streamed(name) or is_quantized(getattr(module, "weight", None)):
            yield name, module


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model's layers compute in: what core casts inputs to (`manual_cast_dtype`, else the
    model's dtype; text encoders and VAEs without either compute in float32 unless their input says otherwise)."""
    dtype = getattr(model, "manual_cast_dtype", None)
    if dtype is None and callable(getattr(model, "get_dtype", None)):
        dtype = model.get_dtype()
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def installed(model: nn.Module) -> SidePaths | None:
    return getattr(model, _ATTRIBUTE, None)


def install(patcher, routing: LoraRouting) -> int:
    """Puts `routing`'s side paths on the patcher's model, keeping those installed for the same signature.

    Returns the bytes the installed factors take on the compute device.
    """
    model = patcher.model
    current = installed(model)
    if current is not None and current.signature == routing.signature:
        return current.nbytes
    remove(model)
    if not routing.ranks:
        return 0
    _, device, dtype = routing.signature
    side_paths = SidePaths(routing.signature)
    for name, _ in routing.ranks:
        module = model.get_submodule(name)
        geometry = side_path_geometry(patcher, name, module)
        factors = stack_terms(low_rank_terms(patcher.patches[f"{name}.weight"], geometry), geometry, device, dtype)
        if factors is not None:
            side_paths.add(name, module, factors)
    setattr(model, _ATTRIBUTE, side_paths)
    if len(side_paths):
        logger.info("distorch: LoRA on %d streamed or GGUF layers as a low-rank side path (%.1f MB on %s)",
                    len(side_paths), side_paths.nbytes / 2**20, device)
    return side_paths.nbytes


def remove(model: nn.Module) -> None:
    """Removes the model's side paths and frees their factors (no-op without any)."""
    side_paths = installed(model)
    if side_paths is not None:
        side_paths.remove()
        delattr(model, _ATTRIBUTE)

