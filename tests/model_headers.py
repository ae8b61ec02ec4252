"""Header-only model files: the tensor names and shapes of real diffusion models in a sparse safetensors file, so the
planner and the CLI see the real sizes without gigabytes of data (the data section is a hole in the file).

    python tests/model_headers.py wan14b /tmp/wan2.2_t2v_14B_bf16.safetensors   # then: python -m distorch plan ...
"""

import json
import math
import struct
import sys
from pathlib import Path

_BITS = {"BF16": 16, "F16": 16, "F32": 32, "F8_E4M3": 8}


def wan14b_shapes(dim: int = 5120, ffn: int = 13824, layers: int = 40, in_dim: int = 16) -> dict[str, tuple]:
    """Wan 2.1 T2V 14B (Wan 2.2's high- and low-noise 14B models have the same tensors)."""
    shapes = {"patch_embedding.weight": (dim, in_dim, 1, 2, 2), "patch_embedding.bias": (dim,),
              "text_embedding.0.weight": (dim, 4096), "text_embedding.0.bias": (dim,),
              "text_embedding.2.weight": (dim, dim), "text_embedding.2.bias": (dim,),
              "time_embedding.0.weight": (dim, 256), "time_embedding.0.bias": (dim,),
              "time_embedding.2.weight": (dim, dim), "time_embedding.2.bias": (dim,),
              "time_projection.1.weight": (6 * dim, dim), "time_projection.1.bias": (6 * dim,),
              "head.modulation": (1, 2, dim), "head.head.weight": (64, dim), "head.head.bias": (64,)}
    for i in range(layers):
        block = f"blocks.{i}."
        shapes[block + "modulation"] = (1, 6, dim)
        for attention in ("self_attn", "cross_attn"):
            for projection in ("q", "k", "v", "o"):
                shapes[f"{block}{attention}.{projection}.weight"] = (dim, dim)
                shapes[f"{block}{attention}.{projection}.bias"] = (dim,)
            shapes[f"{block}{attention}.norm_q.weight"] = (dim,)
            shapes[f"{block}{attention}.norm_k.weight"] = (dim,)
        shapes[block + "norm3.weight"] = (dim,)
        shapes[block + "norm3.bias"] = (dim,)
        shapes[block + "ffn.0.weight"] = (ffn, dim)
        shapes[block + "ffn.0.bias"] = (ffn,)
        shapes[block + "ffn.2.weight"] = (dim, ffn)
        shapes[block + "ffn.2.bias"] = (dim,)
    return shapes


def write_header_only(path: Path, shapes: dict[str, tuple], dtype: str = "BF16") -> Path:
    """A valid safetensors file of `shapes` whose data section is a hole (no disk used for it)."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * _BITS[dtype] // 8
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header).encode()
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)) + text)
        handle.truncate(8 + len(text) + offset)
    return Path(path)


if __name__ == "__main__":
    builders = {"wan14b": wan14b_shapes}
    if len(sys.argv) != 3 or sys.argv[1] not in builders:
        sys.exit(f"usage: python tests/model_headers.py {{{','.join(builders)}}} OUTPUT.safetensors")
    sys.stdout.write(f"{write_header_only(Path(sys.argv[2]), builders[sys.argv[1]]())}\n")
