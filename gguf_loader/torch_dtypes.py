"""The torch dtype of each plain (non-block) GGML type, and back."""

import torch
from gguf import GGMLQuantizationType as QType

PLAIN_TORCH_DTYPES: dict[QType, torch.dtype] = {
    QType.F32: torch.float32,
    QType.F16: torch.float16,
    QType.BF16: torch.bfloat16,
    QType.F64: torch.float64,
    QType.I8: torch.int8,
    QType.I16: torch.int16,
    QType.I32: torch.int32,
    QType.I64: torch.int64,
}

# The reverse, for writing plain torch tensors.
TORCH_DTYPE_QTYPES: dict[torch.dtype, QType] = {v: k for k, v in PLAIN_TORCH_DTYPES.items()}
