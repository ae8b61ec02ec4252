"""Streaming GGUF writer on top of gguf-py's GGUFWriter (tests, and the future quantize node).

All tensor infos are declared first (sizes are computed from shapes and types, nothing is
quantized yet), then header, metadata and tensor table are written, then each tensor is produced,
quantized and written one at a time, so peak memory is one tensor, not the model. Tensor sources
may be callables that load the tensor on demand.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, quants

from .gguf_header import MAX_DIMS, ORIG_SHAPE_PREFIX
from .qtypes import as_qtype, byte_shape, nbytes_of
from .tensor import GGMLTensor
from .torch_dtypes import PLAIN_TORCH_DTYPES, TORCH_DTYPE_QTYPES

Source = torch.Tensor | np.ndarray | Callable[[], torch.Tensor | np.ndarray]

_NUMPY_QTYPES = {np.dtype(np.float32): GGMLQuantizationType.F32, np.dtype(np.float16): GGMLQuantizationType.F16,
                 np.dtype(np.float64): GGMLQuantizationType.F64, np.dtype(np.int8): GGMLQuantizationType.I8,
                 np.dtype(np.int16): GGMLQuantizationType.I16, np.dtype(np.int32): GGMLQuantizationType.I32,
                 np.dtype(np.int64): GGMLQuantizationType.I64}
_INT32_RANGE = range(-(2 ** 31), 2 ** 31)
_INT64_RANGE = range(-(2 ** 63), 2 ** 63)


@dataclass(frozen=True)
class _Planned:
    """One tensor to write: where its bytes come from and how they are laid out."""

    name: str
    qtype: GGMLQuantizationType
    shape: torch.Size  # logical
    stored_shape: tuple[int, ...]  # as written (torch order); differs from shape -> orig_shape key
    source: Source
    raw: bool | None  # source holds pre-quantized blocks to copy verbatim (None: decided at write time)

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.stored_shape, self.qtype)


def can_quantize(qtype: GGMLQuantizationType | str) -> bool:
    """True when float data can be converted to `qtype` here (gguf-py has a quantizer for it)."""
    qtype = as_qtype(qtype)
    if qtype in PLAIN_TORCH_DTYPES:
        return True
    traits = quants._type_traits.get(qtype)
    return traits is not None and "quantize_blocks" in vars(traits)


class GGUFFileWriter:
    """Writes a GGUF v3 file tensor by tensor.

    Args:
        path: output file.
        architecture: value of `general.architecture` (omitted when None).
        alignment: data alignment (default 32, written as `general.alignment` only when different).

    Example:
        >>> w = GGUFFileWriter("out.gguf", architecture="flux")  # doctest: +SKIP
        >>> w.add_metadata("general.name", "demo")  # doctest: +SKIP
        >>> w.add_tensor("a.weight", torch.randn(64, 64), qtype="Q8_0")  # quantized by gguf-py  # doctest: +SKIP
        >>> w.add_tensor("b.weight", raw_q4k_blocks, qtype="Q4_K", shape=(64, 256))  # doctest: +SKIP
        >>> w.write()  # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike, architecture: str | None = None, alignment: int | None = None) -> None:
        self.path = os.fspath(path)
        self.architecture = architecture
        self._metadata: dict[str, tuple[Any, GGUFValueType, GGUFValueType | None]] = {}  # key -> value, types
        self._tensors: dict[str, _Planned] = {}  # name -> plan, in write order
        self._alignment = alignment
        if alignment is not None:
            if alignment <= 0 or alignment & (alignment - 1):
                raise ValueError(f"alignment must be a positive power of two, got {alignment}")
            self.add_metadata(gguf.Keys.General.ALIGNMENT, alignment, GGUFValueType.UINT32)

    def add_metadata(self, key: str, value: Any, value_type: GGUFValueType | None = None,
                     item_type: GGUFValueType | None = None) -> None:
        """Adds one key. Types are inferred when not given: str, bool, int (INT32, else INT64/UINT64),
        float (FLOAT32), and lists/tuples/numpy arrays of one of those (ARRAY)."""
        if isinstance(value, np.ndarray):
            value = value.tolist()
        if isinstance(value, tuple):
            value = list(value)
        if value_type is None:
            value_type, inferred_item = _infer_type(key, value)
            item_type = item_type or inferred_item
        if value_type == GGUFValueType.ARRAY and not value:
            raise ValueError(f"metadata {key!r}: gguf-py cannot write empty arrays")
        self._metadata[key] = (value, value_type, item_type)

    def add_tensor(self, name: str, data: Source, qtype: GGMLQuantizationType | str | None = None,
                   shape: tuple[int, ...] | None = None, stored_shape: tuple[int, ...] | None = None) -> None:
        """Declares a tensor; nothing is read or quantized until `write()`.

        Args:
            name: tensor name (usually the original state-dict key).
            data: a float tensor/array (converted or quantized at write time), raw uint8 blocks
                (with `qtype` and `shape`), a GGMLTensor (written verbatim), or a callable returning
                one of those (then `qtype` and `shape` are required).
            qtype: target GGML type; default: the GGMLTensor's type, or the float type of `data`.
            shape: logical shape; default: `data.shape`.
            stored_shape: shape to store; default: `shape`, flattened when the last dim does not
                fit the block size or there are more than 4 dims. Whenever it differs from `shape`,
                `comfy.gguf.orig_shape.<name>` records the logical shape.
        """
        if name in self._tensors:
            raise ValueError(f"duplicate tensor name {name!r}")
        planned = _plan(name, data, qtype, shape, stored_shape)
        self._tensors[name] = planned
        if planned.stored_shape != tuple(planned.shape):
            self.add_metadata(ORIG_SHAPE_PREFIX + name, list(planned.shape), GGUFValueType.ARRAY, GGUFValueType.INT32)

    def write(self, progress: bool = False) -> None:
        """Writes the file: header, metadata, tensor table, then each tensor in turn."""
        writer = gguf.GGUFWriter(self.path, arch=self.architecture or "")
        try:
            if self._alignment is not None:
                writer.data_alignment = self._alignment
            for key, (value, value_type, item_type) in self._metadata.items():
                writer.add_key_value(key, value, value_type, sub_type=item_type)
            for planned in self._tensors.values():
                writer.add_tensor_info(planned.name, byte_shape(planned.stored_shape, planned.qtype), np.uint8,
                                       planned.nbytes, raw_dtype=planned.qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for planned in _progress(list(self._tensors.values()), progress):
                writer.write_tensor_data(_encode(planned))
        finally:
            writer.close()


def write_gguf(path: str | os.PathLike, tensors: Mapping[str, Source], metadata: Mapping[str, Any] | None = None,
               architecture: str | None = None, qtypes: Mapping[str, GGMLQuantizationType | str] | None = None) -> None:
    """Writes `tensors` (name -> tensor/array/GGMLTensor) to a GGUF file in one call.

    `qtypes` maps names to target types (default: keep each tensor's own type).
    """
    writer = GGUFFileWriter(path, architecture)
    for key, value in (metadata or {}).items():
        writer.add_metadata(key, value)
    for name, data in tensors.items():
        writer.add_tensor(name, data, (qtypes or {}).get(name))
    writer.write()


# -- planning -------------------------------------------------------------------------------------

def _plan(name: str, data: Source, qtype, shape, stored_shape) -> _Planned:
    if callable(data) and not isinstance(data, (torch.Tensor, np.ndarray)):
        if qtype is None or shape is None:
            raise ValueError(f"tensor {name!r}: a callable source needs qtype and shape")
        return _planned(name, as_qtype(qtype), torch.Size(shape), stored_shape, data, raw=None)
    if isinstance(data, GGMLTensor):
        if qtype is not None and as_qtype(qtype) != data.qtype:
            raise ValueError(f"tensor {name!r}: {data.qtype_name} blocks cannot be re-quantized to "
                             f"{as_qtype(qtype).name}; dequantize first")
        return _planned(name, data.qtype, data.shape, stored_shape, data, raw=True)
    dtype = _source_dtype(data)
    if dtype == torch.uint8:
        if qtype is None or shape is None:
            raise ValueError(f"tensor {name!r}: raw uint8 blocks need qtype and shape (the logical shape)")
        return _planned(name, as_qtype(qtype), torch.Size(shape), stored_shape, data, raw=True)
    target = as_qtype(qtype) if qtype is not None else TORCH_DTYPE_QTYPES.get(dtype)
    if target is None:
        raise ValueError(f"tensor {name!r}: no GGML type for {dtype}; pass qtype")
    if not can_quantize(target):
        raise ValueError(f"tensor {name!r}: gguf-py cannot quantize to {target.name}; pass pre-quantized "
                         f"uint8 blocks with qtype and shape instead")
    logical = torch.Size(shape) if shape is not None else torch.Size(data.shape)
    return _planned(name, target, logical, stored_shape, data, raw=False)


def _planned(name, qtype, shape, stored_shape, source, raw) -> _Planned:
    stored = tuple(stored_shape) if stored_shape is not None else _default_stored_shape(name, shape, qtype)
    if math.prod(stored) != shape.numel():
        raise ValueError(f"tensor {name!r}: stored shape {stored} does not hold {shape.numel()} elements")
    if not 1 <= len(stored) <= MAX_DIMS:
        raise ValueError(f"tensor {name!r}: GGUF stores 1 to {MAX_DIMS} dims, stored shape is {stored}")
    byte_shape(stored, qtype)  # raises when the row length does not fit the block size
    return _Planned(name, qtype, shape, stored, source, raw)


def _default_stored_shape(name: str, shape: torch.Size, qtype: GGMLQuantizationType) -> tuple[int, ...]:
    block_size = GGML_QUANT_SIZES[qtype][0]
    numel = shape.numel()
    if len(shape) and shape[-1] % block_size == 0:
        return tuple(shape) if len(shape) <= MAX_DIMS else (numel // shape[-1], shape[-1])
    for row in (256, block_size):
        if row % block_size == 0 and numel % row == 0 and numel:
            return (numel // row, row) if numel > row else (row,)
    raise ValueError(f"tensor {name!r}: {numel} elements cannot be stored as {qtype.name} "
                     f"(block size {block_size})")


def _source_dtype(data) -> torch.dtype:
    if isinstance(data, torch.Tensor):
        return data.dtype
    array_type = np.dtype(data.dtype)
    if array_type == np.uint8:
        return torch.uint8
    qtype = _NUMPY_QTYPES.get(array_type)
    if qtype is None:
        raise ValueError(f"unsupported numpy dtype {array_type}")
    return PLAIN_TORCH_DTYPES[qtype]


# -- encoding -------------------------------------------------------------------------------------

def _encode(planned: _Planned) -> np.ndarray:
    """The tensor's bytes as a uint8 array in the stored byte shape."""
    data = planned.source() if callable(planned.source) and not isinstance(planned.source, (torch.Tensor, np.ndarray)) \
        else planned.source
    raw = planned.raw if planned.raw is not None else isinstance(data, GGMLTensor) or _source_dtype(data) == torch.uint8
    encoded = _raw_bytes(data) if raw else _convert(data, planned)
    if encoded.size != planned.nbytes:
        raise ValueError(f"tensor {planned.name!r}: {encoded.size} bytes, {planned.qtype.name} {planned.stored_shape} "
                         f"needs {planned.nbytes}")
    return encoded.reshape(byte_shape(planned.stored_shape, planned.qtype))


def _raw_bytes(data) -> np.ndarray:
    if isinstance(data, GGMLTensor):
        data = data.as_plain()
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu().contiguous().view(torch.uint8).numpy()
    return np.ascontiguousarray(data).view(np.uint8).reshape(-1)


def _convert(data, planned: _Planned) -> np.ndarray:
    qtype = planned.qtype
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu()
        if data.dtype == PLAIN_TORCH_DTYPES.get(qtype):  # already the target type: copy bits
            return data.contiguous().view(torch.uint8).numpy().reshape(-1)
        data = data.to(torch.float64 if qtype == GGMLQuantizationType.F64 else torch.float32).numpy()
    values = np.ascontiguousarray(data).reshape(planned.stored_shape)
    target = PLAIN_TORCH_DTYPES.get(qtype)
    if target is not None and qtype != GGMLQuantizationType.BF16:
        return values.astype(torch.empty((), dtype=target).numpy().dtype).view(np.uint8).reshape(-1)
    return quants.quantize(values.astype(np.float32), qtype).reshape(-1)


def _progress(items: list, enabled: bool):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc="writing GGUF", unit="tensor")


# -- metadata types -------------------------------------------------------------------------------

def _infer_type(key: str, value) -> tuple[GGUFValueType, GGUFValueType | None]:
    if isinstance(value, list):
        if not value:
            return GGUFValueType.ARRAY, None
        item_types = {_infer_type(key, item)[0] for item in value}
        if len(item_types) > 1:
            item_types = _widen_numbers(item_types)
        if len(item_types) != 1:
            found = sorted(t.name for t in item_types)
            raise ValueError(f"metadata {key!r}: array items must share one type, got {found}")
        item = item_types.pop()
        if item in (GGUFValueType.INT32, GGUFValueType.INT64, GGUFValueType.UINT64):
            item = _integer_type(key, value)
        return GGUFValueType.ARRAY, item
    return _scalar_type(key, value), None


def _widen_numbers(types: set) -> set:
    integers = {GGUFValueType.INT32, GGUFValueType.INT64, GGUFValueType.UINT64}
    return {GGUFValueType.INT64} if types <= integers else types


def _scalar_type(key: str, value) -> GGUFValueType:
    if isinstance(value, str):
        return GGUFValueType.STRING
    if isinstance(value, (bool, np.bool_)):
        return GGUFValueType.BOOL
    if isinstance(value, (int, np.integer)):
        return _integer_type(key, [value])
    if isinstance(value, (float, np.floating)):
        return GGUFValueType.FLOAT32
    if isinstance(value, list):
        return GGUFValueType.ARRAY
    raise ValueError(f"metadata {key!r}: cannot store a {type(value).__name__}")


def _integer_type(key: str, values: list) -> GGUFValueType:
    if all(int(v) in _INT32_RANGE for v in values):
        return GGUFValueType.INT32
    if all(int(v) in _INT64_RANGE for v in values):
        return GGUFValueType.INT64
    if all(0 <= int(v) < 2 ** 64 for v in values):
        return GGUFValueType.UINT64
    raise ValueError(f"metadata {key!r}: integers do not fit 64 bits")
