"""CLIP text models written by llama.cpp's clip converter (`t.` prefix): names only; ComfyUI ships the tokenizer."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from .names import BLOCK, rename, top_name

_BLOCK = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_out": "self_attn.out_proj", "ln1": "layer_norm1", "ln2": "layer_norm2"}
_TOP = {"t.token_embd": "text_model.embeddings.token_embedding",
        "t.position_embd": "text_model.embeddings.position_embedding",
        "t.post_ln": "text_model.final_layer_norm", "t.pre_ln": "text_model.pre_layrnorm"}


def map_tensors(tensors: Mapping[str, torch.Tensor], architecture: str, metadata: Mapping) -> dict[str, torch.Tensor]:
    return rename(tensors, _namer(tensors))


def _namer(tensors: Mapping[str, torch.Tensor]) -> Callable[[str], str]:
    def name_for(name: str) -> str:
        match = BLOCK.match(name)
        if not match or match["stack"] != "t.":
            return top_name(name, _TOP)
        part = match["part"]
        if part in ("ffn_up", "ffn_down"):
            mapped = _mlp(tensors, match["index"], part)
        else:
            mapped = _BLOCK.get(part)
        if mapped is None:
            return name
        return f"text_model.encoder.layers.{match['index']}.{mapped}.{match['kind']}"

    return name_for


def _mlp(tensors: Mapping[str, torch.Tensor], index: str, part: str) -> str:
    """fc1 (hidden -> intermediate) or fc2, decided by shape: llama.cpp's CLIP converters disagree on
    which of the two they call ffn_up (the legacy llava script swapped them)."""
    weight = tensors.get(f"t.blk.{index}.{part}.weight")
    if weight is None or len(weight.shape) != 2:
        return "mlp.fc1" if part == "ffn_up" else "mlp.fc2"
    out_features, in_features = weight.shape
    return "mlp.fc1" if out_features > in_features else "mlp.fc2"
