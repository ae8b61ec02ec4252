"""Shared helpers for the GGUF engine tests: bit comparisons and hand-built GGUF bytes."""

from __future__ import annotations

import struct

import numpy as np
import torch
from ggml_samples import random_blocks
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from gguf_loader import GGUFFileWriter

QT = GGMLQuantizationType
VT = GGUFValueType


def assert_bits_equal(ours: torch.Tensor, reference: np.ndarray) -> None:
    """float32 results are identical bit for bit; NaNs only need to sit at the same positions."""
    ours = ours.detach().cpu().numpy()
    reference = np.asarray(reference, dtype=np.float32).reshape(ours.shape)
    assert ours.dtype == np.float32
    nan_ours, nan_ref = np.isnan(ours), np.isnan(reference)
    assert np.array_equal(nan_ours, nan_ref), f"NaN positions differ at {np.argwhere(nan_ours != nan_ref)[:5]}"
    bits_ours, bits_ref = ours[~nan_ours].view(np.uint32), reference[~nan_ref].view(np.uint32)
    mismatch = np.flatnonzero(bits_ours != bits_ref)
    assert mismatch.size == 0, (f"{mismatch.size} values differ, first at flat index {mismatch[:5]}: "
                                f"ours {ours[~nan_ours][mismatch[:5]]}, gguf-py {reference[~nan_ref][mismatch[:5]]}")


# -- hand-built files ---------------------------------------------------------------------------------

def gguf_string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str, value_type: int, payload: bytes) -> bytes:
    """One metadata entry: key, u32 type id, raw payload bytes."""
    return gguf_string(key) + struct.pack("<I", value_type) + payload


def kv_u32(key: str, value: int) -> bytes:
    return kv(key, VT.UINT32, struct.pack("<I", value))


def kv_str(key: str, value: str | bytes) -> bytes:
    return kv(key, VT.STRING, gguf_string(value))


def kv_array(key: str, item_type: int, items: list[bytes]) -> bytes:
    return kv(key, VT.ARRAY, struct.pack("<IQ", item_type, len(items)) + b"".join(items))


def tensor_info(name: str, dims: tuple[int, ...], type_id: int, offset: int) -> bytes:
    """dims in ggml order (innermost first), offset relative to the data section."""
    return (gguf_string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
            + struct.pack("<IQ", type_id, offset))


def gguf_bytes(kvs: list[bytes] = (), infos: list[bytes] = (), data: bytes = b"", version: int = 3,
               n_tensors: int | None = None, n_kv: int | None = None, alignment: int = 32) -> bytes:
    """A complete file: header, metadata, tensor infos, padding to `alignment`, data."""
    head = b"GGUF" + struct.pack("<IQQ", version, len(infos) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(infos)
    padding = (-len(body)) % alignment
    return body + b"\0" * padding + data


def one_tensor_file(qtype: QT = QT.Q8_0, rows: int = 2, cols: int = 64, seed: int = 0, **overrides) -> bytes:
    """A valid single-tensor file with random blocks (tensor "w", ggml dims (cols, rows))."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    data = random_blocks(qtype, rows * cols // block_size, seed=seed).tobytes()
    info = tensor_info("w", (cols, rows), int(qtype), 0)
    return gguf_bytes([kv_str("general.architecture", "flux")], [info], data, **overrides)


# -- files written with the writer --------------------------------------------------------------------

def write_mixed_file(path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A small realistic file (several types, orig_shape, metadata); returns the source tensors."""
    generator = torch.Generator().manual_seed(seed)
    sources = {
        "blk.0.attn_q.weight": torch.randn(64, 128, generator=generator),
        "blk.0.ffn_up.weight": torch.randn(32, 256, generator=generator),
        "blk.0.norm.weight": torch.randn(128, generator=generator),
        "conv.weight": torch.randn(8, 4, 3, 3, generator=generator),
        "emb.weight": torch.randn(16, 64, generator=generator),
    }
    writer = GGUFFileWriter(path, architecture="flux")
    writer.add_metadata("general.name", "mixed")
    writer.add_tensor("blk.0.attn_q.weight", sources["blk.0.attn_q.weight"], "Q8_0")
    writer.add_tensor("blk.0.ffn_up.weight", sources["blk.0.ffn_up.weight"], "Q4_0")
    writer.add_tensor("blk.0.norm.weight", sources["blk.0.norm.weight"], "F32")
    writer.add_tensor("conv.weight", sources["conv.weight"], "Q5_1")
    writer.add_tensor("emb.weight", sources["emb.weight"].to(torch.bfloat16))
    writer.add_tensor("k.weight", random_blocks(QT.Q4_K, 4, seed=seed), "Q4_K", shape=(2, 512))
    writer.write()
    return sources
