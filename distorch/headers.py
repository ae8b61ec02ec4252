"""Block sizes of a model file from its header alone (.safetensors, .gguf): no tensor data is read.

Blocks are found from tensor names: `<list>.<N>.<submodule>...` groups with two or more indices
whose entries have submodules (so a Sequential of plain layers, `time_in.0.weight`, is not a block
list). A group with a single index is a block list when that entry is as heavy as a block (the rule
live discovery uses too: lone_blocks.py). Lists nested inside a block belong to that block.
"""

import json
import math
import os
import re
import struct
from collections import defaultdict
from dataclasses import dataclass

from .echo import echo
from .gguf_engine import gguf_module
from .lone_blocks import accepted_lone_blocks
from .planner import ModelSizes
from .request import StreamFormat
from .stream_rules import (
    decode_scratch_bytes,
    encoded_tensor_nbytes,
    packed_offsets,
    packed_total,
    tensor_keep_reason,
)
from .units import dtype_label

MAX_TENSORS = gguf_module("bounds").MAX_TENSORS

_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
# json.loads builds every value before any check can run (86 MB of nested empty lists: 6.6 s and 2.3 GB), so what
# it would build is counted on the raw bytes first. A tensor entry has three arrays/objects and under ten commas;
# these allow 8 and 64 per tensor of the largest file either format may hold (MAX_TENSORS, shared with the GGUF
# reader). Brackets and commas inside strings count too, which only over-counts.
_MAX_JSON_CONTAINERS = 8 * MAX_TENSORS
_MAX_JSON_COMMAS = 64 * MAX_TENSORS
# Bits per element, as the safetensors format defines them (F4 and F6 pack several elements per byte).
_SAFETENSORS_DTYPE_BITS = {
    "F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U8": 8, "U16": 16,
    "U32": 32, "U64": 64, "BOOL": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "C64": 64,
}
_GGUF_MAGIC = b"GGUF"
_SAFETENSORS_EXTENSIONS = (".safetensors", ".sft")
_INDEXED = re.compile(r"^(.*?)\.(\d+)\.(.+)$")
_MAX_INDEX_DIGITS = 9


class HeaderError(ValueError):
    """A model file whose header cannot be read; the message names the file and the problem."""

    __module__ = "distorch.headers"  # the import path users see in ComfyUI's error (not the custom_nodes file path)


@dataclass(frozen=True)
class TensorEntry:
    name: str
    nbytes: int
    dtype: str = ""  # as distorch.units.dtype_label spells it
    shape: tuple[int, ...] = ()  # logical shape, torch order


def read_model_sizes(path: str) -> ModelSizes:
    """Block sizes of a .safetensors or .gguf file, reading only its header (see `read_tensor_entries`)."""
    return sizes_from_entries(os.path.basename(path), read_tensor_entries(path))


def read_tensor_entries(path: str) -> list[TensorEntry]:
    """Every tensor of a .safetensors or .gguf file (name, bytes, format, shape), reading only its header.

    A file that starts with the GGUF magic, or is named .gguf, is read as GGUF (a .gguf file with another
    start is "not a GGUF file"); anything else as safetensors, and a safetensors error on a file not named
    .safetensors/.sft says that it was read as safetensors because it has no GGUF magic.

    Raises:
        FileNotFoundError: the file does not exist.
        HeaderError: the file is not a readable safetensors/GGUF file (GGUFError for GGUF files).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as handle:
        magic = handle.read(len(_GGUF_MAGIC))
    if magic == _GGUF_MAGIC or path.lower().endswith(".gguf"):
        entries = _gguf_entries(path)
    elif path.lower().endswith(_SAFETENSORS_EXTENSIONS):
        entries = _safetensors_entries(path)
    else:
        try:
            entries = _safetensors_entries(path)
        except HeaderError as error:
            raise HeaderError(f"{error} (read as safetensors: the file does not start with the GGUF magic "
                              f"{_GGUF_MAGIC!r})") from None
    return entries


def sizes_from_entries(name: str, entries: list[TensorEntry]) -> ModelSizes:
    """Groups tensors into blocks by their names; everything else is the rest."""
    lists = _block_lists(entries)
    block_bytes: dict[str, int] = {}
    rest = 0
    for entry in entries:
        block = _block_of(entry.name, lists)
        if block is None:
            rest += entry.nbytes
        else:
            block_bytes[block] = block_bytes.get(block, 0) + entry.nbytes
    ordered = sorted(block_bytes.items(), key=lambda item: _block_sort_key(item[0], lists))
    dtypes: dict[str, int] = defaultdict(int)
    for entry in entries:
        dtypes[entry.dtype or "unknown"] += entry.nbytes
    # The loaders map the file (gguf_loader.read_gguf, safetensors' mmap), so a block may stay in it: the disk tier
    # takes what RAM cannot hold, as it does for the loaded model (in the file's format).
    return ModelSizes(name, tuple(ordered), rest, in_file=dict(ordered), dtype_bytes=dict(dtypes),
                      dtype_source="file", encoded=_encoded_blocks(entries, lists))


def _encoded_blocks(entries: list[TensorEntry], lists: list[str]) -> dict[str, dict[str, tuple[int, int]]]:
    """Per stream format, the blocks it makes smaller: block -> (bytes as streamed, decode scratch on a GPU), by the
    rules a loaded model's blocks follow (stream_rules.py) applied to each tensor's header, in the file's dtypes."""
    members: dict[str, list[TensorEntry]] = defaultdict(list)
    for entry in entries:
        block = _block_of(entry.name, lists)
        if block is not None:
            members[block].append(entry)
    encoded: dict[str, dict[str, tuple[int, int]]] = {}
    for fmt in StreamFormat:
        if fmt is StreamFormat.STORED:
            continue
        per_block = {}
        for block, tensors in members.items():
            chosen = [not tensor_keep_reason(e.name, e.dtype, e.shape, fmt) for e in tensors]
            if not any(chosen):
                continue
            sizes = [encoded_tensor_nbytes(math.prod(e.shape), fmt) if c else e.nbytes for e, c in zip(tensors, chosen)]
            numels = [math.prod(e.shape) for e, c in zip(tensors, chosen) if c]
            per_block[block] = (packed_total(packed_offsets(sizes), sizes), decode_scratch_bytes(numels))
        encoded[fmt.value] = per_block
    return encoded


