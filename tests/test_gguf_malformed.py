"""Malformed, truncated and unsupported files raise GGUFError naming the file and the problem."""

import random
import re
import struct

import pytest
import torch
from gguf_helpers import (
    QT,
    VT,
    gguf_bytes,
    gguf_string,
    kv,
    kv_array,
    kv_str,
    kv_u32,
    one_tensor_file,
    tensor_info,
    write_mixed_file,
)

from gguf_loader import GGUFError, dequantize, read_gguf, read_gguf_header


def expect_error(tmp_path, data: bytes, match: str, name: str = "bad.gguf"):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(GGUFError, match=re.escape(str(path)) + ": " + match):
        read_gguf(path)
    with pytest.raises(GGUFError):
        read_gguf_header(path)


def test_empty_file(tmp_path):
    expect_error(tmp_path, b"", "file is empty")


def test_bad_magic(tmp_path):
    expect_error(tmp_path, b"GGML" + b"\0" * 40, r"not a GGUF file \(starts with b'GGML', expected b'GGUF'\)")
    expect_error(tmp_path, b"PK\x03\x04", "not a GGUF file", name="zip.gguf")


def test_every_truncation_of_a_valid_file(tmp_path):
    data = one_tensor_file(QT.Q4_K, rows=2, cols=256)
    path = tmp_path / "cut.gguf"
    for length in range(1, len(data)):
        path.write_bytes(data[:length])
        with pytest.raises(GGUFError, match=re.escape(str(path)) + ": (truncated|tensor 'w': data ends)"):
            read_gguf(path)
    path.write_bytes(data)
    read_gguf(path)


@pytest.mark.parametrize(("version", "match"), [
    (1, r"unsupported GGUF version 1 \(this reader handles versions 2 and 3\)"),
    (4, "unsupported GGUF version 4"),
    (0x03000000, r"big-endian GGUF \(version 3\) is not supported"),
])
def test_unsupported_versions(tmp_path, version, match):
    expect_error(tmp_path, gguf_bytes(version=version), match)


def test_huge_tensor_count(tmp_path):
    expect_error(tmp_path, gguf_bytes(n_tensors=2 ** 62), "header claims 4611686018427387904 tensors, more than")


def test_tensor_count_beyond_the_file(tmp_path):
    expect_error(tmp_path, gguf_bytes(n_tensors=1000), "truncated: header claims 1000 tensors")


def test_huge_metadata_count(tmp_path):
    expect_error(tmp_path, gguf_bytes(n_kv=2 ** 40), "header claims 1099511627776 metadata entries")


def test_huge_string_length(tmp_path):
    bad_key = struct.pack("<Q", 2 ** 60) + b"key"
    expect_error(tmp_path, gguf_bytes([bad_key + struct.pack("<I", VT.UINT8) + b"\1"]),
                 "metadata key #0 claims 1152921504606846976 bytes, more than the")


def test_string_running_past_the_end(tmp_path):
    expect_error(tmp_path, gguf_bytes([kv("k", VT.STRING, struct.pack("<Q", 5000) + b"abc")]),
                 "truncated: metadata key 'k' needs 5000 bytes at byte")


def test_huge_array_length(tmp_path):
    payload = struct.pack("<IQ", VT.UINT8, 2 ** 62)
    expect_error(tmp_path, gguf_bytes([kv("arr", VT.ARRAY, payload)]),
                 "metadata key 'arr' claims 4611686018427387904 items")


def test_array_longer_than_the_file(tmp_path):
    payload = struct.pack("<IQ", VT.FLOAT32, 1000) + b"\0" * 8
    expect_error(tmp_path, gguf_bytes([kv("arr", VT.ARRAY, payload)]),
                 r"truncated: metadata key 'arr' claims 1000 FLOAT32 items \(4000\+ bytes\)")


def test_string_array_item_past_the_end(tmp_path):
    payload = struct.pack("<IQ", VT.STRING, 2) + gguf_string("ok") + struct.pack("<Q", 999) + b"x" * 8
    expect_error(tmp_path, gguf_bytes([kv("toks", VT.ARRAY, payload)]),
                 r"truncated: metadata key 'toks'\[1\] claims 999 bytes")


def test_unknown_metadata_value_type(tmp_path):
    expect_error(tmp_path, gguf_bytes([kv("k", 13, b"\0" * 8)]), "metadata key 'k' has unknown value type id 13")


def test_unknown_array_item_type(tmp_path):
    expect_error(tmp_path, gguf_bytes([kv("k", VT.ARRAY, struct.pack("<IQ", 77, 1))]),
                 "items of metadata key 'k' has unknown value type id 77")


