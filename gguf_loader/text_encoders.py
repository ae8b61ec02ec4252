"""llama.cpp text-encoder tensor names -> the state-dict names ComfyUI's encoders expect.

Covers T5/UMT5 (`t5`, `t5encoder`), llama-family decoders used as text encoders (`llama`, `mistral3`,
`qwen2`, `qwen2vl`, `qwen3`, `qwen3vl`, `gemma`, `gemma2`, `gemma3`), Gemma 4's dense text models
(`gemma4`) and CLIP text models written by llama.cpp's clip converter (`t.` prefix). Besides renaming, it
undoes two value changes llama.cpp's converter makes:

* Q/K row permutation (LLaMA-architecture files only): llama.cpp interleaves the two rotary halves
  of every head. Head counts come from `<arch>.attention.head_count[_kv]`, never assumed, and rows
  of quantized tensors are permuted as raw bytes (no dequantization).
* Gemma/Gemma2/Gemma3 RMSNorm weights are stored as 1 + w (llama.cpp's norm multiplies by w, Gemma's
  by 1 + w, which ComfyUI implements); the stored value minus one is restored.

Names that match no rule are kept unchanged, so files that already use ComfyUI names pass through.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping

import torch

from .errors import GGUFError, echo
from .gpt_oss import GPT_OSS_ARCHITECTURES, map_gpt_oss
from .tensor import GGMLTensor

logger = logging.getLogger("distorch.gguf")

T5_ARCHITECTURES = frozenset({"t5", "t5encoder"})
LLAMA_ARCHITECTURES = frozenset({"llama", "mistral3", "qwen2", "qwen2vl", "qwen3", "qwen3vl", "gemma", "gemma2",
                                 "gemma3"})
CLIP_ARCHITECTURES = frozenset({"clip"})
# llama.cpp permutes Q/K rows only when converting LLaMA-architecture models (LlamaModel.permute; its
# Ministral-3 converter, arch "mistral3", is a LlamaModel too).
PERMUTED_ARCHITECTURES = frozenset({"llama", "mistral3"})
# Gemma 1-3 converters store norm weights as 1 + w (Gemma 4 does not).
NORM_SHIFTED_ARCHITECTURES = frozenset({"gemma", "gemma2", "gemma3"})

_BLOCK = re.compile(r"^(?P<stack>enc\.|dec\.|t\.)?blk\.(?P<index>\d+)\.(?P<part>\w+)\.(?P<kind>weight|bias)$")
_TOP = re.compile(r"^(?P<part>[\w.]+?)\.(?P<kind>weight|bias)$")

_LLAMA_BLOCK = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "ffn_norm": "post_attention_layernorm",
}
# Gemma 2/3 have four norms per block; llama.cpp's ffn_norm is their pre-feed-forward norm.
_GEMMA2_BLOCK = {**_LLAMA_BLOCK, "post_attention_norm": "post_attention_layernorm",
                 "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
_LLAMA_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

_T5_ATTENTION = {"q": "q", "k": "k", "v": "v", "o": "o", "rel_b": "relative_attention_bias"}
_T5_TOP = {"token_embd": "shared", "output": "lm_head", "enc.output_norm": "encoder.final_layer_norm",
           "dec.output_norm": "decoder.final_layer_norm"}

_CLIP_BLOCK = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_out": "self_attn.out_proj", "ln1": "layer_norm1", "ln2": "layer_norm2"}
_CLIP_TOP = {"t.token_embd": "text_model.embeddings.token_embedding",
             "t.position_embd": "text_model.embeddings.position_embedding",
             "t.post_ln": "text_model.final_layer_norm", "t.pre_ln": "text_model.pre_layrnorm"}


def map_text_encoder(tensors: Mapping[str, torch.Tensor], architecture: str | None,
                     metadata: Mapping | None = None) -> dict[str, torch.Tensor]:
    """Renames (and where needed un-permutes) a llama.cpp text encoder's tensors for ComfyUI.

    Args:
        tensors: name -> tensor, as read from the file.
        architecture: `general.architecture` (e.g. "t5encoder", "llama", "qwen3"). Unknown values
            return the tensors unchanged.
        metadata: the file's metadata; needed for LLaMA head counts.

    Returns:
        A new dict; tensors are the same objects except un-permuted Q/K and shifted Gemma norms.

    Example:
        >>> f = read_gguf("Qwen3-4B-Q4_K_M.gguf")  # doctest: +SKIP
        >>> sd = map_text_encoder(f.tensors, f.architecture, f.metadata)  # doctest: +SKIP
        >>> "model.layers.0.self_attn.q_proj.weight" in sd  # doctest: +SKIP
        True
    """
    metadata = metadata or {}
    if architecture in T5_ARCHITECTURES:
        return _rename(tensors, _t5_namer(tensors))
    if architecture in CLIP_ARCHITECTURES:
        return _rename(tensors, _clip_namer(tensors))
    if architecture in LLAMA_ARCHITECTURES:
        return _map_llama(tensors, architecture, metadata)
    if architecture in GPT_OSS_ARCHITECTURES:
        return map_gpt_oss(tensors)
    if architecture == GEMMA4_ARCHITECTURE:
        return _map_gemma4(tensors)
    logger.debug("distorch.gguf: no text-encoder name map for architecture %r; names kept", architecture)
    return dict(tensors)


def _rename(tensors: Mapping[str, torch.Tensor], namer: Callable[[str], str]) -> dict[str, torch.Tensor]:
    renamed: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        new_name = namer(name)
        if new_name in renamed:
            raise GGUFError(f"text-encoder name map: {echo(name)} and another tensor both map to {echo(new_name)}")
        renamed[new_name] = tensor
    return renamed


# -- LLaMA family -----------------------------------------------------------------------------------

def _map_llama(tensors: Mapping[str, torch.Tensor], arch: str, metadata: Mapping) -> dict[str, torch.Tensor]:
    block_map = _GEMMA2_BLOCK if arch in ("gemma2", "gemma3") else _LLAMA_BLOCK
    renamed: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        match = _BLOCK.match(name)
        if match and not match["stack"] and match["part"] in block_map:
            if arch in PERMUTED_ARCHITECTURES and match["part"] in ("attn_q", "attn_k"):
                heads = _head_count(metadata, arch, int(match["index"]), kv=match["part"] == "attn_k")
                tensor = unpermute_qk(tensor, heads, name)
            new_name = f"model.layers.{match['index']}.{block_map[match['part']]}.{match['kind']}"
        else:
            new_name = _top_name(name, _LLAMA_TOP)
        if arch in NORM_SHIFTED_ARCHITECTURES and name.endswith("norm.weight"):
            tensor = _minus_one(tensor)
        renamed[new_name] = tensor
    return renamed


def _top_name(name: str, table: Mapping[str, str]) -> str:
    match = _TOP.match(name)
    if match and match["part"] in table:
        return f"{table[match['part']]}.{match['kind']}"
    return name


def _head_count(metadata: Mapping, arch: str, layer: int, kv: bool) -> int:
    key = f"{arch}.attention.head_count"
    if key not in metadata:
        raise GGUFError(f"cannot undo llama.cpp's Q/K permutation: metadata has no {echo(key)}")
    value = metadata[key]
    if kv and f"{key}_kv" in metadata:
        value = metadata[f"{key}_kv"]
    if isinstance(value, list):  # per-layer head counts
        if layer >= len(value):
            raise GGUFError(f"{key}{'_kv' if kv else ''} lists {len(value)} layers, tensor is in layer {layer}")
        value = value[layer]
    if not isinstance(value, int) or value <= 0:
        raise GGUFError(f"{key}{'_kv' if kv else ''} must be a positive integer, got {echo(value)}")
    return value


def unpermute_qk(tensor: torch.Tensor, heads: int, name: str = "tensor") -> torch.Tensor:
    """Undoes llama.cpp's `LlamaModel.permute` on the rows (dim 0) of a Q or K weight or bias.

    llama.cpp stores rows as reshape(heads, 2, rows/heads/2, ...).swapaxes(1, 2); this applies the
    inverse. Quantized rows are whole blocks, so GGMLTensors are permuted as raw bytes.
    """
    rows = tensor.shape[0]
    if rows % (2 * heads):
        raise GGUFError(f"{echo(name)}: {rows} rows cannot be split into {heads} heads of two rotary halves")
    if isinstance(tensor, GGMLTensor):
        raw = tensor.as_plain()
        if raw.dim() < 2 or raw.shape[0] != rows:
            raise GGUFError(f"{echo(name)}: stored as {tuple(raw.shape)} bytes, rows do not match the logical shape "
                            f"{tuple(tensor.shape)}; cannot permute")
        return GGMLTensor(_unpermute_rows(raw, heads), tensor.qtype, tensor.shape)
    return _unpermute_rows(tensor, heads)


def _unpermute_rows(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    rows = tensor.shape[0]
    grouped = tensor.reshape(heads, rows // heads // 2, 2, *tensor.shape[1:])
    return grouped.transpose(1, 2).reshape(tensor.shape).contiguous()


def _minus_one(tensor: torch.Tensor) -> torch.Tensor:
    values = tensor.dequantize(torch.float32) if isinstance(tensor, GGMLTensor) else tensor.to(torch.float32)
    shifted = values - 1
    return shifted if isinstance(tensor, GGMLTensor) else shifted.to(tensor.dtype)


# -- Gemma 4 ------------------------------------------------------------------------------------------

GEMMA4_ARCHITECTURE = "gemma4"
# Gemma 4 adds per-layer inputs (E2B/E4B) and a per-layer output scale to Gemma 3's block; its norms are stored
# as they are (llama.cpp's Gemma4Model.norm_shift is 0), Q/K are not permuted.
_GEMMA4_BLOCK = {**_GEMMA2_BLOCK, "inp_gate": "per_layer_input_gate", "proj": "per_layer_projection",
                 "post_norm": "post_per_layer_input_norm"}
_GEMMA4_TOP = {**_LLAMA_TOP, "per_layer_token_embd": "model.embed_tokens_per_layer",
               "per_layer_model_proj": "model.per_layer_model_projection",
               "per_layer_proj_norm": "model.per_layer_projection_norm"}
# The mixture-of-experts variant (26B-A4B) has these too; ComfyUI 0.33 has no Gemma 4 encoder with experts
# (encoder_files.py refuses such files).
GEMMA4_EXPERT_PARTS = frozenset({"ffn_gate_inp", "ffn_gate_up_exps", "ffn_down_exps", "pre_ffw_norm_2",
                                 "post_ffw_norm_1", "post_ffw_norm_2"})
# llama.cpp's frequency factors for the proportional RoPE of the global layers; ComfyUI computes its own.
_GEMMA4_DROPPED = frozenset({"rope_freqs.weight"})


def _map_gemma4(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renamed: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name in _GEMMA4_DROPPED:
            continue
        match = _BLOCK.match(name)
        part = match["part"] if match and not match["stack"] else None
        if part == "layer_output_scale":
            new_name = f"model.layers.{match['index']}.layer_scalar"  # a buffer in ComfyUI: no .weight
        elif part in _GEMMA4_BLOCK:
            new_name = f"model.layers.{match['index']}.{_GEMMA4_BLOCK[part]}.{match['kind']}"
        else:
            new_name = _top_name(name, _GEMMA4_TOP)
        renamed[new_name] = tensor
    return renamed


# -- T5 / UMT5 ----------------------------------------------------------------------------------------

def _t5_namer(tensors: Mapping[str, torch.Tensor]) -> Callable[[str], str]:
    gated = any(name.endswith("ffn_gate.weight") for name in tensors)

    def name_for(name: str) -> str:
        match = _BLOCK.match(name)
        if not match or match["stack"] not in ("enc.", "dec."):
            return _top_name(name, _T5_TOP)
        mapped = _t5_block_part(match["part"], match["stack"] == "dec.", gated)
        if mapped is None:
            return name
        stack = "decoder" if match["stack"] == "dec." else "encoder"
        return f"{stack}.block.{match['index']}.{mapped}.{match['kind']}"

    return name_for


def _t5_block_part(part: str, decoder: bool, gated: bool) -> str | None:
    ffn_layer = 2 if decoder else 1
    if part.startswith("attn_") and part[5:] in _T5_ATTENTION:
        return f"layer.0.SelfAttention.{_T5_ATTENTION[part[5:]]}"
    if decoder and part.startswith("cross_attn_") and part[11:] in _T5_ATTENTION:
        return f"layer.1.EncDecAttention.{_T5_ATTENTION[part[11:]]}"
    norms = {"attn_norm": "layer.0.layer_norm", "cross_attn_norm": "layer.1.layer_norm",
             "ffn_norm": f"layer.{ffn_layer}.layer_norm"}
    if part in norms:
        return norms[part]
    ffn = {"ffn_gate": "wi_0", "ffn_up": "wi_1" if gated else "wi", "ffn_down": "wo"}
    if part in ffn:
        return f"layer.{ffn_layer}.DenseReluDense.{ffn[part]}"
    return None


# -- CLIP text ----------------------------------------------------------------------------------------

def _clip_namer(tensors: Mapping[str, torch.Tensor]) -> Callable[[str], str]:
    def name_for(name: str) -> str:
        match = _BLOCK.match(name)
        if not match or match["stack"] != "t.":
            return _top_name(name, _CLIP_TOP)
        part = match["part"]
        if part in ("ffn_up", "ffn_down"):
            mapped = _clip_mlp(tensors, name, match["index"], part)
        else:
            mapped = _CLIP_BLOCK.get(part)
        if mapped is None:
            return name
        return f"text_model.encoder.layers.{match['index']}.{mapped}.{match['kind']}"

    return name_for


def _clip_mlp(tensors: Mapping[str, torch.Tensor], name: str, index: str, part: str) -> str:
    """fc1 (hidden -> intermediate) or fc2, decided by shape: llama.cpp's CLIP converters disagree on
    which of the two they call ffn_up (the legacy llava script swapped them)."""
    weight = tensors.get(f"t.blk.{index}.{part}.weight")
    if weight is None or len(weight.shape) != 2:
        return "mlp.fc1" if part == "ffn_up" else "mlp.fc2"
    out_features, in_features = weight.shape
    return "mlp.fc1" if out_features > in_features else "mlp.fc2"


# -- Qwen2.5-VL vision tower (llama.cpp mmproj files) ------------------------------------------------

_VISION_QKV = re.compile(r"^v\.blk\.(?P<index>\d+)\.attn_(?P<part>[qkv])\.(?P<kind>weight|bias)$")
_VISION_BLOCK = {"attn_out": "attn.proj", "ln1": "norm1", "ln2": "norm2", "ffn_gate": "mlp.gate_proj",
                 "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_VISION_TOP = {"v.post_ln": "visual.merger.ln_q", "mm.0": "visual.merger.mlp.0", "mm.2": "visual.merger.mlp.2"}


def map_vision_tower(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """llama.cpp Qwen2.5-VL mmproj tensors -> ComfyUI's `visual.*` names.

    Separate Q/K/V become the fused `attn.qkv` (quantized rows are concatenated as raw blocks when
    the three share a type; otherwise they are dequantized to float32), and the two 4-D temporal
    slices of the patch embedding are stacked into ComfyUI's 5-D Conv3d weight.

    Example:
        >>> vision = map_vision_tower(read_gguf("Qwen2.5-VL-7B-mmproj-F16.gguf").tensors)  # doctest: +SKIP
    """
    mapped: dict[str, torch.Tensor] = {}
    fused: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = _VISION_QKV.match(name)
        if match:
            fused.setdefault((match["index"], match["kind"]), {})[match["part"]] = tensor
        elif not name.startswith("v.patch_embd"):
            mapped[_vision_name(name)] = tensor
    for (index, kind), parts in fused.items():
        if set(parts) != {"q", "k", "v"}:
            raise GGUFError(f"vision block {index}: attn_q/k/v.{kind} incomplete (found {sorted(parts)})")
        mapped[f"visual.blocks.{index}.attn.qkv.{kind}"] = concat_rows([parts["q"], parts["k"], parts["v"]])
    mapped.update(_patch_embedding(tensors))
    return mapped


def _vision_name(name: str) -> str:
    match = _BLOCK.match(name[2:]) if name.startswith("v.") else None
    if match and not match["stack"] and match["part"] in _VISION_BLOCK:
        return f"visual.blocks.{match['index']}.{_VISION_BLOCK[match['part']]}.{match['kind']}"
    return _top_name(name, _VISION_TOP)


def _patch_embedding(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    first, second = tensors.get("v.patch_embd.weight"), tensors.get("v.patch_embd.weight.1")
    if first is None:
        return {}
    if second is None:
        return {"visual.patch_embed.proj.weight": first}
    stacked = torch.stack([_as_float(first), _as_float(second)], dim=2)  # (out, in, time=2, kh, kw)
    return {"visual.patch_embed.proj.weight": stacked}


def concat_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenates weights or biases along dim 0 without dequantizing when all share one GGML type."""
    if all(isinstance(t, GGMLTensor) for t in tensors) and len({t.qtype for t in tensors}) == 1 \
            and all(_rows_are_raw_rows(t) for t in tensors) and len({tuple(t.shape[1:]) for t in tensors}) == 1:
        raw = torch.cat([t.as_plain() for t in tensors])
        return GGMLTensor(raw, tensors[0].qtype, (raw.shape[0], *tensors[0].shape[1:]))
    if not any(isinstance(t, GGMLTensor) for t in tensors) and len({t.dtype for t in tensors}) == 1:
        return torch.cat(tensors)
    return torch.cat([_as_float(t) for t in tensors])


def _rows_are_raw_rows(tensor: GGMLTensor) -> bool:
    raw = tensor.as_plain()
    return raw.dim() >= 2 and raw.shape[0] == tensor.shape[0]


def _as_float(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.dequantize(torch.float32) if isinstance(tensor, GGMLTensor) else tensor.to(torch.float32)
