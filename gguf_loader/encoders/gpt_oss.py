"""llama.cpp `gpt-oss` tensors -> the state dict of ComfyUI 0.33's GPT-OSS text encoder (Lens).

ComfyUI's `GptOssModel` keeps Hugging Face's module names without the `model.` prefix (`layers.N.self_attn.sinks`,
`layers.N.mlp.router`, `layers.N.mlp.experts.gate_up_proj`, ...). Its experts are banks `[E, out, in]`
(`MoEExperts`), and the gate/up bank is interleaved by rows as in the original checkpoint: row 2i is gate row i,
row 2i+1 is up row i (`gate_up[..., ::2]`, `gate_up[..., 1::2]`). llama.cpp's converter (GptOssModel) splits that
bank into `ffn_gate_exps` and `ffn_up_exps` (or, with fused gate/up, `ffn_gate_up_exps` = all gate rows, then
all up rows), with the biases likewise. This module interleaves the rows back. Rows of quantized experts (MXFP4
in the released files) are whole blocks, so the interleave moves raw bytes and dequantizes nothing; only two
parts of different GGML types are dequantized (to float32, logged with their size).

The language-model head (`output.weight`) has no place in ComfyUI's encoder and is left out. The router and the
attention sinks are plain parameters in ComfyUI; should a file hold them quantized, they are dequantized (they
are small: E x hidden and one value per head).

Tokenizer: the o200k tokenizer.json (`tokenizer_json`) rebuilt from the "gpt2" vocabulary (gpt_oss_tokenizer.py).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import torch

from ..errors import GGUFError, echo
from ..tensor import GGMLTensor
from .gpt_oss_tokenizer import hf_tokenizer_json

logger = logging.getLogger("distorch.gguf")

_BLOCK = re.compile(r"^blk\.(?P<index>\d+)\.(?P<part>\w+)\.(?P<kind>weight|bias)$")
_BLOCK_PARTS = {
    "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate_inp": "mlp.router", "ffn_down_exps": "mlp.experts.down_proj",
}
_PLAIN_PARTS = frozenset({"ffn_gate_inp"})  # plain nn.Parameters in ComfyUI: never GGMLTensors
_GATE_UP_PARTS = frozenset({"ffn_gate_exps", "ffn_up_exps", "ffn_gate_up_exps"})
_TOP = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight"}
_DROPPED = frozenset({"output.weight"})


def map_tensors(tensors: Mapping[str, torch.Tensor], architecture: str, metadata: Mapping) -> dict[str, torch.Tensor]:
    return map_gpt_oss(tensors)


def tokenizer_model(metadata: Mapping, source: str) -> bytes:
    return hf_tokenizer_json(metadata, source)


def map_gpt_oss(tensors: Mapping[str, torch.Tensor], source: str = "gpt-oss") -> dict[str, torch.Tensor]:
    """ComfyUI names (and the interleaved gate/up banks) for a llama.cpp gpt-oss file's tensors.

    Raises:
        GGUFError: a block with only one of gate/up, parts whose shapes do not pair, or a tensor of a block
            part this map does not know (it would otherwise reach ComfyUI under llama.cpp's name).
    """
    mapped: dict[str, torch.Tensor] = {}
    gate_up: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        if name in _DROPPED:
            continue
        if name in _TOP:
            mapped[_TOP[name]] = tensor
            continue
        match = _BLOCK.match(name)
        if match is None:
            raise GGUFError(f"{source}: tensor {echo(name)} is not part of a gpt-oss text encoder")
        index, part, kind = match["index"], match["part"], match["kind"]
        if part in _GATE_UP_PARTS:
            gate_up.setdefault((index, kind), {})[part] = tensor
        elif part == "attn_sinks":
            mapped[f"layers.{index}.self_attn.sinks"] = _plain(tensor)
        elif part in _BLOCK_PARTS:
            mapped[f"layers.{index}.{_BLOCK_PARTS[part]}.{kind}"] = _plain(tensor) if part in _PLAIN_PARTS else tensor
        else:
            raise GGUFError(f"{source}: tensor {echo(name)}: block part {echo(part)} has no ComfyUI GPT-OSS name")
    for (index, kind), parts in gate_up.items():
        where = f"{source}: blk.{index} gate/up experts ({kind})"
        mapped[f"layers.{index}.mlp.experts.gate_up_proj.{kind}"] = _gate_up_bank(parts, where)
    return mapped


def _gate_up_bank(parts: Mapping[str, torch.Tensor], where: str) -> torch.Tensor:
    if "ffn_gate_up_exps" in parts:
        if len(parts) != 1:
            raise GGUFError(f"{where}: both the fused ffn_gate_up_exps and separate ffn_gate/up_exps")
        fused = parts["ffn_gate_up_exps"]
        rows = _rows(fused, where)
        if rows % 2:
            raise GGUFError(f"{where}: fused ffn_gate_up_exps has an odd number of rows ({rows})")
        gate, up = _split_rows(fused, rows // 2)
    elif set(parts) == {"ffn_gate_exps", "ffn_up_exps"}:
        gate, up = parts["ffn_gate_exps"], parts["ffn_up_exps"]
    else:
        raise GGUFError(f"{where}: ffn_gate_exps and ffn_up_exps must both be present (found {sorted(parts)})")
    if tuple(gate.shape) != tuple(up.shape) or len(gate.shape) not in (2, 3):
        raise GGUFError(f"{where}: gate {tuple(gate.shape)} and up {tuple(up.shape)} do not pair as expert banks")
    return interleave_rows(gate, up, where)


def _rows(tensor: torch.Tensor, where: str) -> int:
    if len(tensor.shape) not in (2, 3):
        raise GGUFError(f"{where}: expected an expert bank [experts, rows(, columns)], got {tuple(tensor.shape)}")
    return tensor.shape[1]


def _split_rows(tensor: torch.Tensor, half: int) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(tensor, GGMLTensor) and _raw_rows_match(tensor):
        raw = tensor.as_plain()
        shape = (tensor.shape[0], half, *tensor.shape[2:])
        return GGMLTensor(raw[:, :half], tensor.qtype, shape), GGMLTensor(raw[:, half:], tensor.qtype, shape)
    values = _float(tensor) if isinstance(tensor, GGMLTensor) else tensor
    return values[:, :half], values[:, half:]


def interleave_rows(gate: torch.Tensor, up: torch.Tensor, where: str = "gate/up") -> torch.Tensor:
    """[E, R(, C)] gate and up -> [E, 2R(, C)] with gate row i at 2i and up row i at 2i + 1.

    Same-type quantized banks are interleaved as raw rows (a new host tensor the size of both parts; the file's
    mapping is not kept alive). Parts of different types are dequantized to float32 first.
    """
    if isinstance(gate, GGMLTensor) and isinstance(up, GGMLTensor) and gate.qtype == up.qtype \
            and _raw_rows_match(gate) and _raw_rows_match(up):
        raw = torch.stack([gate.as_plain(), up.as_plain()], dim=2)
        raw = raw.reshape(raw.shape[0], raw.shape[1] * 2, *raw.shape[3:])
        return GGMLTensor(raw, gate.qtype, (gate.shape[0], gate.shape[1] * 2, *gate.shape[2:]))
    if isinstance(gate, GGMLTensor) or isinstance(up, GGMLTensor) or gate.dtype != up.dtype:
        gate, up = _float(gate), _float(up)
        logger.info("distorch.gguf: %s: gate and up differ in type; dequantized to float32 (%.1f MiB)", where,
                    2 * gate.numel() * 4 / 2**20)
    stacked = torch.stack([gate, up], dim=2)
    return stacked.reshape(stacked.shape[0], stacked.shape[1] * 2, *stacked.shape[3:])


def _raw_rows_match(tensor: GGMLTensor) -> bool:
    """A 3-D bank whose raw bytes are [E, rows, row bytes] (rows of quantized blocks can be moved whole)."""
    raw = tensor.as_plain()
    return len(tensor.shape) == 3 and raw.dim() == 3 and tuple(raw.shape[:-1]) == tuple(tensor.shape[:-1])


def _float(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.dequantize(torch.float32) if isinstance(tensor, GGMLTensor) else tensor.to(torch.float32)


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.dequantize(torch.float32) if isinstance(tensor, GGMLTensor) else tensor
