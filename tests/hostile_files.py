"""Well-formed but hostile model files: each passes exactly one bound of gguf_loader/bounds.py (or of the safetensors
header reader), just past it, and is cheap to write (large ones are sparse). Shared by tests/test_gguf_bounds.py and
the fuzz targets (tests/fuzzing.py), which must see every one refused with one line naming the file.

`write_hostile(kind, path)` writes the file and returns a fragment the error message must contain.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from gguf_helpers import QT, VT, gguf_bytes, gguf_string, kv, tensor_info

from gguf_loader.bounds import (
    MAX_ARRAY_ITEMS,
    MAX_ARRAY_NESTING,
    MAX_HEADER_BYTES,
    MAX_METADATA_ITEMS,
    MAX_METADATA_KEYS,
    MAX_NESTED_ARRAYS,
    MAX_STRING_BYTES,
    MAX_TENSORS,
)

_EMPTY_ARRAY = struct.pack("<IQ", VT.UINT8, 0)


def _nested_arrays(path: Path) -> str:
    count = MAX_NESTED_ARRAYS + 1
    path.write_bytes(gguf_bytes([kv("nested", VT.ARRAY, struct.pack("<IQ", VT.ARRAY, count) + _EMPTY_ARRAY * count)]))
    return f"past {MAX_NESTED_ARRAYS} arrays inside arrays"


def _deep_arrays(path: Path) -> str:
    """10,000 levels: past the bound and past Python's recursion limit, whatever the bound is set to."""
    levels = 10_000
    payload = struct.pack("<IQ", VT.ARRAY, 1) * levels + _EMPTY_ARRAY
    path.write_bytes(gguf_bytes([kv("deep", VT.ARRAY, payload)]))
    return f"nests arrays deeper than {MAX_ARRAY_NESTING} levels"


def _sparse_strings(path: Path, lengths: list[int]) -> None:
    """String values of NUL bytes (valid UTF-8) that cost no disk."""
    with open(path, "wb") as handle:
        handle.write(b"GGUF" + struct.pack("<IQQ", 3, 0, len(lengths)))
        for index, length in enumerate(lengths):
            handle.write(gguf_string(f"text.{index}") + struct.pack("<IQ", VT.STRING, length))
            handle.seek(length, 1)
        handle.truncate(handle.tell() + 64)


def _long_string(path: Path) -> str:
    _sparse_strings(path, [MAX_STRING_BYTES + 1])
    return f"claims {MAX_STRING_BYTES + 1} bytes, more than the {MAX_STRING_BYTES}"


def _header_bytes(path: Path) -> str:
    """Strings each within their bound whose sum passes the header's (the first four are read, then refused)."""
    _sparse_strings(path, [MAX_STRING_BYTES - 1024] * (MAX_HEADER_BYTES // (MAX_STRING_BYTES - 1024) + 1))
    return f"past the {MAX_HEADER_BYTES} bytes of metadata and tensor table"


def _many_keys(path: Path) -> str:
    kvs = [gguf_string(f"k{index:06x}") + struct.pack("<IB", VT.UINT8, 0) for index in range(MAX_METADATA_KEYS + 1)]
    path.write_bytes(gguf_bytes(kvs))
    return f"claims {MAX_METADATA_KEYS + 1} metadata entries, more than the {MAX_METADATA_KEYS}"


def _array_items(path: Path) -> str:
    count = MAX_ARRAY_ITEMS + 1
    path.write_bytes(gguf_bytes([kv("bytes", VT.ARRAY, struct.pack("<IQ", VT.UINT8, count) + bytes(count))]))
    return f"claims {count} items, more than the {MAX_ARRAY_ITEMS}"


def _metadata_items(path: Path) -> str:
    """Arrays each within their bound whose items together pass the file's bound."""
    arrays, last = divmod(MAX_METADATA_ITEMS + 1, MAX_ARRAY_ITEMS)
    counts = [MAX_ARRAY_ITEMS] * arrays + ([last] if last else [])
    kvs = [kv(f"bytes.{index}", VT.ARRAY, struct.pack("<IQ", VT.UINT8, count) + bytes(count))
           for index, count in enumerate(counts)]
    path.write_bytes(gguf_bytes(kvs))
    return f"past {MAX_METADATA_ITEMS} array items in all"


def _many_tensors(path: Path) -> str:
    count = MAX_TENSORS + 1
    infos = [tensor_info(f"t{index}", (8,), QT.F32, 32 * index) for index in range(count)]
    head = gguf_bytes([], infos)
    with open(path, "wb") as handle:
        handle.write(head)
        handle.truncate(len(head) + 32 * count)
    return f"claims {count} tensors, more than the {MAX_TENSORS}"


def _overlap(path: Path) -> str:
    """100 blocks over the same 64 MiB (a 64 MB file that plans as a 6.25 GB model; the issue's 1,000 as 62.5 GB)."""
    infos = [tensor_info(f"blocks.{index}.attn.weight", (16 * 2**20,), QT.F32, 0) for index in range(100)]
    head = gguf_bytes([], infos)
    with open(path, "wb") as handle:
        handle.write(head)
        handle.truncate(len(head) + 64 * 2**20)
    return "tensors 'blocks.0.attn.weight' ("


HOSTILE_GGUF = {"nested-arrays": _nested_arrays, "deep-arrays": _deep_arrays, "long-string": _long_string,
                "header-bytes": _header_bytes, "many-keys": _many_keys, "array-items": _array_items,
                "metadata-items": _metadata_items, "many-tensors": _many_tensors, "overlap": _overlap}


# -- safetensors headers -------------------------------------------------------------------------------------

def _safetensors(path: Path, text: bytes, data: int = 0) -> None:
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)) + text)
        handle.truncate(8 + len(text) + data)


