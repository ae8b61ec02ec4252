"""llama.cpp gpt-oss files -> ComfyUI 0.33's GPT-OSS (Lens) encoder state dict, and the GGUF expert-bank layer.

The files are written here the way llama.cpp's convert_hf_to_gguf.py GptOssModel writes them (restated below):
ComfyUI's interleaved gate/up bank [E, 2I, H] (row 2i gate, 2i+1 up) is split into ffn_gate_exps / ffn_up_exps
(or fused as ffn_gate_up_exps: gate rows, then up rows), biases likewise; experts in MXFP4 quantized by gguf-py.
Values are compared with gguf-py's own dequantization of the stored blocks.
"""

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gguf_loader import GGMLTensor, GGUFError, GGUFFileWriter, read_gguf, text_encoder_state_dict
from gguf_loader.encoders.gpt_oss import interleave_rows, map_gpt_oss
from gguf_loader.moe_ops import make_moe_experts

E, I, H, HEADS = 4, 32, 64, 4  # noqa: E741 - experts, intermediate, hidden, heads (ComfyUI's names)
MXFP4 = gguf.GGMLQuantizationType.MXFP4


def name(tensor: gguf.MODEL_TENSOR, block: int, kind: str = "weight") -> str:
    return f"{gguf.TENSOR_NAMES[tensor].format(bid=block)}.{kind}"