def _block_lists(entries: list[TensorEntry]) -> list[str]:
    indices: dict[str, set[int]] = defaultdict(set)
    nested: dict[str, bool] = defaultdict(bool)
    bare: dict[str, bool] = defaultdict(bool)  # an entry is itself a list (`label_emb.0.0.weight`)
    first_seen: dict[str, int] = {}
    for position, entry in enumerate(entries):
        for prefix, index, rest in _indexed_parts(entry.name):
            indices[prefix].add(index)
            nested[prefix] |= "." in rest
            bare[prefix] |= _is_index(rest.split(".", 1)[0])
            first_seen.setdefault(prefix, position)
    repeated = _outermost([p for p in indices if len(indices[p]) >= 2 and nested[p]])
    lone = [p for p in indices if len(indices[p]) == 1 and nested[p] and not bare[p]
            and not any(_is_within(p, r) or _is_within(r, p) for r in repeated)]
    lone = _outermost(lone)
    sizes = _list_entry_bytes(entries, repeated + lone)
    accepted = accepted_lone_blocks({p: sum(sizes[p].values()) for p in lone},
                                    [n for p in repeated for n in sizes[p].values()], sum(e.nbytes for e in entries))
    return sorted(repeated + [p for p in lone if p in accepted], key=lambda p: first_seen[p])


def _outermost(prefixes: list[str]) -> list[str]:
    return [p for p in prefixes if not any(_is_within(p, q) for q in prefixes if q != p)]


def _is_within(name: str, outer: str) -> bool:
    return name == outer or name.startswith(outer + ".")


def _list_entry_bytes(entries: list[TensorEntry], lists: list[str]) -> dict[str, dict[int, int]]:
    """Per list, the bytes of each of its entries."""
    sizes: dict[str, dict[int, int]] = {p: defaultdict(int) for p in lists}
    for entry in entries:
        for prefix in lists:
            if entry.name.startswith(prefix + "."):
                index = entry.name[len(prefix) + 1:].split(".", 1)[0]
                if _is_index(index):
                    sizes[prefix][int(index)] += entry.nbytes
    return sizes


def _indexed_parts(name: str):
    """Every `(prefix, index, rest)` split of a dotted name at a numeric component."""
    parts = name.split(".")
    for position, part in enumerate(parts[1:-1], start=1):
        if _is_index(part):
            yield ".".join(parts[:position]), int(part), ".".join(parts[position + 1:])


def _block_of(name: str, lists: list[str]) -> str | None:
    for prefix in lists:
        if name.startswith(prefix + "."):
            index = name[len(prefix) + 1:].split(".", 1)[0]
            if _is_index(index):
                return f"{prefix}.{index}"
    return None


def _is_index(part: str) -> bool:
    """ASCII digits of a plausible list index: str.isdigit() also accepts '²', which int() refuses, and int()
    refuses more than 4300 digits."""
    return part.isascii() and part.isdigit() and len(part) <= _MAX_INDEX_DIGITS


def _block_sort_key(block: str, lists: list[str]) -> tuple[int, int]:
    prefix, _, index = block.rpartition(".")
    return lists.index(prefix), int(index)


@dataclass(frozen=True)
class SafetensorsTensor:
    """Where one tensor's bytes lie in a safetensors file (checked against the file's size)."""

    name: str
    dtype: str  # as safetensors spells it: "BF16", "F32", ...
    shape: tuple[int, ...]
    offset: int  # of the first byte, from the start of the file
    nbytes: int


