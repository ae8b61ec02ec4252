"""Our GGUF text-encoder loading against city96/ComfyUI-GGUF, the pack most ComfyUI users run.

Files are written here the way llama.cpp writes each family (its names, Q/K permutation, Gemma's 1 + w
norms, split vision Q/K/V), small, in F32/F16/Q8_0. The reference (unpacked at run time from the shared
folder by reference_pack.py) loads them inside a real ComfyUI interpreter (tests/comfyui/run_reference.py);
its state dicts (every tensor dequantized to float32 with float32 math) and tokenizers are compared with ours:
same keys, same shapes, bit-identical values, same token ids. Where we differ on purpose, the test states the
difference and checks that ours is the correct one (docs/gguf_text_encoders.md lists them).
"""

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import tokenizer_fixtures as fx
import torch
from comfyui_harness import REPO
from safetensors.torch import load_file

from gguf_loader import (
    EncoderPart,
    attach_vision_towers,
    dequantize,
    read_gguf,
    tekken_model,
    text_encoder_state_dict,
    vision_projector_state_dict,
    write_gguf,
)

pytestmark = pytest.mark.comfyui
spm = pytest.importorskip("sentencepiece")

HIDDEN, FFN, VOCAB = 64, 128, 160


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.1


def llama_cpp_permute(weights: torch.Tensor, heads: int) -> torch.Tensor:
    """convert_hf_to_gguf.py LlamaModel.permute (n_head already replaced by n_head_kv for K)."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2) \
        .reshape(weights.shape)


@dataclass
class Case:
    name: str
    architecture: str
    tensors: dict  # llama.cpp name -> float tensor
    qtypes: dict
    metadata: dict
    truth: dict  # ComfyUI name -> the value ComfyUI must see (float32), where it is known independently


def t5_case(name: str, architecture: str, gated: bool, bias_every_block: bool) -> Case:
    tensors, qtypes, truth, seed = {}, {}, {}, 0

    def add(gguf_name, comfy_name, shape, qtype=None):
        nonlocal seed
        seed += 1
        value = randn(*shape, seed=seed) + (1 if gguf_name.endswith("norm.weight") else 0)
        tensors[gguf_name] = value.half() if qtype == "F16" else value
        if qtype == "Q8_0":
            qtypes[gguf_name] = "Q8_0"
        truth[comfy_name] = value.half().float() if qtype == "F16" else value if qtype is None else None

    add("token_embd.weight", "shared.weight", (VOCAB, HIDDEN), "Q8_0")
    add("enc.output_norm.weight", "encoder.final_layer_norm.weight", (HIDDEN,))
    for i in range(2):
        prefix, block = f"enc.blk.{i}.", f"encoder.block.{i}.layer."
        for part in "qkvo":
            add(f"{prefix}attn_{part}.weight", f"{block}0.SelfAttention.{part}.weight", (HIDDEN, HIDDEN),
                "Q8_0" if part in "qv" else "F16")
        if i == 0 or bias_every_block:
            add(f"{prefix}attn_rel_b.weight", f"{block}0.SelfAttention.relative_attention_bias.weight", (32, 4))
        add(f"{prefix}attn_norm.weight", f"{block}0.layer_norm.weight", (HIDDEN,))
        add(f"{prefix}ffn_norm.weight", f"{block}1.layer_norm.weight", (HIDDEN,))
        add(f"{prefix}ffn_up.weight", f"{block}1.DenseReluDense.{'wi_1' if gated else 'wi'}.weight", (FFN, HIDDEN),
            "Q8_0")
        add(f"{prefix}ffn_down.weight", f"{block}1.DenseReluDense.wo.weight", (HIDDEN, FFN), "F16")
        if gated:
            add(f"{prefix}ffn_gate.weight", f"{block}1.DenseReluDense.wi_0.weight", (FFN, HIDDEN), "Q8_0")
    return Case(name, architecture, tensors, qtypes, {}, {k: v for k, v in truth.items() if v is not None})


def llama_case(name: str, architecture: str, heads: int, kv_heads: int, head_dim: int, seed: int = 100) -> Case:
    """Q/K stored F16 (exact values) permuted as llama.cpp does for "llama"; one Q8_0 V and FFN."""
    q, k = randn(heads * head_dim, HIDDEN, seed=seed), randn(kv_heads * head_dim, HIDDEN, seed=seed + 1)
    permuted = architecture in ("llama", "mistral3")
    tensors = {
        "token_embd.weight": randn(VOCAB, HIDDEN, seed=seed + 2),
        "output_norm.weight": 1 + randn(HIDDEN, seed=seed + 3),
        "blk.0.attn_norm.weight": 1 + randn(HIDDEN, seed=seed + 4),
        "blk.0.attn_q.weight": (llama_cpp_permute(q, heads) if permuted else q).half(),
        "blk.0.attn_k.weight": (llama_cpp_permute(k, kv_heads) if permuted else k).half(),
        "blk.0.attn_v.weight": randn(kv_heads * head_dim, HIDDEN, seed=seed + 5),
        "blk.0.attn_output.weight": randn(HIDDEN, heads * head_dim, seed=seed + 6).half(),
        "blk.0.ffn_gate.weight": randn(FFN, HIDDEN, seed=seed + 7),
        "blk.0.ffn_up.weight": randn(FFN, HIDDEN, seed=seed + 8).half(),
        "blk.0.ffn_down.weight": randn(HIDDEN, FFN, seed=seed + 9),
        "blk.0.ffn_norm.weight": 1 + randn(HIDDEN, seed=seed + 10),
    }
    if architecture in ("qwen2", "qwen2vl"):
        tensors.update({f"blk.0.attn_{p}.bias": randn(n * head_dim, seed=seed + 11 + i)
                        for i, (p, n) in enumerate((("q", heads), ("k", kv_heads), ("v", kv_heads)))})
    if architecture in ("qwen3", "qwen3vl", "gemma3"):
        tensors.update({"blk.0.attn_q_norm.weight": 1 + randn(head_dim, seed=seed + 14),
                        "blk.0.attn_k_norm.weight": 1 + randn(head_dim, seed=seed + 15)})
    metadata = {f"{architecture}.attention.head_count": heads, f"{architecture}.attention.head_count_kv": kv_heads}
    if architecture in ("gemma2", "gemma3"):
        tensors.update({"blk.0.post_attention_norm.weight": 1 + randn(HIDDEN, seed=seed + 16),
                        "blk.0.post_ffw_norm.weight": 1 + randn(HIDDEN, seed=seed + 17)})
        metadata.update(GEMMA_VOCABULARY)
    qtypes = {"blk.0.attn_v.weight": "Q8_0", "blk.0.ffn_gate.weight": "Q8_0", "blk.0.ffn_down.weight": "Q8_0"}
    truth = {"model.layers.0.self_attn.q_proj.weight": q.half().float(),
             "model.layers.0.self_attn.k_proj.weight": k.half().float()}
    if architecture in ("gemma2", "gemma3"):  # llama.cpp stores Gemma's norms as 1 + w; ComfyUI adds the 1 itself
        truth["model.layers.0.post_feedforward_layernorm.weight"] = tensors["blk.0.post_ffw_norm.weight"] - 1
    return Case(name, architecture, tensors, qtypes, metadata, truth)


# The smallest Gemma-layout SentencePiece vocabulary (a Gemma file without one cannot tokenize in ComfyUI).
GEMMA_VOCABULARY = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["<pad>", "<eos>", "<bos>", "<unk>", "a"],
                    "tokenizer.ggml.scores": [0.0] * 5, "tokenizer.ggml.token_type": [3, 3, 3, 2, 1],
                    "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1}


def mmproj_tensors(qtype: str | None, width: int = 32, seed: int = 300) -> tuple[dict, dict]:
    tensors, qtypes = {}, {}
    for part in ("attn_q", "attn_k", "attn_v", "attn_out", "ffn_up", "ffn_gate", "ffn_down"):
        tensors[f"v.blk.0.{part}.weight"] = randn(width, width, seed=seed + len(tensors))
        tensors[f"v.blk.0.{part}.bias"] = randn(width, seed=seed + 50 + len(tensors))
        if qtype:
            qtypes[f"v.blk.0.{part}.weight"] = qtype
    tensors.update({"v.blk.0.ln1.weight": 1 + randn(width, seed=seed + 90),
                    "v.blk.0.ln2.weight": 1 + randn(width, seed=seed + 91),
                    "v.patch_embd.weight": randn(width, 3, 14, 14, seed=seed + 92).half(),
                    "v.patch_embd.weight.1": randn(width, 3, 14, 14, seed=seed + 93).half(),
                    "v.post_ln.weight": 1 + randn(width, seed=seed + 94),
                    "mm.0.weight": randn(4 * width, 4 * width, seed=seed + 95), "mm.0.bias": randn(4 * width, seed=96),
                    "mm.2.weight": randn(HIDDEN, 4 * width, seed=seed + 97), "mm.2.bias": randn(HIDDEN, seed=98)})
    if not qtype:
        tensors = {k: v.half() if v.dim() == 2 else v for k, v in tensors.items()}
    return tensors, qtypes


STATE_DICT_CASES = [
    t5_case("t5xxl_gated", "t5encoder", gated=True, bias_every_block=False),
    t5_case("umt5_gated", "t5", gated=True, bias_every_block=True),
    t5_case("t5_ungated", "t5encoder", gated=False, bias_every_block=False),
    llama_case("llama_32_8", "llama", heads=32, kv_heads=8, head_dim=2),
    llama_case("llama_16_4", "llama", heads=16, kv_heads=4, head_dim=4),
    llama_case("qwen3", "qwen3", heads=4, kv_heads=2, head_dim=16),
    llama_case("qwen3vl", "qwen3vl", heads=4, kv_heads=2, head_dim=16),
    llama_case("qwen2", "qwen2", heads=4, kv_heads=2, head_dim=16),
    llama_case("gemma3", "gemma3", heads=4, kv_heads=2, head_dim=16),
    llama_case("gemma2", "gemma2", heads=4, kv_heads=2, head_dim=16),
    llama_case("mistral3", "mistral3", heads=8, kv_heads=2, head_dim=8),
    llama_case("Qwen2.5-VL-7B-Instruct-Q8_0", "qwen2vl", heads=4, kv_heads=2, head_dim=16),
    llama_case("Qwen2.5-VL-3B-Q4_K_M", "qwen2vl", heads=4, kv_heads=2, head_dim=16),
]
# The mmproj files sit beside their text encoders under the names the reference looks for.
MMPROJ = {"Qwen2.5-VL-7B-Instruct-Q8_0": ("mmproj-Qwen2.5-VL-7B-Instruct-F16", None),
          "Qwen2.5-VL-3B-Q4_K_M": ("Qwen2.5-VL-3B-mmproj-Q8_0", "Q8_0")}


@dataclass
class ReferenceRun:
    folder: Path
    report: dict
    originals: dict  # tokenizer case -> original token ids

    def state_dict(self, name: str) -> dict:
        return load_file(str(self.folder / f"{name}.safetensors"))


@pytest.fixture(scope="module")
def reference(comfy_install, reference_gguf_pack, tmp_path_factory) -> ReferenceRun:
    if reference_gguf_pack is None:
        pytest.skip("no ComfyUI-GGUF snapshot in ../shared/reference")
    work = tmp_path_factory.mktemp(f"reference-{comfy_install.version}")
    pack = reference_gguf_pack
    files = work / "text_encoders"
    files.mkdir()
    plan = [_write_state_dict_case(case, files) for case in STATE_DICT_CASES]
    tokenizer_plan, originals = _tokenizer_cases(files)
    plan += tokenizer_plan
    (work / "plan.json").write_text(json.dumps(plan))
    run = subprocess.run([comfy_install.python, str(REPO / "tests" / "comfyui" / "run_reference.py"),
                          "--comfyui", str(comfy_install.path), "--reference", str(pack),
                          "--plan", str(work / "plan.json"), "--out", str(work)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return ReferenceRun(work, json.loads((work / "report.json").read_text()), originals)


def _write_state_dict_case(case: Case, folder: Path) -> dict:
    path = folder / f"{case.name}.gguf"
    write_gguf(path, case.tensors, case.metadata, case.architecture, case.qtypes)
    if case.name in MMPROJ:
        mmproj_name, qtype = MMPROJ[case.name]
        tensors, qtypes = mmproj_tensors(qtype)
        write_gguf(folder / f"{mmproj_name}.gguf", tensors,
                   {"general.type": "mmproj", "clip.projector_type": "qwen2.5vl_merger"}, "clip", qtypes)
    return {"name": case.name, "kind": "state_dict", "path": str(path)}


def _tokenizer_cases(folder: Path) -> tuple[list, dict]:
    plan, originals = [], {}
    for byte_fallback in (True, False):
        name = f"umt5_tokenizer_{'byte' if byte_fallback else 'plain'}"
        original = fx.train_sentencepiece("unigram", byte_fallback=byte_fallback)
        fx.write_tokenizer_gguf(folder / f"{name}.gguf", fx.t5_metadata(original, original.get_piece_size() + 5))
        plan.append({"name": name, "kind": "umt5_tokenizer", "path": str(folder / f"{name}.gguf"),
                     "prompts": fx.PROMPTS})
        originals[name] = [original.encode(text, add_eos=True) for text in fx.PROMPTS]
    tekken = fx.tekken_json(fx.learn_tekken_ranks())
    fx.write_tokenizer_gguf(folder / "mistral.gguf", fx.tekken_metadata(tekken), "llama")
    (folder / "original_tekken.json").write_bytes(tekken)
    (folder / "our_tekken.json").write_bytes(tekken_model(read_gguf(folder / "mistral.gguf").metadata, "mistral"))
    plan.append({"name": "tekken", "kind": "tekken", "prompts": fx.PROMPTS + TEKKEN_TEMPLATE,
                 "payloads": {"original": str(folder / "original_tekken.json"),
                              "ours": str(folder / "our_tekken.json"),
                              "reference": f"reference:{folder / 'mistral.gguf'}"}})
    return plan, originals


TEKKEN_TEMPLATE = ["[SYSTEM_PROMPT]You are an AI.[/SYSTEM_PROMPT][INST]a corgi at sunset[/INST]"]


def ours(case: Case, folder: Path) -> dict:
    state_dict = text_encoder_state_dict(read_gguf(folder / "text_encoders" / f"{case.name}.gguf"))
    return {k: v if k in ("spiece_model", "tekken_model") else dequantize(v, torch.float32)
            for k, v in state_dict.items()}


def assert_same(ours_sd: dict, reference_sd: dict, skip: tuple = ()) -> None:
    skip = set(skip) | SPLIT_VISION_QKV
    assert set(ours_sd) - skip == set(reference_sd) - skip
    for key in set(ours_sd) - set(skip):
        assert ours_sd[key].shape == reference_sd[key].shape, key
        assert torch.equal(ours_sd[key], reference_sd[key]), key


# The reference fuses the vision tower's Q/K/V into attn.qkv but also leaves the split tensors in the state dict
# (ComfyUI ignores them as unexpected keys); ours holds only the fused ones.
SPLIT_VISION_QKV = {f"visual.blocks.0.attn_{p}.{kind}" for p in "qkv" for kind in ("weight", "bias")}


def reference_result(reference: ReferenceRun, name: str) -> dict:
    """The reference's result for a tokenizer case; a ComfyUI venv without protobuf cannot run it at all (CI
    installs requirements-test.txt into every ComfyUI venv, so there it is a failure, not a skip)."""
    import os

    result = reference.report[name]
    if "protobuf are installed" in result.get("error", "") and os.environ.get("CI") != "true":
        pytest.skip("this ComfyUI venv has no protobuf (scripts/setup_comfyui.sh installs it)")
    return result


def case_named(name: str) -> Case:
    return next(c for c in STATE_DICT_CASES if c.name == name)


@pytest.mark.parametrize("name", ["t5xxl_gated", "umt5_gated", "llama_32_8", "qwen3", "qwen3vl"])
def test_same_state_dict_as_the_reference(reference, name):
    """Same keys, shapes and bit-identical float32 values (the reference dequantized with float32 math)."""
    case = case_named(name)
    ours_sd = ours(case, reference.folder)
    assert_same(ours_sd, reference.state_dict(name))
    for key, value in case.truth.items():
        assert torch.equal(ours_sd[key], value), key


def test_ungated_t5_feed_forward_is_wi(reference):
    """Difference: T5 without a gate (T5-XXL "old", Cosmos) names its input projection `wi`; the reference calls it
    `wi_1` (the gated name), so ComfyUI would detect a gated T5 and miss wi_0."""
    ours_sd, reference_sd = ours(case_named("t5_ungated"), reference.folder), reference.state_dict("t5_ungated")
    renamed = {k.replace("DenseReluDense.wi_1.", "DenseReluDense.wi."): v for k, v in reference_sd.items()}
    assert_same(ours_sd, renamed)
    assert "encoder.block.0.layer.1.DenseReluDense.wi.weight" in ours_sd
    assert "encoder.block.0.layer.1.DenseReluDense.wi_1.weight" in reference_sd


def test_llama_head_counts_come_from_the_file(reference):
    """Difference: the reference undoes llama.cpp's Q/K permutation assuming 32/8 heads (Llama-3-8B, Mistral);
    with 16/4 heads its Q and K rows are scrambled. Ours reads the head counts from the metadata."""
    case = case_named("llama_16_4")
    ours_sd, reference_sd = ours(case, reference.folder), reference.state_dict("llama_16_4")
    qk = ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight")
    assert_same(ours_sd, reference_sd, skip=qk)
    for key in qk:
        assert torch.equal(ours_sd[key], case.truth[key]), key
        assert not torch.equal(reference_sd[key], case.truth[key]), key


@pytest.mark.parametrize("name", ["gemma2", "gemma3", "qwen2", "mistral3"])
def test_architectures_the_reference_rejects(reference, name):
    """Difference: the reference accepts only t5, t5encoder, llama, qwen2vl, qwen3, qwen3vl text encoders."""
    assert "Unexpected text model architecture type" in reference.report[name]["error"]
    case = case_named(name)
    ours_sd = ours(case, reference.folder)
    for key, value in case.truth.items():
        assert torch.equal(ours_sd[key], value), key


def test_qwen25_vl_with_an_f16_mmproj(reference):
    """The text encoder and its vision tower (found by the reference beside the file, joined by us when the mmproj
    is loaded as the second file) are identical, F16 Q/K/V fused exactly in both. Difference: the reference casts
    the float32 Q/K/V biases to float16 before fusing them; ours keeps the file's float32 values."""
    name = "Qwen2.5-VL-7B-Instruct-Q8_0"
    ours_sd = ours_with_mmproj(name, reference.folder)
    reference_sd = reference.state_dict(name)
    bias = "visual.blocks.0.attn.qkv.bias"
    assert_same(ours_sd, reference_sd, skip=(bias,))
    assert "visual.blocks.0.attn.qkv.weight" in ours_sd and SPLIT_VISION_QKV <= set(reference_sd)
    _check_fused_bias(reference, name, ours_sd[bias], reference_sd[bias])


