"""LoRA as a low-rank side path: a layer computes `W·x + B·(A·x)` instead of `(W + B·A)·x`.

A merged LoRA can be kept only where the weight stays: ComfyUI merges once into a resident layer,
but for a layer whose weight is streamed (its slot holds the next block a moment later) or quantized
(GGUF bytes cannot hold `W + ΔW`) it merges again on every forward, 2-3 passes over the whole weight
whatever the token count. The side path never touches the weight; it costs two thin matmuls, about
`2·r/n` of the layer's own (`r` the stacked rank, `n` the layer's width): 1-2 % for rank 32 on a
3072-wide layer.

Every low-rank term of one layer is stacked into one pair, so a layer runs one extra pair of matmuls
whatever the number of LoRAs on it:

    A = [A₁; A₂; …]            (Σr × in)    the down projections, stacked along the rank
    B = [s₁·B₁ | s₂·B₂ | …]    (out × Σr)   the up projections, each times its scale, zero outside
                                            the output rows its term patches (a q/k/v LoRA on a fused qkv)

Why forward hooks (kept handles) rather than a forward of our own: the hook works on every layer
class a model holds (ComfyUI's cast operations, the GGUF layers, plain torch layers inside streamed
blocks) without changing or subclassing any of them, it is removed by its handle, and it runs after
whatever the layer's forward did to its weight (cast, dequantize, stream). The hook is a
`functools.partial` over one `SideFactors` made per load: the same objects on every step, so
`torch.compile` traces it once (core's per-layer `LowVramPatch` objects make Dynamo recompile per
layer, Comfy-Org/ComfyUI#14536).

Precision. Side path and merge are the same sum `x·Wᵀ + s·x·(B·A)ᵀ`, rounded differently. Both run in
the layer's compute dtype (the input's), as core's merge does on the compute device: the merge
rounds `W + s·B·A` to it and then runs one matmul; the side path rounds the rank-Σr intermediate
`x·Aᵀ` once and adds `(x·Aᵀ)·Bᵀ` to the layer's output (rounded once more). Matmuls accumulate in
float32 in both. Tolerance, per layer, relative in Frobenius norm: the two outputs differ by at most
`2·eps(compute dtype) + 8·eps(float32)` (float32: 1.2e-6, bfloat16: 0.016, float16: 2e-3; measured on
1536-wide layers: 3.3, 0.55 and 0.55 eps of the compute dtype), and the side path is as close to the
float64 result as the merge (never farther than 1.25x the merge's error). tests/test_lowrank.py and
tests/comfyui/inside/check_lora.py (core's own adapters and merge) check both bounds. Over a whole
model the per-layer differences compound like any rounding: tiny float32 Wan models agree with core's
merged LoRA to 1e-4, and real ComfyUI latents to 1 %.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

_CONV_OPS = {1: F.conv1d, 2: F.conv2d}


class LowRankTerm(NamedTuple):
    """One adapter on one layer: `ΔW[rows] = scale · up @ down`, read from the LoRA's own tensors.

    A transient value: built while a patch set is installed, dropped once its terms are stacked. The
    tensors are the LoRA file's (owned by whoever loaded it); nothing here copies them.
    """

    up: torch.Tensor  # (rows, rank), or (rows, rank, 1, ...) as LoCon files store it
    down: torch.Tensor  # (rank, in_features) or (rank, in_channels, *kernel), any layout of that many numbers
    scale: float  # strength · alpha / rank
    row_start: int = 0  # first output row the term patches (a slice of a fused weight), else 0

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass(frozen=True)
class LayerGeometry:
    """What the side path needs to know of a layer: its weight's shape and, for a convolution, how it slides."""

    weight_shape: tuple[int, ...]  # (out, in) or (out, in, *kernel)
    conv_dims: int = 0  # 0 for Linear, else 1 or 2
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()

    @property
    def out_features(self) -> int:
        return self.weight_shape[0]

    @property
    def in_numel(self) -> int:
        """Numbers per output row of the weight (in_features, or in_channels × kernel)."""
        return math.prod(self.weight_shape[1:])


