"""Synthetic GGML block data for tests and benchmarks: random bytes with sane scale fields.

Random bytes are valid GGML blocks for every type, but random fp16 scales are often huge, inf or NaN.
`random_blocks` overwrites each type's scale fields with moderate values so dequantized numbers are
finite and comparable; `sane_scales=False` keeps the raw bytes (NaN/inf included) for edge tests.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

QT = GGMLQuantizationType

# Byte offsets of the fp16 scale fields (d, dmin, m) inside one block, per type.
_FP16_FIELDS: dict[str, tuple[int, ...]] = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
    "IQ2_XXS": (0,), "IQ2_XS": (0,), "IQ2_S": (0,), "IQ3_XXS": (0,), "IQ3_S": (0,),
    "IQ1_S": (0,), "IQ4_NL": (0,), "IQ4_XS": (0,), "TQ1_0": (52,), "TQ2_0": (64,),
}


def random_blocks(qtype: GGMLQuantizationType | str, n_blocks: int, seed: int = 0,
                  sane_scales: bool = True) -> np.ndarray:
    """`n_blocks` random blocks of `qtype` as a uint8 array of shape (n_blocks, type_size).

    Example:
        >>> random_blocks("Q4_K", 16).shape
        (16, 144)
    """
    qtype = QT[qtype] if isinstance(qtype, str) else qtype
    _, type_size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    if sane_scales:
        _sanitize(blocks, qtype, rng)
    return blocks


def _sanitize(blocks: np.ndarray, qtype: GGMLQuantizationType, rng: np.random.Generator) -> None:
    n_blocks = blocks.shape[0]
    for offset in _FP16_FIELDS.get(qtype.name, ()):
        blocks[:, offset:offset + 2] = _moderate_fp16(rng, n_blocks).view(np.uint8).reshape(n_blocks, 2)
    if qtype.name == "IQ1_M":
        _set_iq1m_scale(blocks, rng)
    elif qtype.name == "MXFP4":
        blocks[:, 0] = rng.integers(100, 140, size=n_blocks, dtype=np.uint8)  # e8m0 exponents near 1.0
    elif qtype in (QT.F16, QT.BF16, QT.F32):
        _set_moderate_floats(blocks, qtype, rng)


def _moderate_fp16(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.uniform(-1.0, 1.0, size=n).astype(np.float16)


def _set_iq1m_scale(blocks: np.ndarray, rng: np.random.Generator) -> None:
    # IQ1_M spreads its fp16 scale over the top nibbles of the four uint16 words at bytes 48..55.
    n_blocks = blocks.shape[0]
    d = _moderate_fp16(rng, n_blocks).view(np.uint16).astype(np.uint16)
    words = blocks[:, 48:56].copy().view(np.uint16)
    for k in range(4):
        nibble = (d >> np.uint16(4 * k)) & np.uint16(0xF)
        words[:, k] = (words[:, k] & np.uint16(0x0FFF)) | (nibble << np.uint16(12))
    blocks[:, 48:56] = words.view(np.uint8)


def _set_moderate_floats(blocks: np.ndarray, qtype: GGMLQuantizationType, rng: np.random.Generator) -> None:
    values = rng.standard_normal(blocks.shape[0]).astype(np.float32)
    if qtype == QT.F32:
        blocks[:] = values.view(np.uint8).reshape(blocks.shape)
    elif qtype == QT.F16:
        blocks[:] = values.astype(np.float16).view(np.uint8).reshape(blocks.shape)
    else:
        blocks[:] = (values.view(np.uint32) >> np.uint32(16)).astype(np.uint16).view(np.uint8).reshape(blocks.shape)