def test_arrays_nested_too_deep(tmp_path):
    payload = b"".join(struct.pack("<IQ", VT.ARRAY, 1) for _ in range(12)) + struct.pack("<IQ", VT.UINT8, 0)
    expect_error(tmp_path, gguf_bytes([kv("deep", VT.ARRAY, payload[12:])]),
                 r"metadata key 'deep'(\[0\])+ nests arrays deeper than 8 levels")


def test_duplicate_metadata_key(tmp_path):
    expect_error(tmp_path, gguf_bytes([kv_u32("a", 1), kv_u32("a", 2)]), "duplicate metadata key 'a'")


@pytest.mark.parametrize(("where", "match"), [
    ("key", "metadata key #0 is not valid UTF-8"),
    ("value", "metadata key 'name' is not valid UTF-8"),
    ("array", r"metadata key 'toks'\[1\] is not valid UTF-8"),
    ("tensor", "name of tensor #0 is not valid UTF-8"),
])
def test_invalid_utf8(tmp_path, where, match):
    bad = b"\xff\xfe"
    kvs, infos = [], []
    if where == "key":
        kvs = [gguf_string(bad) + struct.pack("<I", VT.UINT8) + b"\0"]
    elif where == "value":
        kvs = [kv_str("name", bad)]
    elif where == "array":
        kvs = [kv_array("toks", VT.STRING, [gguf_string("a"), gguf_string(bad)])]
    else:
        infos = [gguf_string(bad) + struct.pack("<IQIQ", 1, 32, QT.F32, 0)]
    expect_error(tmp_path, gguf_bytes(kvs, infos, b"\0" * 128), match)


def test_data_past_the_end_names_tensor_and_bytes(tmp_path):
    data = gguf_bytes([], [tensor_info("blk.3.ffn_up.weight", (32, 4), QT.Q8_0, 0)], b"\0" * 64)
    end = len(data) - 64 + 4 * 34
    expect_error(tmp_path, data, f"tensor 'blk.3.ffn_up.weight': data ends at byte {end}, file has {len(data)}")


def test_offset_far_past_the_end(tmp_path):
    data = gguf_bytes([], [tensor_info("w", (32,), QT.F32, 2 ** 40)], b"\0" * 128)
    expect_error(tmp_path, data, "tensor 'w': data ends at byte")


def test_misaligned_offset(tmp_path):
    data = gguf_bytes([], [tensor_info("w", (4,), QT.F32, 16)], b"\0" * 64)
    expect_error(tmp_path, data, "tensor 'w': data offset 16 is not a multiple of the alignment 32")


@pytest.mark.parametrize(("value", "value_type"), [(0, VT.UINT32), (3, VT.UINT32), (-8, VT.INT32)])
def test_bad_alignment(tmp_path, value, value_type):
    fmt = "<I" if value_type == VT.UINT32 else "<i"
    data = gguf_bytes([kv("general.alignment", value_type, struct.pack(fmt, value))])
    expect_error(tmp_path, data, "general.alignment must be a positive power of two")


def test_alignment_of_the_wrong_type(tmp_path):
    expect_error(tmp_path, gguf_bytes([kv_str("general.alignment", "32")]), "general.alignment must be")


@pytest.mark.parametrize("type_id", [4, 5, 31, 99, 2 ** 31])
def test_unknown_tensor_type(tmp_path, type_id):
    data = gguf_bytes([], [tensor_info("w", (32,), type_id, 0)], b"\0" * 64)
    expect_error(tmp_path, data, f"tensor 'w' has unknown GGML type id {type_id}")


def test_duplicate_tensor_names(tmp_path):
    infos = [tensor_info("w", (8,), QT.F32, 0), tensor_info("w", (8,), QT.F32, 32)]
    expect_error(tmp_path, gguf_bytes([], infos, b"\0" * 64), "duplicate tensor name 'w'")


@pytest.mark.parametrize("dims", [(), (1, 1, 1, 1, 1)], ids=["zero", "five"])
def test_dimension_count(tmp_path, dims):
    info = gguf_string("w") + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) \
        + struct.pack("<IQ", QT.F32, 0)
    expect_error(tmp_path, gguf_bytes([], [info], b"\0" * 64),
                 f"tensor 'w' has {len(dims)} dimensions; GGUF allows 1 to 4")


def test_zero_sized_dimension(tmp_path):
    expect_error(tmp_path, gguf_bytes([], [tensor_info("w", (32, 0), QT.F32, 0)], b"\0" * 64),
                 r"tensor 'w' has a zero-sized dimension \(dims \[32, 0\]\)")


def test_row_not_a_multiple_of_the_block_size(tmp_path):
    expect_error(tmp_path, gguf_bytes([], [tensor_info("w", (40, 2), QT.Q8_0, 0)], b"\0" * 128),
                 "tensor 'w': row length 40 is not a multiple of the Q8_0 block size 32")


