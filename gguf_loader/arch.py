"""Model architecture of a GGUF file: `general.architecture`, or a guess from tensor names.

The reader never rejects an architecture. `detect_architecture` reports what the file declares (or,
when it declares nothing usable, what its tensor names look like) and callers decide what to load.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

from gguf import Keys

from .encoders import FAMILIES, TEXT_ARCHITECTURES, Signature

# Architectures of diffusion models written by the community converters (ComfyUI-GGUF convert.py,
# stable-diffusion.cpp); those of the text encoders llama.cpp writes are the families' (encoders.FAMILIES).
IMAGE_ARCHITECTURES = frozenset({
    "flux", "sd1", "sdxl", "sd3", "aura", "hidream", "cosmos", "ltxv", "hyvid", "wan", "lumina2", "qwen_image",
})
# Placeholders some forks write instead of a real architecture; treated as "not declared".
PLACEHOLDER_ARCHITECTURES = frozenset({"pig", "cow"})

_PREFIXES = ("model.diffusion_model.", "model.", "net.", "diffusion_model.")


# First match wins: more specific signatures come before the ones they contain.
_IMAGE_SIGNATURES = (
    Signature("flux", ("double_blocks.0.img_attn.proj.weight",)),
    Signature("sd3", ("joint_blocks.0.x_block.attn.qkv.weight",)),
    Signature("aura", ("double_layers.3.modX.1.weight",)),
    Signature("hidream", ("caption_projection.0.linear.weight",
                          "double_stream_blocks.0.block.ff_i.shared_experts.w3.weight")),
    Signature("cosmos", ("blocks.0.mlp.layer1.weight", "blocks.0.adaln_modulation_cross_attn.1.weight")),
    Signature("ltxv", ("adaln_single.emb.timestep_embedder.linear_2.weight", "transformer_blocks.27.scale_shift_table",
                       "caption_projection.linear_2.weight")),
    Signature("hyvid", ("double_blocks.0.img_attn_proj.weight",
                        "txt_in.individual_token_refiner.blocks.1.self_attn_qkv.weight")),
    Signature("wan", ("blocks.0.self_attn.norm_q.weight", "text_embedding.2.weight", "head.modulation")),
    Signature("qwen_image", ("txt_norm.weight", "transformer_blocks.0.img_mod.1.weight")),
    Signature("lumina2", ("cap_embedder.1.weight", "context_refiner.0.attention.qkv.weight")),
    Signature("sdxl", ("down_blocks.0.downsamplers.0.conv.weight", "add_embedding.linear_1.weight")),
    Signature("sdxl", ("input_blocks.3.0.op.weight", "input_blocks.6.0.op.weight",
                       "output_blocks.2.2.conv.weight", "output_blocks.5.2.conv.weight")),
    Signature("sdxl", ("label_emb.0.0.weight",)),
    Signature("sd1", ("down_blocks.0.downsamplers.0.conv.weight",)),
    Signature("sd1", ("input_blocks.3.0.op.weight", "input_blocks.6.0.op.weight", "input_blocks.9.0.op.weight",
                      "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight",
                      "output_blocks.8.2.conv.weight")),
)
# Text encoders after the image models, in the order of the family table.
_SIGNATURES = (*_IMAGE_SIGNATURES, *(signature for family in FAMILIES for signature in family.signatures))


@dataclass(frozen=True)
class Architecture:
    """What a file says it is, and what this module concludes.

    Attributes:
        name: the architecture to use: the declared one, or a guess from tensor names when the file
            declares none (or a placeholder such as "pig"); None when nothing matched.
        declared: the raw `general.architecture` value (any string, kept even when unknown).
        source: "metadata", "tensor names" or None.
    """

    name: str | None
    declared: str | None
    source: str | None

    @property
    def kind(self) -> str | None:
        """"image" for diffusion models, "text" for text encoders, None when unknown."""
        return model_kind(self.name)


def model_kind(arch: str | None) -> str | None:
    """"image", "text" or None for an architecture name."""
    if arch in IMAGE_ARCHITECTURES:
        return "image"
    if arch in TEXT_ARCHITECTURES:
        return "text"
    return None


def detect_architecture(metadata: dict, tensor_names: Iterable[str]) -> Architecture:
    """The architecture declared in `metadata`, falling back to tensor-name signatures.

    Example:
        >>> detect_architecture({}, ["double_blocks.0.img_attn.proj.weight"]).name
        'flux'
    """
    declared = metadata.get(Keys.General.ARCHITECTURE)
    if not isinstance(declared, str):
        declared = None
    if declared and declared not in PLACEHOLDER_ARCHITECTURES:
        return Architecture(declared, declared, "metadata")
    guessed = guess_from_names(tensor_names)
    if guessed is not None:
        return Architecture(guessed, declared, "tensor names")
    return Architecture(declared, declared, "metadata" if declared else None)


def guess_from_names(tensor_names: Iterable[str]) -> str | None:
    """The first architecture whose signature keys are all present (after common prefixes)."""
    names = _strip_prefixes(set(tensor_names))
    for signature in _SIGNATURES:
        if all(key in names for key in signature.tensors):
            return signature.architecture
    return None


def _strip_prefixes(names: Collection[str]) -> set[str]:
    stripped = set(names)
    for prefix in _PREFIXES:
        stripped.update(name[len(prefix):] for name in names if name.startswith(prefix))
    return stripped


def image_signatures() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(architecture, keys that must all be present) for each diffusion-model signature, in matching order:
    what `guess_from_names` looks for, for messages that say so."""
    return tuple((s.architecture, s.tensors) for s in _IMAGE_SIGNATURES)
