"""T5 and UMT5 text encoders (Wan's UMT5-XXL, ACE's UMT5-base, T5-XXL for Flux and SD3).

Names: llama.cpp's `enc.blk.N.attn_q` / `dec.blk.N.cross_attn_k` / `enc.blk.N.ffn_up` ... back to Hugging Face's
`encoder.block.N.layer.0.SelfAttention.q` ... A T5 without a gated feed-forward (Cosmos' old T5-XXL) keeps `wi`.

Tokenizer: the SentencePiece unigram model (`spiece_model`) rebuilt from a "t5" vocabulary, unless the vocabulary
is T5's own 32,128 pieces: ComfyUI ships that tokenizer (Flux, SD3, LTX-Video, Stable Audio ...), and a T5-base
file given `spiece_model` would also be taken for ACE's UMT5-base.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from gguf import Keys

from .names import BLOCK, rename, top_name
from .sentencepiece import sentencepiece_model

BUNDLED_T5_VOCAB = 32128

_ATTENTION = {"q": "q", "k": "k", "v": "v", "o": "o", "rel_b": "relative_attention_bias"}
_TOP = {"token_embd": "shared", "output": "lm_head", "enc.output_norm": "encoder.final_layer_norm",
        "dec.output_norm": "decoder.final_layer_norm"}


def map_tensors(tensors: Mapping[str, torch.Tensor], architecture: str, metadata: Mapping) -> dict[str, torch.Tensor]:
    return rename(tensors, _namer(tensors))


def tokenizer_model(metadata: Mapping, source: str) -> bytes | None:
    tokens = metadata.get(Keys.Tokenizer.LIST)
    if tokens is None or len(tokens) == BUNDLED_T5_VOCAB:
        return None
    return sentencepiece_model(metadata, source)


def _namer(tensors: Mapping[str, torch.Tensor]) -> Callable[[str], str]:
    gated = any(name.endswith("ffn_gate.weight") for name in tensors)

    def name_for(name: str) -> str:
        match = BLOCK.match(name)
        if not match or match["stack"] not in ("enc.", "dec."):
            return top_name(name, _TOP)
        mapped = _block_part(match["part"], match["stack"] == "dec.", gated)
        if mapped is None:
            return name
        stack = "decoder" if match["stack"] == "dec." else "encoder"
        return f"{stack}.block.{match['index']}.{mapped}.{match['kind']}"

    return name_for


def _block_part(part: str, decoder: bool, gated: bool) -> str | None:
    ffn_layer = 2 if decoder else 1
    if part.startswith("attn_") and part[5:] in _ATTENTION:
        return f"layer.0.SelfAttention.{_ATTENTION[part[5:]]}"
    if decoder and part.startswith("cross_attn_") and part[11:] in _ATTENTION:
        return f"layer.1.EncDecAttention.{_ATTENTION[part[11:]]}"
    norms = {"attn_norm": "layer.0.layer_norm", "cross_attn_norm": "layer.1.layer_norm",
             "ffn_norm": f"layer.{ffn_layer}.layer_norm"}
    if part in norms:
        return norms[part]
    ffn = {"ffn_gate": "wi_0", "ffn_up": "wi_1" if gated else "wi", "ffn_down": "wo"}
    if part in ffn:
        return f"layer.{ffn_layer}.DenseReluDense.{ffn[part]}"
    return None
