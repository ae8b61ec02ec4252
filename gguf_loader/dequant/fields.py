"""Small helpers that pull fields out of raw GGML blocks (uint8[n_blocks, type_size]).

Bit fields are unpacked four bytes at a time ("SWAR"): the bytes are viewed as int32 words, and one
shift plus one mask per field extracts that field from four bytes at once, already in the order
the block layout wants. This replaces broadcast shifts over tiny trailing dimensions, which torch
cannot vectorise well (3-5x slower on CPU).
"""

from __future__ import annotations

import torch

from .constants import define, table

_LOW_NIBBLES = 0x0F0F0F0F
_LOW_CRUMBS = 0x03030303
_LOW_BITS = 0x01010101


def reinterpret(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8[..., k] bytes as `dtype` (k a multiple of its size), as dense memory: a view, or a copy.

    A view needs the storage offset and every outer stride to be multiples of the item size.
    `.contiguous()` alone does not ensure that: a one-block slice (the last chunk of a tensor, a
    one-block tensor) or a tensor at an odd offset (`general.alignment` 1) is already contiguous and
    comes back unchanged, misaligned. `clone` always allocates, and fresh allocations are aligned.
    Strided inputs are copied too: the bit-field arithmetic that follows runs faster on dense words.
    """
    if not (raw.is_contiguous() and _viewable(raw, dtype.itemsize)):
        raw = raw.clone(memory_format=torch.contiguous_format)
    return raw.view(dtype)


def _viewable(raw: torch.Tensor, itemsize: int) -> bool:
    """True when `raw.view(dtype of itemsize)` is legal: the checks torch makes, done before it raises."""
    return (raw.storage_offset() % itemsize == 0 and raw.stride(-1) == 1
            and all(stride % itemsize == 0 for stride in raw.stride()[:-1]))


def fp16_column(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The fp16 field at byte `offset` of each block, as float32[n_blocks, 1]."""
    raw = blocks[:, offset:offset + 2]
    if not _viewable(raw, 2):
        raw = raw.clone(memory_format=torch.contiguous_format)  # odd block sizes or offsets; a strided view is fine
    return raw.view(torch.float16).to(torch.float32)


def int32_words(blocks: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """`count` little-endian 32-bit words from byte `start` of each block, as int32[n_blocks, count].

    torch has no general uint32 arithmetic, so callers mask after right shifts (`>>` sign-extends).
    """
    return reinterpret(blocks[:, start:start + 4 * count], torch.int32)


def uint16_words(blocks: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """`count` little-endian 16-bit words from byte `start`, zero-extended to int32[n_blocks, count]."""
    words = reinterpret(blocks[:, start:start + 2 * count], torch.int16).to(torch.int32)
    return words.bitwise_and_(0xFFFF)


def _as_words(qs: torch.Tensor) -> torch.Tensor:
    """uint8[..., k] (k a multiple of 4) as int32[..., k // 4]."""
    return reinterpret(qs, torch.int32)


def _split_fields(qs: torch.Tensor, count: int, width: int, mask: int) -> torch.Tensor:
    """uint8[..., count, k]: field i (bits i*width.. of every byte of `qs`) in plane i."""
    words = _as_words(qs)
    # One stack (a memcpy per slice) beats `count` strided writes when k // 4 is small.
    planes = torch.stack([words if i == 0 else words >> (i * width) for i in range(count)], dim=-2)
    return planes.bitwise_and_(mask).view(torch.uint8)


def nibbles(qs: torch.Tensor) -> torch.Tensor:
    """uint8[..., 2, k]: the low nibbles of `qs` (uint8[..., k]) then its high nibbles."""
    return _split_fields(qs, 2, 4, _LOW_NIBBLES)


def crumbs(qs: torch.Tensor) -> torch.Tensor:
    """uint8[..., 4, k]: the 2-bit fields of `qs` (uint8[..., k]) at shifts 0, 2, 4, 6."""
    return _split_fields(qs, 4, 2, _LOW_CRUMBS)


def bit_planes(qs: torch.Tensor) -> torch.Tensor:
    """uint8[..., 8, k]: bit b of every byte of `qs` (uint8[..., k]) in plane b."""
    return _split_fields(qs, 8, 1, _LOW_BITS)


@define("byte_bits_u8")
def _byte_bits() -> torch.Tensor:
    return ((torch.arange(256).view(256, 1) >> torch.arange(8)) & 1).to(torch.uint8)


def bits_lsb_first(qs: torch.Tensor) -> torch.Tensor:
    """uint8[..., k, 8]: the bits of each byte of `qs` (uint8[..., k]), least significant first."""
    bits = torch.index_select(table("byte_bits_u8", qs.device), 0, as_index(qs))
    return bits.view(*qs.shape, 8)


def interleaved_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8[n, 2k]: low then high nibble of each byte of `packed` (uint8[n, k]), byte by byte."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).view(packed.shape[0], -1)


def as_index(values: torch.Tensor) -> torch.Tensor:
    """Flattened int32 copy of `values`, the index dtype `index_select` accepts besides int64."""
    return values.reshape(-1).to(torch.int32)


def gather_rows(lut: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> None:
    """out[i] = lut[index[i]] for rows of `lut` (float32[rows, width]) into `out` (viewed [-1, width])."""
    torch.index_select(lut, 0, index, out=out.view(-1, lut.shape[1]))


def _pack_nibbles(fields: torch.Tensor) -> torch.Tensor:
    """int32 words holding four nibbles at bits 0, 8, 16, 24 -> the 16-bit number n0|n1<<4|n2<<8|n3<<12."""
    fields = fields.bitwise_or_(fields >> 4).bitwise_and_(0x00FF00FF)
    return fields.bitwise_or_(fields >> 8).bitwise_and_(0xFFFF)


def nibble_quads(qs: torch.Tensor) -> torch.Tensor:
    """int32[..., 2, k // 4]: rows of a 65536 x 4 table for the nibbles of `qs` (uint8[..., k]).

    Element order matches `nibbles(qs)`: entry [..., 0, i] packs the low nibbles of bytes 4i..4i+3,
    entry [..., 1, i] their high nibbles. Gathering 4-wide rows costs a quarter of the per-index
    overhead of a 16-entry table lookup per element.
    """
    words = _as_words(qs)
    planes = torch.stack([words, words >> 4], dim=-2).bitwise_and_(_LOW_NIBBLES)
    return _pack_nibbles(planes)


def quad_table(values: torch.Tensor) -> torch.Tensor:
    """float32[65536, 4]: row c holds values[c & 15], values[c >> 4 & 15], values[c >> 8 & 15], values[c >> 12]."""
    codes = torch.arange(65536).view(-1, 1) >> torch.tensor([0, 4, 8, 12])
    return values.view(-1)[codes & 15].to(torch.float32).contiguous()
