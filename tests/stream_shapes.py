"""Real blocks' weight shapes (ComfyUI's Flux.1 and Wan 2.1 14B names), as metadata-only clusters.

A stream format's encoded size is computed from metadata alone, so full-size blocks are measured without
allocating a byte of them.
"""

import math

import torch

from distorch.blocks import TensorCluster, TensorView


def flux_double_block(hidden: int = 3072, head_dim: int = 128, mlp_ratio: int = 4) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for stream in ("img", "txt"):
        shapes.update({
            f"{stream}_mod.lin.weight": (6 * hidden, hidden), f"{stream}_mod.lin.bias": (6 * hidden,),
            f"{stream}_attn.qkv.weight": (3 * hidden, hidden), f"{stream}_attn.qkv.bias": (3 * hidden,),
            f"{stream}_attn.norm.query_norm.scale": (head_dim,), f"{stream}_attn.norm.key_norm.scale": (head_dim,),
            f"{stream}_attn.proj.weight": (hidden, hidden), f"{stream}_attn.proj.bias": (hidden,),
            f"{stream}_mlp.0.weight": (mlp_ratio * hidden, hidden), f"{stream}_mlp.0.bias": (mlp_ratio * hidden,),
            f"{stream}_mlp.2.weight": (hidden, mlp_ratio * hidden), f"{stream}_mlp.2.bias": (hidden,),
        })
    return shapes


def flux_single_block(hidden: int = 3072, head_dim: int = 128, mlp_ratio: int = 4) -> dict[str, tuple[int, ...]]:
    mlp = mlp_ratio * hidden
    return {
        "linear1.weight": (3 * hidden + mlp, hidden), "linear1.bias": (3 * hidden + mlp,),
        "linear2.weight": (hidden, hidden + mlp), "linear2.bias": (hidden,),
        "norm.query_norm.scale": (head_dim,), "norm.key_norm.scale": (head_dim,),
        "modulation.lin.weight": (3 * hidden, hidden), "modulation.lin.bias": (3 * hidden,),
    }


def wan_block(dim: int = 5120, ffn: int = 13824) -> dict[str, tuple[int, ...]]:
    shapes = {"modulation": (1, 6, dim), "norm3.weight": (dim,), "norm3.bias": (dim,),
              "ffn.0.weight": (ffn, dim), "ffn.0.bias": (ffn,), "ffn.2.weight": (dim, ffn), "ffn.2.bias": (dim,)}
    for attention in ("self_attn", "cross_attn"):
        for part in "qkvo":
            shapes[f"{attention}.{part}.weight"] = (dim, dim)
            shapes[f"{attention}.{part}.bias"] = (dim,)
        shapes[f"{attention}.norm_q.weight"] = (dim,)
        shapes[f"{attention}.norm_k.weight"] = (dim,)
    return shapes


BLOCKS = {"flux_double": flux_double_block, "flux_single": flux_single_block, "wan_14b": wan_block}


def metadata_clusters(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype = torch.bfloat16,
                      prefix: str = "blocks.0.") -> tuple[TensorCluster, ...]:
    """One dense single-view cluster per tensor, as `discover` makes for an untied block, without its bytes."""
    clusters = []
    for name, shape in shapes.items():
        stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
        view = TensorView((prefix + name,), 0, dtype, torch.Size(shape), stride)
        clusters.append(TensorCluster("cpu", math.prod(shape) * dtype.itemsize, (view,), frozenset({prefix[:-1]})))
    return tuple(clusters)
