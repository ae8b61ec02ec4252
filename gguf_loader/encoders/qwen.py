"""Qwen 2 / 2.5-VL / 3 / 3-VL text encoders, and the Qwen2.5-VL vision tower of llama.cpp mmproj files.

Text: the LLaMA-block decoder names as they are (Qwen's converter does not permute Q/K); ComfyUI ships the tokenizer.
Vision: the tower of a Qwen2.5-VL mmproj file becomes the `visual.*` weights of the text encoder it is paired with
(encoder_files.attach_vision_towers), which is how ComfyUI's Qwen-Image(-Edit) encoder holds them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ..errors import GGUFError
from ..tensor import GGMLTensor
from .names import BLOCK, decoder_name, top_name


def map_tensors(tensors: Mapping[str, torch.Tensor], architecture: str, metadata: Mapping) -> dict[str, torch.Tensor]:
    return {decoder_name(name): tensor for name, tensor in tensors.items()}


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
    match = BLOCK.match(name[2:]) if name.startswith("v.") else None
    if match and not match["stack"] and match["part"] in _VISION_BLOCK:
        return f"visual.blocks.{match['index']}.{_VISION_BLOCK[match['part']]}.{match['kind']}"
    return top_name(name, _VISION_TOP)


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
