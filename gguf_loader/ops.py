"""Layers that run on GGUF weights: dequantize on the fly, on the input's device, in its dtype.

`make_ops(config, base)` returns a fresh namespace of layer classes (Linear, Conv1d/2d/3d,
Embedding, LayerNorm, GroupNorm, RMSNorm), each `type(name, (GGUF mixin, base class), {...})`.
Every call builds new classes holding its own immutable config, so two models never share settings
(ComfyUI-GGUF's class attributes did). `base` is `torch.nn` by default; the ComfyUI layer passes
`comfy.ops.manual_cast` and overrides `forward_comfy_cast_weights` as it needs.

Each layer: assigns loaded weights without copying (`_load_from_state_dict`), moves raw bytes to the
input's device and dequantizes them there (`cast_weight_bias`), then calls the plain functional op
(`_functional`). Plain float weights of any dtype work too (cast to the compute dtype).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from .dequant import dequantize_raw
from .embedding_rows import EmbeddingTable, check_token_ids
from .tensor import GGMLTensor


@dataclass(frozen=True)
class GGUFOpsConfig:
    """Per-model settings of the GGUF layers.

    Attributes:
        dequant_dtype: dtype quantized weights are dequantized to before the cast to the compute
            dtype; None dequantizes straight to the compute dtype (the input's dtype).
        embedding_dtype: output dtype of Embedding layers whose input (token ids) carries none and
            whose weight is quantized; None means float32.
        embedding_tables: the model's GGUF token embedding tables (embedding_rows.embedding_table), so that an
            id past a table names the file and the token.
    """

    dequant_dtype: torch.dtype | None = None
    embedding_dtype: torch.dtype | None = None
    embedding_tables: tuple[EmbeddingTable, ...] = ()


_PARAMS = ("weight", "bias")


class GGUFLayer:
    """Mixin for a torch layer class whose weight and bias may be GGMLTensors."""

    gguf_config: GGUFOpsConfig = GGUFOpsConfig()  # replaced (immutably) on every class make_ops builds

    def __init__(self, *args, **kwargs) -> None:
        # Build on the meta device: real weights arrive with the state dict, so allocating (and on
        # Windows, committing) a full-size float weight here would be pure waste.
        kwargs["device"] = "meta"
        super().__init__(*args, **kwargs)
        self._gguf_expected = tuple(p for p in _PARAMS if getattr(self, p, None) is not None)
        for name in self._gguf_expected:
            setattr(self, name, None)

    # -- loading --------------------------------------------------------------------------------

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        for name in _PARAMS:
            key = prefix + name
            if key in state_dict:
                setattr(self, name, torch.nn.Parameter(state_dict[key], requires_grad=False))
            elif name in self._gguf_expected and getattr(self, name, None) is None:
                missing_keys.append(key)
        if strict:
            for key in state_dict:
                local = key[len(prefix):] if key.startswith(prefix) else None
                if local is not None and "." not in local and local not in _PARAMS:
                    unexpected_keys.append(key)

    # -- forward --------------------------------------------------------------------------------

    def compute_dtype(self, input: torch.Tensor) -> torch.dtype:
        """The dtype the op runs in: the input's (layers with float inputs)."""
        return input.dtype

    def cast_weight_bias(self, input: torch.Tensor, dtype: torch.dtype | None = None,
                         device: torch.device | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Weight and bias on `device` (default: the input's) in `dtype` (default: compute dtype).

        Quantized bytes are moved as bytes (non-blocking) and dequantized on the target device.
        ComfyUI's per-layer `weight_function`/`bias_function` hooks (LoRA patches) are applied to the
        dequantized values.
        """
        device = input.device if device is None else device
        dtype = self.compute_dtype(input) if dtype is None else dtype
        weight, bias = getattr(self, "weight", None), getattr(self, "bias", None)
        if weight is None and "weight" in self._gguf_expected:
            raise RuntimeError(f"{type(self).__name__}: weight was never loaded (state dict had no weight)")
        weight = self._cast(weight, dtype, device, getattr(self, "weight_function", ()))
        bias = self._cast(bias, dtype, device, getattr(self, "bias_function", ()))
        return weight, bias

    def _cast(self, tensor, dtype: torch.dtype, device: torch.device, functions) -> torch.Tensor | None:
        if tensor is None:
            return None
        if isinstance(tensor, GGMLTensor):
            value = tensor.to(device, non_blocking=True).dequantize(self.gguf_config.dequant_dtype or dtype)
            value = value if value.dtype == dtype else value.to(dtype)
        else:
            # ComfyUI's weight functions (LoRA patches) add into their argument in place, so they must never
            # receive the stored tensor itself (which may even be a read-only view of the file).
            value = tensor.to(device=device, dtype=dtype, non_blocking=True, copy=bool(functions))
        for function in functions or ():
            value = function(value)
        return value

    def forward(self, input: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        weight, bias = self.cast_weight_bias(input)
        return self._functional(input, weight, bias)

    forward_comfy_cast_weights = forward

    def _functional(self, input: torch.Tensor, weight, bias) -> torch.Tensor:
        raise NotImplementedError


class _Linear(GGUFLayer):
    def _functional(self, input, weight, bias):
        return F.linear(input, weight, bias)


class _Conv(GGUFLayer):
    def _functional(self, input, weight, bias):
        return self._conv_forward(input, weight, bias)


class _LayerNorm(GGUFLayer):
    def _functional(self, input, weight, bias):
        return F.layer_norm(input, self.normalized_shape, weight, bias, self.eps)


class _GroupNorm(GGUFLayer):
    def _functional(self, input, weight, bias):
        return F.group_norm(input, self.num_groups, weight, bias, self.eps)


class _RMSNorm(GGUFLayer):
    def _functional(self, input, weight, bias):
        return F.rms_norm(input, self.normalized_shape, weight, self.eps)


class _Embedding(GGUFLayer):
    def compute_dtype(self, input: torch.Tensor) -> torch.dtype:
        """Token ids carry no dtype: config, else a plain weight's own dtype, else float32."""
        weight = getattr(self, "weight", None)
        if self.gguf_config.embedding_dtype is not None:
            return self.gguf_config.embedding_dtype
        if weight is not None and not isinstance(weight, GGMLTensor) and weight.is_floating_point():
            return weight.dtype
        return torch.float32

    def forward(self, input: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        weight = getattr(self, "weight", None)
        if weight is not None:  # an id past the table is a user's prompt, not a bug: one line, not an IndexError
            source = weight.ggml_meta.source if isinstance(weight, GGMLTensor) else ""
            check_token_ids(input, weight.shape[0], source, self.gguf_config.embedding_tables)
        if self._can_gather_rows(weight):
            return self._gathered_rows(input, weight, out_dtype or self.compute_dtype(input))
        weight, _ = self.cast_weight_bias(input, dtype=out_dtype)
        return self._functional(input, weight, None)

    forward_comfy_cast_weights = forward

    def _can_gather_rows(self, weight) -> bool:
        """Quantized rows can be looked up before dequantizing unless something needs the whole table."""
        if not isinstance(weight, GGMLTensor) or self.max_norm is not None or getattr(self, "weight_function", None):
            return False
        raw = weight.as_plain()
        return raw.dim() == 2 and raw.shape[0] == weight.shape[0] and len(weight.shape) == 2

    def _gathered_rows(self, input: torch.Tensor, weight: GGMLTensor, dtype: torch.dtype) -> torch.Tensor:
        # Dequantizing is row-independent, so looking up the token rows first gives exactly
        # F.embedding(ids, dequantize(weight)) at the cost of the tokens, not of the vocabulary
        # (a 256k x 4096 UMT5 table would be 4 GiB of float32 per call otherwise).
        raw = weight.as_plain()
        rows = raw.index_select(0, input.reshape(-1).to(raw.device))
        rows = rows.to(input.device, non_blocking=True)
        values = dequantize_raw(rows, weight.qtype, torch.Size((rows.shape[0], weight.shape[1])),
                                self.gguf_config.dequant_dtype or dtype)
        return values.to(dtype).view(*input.shape, weight.shape[1])

    def _functional(self, input, weight, bias):
        return F.embedding(input, weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq,
                           self.sparse)


_MIXINS: dict[str, type[GGUFLayer]] = {
    "Linear": _Linear, "Conv1d": _Conv, "Conv2d": _Conv, "Conv3d": _Conv, "Embedding": _Embedding,
    "LayerNorm": _LayerNorm, "GroupNorm": _GroupNorm, "RMSNorm": _RMSNorm,
}


def make_ops(config: GGUFOpsConfig = GGUFOpsConfig(), base=torch.nn) -> SimpleNamespace:
    """A new namespace of GGUF layer classes built on `base`'s classes, carrying `config`.

    Args:
        config: per-model settings (immutable; stored on the new classes).
        base: any namespace with Linear, Conv1d, Conv2d, Conv3d, Embedding, LayerNorm, GroupNorm
            and RMSNorm classes (torch.nn, comfy.ops.manual_cast, ...). Missing ones are skipped.

    Example:
        >>> ops = make_ops(GGUFOpsConfig(dequant_dtype=torch.float32))
        >>> layer = ops.Linear(4096, 4096)          # no weight allocated
        >>> layer.load_state_dict({"weight": q8_weight, "bias": bias})  # doctest: +SKIP
    """
    classes = {}
    for name, mixin in _MIXINS.items():
        base_class = getattr(base, name, None)
        if base_class is None:
            continue
        classes[name] = type(name, (mixin, base_class), {
            "gguf_config": config, "__module__": __name__, "__qualname__": f"GGUFOps.{name}"})
    return SimpleNamespace(config=config, **classes)
