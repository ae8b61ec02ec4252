"""llama.cpp Gemma 4 text-encoder files -> ComfyUI's Gemma 4 state dict (names, values, tokenizer_json).

The file is written the way llama.cpp's converter writes Gemma 4 (convert_hf_to_gguf.py `Gemma4Model`): tensor
names from gguf-py's own name map for MODEL_ARCH.GEMMA4 (independent of gguf_loader's table), norms unshifted
(its `norm_shift` is 0), `layer_scalar` stored as `layer_output_scale.weight`, the extra `rope_freqs.weight`,
F32/F16/Q8_0 tensors. The layout is an E4B-like model (per-layer inputs) with one global layer that, like the
12B's, has no v_proj.
"""

import gemma4_tokenizer_fixtures as g4
import gguf
import numpy as np
import pytest
import torch

from gguf_loader import GGMLTensor, GGUFError, GGUFFileWriter, detect_architecture, read_gguf, text_encoder_state_dict

HIDDEN, PER_LAYER, LAYERS, VOCAB = 32, 8, 3, 64


def comfy_shapes() -> dict[str, tuple]:
    """ComfyUI's Gemma 4 text-model names (comfy/text_encoders/gemma4.py module tree) at a tiny size."""
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,),
              "model.embed_tokens_per_layer.weight": (VOCAB, LAYERS * PER_LAYER),
              "model.per_layer_model_projection.weight": (LAYERS * PER_LAYER, HIDDEN),
              "model.per_layer_projection_norm.weight": (PER_LAYER,)}
    for i in range(LAYERS):
        head = 64 if i == LAYERS - 1 else 32  # the last layer is global: wider head, K doubles as V
        layer = f"model.layers.{i}."
        shapes.update({layer + "self_attn.q_proj.weight": (head, HIDDEN),
                       layer + "self_attn.k_proj.weight": (head, HIDDEN),
                       layer + "self_attn.o_proj.weight": (HIDDEN, head), layer + "self_attn.q_norm.weight": (head,),
                       layer + "self_attn.k_norm.weight": (head,), layer + "mlp.gate_proj.weight": (64, HIDDEN),
                       layer + "mlp.up_proj.weight": (64, HIDDEN), layer + "mlp.down_proj.weight": (HIDDEN, 64),
                       layer + "per_layer_input_gate.weight": (PER_LAYER, HIDDEN),
                       layer + "per_layer_projection.weight": (HIDDEN, PER_LAYER), layer + "layer_scalar": (1,)})
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm", "post_per_layer_input_norm"):
            shapes[f"{layer}{norm}.weight"] = (HIDDEN,)
        if head == 32:
            shapes[layer + "self_attn.v_proj.weight"] = (head, HIDDEN)
    return shapes


def write_llama_cpp_gemma4(path, metadata: dict | None = None, extra: dict | None = None) -> dict[str, torch.Tensor]:
    """The GGUF file; returns ComfyUI name -> the float32 values llama.cpp stored."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA4, LAYERS)
    generator = torch.Generator().manual_seed(4)
    writer = GGUFFileWriter(path, architecture="gemma4")
    for key, value in (metadata or {}).items():
        writer.add_metadata(key, value)
    expected = {}
    for name, shape in comfy_shapes().items():
        value = (1 if "norm" in name else 0) + 0.1 * torch.randn(shape, generator=generator)
        hf_name = name if name.endswith((".weight", ".bias")) else name + ".weight"  # filter_tensors' suffix
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight",))
        assert gguf_name is not None, name
        if value.dim() == 2 and shape[1] % 32 == 0 and "embed" not in name:
            blocks = gguf.quants.quantize(value.numpy(), gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_name, torch.from_numpy(blocks), "Q8_0", shape=shape)
            value = torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q8_0)).float()
        elif value.dim() == 2:
            value = value.half()
            writer.add_tensor(gguf_name, value)
        else:
            writer.add_tensor(gguf_name, value)
        expected[name] = value.float()
    writer.add_tensor("rope_freqs.weight", torch.tensor([1.0] * 16 + [1e30] * 16))
    for name, value in (extra or {}).items():
        writer.add_tensor(name, value)
    writer.write()
    return expected


def test_names_and_values_are_comfyuis(tmp_path):
    path = tmp_path / "gemma4.gguf"
    expected = write_llama_cpp_gemma4(path)
    gguf_file = read_gguf(path)
    state_dict = text_encoder_state_dict(gguf_file)
    assert set(state_dict) == set(expected)  # rope_freqs dropped, no tokenizer metadata -> no tokenizer_json
    for name, value in expected.items():
        ours = state_dict[name]
        ours = ours.dequantize(torch.float32) if isinstance(ours, GGMLTensor) else ours.float()
        assert ours.shape == value.shape and torch.equal(ours, value), name  # norms not shifted


def test_tokenizer_travels_as_tokenizer_json(tmp_path):
    pytest.importorskip("tokenizers")
    path = tmp_path / "gemma4.gguf"
    write_llama_cpp_gemma4(path, g4.gemma4_metadata(g4.train_gemma4(vocab_size=400)))
    state_dict = text_encoder_state_dict(read_gguf(path))
    assert state_dict["tokenizer_json"].dtype == torch.uint8 and b'"type":"BPE"' in bytes(
        state_dict["tokenizer_json"].tolist())


def test_names_alone_tell_gemma4():
    names = ["blk.0.post_ffw_norm.weight", "blk.0.attn_q_norm.weight", "blk.0.layer_output_scale.weight"]
    assert detect_architecture({}, names).name == "gemma4"
    assert detect_architecture({}, names[:2]).name == "gemma3"


@pytest.mark.parametrize("expert", ["blk.1.ffn_gate_up_exps.weight", "blk.0.ffn_gate_inp.weight"])
def test_the_mixture_of_experts_model_is_a_clear_error(tmp_path, expert):
    path = tmp_path / "gemma4-26b-a4b.gguf"
    write_llama_cpp_gemma4(path, extra={expert: torch.from_numpy(np.zeros((4, 32), dtype=np.float32))})
    with pytest.raises(GGUFError, match=r"mixture-of-experts model \(26B-A4B\); ComfyUI's Gemma 4 text encoders "
                                        r"are the dense") as raised:
        text_encoder_state_dict(read_gguf(path))
    assert str(raised.value).startswith(str(path)) and expert in str(raised.value)
