"""I-quants: IQ4_NL, IQ4_XS (non-linear 4-bit), IQ2_*, IQ3_* and IQ1_* (lattice codebooks).

The codebook types store, per 4 or 8 elements, an index into a grid plus sign bits (IQ2/IQ3) or a
shift (IQ1). Instead of gathering grid rows and sign bits separately and multiplying full-size
temporaries, each kernel gathers rows of one pre-combined table (grid row x sign pattern, or grid
row + delta) straight into the output and then applies the per-sub-block scale in place.

Bit-exactness with gguf-py: gguf-py computes (scale * grid) * sign; a sign is +-1, and rounding is
symmetric, so scale * (grid * sign) is the same float32 number (zeros keep their sign too). For IQ1
the delta is added to the grid value before scaling, exactly as gguf-py does. Grids, sign tables and
value tables are taken from gguf-py at first use.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import quants

from .constants import define, table
from .fields import (
    bits_lsb_first,
    fp16_column,
    gather_rows,
    int32_words,
    interleaved_nibbles,
    nibble_quads,
    quad_table,
    reinterpret,
    uint16_words,
)
from .registry import register


def _grid(quant_class) -> np.ndarray:
    quant_class.init_grid()
    rows, width = quant_class.grid_shape
    return np.asarray(quant_class.grid, dtype=np.float32).reshape(rows, width)


def _sign_patterns(bits: int) -> np.ndarray:
    """float32[2**bits, bits]: +1 where bit i of the row index is clear, -1 where it is set."""
    code = np.arange(2 ** bits).reshape(-1, 1) >> np.arange(bits).reshape(1, -1)
    return np.where(code & 1, np.float32(-1), np.float32(1)).astype(np.float32)


def _ksigns() -> np.ndarray:
    """The 128 eight-bit sign patterns (7 stored bits plus even parity) indexed by IQ2/IQ3 codes."""
    return np.frombuffer(quants.IQ2_XXS.ksigns, dtype=np.uint8)


def _signed_rows(grid: np.ndarray, signs: np.ndarray) -> torch.Tensor:
    """float32[len(grid) * len(signs), width]: row g * len(signs) + s is grid[g] * signs[s]."""
    combined = grid[:, None, :] * signs[None, :, :]
    return torch.from_numpy(np.ascontiguousarray(combined.reshape(-1, grid.shape[1])))


# --- IQ4_NL / IQ4_XS ---------------------------------------------------------------------------

@define("iq4_quads_f32")
def _iq4_quads() -> torch.Tensor:
    return quad_table(torch.tensor(quants.IQ4_NL.kvalues, dtype=torch.float32))


@register("IQ4_NL")
def iq4_nl(blocks: torch.Tensor, out: torch.Tensor) -> None:
    gather_rows(table("iq4_quads_f32", blocks.device), nibble_quads(blocks[:, 2:]).view(-1), out)
    out.mul_(fp16_column(blocks, 0))


def _iq4_xs_scales(blocks: torch.Tensor) -> torch.Tensor:
    """The eight signed 6-bit scales of IQ4_XS as float32[n, 8]."""
    low = interleaved_nibbles(blocks[:, 4:8]).to(torch.int32)
    high_word = uint16_words(blocks, 2, 1)
    shifts = table("shifts_iq4xs_i32", blocks.device)
    high = torch.bitwise_right_shift(high_word, shifts).bitwise_and_(0x03)
    return (low | (high << 4)).sub_(32).to(torch.float32)


@define("shifts_iq4xs_i32")
def _iq4_xs_shifts() -> torch.Tensor:
    return torch.arange(0, 16, 2, dtype=torch.int32)


@register("IQ4_XS")
def iq4_xs(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    dl = fp16_column(blocks, 0) * _iq4_xs_scales(blocks)
    codes = nibble_quads(blocks[:, 8:].view(n, 8, 16))
    gather_rows(table("iq4_quads_f32", blocks.device), codes.view(-1), out)
    out.view(n, 8, 32).mul_(dl.unsqueeze(-1))


# --- IQ2_XXS / IQ2_XS / IQ2_S ------------------------------------------------------------------

@define("shifts_ksign_i32")
def _ksign_shifts() -> torch.Tensor:
    return torch.tensor([0, 7, 14, 21], dtype=torch.int32)


@define("iq2_xxs_rows_f32")
def _iq2_xxs_rows() -> torch.Tensor:
    return _signed_rows(_grid(quants.IQ2_XXS), _sign_patterns(8)[_ksigns()])


def _quarter_scale(d: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """gguf-py's IQ2 sub-block scale: (d * (0.5 + code)) * 0.25, in that order."""
    return (d * (code.to(torch.float32) + 0.5)) * 0.25