def _check_fused_bias(reference, name, ours_bias, reference_bias):
    mmproj = read_gguf(reference.folder / "text_encoders" / f"{MMPROJ[name][0]}.gguf").tensors
    exact = torch.cat([mmproj[f"v.blk.0.attn_{p}.bias"] for p in "qkv"])
    assert torch.equal(ours_bias, exact)
    assert torch.equal(reference_bias, exact.half().float()) and not torch.equal(reference_bias, exact)


def test_qwen25_vl_with_a_quantized_mmproj(reference):
    """Difference: with a quantized mmproj the reference dequantizes Q/K/V to bfloat16 before fusing them (and the
    biases to float16); ours fuses the Q8_0 blocks themselves, so the fused weight is exactly the file's values."""
    name = "Qwen2.5-VL-3B-Q4_K_M"
    ours_sd = ours_with_mmproj(name, reference.folder)
    reference_sd = reference.state_dict(name)
    fused, bias = "visual.blocks.0.attn.qkv.weight", "visual.blocks.0.attn.qkv.bias"
    assert_same(ours_sd, reference_sd, skip=(fused, bias))
    _check_fused_bias(reference, name, ours_sd[bias], reference_sd[bias])
    mmproj = read_gguf(reference.folder / "text_encoders" / f"{MMPROJ[name][0]}.gguf").tensors
    exact = torch.cat([dequantize(mmproj[f"v.blk.0.attn_{p}.weight"]) for p in "qkv"])
    assert torch.equal(ours_sd[fused], exact)
    assert not torch.equal(reference_sd[fused], exact)
    torch.testing.assert_close(reference_sd[fused], exact, rtol=2 ** -7, atol=0)  # bfloat16's 8-bit mantissa


