"""Stream formats: decode(encode(block)) against independent references (gguf-py's Q8_0 quantize + dequantize,
torch's fp8 cast math), the stored layout kept (same offsets, TensorView.rebuild_on works on the decode buffer),
which tensors stay stored and why, sizes from metadata alone, and refusals."""

import gguf
import pytest
import torch
from dit_models import make_quirky
from stream_shapes import BLOCKS, metadata_clusters

import distorch.stream_format as sf
from distorch.blocks import cluster_tensors, discover, live_bytes
from distorch.stream_format import BlockCodec, StreamFormat, encoded_nbytes, keep_reason, stored_offsets
from distorch.toy import make_toy_dit

QT = gguf.GGMLQuantizationType
FORMATS = list(StreamFormat)


def block_sources(model, block):
    """Per cluster, its live bytes (what staging reads)."""
    return [live_bytes(c, cluster_tensors(model, c)) for c in block.clusters]


def round_trip(model, block, fmt):
    codec = BlockCodec.build(block.clusters, fmt)
    host = torch.full((codec.encoded_nbytes,), 0xAB, dtype=torch.uint8)
    codec.encode_into(host, block_sources(model, block))
    out = torch.full((codec.stored_nbytes,), 0xCD, dtype=torch.uint8)
    codec.decode_into(host.clone(), out)  # the slot: a copy of the host bytes
    return codec, out


def decoded(codec, block, out):
    """name -> the tensor as rebuilt on the decode buffer, exactly as the streamer points a block's tensors."""
    return {view.names[0]: view.rebuild_on(out, coding.stored_offset + view.offset)
            for cluster, coding in zip(block.clusters, codec.codings) for view in cluster.views}


def q8_0_reference(x: torch.Tensor) -> torch.Tensor:
    """gguf-py quantize + dequantize in float32, rounded once to the stored dtype."""
    values = x.detach().float().numpy()
    back = gguf.quants.dequantize(gguf.quants.quantize(values, QT.Q8_0), QT.Q8_0)
    return torch.from_numpy(back.reshape(values.shape)).to(x.dtype)


