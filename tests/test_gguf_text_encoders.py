"""llama.cpp text-encoder names -> ComfyUI names, and undoing llama.cpp's Q/K permutation."""

import pytest
import torch
from gguf_helpers import QT

from gguf_loader import GGMLTensor, GGUFError, dequantize, map_text_encoder, unpermute_qk
from gguf_loader.quantize import quantize_q8_0


def llama_cpp_permute(weights: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute, restated for the test."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def names(tensors, arch, metadata=None):
    return set(map_text_encoder(tensors, arch, metadata))


def test_t5_gated_encoder_names():
    tensors = {n: torch.zeros(1) for n in [
        "token_embd.weight", "enc.output_norm.weight", "enc.blk.0.attn_q.weight", "enc.blk.0.attn_k.weight",
        "enc.blk.0.attn_v.weight", "enc.blk.0.attn_o.weight", "enc.blk.0.attn_rel_b.weight",
        "enc.blk.0.attn_norm.weight", "enc.blk.0.ffn_gate.weight", "enc.blk.0.ffn_up.weight",
        "enc.blk.0.ffn_down.weight", "enc.blk.0.ffn_norm.weight", "enc.blk.23.attn_q.weight"]}
    assert names(tensors, "t5encoder") == {
        "shared.weight", "encoder.final_layer_norm.weight", "encoder.block.0.layer.0.SelfAttention.q.weight",
        "encoder.block.0.layer.0.SelfAttention.k.weight", "encoder.block.0.layer.0.SelfAttention.v.weight",
        "encoder.block.0.layer.0.SelfAttention.o.weight",
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        "encoder.block.0.layer.0.layer_norm.weight", "encoder.block.0.layer.1.DenseReluDense.wi_0.weight",
        "encoder.block.0.layer.1.DenseReluDense.wi_1.weight", "encoder.block.0.layer.1.DenseReluDense.wo.weight",
        "encoder.block.0.layer.1.layer_norm.weight", "encoder.block.23.layer.0.SelfAttention.q.weight"}


def test_umt5_has_relative_bias_in_every_block_and_ungated_t5_uses_wi():
    tensors = {"enc.blk.5.attn_rel_b.weight": torch.zeros(1), "enc.blk.5.ffn_up.weight": torch.zeros(1)}
    assert names(tensors, "t5") == {"encoder.block.5.layer.0.SelfAttention.relative_attention_bias.weight",
                                    "encoder.block.5.layer.1.DenseReluDense.wi.weight"}


def test_t5_decoder_names():
    tensors = {n: torch.zeros(1) for n in ["dec.blk.1.cross_attn_q.weight", "dec.blk.1.ffn_norm.weight",
                                           "dec.output_norm.weight", "output.weight"]}
    assert names(tensors, "t5") == {"decoder.block.1.layer.1.EncDecAttention.q.weight",
                                    "decoder.block.1.layer.2.layer_norm.weight", "decoder.final_layer_norm.weight",
                                    "lm_head.weight"}


LLAMA_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight", "blk.3.attn_norm.weight": "model.layers.3.input_layernorm.weight",
    "blk.3.attn_q.weight": "model.layers.3.self_attn.q_proj.weight",
    "blk.3.attn_k.weight": "model.layers.3.self_attn.k_proj.weight",
    "blk.3.attn_v.weight": "model.layers.3.self_attn.v_proj.weight",
    "blk.3.attn_output.weight": "model.layers.3.self_attn.o_proj.weight",
    "blk.3.ffn_gate.weight": "model.layers.3.mlp.gate_proj.weight",
    "blk.3.ffn_up.weight": "model.layers.3.mlp.up_proj.weight",
    "blk.3.ffn_down.weight": "model.layers.3.mlp.down_proj.weight",
    "blk.3.ffn_norm.weight": "model.layers.3.post_attention_layernorm.weight",
}


@pytest.mark.parametrize("arch", ["qwen2", "qwen2vl", "qwen3"])
def test_qwen_names_and_no_permutation(arch):
    tensors = {name: torch.randn(8, 4) for name in LLAMA_NAMES}
    tensors.update({"blk.3.attn_q.bias": torch.randn(8), "blk.3.attn_q_norm.weight": torch.randn(4),
                    "blk.3.attn_k_norm.weight": torch.randn(4)})
    mapped = map_text_encoder(tensors, arch, {})
    for old, new in LLAMA_NAMES.items():
        assert mapped[new] is tensors[old]  # qwen is not permuted by llama.cpp: same objects
    assert mapped["model.layers.3.self_attn.q_proj.bias"] is tensors["blk.3.attn_q.bias"]
    assert "model.layers.3.self_attn.q_norm.weight" in mapped and "model.layers.3.self_attn.k_norm.weight" in mapped


