"""Gemma 4's dense text models (E2B, E4B, 12B, 31B; LTX-2 with Gemma 4).

Names: Gemma 3's block plus the per-layer inputs (E2B/E4B) and a per-layer output scale. Norms are stored as they
are (llama.cpp's Gemma4Model.norm_shift is 0), Q/K are not permuted, and llama.cpp's `rope_freqs.weight` (the
frequency factors of the global layers' proportional RoPE) is dropped: ComfyUI computes its own.

Tokenizer: Google's tokenizer.json (`tokenizer_json`) rebuilt from the file's vocabulary (gemma4_tokenizer.py).

Refused: the mixture-of-experts 26B-A4B; ComfyUI has no Gemma 4 encoder with experts.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from gguf import Keys

from ..errors import GGUFError, echo
from ..reader import GGUFFile
from .gemma4_tokenizer import GEMMA4_TOKENIZER_MODEL, gemma4_tokenizer_json
from .names import BLOCK, GEMMA2_BLOCK, LLAMA_TOP, top_name

_BLOCK = {**GEMMA2_BLOCK, "inp_gate": "per_layer_input_gate", "proj": "per_layer_projection",
          "post_norm": "post_per_layer_input_norm"}
_TOP = {**LLAMA_TOP, "per_layer_token_embd": "model.embed_tokens_per_layer",
        "per_layer_model_proj": "model.per_layer_model_projection",
        "per_layer_proj_norm": "model.per_layer_projection_norm"}
# Block parts only the mixture-of-experts variant (26B-A4B) has.
EXPERT_PARTS = frozenset({"ffn_gate_inp", "ffn_gate_up_exps", "ffn_down_exps", "pre_ffw_norm_2", "post_ffw_norm_1",
                          "post_ffw_norm_2"})
_DROPPED = frozenset({"rope_freqs.weight"})


def map_tensors(tensors: Mapping[str, torch.Tensor], architecture: str, metadata: Mapping) -> dict[str, torch.Tensor]:
    renamed: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name in _DROPPED:
            continue
        match = BLOCK.match(name)
        part = match["part"] if match and not match["stack"] else None
        if part == "layer_output_scale":
            new_name = f"model.layers.{match['index']}.layer_scalar"  # a buffer in ComfyUI: no .weight
        elif part in _BLOCK:
            new_name = f"model.layers.{match['index']}.{_BLOCK[part]}.{match['kind']}"
        else:
            new_name = top_name(name, _TOP)
        renamed[new_name] = tensor
    return renamed


def tokenizer_model(metadata: Mapping, source: str) -> bytes | None:
    """ComfyUI's Gemma 4 encoders cannot run without their tokenizer.json, and ComfyUI bundles none. A file without
    tokenizer metadata may carry `tokenizer_json` as a tensor of its own (ComfyUI-named conversions); any other
    vocabulary cannot become Gemma 4's."""
    model = metadata.get(Keys.Tokenizer.MODEL)
    if model is None:
        return None
    if model != GEMMA4_TOKENIZER_MODEL:
        raise GGUFError(f"{source}: {Keys.Tokenizer.MODEL} is {echo(model)}; a Gemma 4 text encoder needs the "
                        f"{GEMMA4_TOKENIZER_MODEL!r} vocabulary llama.cpp writes for it")
    return gemma4_tokenizer_json(metadata, source)


def check_file(gguf_file: GGUFFile) -> None:
    experts = next((name for name in gguf_file.tensors if name.startswith("blk.")
                    and name.split(".")[2] in EXPERT_PARTS), None)
    if experts is not None:
        raise GGUFError(f"{gguf_file.path}: {echo(experts)} belongs to Gemma 4's mixture-of-experts model (26B-A4B); "
                        "ComfyUI's Gemma 4 text encoders are the dense E2B, E4B, 12B and 31B models")
