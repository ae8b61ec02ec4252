"""Which tensors a stream format encodes, and the bytes they take so: rules on a tensor's name, dtype and shape
alone, shared by a live model (stream_format.py) and by plans from a file header (headers.py). No torch.

A tensor is encoded when it is a float32, float16 or bfloat16 weight of at least 2 dims and more than 1024
elements, named `...weight` with no name component holding "norm" or "embed", and (q8_0) its last dim is a
multiple of 32; stream_format.py adds what only a live tensor shows (tied or strided tensors stay stored).
"""

import math
from collections.abc import Sequence

from .request import StreamFormat
from .units import align_up, dtype_label

Q8_0_BLOCK = 32  # values per GGUF Q8_0 block
Q8_0_BLOCK_BYTES = 34  # an fp16 scale and 32 int8 codes
FP8_HEADER_BYTES = 16  # the float32 scale, padded so that the codes start 16-byte aligned
MIN_ENCODED_ELEMENTS = 1025  # ComfyUI-GGUF's threshold: 1024 elements and fewer stay as stored
FLOAT_LABELS = ("fp32", "fp16", "bf16")
# Elements per decode step: bounds the float32 temporaries of a decode on the compute device.
DECODE_CHUNK_ELEMENTS = {"cpu": 1 << 20, "device": 1 << 24}  # 64 MiB of float32 scratch on an accelerator


def tensor_keep_reason(name: str, dtype: str, shape: Sequence[int], fmt: StreamFormat | str) -> str:
    """Why a dense, untied tensor travels as stored in `fmt` ("" when it is encoded). `dtype`: any spelling
    `distorch.units.dtype_label` knows ("bfloat16", "BF16", "bf16")."""
    fmt = StreamFormat.parse(fmt)
    if fmt == StreamFormat.STORED:
        return "stored format"
    if dtype_label(dtype) not in FLOAT_LABELS:
        return f"{dtype} stays as stored"
    if len(shape) < 2:
        return "1-D"
    numel = math.prod(shape)
    if numel < MIN_ENCODED_ELEMENTS:
        return f"{numel} elements"
    reason = name_reason(name)
    if reason:
        return reason
    if fmt == StreamFormat.Q8_0 and shape[-1] % Q8_0_BLOCK:
        return f"last dim {shape[-1]} not a multiple of {Q8_0_BLOCK}"
    return ""


def name_reason(name: str) -> str:
    """Why a tensor named `name` keeps its stored precision ("" for a plain weight)."""
    parts = name.lower().split(".")
    if parts[-1] != "weight":
        return f"not a weight ({parts[-1]})"
    if any("norm" in part for part in parts[:-1]):
        return "a norm"
    if any("embed" in part for part in parts[:-1]):
        return "an embedding"
    return ""


def encoded_tensor_nbytes(numel: int, fmt: StreamFormat | str) -> int:
    """Bytes an encoded tensor of `numel` elements takes in `fmt` (a format that encodes)."""
    if StreamFormat.parse(fmt) == StreamFormat.Q8_0:
        return numel // Q8_0_BLOCK * Q8_0_BLOCK_BYTES
    return FP8_HEADER_BYTES + numel


def packed_offsets(sizes: Sequence[int]) -> list[int]:
    """Where each of `sizes` starts laid out one after another, each aligned (a block's host buffer and slot)."""
    offsets, cursor = [], 0
    for nbytes in sizes:
        offset = align_up(cursor)
        offsets.append(offset)
        cursor = offset + nbytes
    return offsets


def packed_total(offsets: Sequence[int], sizes: Sequence[int]) -> int:
    return align_up(offsets[-1] + sizes[-1]) if offsets else 0


def decode_scratch_bytes(encoded_numels: Sequence[int], device_type: str = "cuda") -> int:
    """float32 temporaries one decode of tensors of `encoded_numels` elements allocates at most on `device_type`."""
    chunk = DECODE_CHUNK_ELEMENTS["cpu" if device_type == "cpu" else "device"]
    return 4 * max((min(chunk, n) for n in encoded_numels), default=0)
