"""Writes small text encoders of each family twice: as ComfyUI's own files (safetensors) and as llama.cpp GGUFs.

    python make_text_encoders.py --comfyui PATH --out TEXT_ENCODERS_DIR --tokenizers DIR --families a,b

Run with the ComfyUI interpreter. ComfyUI builds each encoder class from a fixed config, but its core
model option `<encoder>_model_config` overrides that config; with it the real classes run at a few MB,
keeping what model detection reads (layer counts, the FFN width of T5-XXL, Mistral's 5120 hidden size,
Qwen2.5-VL's 512-wide K bias). For each family the class is built on the meta device for its state-dict
names and shapes, random values are drawn, and two files are written:

* `<family>.safetensors` - ComfyUI's names and the values ComfyUI must see (float32, or float16 where the
  GGUF holds float16, so both files hold exactly the same numbers), plus the original tokenizer
  (`spiece_model` / `tekken_model` / `tokenizer_json`) as Comfy-Org's files carry it;
* `<family>.gguf` - what llama.cpp writes: names from gguf-py's tensor map, Q/K rows permuted for the
  "llama" architecture, Gemma norms stored as 1 + w, Q8_0 blocks quantized by gguf-py, and the
  tokenizer as metadata (prepared by the test: `--tokenizers DIR/<name>.json`). Qwen2.5-VL's vision tower
  goes into a separate mmproj file with its Q/K/V split and its patch embedding cut in two, as llama.cpp's
  mmproj converter does.

Prints one JSON line: family -> {"type", "core": [files], "gguf": [files], "model_options"}.
"""

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
CONNECTOR_WIDTH = 16  # LTX-2's text projection output, shrunk

FAMILIES = {
    # family: ComfyUI class, model_config key, overrides, GGUF architecture, ComfyUI type, tokenizer, partner
    # Wan builds its UMT5 only for a file core detects as T5-XXL: 0.3.64 and 0.8.0 read that from the 4096 width.
    "umt5": dict(t5_config="umt5_config_xxl.json", option="umt5xxl", arch="T5ENCODER", type="wan",
                 overrides={"d_model": 32, "num_heads": 2, "d_kv": 16}, tokenizer="umt5", detected="T5_XXL"),
    # Flux stores T5 in CLIP-L's float16 (core rounds a float32 file at load); F16 weights are equal either way.
    "t5xxl": dict(t5_config="t5_config_xxl.json", option="t5xxl", arch="T5ENCODER", type="flux",
                  overrides={"d_model": 32, "num_heads": 2, "d_kv": 16}, partner="random_clip_l.safetensors",
                  quantize=()),
    # LTX-2: Gemma 3 12B (its own model_config key is "_model_config": core gives it no name) + text projection.
    # LTX-2 pads prompts to 1024 tokens: one attention head keeps its 48 layers quick.
    "gemma3": dict(cls="Gemma3_12B", option="", arch="GEMMA3", type="ltxv", tokenizer="gemma", requires="GEMMA_3_12B",
                   overrides={"hidden_size": 64, "intermediate_size": 64, "num_attention_heads": 1,
                              "num_key_value_heads": 1}, connector=True),
    "gemma2": dict(cls="Gemma2_2B", option="gemma2_2b", arch="GEMMA2", type="lumina2", tokenizer="gemma",
                   requires="GEMMA_2_2B",
                   overrides={"hidden_size": 64, "intermediate_size": 64, "num_attention_heads": 2,
                              "num_key_value_heads": 1}),
    # Mistral keeps its 5120 hidden size (what detection reads): F16 attention (exact in both files), Q8_0 MLP.
    "mistral": dict(cls="Mistral3Small24B", option="mistral3_24b", arch="LLAMA", type="flux2", tokenizer="tekken",
                    requires="MISTRAL3_24B",
                    overrides={"num_attention_heads": 1, "num_key_value_heads": 1, "intermediate_size": 32},
                    quantize=(".mlp.",)),
    # Lens: GPT-OSS-20B at 24 layers (Lens reads layers 5, 11, 17, 23) with 4 experts; llama.cpp's gpt-oss layout
    # (gate/up split, experts in MXFP4) against ComfyUI's interleaved banks. Written by write_gpt_oss.
    "gptoss": dict(type="lens", tokenizer="gptoss", requires="GPT_OSS_20B", writer="gpt_oss",
                   overrides={"hidden_size": 64, "intermediate_size": 32, "num_attention_heads": 4,
                              "num_key_value_heads": 2, "head_dim": 16, "num_local_experts": 4,
                              "num_experts_per_tok": 2}),
    # Gemma 4 12B (the encoder-free one: its fixed-size media embedders stay small) keeps the 48 layers and the
    # missing v_proj of its global layers that detection reads; a 256/512-wide head is fixed in ComfyUI's config.
    "gemma4": dict(cls="Gemma4_12B", module="comfy.text_encoders.gemma4", option="gemma4", arch="GEMMA4",
                   type="stable_diffusion", tokenizer="gemma4", requires="GEMMA_4_12B",
                   overrides={"hidden_size": 64, "intermediate_size": 64, "num_attention_heads": 1,
                              "num_key_value_heads": 1}),
    # Gemma 4 E2B: per-layer inputs, KV-shared layers with double-wide MLPs; 35 layers for detection. Its fixed-size
    # vision and audio towers (476M parameters) are never loaded from either file, so never touched.
    "gemma4_e2b": dict(cls="Gemma4_E2B", module="comfy.text_encoders.gemma4", option="gemma4", arch="GEMMA4",
                       type="stable_diffusion", tokenizer="gemma4", requires="GEMMA_4_E2B",
                       overrides={"hidden_size": 64, "intermediate_size": 64, "num_attention_heads": 1,
                                  "num_key_value_heads": 1, "hidden_size_per_layer_input": 8}),
    # LTX-2 with Gemma 4 12B: the text projection as the second file (its model_config key is "_model_config").
    "gemma4_ltx2": dict(cls="Gemma4_12B", module="comfy.text_encoders.gemma4", option="", arch="GEMMA4", type="ltxv",
                        tokenizer="gemma4", requires="GEMMA_4_12B", connector=True,
                        overrides={"hidden_size": 64, "intermediate_size": 64, "num_attention_heads": 1,
                                   "num_key_value_heads": 1}),
    "qwen25vl": dict(cls="Qwen25_7BVLI", option="qwen25_7b", arch="QWEN2VL", type="qwen_image", requires="QWEN25_7B",
                     overrides={"hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 2,
                                "num_attention_heads": 4, "num_key_value_heads": 4}, mmproj=True),
}


