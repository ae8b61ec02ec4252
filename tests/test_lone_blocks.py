"""A list holding a single block is a block list (a 1+1-block Flux streams), and nothing smaller becomes one.

Live discovery (distorch.blocks) and the file-header reader (distorch.headers, the CLI) apply the same rule,
so both are checked on the same models.
"""

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import distorch
from distorch import CpuCopyEngine, discover
from distorch.headers import read_model_sizes
from distorch.lone_blocks import accepted_lone_blocks
from distorch.toy import ToyDiTBlock, make_toy_dit
from distorch.units import GIB

ROOMY = {"cpu": 64 * GIB, "pinned": 32 * GIB}


class SingleBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(dim, 3 * dim), nn.Linear(3 * dim, dim)

    def forward(self, x):
        return x + self.linear2(torch.tanh(self.linear1(x)))


class DoubleBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.img, self.txt = SingleBlock(dim), SingleBlock(dim)

    def forward(self, x):
        return self.txt(self.img(x))


class FinalLayer(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm, self.linear = nn.LayerNorm(dim), nn.Linear(dim, 4)

    def forward(self, x):
        return self.linear(self.norm(x))


class TinyFlux(nn.Module):
    """Flux's layout with `double`/`single` blocks per list, a final layer in a list of its own, and an
    SDXL-style `label_emb` (a Sequential holding one bare Sequential)."""

    def __init__(self, double=1, single=1, dim=32):
        super().__init__()
        self.img_in = nn.Linear(4, dim)
        self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim)))
        self.double_blocks = nn.ModuleList(DoubleBlock(dim) for _ in range(double))
        self.single_blocks = nn.ModuleList(SingleBlock(dim) for _ in range(single))
        self.final_layers = nn.ModuleList([FinalLayer(dim)])

    def forward(self, x):
        h = self.img_in(x) + self.label_emb(torch.ones(1, self.img_in.out_features))
        for block in (*self.double_blocks, *self.single_blocks):
            h = block(h)
        return self.final_layers[0](h)


def block_names(model):
    return [b.name for b in discover(model).blocks]


def file_block_names(model, tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return [name for name, _ in read_model_sizes(str(path)).blocks]


def test_a_one_plus_one_flux_has_two_blocks_and_no_spurious_ones(tmp_path):
    model = TinyFlux(1, 1)
    assert block_names(model) == ["double_blocks.0", "single_blocks.0"]
    assert file_block_names(model, tmp_path) == ["double_blocks.0", "single_blocks.0"]


def test_a_lone_block_beside_repeated_ones_is_a_block_but_the_final_layer_is_not(tmp_path):
    model = TinyFlux(3, 1)
    expected = [f"double_blocks.{i}" for i in range(3)] + ["single_blocks.0"]
    assert block_names(model) == expected
    assert file_block_names(model, tmp_path) == expected


def test_without_the_size_rule_the_final_layer_would_be_a_block():
    """The size rule is what keeps `final_layers.0` out (it passes every structural check)."""
    sizes = {"final_layers.0": 300, "single_blocks.0": 3000}
    assert accepted_lone_blocks(sizes, [6000, 6000, 6000], 30000) == {"single_blocks.0"}
    assert accepted_lone_blocks(sizes, [], 4000) == {"final_layers.0", "single_blocks.0"}
    assert accepted_lone_blocks(sizes, [], 100000) == set()


class Stack(nn.Module):
    def __init__(self, dim, depth):
        super().__init__()
        self.layers = nn.ModuleList(SingleBlock(dim) for _ in range(depth))


class WrappedStack(nn.Module):
    """A list wrapping one module that holds the real block list: the inner layers are the blocks."""

    def __init__(self):
        super().__init__()
        self.encoders = nn.ModuleList([Stack(16, 3)])


def test_a_lone_module_holding_a_block_list_is_not_itself_a_block(tmp_path):
    expected = [f"encoders.0.layers.{i}" for i in range(3)]
    assert block_names(WrappedStack()) == expected
    assert file_block_names(WrappedStack(), tmp_path) == expected


def test_a_model_of_one_block_streams_it_and_equals_the_resident_model():
    model = make_toy_dit(dim=32, depth=1, heads=2)
    assert block_names(model) == ["blocks.0"]
    x, t = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([0.3, 0.7])
    expected = model(x, t)
    plan = distorch.plan(model, compute_device="cpu", virtual_vram_gb=1.0, memory=ROOMY)
    assert plan.streamed == {"blocks.0"}
    with distorch.stream(model, plan, debug=True, engine=CpuCopyEngine(deferred=True)):
        assert torch.equal(model(x, t), expected)
        assert torch.equal(model(x, t), expected)


@pytest.mark.parametrize("double, single", [(1, 1), (2, 1), (1, 2)])
def test_lone_lists_of_a_flux_stream_bit_exactly(double, single):
    model = TinyFlux(double, single)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    expected = model(x)
    plan = distorch.plan(model, compute_device="cpu", virtual_vram_gb=1.0, memory=ROOMY)
    assert plan.streamed == {f"double_blocks.{i}" for i in range(double)} | {f"single_blocks.{i}" for i in
                                                                                range(single)}
    with distorch.stream(model, plan, debug=True, engine=CpuCopyEngine(deferred=True)):
        assert torch.equal(model(x), expected)


def test_repeated_lists_are_unchanged_by_the_lone_rule():
    model = make_toy_dit(dim=32, depth=4, heads=2)
    model.extra = nn.ModuleList([ToyDiTBlock(32, 2)])  # as heavy as a block: a lone block list of its own
    assert block_names(model) == [f"blocks.{i}" for i in range(4)] + ["extra.0"]