@pytest.mark.parametrize(("payload", "match"), [
    (kv_str("comfy.gguf.orig_shape.w", "4,8"), "comfy.gguf.orig_shape.w must be an ARRAY of non-negative integers"),
    (kv_array("comfy.gguf.orig_shape.w", VT.INT32, [struct.pack("<i", 3), struct.pack("<i", 3)]),
     r"comfy.gguf.orig_shape.w = \[3, 3\] has 9 elements, tensor 'w' stores 32"),
    (kv_array("comfy.gguf.orig_shape.w", VT.INT32, [struct.pack("<i", -4), struct.pack("<i", -8)]),
     "comfy.gguf.orig_shape.w must be an ARRAY of non-negative integers"),
], ids=["string", "wrong-count", "negative"])
def test_bad_orig_shape(tmp_path, payload, match):
    expect_error(tmp_path, gguf_bytes([payload], [tensor_info("w", (32,), QT.F32, 0)], b"\0" * 128), match)


def test_header_only_read_validates_too(tmp_path):
    path = tmp_path / "h.gguf"
    path.write_bytes(gguf_bytes([], [tensor_info("w", (32,), QT.F32, 64)], b"\0" * 64))
    with pytest.raises(GGUFError, match="data ends at byte"):
        read_gguf_header(path)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_gguf(tmp_path / "nope.gguf")


def test_unknown_architecture_is_not_an_error(tmp_path):
    path = tmp_path / "arch.gguf"
    path.write_bytes(gguf_bytes([kv_str("general.architecture", "gemma4")]))
    assert read_gguf(path).architecture == "gemma4"


def test_fuzzed_files_parse_or_raise_gguf_error(tmp_path):
    """300 seeded mutations and truncations of a valid file: each either reads (and then every tensor
    dequantizes or raises GGUFError) or raises GGUFError; nothing else, and nothing hangs."""
    source = tmp_path / "mixed.gguf"
    write_mixed_file(source)
    original = source.read_bytes()
    rng = random.Random(1234)
    path = tmp_path / "mutant.gguf"
    outcomes = {"ok": 0, "error": 0}
    for _ in range(300):
        path.write_bytes(_mutate(original, rng))
        try:
            f = read_gguf(path)
        except GGUFError:
            outcomes["error"] += 1
            continue
        outcomes["ok"] += 1
        for tensor in f.tensors.values():
            try:
                dequantize(tensor, torch.float32)
            except GGUFError:
                pass
    assert outcomes["ok"] > 20 and outcomes["error"] > 20, outcomes


def _mutate(data: bytes, rng: random.Random) -> bytes:
    mutated = bytearray(data)
    kind = rng.randrange(4)
    if kind == 0:  # truncate
        return bytes(mutated[:rng.randrange(len(mutated))])
    if kind == 1:  # flip random bytes anywhere
        for _ in range(rng.randint(1, 8)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
    elif kind == 2:  # overwrite a header-region word with an extreme value
        position = rng.randrange(4, min(len(mutated), 600) - 8)
        mutated[position:position + 8] = rng.choice([b"\xff" * 8, b"\0" * 8, struct.pack("<Q", 2 ** 62),
                                                     struct.pack("<Q", rng.randrange(1, 4096))])
    else:  # flip bytes in the header/metadata region only
        for _ in range(rng.randint(1, 4)):
            mutated[rng.randrange(min(len(mutated), 700))] ^= 1 << rng.randrange(8)
    return bytes(mutated)


def test_type_without_a_kernel_names_file_and_tensor(tmp_path):
    """Q8_1 (llama.cpp's activation type) reads, but dequantizing it has no kernel: the error said only
    "no dequantization kernel for GGML type Q8_1" (issue #13, escape 5)."""
    path = tmp_path / "q8_1.gguf"
    path.write_bytes(gguf_bytes([kv_str("general.architecture", "flux")],
                                [tensor_info("blk.0.attn_q.weight", (64, 2), QT.Q8_1, 0)], bytes(4 * 40)))
    weight = read_gguf(path).tensors["blk.0.attn_q.weight"]
    expected = (re.escape(f"{path}: tensor 'blk.0.attn_q.weight' (Q8_1 tensor of shape (2, 64)): ")
                + "no dequantization kernel for GGML type Q8_1$")
    with pytest.raises(GGUFError, match=expected):
        dequantize(weight)


def test_tensors_built_in_memory_say_what_they_are():
    from gguf_loader import GGMLTensor

    with pytest.raises(GGUFError, match=r"^Q8_K tensor of shape \(256,\): no dequantization kernel"):
        GGMLTensor(torch.zeros(292, dtype=torch.uint8), "Q8_K", (256,)).dequantize()
