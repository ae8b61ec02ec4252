"""A small DiT-like model with random weights: the demo's embedded default and the benchmarks' subject.

Its blocks look like those of Wan/Flux/SD3 (adaLN modulation held as a raw parameter, LayerNorm,
fused QKV with RMS-normed heads, SDPA, GELU MLP), so streaming it exercises what real models do.
"""

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

TORCH_OPS = SimpleNamespace(Linear=nn.Linear, LayerNorm=nn.LayerNorm, RMSNorm=nn.RMSNorm)


class ToyDiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, ffn_dim: int | None = None, ops=TORCH_OPS):
        super().__init__()
        self.heads = heads
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / math.sqrt(dim))
        self.norm1 = ops.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = ops.Linear(dim, 3 * dim)
        self.q_norm = ops.RMSNorm(dim // heads, eps=1e-6)
        self.k_norm = ops.RMSNorm(dim // heads, eps=1e-6)
        self.proj = ops.Linear(dim, dim)
        self.norm2 = ops.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        ffn_dim = ffn_dim or 4 * dim
        self.fc1 = ops.Linear(dim, ffn_dim)
        self.fc2 = ops.Linear(ffn_dim, dim)

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        modulation = self.modulation.to(x.dtype) + t_emb[:, None, :]
        shift1, scale1, gate1, shift2, scale2, gate2 = modulation.chunk(6, dim=1)
        h = self.norm1(x) * (1 + scale1) + shift1
        x = x + gate1 * self.proj(self._attention(h))
        h = self.norm2(x) * (1 + scale2) + shift2
        return x + gate2 * self.fc2(F.gelu(self.fc1(h), approximate="tanh"))

    def _attention(self, h: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = h.shape
        q, k, v = self.qkv(h).view(batch, tokens, 3, self.heads, dim // self.heads).unbind(2)
        q, k = self.q_norm(q), self.k_norm(k)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2).reshape(batch, tokens, dim)


class ToyDiT(nn.Module):
    """Patch tokens in, noise prediction out: `model(x[B, N, C], t[B]) -> [B, N, C]`."""

    def __init__(self, dim: int = 256, depth: int = 8, heads: int = 4, channels: int = 16, ffn_dim: int | None = None,
                 ops=TORCH_OPS):
        super().__init__()
        self.patch_in = ops.Linear(channels, dim)
        self.time_in = nn.Sequential(ops.Linear(256, dim), nn.SiLU(), ops.Linear(dim, dim))
        self.blocks = nn.ModuleList(ToyDiTBlock(dim, heads, ffn_dim, ops=ops) for _ in range(depth))
        self.norm_out = ops.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.head = ops.Linear(dim, channels)
        self.register_buffer("frequencies", torch.exp(-math.log(10000.0) * torch.arange(128) / 128))

    def embed_time(self, t: torch.Tensor) -> torch.Tensor:
        angles = t[:, None].float() * self.frequencies[None].float()
        features = torch.cat([angles.cos(), angles.sin()], dim=-1)
        # In the weights' dtype (a bf16 model); quantized GGUF weights take float32 features.
        weight = self.patch_in.weight
        return self.time_in(features.to(weight.dtype) if weight.is_floating_point() else features)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t_emb = self.embed_time(t).to(x.dtype)
        h = self.patch_in(x)
        for block in self.blocks:
            h = block(h, t_emb)
        return self.head(self.norm_out(h))


def make_toy_dit(dim: int = 256, depth: int = 8, heads: int = 4, seed: int = 0, dtype=torch.float32) -> ToyDiT:
    """A seeded model, so two calls give identical weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ToyDiT(dim, depth, heads).to(dtype)
