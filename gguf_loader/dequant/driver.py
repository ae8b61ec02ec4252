"""The driver: runs a GGML type's kernel over raw blocks in cache-sized chunks (`dequantize_blocks`), and over
one tensor's raw bytes (`dequantize_raw`)."""

from __future__ import annotations

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import GGUFError
from . import memory
from .registry import kernel_for

# Blocks per kernel call, in elements: CPU chunks keep the uint8/int32 temporaries cache-resident;
# on accelerators one large chunk keeps launches few while bounding temporary memory.
CPU_CHUNK_ELEMENTS = 1 << 22
DEVICE_CHUNK_ELEMENTS = 1 << 26

_FLOAT_TARGETS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def dequantize_blocks(blocks: torch.Tensor, qtype: GGMLQuantizationType, dtype: torch.dtype = torch.float32,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantizes raw GGML blocks on their own device.

    Args:
        blocks: uint8 tensor of shape (n_blocks, type_size), contiguous.
        qtype: the GGML type of the blocks.
        dtype: float32 (bit-identical to gguf-py), float16 or bfloat16 (the float32 result rounded
            once), or float64.
        out: optional (n_blocks, block_size) tensor of `dtype` to write into.

    Returns:
        A (n_blocks, block_size) tensor of `dtype`.

    Example:
        >>> blocks = torch.zeros(4, 34, dtype=torch.uint8)  # four all-zero Q8_0 blocks
        >>> dequantize_blocks(blocks, GGMLQuantizationType.Q8_0).shape
        torch.Size([4, 32])
    """
    kernel = kernel_for(qtype)
    if kernel is None:
        raise GGUFError(f"no dequantization kernel for GGML type {qtype.name}")
    _check_target(dtype)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_blocks = blocks.shape[0]
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != type_size:
        raise ValueError(f"{qtype.name} blocks must be uint8 (n, {type_size}); "
                         f"got {blocks.dtype} {tuple(blocks.shape)}")
    result = out if out is not None else memory.empty((n_blocks, block_size), dtype, blocks.device)
    _run_chunks(kernel, blocks.contiguous(), result, block_size)
    return result


def _check_target(dtype: torch.dtype) -> None:
    if dtype not in _FLOAT_TARGETS:
        raise TypeError(f"dequantize to float32, float16, bfloat16 or float64, not {dtype}")


def _run_chunks(kernel, blocks: torch.Tensor, result: torch.Tensor, block_size: int) -> None:
    n_blocks = blocks.shape[0]
    chunk_elements = CPU_CHUNK_ELEMENTS if blocks.device.type == "cpu" else DEVICE_CHUNK_ELEMENTS
    step = max(1, chunk_elements // block_size)
    scratch = None
    if result.dtype != torch.float32:
        # Kernels compute in float32; one chunk-sized scratch is rounded into the target per chunk.
        scratch = torch.empty((min(step, n_blocks), block_size), dtype=torch.float32, device=blocks.device)
    for start in range(0, n_blocks, step):
        stop = min(start + step, n_blocks)
        target = result[start:stop] if scratch is None else scratch[:stop - start]
        kernel(blocks[start:stop], target)
        if scratch is not None:
            result[start:stop].copy_(target)


def dequantize_raw(raw: torch.Tensor, qtype: GGMLQuantizationType, shape: torch.Size,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantizes the raw bytes of one tensor (any uint8 shape) to `dtype` in logical `shape`."""
    _, type_size = GGML_QUANT_SIZES[qtype]
    if raw.numel() % type_size:
        raise GGUFError(f"{raw.numel()} bytes is not a whole number of {qtype.name} blocks ({type_size} bytes)")
    blocks = raw.contiguous().view(-1, type_size) if raw.numel() else raw.reshape(0, type_size)
    return dequantize_blocks(blocks, qtype, dtype).view(shape)