def comfy_state_shapes(family: dict, vocab: int | None) -> tuple[dict, dict]:
    """ComfyUI's state-dict names and shapes for the family's class at the overridden size, and the overrides."""
    import comfy.ops
    import comfy.text_encoders.llama
    import comfy.text_encoders.t5

    overrides = dict(family["overrides"], **({"vocab_size": vocab} if vocab else {}))
    if "t5_config" in family:
        config = json.loads((Path(comfy.text_encoders.t5.__file__).parent / family["t5_config"]).read_text())
        model = comfy.text_encoders.t5.T5({**config, **overrides}, torch.float32, "meta", comfy.ops.manual_cast)
    else:
        module = importlib.import_module(family.get("module", "comfy.text_encoders.llama"))
        model = getattr(module, family["cls"])(dict(overrides), torch.float32, "meta", comfy.ops.manual_cast)
    # Vision towers: Gemma 3's SigLIP and Gemma 4's media embedders are unused by text prompts; Qwen2.5-VL's goes
    # to the mmproj file.
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()
              if not k.startswith(("vision_model.", "multi_modal_projector.", "visual.", "audio_projector.",
                                   "audio_model."))}
    return shapes, overrides


def random_values(shapes: dict, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    values = {}
    for name, shape in sorted(shapes.items()):
        if name.endswith(("norm.weight", "layer_norm.weight", "ln_q.weight", "layer_scalar")):
            values[name] = 1 + 0.1 * torch.randn(shape, generator=generator)
        else:
            values[name] = 0.05 * torch.randn(shape, generator=generator)
    return values


def gemma_norm(name: str, family: dict) -> bool:
    return family["arch"] in ("GEMMA2", "GEMMA3") and name.endswith("norm.weight")


def as_stored(name: str, value: torch.Tensor, quantize: tuple = ("",)) -> tuple[str, np.ndarray]:
    """The GGML type llama.cpp-style quantization gives a tensor, and its values as stored (gguf-py's Q8_0)."""
    import gguf

    array = value.float().numpy()
    if array.ndim == 2 and array.shape[1] % 32 == 0 and array.size >= 4096 and "norm" not in name \
            and any(part in name for part in quantize):
        blocks = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
        return "Q8_0", blocks
    if array.ndim >= 2:
        return "F16", array.astype(np.float16)
    return "F32", array


def llama_cpp_permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2) \
        .reshape(weights.shape)


