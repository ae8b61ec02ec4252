"""Quantized versions of the synthetic models in `distorch.toy`, for tests and benchmarks (bench/stream.py)."""

from __future__ import annotations

import math

import torch
from torch import nn

from gguf_loader.ops import make_ops
from gguf_loader.quantize import quantize_q8_0


def quantize_toy_dit(model: nn.Module, device: str | torch.device, seed: int = 0,
                     dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A ToyDiT with the architecture of `model` (may live on the meta device) and random weights:
    Q8_0 GGMLTensors for every Linear weight, `dtype` for everything else, built with GGUF ops.

    Weights are drawn per tensor from N(0, 1/fan_in) with a seeded generator, one layer at a time,
    so peak host memory is the quantized model plus one float layer.
    """
    block = model.blocks[0]
    quantized = type(model)(model.patch_in.out_features, len(model.blocks), block.heads,
                            channels=model.patch_in.in_features, ffn_dim=block.fc1.out_features, ops=make_ops())
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, reference in model.state_dict().items():
        state[name] = _random_weight(name, reference, quantized, generator, dtype)
    quantized.load_state_dict(state)
    return quantized.to(device)


def _random_weight(name: str, reference: torch.Tensor, model: nn.Module, generator: torch.Generator,
                   dtype: torch.dtype) -> torch.Tensor:
    if name.endswith("frequencies"):
        return torch.exp(-math.log(10000.0) * torch.arange(reference.shape[0]) / reference.shape[0])
    values = torch.randn(reference.shape, generator=generator).div_(math.sqrt(reference.shape[-1]))
    owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    if isinstance(owner, nn.Linear) and name.endswith(".weight") and reference.shape[-1] % 32 == 0:
        return quantize_q8_0(values)
    return values.to(dtype)