def fp8_reference(x: torch.Tensor) -> torch.Tensor:
    """torch's own cast math on the whole tensor: scale = amax / 448, x / scale clamped, cast, times scale."""
    scale = x.detach().abs().max().float() / 448
    codes = (x.detach().float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    return (codes.float() * scale).to(x.dtype)


REFERENCES = {StreamFormat.Q8_0: q8_0_reference, StreamFormat.FP8_E4M3FN: fp8_reference}


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("fmt", [StreamFormat.Q8_0, StreamFormat.FP8_E4M3FN])
def test_decode_of_encode_equals_the_reference_and_stored_tensors_are_untouched(fmt, dtype):
    model = make_toy_dit(dim=128, depth=2, heads=2, dtype=dtype)
    block = discover(model).blocks[1]
    codec, out = round_trip(model, block, fmt)
    originals = dict(zip([c.views[0].names[0] for c in block.clusters],
                         [t for c in block.clusters for t in cluster_tensors(model, c)]))
    encoded = {c.name for c in codec.encoded}
    assert encoded == {f"blocks.1.{n}.weight" for n in ("qkv", "proj", "fc1", "fc2")}
    for name, tensor in decoded(codec, block, out).items():
        assert tensor.dtype == dtype and tensor.shape == originals[name].shape
        expected = REFERENCES[fmt](originals[name]) if name in encoded else originals[name]
        assert torch.equal(bits(tensor), bits(expected)), name


def test_stored_format_is_todays_slot_layout_bit_for_bit():
    model = make_quirky(dim=64)
    for block in discover(model).blocks:
        codec, out = round_trip(model, block, StreamFormat.STORED)
        offsets = stored_offsets(block.clusters)
        assert [c.stored_offset for c in codec.codings] == [c.encoded_offset for c in codec.codings] == offsets
        assert codec.encoded_nbytes == codec.stored_nbytes == encoded_nbytes(block, "stored")
        for cluster, offset, source in zip(block.clusters, offsets, block_sources(model, block)):
            assert torch.equal(out[offset:offset + cluster.nbytes], source)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_keeps_the_stored_offsets(fmt):
    model = make_toy_dit(dim=128, depth=2, heads=2, dtype=torch.bfloat16)
    block = discover(model).blocks[0]
    codec = BlockCodec.build(block.clusters, fmt)
    stored = BlockCodec.build(block.clusters, StreamFormat.STORED)
    assert [c.stored_offset for c in codec.codings] == [c.stored_offset for c in stored.codings]
    assert codec.stored_nbytes == stored.stored_nbytes
    assert codec.encoded_nbytes == encoded_nbytes(block.clusters, fmt) <= codec.stored_nbytes


def test_ties_views_and_transposed_weights_stay_stored_with_a_reason():
    model = make_quirky(dim=64)  # float32: .to() would copy the view apart from its parameter
    block = discover(model).block("blocks.3")
    reasons = {c.name: c.reason for c in BlockCodec.build(block.clusters, "q8_0").codings}
    assert reasons["blocks.3.mix_t"].startswith("not a dense tensor (strides (1, 64)")
    assert "blocks.3.pair_view" not in reasons  # one cluster with pair_storage
    assert reasons["blocks.3.pair_storage"] == "2 tensors share its bytes (tied or aliased)"
    assert reasons["blocks.3.gain"] == "1-D" and reasons["blocks.3.modulation"] == "384 elements"
    assert reasons["blocks.3.q_norm.weight"] == "1-D"
    assert reasons["blocks.3.qkv.weight"] == ""
    codec, out = round_trip(model, block, "q8_0")
    views = decoded(codec, block, out)
    assert torch.equal(bits(views["blocks.3.mix_t"]), bits(model.blocks[3].mix_t))
    assert torch.equal(views["blocks.3.pair_view"], model.blocks[3].pair_view)
    assert views["blocks.3.pair_view"].data_ptr() == views["blocks.3.pair_storage"][1].data_ptr()


def test_name_rules_from_metadata_alone():
    shapes = {"attn.norm_added.weight": (64, 64), "pos_embed.weight": (64, 64), "proj.weight": (64, 64),
              "proj.bias": (64,), "odd.weight": (48, 40), "tiny.weight": (16, 32), "scale_shift_table": (6, 256)}
    clusters = dict(zip(shapes, metadata_clusters(shapes)))
    reasons = {name: keep_reason(c, "q8_0") for name, c in clusters.items()}
    assert reasons == {"attn.norm_added.weight": "a norm", "pos_embed.weight": "an embedding", "proj.weight": "",
                       "proj.bias": "1-D", "odd.weight": "last dim 40 not a multiple of 32",
                       "tiny.weight": "512 elements", "scale_shift_table": "not a weight (scale_shift_table)"}
    assert keep_reason(clusters["odd.weight"], "fp8_e4m3fn") == ""  # fp8 has no block size
    fp8_cluster = metadata_clusters({"w.weight": (64, 64)}, torch.float8_e4m3fn)[0]
    assert keep_reason(fp8_cluster, "q8_0") == "float8_e4m3fn stays as stored"


@pytest.mark.parametrize("block", sorted(BLOCKS))
def test_bf16_blocks_of_real_models_shrink_to_the_promised_ratio(block):
    """Flux.1 and Wan 2.1 14B blocks at full size, from metadata alone (no bytes allocated)."""
    clusters = metadata_clusters(BLOCKS[block](), torch.bfloat16)
    stored = encoded_nbytes(clusters, "stored")
    assert stored == sum(c.nbytes for c in clusters)  # 256-aligned shapes: no padding
    assert encoded_nbytes(clusters, "q8_0") <= 0.56 * stored
    assert encoded_nbytes(clusters, "fp8_e4m3fn") <= 0.51 * stored
    assert encoded_nbytes([c.views[0] for c in clusters], "q8_0") == encoded_nbytes(clusters, "q8_0")


def test_chunking_changes_nothing_and_float32_sources_are_not_modified(monkeypatch):
    model = make_toy_dit(dim=128, depth=1, heads=2, dtype=torch.float32)
    block = discover(model).blocks[0]
    before = {n: t.clone() for n, t in model.state_dict().items()}
    whole = {fmt: round_trip(model, block, fmt)[1] for fmt in (StreamFormat.Q8_0, StreamFormat.FP8_E4M3FN)}
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
    monkeypatch.setattr(sf, "ENCODE_CHUNK_ELEMENTS", 96)
    monkeypatch.setattr(sf, "DECODE_CHUNK_ELEMENTS", {"cpu": 160, "device": 160})
    for fmt, out in whole.items():
        assert torch.equal(round_trip(model, block, fmt)[1], out), fmt


def test_decoded_block_runs_like_the_model_with_reference_weights():
    """The block pointed at the decode buffer computes what the same block computes with the reference values:
    the format changes values once, at encoding; decoding adds nothing."""
    model = make_toy_dit(dim=128, depth=2, heads=2, dtype=torch.float32)
    block = discover(model).blocks[0]
    codec, out = round_trip(model, block, "q8_0")
    x, t_emb = torch.randn(1, 8, 128), torch.randn(1, 128)
    reference = make_toy_dit(dim=128, depth=2, heads=2, dtype=torch.float32)
    for coding in codec.encoded:
        weight = reference.get_parameter(coding.name)
        weight.data = q8_0_reference(weight.data)
    expected = reference.blocks[0](x, t_emb)
    for name, view in decoded(codec, block, out).items():
        model.get_parameter(name).data = view
    assert torch.equal(model.blocks[0](x, t_emb), expected)


def test_refusals():
    with pytest.raises(ValueError, match="stream format 'q4_k' is not one of stored, q8_0, fp8_e4m3fn"):
        StreamFormat.parse("q4_k")
    assert StreamFormat.parse(" Q8_0 ") is StreamFormat.Q8_0
    model = make_toy_dit(dim=128, depth=1, heads=2, dtype=torch.float32)
    block = discover(model).blocks[0]
    codec = BlockCodec.build(block.clusters, "q8_0")
    with pytest.raises(ValueError, match=f"host buffer must be a flat uint8 tensor of at least {codec.encoded_nbytes}"):
        codec.encode_into(torch.empty(codec.encoded_nbytes - 1, dtype=torch.uint8), block_sources(model, block))
    with pytest.raises(ValueError, match="decode buffer must be"):
        codec.decode_into(torch.empty(codec.encoded_nbytes, dtype=torch.uint8), torch.empty(8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="one per cluster"):
        BlockCodec.build(block.clusters, "q8_0", offsets=[0])
    model.blocks[0].fc1.weight.data[3, 5] = 1e7  # a Q8_0 block scale of 1e7 / 127 overflows float16
    with pytest.raises(ValueError, match="blocks.0.fc1.weight: a Q8_0 block scale overflows float16"):
        codec.encode_into(torch.empty(codec.encoded_nbytes, dtype=torch.uint8), block_sources(model, block))
    model.blocks[0].fc1.weight.data[3, 5] = float("nan")
    fp8 = BlockCodec.build(block.clusters, "fp8_e4m3fn")
    with pytest.raises(ValueError, match="blocks.0.fc1.weight: holds NaN or inf"):
        fp8.encode_into(torch.empty(fp8.encoded_nbytes, dtype=torch.uint8), block_sources(model, block))


def test_all_zero_tensor_in_fp8():
    model = make_toy_dit(dim=128, depth=1, heads=2, dtype=torch.bfloat16)
    model.blocks[0].proj.weight.data.zero_()
    block = discover(model).blocks[0]
    codec, out = round_trip(model, block, "fp8_e4m3fn")
    assert torch.equal(decoded(codec, block, out)["blocks.0.proj.weight"], model.blocks[0].proj.weight)


def test_the_header_rules_use_the_q8_0_layout_of_the_quantizer():
    """stream_rules.py sizes Q8_0 without torch (for plans from a file header): its block layout is gguf's."""
    from distorch import stream_rules
    from gguf_loader import quantize

    assert (stream_rules.Q8_0_BLOCK, stream_rules.Q8_0_BLOCK_BYTES) == (quantize.Q8_0_BLOCK, quantize.Q8_0_BLOCK_BYTES)