def layer_geometry(module: nn.Module) -> LayerGeometry | None:
    """The geometry of a layer the side path can run beside, or None (the patch is then merged).

    Linear always; Conv1d and Conv2d with one group and zero padding (a LoCon's down projection slides
    like the layer, its up projection is 1×1). Conv3d is left to the merge: ComfyUI's Conv3d may crop its
    kernel per call (causal padding), which a side path could not follow.
    """
    weight = getattr(module, "weight", None)
    shape = tuple(getattr(weight, "shape", ()))
    if isinstance(module, nn.Linear) and len(shape) == 2:
        return LayerGeometry(shape)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        dims = 1 if isinstance(module, nn.Conv1d) else 2
        if module.groups != 1 or module.padding_mode != "zeros" or len(shape) != dims + 2:
            return None
        return LayerGeometry(shape, dims, tuple(module.stride), module.padding, tuple(module.dilation))
    return None


def combine_tucker(down: torch.Tensor, mid: torch.Tensor) -> torch.Tensor:
    """A LoCon's 1×1 down projection and its kernel-sized mid as one down kernel `(rank, in, *kernel)`.

    `down[j, i]` (rank_down × in) and `mid[r, j, *k]` give `Σ_j down[j, i] · mid[r, j, *k]`, the factor
    core multiplies by `up` when it merges such a LoRA.
    """
    down2d = down.reshape(down.shape[0], -1)
    combined = torch.einsum("ji,rjk->rik", down2d, mid.flatten(2))
    return combined.reshape(mid.shape[0], down2d.shape[1], *mid.shape[2:])


