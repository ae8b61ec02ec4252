"""Block discovery on the structures real diffusion models and text encoders use."""

import pytest
import torch
from torch import nn

from distorch import discover
from distorch.blocks import cluster_tensors, live_bytes
from distorch.toy import make_toy_dit


class Attn(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.q, self.k = nn.Linear(dim, dim), nn.Linear(dim, dim)


class DoubleBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.img_attn, self.txt_attn = Attn(dim), Attn(dim)
        self.img_mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))


class SingleBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(dim, 3 * dim), nn.Linear(3 * dim, dim)


class Refiner(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.blocks = nn.ModuleList(SingleBlock(dim) for _ in range(2))


class FluxLike(nn.Module):
    def __init__(self, dim=16):
        super().__init__()
        self.img_in = nn.Linear(dim, dim)
        self.time_in = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))  # leaves: not blocks
        self.txt_in = Refiner(dim)  # a nested list inside the rest, like HunyuanVideo's token refiner
        self.double_blocks = nn.ModuleList(DoubleBlock(dim) for _ in range(3))
        self.single_blocks = nn.ModuleList(SingleBlock(dim) for _ in range(4))
        self.final = nn.Linear(dim, dim)


def test_flux_like_lists_in_registration_order_with_one_root():
    layout = discover(FluxLike())
    names = [b.name for b in layout.blocks]
    assert names == ["txt_in.blocks.0", "txt_in.blocks.1"] + [f"double_blocks.{i}" for i in range(3)] + [
        f"single_blocks.{i}" for i in range(4)]
    assert {b.root for b in layout.blocks} == {""}, "nested lists belong to the outermost pass"


class T5Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.layer = nn.ModuleList([Attn(dim), SingleBlock(dim)])  # heterogeneous: not a block list itself


class TextEncoder(nn.Module):
    def __init__(self, dim=8, depth=3):
        super().__init__()
        self.shared = nn.Embedding(32, dim)
        self.encoder = nn.Module()
        self.encoder.block = nn.ModuleList(T5Block(dim) for _ in range(depth))


class DualClip(nn.Module):
    def __init__(self):
        super().__init__()
        self.clip_l = TextEncoder(8, 2)
        self.t5xxl = TextEncoder(8, 4)


def test_text_encoders_get_one_pass_each():
    layout = discover(DualClip())
    assert [b.name for b in layout.blocks][:3] == ["clip_l.encoder.block.0", "clip_l.encoder.block.1",
                                                   "t5xxl.encoder.block.0"]
    assert {b.root for b in layout.blocks} == {"clip_l.encoder", "t5xxl.encoder"}
    assert not any(".layer." in b.name for b in layout.blocks), "lists inside a block belong to the block"


def test_sequential_of_leaf_layers_is_not_a_block_list():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    assert discover(model).blocks == ()


def test_sizes_count_storage_bytes():
    model = make_toy_dit(dim=32, depth=3, heads=2).to(torch.bfloat16)
    layout = discover(model)
    expected = sum(p.numel() * 2 for p in model.blocks[0].parameters())
    assert all(b.nbytes == expected for b in layout.blocks)
    assert layout.total_bytes == sum(t.numel() * t.element_size() for t in model.state_dict().values())


def test_tied_weights_stay_with_the_rest():
    model = make_toy_dit(dim=32, depth=3, heads=2)
    model.blocks[0].qkv.weight = model.blocks[1].qkv.weight
    layout = discover(model)
    in_blocks = {name for b in layout.blocks for c in b.clusters for v in c.views for name in v.names}
    tied = next(v for c in layout.rest for v in c.views if "blocks.1.qkv.weight" in v.names)
    assert set(tied.names) == {"blocks.0.qkv.weight", "blocks.1.qkv.weight"}, "one view, every name of the tie"
    assert not in_blocks & set(tied.names)


def test_views_of_one_storage_form_one_cluster():
    model = make_toy_dit(dim=32, depth=2, heads=2)
    block = model.blocks[0]
    block.register_buffer("qkv_view", block.qkv.weight.data[:8], persistent=False)
    cluster = next(c for c in discover(model).block("blocks.0").clusters if len(c.views) > 1)
    assert cluster.nbytes == block.qkv.weight.numel() * 4
    assert {v.offset for v in cluster.views} == {0}


def test_tensors_in_one_big_storage_are_separate_clusters():
    """Regression: mmap-backed GGUF/safetensors tensors share one storage but do not overlap."""
    model = make_toy_dit(dim=16, depth=2, heads=2)
    params = list(model.parameters())
    flat = torch.empty(sum(p.numel() for p in params))
    offset = 0
    for p in params:
        flat[offset:offset + p.numel()].copy_(p.detach().flatten())
        p.data = flat[offset:offset + p.numel()].view(p.shape)
        offset += p.numel()
    layout = discover(model)
    assert len(layout.blocks) == 2
    assert all(b.nbytes == layout.blocks[0].nbytes > 0 for b in layout.blocks)


def test_layouts_hold_names_and_find_the_bytes_where_the_tensors_are():
    """Issue #8: a layout that held storages kept every source alive; it holds names and locates bytes live."""
    model = make_toy_dit(dim=32, depth=2, heads=2)
    block = model.blocks[0]
    block.register_buffer("qkv_view", block.qkv.weight.data[8:16], persistent=False)
    cluster = next(c for c in discover(model).block("blocks.0").clusters if len(c.views) > 1)
    assert all(not isinstance(v, torch.Tensor) for view in cluster.views for v in vars(view).values())
    flat = live_bytes(cluster, cluster_tensors(model, cluster))
    assert flat.data_ptr() == block.qkv.weight.data_ptr() and flat.numel() == cluster.nbytes
    block.qkv_view = block.qkv_view.clone()  # the view now lives apart from the weight it shared memory with
    with pytest.raises(RuntimeError, match="'blocks.0.qkv_view' was moved apart"):
        live_bytes(cluster, cluster_tensors(model, cluster))


def test_a_block_holding_a_tensor_without_storage_is_left_to_the_host():
    """A weight that is a wrapper tensor subclass (ComfyUI 0.8+'s QuantizedTensor holds fp8-scaled layers so) has no
    bytes to view or copy: its block is left out of the streamable blocks, its bytes count with the rest, and the
    plan says why; the other blocks stream as before (it raised deep inside torch before)."""
    from torch.testing._internal.two_tensor import TwoTensor

    import distorch

    model = make_toy_dit(dim=64, depth=4, heads=2, dtype=torch.float32)
    before = discover(model)
    weight = model.blocks[1].qkv.weight
    model.blocks[1].qkv.weight = nn.Parameter(TwoTensor(weight.data, weight.data.clone()), requires_grad=False)
    layout = discover(model)
    assert [b.name for b in layout.blocks] == ["blocks.0", "blocks.2", "blocks.3"]
    assert layout.opaque_blocks == ("blocks.1",) and layout.opaque_bytes == 2 * weight.nbytes
    assert layout.total_bytes == before.total_bytes + weight.nbytes, "the block's other weights join the rest"
    plan = distorch.plan(model, compute_device="cpu", virtual_vram_gb=1.0, memory={"cpu": 64 << 30},
                         ledger=distorch.ledger.Ledger())
    assert plan.streamed == {"blocks.0", "blocks.2", "blocks.3"}
    assert any(w.startswith("1 blocks of ToyDiT hold weights DisTorch cannot stream") for w in plan.warnings)
