"""GGUF header parser: a fast, fully validated struct/mmap parser of metadata and the tensor table.

Format (v2 and v3, little-endian): magic "GGUF", u32 version, u64 tensor count, u64 metadata count,
the metadata key/values, the tensor infos (name, n_dims, dims in ggml order, u32 type, u64 offset
relative to the data section), padding to `general.alignment` (default 32), then the tensor data.

gguf-py's GGUFReader parses every array element through numpy in Python (about 10 s for a
150,000-token vocabulary); this parser reads numeric arrays with one `np.frombuffer` and strings in a
tight loop, and checks every count, length, type id and offset against the file before using it, so
a malformed file raises GGUFError rather than IndexError, MemoryError or a long loop. What a well-formed
file may cost (bytes, keys, array items, nesting, string length, tensors) is bounded too (bounds.py), and
tensors whose data overlap are refused.

No torch import here: planning a file (`python -m distorch plan`) needs only this and answers before
torch would have finished importing. `reader.py` builds the tensors.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import struct
from collections import Counter
from dataclasses import dataclass, field
from itertools import repeat

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, Keys

from .arch import Architecture, detect_architecture
from .bounds import (
    MAX_ARRAY_ITEMS,
    MAX_ARRAY_NESTING,
    MAX_HEADER_BYTES,
    MAX_METADATA_ITEMS,
    MAX_METADATA_KEYS,
    MAX_NESTED_ARRAYS,
    MAX_STRING_BYTES,
    MAX_TENSORS,
)
from .errors import ECHO_CHARS, GGUFError, echo
from .qtypes import is_plain, qtype_from_id

logger = logging.getLogger("distorch.gguf")

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
ORIG_SHAPE_PREFIX = "comfy.gguf.orig_shape."
MAX_DIMS = 4

MAX_ORIG_SHAPE_DIMS = 16  # ComfyUI-GGUF's orig_shape keys restore up to 5-D (Conv3d) weights

_HEADER_BYTES = 24
_MIN_KV_BYTES = 8 + 4 + 1  # empty key, type id, smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # empty name, n_dims, one dim, type, offset

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_SCALARS: dict[GGUFValueType, struct.Struct] = {
    GGUFValueType.UINT8: struct.Struct("<B"), GGUFValueType.INT8: struct.Struct("<b"),
    GGUFValueType.UINT16: struct.Struct("<H"), GGUFValueType.INT16: struct.Struct("<h"),
    GGUFValueType.UINT32: struct.Struct("<I"), GGUFValueType.INT32: struct.Struct("<i"),
    GGUFValueType.UINT64: struct.Struct("<Q"), GGUFValueType.INT64: struct.Struct("<q"),
    GGUFValueType.FLOAT32: struct.Struct("<f"), GGUFValueType.FLOAT64: struct.Struct("<d"),
    GGUFValueType.BOOL: struct.Struct("<B"),
}
_NUMPY_TYPES: dict[GGUFValueType, np.dtype] = {
    GGUFValueType.UINT8: np.dtype("<u1"), GGUFValueType.INT8: np.dtype("<i1"),
    GGUFValueType.UINT16: np.dtype("<u2"), GGUFValueType.INT16: np.dtype("<i2"),
    GGUFValueType.UINT32: np.dtype("<u4"), GGUFValueType.INT32: np.dtype("<i4"),
    GGUFValueType.UINT64: np.dtype("<u8"), GGUFValueType.INT64: np.dtype("<i8"),
    GGUFValueType.FLOAT32: np.dtype("<f4"), GGUFValueType.FLOAT64: np.dtype("<f8"),
    GGUFValueType.BOOL: np.dtype("<u1"),
}
_INTEGER_TYPES = frozenset(t for t in _SCALARS if t not in (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64,
                                                              GGUFValueType.BOOL))


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table.

    Attributes:
        name: tensor name as stored.
        qtype: GGML type.
        shape: logical shape in torch order (`comfy.gguf.orig_shape.<name>` applied when present).
        stored_shape: torch-order shape as stored (ggml dims reversed).
        offset: absolute byte offset of the data in the file.
        nbytes: data size in bytes.
    """

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    stored_shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def type_name(self) -> str:
        return self.qtype.name

    @property
    def is_quantized(self) -> bool:
        """True when read_gguf returns it as a GGMLTensor (block data), False for typed views."""
        return not is_plain(self.qtype)

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def byte_shape(self) -> tuple[int, ...]:
        """Shape of the raw uint8 view: the stored shape with its last dim in bytes."""
        block_size, type_size = GGML_QUANT_SIZES[self.qtype]
        return (*self.stored_shape[:-1], self.stored_shape[-1] // block_size * type_size)


@dataclass(frozen=True)
class GGUFHeader:
    """Everything before the tensor data: metadata and tensor table. Holds no file handle.

    Attributes:
        path: the file path as given.
        version: GGUF version (2 or 3).
        alignment: data alignment in bytes.
        metadata: key -> Python value (str, int, float, bool or list).
        metadata_types: key -> (GGUFValueType, element GGUFValueType for arrays else None).
        tensor_infos: the tensor table, in file order.
        data_offset: absolute offset of the data section.
        file_size: size of the file in bytes.
        arch: the architecture as declared and/or detected.
    """

    path: str
    version: int
    alignment: int
    metadata: dict
    metadata_types: dict
    tensor_infos: tuple[TensorInfo, ...]
    data_offset: int
    file_size: int
    arch: Architecture
    _by_name: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {info.name: info for info in self.tensor_infos})

    @property
    def architecture(self) -> str | None:
        """`general.architecture` (kept even when unknown), or a guess from tensor names if absent."""
        return self.arch.name

    def tensor_info(self, name: str) -> TensorInfo:
        return self._by_name[name]

    @property
    def tensor_names(self) -> tuple[str, ...]:
        return tuple(self._by_name)

    @property
    def qtype_counts(self) -> dict[str, int]:
        """Number of tensors per GGML type name, most common first."""
        return dict(Counter(info.type_name for info in self.tensor_infos).most_common())

    def qtype_summary(self) -> str:
        """"Q8_0 (304), F32 (471)": the text of the usual "gguf qtypes:" log line."""
        return ", ".join(f"{name} ({count})" for name, count in self.qtype_counts.items())

    @property
    def tensor_bytes(self) -> int:
        return sum(info.nbytes for info in self.tensor_infos)


