"""Small DiT-shaped safetensors files for the quantize command's tests (Wan 2.1 names, which ComfyUI-GGUF detects).

The shapes cover every rule: 2-D weights that quantize, 1-D norms and biases, a raw 3-D parameter
(`modulation`), a 5-D convolution (`patch_embedding`, stored flat with orig_shape), a weight whose last dim is
not a multiple of 32, a tiny weight, the architecture's kept layers (`text_embedding`, `head`), and probes that
only one rule keeps: a 1-D weight and a raw 2-D parameter, both large, with rows of whole Q8_0 blocks.
"""

from pathlib import Path

import torch
from safetensors.torch import save_file

DIM, FFN, DEPTH = 64, 128, 2


def wan_state_dict(dtype=torch.bfloat16, seed: int = 0, dim: int = DIM, ffn: int = FFN, depth: int = DEPTH) -> dict:
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=0.05):
        return torch.randn(*shape, generator=generator) * scale

    tensors = {
        "patch_embedding.weight": randn(dim, 16, 1, 2, 2),
        "patch_embedding.bias": randn(dim),
        "text_embedding.0.weight": randn(dim, 96),
        "text_embedding.2.weight": randn(dim, dim),
        "time_projection.1.weight": randn(6 * dim, dim),
        "head.head.weight": randn(64, dim),
        "head.modulation": randn(1, 2, dim),
    }
    for i in range(depth):
        block = f"blocks.{i}"
        tensors[f"{block}.modulation"] = randn(1, 6, dim)
        for part in ("q", "k", "v", "o"):
            tensors[f"{block}.self_attn.{part}.weight"] = randn(dim, dim)
            tensors[f"{block}.self_attn.{part}.bias"] = randn(dim, scale=0.01)
        tensors[f"{block}.self_attn.norm_q.weight"] = 1 + randn(dim, scale=0.01)
        tensors[f"{block}.self_attn.norm_k.weight"] = 1 + randn(dim, scale=0.01)
        tensors[f"{block}.ffn.0.weight"] = randn(ffn, dim)
        tensors[f"{block}.ffn.2.weight"] = randn(dim, ffn)
        tensors[f"{block}.ffn.2.bias"] = randn(dim, scale=0.01)
        tensors[f"{block}.odd.weight"] = randn(48, 40)  # last dim not a multiple of 32
        tensors[f"{block}.tiny.weight"] = randn(16, 32)  # 512 elements: too small to quantize
        # Probes, each kept by one rule alone (large enough, rows of whole blocks): 1-D, a raw 2-D parameter.
        tensors[f"{block}.norm3.weight"] = 1 + randn(1280, scale=0.01)
        tensors[f"{block}.scale_shift_table"] = randn(6, 256)
    tensors["blocks.0.ffn.0.weight"][0, :32] = 0  # an all-zero block
    return {k: v.to(dtype).contiguous() for k, v in tensors.items()}


def write_model(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    save_file(tensors, str(path), metadata=metadata)
    return path


def write_large_model(path: Path, tensors: int = 16, rows: int = 4096, cols: int = 2048) -> tuple[Path, int]:
    """A Wan-named bf16 model of `tensors` weights of rows x cols (16 x 16 MB by default), written one tensor at a
    time through a hand-built header so the test process never holds the whole file. Returns (path, largest
    tensor's bytes)."""
    import json
    import struct

    names = {"head.modulation": (1, 2, cols), "text_embedding.2.weight": (cols, 64),
             "blocks.0.self_attn.norm_q.weight": (cols,)}
    names.update({f"blocks.{i}.ffn.0.weight": (rows, cols) for i in range(tensors)})
    header, offset = {}, 0
    for name, shape in names.items():
        nbytes = 2 * int(torch.Size(shape).numel())
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    generator = torch.Generator().manual_seed(0)
    payloads = {}  # one random tensor per shape, written as often as needed: generating 256 MB takes seconds
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)) + text)
        for shape in names.values():
            if shape not in payloads:
                payloads[shape] = (torch.randn(shape, generator=generator) * 0.05).to(torch.bfloat16)
            handle.write(payloads[shape].view(torch.uint8).numpy().data)
    return path, 2 * rows * cols
