"""A DiT-like test model with the awkward parts real models have, for streaming tests.

- parameters tied between two blocks, and between a block and the rest (must stay resident)
- buffers inside blocks (persistent and not), a transposed (non-contiguous) weight, two views of one storage
- a block called twice per forward, a block skipped on some passes, an optional failure mid-pass
"""

import torch
import torch.nn.functional as F
from torch import nn

from distorch.toy import ToyDiT, ToyDiTBlock


class QuirkyBlock(ToyDiTBlock):
    def __init__(self, dim: int, heads: int, index: int):
        super().__init__(dim, heads)
        self.register_buffer("gain", torch.full((dim,), 1.0 + index / 100))
        self.register_buffer("bias_shift", torch.linspace(-0.01, 0.01, dim), persistent=False)
        self.mix_t = nn.Parameter(torch.randn(dim, dim).mul_(0.02).t())  # stored transposed: strides (1, dim)
        pair = torch.randn(2, dim) * 0.1
        self.pair_storage = nn.Parameter(pair)
        self.register_buffer("pair_view", pair[1], persistent=False)  # a view into the parameter above

    def forward(self, x, t_emb):
        x = super().forward(x, t_emb)
        x = x * self.gain + self.bias_shift + self.pair_storage[0] - self.pair_view
        return x + 0.1 * (x @ self.mix_t)


class QuirkyDiT(ToyDiT):
    """`forward(x, t, skip=False)`: block 2 runs twice, block 4 is skipped when `skip`."""

    def __init__(self, dim: int = 64, depth: int = 8, heads: int = 2, channels: int = 8):
        super().__init__(dim, depth, heads, channels)
        self.blocks = nn.ModuleList(QuirkyBlock(dim, heads, i) for i in range(depth))
        self.blocks[6].proj.weight = self.blocks[5].proj.weight  # tied across blocks
        self.shared_bias = nn.Parameter(torch.randn(dim) * 0.01)
        self.blocks[3].fc2.bias = self.shared_bias  # tied with the rest
        self.fail_at_block: int | None = None
        self.fail_with: type[BaseException] = KeyboardInterruptLike  # what fail_at_block raises

    def forward(self, x, t, skip: bool = False):
        t_emb = self.embed_time(t).to(x.dtype)
        h = self.patch_in(x)
        for index, block in enumerate(self.blocks):
            if skip and index == 4:
                continue
            if self.fail_at_block == index:
                raise self.fail_with(f"interrupted before block {index}")
            h = block(h, t_emb)
            if index == 2:
                h = block(h, t_emb)
        return self.head(self.norm_out(h + F.silu(self.shared_bias)))


class KeyboardInterruptLike(Exception):
    """Stands in for ComfyUI's InterruptProcessingException (an Exception raised mid-forward)."""


def make_quirky(seed: int = 0, **kwargs) -> QuirkyDiT:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return QuirkyDiT(**kwargs)


def sampling_run(model, x, steps: int = 3, cfg: bool = True, skip_pattern=(False,)):
    """A tiny sampler: per step a conditional and (with CFG) an unconditional forward."""
    outputs = []
    for step in range(steps):
        t = torch.full((x.shape[0],), 900.0 - 300 * step)
        skip = skip_pattern[step % len(skip_pattern)]
        cond = model(x, t, skip=skip)
        outputs.append(cond)
        if cfg:
            outputs.append(model(x * 0.5, t, skip=not skip))
        x = x - 0.1 * cond
    return outputs
