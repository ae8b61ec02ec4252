"""Torch quantizers: Q8_0, bit-identical to gguf-py's reference (ggml's quantize_row_q8_0_ref).

gguf-py quantizes in single-threaded numpy; this runs on any device, which matters for building
quantized models in memory (benchmarks), the quantize command and streamed blocks staged as Q8_0.
"""

from __future__ import annotations

import torch

from .tensor import GGMLTensor

Q8_0_BLOCK = 32  # elements per block
Q8_0_BLOCK_BYTES = 34  # fp16 scale + 32 int8 codes
# Blocks quantized per step: the float32 temporaries stay a few MB whatever the tensor's size.
CHUNK_ELEMENTS = 1 << 20


def _round_half_away(values: torch.Tensor) -> torch.Tensor:
    """gguf-py's np_roundf: floor(|x|) + floor(2 * frac(|x|)), with the sign of x (exact, no x + 0.5)."""
    magnitude = values.abs()
    floored = magnitude.floor()
    rounded = floored.add_((magnitude.sub_(floored)).mul_(2).floor_())
    return rounded.mul_(values.sign())


def quantize_q8_0_into(values: torch.Tensor, out: torch.Tensor, chunk_elements: int = CHUNK_ELEMENTS) -> None:
    """Quantizes `values` (any float tensor, read in row-major order, numel a multiple of 32) into `out`.

    Args:
        values: the float values; each run of 32 consecutive elements is one block.
        out: uint8 (numel // 32, 34) to write the blocks into, on any device (chunks are copied there).
        chunk_elements: elements quantized per step; bounds the float32 temporaries (results do not depend on it).

    Example:
        >>> out = torch.empty(4, 34, dtype=torch.uint8)
        >>> quantize_q8_0_into(torch.randn(2, 64), out)
    """
    numel = values.numel()
    if numel % Q8_0_BLOCK:
        raise ValueError(f"Q8_0 needs a multiple of {Q8_0_BLOCK} elements, got {numel} (shape {tuple(values.shape)})")
    n_blocks = numel // Q8_0_BLOCK
    if out.dtype != torch.uint8 or tuple(out.shape) != (n_blocks, Q8_0_BLOCK_BYTES):
        raise ValueError(f"Q8_0 output must be uint8 ({n_blocks}, {Q8_0_BLOCK_BYTES}); got {out.dtype} "
                         f"{tuple(out.shape)}")
    blocks = values.detach().reshape(n_blocks, Q8_0_BLOCK)
    step = max(1, chunk_elements // Q8_0_BLOCK)
    for start in range(0, n_blocks, step):
        stop = min(start + step, n_blocks)
        scales, codes = _q8_0_chunk(blocks[start:stop])
        out[start:stop, :2].copy_(scales.view(torch.uint8))
        out[start:stop, 2:].copy_(codes.view(torch.uint8))


def _q8_0_chunk(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp16 scales (n, 1), int8 codes (n, 32)) of float blocks (n, 32): gguf-py's float32 math step by step."""
    blocks = blocks.to(torch.float32)
    d = blocks.abs().amax(dim=1, keepdim=True).div_(127)
    inverse = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    codes = _round_half_away(blocks * inverse).to(torch.int8)  # not in place: `blocks` may be the caller's
    return d.to(torch.float16), codes


def quantize_q8_0(tensor: torch.Tensor) -> GGMLTensor:
    """Quantizes a float tensor (last dim a multiple of 32) to Q8_0 on its own device.

    Example:
        >>> q = quantize_q8_0(torch.randn(64, 128))
        >>> q.qtype_name, q.shape, q.size()
        ('Q8_0', torch.Size([64, 128]), torch.Size([64, 136]))
    """
    shape = tensor.shape
    if not shape or shape[-1] % Q8_0_BLOCK:
        raise ValueError(f"Q8_0 needs a last dim that is a multiple of {Q8_0_BLOCK}, got shape {tuple(shape)}")
    raw = torch.empty(shape.numel() // Q8_0_BLOCK, Q8_0_BLOCK_BYTES, dtype=torch.uint8, device=tensor.device)
    quantize_q8_0_into(tensor, raw)
    return GGMLTensor(raw.view(*shape[:-1], shape[-1] // Q8_0_BLOCK * Q8_0_BLOCK_BYTES), "Q8_0", shape)
