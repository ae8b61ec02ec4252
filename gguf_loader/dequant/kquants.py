"""K-quants: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (256-element super-blocks with per-sub-block scales).

The per-sub-block scales are small (n_blocks x 8 or 16) and follow gguf-py's arithmetic exactly;
the per-element work is: integer codes into `out`, then one in-place multiply (and subtract).
"""

from __future__ import annotations

import torch

from .fields import bit_planes, crumbs, fp16_column, nibbles
from .registry import register


def _scale_groups(out: torch.Tensor, groups: int) -> torch.Tensor:
    return out.view(out.shape[0], groups, -1)


@register("Q2_K")
def q2_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    scales = blocks[:, :16]
    d, dmin = fp16_column(blocks, 80), fp16_column(blocks, 82)
    dl = d * scales.bitwise_and(0x0F).to(torch.float32)
    ml = dmin * scales.bitwise_right_shift(4).to(torch.float32)
    # qs: two groups of 32 bytes, each unpacked at shifts 0, 2, 4, 6 -> element g*128 + s*32 + j.
    out.copy_(crumbs(blocks[:, 16:80].view(n, 2, 32)).view(n, 256))
    _scale_groups(out, 16).mul_(dl.unsqueeze(-1)).sub_(ml.unsqueeze(-1))


def _q3_k_scales(packed: torch.Tensor) -> torch.Tensor:
    """The sixteen 6-bit signed scales of Q3_K (packed: uint8[n, 12]) as float32[n, 16]."""
    n = packed.shape[0]
    low = nibbles(packed[:, :8]).view(n, 16)
    high = crumbs(packed[:, 8:12]).view(n, 16)
    codes = low.bitwise_or_(high.bitwise_left_shift_(4)).sub_(32)
    return codes.view(torch.int8).to(torch.float32)


@register("Q3_K")
def q3_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    dl = fp16_column(blocks, 108) * _q3_k_scales(blocks[:, 96:108])
    low = crumbs(blocks[:, 32:96].view(n, 2, 32)).view(n, 256)
    # A clear hmask bit subtracts 4: code = low - 4 * (1 - bit), in [-4, 3].
    high = bit_planes(blocks[:, :32]).view(n, 256)
    low.sub_(high.bitwise_xor_(1).bitwise_left_shift_(2))
    out.copy_(low.view(torch.int8))
    _scale_groups(out, 16).mul_(dl.unsqueeze(-1))


def _k_scale_min(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eight 6-bit scales and mins of Q4_K/Q5_K (packed: uint8[n, 12]) as float32[n, 8] each."""
    d, m, md = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scale = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    minimum = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return scale.to(torch.float32), minimum.to(torch.float32)


def _k_scale_terms(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale, minimum = _k_scale_min(blocks[:, 4:16])
    return fp16_column(blocks, 0) * scale, fp16_column(blocks, 2) * minimum


@register("Q4_K")
def q4_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    d, dm = _k_scale_terms(blocks)
    out.copy_(nibbles(blocks[:, 16:].view(n, 4, 32)).view(n, 256))
    _scale_groups(out, 8).mul_(d.unsqueeze(-1)).sub_(dm.unsqueeze(-1))


@register("Q5_K")
def q5_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    d, dm = _k_scale_terms(blocks)
    codes = nibbles(blocks[:, 48:].view(n, 4, 32)).view(n, 256)
    codes.bitwise_or_(bit_planes(blocks[:, 16:48]).view(n, 256).bitwise_left_shift_(4))
    out.copy_(codes)
    _scale_groups(out, 8).mul_(d.unsqueeze(-1)).sub_(dm.unsqueeze(-1))


@register("Q6_K")
def q6_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    d = fp16_column(blocks, 208) * blocks[:, 192:208].view(torch.int8).to(torch.float32)
    low = nibbles(blocks[:, :128].view(n, 2, 64)).view(n, 256)
    high = crumbs(blocks[:, 128:192].view(n, 2, 32)).view(n, 256)
    codes = low.bitwise_or_(high.bitwise_left_shift_(4)).sub_(32)
    out.copy_(codes.view(torch.int8))
    _scale_groups(out, 16).mul_(d.unsqueeze(-1))