def read_safetensors_index(path: str) -> tuple[SafetensorsTensor, ...]:
    """Every tensor of a safetensors file with its dtype, shape and absolute byte range, in file order.

    Only the header is read; offsets, shapes and sizes are bounds-checked as `read_model_sizes` does, so a
    reader can pread each range without further checks.

    Raises:
        FileNotFoundError: the file does not exist.
        HeaderError: missing, truncated or malformed header (the message names the file).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    spans, data_start = _safetensors_spans(path)
    ordered = sorted(spans, key=lambda s: (s.begin, s.end))
    return tuple(SafetensorsTensor(s.name, s.dtype, s.shape, data_start + s.begin, s.end - s.begin) for s in ordered)


def _safetensors_entries(path: str) -> list[TensorEntry]:
    spans, _ = _safetensors_spans(path)
    return [TensorEntry(span.name, span.end - span.begin, dtype_label(span.dtype), span.shape) for span in spans]


def _safetensors_spans(path: str) -> tuple[list["_Span"], int]:
    """The checked spans of the header's tensors (offsets relative to the data section) and where that starts."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise HeaderError(f"{path}: file is {size} bytes, too short for a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise HeaderError(f"{path}: header length {length} does not fit the file ({size} bytes)")
        if length > _MAX_SAFETENSORS_HEADER:
            raise HeaderError(f"{path}: header length {length} is over the {_MAX_SAFETENSORS_HEADER} bytes "
                              f"(100 MiB) this reader accepts")
        raw = handle.read(length)
    header = _parse_json(path, raw)
    if len(header) - ("__metadata__" in header) > MAX_TENSORS:
        raise HeaderError(f"{path}: header lists {len(header)} tensors, more than the {MAX_TENSORS} this reader "
                          "accepts")
    data_size = size - 8 - length
    spans = [_safetensors_span(path, name, info, data_size) for name, info in header.items()
             if name != "__metadata__"]
    _check_disjoint(path, spans)
    return spans, 8 + length


def _parse_json(path: str, raw: bytes) -> dict:
    containers, commas = raw.count(b"[") + raw.count(b"{"), raw.count(b",")
    if containers > _MAX_JSON_CONTAINERS or commas > _MAX_JSON_COMMAS:
        raise HeaderError(f"{path}: header holds {containers} JSON arrays/objects and {commas} commas, more than the "
                          f"{_MAX_JSON_CONTAINERS} and {_MAX_JSON_COMMAS} this reader accepts")
    try:
        header = json.loads(raw)
    except RecursionError:
        raise HeaderError(f"{path}: header nests JSON too deeply to be a safetensors header") from None
    except ValueError as error:  # bad JSON or UTF-8, and integers past Python's 4300-digit limit
        raise HeaderError(f"{path}: header is not valid JSON ({error})") from None  # the reasons quote no input
    if not isinstance(header, dict):
        raise HeaderError(f"{path}: header is not a JSON object")
    return header


@dataclass(frozen=True)
class _Span:
    name: str
    begin: int
    end: int
    dtype: str
    shape: tuple[int, ...] = ()


def _safetensors_span(path: str, name: str, info, data_size: int) -> _Span:
    tensor = f"{path}: tensor {echo(name)}"
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise HeaderError(f"{tensor} lacks dtype, shape or data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _SAFETENSORS_DTYPE_BITS:
        raise HeaderError(f"{tensor} has unknown dtype {echo(dtype)}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise HeaderError(f"{tensor} has an invalid shape {echo(shape)}: expected a list of integers >= 0")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1] <= data_size):
        raise HeaderError(f"{tensor}: data_offsets {echo(offsets)} outside the {data_size}-byte data section")
    begin, end = offsets
    elements = _bounded_product(shape, 8 * data_size)
    bits = None if elements is None else elements * _SAFETENSORS_DTYPE_BITS[dtype]
    if bits != 8 * (end - begin):
        needs = "more than the data section holds" if bits is None else \
            f"{bits // 8} bytes" if bits % 8 == 0 else f"{bits} bits"
        raise HeaderError(f"{tensor}: data_offsets {echo(offsets)} span {end - begin} bytes, but shape "
                          f"{echo(shape)} of {dtype} needs {needs}")
    return _Span(name, begin, end, dtype, tuple(shape))


def _bounded_product(values: list[int], limit: int) -> int | None:
    """The product of `values`, or None once it passes `limit` (a 2,000,000-entry shape would otherwise
    multiply out to a number with millions of digits)."""
    if 0 in values:
        return 0
    product = 1
    for value in values:
        product *= value
        if product > limit:
            return None
    return product


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_disjoint(path: str, spans: list[_Span]) -> None:
    """Two tensors sharing bytes would be counted twice (and are refused by the safetensors library)."""
    ordered = sorted((s for s in spans if s.end > s.begin), key=lambda s: (s.begin, s.end))
    for before, after in zip(ordered, ordered[1:]):
        if after.begin < before.end:
            raise HeaderError(f"{path}: tensors {echo(before.name)} (bytes {before.begin}-{before.end}) and "
                              f"{echo(after.name)} (bytes {after.begin}-{after.end}) overlap")


def _gguf_entries(path: str) -> list[TensorEntry]:
    read_header = _gguf_header_reader()
    header = read_header(path)
    return [TensorEntry(info.name, info.nbytes, dtype_label(info.type_name), tuple(info.shape))
            for info in header.tensor_infos]


def _gguf_header_reader():
    return gguf_module("gguf_header").read_gguf_header  # on first use: a safetensors file needs no GGUF parser