def comfy_values(seed: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: 0.5 * torch.randn(*shape, generator=g)  # noqa: E731
    return {"gate_up": r(E, 2 * I, H), "gate_up_bias": r(E, 2 * I), "down": r(E, H, I), "down_bias": r(E, H),
            "router": r(E, H), "router_bias": r(E), "sinks": r(HEADS), "q": r(HEADS * 16, H), "norm": 1 + r(H),
            "embed": r(50, H), "lm_head": r(50, H)}


def quantized(values: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """gguf-py MXFP4 blocks, and gguf-py's dequantization of them (what the file holds)."""
    blocks = gguf.quants.quantize(values.numpy(), MXFP4)
    return blocks, torch.from_numpy(gguf.quants.dequantize(blocks, MXFP4).copy())


def write_gpt_oss(path, values: dict, fused: bool = False, up_qtype=MXFP4) -> dict:
    """A one-block llama.cpp gpt-oss file; returns what ComfyUI must receive (gate/up as stored, re-interleaved)."""
    T = gguf.MODEL_TENSOR
    writer = GGUFFileWriter(path, architecture="gpt-oss")
    gate, up = values["gate_up"][:, ::2], values["gate_up"][:, 1::2]  # GptOssModel.modify_tensors: ::2 / 1::2
    gate_bias, up_bias = values["gate_up_bias"][..., ::2], values["gate_up_bias"][..., 1::2]
    if fused:
        blocks, seen = quantized(torch.cat([gate, up], dim=1))
        writer.add_tensor(name(T.FFN_GATE_UP_EXP, 0), torch.from_numpy(blocks), "MXFP4", shape=(E, 2 * I, H))
        writer.add_tensor(name(T.FFN_GATE_UP_EXP, 0, "bias"), torch.cat([gate_bias, up_bias], dim=-1))
        seen_gate, seen_up = seen[:, :I], seen[:, I:]
    else:
        gate_blocks, seen_gate = quantized(gate.contiguous())
        writer.add_tensor(name(T.FFN_GATE_EXP, 0), torch.from_numpy(gate_blocks), "MXFP4", shape=(E, I, H))
        if up_qtype == MXFP4:
            up_blocks, seen_up = quantized(up.contiguous())
            writer.add_tensor(name(T.FFN_UP_EXP, 0), torch.from_numpy(up_blocks), "MXFP4", shape=(E, I, H))
        elif up_qtype == "Q8_0":
            up_blocks = gguf.quants.quantize(up.contiguous().numpy(), gguf.GGMLQuantizationType.Q8_0)
            seen_up = torch.from_numpy(gguf.quants.dequantize(up_blocks, gguf.GGMLQuantizationType.Q8_0).copy())
            writer.add_tensor(name(T.FFN_UP_EXP, 0), torch.from_numpy(up_blocks), "Q8_0", shape=(E, I, H))
        else:
            seen_up = up.half().float()
            writer.add_tensor(name(T.FFN_UP_EXP, 0), up.half().contiguous())
        writer.add_tensor(name(T.FFN_GATE_EXP, 0, "bias"), gate_bias.contiguous())
        writer.add_tensor(name(T.FFN_UP_EXP, 0, "bias"), up_bias.contiguous())
    down_blocks, seen_down = quantized(values["down"])
    writer.add_tensor(name(T.FFN_DOWN_EXP, 0), torch.from_numpy(down_blocks), "MXFP4", shape=(E, H, I))
    writer.add_tensor(name(T.FFN_DOWN_EXP, 0, "bias"), values["down_bias"])
    writer.add_tensor(name(T.FFN_GATE_INP, 0), values["router"])
    writer.add_tensor(name(T.FFN_GATE_INP, 0, "bias"), values["router_bias"])
    writer.add_tensor(name(T.ATTN_SINKS, 0), values["sinks"])
    writer.add_tensor(name(T.ATTN_Q, 0), values["q"].half())
    writer.add_tensor(name(T.ATTN_NORM, 0), values["norm"])
    writer.add_tensor(name(T.ATTN_POST_NORM, 0), values["norm"])
    writer.add_tensor("token_embd.weight", values["embed"], "Q8_0")
    writer.add_tensor("output_norm.weight", values["norm"])
    writer.add_tensor("output.weight", values["lm_head"], "Q8_0")
    writer.write()
    expected = torch.stack([seen_gate, seen_up], dim=2).reshape(E, 2 * I, H)
    return {"gate_up": expected, "gate_up_bias": values["gate_up_bias"], "down": seen_down}


@pytest.mark.parametrize("fused", [False, True], ids=["split", "fused"])
def test_gate_up_banks_are_reinterleaved_without_dequantizing(tmp_path, fused):
    values = comfy_values()
    expected = write_gpt_oss(tmp_path / "g.gguf", values, fused=fused)
    state_dict = map_gpt_oss(read_gguf(tmp_path / "g.gguf").tensors)
    gate_up = state_dict["layers.0.mlp.experts.gate_up_proj.weight"]
    assert isinstance(gate_up, GGMLTensor) and gate_up.qtype == MXFP4 and tuple(gate_up.shape) == (E, 2 * I, H)
    assert torch.equal(gate_up.dequantize(torch.float32), expected["gate_up"])
    assert torch.equal(state_dict["layers.0.mlp.experts.gate_up_proj.bias"], expected["gate_up_bias"])
    assert torch.equal(state_dict["layers.0.mlp.experts.down_proj.weight"].dequantize(), expected["down"])
    # The interleave undoes llama.cpp's split: ComfyUI's gate is rows ::2 of the bank.
    assert torch.equal(gate_up.dequantize()[:, ::2], quantized(values["gate_up"][:, ::2].contiguous())[1])


def test_names_and_plain_parameters(tmp_path):
    values = comfy_values()
    write_gpt_oss(tmp_path / "g.gguf", values)
    state_dict = map_gpt_oss(read_gguf(tmp_path / "g.gguf").tensors)
    assert set(state_dict) == {
        "embed_tokens.weight", "norm.weight", "layers.0.input_layernorm.weight",
        "layers.0.post_attention_layernorm.weight", "layers.0.self_attn.q_proj.weight", "layers.0.self_attn.sinks",
        "layers.0.mlp.router.weight", "layers.0.mlp.router.bias", "layers.0.mlp.experts.gate_up_proj.weight",
        "layers.0.mlp.experts.gate_up_proj.bias", "layers.0.mlp.experts.down_proj.weight",
        "layers.0.mlp.experts.down_proj.bias"}  # no lm_head: ComfyUI's encoder has none
    assert torch.equal(state_dict["layers.0.self_attn.sinks"], values["sinks"])
    assert torch.equal(state_dict["layers.0.mlp.router.weight"], values["router"])


def test_quantized_router_and_sinks_become_plain_tensors():
    blocks = gguf.quants.quantize(np.linspace(-1, 1, E * H, dtype=np.float32).reshape(E, H), 8)
    router = GGMLTensor(torch.from_numpy(blocks), "Q8_0", (E, H))
    state_dict = map_gpt_oss({"blk.0.ffn_gate_inp.weight": router})
    assert type(state_dict["layers.0.mlp.router.weight"]) is torch.Tensor
    assert torch.equal(state_dict["layers.0.mlp.router.weight"], torch.from_numpy(gguf.quants.dequantize(blocks, 8)))


@pytest.mark.parametrize("up_qtype", ["F16", "Q8_0"])
def test_parts_of_different_types_are_dequantized(tmp_path, up_qtype):
    values = comfy_values()
    expected = write_gpt_oss(tmp_path / "g.gguf", values, up_qtype=up_qtype)
    gate_up = map_gpt_oss(read_gguf(tmp_path / "g.gguf").tensors)["layers.0.mlp.experts.gate_up_proj.weight"]
    assert type(gate_up) is torch.Tensor and gate_up.dtype == torch.float32
    assert torch.equal(gate_up, expected["gate_up"])


def test_plain_interleave_of_biases():
    gate, up = torch.arange(6.0).reshape(2, 3), -torch.arange(6.0).reshape(2, 3)
    assert interleave_rows(gate, up).tolist() == [[0, 0, 1, -1, 2, -2], [3, -3, 4, -4, 5, -5]]


def test_text_encoder_state_dict_has_the_tokenizer_json(tmp_path):
    import o200k_fixtures as ox

    pytest.importorskip("tokenizers")
    path = tmp_path / "g.gguf"
    writer = GGUFFileWriter(path, architecture="gpt-oss")
    for key, value in ox.gguf_metadata(ox.train_o200k_tokenizer(400)).items():
        writer.add_metadata(key, value)
    writer.add_tensor(name(gguf.MODEL_TENSOR.ATTN_SINKS, 0), torch.zeros(HEADS))
    writer.write()
    state_dict = text_encoder_state_dict(read_gguf(path))
    assert set(state_dict) == {"layers.0.self_attn.sinks", "tokenizer_json"}
    assert state_dict["tokenizer_json"].dtype == torch.uint8


ERRORS = {
    "up missing": ({"blk.0.ffn_gate_exps.weight": torch.zeros(E, I, H)}, "ffn_gate_exps and ffn_up_exps must both"),
    "shapes differ": ({"blk.0.ffn_gate_exps.weight": torch.zeros(E, I, H),
                       "blk.0.ffn_up_exps.weight": torch.zeros(E, I + 1, H)}, "do not pair as expert banks"),
    "fused and split": ({"blk.0.ffn_gate_up_exps.weight": torch.zeros(E, 2 * I, H),
                         "blk.0.ffn_up_exps.weight": torch.zeros(E, I, H)}, "both the fused"),
    "odd fused rows": ({"blk.0.ffn_gate_up_exps.weight": torch.zeros(E, 7, H)}, r"odd number of rows \(7\)"),
    "unknown part": ({"blk.0.ffn_mystery.weight": torch.zeros(2)}, "block part 'ffn_mystery' has no ComfyUI"),
    "not a block": ({"v.patch_embd.weight": torch.zeros(2)}, "is not part of a gpt-oss text encoder"),
}


@pytest.mark.parametrize("tensors,message", ERRORS.values(), ids=ERRORS.keys())
def test_malformed_files_are_one_clear_error(tensors, message):
    with pytest.raises(GGUFError, match=message) as error:
        map_gpt_oss(tensors, "m.gguf")
    assert str(error.value).startswith("m.gguf: ") and "\n" not in str(error.value)


# -- the expert-bank layer ------------------------------------------------------------------------------------

@pytest.fixture
def bank(tmp_path):
    values = comfy_values()
    write_gpt_oss(tmp_path / "g.gguf", values)
    state_dict = map_gpt_oss(read_gguf(tmp_path / "g.gguf").tensors)
    layer = make_moe_experts()(num_experts=E, in_features=H, out_features=2 * I, bias=True, dtype=torch.float32)
    layer.load_state_dict({"weight": state_dict["layers.0.mlp.experts.gate_up_proj.weight"],
                           "bias": state_dict["layers.0.mlp.experts.gate_up_proj.bias"]}, assign=True)
    return layer, state_dict


def test_expert_linear_equals_the_dequantized_expert(bank):
    layer, state_dict = bank
    weight = state_dict["layers.0.mlp.experts.gate_up_proj.weight"].dequantize()
    bias = state_dict["layers.0.mlp.experts.gate_up_proj.bias"]
    x = torch.randn(5, H, generator=torch.Generator().manual_seed(1))
    with layer.bank_resident(x) as resident:
        inside = [resident.expert_linear(x, e) for e in range(E)]
    for e in range(E):
        expected = F.linear(x, weight[e], bias[e])
        assert torch.equal(inside[e], expected) and torch.equal(layer.expert_linear(x, e), expected)
    assert layer._resident is None


def test_weight_functions_see_the_whole_dequantized_bank(bank):
    layer, state_dict = bank
    seen = []
    layer.weight_function = [lambda w: seen.append(tuple(w.shape)) or w * 2]
    x = torch.randn(3, H)
    expected = F.linear(x, 2 * state_dict["layers.0.mlp.experts.gate_up_proj.weight"].dequantize()[1],
                        state_dict["layers.0.mlp.experts.gate_up_proj.bias"][1])
    assert torch.equal(layer.expert_linear(x, 1), expected) and seen == [(E, 2 * I, H)]


def test_a_bank_never_loaded_is_a_clear_error():
    layer = make_moe_experts()(num_experts=E, in_features=H, out_features=2 * I)
    with pytest.raises(RuntimeError, match="weight was never loaded"):
        layer.expert_linear(torch.zeros(1, H), 0)


def test_a_file_without_general_architecture_is_recognised_by_its_sinks_and_router():
    from gguf_loader.arch import guess_from_names

    names = ["token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_sinks.weight", "blk.0.ffn_gate_inp.weight"]
    assert guess_from_names(names) == "gpt-oss"