@pytest.mark.parametrize("arch", ["llama", "mistral3"])
@pytest.mark.parametrize("quantized", [False, True], ids=["float", "q8_0"])
def test_llama_qk_permutation_is_undone_with_gqa(quantized, arch):
    """llama.cpp's LlamaModel (and its Ministral-3 subclass, arch "mistral3") permutes Q/K rows."""
    n_head, n_kv, head_dim, hidden = 8, 2, 16, 64
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(n_head * head_dim, hidden, generator=generator)
    k = torch.randn(n_kv * head_dim, hidden, generator=generator)
    q_bias = torch.randn(n_head * head_dim, generator=generator)
    stored_q, stored_k = llama_cpp_permute(q, n_head, n_head), llama_cpp_permute(k, n_head, n_kv)
    if quantized:
        stored_q, stored_k = quantize_q8_0(stored_q), quantize_q8_0(stored_k)
    tensors = {"blk.0.attn_q.weight": stored_q, "blk.0.attn_k.weight": stored_k,
               "blk.0.attn_q.bias": llama_cpp_permute(q_bias, n_head, n_head)}
    metadata = {f"{arch}.attention.head_count": n_head, f"{arch}.attention.head_count_kv": n_kv}
    mapped = map_text_encoder(tensors, arch, metadata)
    got_q, got_k = mapped["model.layers.0.self_attn.q_proj.weight"], mapped["model.layers.0.self_attn.k_proj.weight"]
    if quantized:
        assert isinstance(got_q, GGMLTensor) and got_q.qtype == QT.Q8_0
        assert torch.equal(dequantize(got_q), dequantize(quantize_q8_0(q)))  # rows permuted as raw blocks
        assert torch.equal(dequantize(got_k), dequantize(quantize_q8_0(k)))
    else:
        assert torch.equal(got_q, q) and torch.equal(got_k, k)
    assert torch.equal(mapped["model.layers.0.self_attn.q_proj.bias"], q_bias)


def test_per_layer_head_counts():
    k = torch.randn(4 * 8, 16)
    metadata = {"llama.attention.head_count": [8, 8], "llama.attention.head_count_kv": [2, 4]}
    mapped = map_text_encoder({"blk.1.attn_k.weight": llama_cpp_permute(k, 8, 4)}, "llama", metadata)
    assert torch.equal(mapped["model.layers.1.self_attn.k_proj.weight"], k)


def test_missing_head_count_is_a_clear_error():
    with pytest.raises(GGUFError, match="metadata has no 'llama.attention.head_count'"):
        map_text_encoder({"blk.0.attn_q.weight": torch.zeros(8, 4)}, "llama", {})


def test_rows_that_do_not_split_into_heads():
    with pytest.raises(GGUFError, match="6 rows cannot be split into 4 heads"):
        unpermute_qk(torch.zeros(6, 4), 4)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_gemma_norm_names_and_one_plus_w_undone(arch):
    stored = torch.tensor([1.5, 0.75, 1.0])
    tensors = {"blk.0.post_attention_norm.weight": stored, "blk.0.ffn_norm.weight": stored,
               "blk.0.post_ffw_norm.weight": stored, "blk.0.attn_norm.weight": stored,
               "output_norm.weight": stored, "blk.0.attn_q_norm.weight": stored}
    mapped = map_text_encoder(tensors, arch, {})
    assert set(mapped) == {"model.layers.0.post_attention_layernorm.weight",
                           "model.layers.0.pre_feedforward_layernorm.weight",
                           "model.layers.0.post_feedforward_layernorm.weight", "model.layers.0.input_layernorm.weight",
                           "model.norm.weight", "model.layers.0.self_attn.q_norm.weight"}
    for value in mapped.values():
        assert torch.equal(value, torch.tensor([0.5, -0.25, 0.0]))