def write_family(name: str, family: dict, out: Path, tokenizers: Path, seed: int) -> dict:
    import comfy.sd
    import gguf
    from safetensors.torch import save_file

    from gguf_loader import GGUFFileWriter

    if family.get("requires") and not hasattr(comfy.sd.TEModel, family["requires"]):
        return {"unsupported": f"this ComfyUI has no {family['requires']} text encoder"}

    if not hasattr(comfy.sd.CLIPType, family["type"].upper()):
        return {"unsupported": f"this ComfyUI has no {family['type']} text-encoder type"}
    if family.get("writer") == "gpt_oss":
        return write_gpt_oss(name, family, out, tokenizers, seed)
    if family.get("connector") and not _ltx2_projection_follows_the_encoder():
        return {"unsupported": "this ComfyUI's LTX-2 text projection has a fixed 3840 x 49 input width, so its "
                               "Gemma 3 cannot be built small"}

    tokenizer = json.loads((tokenizers / f"{family['tokenizer']}.json").read_text()) if "tokenizer" in family else {}
    vocab = len(tokenizer["metadata"]["tokenizer.ggml.tokens"]) if tokenizer else None
    shapes, overrides = comfy_state_shapes(family, vocab)
    if family.get("detected"):
        detected = comfy.sd.detect_te_model({k: torch.empty(v, device="meta") for k, v in shapes.items()})
        if detected != getattr(comfy.sd.TEModel, family["detected"]):
            return {"unsupported": f"this ComfyUI detects a small {name} as {detected.name}, not {family['detected']}"}
    values = random_values(shapes, seed)
    arch = getattr(gguf.MODEL_ARCH, family["arch"])
    names = gguf.get_tensor_name_map(arch, 128)
    writer = GGUFFileWriter(out / f"{name}.gguf", architecture=gguf.MODEL_ARCH_NAMES[arch])
    heads = overrides.get("num_attention_heads"), overrides.get("num_key_value_heads")
    if family["arch"] == "LLAMA":
        writer.add_metadata("llama.attention.head_count", heads[0])
        writer.add_metadata("llama.attention.head_count_kv", heads[1])
    for key, value in tokenizer.get("metadata", {}).items():
        if key == "tokenizer.ggml.precompiled_charsmap":
            writer.add_metadata(key, value, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT8)
        else:
            writer.add_metadata(key, value)
    core = {}
    for key, value in values.items():
        # llama.cpp's Gemma 4 converter names the `layer_scalar` buffer `<...>.weight` before mapping it
        gguf_name = names.get_name(key + ".weight" if key.endswith("layer_scalar") else key,
                                   try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise SystemExit(f"{name}: gguf-py has no llama.cpp name for {key}")
        qtype, stored = as_stored(key, value + 1 if gemma_norm(key, family) else value, family.get("quantize", ("",)))
        seen = gguf.quants.dequantize(stored, gguf.GGMLQuantizationType.Q8_0) if qtype == "Q8_0" else stored
        core[key] = torch.from_numpy(np.ascontiguousarray(seen)).float() - (1 if gemma_norm(key, family) else 0)
        if qtype == "F16":
            core[key] = core[key].half()
        if family["arch"] == "LLAMA" and (".q_proj." in key or ".k_proj." in key):
            count = heads[0] if ".q_proj." in key else heads[1]
            stored = llama_cpp_permute(stored if qtype != "Q8_0" else stored.reshape(value.shape[0], -1), count)
        if qtype == "Q8_0":
            writer.add_tensor(gguf_name, torch.from_numpy(np.ascontiguousarray(stored)), "Q8_0", shape=value.shape)
        else:
            writer.add_tensor(gguf_name, torch.from_numpy(np.ascontiguousarray(stored)))
    writer.write()
    if tokenizer:
        original = bytes.fromhex(tokenizer["original"])
        core[tokenizer["entry"]] = torch.frombuffer(bytearray(original), dtype=torch.uint8)
    entry = {"type": family["type"], "core": [f"{name}.safetensors"], "gguf": [f"{name}.gguf"],
             "model_options": {f"{family['option']}_model_config": overrides}}
    if family.get("mmproj"):
        core.update(write_mmproj(out / f"{name}-mmproj-F16.gguf", seed + 1, overrides["hidden_size"]))
        entry["gguf"].append(f"{name}-mmproj-F16.gguf")
    save_file({k: v.contiguous() for k, v in core.items()}, str(out / f"{name}.safetensors"))
    for extra in (family.get("partner"), write_connector(out, overrides) if family.get("connector") else None):
        if extra:
            entry["core"].append(extra)
            entry["gguf"].append(extra)
    return entry


def write_gpt_oss(name: str, family: dict, out: Path, tokenizers: Path, seed: int) -> dict:
    """ComfyUI 0.33's GPT-OSS (Lens) encoder, small, as core's safetensors (+ the original tokenizer.json as
    `tokenizer_json`) and as llama.cpp writes it (convert_hf_to_gguf.py GptOssModel, restated): ComfyUI's
    interleaved gate/up bank [E, 2I, H] split into rows ::2 (ffn_gate_exps) and 1::2 (ffn_up_exps), biases
    likewise; expert banks in MXFP4 (gguf-py's quantizer), attention F16, token embedding Q8_0, the rest F32.
    The safetensors hold gguf-py's dequantization of what the GGUF stores."""
    import comfy.ops
    import comfy.text_encoders.gpt_oss as gpt_oss
    import gguf
    from safetensors.torch import save_file

    from gguf_loader import GGUFFileWriter

    tokenizer = json.loads((tokenizers / f"{family['tokenizer']}.json").read_text())
    overrides = dict(family["overrides"], vocab_size=len(tokenizer["metadata"]["tokenizer.ggml.tokens"]))
    config = gpt_oss.GptOss20BConfig(**overrides)
    # manual_cast layers have their weights from the start; MoEExperts exists only in mixed_precision_ops.
    ops = type("Ops", (comfy.ops.manual_cast,), {"MoEExperts": comfy.ops.mixed_precision_ops({}).MoEExperts})
    model = gpt_oss.GptOssModel(config, device="meta", dtype=torch.float32, ops=ops)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    experts, hidden, inner = config.num_local_experts, config.hidden_size, config.intermediate_size
    for layer in range(config.num_hidden_layers):  # MoEExperts creates its weight only when loading
        shapes[f"layers.{layer}.mlp.experts.gate_up_proj.weight"] = (experts, 2 * inner, hidden)
        shapes[f"layers.{layer}.mlp.experts.down_proj.weight"] = (experts, hidden, inner)
    values = random_values(shapes, seed)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT_OSS, config.num_hidden_layers)
    writer = GGUFFileWriter(out / f"{name}.gguf", architecture="gpt-oss")
    for key, value in tokenizer["metadata"].items():
        writer.add_metadata(key, value)
    mxfp4 = gguf.GGMLQuantizationType.MXFP4
    core = {}

    def add_mxfp4(gguf_name: str, bank: torch.Tensor) -> torch.Tensor:
        blocks = gguf.quants.quantize(bank.contiguous().numpy(), mxfp4)
        writer.add_tensor(gguf_name, torch.from_numpy(blocks), "MXFP4", shape=tuple(bank.shape))
        return torch.from_numpy(gguf.quants.dequantize(blocks, mxfp4).copy())

    for key, value in values.items():
        stem, kind = key.rsplit(".", 1) if not key.endswith(".sinks") else (key, "weight")
        gguf_stem = names.get_name(f"model.{stem}")
        if ".experts.gate_up_proj" in key:
            block = key.split(".")[1]
            gate, up = value[:, ::2], value[:, 1::2]
            parts = {}
            for part, half in (("gate", gate), ("up", up)):
                part_name = f"blk.{block}.ffn_{part}_exps.{kind}"
                if kind == "weight":
                    parts[part] = add_mxfp4(part_name, half)
                else:
                    parts[part] = half.contiguous()
                    writer.add_tensor(part_name, parts[part])
            core[key] = torch.stack([parts["gate"], parts["up"]], dim=2).reshape(value.shape)
        elif ".experts.down_proj.weight" in key:
            core[key] = add_mxfp4(f"{gguf_stem}.weight", value)
        elif key.startswith("embed_tokens."):
            qtype, stored = as_stored(key, value)
            seen = gguf.quants.dequantize(stored, gguf.GGMLQuantizationType.Q8_0) if qtype == "Q8_0" else stored
            core[key] = torch.from_numpy(np.ascontiguousarray(seen)).float()
            writer.add_tensor(f"{gguf_stem}.{kind}", torch.from_numpy(np.ascontiguousarray(stored)), qtype,
                              shape=value.shape)
        elif ".self_attn." in key and value.dim() == 2:
            core[key] = value.half()
            writer.add_tensor(f"{gguf_stem}.{kind}", core[key])
        else:
            if gguf_stem is None:
                raise SystemExit(f"{name}: gguf-py has no llama.cpp name for {key}")
            core[key] = value
            writer.add_tensor(f"{gguf_stem}.{kind}", value)
    writer.write()
    original = bytes.fromhex(tokenizer["original"])
    core[tokenizer["entry"]] = torch.frombuffer(bytearray(original), dtype=torch.uint8)
    save_file({k: v.contiguous() for k, v in core.items()}, str(out / f"{name}.safetensors"))
    return {"type": family["type"], "core": [f"{name}.safetensors"], "gguf": [f"{name}.gguf"],
            "model_options": {"gpt_oss_config": overrides}}


