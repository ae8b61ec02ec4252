"""The text-encoder families: one record per family of llama.cpp text encoders, and the dispatch through them.

A family is the llama.cpp architectures whose files one module of this package turns into what ComfyUI's encoder
for them reads: ComfyUI's tensor names (with the value changes llama.cpp's converter made undone) and, where
ComfyUI's encoder reads its tokenizer from the state dict, that tokenizer rebuilt from `tokenizer.ggml.*`.

| family          | architectures                  | tokenizer entry  | ComfyUI encoders                            |
|-----------------|--------------------------------|------------------|---------------------------------------------|
| T5 / UMT5       | t5, t5encoder                  | `spiece_model` * | UMT5 (Wan, ACE), T5-XXL (Flux, SD3)         |
| GPT-OSS         | gpt-oss                        | `tokenizer_json` | GPT-OSS 20B (Lens)                          |
| Gemma 4         | gemma4                         | `tokenizer_json` | Gemma 4 E2B/E4B/12B/31B (LTX-2)             |
| Gemma 1-3       | gemma, gemma2, gemma3          | `spiece_model`   | Gemma 2/3 (Lumina 2, NewBie, LTX-2)         |
| Qwen            | qwen2, qwen2vl, qwen3, qwen3vl | ComfyUI's own    | Qwen2.5-VL (Qwen-Image), Qwen3 (Z-Image)    |
| Llama / Mistral | llama, mistral3                | `tekken_model` * | Mistral-Small-3 (Flux.2), Llama 3 (HiDream) |
| CLIP text       | clip                           | ComfyUI's own    | CLIP-L (Flux, SD3)                          |

(*) only for some files: T5's own 32,128-piece vocabulary and Llama 3's tokenizer ship with ComfyUI.

To add a family, write its module (see `TextEncoderFamily.module`) and add its record to `FAMILIES`.

This module imports no torch: `arch` reads the architectures and name signatures from it when planning from a
file's header, and a family's module (most need torch) is imported the first time the family is used.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import torch

    from ..reader import GGUFFile

logger = logging.getLogger("distorch.gguf")


class Signature(NamedTuple):
    """Tensor names that identify an architecture when a file declares none: all must be present."""

    architecture: str
    tensors: tuple[str, ...]


@dataclass(frozen=True)
class TextEncoderFamily:
    """One family of llama.cpp text encoders.

    Attributes:
        name: the family in messages and docs.
        architectures: the `general.architecture` values llama.cpp writes for it.
        module: its module in this package, imported on first use. It defines
            `map_tensors(tensors, architecture, metadata) -> dict`: llama.cpp's names -> ComfyUI's, values changed
                back where llama.cpp's converter changed them; names it does not know pass unchanged;
            `tokenizer_model(metadata, source) -> bytes | None` when `tokenizer_key` is set: the tokenizer rebuilt
                from the file's metadata, None when the file has nothing to rebuild;
            `check_file(gguf_file)` if some of the family's files have no ComfyUI encoder: refuses them in one line.
        tokenizer_key: the state-dict entry ComfyUI's encoder reads its tokenizer from; None when ComfyUI ships it.
        signatures: guesses for files that declare no architecture, most specific first.
    """

    name: str
    architectures: tuple[str, ...]
    module: str
    tokenizer_key: str | None = None
    signatures: tuple[Signature, ...] = ()

    def map_tensors(self, tensors: Mapping[str, torch.Tensor], architecture: str,
                    metadata: Mapping) -> dict[str, torch.Tensor]:
        return self.code().map_tensors(tensors, architecture, metadata)

    def tokenizer_model(self, metadata: Mapping, source: str) -> bytes | None:
        return None if self.tokenizer_key is None else self.code().tokenizer_model(metadata, source)

    def check_file(self, gguf_file: GGUFFile) -> None:
        check = getattr(self.code(), "check_file", None)
        if check is not None:
            check(gguf_file)

    def fixed_token_ids(self, architecture: str) -> tuple[tuple[str, int, str], ...]:
        """(text, id, hint) its ComfyUI tokenizer emits whatever the file's vocabulary: the module's
        `FIXED_TOKEN_IDS[architecture]`, if any."""
        return getattr(self.code(), "FIXED_TOKEN_IDS", {}).get(architecture, ())

    def code(self) -> ModuleType:
        """The family's module; imported here, on first use, so that reading the table never imports torch."""
        return importlib.import_module(f".{self.module}", __name__)