def test_clip_text_names_with_fc_direction_from_shapes():
    tensors = {"t.token_embd.weight": torch.zeros(10, 8), "t.position_embd.weight": torch.zeros(77, 8),
               "t.blk.0.attn_q.weight": torch.zeros(8, 8), "t.blk.0.attn_out.bias": torch.zeros(8),
               "t.blk.0.ln1.weight": torch.zeros(8), "t.blk.0.ln2.bias": torch.zeros(8),
               "t.blk.0.ffn_down.weight": torch.zeros(32, 8), "t.blk.0.ffn_down.bias": torch.zeros(32),
               "t.blk.0.ffn_up.weight": torch.zeros(8, 32), "t.post_ln.weight": torch.zeros(8),
               "text_projection.weight": torch.zeros(8, 8)}
    assert names(tensors, "clip") == {
        "text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight",
        "text_model.encoder.layers.0.self_attn.q_proj.weight", "text_model.encoder.layers.0.self_attn.out_proj.bias",
        "text_model.encoder.layers.0.layer_norm1.weight", "text_model.encoder.layers.0.layer_norm2.bias",
        "text_model.encoder.layers.0.mlp.fc1.weight", "text_model.encoder.layers.0.mlp.fc1.bias",
        "text_model.encoder.layers.0.mlp.fc2.weight", "text_model.final_layer_norm.weight", "text_projection.weight"}


def test_unknown_architectures_and_unknown_names_pass_through():
    tensors = {"whatever.weight": torch.zeros(1)}
    assert map_text_encoder(tensors, "gemma4", {}) == tensors
    assert names({"rope_freqs.weight": torch.zeros(1)}, "qwen3") == {"rope_freqs.weight"}


def test_qwen25_vl_vision_tower_names_fused_qkv_and_patch_embedding():
    from gguf_loader import map_vision_tower

    generator = torch.Generator().manual_seed(4)
    q, k, v = (quantize_q8_0(torch.randn(64, 64, generator=generator)) for _ in range(3))
    biases = [torch.randn(64, generator=generator) for _ in range(3)]
    slices = [torch.randn(16, 3, 14, 14, dtype=torch.float16, generator=generator) for _ in range(2)]
    tensors = {"v.blk.0.attn_q.weight": q, "v.blk.0.attn_k.weight": k, "v.blk.0.attn_v.weight": v,
               "v.blk.0.attn_q.bias": biases[0], "v.blk.0.attn_k.bias": biases[1], "v.blk.0.attn_v.bias": biases[2],
               "v.blk.0.attn_out.weight": torch.zeros(1), "v.blk.0.ln1.weight": torch.zeros(1),
               "v.blk.0.ffn_gate.bias": torch.zeros(1), "v.post_ln.weight": torch.zeros(1),
               "mm.0.weight": torch.zeros(1), "mm.2.bias": torch.zeros(1),
               "v.patch_embd.weight": slices[0], "v.patch_embd.weight.1": slices[1]}
    mapped = map_vision_tower(tensors)
    assert set(mapped) == {"visual.blocks.0.attn.qkv.weight", "visual.blocks.0.attn.qkv.bias",
                           "visual.blocks.0.attn.proj.weight", "visual.blocks.0.norm1.weight",
                           "visual.blocks.0.mlp.gate_proj.bias", "visual.merger.ln_q.weight",
                           "visual.merger.mlp.0.weight", "visual.merger.mlp.2.bias", "visual.patch_embed.proj.weight"}
    qkv = mapped["visual.blocks.0.attn.qkv.weight"]
    assert isinstance(qkv, GGMLTensor) and qkv.qtype == QT.Q8_0 and qkv.shape == (192, 64)  # fused as raw rows
    assert torch.equal(dequantize(qkv), torch.cat([dequantize(q), dequantize(k), dequantize(v)]))
    assert torch.equal(mapped["visual.blocks.0.attn.qkv.bias"], torch.cat(biases))
    patch = mapped["visual.patch_embed.proj.weight"]
    assert patch.shape == (16, 3, 2, 14, 14) and torch.equal(patch[:, :, 1], slices[1].float())


def test_vision_tower_with_missing_v_is_an_error():
    from gguf_loader import map_vision_tower

    with pytest.raises(GGUFError, match=r"vision block 2: attn_q/k/v.weight incomplete \(found \['k', 'q'\]\)"):
        map_vision_tower({"v.blk.2.attn_q.weight": torch.zeros(2, 2), "v.blk.2.attn_k.weight": torch.zeros(2, 2)})


@pytest.mark.parametrize("value", ["8" * 100_000, [["8" * 100_000]]], ids=["long-string", "nested-long-string"])
def test_hostile_head_counts_are_echoed_bounded(value):
    with pytest.raises(GGUFError, match="must be a positive integer") as caught:
        map_text_encoder({"blk.0.attn_q.weight": torch.zeros(8, 4)}, "llama", {"llama.attention.head_count": value})
    message = str(caught.value)
    assert len(message) < 300 and "\n" not in message


def test_hostile_tensor_names_are_echoed_bounded():
    with pytest.raises(GGUFError, match="rows cannot be split") as caught:
        unpermute_qk(torch.zeros(6, 4), 4, name="blk." + "q" * 100_000)
    assert len(str(caught.value)) < 300