def write_mmproj(path: Path, seed: int, text_hidden: int) -> dict:
    """Qwen2.5-VL's vision tower (fixed size in ComfyUI) as llama.cpp's mmproj: F16 weights, F32 norms and biases,
    Q/K/V split, the 5-D patch embedding cut into its two temporal slices. Returns ComfyUI's `visual.*` values."""
    import comfy.ops
    import comfy.text_encoders.qwen_vl
    import gguf

    from gguf_loader import GGUFFileWriter

    tower = comfy.text_encoders.qwen_vl.Qwen2VLVisionTransformer(hidden_size=1280, output_hidden_size=text_hidden,
                                                                 device="meta", dtype=torch.float32,
                                                                 ops=comfy.ops.manual_cast)
    values = random_values({f"visual.{k}": tuple(v.shape) for k, v in tower.state_dict().items()}, seed)
    values = {k: (v.half() if v.dim() >= 2 else v) for k, v in values.items()}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, 64)
    writer = GGUFFileWriter(path, architecture="clip")
    writer.add_metadata("general.type", "mmproj")
    writer.add_metadata("clip.projector_type", "qwen2.5vl_merger")
    for key, value in values.items():
        stem, kind = key.rsplit(".", 1)
        if stem.endswith(".attn.qkv"):
            for part, chunk in zip("qkv", value.chunk(3)):
                writer.add_tensor(names.get_name(f"{stem[:-3]}{part}") + f".{kind}", chunk.contiguous())
        elif stem == "visual.patch_embed.proj":
            writer.add_tensor("v.patch_embd.weight", value[:, :, 0].contiguous())
            writer.add_tensor("v.patch_embd.weight.1", value[:, :, 1].contiguous())
        else:
            writer.add_tensor(names.get_name(stem) + f".{kind}", value)
    writer.write()
    return values


