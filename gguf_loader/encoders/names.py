"""llama.cpp's tensor-name patterns and the renaming the family modules share.

llama.cpp names a block's tensors `blk.N.<part>.weight` (`enc.blk.N`/`dec.blk.N` in T5, `t.blk.N` in CLIP text
models, `v.blk.N` in vision towers) and the rest `<part>.weight`. The LLaMA-block decoder names
(`blk.N.attn_q` -> `model.layers.N.self_attn.q_proj`) are shared by Llama, Mistral, Qwen and the Gemmas.
Names that match no rule are kept unchanged, so files that already use ComfyUI names pass through.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch

from ..errors import GGUFError, echo

BLOCK = re.compile(r"^(?P<stack>enc\.|dec\.|t\.)?blk\.(?P<index>\d+)\.(?P<part>\w+)\.(?P<kind>weight|bias)$")
_TOP = re.compile(r"^(?P<part>[\w.]+?)\.(?P<kind>weight|bias)$")

LLAMA_BLOCK = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "ffn_norm": "post_attention_layernorm",
}
# Gemma 2/3 have four norms per block; llama.cpp's ffn_norm is their pre-feed-forward norm.
GEMMA2_BLOCK = {**LLAMA_BLOCK, "post_attention_norm": "post_attention_layernorm",
                "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
LLAMA_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def rename(tensors: Mapping[str, torch.Tensor], namer: Callable[[str], str]) -> dict[str, torch.Tensor]:
    """Each tensor under `namer(name)`; two tensors that land on one name are an error, not a silent overwrite."""
    renamed: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        new_name = namer(name)
        if new_name in renamed:
            raise GGUFError(f"text-encoder name map: {echo(name)} and another tensor both map to {echo(new_name)}")
        renamed[new_name] = tensor
    return renamed


def top_name(name: str, table: Mapping[str, str]) -> str:
    """A tensor outside the blocks (`token_embd.weight`) renamed by `table` (part -> ComfyUI module)."""
    match = _TOP.match(name)
    if match and match["part"] in table:
        return f"{table[match['part']]}.{match['kind']}"
    return name


def decoder_name(name: str, block: Mapping[str, str] = LLAMA_BLOCK) -> str:
    """ComfyUI's name for a LLaMA-block decoder tensor (`model.layers.N.<module>`, `model.embed_tokens`, ...)."""
    match = BLOCK.match(name)
    if match and not match["stack"] and match["part"] in block:
        return f"model.layers.{match['index']}.{block[match['part']]}.{match['kind']}"
    return top_name(name, LLAMA_TOP)
