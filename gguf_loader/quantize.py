"""Torch quantizers: Q8_0, bit-identical to gguf-py's reference (ggml's quantize_row_q8_0_ref).

gguf-py quantizes in single-threaded numpy; this runs on any device, which matters for building
quantized models in memory (benchmarks, a future quantize node).
"""

from __future__ import annotations

import torch

from .tensor import GGMLTensor

_Q8_0_BLOCK = 32


def _round_half_away(values: torch.Tensor) -> torch.Tensor:
    """gguf-py's np_roundf: floor(|x|) + floor(2 * frac(|x|)), with the sign of x (exact, no x + 0.5)."""
    magnitude = values.abs()
    floored = magnitude.floor()
    rounded = floored.add_((magnitude.sub_(floored)).mul_(2).floor_())
    return rounded.mul_(values.sign())


def quantize_q8_0(tensor: torch.Tensor) -> GGMLTensor:
    """Quantizes a float tensor (last dim a multiple of 32) to Q8_0 on its own device.

    Example:
        >>> q = quantize_q8_0(torch.randn(64, 128))
        >>> q.qtype_name, q.shape, q.size()
        ('Q8_0', torch.Size([64, 128]), torch.Size([64, 136]))
    """
    shape = tensor.shape
    if not shape or shape[-1] % _Q8_0_BLOCK:
        raise ValueError(f"Q8_0 needs a last dim that is a multiple of {_Q8_0_BLOCK}, got shape {tuple(shape)}")
    blocks = tensor.detach().to(torch.float32).reshape(-1, _Q8_0_BLOCK)
    d = blocks.abs().amax(dim=1, keepdim=True).div_(127)
    inverse = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    codes = _round_half_away(blocks * inverse).to(torch.int8)
    raw = torch.cat([d.to(torch.float16).view(torch.uint8), codes.view(torch.uint8)], dim=1)
    return GGMLTensor(raw.view(*shape[:-1], shape[-1] // _Q8_0_BLOCK * 34), "Q8_0", shape)