def ours_with_mmproj(name: str, folder: Path) -> dict:
    """The text encoder with its mmproj loaded as the second file, as the DisTorch CLIP loaders pair them."""
    files = folder / "text_encoders"
    text = EncoderPart(name, text_encoder_state_dict(read_gguf(files / f"{name}.gguf")), False)
    mmproj = read_gguf(files / f"{MMPROJ[name][0]}.gguf")
    (merged,) = attach_vision_towers([text, EncoderPart("mmproj", vision_projector_state_dict(mmproj), True)])
    return {k: dequantize(v, torch.float32) for k, v in merged.items()}


def _our_ids(folder: Path, name: str) -> list:
    from gguf_loader import sentencepiece_model

    proto = sentencepiece_model(read_gguf(folder / "text_encoders" / f"{name}.gguf").metadata, name)
    processor = spm.SentencePieceProcessor(model_proto=proto, add_eos=True)
    return [processor.encode(text) for text in fx.PROMPTS]


def test_umt5_tokenizer_with_byte_pieces(reference):
    """Difference: the reference drops the normalization table, so prompts the table changes (full-width forms,
    ligatures, compatibility characters; tabs and newlines) tokenize differently from the original; ours match."""
    name = "umt5_tokenizer_byte"
    assert _our_ids(reference.folder, name) == reference.originals[name]
    theirs = reference_result(reference, name)["ids"]
    differing = [text for text, a, b in zip(fx.PROMPTS, theirs, reference.originals[name]) if a != b]
    assert differing and set(differing) <= {t for t in fx.PROMPTS if _nfkc_changes(t)}, differing


