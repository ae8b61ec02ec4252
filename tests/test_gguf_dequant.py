"""Dequantization kernels against gguf-py's numpy reference, bit for bit in float32."""

import warnings

import gguf
import numpy as np
import pytest
import torch
from ggml_samples import random_blocks
from gguf import GGML_QUANT_SIZES
from gguf_helpers import QT, assert_bits_equal

from gguf_loader import GGMLTensor, GGUFError, dequantize, dequantize_blocks, supported_qtypes
from gguf_loader.dequant import CONSTANTS, driver, register
from gguf_loader.dequant.registry import kernel_for

ALL_TYPES = [t for t in supported_qtypes()]
EXPECTED = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
            "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0",
            "MXFP4"}


def reference(blocks: np.ndarray, qtype) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NaN/inf scales in raw random blocks
        return gguf.quants.dequantize(blocks, qtype)


def test_every_type_gguf_py_dequantizes_is_registered():
    names = {t.name for t in supported_qtypes()}
    assert EXPECTED <= names
    gguf_py = {t.name for t in gguf.quants._type_traits} | {"F32", "F16"}
    assert gguf_py <= names, f"gguf-py dequantizes {sorted(gguf_py - names)} but we do not"


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("sane", [True, False], ids=["sane-scales", "raw-bytes"])
def test_float32_is_bit_exact(qtype, sane):
    blocks = random_blocks(qtype, 96, seed=int(qtype), sane_scales=sane)
    ours = dequantize_blocks(torch.from_numpy(blocks), qtype)
    assert_bits_equal(ours, reference(blocks, qtype).reshape(96, -1))


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_the_float32_result_rounded_once(qtype, dtype):
    blocks = torch.from_numpy(random_blocks(qtype, 40, seed=7))
    ours = dequantize_blocks(blocks, qtype, dtype)
    assert ours.dtype == dtype
    assert torch.equal(ours, dequantize_blocks(blocks, qtype).to(dtype))


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_K, QT.IQ2_XS, QT.MXFP4, QT.Q6_K], ids=lambda t: t.name)
@pytest.mark.parametrize("shape", [(3, 512), (2, 3, 512), (4, 2, 2, 256)], ids=str)
def test_tensor_level_keeps_the_logical_shape(qtype, shape):
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_blocks = int(np.prod(shape)) // block_size
    blocks = random_blocks(qtype, n_blocks, seed=3)
    raw = torch.from_numpy(blocks).view(*shape[:-1], shape[-1] // block_size * type_size)
    tensor = GGMLTensor(raw, qtype, shape)
    ours = dequantize(tensor)
    assert ours.shape == torch.Size(shape) and type(ours) is torch.Tensor
    assert_bits_equal(ours, reference(blocks.reshape(*shape[:-1], -1), qtype))


def test_orig_shape_differs_from_byte_rows():
    """A conv weight stored as (n/256, 256) rows (convert.py style) comes back as 4-D."""
    blocks = random_blocks(QT.Q8_0, 8 * 4 * 3 * 3 // 32 * 8, seed=1)
    shape = (32, 8, 3, 3)
    tensor = GGMLTensor(torch.from_numpy(blocks).view(-1, 8 * 34), QT.Q8_0, shape)
    assert_bits_equal(dequantize(tensor), reference(blocks, QT.Q8_0).reshape(shape))


def test_chunked_processing_matches_one_shot(monkeypatch):
    blocks = torch.from_numpy(random_blocks(QT.Q5_K, 50, seed=5))
    whole = dequantize_blocks(blocks, QT.Q5_K, torch.bfloat16)
    monkeypatch.setattr(driver, "CPU_CHUNK_ELEMENTS", 3 * 256)  # 3 blocks per chunk, a ragged last chunk
    assert torch.equal(dequantize_blocks(blocks, QT.Q5_K, torch.bfloat16), whole)


def test_plain_tensors_are_converted_and_same_dtype_is_a_view():
    weight = torch.randn(4, 8, dtype=torch.bfloat16)
    assert dequantize(weight, torch.bfloat16) is weight
    assert torch.equal(dequantize(weight), weight.float())


def test_empty_tensor():
    assert dequantize_blocks(torch.empty(0, 34, dtype=torch.uint8), QT.Q8_0).shape == (0, 32)


def test_out_parameter_is_filled():
    blocks = torch.from_numpy(random_blocks(QT.Q4_0, 4))
    out = torch.empty(4, 32)
    assert dequantize_blocks(blocks, QT.Q4_0, out=out) is out
    assert torch.equal(out, dequantize_blocks(blocks, QT.Q4_0))


def test_types_without_a_kernel_raise_gguf_error():
    with pytest.raises(GGUFError, match="no dequantization kernel for GGML type Q8_K"):
        dequantize_blocks(torch.zeros(1, GGML_QUANT_SIZES[QT.Q8_K][1], dtype=torch.uint8), QT.Q8_K)


def test_wrong_block_width_is_refused():
    with pytest.raises(ValueError, match=r"Q8_0 blocks must be uint8 \(n, 34\)"):
        dequantize_blocks(torch.zeros(2, 33, dtype=torch.uint8), QT.Q8_0)


def test_integer_targets_are_refused():
    with pytest.raises(TypeError, match="float32, float16, bfloat16"):
        dequantize_blocks(torch.zeros(1, 34, dtype=torch.uint8), QT.Q8_0, torch.int32)


def test_duplicate_registration_is_refused():
    with pytest.raises(RuntimeError, match="already registered"):
        register("Q8_0")(lambda blocks, out: None)
    assert kernel_for(QT.Q8_0).__name__ == "q8_0"


def test_tables_are_built_once_per_device():
    dequantize_blocks(torch.from_numpy(random_blocks(QT.IQ2_XS, 2)), QT.IQ2_XS)
    first = CONSTANTS.get("iq2_xs_rows_f32", torch.device("cpu"))
    dequantize_blocks(torch.from_numpy(random_blocks(QT.IQ2_XS, 2)), QT.IQ2_XS)
    assert CONSTANTS.get("iq2_xs_rows_f32", torch.device("cpu")) is first


def test_garbage_blocks_never_index_out_of_range():
    """Every table index is masked to the table size, so any byte pattern is safe (on CUDA an
    out-of-range gather would be a device-side assert)."""
    for qtype in ALL_TYPES:
        for fill in (0x00, 0xFF):
            blocks = torch.full((3, GGML_QUANT_SIZES[qtype][1]), fill, dtype=torch.uint8)
            dequantize_blocks(blocks, qtype)


@pytest.mark.cuda
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_cuda_matches_cpu(qtype):
    blocks = torch.from_numpy(random_blocks(qtype, 64, seed=11))
    cpu = dequantize_blocks(blocks, qtype)
    cuda = dequantize_blocks(blocks.cuda(), qtype)
    assert torch.equal(cuda.cpu(), cpu)


# -- block counts and storage offsets (regression: issue #13, escape 1) ----------------------------------

def _blocks_at(blocks: np.ndarray, shift: int) -> torch.Tensor:
    """`blocks` copied into a storage at byte `shift`: what a file with general.alignment 1 hands the kernels."""
    storage = torch.empty(blocks.size + shift, dtype=torch.uint8)
    view = storage[shift:].view(blocks.shape)
    view.copy_(torch.from_numpy(blocks))
    return view


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_any_block_count_at_any_storage_offset(qtype, monkeypatch):
    """A one-block slice is already contiguous, so `.contiguous()` did not copy it and the int32 view of a
    field at an odd offset raised torch's "storage_offset() must be divisible by 4". It hit the last chunk
    of a tensor holding one block, one-block tensors, and every tensor of a file with alignment 1."""
    block_size, _ = GGML_QUANT_SIZES[qtype]
    monkeypatch.setattr(driver, "CPU_CHUNK_ELEMENTS", 4 * block_size)  # 4 blocks per chunk: 5 leaves one block
    for n_blocks in (1, 2, 3, 5):
        blocks = random_blocks(qtype, n_blocks, seed=n_blocks)
        expected = reference(blocks, qtype).reshape(n_blocks, -1)
        for shift in range(4):
            assert_bits_equal(dequantize_blocks(_blocks_at(blocks, shift), qtype), expected)
            shape = (n_blocks * block_size,)
            tensor = GGMLTensor(_blocks_at(blocks, shift).view(-1), qtype, shape)
            assert_bits_equal(tensor.dequantize(), expected.reshape(shape))


def test_last_chunk_of_one_block_at_the_real_chunk_size():
    """The issue's repro: 16385 Q3_K blocks are one full CPU chunk (16384 blocks) plus one."""
    blocks = random_blocks(QT.Q3_K, driver.CPU_CHUNK_ELEMENTS // 256 + 1, seed=2)
    assert_bits_equal(dequantize_blocks(torch.from_numpy(blocks), QT.Q3_K), reference(blocks, QT.Q3_K))


def test_one_block_tensor_from_the_issue():
    assert torch.equal(GGMLTensor(torch.zeros(1, 18, dtype=torch.uint8), "Q4_0", (32,)).dequantize(), torch.zeros(32))
