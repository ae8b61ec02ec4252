"""Legacy block types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (32 elements per block).

Every kernel converts the small integer codes into `out` first, then applies the scale (and offset)
in place: the same float32 multiply (and add) gguf-py performs, so results are bit-identical.
"""

from __future__ import annotations

import torch

from .fields import bits_lsb_first, fp16_column, nibbles
from .registry import register


def _codes_4bit(qs: torch.Tensor) -> torch.Tensor:
    """uint8[n, 32]: element j < 16 is the low nibble of byte j, element j >= 16 the high nibble."""
    return nibbles(qs).view(qs.shape[0], 32)


def _codes_5bit(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """uint8[n, 32]: the 4-bit code plus bit j of the 32-bit word `qh` as bit 4."""
    codes = _codes_4bit(qs)
    high = bits_lsb_first(qh).view(qh.shape[0], 32)
    return codes.bitwise_or_(high.bitwise_left_shift_(4))


@register("Q8_0")
def q8_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(blocks[:, 2:].view(torch.int8))
    out.mul_(fp16_column(blocks, 0))


@register("Q4_0")
def q4_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    codes = _codes_4bit(blocks[:, 2:]).sub_(8)  # wraps in uint8; read back as int8 -8..7
    out.copy_(codes.view(torch.int8))
    out.mul_(fp16_column(blocks, 0))


@register("Q4_1")
def q4_1(blocks: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(_codes_4bit(blocks[:, 4:]))
    out.mul_(fp16_column(blocks, 0)).add_(fp16_column(blocks, 2))


@register("Q5_0")
def q5_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    codes = _codes_5bit(blocks[:, 2:6], blocks[:, 6:]).sub_(16)
    out.copy_(codes.view(torch.int8))
    out.mul_(fp16_column(blocks, 0))


@register("Q5_1")
def q5_1(blocks: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(_codes_5bit(blocks[:, 4:8], blocks[:, 8:]))
    out.mul_(fp16_column(blocks, 0)).add_(fp16_column(blocks, 2))