def _nfkc_changes(text: str) -> bool:
    import unicodedata

    return unicodedata.normalize("NFKC", text) != text or "\t" in text or "\n" in text


def test_umt5_tokenizer_without_byte_pieces(reference):
    """Difference: the reference always turns byte fallback on, which SentencePiece refuses for a vocabulary without
    the 256 byte pieces; ours sets it from the BYTE token types."""
    name = "umt5_tokenizer_plain"
    assert _our_ids(reference.folder, name) == reference.originals[name]
    assert "byte" in reference_result(reference, name)["error"]


def test_tekken_tokenizer_through_comfyuis_mistral_tokenizer(reference, comfy_install):
    """Ours tokenizes like the original tekken.json in this ComfyUI's Flux.2 tokenizer. Difference: the reference's
    rebuilt JSON lacks `default_num_special_tokens`, which ComfyUI's own tekken reader (0.33+) requires."""
    result = reference.report["tekken"]
    if "error" in result:
        assert "no Mistral" in result["error"] and comfy_install.version.startswith("0.3."), result
        return
    payloads = result["payloads"]
    assert "ids" in payloads["original"], payloads["original"]
    assert payloads["ours"] == payloads["original"]
    if "error" in payloads["reference"]:
        assert "default_num_special_tokens" in payloads["reference"]["error"]
    else:
        assert payloads["reference"] == payloads["original"]
