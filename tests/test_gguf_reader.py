"""Reading GGUF files: round trips through the writer, metadata, orig_shape, v2, header-only, archs."""

import struct
import warnings

import gguf
import numpy as np
import pytest
import torch
from ggml_samples import random_blocks
from gguf import GGML_QUANT_SIZES
from gguf_helpers import (
    QT,
    VT,
    assert_bits_equal,
    gguf_bytes,
    kv,
    kv_array,
    kv_str,
    kv_u32,
    one_tensor_file,
    tensor_info,
    write_mixed_file,
)

from gguf_loader import (
    GGMLTensor,
    GGUFFileWriter,
    can_quantize,
    dequantize,
    detect_architecture,
    model_kind,
    read_gguf,
    read_gguf_header,
    supported_qtypes,
    write_gguf,
)
from gguf_loader.torch_dtypes import PLAIN_TORCH_DTYPES

QUANTIZED_BY_GGUF_PY = [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.MXFP4, QT.TQ1_0, QT.TQ2_0]


def gguf_py_tensors(path) -> dict[str, np.ndarray]:
    return {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("qtype", QUANTIZED_BY_GGUF_PY, ids=lambda t: t.name)
def test_quantized_round_trip_keeps_bytes_and_values(tmp_path, qtype):
    source = torch.randn(8, 512, generator=torch.Generator().manual_seed(int(qtype)))
    path = tmp_path / "q.gguf"
    write_gguf(path, {"w": source}, qtypes={"w": qtype})
    with read_gguf(path) as f:
        tensor = f.tensors["w"]
        assert isinstance(tensor, GGMLTensor) and tensor.qtype == qtype and tensor.shape == (8, 512)
        expected = gguf.quants.quantize(source.numpy(), qtype)
        assert np.array_equal(tensor.as_plain().numpy().reshape(expected.shape), expected)
        assert np.array_equal(dequantize(tensor).numpy(), gguf.quants.dequantize(expected, qtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_float_tensors_are_typed_zero_copy_views(tmp_path, dtype):
    source = torch.randn(3, 5, 7).to(dtype)
    path = tmp_path / "f.gguf"
    write_gguf(path, {"w": source})
    f = read_gguf(path)
    tensor = f.tensors["w"]
    assert type(tensor) is torch.Tensor and tensor.dtype == dtype and torch.equal(tensor, source)
    assert tensor.untyped_storage().nbytes() == f.file_size  # a view of the whole mapping, not a copy
    assert dequantize(tensor, dtype) is tensor


def test_bf16_quantized_by_gguf_py_from_float32(tmp_path):
    source = torch.randn(4, 64)
    write_gguf(tmp_path / "b.gguf", {"w": source}, qtypes={"w": "BF16"})
    tensor = read_gguf(tmp_path / "b.gguf").tensors["w"]
    expected = gguf.quants.quantize(source.numpy(), QT.BF16).view(np.int16)
    assert np.array_equal(tensor.view(torch.int16).numpy(), expected.reshape(4, 64))


@pytest.mark.parametrize("qtype", [QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.IQ2_XS, QT.IQ4_XS, QT.NVFP4],
                         ids=lambda t: t.name)
def test_raw_blocks_round_trip(tmp_path, qtype):
    block_size = gguf.GGML_QUANT_SIZES[qtype][0]
    blocks = random_blocks(qtype, 6, seed=4)
    writer = GGUFFileWriter(tmp_path / "raw.gguf")
    writer.add_tensor("w", blocks, qtype, shape=(3, 2 * block_size))
    writer.write()
    tensor = read_gguf(tmp_path / "raw.gguf").tensors["w"]
    assert tensor.shape == (3, 2 * block_size) and tensor.size() == (3, 2 * blocks.shape[1])
    assert np.array_equal(tensor.as_plain().numpy().reshape(blocks.shape), blocks)
    assert np.array_equal(gguf_py_tensors(tmp_path / "raw.gguf")["w"].reshape(blocks.shape), blocks)


def test_mixed_file_matches_gguf_py_reader(tmp_path):
    path = tmp_path / "mixed.gguf"
    write_mixed_file(path)
    ours = read_gguf(path)
    theirs = gguf.GGUFReader(path)
    assert [i.name for i in ours.tensor_infos] == [t.name for t in theirs.tensors]
    for info, reference in zip(ours.tensor_infos, theirs.tensors):
        assert info.offset == reference.data_offset and info.nbytes == reference.n_bytes
        assert info.qtype == reference.tensor_type
        raw = ours.tensors[info.name]
        raw = raw.as_plain() if isinstance(raw, GGMLTensor) else raw.reshape(-1).view(torch.uint8)
        assert np.array_equal(raw.numpy().reshape(-1), np.asarray(reference.data).reshape(-1).view(np.uint8))
    assert ours.qtype_summary() == "Q8_0 (1), Q4_0 (1), F32 (1), Q5_1 (1), BF16 (1), Q4_K (1)"


def test_orig_shape_for_a_4d_conv_weight(tmp_path):
    path = tmp_path / "conv.gguf"
    sources = write_mixed_file(path)
    f = read_gguf(path)
    info = f.tensor_info("conv.weight")
    assert info.stored_shape == (9, 32) and info.shape == (8, 4, 3, 3)
    assert f.metadata["comfy.gguf.orig_shape.conv.weight"] == [8, 4, 3, 3]
    assert f.metadata_types["comfy.gguf.orig_shape.conv.weight"] == (VT.ARRAY, VT.INT32)
    expected = gguf.quants.dequantize(gguf.quants.quantize(sources["conv.weight"].numpy().reshape(9, 32), QT.Q5_1),
                                      QT.Q5_1)
    assert np.array_equal(dequantize(f.tensors["conv.weight"]).numpy(), expected.reshape(8, 4, 3, 3))


def test_orig_shape_on_a_float_tensor_reshapes_the_view(tmp_path):
    writer = GGUFFileWriter(tmp_path / "o.gguf")
    source = torch.randn(2, 3, 4, 5, 6)  # five dims: stored flattened, restored from orig_shape
    writer.add_tensor("w", source)
    writer.write()
    f = read_gguf(tmp_path / "o.gguf")
    assert f.tensor_info("w").stored_shape == (120, 6) and torch.equal(f.tensors["w"], source)


def test_metadata_values_and_types(tmp_path):
    writer = GGUFFileWriter(tmp_path / "m.gguf", architecture="wan")
    writer.add_metadata("s", "héllo")
    writer.add_metadata("i", -7)
    writer.add_metadata("big", 2 ** 40)
    writer.add_metadata("f", 0.1)
    writer.add_metadata("b", False)
    writer.add_metadata("ints", [1, 2, 3])
    writer.add_metadata("strs", ["a", "bc"])
    writer.add_metadata("u8", 200, VT.UINT8)
    writer.add_metadata("nested", [[1, 2], [3]], VT.ARRAY, VT.ARRAY)
    writer.write()
    header = read_gguf_header(tmp_path / "m.gguf")
    m = header.metadata
    assert (m["s"], m["i"], m["big"], m["b"], m["ints"], m["strs"], m["u8"]) == \
        ("héllo", -7, 2 ** 40, False, [1, 2, 3], ["a", "bc"], 200)
    assert m["f"] == float(np.float32(0.1)) and m["nested"] == [[1, 2], [3]]
    assert header.metadata_types["big"] == (VT.INT64, None) and header.metadata_types["strs"] == (VT.ARRAY, VT.STRING)
    assert header.architecture == "wan" and header.version == 3 and header.alignment == 32


def test_large_tokenizer_metadata(tmp_path):
    tokens = [f"tok_{i}_{'x' * (i % 7)}" for i in range(150_000)]
    writer = GGUFFileWriter(tmp_path / "vocab.gguf", architecture="llama")
    writer.add_metadata("tokenizer.ggml.tokens", tokens)
    writer.add_metadata("tokenizer.ggml.scores", np.linspace(-1, 0, 150_000, dtype=np.float32))
    writer.add_metadata("tokenizer.ggml.token_type", [1] * 150_000, VT.ARRAY, VT.INT32)
    writer.write()
    m = read_gguf_header(tmp_path / "vocab.gguf").metadata
    assert m["tokenizer.ggml.tokens"] == tokens
    assert len(m["tokenizer.ggml.scores"]) == 150_000 and m["tokenizer.ggml.scores"][-1] == 0.0
    assert m["tokenizer.ggml.token_type"][:3] == [1, 1, 1]


def test_version_2_files_read_the_same(tmp_path):
    data = bytearray(one_tensor_file(QT.Q4_0))
    v3 = read_gguf_header(_write(tmp_path / "v3.gguf", bytes(data)))
    struct.pack_into("<I", data, 4, 2)
    v2 = read_gguf(_write(tmp_path / "v2.gguf", bytes(data)))
    assert v2.version == 2 and v2.tensor_infos == v3.tensor_infos and v2.metadata == v3.metadata
    assert v2.tensors["w"].qtype == QT.Q4_0


def test_custom_alignment(tmp_path):
    writer = GGUFFileWriter(tmp_path / "a.gguf", alignment=64)
    writer.add_tensor("a", torch.randn(3))
    writer.add_tensor("b", torch.randn(5))
    writer.write()
    f = read_gguf(tmp_path / "a.gguf")
    assert f.alignment == 64 and all(i.offset % 64 == 0 for i in f.tensor_infos)
    assert f.tensors["b"].shape == (5,)


def test_misaligned_float_view_is_copied_when_alignment_is_one(tmp_path):
    """general.alignment = 1 makes odd offsets legal; a typed view then needs a copy."""
    kvs = [kv("general.alignment", VT.UINT32, struct.pack("<I", 1))]
    infos = [tensor_info("a", (1,), QT.I8, 0), tensor_info("b", (2,), QT.F32, 1)]
    data = b"\x07" + struct.pack("<2f", 1.5, -2.0)
    f = read_gguf(_write(tmp_path / "odd.gguf", gguf_bytes(kvs, infos, data, alignment=1)))
    assert f.tensors["b"].tolist() == [1.5, -2.0] and f.tensors["a"].tolist() == [7]


def test_header_only_mode_creates_no_tensors(tmp_path):
    path = tmp_path / "mixed.gguf"
    write_mixed_file(path)
    header = read_gguf_header(path)
    assert not hasattr(header, "tensors")
    info = header.tensor_info("blk.0.attn_q.weight")
    assert (info.type_name, info.shape, info.nbytes, info.is_quantized) == ("Q8_0", (64, 128), 64 * 136, True)
    assert header.tensor_bytes == sum(i.nbytes for i in header.tensor_infos)
    lazy = read_gguf(path, tensors=False)
    assert lazy.tensors == {} and lazy.tensor_infos == header.tensor_infos


def test_tensors_outlive_close(tmp_path):
    path = tmp_path / "mixed.gguf"
    write_mixed_file(path)
    with read_gguf(path) as f:
        weight = f.tensors["blk.0.attn_q.weight"]
        expected = dequantize(weight)
    assert f.tensors == {}
    assert torch.equal(dequantize(weight), expected)


def test_writable_mapping_allows_in_place_changes_without_touching_the_file(tmp_path):
    path = tmp_path / "w.gguf"
    write_gguf(path, {"w": torch.ones(4)})
    f = read_gguf(path, writable=True)
    f.tensors["w"].mul_(3)
    assert f.tensors["w"].tolist() == [3.0] * 4
    assert read_gguf(path).tensors["w"].tolist() == [1.0] * 4


def test_writer_refuses_what_gguf_py_cannot_quantize(tmp_path):
    assert can_quantize("Q8_0") and can_quantize("BF16") and not can_quantize("Q4_K")
    writer = GGUFFileWriter(tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="gguf-py cannot quantize to Q4_K; pass pre-quantized"):
        writer.add_tensor("w", torch.randn(2, 256), "Q4_K")
    with pytest.raises(ValueError, match="duplicate tensor name"):
        writer.add_tensor("a", torch.randn(2))
        writer.add_tensor("a", torch.randn(2))
    with pytest.raises(ValueError, match="raw uint8 blocks need qtype and shape"):
        writer.add_tensor("r", np.zeros((2, 34), np.uint8))


def test_writer_streams_callable_sources(tmp_path):
    calls = []

    def load():
        calls.append(1)
        return torch.arange(64, dtype=torch.float32).view(2, 32)

    writer = GGUFFileWriter(tmp_path / "lazy.gguf")
    writer.add_tensor("w", load, "Q8_0", shape=(2, 32))
    assert calls == []
    writer.write()
    assert calls == [1]
    expected = gguf.quants.quantize(np.arange(64, dtype=np.float32).reshape(2, 32), QT.Q8_0)
    assert np.array_equal(read_gguf(tmp_path / "lazy.gguf").tensors["w"].as_plain().numpy(), expected)


def test_file_written_by_us_is_readable_by_gguf_py(tmp_path):
    path = tmp_path / "mixed.gguf"
    write_mixed_file(path)
    reader = gguf.GGUFReader(path)
    field = reader.get_field("comfy.gguf.orig_shape.conv.weight")
    assert [int(field.parts[i][0]) for i in field.data] == [8, 4, 3, 3]


# -- architecture -------------------------------------------------------------------------------------

def test_declared_architecture_is_kept_even_when_unknown(tmp_path):
    path = _write(tmp_path / "u.gguf", gguf_bytes([kv_str("general.architecture", "mystery-dit")]))
    header = read_gguf_header(path)
    assert header.architecture == "mystery-dit" and header.arch.source == "metadata" and header.arch.kind is None


@pytest.mark.parametrize(("arch", "names"), [
    ("flux", ["double_blocks.0.img_attn.proj.weight", "img_in.weight"]),
    ("flux", ["model.diffusion_model.double_blocks.0.img_attn.proj.weight"]),
    ("wan", ["blocks.0.self_attn.norm_q.weight", "text_embedding.2.weight", "head.modulation"]),
    ("sd3", ["joint_blocks.0.x_block.attn.qkv.weight"]),
    ("hyvid", ["double_blocks.0.img_attn_proj.weight",
               "txt_in.individual_token_refiner.blocks.1.self_attn_qkv.weight"]),
    ("ltxv", ["adaln_single.emb.timestep_embedder.linear_2.weight", "transformer_blocks.27.scale_shift_table",
              "caption_projection.linear_2.weight"]),
    ("qwen_image", ["txt_norm.weight", "transformer_blocks.0.img_mod.1.weight"]),
    ("lumina2", ["cap_embedder.1.weight", "context_refiner.0.attention.qkv.weight"]),
    ("sdxl", ["input_blocks.3.0.op.weight", "input_blocks.6.0.op.weight", "output_blocks.2.2.conv.weight",
              "output_blocks.5.2.conv.weight", "label_emb.0.0.weight"]),
    ("sd1", ["down_blocks.0.downsamplers.0.conv.weight"]),
    ("t5encoder", ["enc.blk.0.attn_q.weight", "token_embd.weight"]),
    ("t5", ["enc.blk.0.attn_q.weight", "dec.blk.0.attn_q.weight"]),
    ("llama", ["blk.0.attn_q.weight", "token_embd.weight"]),
    ("qwen3", ["blk.0.attn_q.weight", "blk.0.attn_q_norm.weight", "token_embd.weight"]),
])
def test_architecture_from_tensor_names_when_missing(arch, names):
    detected = detect_architecture({}, names)
    assert (detected.name, detected.source, detected.declared) == (arch, "tensor names", None)


def test_placeholder_architecture_falls_back_to_names():
    detected = detect_architecture({"general.architecture": "pig"}, ["double_blocks.0.img_attn.proj.weight"])
    assert (detected.name, detected.declared, detected.kind) == ("flux", "pig", "image")


def test_nothing_recognised_gives_none():
    assert detect_architecture({}, ["a.weight"]).name is None
    assert model_kind("qwen3") == "text" and model_kind("wan") == "image" and model_kind("x") is None


def test_architecture_from_file_without_the_key(tmp_path):
    infos = [tensor_info("double_blocks.0.img_attn.proj.weight", (4,), QT.F32, 0)]
    header = read_gguf_header(_write(tmp_path / "n.gguf", gguf_bytes([], infos, b"\0" * 16)))
    assert header.architecture == "flux" and header.arch.source == "tensor names"


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_helpers_build_valid_files(tmp_path):
    path = _write(tmp_path / "h.gguf", gguf_bytes([kv_u32("x", 1), kv_array("y", VT.UINT8, [b"\1", b"\2"])]))
    assert read_gguf_header(path).metadata == {"x": 1, "y": [1, 2]}


def test_every_type_at_odd_offsets_matches_gguf_py(tmp_path):
    """general.alignment 1 packs tensors back to back, so most start at odd offsets; each dequantizes
    bit-exactly like gguf-py's reader + dequantize (regression: issue #13, escape 1)."""
    path = tmp_path / "packed.gguf"
    writer = GGUFFileWriter(path, architecture="flux", alignment=1)
    for qtype in supported_qtypes():
        if qtype in PLAIN_TORCH_DTYPES:
            continue
        block_size, _ = GGML_QUANT_SIZES[qtype]
        for n_blocks in (1, 3):
            writer.add_tensor(f"{qtype.name}.{n_blocks}", random_blocks(qtype, n_blocks, seed=n_blocks), qtype.name,
                              shape=(n_blocks * block_size,))
    writer.write()
    ours = read_gguf(path)
    assert {1, 2, 3} <= {info.offset % 4 for info in ours.tensor_infos}
    for tensor in gguf.GGUFReader(path).tensors:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # NaN/inf scales in random IQ/TQ blocks
            expected = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
        assert_bits_equal(dequantize(ours.tensors[tensor.name]), expected.reshape(-1))
