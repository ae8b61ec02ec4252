"""GGUF text-encoder files as the state dicts ComfyUI's text-encoder loaders expect.

A llama.cpp text-encoder file becomes ComfyUI's tensor names (text_encoders.py) plus the tokenizer
ComfyUI's encoder for that family reads from the state dict, rebuilt from the file's metadata:

| architecture          | tokenizer in the file        | entry          | ComfyUI encoder                       |
|-----------------------|------------------------------|----------------|---------------------------------------|
| t5, t5encoder (*)     | "t5" (SentencePiece unigram) | `spiece_model` | UMT5-XXL (Wan), UMT5-base (ACE)       |
| gemma, gemma2, gemma3 | "llama" (SentencePiece BPE)  | `spiece_model` | Gemma 2/3 (Lumina 2, NewBie, LTX-2)   |
| llama, mistral3       | "gpt2", pre-tokenizer tekken | `tekken_model` | Mistral-Small-3 (Flux.2), Ministral-3 |
| gpt-oss               | "gpt2", pre-tokenizer gpt-4o | `tokenizer_json` | GPT-OSS 20B (Lens)                  |
| gemma4                | "gemma4" (BPE with merges)   | `tokenizer_json` (HF) | Gemma 4 E2B/E4B/12B/31B, LTX-2 |

(*) unless the vocabulary is T5's own 32,128 pieces. Those, and the other families (Llama 3, Qwen), use the
tokenizers ComfyUI ships; a T5-base file given `spiece_model` would also be taken for ACE's UMT5-base.

A llama.cpp vision projector ("mmproj") file is not a text encoder of its own: its Qwen2.5-VL vision
tower becomes the `visual.*` weights of the Qwen2.5-VL text encoder it is paired with, which is how
ComfyUI's Qwen-Image(-Edit) encoder holds them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from gguf import Keys

from .arch import TEXT_ARCHITECTURES
from .errors import GGUFError, echo
from .gpt_oss import GPT_OSS_ARCHITECTURES
from .hf_tokenizer import hf_tokenizer_json
from .hf_tokenizer_gemma4 import GEMMA4_TOKENIZER_MODEL, gemma4_tokenizer_json
from .reader import GGUFFile
from .tekken import tekken_model
from .text_encoders import (
    GEMMA4_ARCHITECTURE,
    GEMMA4_EXPERT_PARTS,
    T5_ARCHITECTURES,
    map_text_encoder,
    map_vision_tower,
)
from .tokenizer import sentencepiece_model

# ComfyUI ships T5's tokenizer (32,128 pieces) for Flux, SD3, LTX-Video, Stable Audio and others.
BUNDLED_T5_VOCAB = 32128
GEMMA_ARCHITECTURES = frozenset({"gemma", "gemma2", "gemma3"})
TEKKEN_ARCHITECTURES = frozenset({"llama", "mistral3"})
# llama.cpp projector types whose vision tower is Qwen2.5-VL's (RMSNorm, gated MLP, window attention).
QWEN25_VL_PROJECTORS = frozenset({"qwen2.5vl_merger", "qwen2vl_merger"})
_PROJECTOR_TYPE = "clip.projector_type"


class EncoderPart(NamedTuple):
    """One loaded file: its name (for messages), its state dict, and whether it is a vision projector."""

    source: str
    state_dict: dict
    is_projector: bool


def text_encoder_state_dict(gguf_file: GGUFFile) -> dict:
    """ComfyUI names for the file's tensors, plus the tokenizer entry its ComfyUI encoder reads.

    Raises:
        GGUFError: tensors the family's name map cannot place, malformed tokenizer metadata, or a Gemma file whose
            vocabulary is not SentencePiece; the message starts with the file.
    """
    _check_known_text_architecture(gguf_file)
    _check_gemma4_variant(gguf_file)
    try:
        state_dict = map_text_encoder(gguf_file.tensors, gguf_file.architecture, gguf_file.metadata)
    except GGUFError as error:  # the name maps know tensors and metadata, not the file they came from
        raise GGUFError(f"{gguf_file.path}: {error}") from None
    state_dict.update(tokenizer_entries(gguf_file.metadata, gguf_file.architecture, gguf_file.path))
    return state_dict


def _check_known_text_architecture(gguf_file: GGUFFile) -> None:
    """A llama.cpp file of an architecture without a name map would reach ComfyUI with llama.cpp's names (and
    no tokenizer), and fail there far from the cause; files already in ComfyUI's names pass as they are."""
    architecture = gguf_file.architecture
    if architecture in TEXT_ARCHITECTURES or not any(_is_llama_cpp_name(name) for name in gguf_file.tensors):
        return
    raise GGUFError(f"{gguf_file.path}: llama.cpp architecture {echo(architecture)} is not supported as a text "
                    f"encoder (supported: {', '.join(sorted(TEXT_ARCHITECTURES))})")


def _check_gemma4_variant(gguf_file: GGUFFile) -> None:
    if gguf_file.architecture != GEMMA4_ARCHITECTURE:
        return
    experts = next((name for name in gguf_file.tensors if name.startswith("blk.")
                    and name.split(".")[2] in GEMMA4_EXPERT_PARTS), None)
    if experts is not None:
        raise GGUFError(f"{gguf_file.path}: {echo(experts)} belongs to Gemma 4's mixture-of-experts model (26B-A4B); "
                        "ComfyUI's Gemma 4 text encoders are the dense E2B, E4B, 12B and 31B models")


