"""GGUF files in ComfyUI: state dicts from the pack's GGUF engine and ComfyUI operations that run them.

Quantized weights stay GGMLTensors (raw bytes) inside the model; the operations dequantize them on
the compute device at each forward and apply ComfyUI's per-layer weight functions (LoRA) after
dequantization. The operations class is built per model from an immutable config.
"""

import logging

import comfy.ops
import comfy.utils
import torch

from ..gguf_loader import GGUFOpsConfig, make_ops, map_text_encoder, model_kind, read_gguf, sentencepiece_model

logger = logging.getLogger("distorch.nodes")

# ComfyUI ships the T5 tokenizer (32,128 pieces) for Flux/SD3; larger unigram vocabularies (UMT5 for Wan)
# must come with the model as `spiece_model`, which GGUF files carry as metadata.
_BUNDLED_T5_VOCAB = 32128
_LAYERS = ("Linear", "Conv1d", "Conv2d", "Conv3d", "Embedding", "LayerNorm", "GroupNorm", "RMSNorm")


def comfy_gguf_operations(config: GGUFOpsConfig | None = None) -> type:
    """A fresh `custom_operations` class: core's manual_cast with the layers replaced by GGUF layers.

    Subclassing manual_cast keeps everything core model code expects of an operations class
    (`conv_nd`, ConvTranspose, ...); only the layers GGUF weights can reach are swapped.
    """
    layers = make_ops(config or GGUFOpsConfig(), base=comfy.ops.manual_cast)
    members = {name: getattr(layers, name) for name in _LAYERS if hasattr(layers, name)}
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
    """One state dict per file: GGUF files mapped from llama.cpp names, others read by ComfyUI."""
    state_dicts = []
    for path in paths:
        if path.lower().endswith(".gguf"):
            gguf_file = read_gguf(path)
            logger.info("distorch: %s: gguf qtypes: %s", path, gguf_file.qtype_summary())
            state_dict = map_text_encoder(gguf_file.tensors, gguf_file.architecture, gguf_file.metadata)
            _add_sentencepiece_model(state_dict, gguf_file.metadata, path)
            state_dicts.append(state_dict)
        else:
            state_dicts.append(comfy.utils.load_torch_file(path, safe_load=True))
    return state_dicts, comfy_gguf_operations()


def _add_sentencepiece_model(state_dict: dict, metadata: dict, path: str) -> None:
    if "spiece_model" in state_dict or len(metadata.get("tokenizer.ggml.tokens") or ()) <= _BUNDLED_T5_VOCAB:
        return
    proto = sentencepiece_model(metadata, path)
    if proto is not None:
        state_dict["spiece_model"] = torch.frombuffer(bytearray(proto), dtype=torch.uint8)
