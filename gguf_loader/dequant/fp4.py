"""4-bit float types MXFP4 (e8m0 block scale) and NVFP4 (ue4m3 sub-block scales).

Both the element values and the scales come from 16- and 256-entry tables built from gguf-py's own
definitions, so the float32 operands are exactly gguf-py's and one multiply finishes the job.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import quants

from .constants import define, table
from .fields import as_index, gather_rows, nibble_quads, quad_table
from .registry import register


@define("mxfp4_quads_f32")
def _mxfp4_quads() -> torch.Tensor:
    return quad_table(torch.tensor(quants.MXFP4.kvalues, dtype=torch.float32))


@define("mxfp4_scales_f32")
def _mxfp4_scales() -> torch.Tensor:
    scales = quants.MXFP4.e8m0_to_fp32_half(np.arange(256, dtype=np.uint8))
    return torch.from_numpy(np.ascontiguousarray(scales, dtype=np.float32)).view(256, 1)


@register("MXFP4")
def mxfp4(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    d = torch.index_select(table("mxfp4_scales_f32", blocks.device), 0, as_index(blocks[:, 0]))
    gather_rows(table("mxfp4_quads_f32", blocks.device), nibble_quads(blocks[:, 1:]).view(-1), out)
    out.mul_(d.view(n, 1))


if hasattr(quants, "NVFP4"):

    @define("nvfp4_quads_f32")
    def _nvfp4_quads() -> torch.Tensor:
        return quad_table(torch.tensor(quants.NVFP4.kvalues, dtype=torch.float32))

    @define("nvfp4_scales_f32")
    def _nvfp4_scales() -> torch.Tensor:
        scales = quants.NVFP4.ue4m3_to_fp32(np.arange(256, dtype=np.uint8))
        return torch.from_numpy(np.ascontiguousarray(scales, dtype=np.float32)).view(256, 1)

    @register("NVFP4")
    def nvfp4(blocks: torch.Tensor, out: torch.Tensor) -> None:
        n = blocks.shape[0]
        d = torch.index_select(table("nvfp4_scales_f32", blocks.device), 0, as_index(blocks[:, :4]))
        # Each 16-element sub-block: 8 low nibbles, then the 8 high nibbles of the same bytes.
        codes = nibble_quads(blocks[:, 4:].view(n, 4, 8))
        gather_rows(table("nvfp4_quads_f32", blocks.device), codes.view(-1), out)
        out.view(n, 4, 16).mul_(d.view(n, 4, 1))
