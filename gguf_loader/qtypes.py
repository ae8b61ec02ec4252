"""GGML tensor types: sizes and shapes, taken from gguf-py's tables (never restated here)."""

from __future__ import annotations

from collections.abc import Sequence

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

QType = GGMLQuantizationType

# Stored types that are plain typed arrays: read as typed torch views, never as GGMLTensor.
PLAIN_QTYPES = frozenset({QType.F32, QType.F16, QType.BF16, QType.F64, QType.I8, QType.I16, QType.I32, QType.I64})


_QTYPES_BY_ID = {int(qtype): qtype for qtype in GGML_QUANT_SIZES}


def qtype_from_id(type_id: int) -> GGMLQuantizationType | None:
    """The GGML type for a raw id, or None when the installed gguf package does not know it."""
    return _QTYPES_BY_ID.get(type_id)


def as_qtype(value: GGMLQuantizationType | str | int) -> GGMLQuantizationType:
    """Accepts a GGMLQuantizationType, its name ("Q8_0", case-insensitive) or its id."""
    if isinstance(value, GGMLQuantizationType):
        return value
    if isinstance(value, str):
        try:
            return GGMLQuantizationType[value.upper()]
        except KeyError:
            raise ValueError(f"unknown GGML type name {value!r}") from None
    qtype = qtype_from_id(int(value))
    if qtype is None:
        raise ValueError(f"unknown GGML type id {value!r}")
    return qtype


def is_plain(qtype: GGMLQuantizationType) -> bool:
    """True for types torch can view directly (floats and ints), False for block-quantized ones."""
    return qtype in PLAIN_QTYPES


def row_bytes(qtype: GGMLQuantizationType, row_length: int) -> int:
    """Bytes of one row of `row_length` elements; the caller checks divisibility first."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    return row_length // block_size * type_size


def byte_shape(shape: Sequence[int], qtype: GGMLQuantizationType) -> tuple[int, ...]:
    """The uint8 shape holding a tensor of logical `shape`: all dims but the last, then the row bytes.

    Raises:
        ValueError: the last dim is not a multiple of the type's block size.
    """
    block_size, _ = GGML_QUANT_SIZES[qtype]
    if not shape:
        raise ValueError(f"{qtype.name} tensors need at least one dimension")
    if shape[-1] % block_size:
        raise ValueError(f"row length {shape[-1]} is not a multiple of the {qtype.name} block size {block_size}")
    return (*shape[:-1], row_bytes(qtype, shape[-1]))


def nbytes_of(shape: Sequence[int], qtype: GGMLQuantizationType) -> int:
    """Bytes of a tensor of logical `shape` stored as `qtype`."""
    rows = 1
    for dim in shape[:-1]:
        rows *= dim
    return rows * byte_shape(shape, qtype)[-1]


def nbytes_of_elements(n_elements: int, qtype: GGMLQuantizationType) -> int:
    """Bytes of `n_elements` elements of `qtype` in any layout whose rows hold whole blocks.

    Raises:
        ValueError: `n_elements` is not a whole number of blocks.
    """
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if n_elements % block_size:
        raise ValueError(f"{n_elements} elements is not a whole number of {qtype.name} blocks ({block_size})")
    return n_elements // block_size * type_size
