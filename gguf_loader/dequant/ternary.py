"""Ternary types TQ1_0 and TQ2_0 (values -1, 0, 1 times a per-block fp16 scale)."""

from __future__ import annotations

import torch

from .fields import crumbs, fp16_column
from .registry import register

_TQ1_POWERS = (1, 3, 9, 27, 81)


# (first byte, last byte, powers used): bytes 0..31 give elements 0..159 power-major, bytes 32..47
# elements 160..239, and the four qh bytes 48..51 elements 240..255 (powers 1, 3, 9, 27 only).
_TQ1_SEGMENTS = ((0, 32, 5), (32, 48, 5), (48, 52, 4))


def _scaled_bytes(blocks: torch.Tensor) -> torch.Tensor:
    """uint8[n, 256]: byte b times 3**i mod 256, already in TQ1_0's element order."""
    n = blocks.shape[0]
    scaled = torch.empty((n, 256), dtype=torch.uint8, device=blocks.device)
    position = 0
    for first, last, powers in _TQ1_SEGMENTS:
        packed = blocks[:, first:last]
        width = last - first
        for power in _TQ1_POWERS[:powers]:
            # uint8 multiply wraps mod 256, as in ggml
            torch.mul(packed, power, out=scaled[:, position:position + width])
            position += width
    return scaled


@register("TQ1_0")
def tq1_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    scaled = _scaled_bytes(blocks)
    # (x * 3) >> 8 is 0, 1 or 2 exactly when x < 86, 86 <= x < 171 or x >= 171, so two comparisons
    # replace gguf-py's uint16 multiply and shift with identical results. They write uint8
    # buffers: torch's bool outputs are several times slower on the CPU.
    codes = torch.gt(scaled, 85, out=torch.empty_like(scaled))
    codes.add_(torch.gt(scaled, 170, out=scaled)).sub_(1)
    out.copy_(codes.view(torch.int8))
    out.mul_(fp16_column(blocks, 52))


@register("TQ2_0")
def tq2_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    codes = crumbs(blocks[:, :64].view(n, 2, 32)).view(n, 256).sub_(1)
    out.copy_(codes.view(torch.int8))
    out.mul_(fp16_column(blocks, 64))