_ONE_TENSOR = b'"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}'


def _json_containers(path: Path) -> str:
    count = 8 * MAX_TENSORS + 1
    _safetensors(path, b'{"__metadata__":{"junk":"x"},' + _ONE_TENSOR[:-1] + b',"junk":[' + b"[]," * count
                 + b'[]]}}', 1)
    return "JSON arrays/objects"


def _json_commas(path: Path) -> str:
    count = 64 * MAX_TENSORS + 1
    _safetensors(path, b"{" + _ONE_TENSOR[:-1] + b',"junk":[' + b"0," * count + b"0]}}", 1)
    return "commas, more than"


def _safetensors_tensors(path: Path) -> str:
    count = MAX_TENSORS + 1
    header = {f"t{index}": {"dtype": "U8", "shape": [1], "data_offsets": [index, index + 1]} for index in range(count)}
    _safetensors(path, json.dumps(header, separators=(",", ":")).encode(), count)
    return f"lists {count} tensors, more than the {MAX_TENSORS}"


HOSTILE_SAFETENSORS = {"json-containers": _json_containers, "json-commas": _json_commas,
                       "many-tensors": _safetensors_tensors}


def write_hostile(kind: str, path: Path) -> str:
    """Writes hostile file `kind` (a key of HOSTILE_GGUF for .gguf paths, of HOSTILE_SAFETENSORS otherwise) and
    returns a fragment its error message must contain."""
    table = HOSTILE_GGUF if path.suffix == ".gguf" else HOSTILE_SAFETENSORS
    path.unlink(missing_ok=True)
    return table[kind](path)


def real_size_vocabulary(path: Path, tokens: int = 262_144, merges: int = 520_000) -> None:
    """A vocabulary the size of the largest real ones (Gemma's 262,144 tokens, ~520k merges) with scores and types,
    as llama.cpp lays it out: must load within the bounds."""
    texts = [f"t{index:06d}" for index in range(tokens)]
    token_list = b"".join(gguf_string(text) for text in texts)
    merge_list = b"".join(gguf_string(f"{texts[index % tokens]} {texts[(index * 7) % tokens]}")
                          for index in range(merges))
    path.write_bytes(gguf_bytes([
        kv("tokenizer.ggml.model", VT.STRING, gguf_string("gpt2")),
        kv("tokenizer.ggml.tokens", VT.ARRAY, struct.pack("<IQ", VT.STRING, tokens) + token_list),
        kv("tokenizer.ggml.scores", VT.ARRAY, struct.pack("<IQ", VT.FLOAT32, tokens) + bytes(4 * tokens)),
        kv("tokenizer.ggml.token_type", VT.ARRAY, struct.pack("<IQ", VT.INT32, tokens)
           + struct.pack("<i", 1) * tokens),
        kv("tokenizer.ggml.merges", VT.ARRAY, struct.pack("<IQ", VT.STRING, merges) + merge_list),
    ]))
