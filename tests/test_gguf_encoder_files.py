"""GGUF text-encoder files -> ComfyUI state dicts: which tokenizer each family gets, and mmproj pairing."""

import json

import pytest
import tokenizer_fixtures as fx
import torch

from gguf_loader import (
    EncoderPart,
    GGUFError,
    GGUFFileWriter,
    attach_vision_towers,
    is_vision_projector,
    read_gguf,
    text_encoder_state_dict,
    tokenizer_entries,
    vision_projector_state_dict,
)

spm = pytest.importorskip("sentencepiece")


def unigram_vocabulary(size: int) -> dict:
    """A valid "t5" vocabulary of `size` tokens (T5 layout: pad, eos, unk, then pieces)."""
    tokens = ["<pad>", "</s>", "<unk>"] + [f"\u2581w{i}" for i in range(size - 3)]
    return {"tokenizer.ggml.model": "t5", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": [0.0, 0.0, 0.0] + [-1.0 - i / size for i in range(size - 3)],
            "tokenizer.ggml.token_type": [3, 3, 2] + [1] * (size - 3), "tokenizer.ggml.eos_token_id": 1,
            "tokenizer.ggml.padding_token_id": 0, "tokenizer.ggml.unknown_token_id": 2}


def test_umt5_gets_a_sentencepiece_model_and_t5xxl_uses_comfyuis_own():
    """ComfyUI ships T5's 32,128-piece tokenizer (Flux, SD3, LTX-Video; Stable Audio's T5-base, which a
    `spiece_model` would turn into ACE's UMT5-base); any other vocabulary (UMT5) travels as `spiece_model`."""
    assert tokenizer_entries(unigram_vocabulary(32128), "t5encoder", "t5xxl.gguf") == {}
    assert tokenizer_entries({}, "t5encoder", "no-tokenizer.gguf") == {}
    assert set(tokenizer_entries(unigram_vocabulary(600), "t5encoder", "small.gguf")) == {"spiece_model"}
    entries = tokenizer_entries(unigram_vocabulary(32129), "t5", "umt5.gguf")
    assert set(entries) == {"spiece_model"} and entries["spiece_model"].dtype == torch.uint8
    sp = spm.SentencePieceProcessor(model_proto=entries["spiece_model"].numpy().tobytes())
    assert sp.get_piece_size() == 32129 and sp.encode("w5 w7", out_type=str) == ["\u2581w5", "\u2581w7"]


@pytest.mark.parametrize("architecture", ["gemma", "gemma2", "gemma3"])
def test_gemma_gets_a_sentencepiece_model(architecture):
    sp = fx.train_sentencepiece("bpe", byte_fallback=True, normalization="identity", gemma_layout=True)
    entries = tokenizer_entries(fx.gemma_metadata(sp), architecture, "gemma.gguf")
    rebuilt = spm.SentencePieceProcessor(model_proto=entries["spiece_model"].numpy().tobytes())
    assert rebuilt.encode("a corgi", add_bos=True) == sp.encode("a corgi", add_bos=True)


def test_gemma_with_a_byte_level_vocabulary_is_a_clear_error():
    """Without tokenizer.model llama.cpp writes Gemma's vocabulary as gpt2; ComfyUI's Gemma tokenizer would fail
    later with 'invalid tokenizer'."""
    metadata = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"]}
    with pytest.raises(GGUFError, match=r"^gemma\.gguf: tokenizer\.ggml\.model is 'gpt2'; ComfyUI's Gemma encoders"):
        tokenizer_entries(metadata, "gemma3", "gemma.gguf")


@pytest.mark.parametrize("architecture", ["llama", "mistral3"])
def test_mistral_gets_a_tekken_model(architecture):
    metadata = fx.tekken_metadata(fx.tekken_json([bytes([b]) for b in range(256)] + [b"ab"]))
    entries = tokenizer_entries(metadata, architecture, "mistral.gguf")
    document = json.loads(entries["tekken_model"].numpy().tobytes())
    assert document["config"]["default_num_special_tokens"] == len(fx.TEKKEN_SPECIALS)


