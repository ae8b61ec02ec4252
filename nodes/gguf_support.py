"""GGUF files in ComfyUI: state dicts from the pack's GGUF engine and ComfyUI operations that run them.

Quantized weights stay GGMLTensors (raw bytes) inside the model; the operations dequantize them on
the compute device at each forward and apply ComfyUI's per-layer weight functions (LoRA) after
dequantization. The operations class is built per model from an immutable config.
"""

import logging

import comfy.ops
import comfy.utils

from ..gguf_loader import (
    EmbeddingTable,
    EncoderPart,
    GGUFOpsConfig,
    attach_vision_towers,
    embedding_table,
    is_vision_projector,
    make_moe_experts,
    make_ops,
    model_kind,
    read_gguf,
    text_encoder_state_dict,
    vision_projector_state_dict,
)

logger = logging.getLogger("distorch.nodes")

_LAYERS = ("Linear", "Conv1d", "Conv2d", "Conv3d", "Embedding", "LayerNorm", "GroupNorm", "RMSNorm")


def comfy_gguf_operations(config: GGUFOpsConfig | None = None) -> type:
    """A fresh `custom_operations` class: core's manual_cast with the layers replaced by GGUF layers.

    Subclassing manual_cast keeps everything core model code expects of an operations class
    (`conv_nd`, ConvTranspose, ...); only the layers GGUF weights can reach are swapped.
    """
    layers = make_ops(config or GGUFOpsConfig(), base=comfy.ops.manual_cast)
    members = {name: getattr(layers, name) for name in _LAYERS if hasattr(layers, name)}
    # Expert banks (ComfyUI 0.33's GPT-OSS); core has this layer only in its mixed-precision operations.
    members["MoEExperts"] = make_moe_experts(config or GGUFOpsConfig())
    return type("DisTorchGGUFOps", (comfy.ops.manual_cast,), members)


def load_gguf_unet_state_dict(path: str, model_options: dict) -> tuple[dict, type]:
    """The diffusion model's tensors (names as the community converters wrote them) and the operations."""
    gguf_file = read_gguf(path)
    if model_kind(gguf_file.architecture) == "text":
        raise ValueError(f"{path}: general.architecture is {gguf_file.architecture!r}, a text encoder; "
                         "load it with a DisTorch CLIP loader")
    if "dtype" in model_options:
        logger.info("distorch: weight_dtype is ignored for GGUF files, which keep their own quantization")
        model_options.pop("dtype")
        model_options.pop("fp8_optimizations", None)
    logger.info("distorch: gguf qtypes: %s", gguf_file.qtype_summary())
    return dict(gguf_file.tensors), comfy_gguf_operations()


def load_text_encoder_state_dicts(paths: list[str]) -> tuple[list[dict], type]:
    """One state dict per text encoder: GGUF files mapped from llama.cpp names (with the tokenizer their ComfyUI
    encoder reads), other files read by ComfyUI; a Qwen2.5-VL mmproj file joins the text encoder beside it. The
    operations know the GGUF files' embedding tables, so a prompt token past one names the file and the token."""
    loaded = [_load_part(path) for path in paths]
    config = GGUFOpsConfig(embedding_tables=tuple(table for _, table in loaded if table is not None))
    return attach_vision_towers([part for part, _ in loaded]), comfy_gguf_operations(config)


def _load_part(path: str) -> tuple[EncoderPart, EmbeddingTable | None]:
    if not path.lower().endswith(".gguf"):
        return EncoderPart(path, comfy.utils.load_torch_file(path, safe_load=True), False), None
    gguf_file = read_gguf(path)
    logger.info("distorch: %s: gguf qtypes: %s", path, gguf_file.qtype_summary())
    if is_vision_projector(gguf_file):
        return EncoderPart(path, vision_projector_state_dict(gguf_file), True), None
    return EncoderPart(path, text_encoder_state_dict(gguf_file), False), embedding_table(gguf_file)
