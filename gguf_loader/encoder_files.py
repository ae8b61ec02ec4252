"""GGUF text-encoder files as the state dicts ComfyUI's text-encoder loaders expect.

A llama.cpp text-encoder file becomes ComfyUI's tensor names plus the tokenizer ComfyUI's encoder for that
family reads from the state dict, rebuilt from the file's metadata; the family's record in `encoders.FAMILIES`
says which module does both and which entry the tokenizer goes in.

A llama.cpp vision projector ("mmproj") file is not a text encoder of its own: its Qwen2.5-VL vision
tower becomes the `visual.*` weights of the Qwen2.5-VL text encoder it is paired with, which is how
ComfyUI's Qwen-Image(-Edit) encoder holds them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from gguf import Keys

from .encoders import TEXT_ARCHITECTURES, family_for, map_text_encoder
from .encoders.qwen import map_vision_tower
from .errors import GGUFError, echo
from .reader import GGUFFile

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
    family = family_for(gguf_file.architecture)
    if family is not None:
        family.check_file(gguf_file)
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


def _is_llama_cpp_name(name: str) -> bool:
    return name.startswith(("blk.", "enc.blk.", "token_embd.", "output_norm."))


def tokenizer_entries(metadata: Mapping, architecture: str | None, source: str) -> dict[str, torch.Tensor]:
    """The tokenizer state-dict entries (uint8 tensors) ComfyUI's encoder for `architecture` reads."""
    family = family_for(architecture)
    if family is None or family.tokenizer_key is None:
        return {}
    payload = family.tokenizer_model(metadata, source)
    if payload is None:
        return {}
    return {family.tokenizer_key: torch.frombuffer(bytearray(payload), dtype=torch.uint8)}


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