# Guessing takes the first signature that matches: a family comes before any family whose signatures its own
# contain (Gemma 4 before Gemma 2, Gemma 3 before Qwen 3, Qwen before Llama).
FAMILIES = (
    TextEncoderFamily(
        "T5 / UMT5", architectures=("t5", "t5encoder"), module="t5", tokenizer_key="spiece_model",
        signatures=(Signature("t5", ("enc.blk.0.attn_q.weight", "dec.blk.0.attn_q.weight")),
                    Signature("t5encoder", ("enc.blk.0.attn_q.weight",)))),
    TextEncoderFamily(
        "GPT-OSS", architectures=("gpt-oss",), module="gpt_oss", tokenizer_key="tokenizer_json",
        signatures=(Signature("gpt-oss", ("blk.0.attn_sinks.weight", "blk.0.ffn_gate_inp.weight")),)),
    TextEncoderFamily(
        "Gemma 4", architectures=("gemma4",), module="gemma4", tokenizer_key="tokenizer_json",
        signatures=(Signature("gemma4", ("blk.0.post_ffw_norm.weight", "blk.0.layer_output_scale.weight")),)),
    TextEncoderFamily(
        "Gemma 1-3", architectures=("gemma", "gemma2", "gemma3"), module="gemma", tokenizer_key="spiece_model",
        signatures=(Signature("gemma3", ("blk.0.post_ffw_norm.weight", "blk.0.attn_q_norm.weight")),
                    Signature("gemma2", ("blk.0.post_ffw_norm.weight",)))),
    TextEncoderFamily(
        "Qwen", architectures=("qwen2", "qwen2vl", "qwen3", "qwen3vl"), module="qwen",
        signatures=(Signature("qwen3", ("blk.0.attn_q_norm.weight", "blk.0.attn_q.weight")),
                    Signature("qwen2", ("blk.0.attn_q.bias",)))),
    TextEncoderFamily(
        "Llama / Mistral", architectures=("llama", "mistral3"), module="llama", tokenizer_key="tekken_model",
        signatures=(Signature("llama", ("blk.0.attn_q.weight", "token_embd.weight")),)),
    TextEncoderFamily(
        "CLIP text", architectures=("clip",), module="clip",
        signatures=(Signature("clip", ("t.blk.0.attn_q.weight",)),
                    Signature("clip", ("text_model.encoder.layers.0.self_attn.q_proj.weight",)))),
)


def _by_architecture(families: tuple[TextEncoderFamily, ...]) -> dict[str, TextEncoderFamily]:
    table: dict[str, TextEncoderFamily] = {}
    for family in families:
        for architecture in family.architectures:
            if architecture in table:
                raise ValueError(f"architecture {architecture!r} is in two text-encoder families: "
                                 f"{table[architecture].name} and {family.name}")
            table[architecture] = family
    return table


_BY_ARCHITECTURE = _by_architecture(FAMILIES)
TEXT_ARCHITECTURES = frozenset(_BY_ARCHITECTURE)


def family_for(architecture: str | None) -> TextEncoderFamily | None:
    """The family that reads files of `architecture` (`general.architecture`), or None."""
    return _BY_ARCHITECTURE.get(architecture)


def map_text_encoder(tensors: Mapping[str, torch.Tensor], architecture: str | None,
                     metadata: Mapping | None = None) -> dict[str, torch.Tensor]:
    """Renames (and where needed un-permutes) a llama.cpp text encoder's tensors for ComfyUI.

    Args:
        tensors: name -> tensor, as read from the file.
        architecture: `general.architecture` (e.g. "t5encoder", "llama", "qwen3"). Unknown values
            return the tensors unchanged.
        metadata: the file's metadata; needed for LLaMA head counts.

    Returns:
        A new dict; tensors are the same objects except un-permuted Q/K, shifted Gemma norms and GPT-OSS's
        interleaved gate/up banks.

    Example:
        >>> f = read_gguf("Qwen3-4B-Q4_K_M.gguf")  # doctest: +SKIP
        >>> sd = map_text_encoder(f.tensors, f.architecture, f.metadata)  # doctest: +SKIP
        >>> "model.layers.0.self_attn.q_proj.weight" in sd  # doctest: +SKIP
        True
    """
    family = family_for(architecture)
    if family is None:
        logger.debug("distorch.gguf: no text-encoder name map for architecture %r; names kept", architecture)
        return dict(tensors)
    return family.map_tensors(tensors, architecture, metadata or {})
