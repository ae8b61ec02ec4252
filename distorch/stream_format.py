"""Stream formats: a streamed block travels smaller than stored and is decoded on the compute device before it runs.

Staging encodes each weight cluster of a block into one flat host buffer (`BlockCodec.encode_into`); the copy
engine moves those bytes into a compute-device slot; at the block's pre-hook one decode on the compute stream
(`BlockCodec.decode_into`) writes every weight back in its STORED dtype, at the offsets the block has as stored
(`stored_offsets`), into a decode buffer, and the block's tensors are pointed there with `TensorView.rebuild_on`.
Layers, LoRA patches and hooks see ordinary tensors of the stored dtype: only their values changed, once, at
staging.

Formats:
    stored      the bytes as stored (today's streaming).
    q8_0        GGUF Q8_0 blocks (32 values, an fp16 scale and 32 int8 codes: 34 bytes), quantized by
                gguf_loader.quantize (bit-identical to gguf-py) and dequantized by gguf_loader's kernels.
    fp8_e4m3fn  one float32 scale per tensor (amax / 448) and float8_e4m3fn values (x / scale, clamped to
                +-448, rounded by torch's cast); decoded as float32(code) * scale, then rounded to the stored dtype.

Which tensors are encoded (everything else travels as stored, bit for bit), from metadata alone (the rules on
name, dtype and shape are stream_rules.py's, which plans from a file header use too):
    - a cluster of exactly one view (tied or aliased tensors share bytes: they stay stored);
    - the view is dense: offset 0, contiguous strides, covering its cluster exactly;
    - float32, float16 or bfloat16 (1-byte dtypes, GGUF blocks, integers and float64 stay);
    - at least 2 dims and more than 1024 elements;
    - named `...weight`, with no name component holding "norm" or "embed" (norms, biases, embeddings and raw
      parameters such as `modulation` keep their stored precision);
    - q8_0 only: the last dim is a multiple of 32 (blocks never straddle rows, as in a GGUF of the weight).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from gguf import GGMLQuantizationType

from .blocks import Block, TensorCluster, TensorView
from .gguf_engine import gguf_module
from .request import StreamFormat
from .stream_rules import (
    DECODE_CHUNK_ELEMENTS,
    FP8_HEADER_BYTES,
    decode_scratch_bytes,
    encoded_tensor_nbytes,
    packed_offsets,
    packed_total,
    tensor_keep_reason,
)
from .units import ALIGNMENT

_q8_0 = gguf_module("quantize")
dequantize_blocks = gguf_module("dequant").dequantize_blocks
Q8_0_BLOCK, Q8_0_BLOCK_BYTES, quantize_q8_0_into = _q8_0.Q8_0_BLOCK, _q8_0.Q8_0_BLOCK_BYTES, _q8_0.quantize_q8_0_into

FP8_MAX = 448.0  # largest finite float8_e4m3fn
# Elements per step: bounds the float32 temporaries of encode (host) and decode (device) whatever a tensor's size.
ENCODE_CHUNK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class TensorCoding:
    """How one cluster travels: encoded or stored, and where it sits in each layout. Plain values only."""

    name: str  # the first name of its first view, for messages
    format: StreamFormat  # STORED when it travels as stored
    reason: str  # why it stays stored ("" when encoded)
    dtype: torch.dtype  # the stored dtype (of its first view)
    shape: tuple[int, ...]
    stored_offset: int  # in the stored layout (the decode buffer)
    stored_nbytes: int
    encoded_offset: int  # in the encoded layout (host buffer and slot)
    encoded_nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def keep_reason(cluster: TensorCluster, fmt: StreamFormat) -> str:
    """Why `cluster` travels as stored in `fmt` ("" when it is encoded), from its metadata alone."""
    fmt = StreamFormat.parse(fmt)
    if fmt == StreamFormat.STORED:
        return "stored format"
    if len(cluster.views) != 1:
        return f"{len(cluster.views)} tensors share its bytes (tied or aliased)"
    view = cluster.views[0]
    numel = math.prod(view.size)
    if view.offset or not _is_dense(view) or cluster.nbytes != numel * view.dtype.itemsize:
        return f"not a dense tensor (strides {view.stride} for size {tuple(view.size)})"
    return tensor_keep_reason(view.names[0], str(view.dtype).removeprefix("torch."), tuple(view.size), fmt)


def _is_dense(view: TensorView) -> bool:
    expected = 1
    for size, stride in zip(reversed(view.size), reversed(view.stride)):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def encoded_size(cluster: TensorCluster, fmt: StreamFormat) -> int:
    """Bytes of `cluster` in `fmt` (its stored bytes when it stays stored)."""
    fmt = StreamFormat.parse(fmt)
    if keep_reason(cluster, fmt):
        return cluster.nbytes
    return encoded_tensor_nbytes(math.prod(cluster.views[0].size), fmt)


def stored_offsets(clusters: Sequence[TensorCluster]) -> list[int]:
    """Where each cluster starts in a block's stored layout: one after another, each on the host buffers'
    alignment (the layout of today's slots; the decode buffer keeps it so TensorView.rebuild_on works there)."""
    return packed_offsets([c.nbytes for c in clusters])


def encoded_nbytes(items: Block | Iterable[TensorCluster | TensorView], fmt: StreamFormat | str) -> int:
    """Bytes a block's weights occupy in `fmt`, laid out as a slot holds them (each cluster aligned), from
    metadata alone: what the planner counts for a streamed block's host buffer, slot and copy.

    `items` is a Block, its clusters, or bare TensorViews (each taken as a cluster of its own).

    Example:
        >>> encoded_nbytes(layout.block("blocks.0"), "q8_0") / encoded_nbytes(layout.block("blocks.0"), "stored")
        0.532...
    """
    clusters = _as_clusters(items)
    sizes = [encoded_size(c, fmt) for c in clusters]
    return packed_total(packed_offsets(sizes), sizes)


def _as_clusters(items) -> list[TensorCluster]:
    if isinstance(items, Block):
        return list(items.clusters)
    clusters = []
    for item in items:
        if isinstance(item, TensorView):
            extent = 1 + sum((n - 1) * s for n, s in zip(item.size, item.stride)) if math.prod(item.size) else 0
            item = TensorCluster("cpu", extent * item.dtype.itemsize, (item,), frozenset())
        clusters.append(item)
    return clusters


@dataclass(frozen=True)
class BlockCodec:
    """Encodes a block's clusters into one flat buffer in a stream format, and decodes them back into the stored
    layout. Describes bytes; holds none (the streamer owns the host buffer, the slot and the decode buffer).

    Build with `BlockCodec.build(block.clusters, "q8_0")`.
    """

    format: StreamFormat
    codings: tuple[TensorCoding, ...]
    stored_nbytes: int  # the stored layout: the decode buffer's size (== today's slot size of the block)
    encoded_nbytes: int  # the encoded layout: host buffer, slot and copy size

    @classmethod
    def build(cls, clusters: Sequence[TensorCluster], fmt: StreamFormat | str,
              offsets: Sequence[int] | None = None) -> BlockCodec:
        """The codec of a block made of `clusters` (in slot order) in `fmt`.

        Args:
            clusters: the block's clusters, in the order the streamer lays them out.
            fmt: the stream format.
            offsets: the stored layout's cluster offsets, when the streamer uses another than `stored_offsets`.
        """
        fmt = StreamFormat.parse(fmt)
        stored = list(offsets) if offsets is not None else stored_offsets(clusters)
        if len(stored) != len(clusters) or any(o % ALIGNMENT for o in stored):
            raise ValueError(f"stored offsets {stored[:4]}... must be one per cluster, each a multiple of {ALIGNMENT}")
        sizes = [encoded_size(c, fmt) for c in clusters]
        encoded = packed_offsets(sizes)
        codings = tuple(_coding(c, fmt, so, eo, n) for c, so, eo, n in zip(clusters, stored, encoded, sizes))
        stored_total = packed_total(stored, [c.nbytes for c in clusters])
        return cls(fmt, codings, stored_total, packed_total(encoded, sizes))

    @property
    def encoded(self) -> tuple[TensorCoding, ...]:
        return tuple(c for c in self.codings if c.format != StreamFormat.STORED)

    def decode_scratch_bytes(self, device_type: str = "cuda") -> int:
        """float32 temporaries one decode allocates at most on a device of `device_type` (beside the decode buffer)."""
        return decode_scratch_bytes([c.numel for c in self.encoded], device_type)

    def encode_into(self, host_flat: torch.Tensor, sources: Sequence[torch.Tensor]) -> None:
        """Writes the encoded block into `host_flat` (uint8, at least `encoded_nbytes`).

        Args:
            host_flat: the block's flat host buffer (or any uint8 buffer); written from its start.
            sources: per cluster, its bytes as stored (a flat uint8 view, e.g. blocks.live_bytes), on any device.
                Encoded tensors are converted in chunks of ENCODE_CHUNK_ELEMENTS on the source's device: the
                temporaries stay a few MB, never a float32 copy of the block.

        Raises:
            ValueError: wrong buffer sizes, or a tensor whose values a format cannot hold (named).
        """
        _check_flat("host buffer", host_flat, self.encoded_nbytes)
        if len(sources) != len(self.codings):
            raise ValueError(f"{len(sources)} sources for {len(self.codings)} clusters")
        for index, source in enumerate(sources):
            self.encode_cluster(index, host_flat, source)

    def encode_cluster(self, index: int, host_flat: torch.Tensor, source: torch.Tensor) -> None:
        """`encode_into` for cluster `index` alone (a staging that reads one cluster at a time from its file)."""
        coding = self.codings[index]
        if source.dtype != torch.uint8 or source.numel() != coding.stored_nbytes:
            raise ValueError(f"source of {coding.name!r} must be {coding.stored_nbytes} uint8 bytes, got "
                             f"{source.numel()} {source.dtype}")
        target = host_flat[coding.encoded_offset:coding.encoded_offset + coding.encoded_nbytes]
        if coding.format == StreamFormat.STORED:
            target.copy_(source)
        else:
            _ENCODERS[coding.format](coding, source.view(coding.dtype), target)

    def decode_into(self, slot_flat: torch.Tensor, out_flat: torch.Tensor) -> None:
        """Writes the block as stored into `out_flat` from its encoded bytes in `slot_flat` (same device).

        Every cluster lands at its stored offset in its stored dtype, so `view.rebuild_on(out_flat, offset +
        view.offset)` gives the block's tensors. Work is only enqueued on the current stream (no host sync):
        call it on the compute stream after the slot's copy is waited on.
        """
        _check_flat("slot", slot_flat, self.encoded_nbytes)
        _check_flat("decode buffer", out_flat, self.stored_nbytes)
        if slot_flat.device != out_flat.device:
            raise ValueError(f"slot on {slot_flat.device} and decode buffer on {out_flat.device}: decode on one device")
        chunk = DECODE_CHUNK_ELEMENTS["cpu" if out_flat.device.type == "cpu" else "device"]
        for coding in self.codings:
            source = slot_flat[coding.encoded_offset:coding.encoded_offset + coding.encoded_nbytes]
            target = out_flat[coding.stored_offset:coding.stored_offset + coding.stored_nbytes]
            if coding.format == StreamFormat.STORED:
                target.copy_(source)
            else:
                _DECODERS[coding.format](coding, source, target.view(coding.dtype), chunk)


def _coding(cluster: TensorCluster, fmt: StreamFormat, stored_offset: int, encoded_offset: int,
            nbytes: int) -> TensorCoding:
    reason = keep_reason(cluster, fmt)
    view = cluster.views[0]
    return TensorCoding(view.names[0], StreamFormat.STORED if reason else fmt, reason, view.dtype, tuple(view.size),
                        stored_offset, cluster.nbytes, encoded_offset, nbytes)


def _check_flat(what: str, flat: torch.Tensor, nbytes: int) -> None:
    if flat.dtype != torch.uint8 or flat.dim() != 1 or flat.numel() < nbytes:
        raise ValueError(f"{what} must be a flat uint8 tensor of at least {nbytes} bytes, got {flat.dtype} "
                         f"{tuple(flat.shape)}")


# -- Q8_0 -----------------------------------------------------------------------------------------

def _encode_q8_0(coding: TensorCoding, values: torch.Tensor, target: torch.Tensor) -> None:
    blocks = target.view(-1, Q8_0_BLOCK_BYTES)
    quantize_q8_0_into(values, blocks, ENCODE_CHUNK_ELEMENTS)
    scales = blocks[:, :2].view(torch.float16)
    if not torch.isfinite(scales).all():  # staging runs on the host: this check costs no device sync
        raise ValueError(f"{coding.name}: a Q8_0 block scale overflows float16 (values beyond +-8.3e6, or NaN/inf); "
                         f"stream this model as stored or fp8_e4m3fn")


def _decode_q8_0(coding: TensorCoding, source: torch.Tensor, target: torch.Tensor, chunk: int) -> None:
    blocks = source.view(-1, Q8_0_BLOCK_BYTES)
    out = target.view(-1, Q8_0_BLOCK)
    step = max(1, chunk // Q8_0_BLOCK)
    for start in range(0, blocks.shape[0], step):
        dequantize_blocks(blocks[start:start + step], GGMLQuantizationType.Q8_0, coding.dtype,
                          out=out[start:start + step])


# -- fp8 ------------------------------------------------------------------------------------------

def fp8_scale(values: torch.Tensor, chunk: int = ENCODE_CHUNK_ELEMENTS) -> torch.Tensor:
    """amax(|values|) / 448 as a float32 scalar tensor, read in chunks (amax is exact in any order)."""
    flat = values.reshape(-1)
    amax = torch.zeros((), dtype=torch.float32, device=values.device)
    for start in range(0, flat.numel(), chunk):
        amax = torch.maximum(amax, flat[start:start + chunk].abs().amax().to(torch.float32))
    return amax / FP8_MAX


def _encode_fp8(coding: TensorCoding, values: torch.Tensor, target: torch.Tensor) -> None:
    scale = fp8_scale(values)
    if not torch.isfinite(scale):
        raise ValueError(f"{coding.name}: holds NaN or inf, which fp8_e4m3fn cannot scale; stream it as stored")
    target[:4].view(torch.float32).copy_(scale.reshape(1))
    target[4:FP8_HEADER_BYTES].zero_()
    codes = target[FP8_HEADER_BYTES:].view(torch.float8_e4m3fn)
    flat = values.reshape(-1)
    zero = not scale > 0  # an all-zero tensor: scale 0, codes 0
    for start in range(0, flat.numel(), ENCODE_CHUNK_ELEMENTS):
        part = flat[start:start + ENCODE_CHUNK_ELEMENTS]
        # Not in place: for float32 weights `part.to(float32)` is the caller's tensor itself.
        scaled = torch.zeros(part.shape, device=part.device) if zero else part.to(torch.float32) / scale
        codes[start:start + part.numel()].copy_(scaled.clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn))


def _decode_fp8(coding: TensorCoding, source: torch.Tensor, target: torch.Tensor, chunk: int) -> None:
    scale = source[:4].view(torch.float32)  # stays on the device: no host read of the scale
    codes = source[FP8_HEADER_BYTES:].view(torch.float8_e4m3fn)
    out = target.reshape(-1)
    for start in range(0, out.numel(), chunk):
        out[start:start + chunk].copy_(codes[start:start + chunk].to(torch.float32).mul_(scale))


_ENCODERS = {StreamFormat.Q8_0: _encode_q8_0, StreamFormat.FP8_E4M3FN: _encode_fp8}
_DECODERS = {StreamFormat.Q8_0: _decode_q8_0, StreamFormat.FP8_E4M3FN: _decode_fp8}

__all__ = ["BlockCodec", "StreamFormat", "TensorCoding", "encoded_nbytes", "encoded_size", "fp8_scale",
           "keep_reason", "stored_offsets"]