@pytest.mark.parametrize("architecture, metadata", [
    ("llama", {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.tokens": ["a"]}),
    ("llama", {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"]}),
    ("qwen2vl", {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.tokens": ["a"]}),
    ("qwen3", {}),
])
def test_families_with_bundled_tokenizers_get_none(architecture, metadata):
    """Llama 3 (HiDream) and Qwen tokenizers ship with ComfyUI; Llama 2 SentencePiece has no ComfyUI encoder."""
    assert tokenizer_entries(metadata, architecture, "x.gguf") == {}


def test_text_encoder_state_dict_holds_names_and_tokenizer(tmp_path):
    path = tmp_path / "umt5.gguf"
    writer = GGUFFileWriter(path, architecture="t5encoder")
    for key, value in unigram_vocabulary(32200).items():
        writer.add_metadata(key, value)
    writer.add_tensor("enc.blk.0.attn_q.weight", torch.randn(64, 64), "Q8_0")
    writer.add_tensor("token_embd.weight", torch.randn(32200, 64), "Q8_0")
    writer.write()
    state_dict = text_encoder_state_dict(read_gguf(path))
    assert set(state_dict) == {"encoder.block.0.layer.0.SelfAttention.q.weight", "shared.weight", "spiece_model"}


@pytest.mark.parametrize("architecture", ["minimax-m2", "x" * 500])
def test_a_llama_cpp_architecture_without_a_name_map_is_a_clear_error(tmp_path, architecture):
    """A llama.cpp architecture with no map here would reach ComfyUI under llama.cpp's names."""
    path = tmp_path / "encoder.gguf"
    writer = GGUFFileWriter(path, architecture=architecture)
    writer.add_tensor("blk.0.attn_q.weight", torch.randn(8, 8))
    writer.write()
    with pytest.raises(GGUFError, match=r"llama\.cpp architecture '.*' is not supported as a text encoder "
                                        r"\(supported: clip, gemma") as caught:
        text_encoder_state_dict(read_gguf(path))
    assert str(caught.value).startswith(str(path)) and len(str(caught.value)) < 400


NAME_MAP_ERRORS = {
    # llama: Q/K cannot be un-permuted without the head count the file should declare
    "llama": ({"blk.0.attn_q.weight": torch.randn(8, 8)}, "metadata has no 'llama.attention.head_count'"),
    "gpt-oss": ({"blk.0.ffn_gate_exps.weight": torch.zeros(2, 4, 32)}, "ffn_gate_exps and ffn_up_exps must both"),
}


@pytest.mark.parametrize("architecture", NAME_MAP_ERRORS)
def test_a_name_map_error_names_the_file(tmp_path, architecture):
    tensors, message = NAME_MAP_ERRORS[architecture]
    path = tmp_path / "encoder.gguf"
    writer = GGUFFileWriter(path, architecture=architecture)
    for name, tensor in tensors.items():
        writer.add_tensor(name, tensor)
    writer.write()
    with pytest.raises(GGUFError, match=message) as caught:
        text_encoder_state_dict(read_gguf(path))
    assert str(caught.value).startswith(f"{path}: ") and "\n" not in str(caught.value)


def test_a_file_already_in_comfyuis_names_passes_whatever_its_architecture(tmp_path):
    path = tmp_path / "encoder.gguf"
    writer = GGUFFileWriter(path, architecture="gemma4")
    writer.add_tensor("model.layers.0.self_attn.q_proj.weight", torch.randn(8, 8))
    writer.write()
    assert set(text_encoder_state_dict(read_gguf(path))) == {"model.layers.0.self_attn.q_proj.weight"}


# -- vision projectors (mmproj) -------------------------------------------------------------------------------

def write_mmproj(path, blocks: int = 1, width: int = 32, out_width: int = 48, gated: bool = True,
                 projector: str | None = "qwen2.5vl_merger", declare_type: bool = True) -> None:
    writer = GGUFFileWriter(path, architecture="clip")
    if declare_type:
        writer.add_metadata("general.type", "mmproj")
    if projector is not None:
        writer.add_metadata("clip.projector_type", projector)
    for i in range(blocks):
        for part in ("attn_q", "attn_k", "attn_v", "attn_out"):
            writer.add_tensor(f"v.blk.{i}.{part}.weight", torch.randn(width, width).half())
            writer.add_tensor(f"v.blk.{i}.{part}.bias", torch.randn(width))
        for part in ("ffn_up", "ffn_down") + (("ffn_gate",) if gated else ()):
            writer.add_tensor(f"v.blk.{i}.{part}.weight", torch.randn(width, width).half())
        writer.add_tensor(f"v.blk.{i}.ln1.weight", torch.ones(width))
        writer.add_tensor(f"v.blk.{i}.ln2.weight", torch.ones(width))
    writer.add_tensor("v.patch_embd.weight", torch.randn(width, 3, 14, 14).half())
    writer.add_tensor("v.patch_embd.weight.1", torch.randn(width, 3, 14, 14).half())
    writer.add_tensor("v.post_ln.weight", torch.ones(width))
    writer.add_tensor("mm.0.weight", torch.randn(4 * width, 4 * width).half())
    writer.add_tensor("mm.2.weight", torch.randn(out_width, 4 * width).half())
    writer.write()


@pytest.mark.parametrize("declare_type", [True, False], ids=["general.type", "clip-with-vision-tensors"])
def test_vision_projector_is_recognised_and_mapped(tmp_path, declare_type):
    write_mmproj(tmp_path / "mmproj.gguf", declare_type=declare_type)
    mmproj = read_gguf(tmp_path / "mmproj.gguf")
    assert is_vision_projector(mmproj)
    state_dict = vision_projector_state_dict(mmproj)
    assert state_dict["visual.blocks.0.attn.qkv.weight"].shape == (96, 32)
    assert state_dict["visual.patch_embed.proj.weight"].shape == (32, 3, 2, 14, 14)
    assert "visual.blocks.0.mlp.gate_proj.weight" in state_dict


def test_a_text_encoder_is_not_a_projector(tmp_path):
    writer = GGUFFileWriter(tmp_path / "clip_l.gguf", architecture="clip")
    writer.add_tensor("t.blk.0.attn_q.weight", torch.randn(8, 8))
    writer.write()
    assert not is_vision_projector(read_gguf(tmp_path / "clip_l.gguf"))


@pytest.mark.parametrize("projector, gated", [("gemma3", True), ("qwen2vl_merger", False), (None, False)])
def test_only_qwen25_vl_vision_towers_are_accepted(tmp_path, projector, gated):
    """ComfyUI's Qwen encoders run Qwen2.5-VL's tower (gated MLP); a Qwen2-VL or Gemma projector would only fail
    later with shape errors deep in the vision model."""
    write_mmproj(tmp_path / "mmproj.gguf", gated=gated, projector=projector)
    with pytest.raises(GGUFError, match=rf"mmproj\.gguf: vision projector {projector!r} is not a Qwen2\.5-VL one"):
        vision_projector_state_dict(read_gguf(tmp_path / "mmproj.gguf"))


def _text_part(hidden: int = 48, **extra) -> EncoderPart:
    return EncoderPart("qwen.gguf", {"model.embed_tokens.weight": torch.zeros(10, hidden), **extra}, False)


def _tower_part(tmp_path, out_width: int = 48) -> EncoderPart:
    write_mmproj(tmp_path / "mmproj.gguf", out_width=out_width)
    return EncoderPart("mmproj.gguf", vision_projector_state_dict(read_gguf(tmp_path / "mmproj.gguf")), True)


@pytest.mark.parametrize("order", ["text-first", "mmproj-first"])
def test_mmproj_joins_the_text_encoder_it_is_paired_with(tmp_path, order):
    parts = [_text_part(), _tower_part(tmp_path)]
    merged = attach_vision_towers(parts if order == "text-first" else parts[::-1])
    assert len(merged) == 1
    assert "model.embed_tokens.weight" in merged[0] and "visual.merger.mlp.2.weight" in merged[0]


def test_without_projector_every_state_dict_stays_separate():
    parts = [_text_part(), EncoderPart("clip_l.safetensors", {"text_model.x": torch.zeros(1)}, False)]
    assert attach_vision_towers(parts) == [parts[0].state_dict, parts[1].state_dict]


def test_pairing_errors(tmp_path):
    tower = _tower_part(tmp_path)
    with pytest.raises(GGUFError, match=r"pairs with exactly one text encoder; got 1 projector\(s\) and 0 text"):
        attach_vision_towers([tower])
    with pytest.raises(GGUFError, match=r"got 2 projector\(s\) and 1 text encoder\(s\): qwen\.gguf, mmproj\.gguf"):
        attach_vision_towers([_text_part(), tower, tower])
    with pytest.raises(GGUFError, match=r"qwen\.gguf already holds a vision tower \(visual\.\*\)"):
        attach_vision_towers([_text_part(**{"visual.blocks.0.norm1.weight": torch.zeros(1)}), tower])
    with pytest.raises(GGUFError, match=r"mmproj\.gguf projects images to width 48, but qwen\.gguf has hidden size 64"):
        attach_vision_towers([_text_part(hidden=64), tower])
