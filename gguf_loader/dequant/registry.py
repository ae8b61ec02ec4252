"""The dispatch table: one dequantization kernel per GGML type, registered once.

A kernel fills a float32 output from raw blocks:

    kernel(blocks: uint8[n_blocks, type_size], out: float32[n_blocks, block_size]) -> None

Writing into a caller-provided float32 buffer (instead of returning a new tensor) lets the driver in
`driver.py` process large tensors chunk by chunk with cache-sized temporaries, reuse one scratch buffer
for float16/bfloat16 targets, and allocate the final output once. Kernels must produce exactly what
gguf-py's numpy `dequantize_blocks` produces (same float32 operations in the same order).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from gguf import GGMLQuantizationType

Kernel = Callable[[torch.Tensor, torch.Tensor], None]

_KERNELS: dict[GGMLQuantizationType, Kernel] = {}


def register(qtype_name: str) -> Callable[[Kernel], Kernel]:
    """Decorator registering the kernel for the GGML type named `qtype_name`.

    Types missing from the installed gguf package (e.g. NVFP4 before gguf 0.19) are skipped, so the
    engine works with older gguf releases. Registering a type twice is a programming error.
    """

    def decorate(kernel: Kernel) -> Kernel:
        qtype = getattr(GGMLQuantizationType, qtype_name, None)
        if qtype is None:
            return kernel
        if qtype in _KERNELS:
            raise RuntimeError(f"a dequantization kernel for {qtype_name} is already registered "
                               f"({_KERNELS[qtype].__qualname__})")
        _KERNELS[qtype] = kernel
        return kernel

    return decorate


def kernel_for(qtype: GGMLQuantizationType) -> Kernel | None:
    """The registered kernel for `qtype`, or None."""
    return _KERNELS.get(qtype)


def supported_qtypes() -> tuple[GGMLQuantizationType, ...]:
    """Every GGML type this engine dequantizes, in enum order."""
    return tuple(sorted(_KERNELS, key=int))
