"""The DisTorch GGUF engine: read GGUF files, hold quantized weights, dequantize them in torch.

Imports only torch, numpy, gguf and the standard library (never ComfyUI), and uses relative imports
so it works both as the top-level `gguf_loader` and inside the node pack under any folder name.

Main entry points:
    read_gguf(path)                 -> GGUFFile (.metadata, .architecture, .tensors, ...)
    read_gguf_header(path)          -> GGUFHeader (no tensors; for planning)
    dequantize(tensor, dtype)       -> plain tensor in the logical shape
    GGMLTensor                      -> raw GGML blocks with type and logical shape
    make_ops(config, base)          -> Linear/Conv/Embedding/Norm layers that take GGMLTensor weights
    map_text_encoder(...)           -> llama.cpp tensor names -> ComfyUI text-encoder names
    sentencepiece_model(metadata)   -> SentencePiece model rebuilt from a "t5"/"llama" GGUF tokenizer
    tekken_model(metadata)          -> Mistral tekken.json rebuilt from a "gpt2"/"tekken" GGUF tokenizer
    hf_tokenizer_json(metadata)     -> HF tokenizer.json rebuilt from a "gpt2" GGUF tokenizer (GPT-OSS)
    gemma4_tokenizer_json(metadata) -> Gemma 4 tokenizer.json rebuilt from a Gemma 4 GGUF tokenizer
    text_encoder_state_dict(file)   -> ComfyUI state dict of a text-encoder file (names + tokenizer)
    encoders.FAMILIES               -> one record per text-encoder family (architectures, module, tokenizer entry)
    map_vision_tower(tensors)       -> llama.cpp Qwen2.5-VL mmproj names -> ComfyUI `visual.*` names
    GGUFFileWriter / write_gguf     -> streaming writer (gguf-py underneath)
    GGUFError                       -> every malformed, truncated or unsupported file
"""

import importlib

# Imported on first use, so `import gguf_loader` stays cheap and planning a file from its header
# (gguf_loader.gguf_header) never imports torch.
_EXPORTS = {
    "IMAGE_ARCHITECTURES": "arch", "TEXT_ARCHITECTURES": "arch", "Architecture": "arch",
    "detect_architecture": "arch", "model_kind": "arch",
    "dequantize_blocks": "dequant", "supported_qtypes": "dequant",
    "GGUFError": "errors",
    "EmbeddingTable": "embedding_rows", "embedding_table": "embedding_rows",
    "EncoderPart": "encoder_files", "attach_vision_towers": "encoder_files", "is_vision_projector": "encoder_files",
    "text_encoder_state_dict": "encoder_files", "tokenizer_entries": "encoder_files",
    "vision_projector_state_dict": "encoder_files",
    "GGUFHeader": "gguf_header", "TensorInfo": "gguf_header", "read_gguf_header": "gguf_header",
    "GGUFLayer": "ops", "GGUFOpsConfig": "ops", "make_ops": "ops",
    "quantize_q8_0": "quantize",
    "GGUFFile": "reader", "read_gguf": "reader",
    "GGMLMeta": "tensor", "GGMLTensor": "tensor", "dequantize": "tensor", "is_quantized": "tensor",
    "map_text_encoder": "encoders",
    "map_vision_tower": "encoders.qwen", "unpermute_qk": "encoders.llama", "map_gpt_oss": "encoders.gpt_oss",
    "sentencepiece_model": "encoders.sentencepiece", "tekken_model": "encoders.mistral_tokenizer",
    "hf_tokenizer_json": "encoders.gpt_oss_tokenizer", "gemma4_tokenizer_json": "encoders.gemma4_tokenizer",
    "GGUFMoEExperts": "moe_ops", "make_moe_experts": "moe_ops",
    "GGUFFileWriter": "writer", "can_quantize": "writer", "write_gguf": "writer",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gguf_loader' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "IMAGE_ARCHITECTURES", "TEXT_ARCHITECTURES", "Architecture", "EncoderPart", "GGMLMeta", "GGMLTensor", "GGUFError",
    "GGUFFile", "GGUFFileWriter", "GGUFHeader", "GGUFLayer", "GGUFOpsConfig", "TensorInfo", "attach_vision_towers",
    "can_quantize", "dequantize", "dequantize_blocks", "detect_architecture", "is_quantized", "is_vision_projector",
    "make_ops", "map_text_encoder", "map_vision_tower", "model_kind", "quantize_q8_0", "read_gguf",
    "read_gguf_header", "sentencepiece_model", "supported_qtypes", "tekken_model", "text_encoder_state_dict",
    "tokenizer_entries", "unpermute_qk", "vision_projector_state_dict", "write_gguf",
    "hf_tokenizer_json", "GGUFMoEExperts", "make_moe_experts", "map_gpt_oss",
    "gemma4_tokenizer_json", "EmbeddingTable", "embedding_table",
]
