"""Gemma 1, 2 and 3 text encoders (Lumina 2, NewBie, LTX-2).

Names: the LLaMA-block decoder names, with Gemma 2/3's four norms per block. llama.cpp's Gemma converters store
RMSNorm weights as 1 + w (llama.cpp's norm multiplies by w, Gemma's by 1 + w, which ComfyUI implements); the stored
value minus one is restored. Q/K are not permuted.

Tokenizer: the SentencePiece BPE model (`spiece_model`) rebuilt from the file's "llama" vocabulary; ComfyUI's Gemma
encoders tokenize with SentencePiece, so any other vocabulary is refused.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from gguf import Keys

from ..errors import GGUFError, echo
from ..tensor import GGMLTensor
from .names import GEMMA2_BLOCK, LLAMA_BLOCK, decoder_name
from .sentencepiece import sentencepiece_model

# Text that ComfyUI's tokenizer turns into a fixed id whatever the vocabulary (comfy/text_encoders/lt.py, lumina2.py),
# and what the user can do when a llama.cpp table is too short for it (gguf_loader/embedding_rows.py).
FIXED_TOKEN_IDS: dict[str, tuple[tuple[str, int, str], ...]] = {
    "gemma3": (("<image_soft_token>", 262144, "ComfyUI reads it as Gemma 3's image placeholder; remove it from the "
                                              "prompt, or use the safetensors text encoder"),),
}
_FOUR_NORM_ARCHITECTURES = frozenset({"gemma2", "gemma3"})
_SENTENCEPIECE_BPE = "llama"  # llama.cpp's name for a SentencePiece BPE vocabulary


def map_tensors(tensors: Mapping[str, torch.Tensor], architecture: str, metadata: Mapping) -> dict[str, torch.Tensor]:
    block = GEMMA2_BLOCK if architecture in _FOUR_NORM_ARCHITECTURES else LLAMA_BLOCK
    return {decoder_name(name, block): _minus_one(tensor) if name.endswith("norm.weight") else tensor
            for name, tensor in tensors.items()}


def tokenizer_model(metadata: Mapping, source: str) -> bytes | None:
    model = metadata.get(Keys.Tokenizer.MODEL)
    if model != _SENTENCEPIECE_BPE:
        found = "missing" if model is None else f"{echo(model)}"
        raise GGUFError(f"{source}: {Keys.Tokenizer.MODEL} is {found}; ComfyUI's Gemma encoders tokenize with "
                        "SentencePiece, which needs the file's 'llama' (SentencePiece) vocabulary")
    return sentencepiece_model(metadata, source)


def _minus_one(tensor: torch.Tensor) -> torch.Tensor:
    values = tensor.dequantize(torch.float32) if isinstance(tensor, GGMLTensor) else tensor.to(torch.float32)
    shifted = values - 1
    return shifted if isinstance(tensor, GGMLTensor) else shifted.to(tensor.dtype)