def _is_llama_cpp_name(name: str) -> bool:
    return name.startswith(("blk.", "enc.blk.", "token_embd.", "output_norm."))


def tokenizer_entries(metadata: Mapping, architecture: str | None, source: str) -> dict[str, torch.Tensor]:
    """The tokenizer state-dict entries (uint8 tensors) ComfyUI's encoder for `architecture` reads."""
    model = metadata.get(Keys.Tokenizer.MODEL)
    tokens = metadata.get(Keys.Tokenizer.LIST)
    if architecture in T5_ARCHITECTURES and tokens is not None and len(tokens) != BUNDLED_T5_VOCAB:
        return _entry("spiece_model", sentencepiece_model(metadata, source))
    if architecture in GEMMA_ARCHITECTURES:
        if model != "llama":
            found = "missing" if model is None else f"{echo(model)}"
            raise GGUFError(f"{source}: {Keys.Tokenizer.MODEL} is {found}; ComfyUI's Gemma encoders tokenize with "
                            "SentencePiece, which needs the file's 'llama' (SentencePiece) vocabulary")
        return _entry("spiece_model", sentencepiece_model(metadata, source))
    if architecture in TEKKEN_ARCHITECTURES:
        return _entry("tekken_model", tekken_model(metadata, source))
    if architecture in GPT_OSS_ARCHITECTURES:
        return _entry("tokenizer_json", hf_tokenizer_json(metadata, source))
    if architecture == GEMMA4_ARCHITECTURE:
        return _entry("tokenizer_json", _gemma4_tokenizer(metadata, source))
    return {}


def _gemma4_tokenizer(metadata: Mapping, source: str) -> bytes | None:
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


def _entry(key: str, payload: bytes | None) -> dict[str, torch.Tensor]:
    if payload is None:
        return {}
    return {key: torch.frombuffer(bytearray(payload), dtype=torch.uint8)}


# -- vision projectors ----------------------------------------------------------------------------------

def is_vision_projector(gguf_file: GGUFFile) -> bool:
    """A llama.cpp mmproj file: `general.type` "mmproj", or a "clip" file holding vision (`v.`) tensors."""
    if gguf_file.metadata.get(Keys.General.TYPE) == "mmproj":
        return True
    return gguf_file.architecture == "clip" and any(name.startswith("v.blk.") for name in gguf_file.tensors)


def vision_projector_state_dict(gguf_file: GGUFFile) -> dict:
    """The Qwen2.5-VL vision tower of an mmproj file under ComfyUI's `visual.*` names.

    Raises:
        GGUFError: the projector is not a Qwen2.5-VL one (the only vision tower ComfyUI's Qwen
            encoders run).
    """
    projector = gguf_file.metadata.get(_PROJECTOR_TYPE)
    gated = "v.blk.0.ffn_gate.weight" in gguf_file.tensors
    if (projector is not None and projector not in QWEN25_VL_PROJECTORS) or not gated:
        raise GGUFError(f"{gguf_file.path}: vision projector {echo(projector)} is not a Qwen2.5-VL one (no gated "
                        "v.blk.0.ffn_gate); ComfyUI's Qwen-Image encoder runs only Qwen2.5-VL's vision tower")
    return map_vision_tower(gguf_file.tensors)


def attach_vision_towers(parts: Sequence[EncoderPart]) -> list[dict]:
    """The text encoders' state dicts, each paired vision projector merged into its text encoder.

    Users load an mmproj file as a second file beside the text encoder (DualCLIPLoader-style); ComfyUI
    expects one state dict holding both.

    Raises:
        GGUFError: a projector without exactly one text encoder to join, a text encoder that already
            has a vision tower, or a projector whose output width differs from the encoder's hidden size.
    """
    towers = [p for p in parts if p.is_projector]
    texts = [p for p in parts if not p.is_projector]
    if not towers:
        return [p.state_dict for p in parts]
    if len(towers) > 1 or len(texts) != 1:
        names = ", ".join(p.source for p in parts)
        raise GGUFError(f"a vision projector (mmproj) pairs with exactly one text encoder; got {len(towers)} "
                        f"projector(s) and {len(texts)} text encoder(s): {names}")
    tower, text = towers[0], texts[0]
    _check_pairing(tower, text)
    return [{**text.state_dict, **tower.state_dict}]


def _check_pairing(tower: EncoderPart, text: EncoderPart) -> None:
    if any(key.startswith("visual.") for key in text.state_dict):
        raise GGUFError(f"{text.source} already holds a vision tower (visual.*); {tower.source} is not needed")
    embedding = text.state_dict.get("model.embed_tokens.weight")
    projection = tower.state_dict.get("visual.merger.mlp.2.weight")
    if embedding is not None and projection is not None and projection.shape[0] != embedding.shape[1]:
        raise GGUFError(f"{tower.source} projects images to width {projection.shape[0]}, but {text.source} has "
                        f"hidden size {embedding.shape[1]}; pair the mmproj file made for this text encoder")