class SideFactors:
    """One layer's stacked factors on the compute device, and the side path's arithmetic.

    Owns `down` and `up`; they are freed with this object (when its `SidePaths` removes it). Made once
    per load: its identity, and its tensors', stay the same across steps.
    """

    __slots__ = ("down", "up", "geometry", "__weakref__")

    def __init__(self, down: torch.Tensor, up: torch.Tensor, geometry: LayerGeometry):
        self.down = down  # (Σr, in) or (Σr, in_channels, *kernel)
        self.up = up  # (out, Σr), scales folded in; (out, Σr, 1[, 1]) for a convolution
        self.geometry = geometry

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def nbytes(self) -> int:
        return self.down.numel() * self.down.element_size() + self.up.numel() * self.up.element_size()

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """`B·(A·x)`: what the stacked terms add to the layer's output for input `x`."""
        down, up = self._in(x.dtype)
        geometry = self.geometry
        if not geometry.conv_dims:
            return F.linear(F.linear(x, down), up)
        conv = _CONV_OPS[geometry.conv_dims]
        hidden = conv(x, down, None, geometry.stride, geometry.padding, geometry.dilation)
        return conv(hidden, up)

    def add_to(self, output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The layer's output with the side path added; in place (one fused multiply-add) where the output
        allows it, so no second output-sized tensor is made."""
        geometry = self.geometry
        if not geometry.conv_dims and output.dtype == x.dtype and output.is_contiguous() and x.dtype == self.up.dtype:
            hidden = F.linear(x, self.down)
            flat = output.view(-1, geometry.out_features)
            flat.addmm_(hidden.reshape(-1, hidden.shape[-1]), self.up.t())
            return output
        return output + self.delta(x).to(output.dtype)

    def _in(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # Factors are uploaded in the model's compute dtype; a layer that computes in another (rare: a
        # float32 island) gets them cast per call, still a small fraction of a merge.
        if self.down.dtype == dtype:
            return self.down, self.up
        return self.down.to(dtype), self.up.to(dtype)


def stack_terms(terms: Iterable[LowRankTerm], geometry: LayerGeometry, device: torch.device | str,
                dtype: torch.dtype) -> SideFactors | None:
    """Stacks the terms of one layer into one factor pair on `device` in `dtype`; None when no term has weight.

    Scales are folded into the up projections in float32 before the cast. Terms with scale 0 (strength 0)
    are left out: they add nothing.
    """
    terms = [t for t in terms if t.scale != 0.0]
    if not terms:
        return None
    total = sum(t.rank for t in terms)
    out_features = geometry.out_features
    downs = []
    up = torch.zeros(out_features, total, device=device, dtype=torch.float32)
    column = 0
    for term in terms:
        rows = term.up.shape[0]
        up[term.row_start:term.row_start + rows, column:column + term.rank] = \
            term.up.reshape(rows, term.rank).to(device=device, dtype=torch.float32) * term.scale
        downs.append(term.down.reshape(term.rank, *geometry.weight_shape[1:]).to(device=device, dtype=dtype))
        column += term.rank
    down = torch.cat(downs) if len(downs) > 1 else downs[0].contiguous()
    up = up.to(dtype)
    if geometry.conv_dims:
        up = up.view(out_features, total, *([1] * geometry.conv_dims))
    return SideFactors(down, up, geometry)


def check_term(term: LowRankTerm, geometry: LayerGeometry) -> str | None:
    """Why `term` cannot run beside a layer of `geometry` (None when it can): the shapes core's merge would
    need to fit. A term that does not fit is left to the merge, which reports it as core does."""
    up, down = term.up, term.down
    if up.dim() < 2 or any(d != 1 for d in up.shape[2:]):
        return f"up projection of shape {tuple(up.shape)} is not (rows, rank)"
    rows, rank = up.shape[0], up.shape[1]
    if down.shape[0] != rank:
        return f"down projection of shape {tuple(down.shape)} has not rank {rank}"
    if down.numel() != rank * geometry.in_numel:
        return f"down projection of shape {tuple(down.shape)} does not fit a weight of shape {geometry.weight_shape}"
    if term.row_start < 0 or term.row_start + rows > geometry.out_features:
        return f"rows {term.row_start}..{term.row_start + rows} outside the weight's {geometry.out_features}"
    return None


class SidePaths:
    """The side paths installed on one model: per layer its factors and its forward hook.

    Owns the factors (compute-device memory) until `remove()`; dropping this object removes its hooks
    too. Holds no reference to the model or its layers (a hook handle refers to the layer's hook table
    weakly), so model → SidePaths → factors and layer → hook → factors form no cycle.

    Args:
        signature: what the factors were built from (the patch set, device and dtype); the owner compares
            it to decide whether a load may keep them.
    """

    def __init__(self, signature: Hashable):
        self.signature = signature
        self._factors: dict[str, SideFactors] = {}  # layer name -> its stacked factors
        self._handles: list = []  # torch RemovableHandles of the forward hooks, one per layer
        weakref.finalize(self, _remove_handles, self._handles)

    def add(self, name: str, module: nn.Module, factors: SideFactors) -> None:
        if name in self._factors:
            raise ValueError(f"distorch: layer {name!r} already has a LoRA side path")
        self._factors[name] = factors
        hook = functools.partial(_add_side_path, factors)
        self._handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def remove(self) -> None:
        """Removes every hook and frees the factors. Idempotent."""
        _remove_handles(self._handles)
        self._factors.clear()

    @property
    def layers(self) -> Mapping[str, SideFactors]:
        return dict(self._factors)

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self._factors.values())

    def __len__(self) -> int:
        return len(self._factors)


def side_path_nbytes(ranks: Mapping[str, int], geometries: Mapping[str, LayerGeometry], dtype: torch.dtype) -> int:
    """Bytes the stacked factors take: per layer `Σr · (in + out)` numbers of `dtype`."""
    size = torch.empty((), dtype=dtype).element_size()
    return sum(rank * (geometries[name].in_numel + geometries[name].out_features) * size
               for name, rank in ranks.items())


def _add_side_path(factors: SideFactors, module: nn.Module, args: tuple, kwargs: dict,
                   output: torch.Tensor) -> torch.Tensor:
    # Not compiler-disabled: plain tensor arithmetic that Dynamo traces into the layer's graph.
    x = args[0] if args else kwargs["input"]
    return factors.add_to(output, x)


def _remove_handles(handles: list) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()
