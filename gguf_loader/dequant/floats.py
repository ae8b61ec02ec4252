"""F32, F16 and BF16 held as raw bytes (a GGMLTensor of a float type): plain conversions.

read_gguf returns these types as typed torch views, so these kernels only serve raw-byte inputs.
"""

from __future__ import annotations

import torch

from .fields import reinterpret
from .registry import register


@register("F32")
def f32(blocks: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(reinterpret(blocks, torch.float32))


@register("F16")
def f16(blocks: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(reinterpret(blocks, torch.float16))


@register("BF16")
def bf16(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # bfloat16 -> float32 is a 16-bit shift (exact), the same as gguf-py's int32 shift.
    out.copy_(reinterpret(blocks, torch.bfloat16))