def _ltx2_projection_follows_the_encoder() -> bool:
    """Newer cores size LTX-2's text projection from the Gemma config (0.8.0 hard-codes 3840 x 49)."""
    import inspect

    import comfy.text_encoders.lt

    return "video_projection_dim" in inspect.signature(comfy.text_encoders.lt.LTXAVTEModel.__init__).parameters


def write_connector(out: Path, overrides: dict) -> str:
    """LTX-2's text projection (the second file of its text encoder), for the tiny Gemma's 49 hidden states."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(11)
    width = overrides["hidden_size"] * 49
    save_file({"text_embedding_projection.aggregate_embed.weight":
               0.05 * torch.randn(CONNECTOR_WIDTH, width, generator=generator),
               "text_embedding_projection.aggregate_embed.bias": torch.zeros(CONNECTOR_WIDTH)},
              str(out / "ltx2_connector.safetensors"))
    return "ltx2_connector.safetensors"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--comfyui", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--tokenizers", required=True, type=Path)
    parser.add_argument("--families", required=True)
    args = parser.parse_args()
    sys.argv = sys.argv[:1] + ["--cpu"]  # comfy.cli_args parses the command line on import
    sys.path.insert(0, os.path.abspath(args.comfyui))
    sys.path.insert(1, str(REPO))
    import comfy.options

    comfy.options.enable_args_parsing()
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = {name: write_family(name, FAMILIES[name], args.out, args.tokenizers, seed)
                for seed, name in enumerate(args.families.split(","), start=20)}
    print(json.dumps(manifest))


if __name__ == "__main__":
    main()
