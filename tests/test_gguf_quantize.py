"""Torch Q8_0 quantizer (bit-identical to gguf-py) and the quantized toy model for benchmarks."""

import gguf
import numpy as np
import torch
from gguf_helpers import QT
from quantized_toy import quantize_toy_dit

from gguf_loader import GGMLTensor, dequantize
from gguf_loader.quantize import quantize_q8_0


def test_q8_0_matches_gguf_py_bytes_including_ties_and_zero_blocks():
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(3)) * 4
    x[0, :32] = 0  # all-zero block: d = 0
    x[1, :32] = torch.tensor([0.5, -0.5, 1.5, -1.5, 2.5, -2.5] + [127.0] * 26)  # exact halves round away
    ours = quantize_q8_0(x)
    assert isinstance(ours, GGMLTensor) and ours.shape == (64, 256)
    assert np.array_equal(ours.as_plain().numpy(), gguf.quants.quantize(x.numpy(), QT.Q8_0))


def test_quantized_toy_dit_runs_with_gguf_ops():
    from distorch.toy import ToyDiT

    with torch.device("meta"):
        meta = ToyDiT(128, 2, 4, channels=64, ffn_dim=256)
    model = quantize_toy_dit(meta, "cpu")
    assert isinstance(model.blocks[0].qkv.weight, GGMLTensor) and model.blocks[0].qkv.weight.qtype == QT.Q8_0
    assert model.blocks[0].q_norm.weight.dtype == torch.bfloat16
    out = model(torch.randn(1, 8, 64, dtype=torch.bfloat16), torch.full((1,), 500.0))
    assert out.shape == (1, 8, 64) and torch.isfinite(out.float()).all()
    again = quantize_toy_dit(meta, "cpu")  # seeded: identical weights
    assert torch.equal(dequantize(again.blocks[1].fc2.weight), dequantize(model.blocks[1].fc2.weight))