@register("IQ2_XXS")
def iq2_xxs(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    words = int32_words(blocks, 2, 16).view(n, 8, 2)  # per 32 elements: 4 grid bytes, then aux
    aux = words[:, :, 1]
    db = _quarter_scale(fp16_column(blocks, 0), (aux >> 28) & 0x0F)
    sign_codes = torch.bitwise_right_shift(aux.unsqueeze(-1), table("shifts_ksign_i32", blocks.device))
    grid_index = words[:, :, 0:1].view(torch.uint8).view(n, 8, 4).to(torch.int32)
    index = grid_index.bitwise_left_shift_(7).bitwise_or_(sign_codes.bitwise_and_(0x7F))
    gather_rows(table("iq2_xxs_rows_f32", blocks.device), index.view(-1), out)
    out.view(n, 8, 32).mul_(db.unsqueeze(-1))


@define("iq2_xs_rows_f32")
def _iq2_xs_rows() -> torch.Tensor:
    # Indexed by the raw 16-bit code: low 9 bits pick the grid row, high 7 bits the sign pattern.
    rows = _signed_rows(_grid(quants.IQ2_XS), _sign_patterns(8)[_ksigns()]).view(512, 128, 8)
    return rows.transpose(0, 1).reshape(65536, 8)


@register("IQ2_XS")
def iq2_xs(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    db = _quarter_scale(fp16_column(blocks, 0), interleaved_nibbles(blocks[:, 66:74]))
    gather_rows(table("iq2_xs_rows_f32", blocks.device), uint16_words(blocks, 2, 32).view(-1), out)
    out.view(n, 16, 16).mul_(db.unsqueeze(-1))


@define("iq2_s_rows_f32")
def _iq2_s_rows() -> torch.Tensor:
    return _signed_rows(_grid(quants.IQ2_S), _sign_patterns(8))


def _byte_crumbs(packed: torch.Tensor) -> torch.Tensor:
    """int32[n, k, 4]: the 2-bit fields of each byte of `packed` (uint8[n, k]), lowest first."""
    shifts = table("shifts_crumbs_i32", packed.device)
    return torch.bitwise_right_shift(packed.to(torch.int32).unsqueeze(-1), shifts).bitwise_and_(0x03)


@define("shifts_crumbs_i32")
def _crumb_shifts() -> torch.Tensor:
    return torch.tensor([0, 2, 4, 6], dtype=torch.int32)


@register("IQ2_S")
def iq2_s(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    db = _quarter_scale(fp16_column(blocks, 0), interleaved_nibbles(blocks[:, 74:82]))
    high = _byte_crumbs(blocks[:, 66:74]).view(n, 32)  # the 2 high grid-index bits of each group
    index = high.bitwise_left_shift_(8).bitwise_or_(blocks[:, 2:34])
    index = index.bitwise_left_shift_(8).bitwise_or_(blocks[:, 34:66])  # explicit sign byte per 8
    gather_rows(table("iq2_s_rows_f32", blocks.device), index.view(-1), out)
    out.view(n, 16, 16).mul_(db.unsqueeze(-1))


# --- IQ3_XXS / IQ3_S ---------------------------------------------------------------------------

@define("ksigns_u8")
def _ksigns_table() -> torch.Tensor:
    return torch.from_numpy(_ksigns().copy()).view(128, 1)


@define("iq3_xxs_rows_f32")
def _iq3_xxs_rows() -> torch.Tensor:
    return _signed_rows(_grid(quants.IQ3_XXS), _sign_patterns(4))


@register("IQ3_XXS")
def iq3_xxs(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    aux = int32_words(blocks, 66, 8)
    db = (fp16_column(blocks, 0) * (((aux >> 28) & 0x0F).to(torch.float32) + 0.5)) * 0.5
    sign_codes = torch.bitwise_right_shift(aux.unsqueeze(-1), table("shifts_ksign_i32", blocks.device))
    signs = torch.index_select(table("ksigns_u8", blocks.device), 0, sign_codes.bitwise_and_(0x7F).view(-1))
    # Each sign byte covers two 4-wide grid rows: low nibble the first, high nibble the second.
    index = blocks[:, 2:66].to(torch.int32).bitwise_left_shift_(4)
    index.bitwise_or_(interleaved_nibbles(signs.view(n, 32)))
    gather_rows(table("iq3_xxs_rows_f32", blocks.device), index.view(-1), out)
    out.view(n, 8, 32).mul_(db.unsqueeze(-1))


@define("iq3_s_rows_f32")
def _iq3_s_rows() -> torch.Tensor:
    return _signed_rows(_grid(quants.IQ3_S), _sign_patterns(4))


@register("IQ3_S")
def iq3_s(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    db = fp16_column(blocks, 0) * (interleaved_nibbles(blocks[:, 106:110]) * 2 + 1).to(torch.float32)
    high = bits_lsb_first(blocks[:, 66:74]).view(n, 64).to(torch.int32)  # 9th grid-index bit
    index = high.bitwise_left_shift_(8).bitwise_or_(blocks[:, 2:66]).bitwise_left_shift_(4)
    index.bitwise_or_(interleaved_nibbles(blocks[:, 74:106]))
    gather_rows(table("iq3_s_rows_f32", blocks.device), index.view(-1), out)
    out.view(n, 8, 32).mul_(db.unsqueeze(-1))


# --- IQ1_S / IQ1_M -----------------------------------------------------------------------------

@define("iq1_rows_f32")
def _iq1_rows() -> torch.Tensor:
    # Row g + 2048 * b is grid[g] + delta, delta = +0.125 when b == 0 and -0.125 when b == 1.
    grid = _grid(quants.IQ1_S)
    delta = quants.IQ1_S.delta
    return torch.from_numpy(np.concatenate([grid + delta, grid + -delta]).astype(np.float32))


@define("shifts_iq1_i32")
def _iq1_shifts() -> torch.Tensor:
    return torch.tensor([0, 3, 6, 9], dtype=torch.int32)


@register("IQ1_S")
def iq1_s(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    qh = uint16_words(blocks, 34, 8)
    dl = fp16_column(blocks, 0) * (((qh >> 12) & 7) * 2 + 1).to(torch.float32)
    high = torch.bitwise_right_shift(qh.unsqueeze(-1), table("shifts_iq1_i32", blocks.device)).bitwise_and_(7)
    index = high.bitwise_or_(((qh >> 15) & 1).unsqueeze(-1) << 3).bitwise_left_shift_(8)
    index = index.view(n, 32).bitwise_or_(blocks[:, 2:34])
    gather_rows(table("iq1_rows_f32", blocks.device), index.view(-1), out)
    out.view(n, 8, 32).mul_(dl.unsqueeze(-1))


def _iq1_m_scale(words: torch.Tensor) -> torch.Tensor:
    """IQ1_M's fp16 block scale, spread over the top nibbles of its four scale words."""
    top = (words >> 12).to(torch.uint8)  # (n, 4): nibbles 0..3 of the fp16 bit pattern
    pairs = top[:, 0::2].bitwise_or_(top[:, 1::2] << 4)  # little-endian bytes of the fp16 value
    return reinterpret(pairs, torch.float16).to(torch.float32)


@register("IQ1_M")
def iq1_m(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    words = uint16_words(blocks, 48, 4)
    sub_scales = torch.bitwise_right_shift(words.unsqueeze(-1), table("shifts_iq1_i32", blocks.device))
    dl = _iq1_m_scale(words) * (sub_scales.bitwise_and_(7).view(n, 16) * 2 + 1).to(torch.float32)
    # Each nibble of qh: 3 high grid-index bits plus the delta-sign bit -> bits 8..11 of the row.
    index = interleaved_nibbles(blocks[:, 32:48]).to(torch.int32).bitwise_left_shift_(8)
    index.bitwise_or_(blocks[:, :32])
    gather_rows(table("iq1_rows_f32", blocks.device), index.view(-1), out)
    out.view(n, 16, 16).mul_(dl.unsqueeze(-1))
