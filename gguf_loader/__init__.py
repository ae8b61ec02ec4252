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
    sentencepiece_model(metadata)   -> SentencePiece model rebuilt from a "t5" GGUF tokenizer (UMT5)
    map_vision_tower(tensors)       -> llama.cpp Qwen2.5-VL mmproj names -> ComfyUI `visual.*` names
    GGUFFileWriter / write_gguf     -> streaming writer (gguf-py underneath)
    GGUFError                       -> every malformed, truncated or unsupported file
"""

from .api import dequantize
from .arch import IMAGE_ARCHITECTURES, TEXT_ARCHITECTURES, Architecture, detect_architecture, model_kind
from .dequant import dequantize_blocks, supported_qtypes
from .errors import GGUFError
from .ops import GGUFLayer, GGUFOpsConfig, make_ops
from .quantize import quantize_q8_0
from .reader import GGUFFile, GGUFHeader, TensorInfo, read_gguf, read_gguf_header
from .tensor import GGMLMeta, GGMLTensor, is_quantized
from .text_encoders import map_text_encoder, map_vision_tower, unpermute_qk
from .tokenizer import sentencepiece_model
from .writer import GGUFFileWriter, can_quantize, write_gguf

__all__ = [
    "IMAGE_ARCHITECTURES", "TEXT_ARCHITECTURES", "Architecture", "GGMLMeta", "GGMLTensor", "GGUFError", "GGUFFile",
    "GGUFFileWriter", "GGUFHeader", "GGUFLayer", "GGUFOpsConfig", "TensorInfo", "can_quantize", "dequantize",
    "dequantize_blocks", "detect_architecture", "is_quantized", "make_ops", "map_text_encoder", "map_vision_tower",
    "model_kind", "quantize_q8_0", "read_gguf", "read_gguf_header", "sentencepiece_model", "supported_qtypes",
    "unpermute_qk", "write_gguf",
]
