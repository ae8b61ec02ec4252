"""Block sizes of a model file from its header alone (.safetensors, .gguf): no tensor data is read.

Blocks are found from tensor names: `<list>.<N>.<submodule>...` groups with two or more indices
whose entries have submodules (so a Sequential of plain layers, `time_in.0.weight`, is not a block
list). A group with a single index is a block list when that entry is as heavy as a block (the rule
live discovery uses too: lone_blocks.py). Lists nested inside a block belong to that block.
"""

import json
import os
import re
import struct
from collections import defaultdict
from dataclasses import dataclass

from .lone_blocks import accepted_lone_blocks
from .planner import ModelSizes
from .units import dtype_label

_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
_SAFETENSORS_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "U16": 2, "U32": 4,
    "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F4": 1, "F6_E2M3": 1, "F6_E3M2": 1,
}
_INDEXED = re.compile(r"^(.*?)\.(\d+)\.(.+)$")


class HeaderError(ValueError):
    """A model file whose header cannot be read; the message names the file and the problem."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    nbytes: int
    dtype: str = ""  # as distorch.units.dtype_label spells it


def read_model_sizes(path: str) -> ModelSizes:
    """Block sizes of a .safetensors or .gguf file, reading only its header.

    Raises:
        FileNotFoundError: the file does not exist.
        HeaderError: the file is not a readable safetensors/GGUF file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    entries = _gguf_entries(path) if magic == b"GGUF" else _safetensors_entries(path)
    return sizes_from_entries(os.path.basename(path), entries)


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
    return ModelSizes(name, tuple(ordered), rest, dtype_bytes=dict(dtypes), dtype_source="file")


def _block_lists(entries: list[TensorEntry]) -> list[str]:
    indices: dict[str, set[int]] = defaultdict(set)
    nested: dict[str, bool] = defaultdict(bool)
    bare: dict[str, bool] = defaultdict(bool)  # an entry is itself a list (`label_emb.0.0.weight`)
    first_seen: dict[str, int] = {}
    for position, entry in enumerate(entries):
        for prefix, index, rest in _indexed_parts(entry.name):
            indices[prefix].add(index)
            nested[prefix] |= "." in rest
            bare[prefix] |= rest.split(".", 1)[0].isdigit()
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
                if index.isdigit():
                    sizes[prefix][int(index)] += entry.nbytes
    return sizes


def _indexed_parts(name: str):
    """Every `(prefix, index, rest)` split of a dotted name at a numeric component."""
    parts = name.split(".")
    for position, part in enumerate(parts[1:-1], start=1):
        if part.isdigit():
            yield ".".join(parts[:position]), int(part), ".".join(parts[position + 1:])


def _block_of(name: str, lists: list[str]) -> str | None:
    for prefix in lists:
        if name.startswith(prefix + "."):
            index = name[len(prefix) + 1:].split(".", 1)[0]
            if index.isdigit():
                return f"{prefix}.{index}"
    return None


def _block_sort_key(block: str, lists: list[str]) -> tuple[int, int]:
    prefix, _, index = block.rpartition(".")
    return lists.index(prefix), int(index)


def _safetensors_entries(path: str) -> list[TensorEntry]:
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise HeaderError(f"{path}: file is {size} bytes, too short for a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, _MAX_SAFETENSORS_HEADER):
            raise HeaderError(f"{path}: header length {length} does not fit the file ({size} bytes)")
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise HeaderError(f"{path}: header is not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise HeaderError(f"{path}: header is not a JSON object")
    data_size = size - 8 - length
    return [_safetensors_entry(path, name, info, data_size) for name, info in header.items() if name != "__metadata__"]


def _safetensors_entry(path: str, name: str, info, data_size: int) -> TensorEntry:
    try:
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
    except (TypeError, KeyError, ValueError):
        raise HeaderError(f"{path}: tensor {name!r} lacks dtype, shape or data_offsets") from None
    if dtype not in _SAFETENSORS_DTYPE_BYTES:
        raise HeaderError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
    if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_size):
        raise HeaderError(f"{path}: tensor {name!r}: data_offsets {info['data_offsets']} outside the "
                          f"{data_size}-byte data section")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise HeaderError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
    return TensorEntry(name, end - begin, dtype_label(dtype))


def _gguf_entries(path: str) -> list[TensorEntry]:
    read_header = _gguf_header_reader()
    header = read_header(path)
    return [TensorEntry(info.name, info.nbytes, dtype_label(info.type_name)) for info in header.tensor_infos]


def _gguf_header_reader():
    # The GGUF engine is a sibling package: relative inside the ComfyUI pack, top-level when run from the repo.
    if __package__ and "." in __package__:
        from ..gguf_loader.header import read_gguf_header
    else:
        from gguf_loader.header import read_gguf_header
    return read_gguf_header
