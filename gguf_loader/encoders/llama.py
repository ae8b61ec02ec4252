"""Files of llama.cpp's LLaMA converter (`llama`, `mistral3`): Llama 3 (HiDream), Mistral-Small-3 (Flux.2), Ministral-3.

Names: the LLaMA-block decoder names. llama.cpp's converter (LlamaModel.permute; its Ministral-3 converter is a
LlamaModel too) interleaves the two rotary halves of every Q and K head; that is undone here. Head counts come from
`<arch>.attention.head_count[_kv]`, never assumed, and rows of quantized tensors are permuted as raw bytes (no
dequantization).

Tokenizer: Mistral's tekken.json (`tekken_model`) rebuilt from a "gpt2"/"tekken" vocabulary (mistral_tokenizer.py);
Llama 3's tokenizer ships with ComfyUI, so other vocabularies add nothing.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import GGUFError, echo
from ..tensor import GGMLTensor
from .mistral_tokenizer import tekken_model
from .names import BLOCK, decoder_name

_PERMUTED_PARTS = ("attn_q", "attn_k")


def map_tensors(tensors: Mapping[str, torch.Tensor], architecture: str, metadata: Mapping) -> dict[str, torch.Tensor]:
    renamed: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        match = BLOCK.match(name)
        if match and not match["stack"] and match["part"] in _PERMUTED_PARTS:
            heads = _head_count(metadata, architecture, int(match["index"]), kv=match["part"] == "attn_k")
            tensor = unpermute_qk(tensor, heads, name)
        renamed[decoder_name(name)] = tensor
    return renamed


def tokenizer_model(metadata: Mapping, source: str) -> bytes | None:
    return tekken_model(metadata, source)


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
