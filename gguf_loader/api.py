"""`dequantize`: the one call that turns any weight (GGMLTensor or plain) into a usable tensor."""

from __future__ import annotations

import torch

from .tensor import GGMLTensor


def dequantize(tensor: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A plain tensor of `dtype` in the logical shape, on the tensor's own device.

    GGMLTensors are dequantized (float32: bit-identical to gguf-py; float16/bfloat16: the float32
    result rounded once). Plain tensors are converted with `.to(dtype)`, which returns the same
    tensor when it already has that dtype: F16/BF16 weights read from a file stay zero-copy views.

    Example:
        >>> w = dequantize(f.tensors["blk.0.attn_q.weight"], torch.bfloat16)  # doctest: +SKIP
    """
    if isinstance(tensor, GGMLTensor):
        return tensor.dequantize(dtype)
    return tensor.to(dtype)