def read_gguf_header(path: str | os.PathLike) -> GGUFHeader:
    """Parses metadata and tensor table without creating any tensor (for planning and inspection).

    Args:
        path: a .gguf file (v2 or v3, little-endian).

    Raises:
        FileNotFoundError: no such file.
        GGUFError: the file is malformed, truncated or unsupported.

    Example:
        >>> header = read_gguf_header("flux1-dev-Q8_0.gguf")  # doctest: +SKIP
        >>> header.architecture, len(header.tensor_infos), header.qtype_summary()  # doctest: +SKIP
        ('flux', 780, 'F32 (476), Q8_0 (304)')
    """
    path = os.fspath(path)
    mapping = _map(path, writable=False)
    try:
        return _Parser(path, mapping).header()
    finally:
        _close_quietly(mapping)


def _map(path: str, writable: bool) -> mmap.mmap:
    size = os.path.getsize(path)
    if size < _HEADER_BYTES:
        with open(path, "rb") as handle:
            start = handle.read(4)
        if not start:
            raise GGUFError(f"{path}: file is empty")
        if not MAGIC.startswith(start):
            raise GGUFError(f"{path}: not a GGUF file (starts with {start!r}, expected {MAGIC!r})")
        raise GGUFError(f"{path}: truncated: file has {size} bytes, a GGUF header needs {_HEADER_BYTES}")
    with open(path, "rb") as handle:
        return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY if writable else mmap.ACCESS_READ)


def _close_quietly(mapping: mmap.mmap) -> None:
    """Closes a mapping no tensor views (views hold the mmap object, not a buffer export, so closing
    under a live view would unmap memory it still points to)."""
    try:
        mapping.close()
    except BufferError:
        pass  # a numpy view is still alive; the mapping goes when it does


class _Parser:
    """Reads one file's header from a buffer; every read is bounds-checked first."""

    def __init__(self, path: str, buffer) -> None:
        self.path = path  # for messages
        self.buf = buffer  # the mapped file
        self.size = len(buffer)  # file size in bytes
        self.pos = 0  # read cursor
        self.limit = min(self.size, MAX_HEADER_BYTES)  # no header read goes past this byte
        self.items_left = MAX_METADATA_ITEMS  # array items the rest of the metadata may hold
        self.nested_left = MAX_NESTED_ARRAYS  # arrays inside arrays the rest of the metadata may hold

    # -- primitives -------------------------------------------------------------------------------

    def fail(self, message: str) -> GGUFError:
        return GGUFError(f"{self.path}: {message}")

    def need(self, nbytes: int, what: str) -> None:
        if self.pos + nbytes > self.limit:
            if self.pos + nbytes > self.size:
                raise self.fail(f"truncated: {what} needs {nbytes} bytes at byte {self.pos}, file has {self.size}")
            raise self.past_header_bound(what, self.pos + nbytes)

    def past_header_bound(self, what: str, end: int) -> GGUFError:
        return self.fail(f"{what} ends at byte {end}, past the {MAX_HEADER_BYTES} bytes of metadata and tensor "
                         "table this reader accepts")

    def u32(self, what: str) -> int:
        self.need(4, what)
        value = _U32.unpack_from(self.buf, self.pos)[0]
        self.pos += 4
        return value

    def u64(self, what: str) -> int:
        self.need(8, what)
        value = _U64.unpack_from(self.buf, self.pos)[0]
        self.pos += 8
        return value

    def string(self, what: str) -> str:
        length = self.u64(f"length of {what}")
        raw = self._string_bytes(length, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise self.fail(f"{what} is not valid UTF-8 ({error.reason} at byte {self.pos - length + error.start})") \
                from None

    def _string_bytes(self, length: int, what: str) -> bytes:
        if length > MAX_STRING_BYTES:
            raise self.fail(f"{what} claims {length} bytes, more than the {MAX_STRING_BYTES} this reader accepts")
        self.need(length, what)
        raw = self.buf[self.pos:self.pos + length]
        self.pos += length
        return raw

    # -- metadata ---------------------------------------------------------------------------------

    def value_type(self, what: str) -> GGUFValueType:
        type_id = self.u32(f"value type of {what}")
        try:
            return GGUFValueType(type_id)
        except ValueError:
            raise self.fail(f"{what} has unknown value type id {type_id}") from None

    def value(self, value_type: GGUFValueType, what: str, depth: int = 0):
        scalar = _SCALARS.get(value_type)
        if scalar is not None:
            self.need(scalar.size, what)
            value = scalar.unpack_from(self.buf, self.pos)[0]
            self.pos += scalar.size
            return bool(value) if value_type == GGUFValueType.BOOL else value
        if value_type == GGUFValueType.STRING:
            return self.string(what)
        return self.array(what, depth)

    def array(self, what: str, depth: int):
        if depth >= MAX_ARRAY_NESTING:
            raise self.fail(f"{what} nests arrays deeper than {MAX_ARRAY_NESTING} levels")
        item_type = self.value_type(f"items of {what}")
        count = self.u64(f"length of {what}")
        self._check_count(count, item_type, what)
        if item_type in _NUMPY_TYPES:
            return self._numeric_array(item_type, count)
        if item_type == GGUFValueType.STRING:
            return self._string_array(count, what)
        return [self.array(f"{what}[{i}]", depth + 1) for i in range(count)]

    def _check_count(self, count: int, item_type: GGUFValueType, what: str) -> None:
        if count > MAX_ARRAY_ITEMS:
            raise self.fail(f"{what} claims {count} items, more than the {MAX_ARRAY_ITEMS} this reader accepts")
        item_bytes = _NUMPY_TYPES[item_type].itemsize if item_type in _NUMPY_TYPES else \
            8 if item_type == GGUFValueType.STRING else 12
        if count * item_bytes > self.limit - self.pos:
            if count * item_bytes > self.size - self.pos:
                raise self.fail(f"truncated: {what} claims {count} {item_type.name} items ({count * item_bytes}+ "
                                f"bytes) at byte {self.pos}, only {self.size - self.pos} bytes remain")
            raise self.past_header_bound(what, self.pos + count * item_bytes)
        self._charge(count, item_type, what)

    def _charge(self, count: int, item_type: GGUFValueType, what: str) -> None:
        """Counts the array's items (and nested arrays) against the file's budget before any is built."""
        self.items_left -= count
        if self.items_left < 0:
            raise self.fail(f"{what} brings the metadata past {MAX_METADATA_ITEMS} array items in all, more than "
                            "this reader accepts")
        if item_type == GGUFValueType.ARRAY:
            self.nested_left -= count
            if self.nested_left < 0:
                raise self.fail(f"{what} brings the metadata past {MAX_NESTED_ARRAYS} arrays inside arrays, more "
                                "than this reader accepts")

    def _numeric_array(self, item_type: GGUFValueType, count: int) -> list:
        dtype = _NUMPY_TYPES[item_type]
        values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
        self.pos += count * dtype.itemsize
        if item_type == GGUFValueType.BOOL:
            return (values != 0).tolist()
        return values.tolist()

    def _string_array(self, count: int, what: str) -> list[str]:
        # The hot loop of tokenizer-heavy files (150k+ strings): locals only and one comparison per
        # item; a length read past the end raises struct.error, translated below.
        buf, stop, pos, unpack = self.buf, self.limit, self.pos, _U64.unpack_from
        items: list[str] = []
        append = items.append
        try:
            for _ in repeat(None, count):
                length = unpack(buf, pos)[0]
                end = pos + 8 + length
                if end > stop or length > MAX_STRING_BYTES:
                    raise self._bad_item_length(f"{what}[{len(items)}]", length, pos + 8)
                append(buf[pos + 8:end].decode("utf-8"))
                pos = end
        except struct.error:
            raise self.fail(f"truncated: length of {what}[{len(items)}] at byte {pos}, file has {self.size}") from None
        except UnicodeDecodeError:
            raise self.fail(f"{what}[{len(items)}] is not valid UTF-8") from None
        self.pos = pos
        return items

    def _bad_item_length(self, what: str, length: int, start: int) -> GGUFError:
        if start + length > self.size:
            return self.fail(f"truncated: {what} claims {length} bytes at byte {start}, file has {self.size}")
        if length > MAX_STRING_BYTES:
            return self.fail(f"{what} claims {length} bytes, more than the {MAX_STRING_BYTES} this reader accepts")
        return self.past_header_bound(what, start + length)

    def metadata(self, count: int) -> tuple[dict, dict]:
        values: dict = {}
        types: dict = {}
        for index in range(count):
            key = self.string(f"metadata key #{index}")
            what = f"metadata key {echo(key)}"
            value_type = self.value_type(what)
            if key in values:
                raise self.fail(f"duplicate {what}")
            item_position = self.pos
            values[key] = self.value(value_type, what)
            types[key] = (value_type, self._item_type_at(item_position) if value_type == GGUFValueType.ARRAY else None)
        return values, types

    def _item_type_at(self, position: int) -> GGUFValueType:
        return GGUFValueType(_U32.unpack_from(self.buf, position)[0])

    # -- header -----------------------------------------------------------------------------------

    def header(self) -> GGUFHeader:
        version = self._magic_and_version()
        n_tensors = self.u64("tensor count")
        n_kv = self.u64("metadata count")
        self._check_table_count(n_kv, _MIN_KV_BYTES, "metadata entries", MAX_METADATA_KEYS)
        self._check_table_count(n_tensors, _MIN_TENSOR_INFO_BYTES, "tensors", MAX_TENSORS)
        metadata, types = self.metadata(n_kv)
        alignment = self._alignment(metadata, types)
        raw_infos = [self._raw_tensor_info(i) for i in range(n_tensors)]
        data_offset = _align(self.pos, alignment)
        infos = _TensorTable(self, metadata, types, alignment, data_offset).build(raw_infos)
        arch = detect_architecture(metadata, (info.name for info in infos))
        return GGUFHeader(self.path, version, alignment, metadata, types, infos, data_offset, self.size, arch)

    def _magic_and_version(self) -> int:
        magic = bytes(self.buf[0:4])
        if magic != MAGIC:
            raise self.fail(f"not a GGUF file (starts with {magic!r}, expected {MAGIC!r})")
        self.pos = 4
        version = self.u32("version")
        if version in SUPPORTED_VERSIONS:
            return version
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        if swapped in SUPPORTED_VERSIONS:
            raise self.fail(f"big-endian GGUF (version {swapped}) is not supported; use a little-endian file")
        raise self.fail(f"unsupported GGUF version {version} (this reader handles versions 2 and 3)")

    def _check_table_count(self, count: int, min_bytes: int, what: str, limit: int) -> None:
        if count > limit:
            raise self.fail(f"header claims {count} {what}, more than the {limit} this reader accepts")
        if count * min_bytes > self.size - self.pos:
            raise self.fail(f"truncated: header claims {count} {what}, which needs at least {count * min_bytes} "
                            f"bytes, only {self.size - self.pos} remain after byte {self.pos}")

    def _alignment(self, metadata: dict, types: dict) -> int:
        if Keys.General.ALIGNMENT not in metadata:
            return DEFAULT_ALIGNMENT
        value, (value_type, _) = metadata[Keys.General.ALIGNMENT], types[Keys.General.ALIGNMENT]
        if value_type not in _INTEGER_TYPES or value <= 0 or value & (value - 1):
            raise self.fail(f"{Keys.General.ALIGNMENT} must be a positive power of two, got {echo(value)} "
                            f"({value_type.name})")
        return value

    def _raw_tensor_info(self, index: int) -> tuple[str, tuple[int, ...], int, int]:
        name = self.string(f"name of tensor #{index}")
        what = f"tensor {echo(name)}"
        n_dims = self.u32(f"dimension count of {what}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise self.fail(f"{what} has {n_dims} dimensions; GGUF allows 1 to {MAX_DIMS}")
        self.need(8 * n_dims, f"dimensions of {what}")
        dims = struct.unpack_from(f"<{n_dims}Q", self.buf, self.pos)
        self.pos += 8 * n_dims
        type_id = self.u32(f"type of {what}")
        offset = self.u64(f"data offset of {what}")
        return name, dims, type_id, offset


class _TensorTable:
    """Turns raw tensor infos into validated TensorInfo records."""

    def __init__(self, parser: _Parser, metadata: dict, types: dict, alignment: int, data_offset: int) -> None:
        self.parser = parser  # for errors and the file size
        self.metadata = metadata  # for comfy.gguf.orig_shape.* keys
        self.types = types  # their declared value types
        self.alignment = alignment
        self.data_offset = data_offset  # absolute start of the data section

    def build(self, raw_infos: list) -> tuple[TensorInfo, ...]:
        infos: dict[str, TensorInfo] = {}
        for name, dims, type_id, offset in raw_infos:
            if name in infos:
                raise self.parser.fail(f"duplicate tensor name {echo(name)}")
            infos[name] = self.info(name, dims, type_id, offset)
        self._check_disjoint(infos.values())
        return tuple(infos.values())

    def _check_disjoint(self, infos) -> None:
        """Tensors sharing bytes would be counted once per tensor: 1,000 tensors over the same 64 MB planned as a
        62.5 GB model. No writer shares data between tensors (a tied weight is stored once)."""
        ordered = sorted(infos, key=lambda info: (info.offset, info.nbytes))
        for before, after in zip(ordered, ordered[1:]):
            if after.offset < before.offset + before.nbytes:
                raise self.parser.fail(
                    f"tensors {echo(before.name)} (bytes {before.offset}-{before.offset + before.nbytes}) and "
                    f"{echo(after.name)} (bytes {after.offset}-{after.offset + after.nbytes}) overlap")

    def info(self, name: str, dims: tuple[int, ...], type_id: int, offset: int) -> TensorInfo:
        fail = self.parser.fail
        what = f"tensor {echo(name)}"
        qtype = qtype_from_id(type_id)
        if qtype is None:
            raise fail(f"{what} has unknown GGML type id {type_id} (not in the installed gguf package)")
        if any(d == 0 for d in dims):
            raise fail(f"{what} has a zero-sized dimension (dims {list(dims)})")
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        if dims[0] % block_size:
            raise fail(f"{what}: row length {dims[0]} is not a multiple of the {qtype.name} block size "
                       f"{block_size}")
        rows = 1
        for dim in dims[1:]:
            rows *= dim
        nbytes = rows * (dims[0] // block_size) * type_size
        self._check_location(what, offset, nbytes)
        stored = tuple(reversed(dims))
        shape = self._logical_shape(name, stored)
        return TensorInfo(name, qtype, shape, stored, self.data_offset + offset, nbytes)

    def _check_location(self, what: str, offset: int, nbytes: int) -> None:
        fail = self.parser.fail
        if offset % self.alignment:
            raise fail(f"{what}: data offset {offset} is not a multiple of the alignment {self.alignment}")
        end = self.data_offset + offset + nbytes
        if end > self.parser.size:
            raise fail(f"{what}: data ends at byte {end}, file has {self.parser.size}")

    def _logical_shape(self, name: str, stored: tuple[int, ...]) -> tuple[int, ...]:
        key = ORIG_SHAPE_PREFIX + name
        if key not in self.metadata:
            return stored
        value, (value_type, item_type) = self.metadata[key], self.types[key]
        shown = key if len(key) <= ECHO_CHARS else echo(key)
        if value_type != GGUFValueType.ARRAY or item_type not in _INTEGER_TYPES or \
                not all(isinstance(v, int) and v >= 0 for v in value):
            raise self.parser.fail(f"{shown} must be an ARRAY of non-negative integers (INT32), got {echo(value)}")
        shape = tuple(value)
        if len(shape) > MAX_ORIG_SHAPE_DIMS:
            raise self.parser.fail(f"{shown} has {len(shape)} dimensions, more than the {MAX_ORIG_SHAPE_DIMS} "
                                   f"this reader accepts")
        if math.prod(shape) != math.prod(stored):
            raise self.parser.fail(f"{shown} = {echo(list(shape))} has {echo(math.prod(shape))} elements, "
                                   f"tensor {echo(name)} stores {math.prod(stored)} ({list(stored)})")
        return shape


def _align(position: int, alignment: int) -> int:
    return (position + alignment - 1) // alignment * alignment
