"""The LoRA side path (distorch.lowrank) against the merged weight it replaces, without ComfyUI.

The reference merge is core's arithmetic for a plain LoRA on the compute device (`LowVramPatch`: the weight
cast or dequantized to the compute dtype, `W + (s · up @ down)` in that dtype); tests/comfyui/inside/
check_lora.py repeats the comparison with core's own adapters and `LowVramPatch`.
"""

import functools
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from ggml_samples import random_blocks
from gguf_helpers import QT
from torch import nn

from distorch.lowrank import (
    LayerGeometry,
    LowRankTerm,
    SidePaths,
    check_term,
    combine_tucker,
    layer_geometry,
    side_path_nbytes,
    stack_terms,
)
from distorch.toy import ToyDiTBlock
from gguf_loader import GGMLTensor, dequantize, make_ops, quantize_q8_0

FP32_EPS = torch.finfo(torch.float32).eps


def tolerance(dtype: torch.dtype) -> float:
    """distorch/lowrank.py's bound on side path vs merge: relative, in Frobenius norm, per layer."""
    return 2 * torch.finfo(dtype).eps + 8 * FP32_EPS


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def lora_term(out_rows: int, in_shape: tuple, rank: int, strength: float = 0.8, alpha: float | None = 16.0,
              row_start: int = 0, seed: int = 1, size: float = 0.1) -> LowRankTerm:
    """A LoRA as files store it (float16 up/down of standard deviation `size`) with core's scale:
    strength · alpha / rank."""
    generator = seeded(seed)
    up = (torch.randn(out_rows, rank, generator=generator) * size).half()
    down = (torch.randn(rank, *in_shape, generator=generator) * size).half()
    return LowRankTerm(up, down, strength * (alpha / rank if alpha is not None else 1.0), row_start)


def merged(weight: torch.Tensor, terms, dtype: torch.dtype) -> torch.Tensor:
    """Core's per-forward merge of plain LoRAs, in the compute dtype."""
    weight = weight.to(dtype).clone()
    for term in terms:
        rows = term.up.shape[0]
        diff = term.up.reshape(rows, -1).to(dtype) @ term.down.reshape(term.rank, -1).to(dtype)
        part = weight[term.row_start:term.row_start + rows]
        part += (term.scale * diff).reshape(part.shape).to(dtype)
    return weight


def exact(weight: torch.Tensor, terms) -> torch.Tensor:
    """The float64 weight the LoRAs describe (the merge and the side path round it differently)."""
    weight = weight.double().clone()
    for term in terms:
        rows = term.up.shape[0]
        diff = term.up.reshape(rows, -1).double() @ term.down.reshape(term.rank, -1).double()
        weight[term.row_start:term.row_start + rows] += (term.scale * diff).reshape(weight[:rows].shape)
    return weight


def assert_side_path_matches_merge(side: torch.Tensor, merge: torch.Tensor, truth: torch.Tensor,
                                   plain: torch.Tensor) -> None:
    """The stated tolerance (distorch/lowrank.py): within `tolerance` of the merge, and as close to the float64 result
    as the merge is (1.25x its error). The LoRAs change the output (vs `plain`, the layer without them) by four
    times the tolerance at least, so a term lost or mis-scaled by a quarter cannot pass."""
    bound = tolerance(side.dtype)
    share = (merge.double() - plain.double()).norm() / merge.double().norm()
    assert share >= 4 * bound, f"the LoRAs change the output by {share:.3g} only"
    difference = (side.double() - merge.double()).norm() / merge.double().norm()
    assert difference <= bound, f"side path vs merge: {difference:.3g} > {bound:.3g}"
    side_error = (side.double() - truth).norm()
    merge_error = (merge.double() - truth).norm()
    assert side_error <= 1.25 * merge_error + 1e-12 * truth.norm(), (side_error, merge_error)


def install(module: nn.Module, terms, dtype: torch.dtype) -> SidePaths:
    """A side path on `module`, kept on it as nodes/lora.py keeps a model's (dropping them removes the hooks)."""
    side_paths = SidePaths(signature=("test", dtype))
    side_paths.add("layer", module, stack_terms(terms, layer_geometry(module), "cpu", dtype))
    module.side_paths = side_paths
    return side_paths


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("alpha", [16.0, None], ids=["alpha", "no-alpha"])
def test_linear_side_path_equals_the_merged_weight(dtype, alpha):
    layer = nn.Linear(256, 192).to(dtype)
    terms = [lora_term(192, (256,), 16, alpha=alpha)]
    x = torch.randn(3, 40, 256, generator=seeded(2)).to(dtype)
    merge = F.linear(x, merged(layer.weight, terms, dtype), layer.bias)
    truth = F.linear(x.double(), exact(layer.weight, terms), layer.bias.double())
    with torch.no_grad():
        plain = layer(x)
    install(layer, terms, dtype)
    assert_side_path_matches_merge(layer(x), merge, truth, plain)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gguf_side_path_equals_the_merged_dequantized_weight(qtype, dtype):
    layer = make_ops().Linear(256, 128, bias=False)
    if qtype == "Q8_0":
        weight = quantize_q8_0(torch.randn(128, 256, generator=seeded(3)) * 0.05)
    else:
        weight = GGMLTensor(torch.from_numpy(random_blocks(QT.Q4_K, 128, seed=3)), "Q4_K", (128, 256))
    layer.load_state_dict({"weight": weight})
    size = 0.1 if qtype == "Q8_0" else 4.0  # random Q4_K blocks hold values in the hundreds
    terms = [lora_term(128, (256,), 32, strength=-0.7, size=size), lora_term(128, (256,), 8, seed=5, size=size)]
    x = torch.randn(2, 16, 256, generator=seeded(4)).to(dtype)
    values = dequantize(weight, torch.float32)
    merge = F.linear(x, merged(values, terms, dtype))
    truth = F.linear(x.double(), exact(values.to(dtype), terms))
    with torch.no_grad():
        plain = layer(x)
    install(layer, terms, dtype)
    assert_side_path_matches_merge(layer(x), merge, truth, plain)


@pytest.mark.parametrize("mid", [False, True], ids=["locon", "locon-tucker"])
def test_conv2d_locon_side_path_equals_the_merged_weight(mid):
    layer = nn.Conv2d(16, 24, 3, padding=1, stride=2)
    if mid:  # a 1x1 down, a kernel-sized mid: core folds the mid into the down projection
        generator = seeded(6)
        down = (torch.randn(4, 16, 1, 1, generator=generator) * 0.2).half()
        core_mid = (torch.randn(4, 4, 3, 3, generator=generator) * 0.2).half()
        term = LowRankTerm((torch.randn(24, 4, 1, 1, generator=generator) * 0.1).half(),
                           combine_tucker(down, core_mid), 0.5)
    else:
        term = lora_term(24, (16, 3, 3), 4)
    x = torch.randn(2, 16, 11, 9, generator=seeded(7))
    merge = F.conv2d(x, merged(layer.weight, [term], torch.float32), layer.bias, stride=2, padding=1)
    truth = F.conv2d(x.double(), exact(layer.weight, [term]), layer.bias.double(), stride=2, padding=1)
    with torch.no_grad():
        plain = layer(x)
    install(layer, [term], torch.float32)
    assert_side_path_matches_merge(layer(x), merge, truth, plain)


def test_conv1d_side_path_equals_the_merged_weight():
    layer = nn.Conv1d(8, 12, 5, padding="same", dilation=2)
    term = lora_term(12, (8, 5), 3)
    x = torch.randn(2, 8, 30, generator=seeded(8))
    merge = F.conv1d(x, merged(layer.weight, [term], torch.float32), layer.bias, padding="same", dilation=2)
    truth = F.conv1d(x.double(), exact(layer.weight, [term]), layer.bias.double(), padding="same", dilation=2)
    with torch.no_grad():
        plain = layer(x)
    install(layer, [term], torch.float32)
    assert_side_path_matches_merge(layer(x), merge, truth, plain)


def test_tucker_fold_is_cores_merge_of_down_and_mid():
    """Core merges a LoCon mid as `mm(downᵀ, midᵀ)` reshaped to (in, rank, kh, kw) and transposed back."""
    generator = seeded(9)
    down, mid = torch.randn(4, 16, 1, 1, generator=generator), torch.randn(4, 4, 3, 3, generator=generator)
    core = torch.mm(down.transpose(0, 1).flatten(start_dim=1), mid.transpose(0, 1).flatten(start_dim=1))
    core = core.reshape(16, 4, 3, 3).transpose(0, 1)
    torch.testing.assert_close(combine_tucker(down, mid), core)


def test_stacked_terms_with_row_offsets_run_as_one_pair():
    """Three LoRAs on the q, k and v slices of a fused qkv plus one on the whole weight, negative strength
    included: one pair of rank 4+4+4+8, and the output of all four merges."""
    layer = nn.Linear(64, 192)
    terms = [lora_term(64, (64,), 4, row_start=0, seed=10), lora_term(64, (64,), 4, row_start=64, seed=11),
             lora_term(64, (64,), 4, strength=-1.5, row_start=128, seed=12), lora_term(192, (64,), 8, seed=13)]
    x = torch.randn(5, 64, generator=seeded(14))
    merge = F.linear(x, merged(layer.weight, terms, torch.float32), layer.bias)
    truth = F.linear(x.double(), exact(layer.weight, terms), layer.bias.double())
    plain = layer(x)
    side_paths = install(layer, terms, torch.float32)
    (factors,) = side_paths.layers.values()
    assert factors.rank == 20 and factors.down.shape == (20, 64) and factors.up.shape == (192, 20)
    assert side_paths.nbytes == side_path_nbytes({"layer": 20}, {"layer": LayerGeometry((192, 64))}, torch.float32)
    assert len(layer._forward_hooks) == 1, "one hook, whatever the number of LoRAs"
    assert_side_path_matches_merge(layer(x), merge, truth, plain)


def test_strength_zero_adds_nothing_and_remove_restores_the_layer_bit_for_bit():
    layer = nn.Linear(64, 64)
    x = torch.randn(4, 64, generator=seeded(15))
    plain = layer(x)
    assert stack_terms([lora_term(64, (64,), 4, strength=0.0)], layer_geometry(layer), "cpu", torch.float32) is None
    side_paths = install(layer, [lora_term(64, (64,), 4)], torch.float32)
    assert not torch.equal(layer(x), plain)
    side_paths.remove()
    side_paths.remove()  # idempotent
    assert torch.equal(layer(x), plain) and not layer._forward_hooks and side_paths.nbytes == 0


def test_factors_are_made_once_and_stay_across_forwards():
    """Nothing is rebuilt or uploaded per forward: the same factor tensors, the same hook."""
    layer = nn.Linear(64, 64)
    side_paths = install(layer, [lora_term(64, (64,), 4)], torch.float32)
    (factors,) = side_paths.layers.values()
    pointers = (factors.down.data_ptr(), factors.up.data_ptr())
    hook = next(iter(layer._forward_hooks.values()))
    for _ in range(3):
        layer(torch.randn(2, 64))
    assert (factors.down.data_ptr(), factors.up.data_ptr()) == pointers
    assert next(iter(layer._forward_hooks.values())) is hook and hook.args[0] is factors


def test_a_layer_computing_in_another_dtype_gets_the_factors_cast():
    layer = nn.Linear(64, 64).double()
    term = lora_term(64, (64,), 4)
    x = torch.randn(3, 64, generator=seeded(16)).double()
    reference = F.linear(x, merged(layer.weight, [term], torch.float64), layer.bias)
    install(layer, [term], torch.float32)  # factors in float32, the layer in float64
    torch.testing.assert_close(layer(x), reference, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("module, expected", [
    (nn.Linear(8, 4), LayerGeometry((4, 8))),
    (nn.Conv2d(3, 5, 3, stride=2, padding=1), LayerGeometry((5, 3, 3, 3), 2, (2, 2), (1, 1), (1, 1))),
    (nn.Conv2d(4, 4, 3, groups=2), None),
    (nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect"), None),
    (nn.Conv3d(3, 5, 3), None),
    (nn.Embedding(10, 4), None),
    (nn.LayerNorm(4), None),
])
def test_layers_the_side_path_runs_beside(module, expected):
    assert layer_geometry(module) == expected


@pytest.mark.parametrize("term, message", [
    (LowRankTerm(torch.zeros(4, 2), torch.zeros(3, 8), 1.0), "has not rank 2"),
    (LowRankTerm(torch.zeros(4, 2), torch.zeros(2, 9), 1.0), "does not fit a weight of shape (4, 8)"),
    (LowRankTerm(torch.zeros(3, 2), torch.zeros(2, 8), 1.0, row_start=2), "rows 2..5 outside"),
    (LowRankTerm(torch.zeros(4, 2, 3), torch.zeros(2, 8), 1.0), "is not (rows, rank)"),
])
def test_terms_that_do_not_fit_are_named(term, message):
    assert message in check_term(term, LayerGeometry((4, 8)))


def test_a_layer_takes_one_side_path():
    side_paths = install(nn.Linear(8, 8), [lora_term(8, (8,), 2)], torch.float32)
    factors = next(iter(side_paths.layers.values()))
    with pytest.raises(ValueError, match="'layer' already has a LoRA side path"):
        side_paths.add("layer", nn.Linear(8, 8), factors)


def test_side_paths_make_no_reference_cycle_and_go_with_the_model():
    """model → side paths → factors and layer → hook → factors: freed by reference counting alone."""
    gc.collect()
    gc.disable()
    try:
        model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
        side_paths = SidePaths(signature=1)
        for index, layer in enumerate(model):
            side_paths.add(str(index), layer, stack_terms([lora_term(16, (16,), 2)], layer_geometry(layer), "cpu",
                                                          torch.float32))
        model.side_paths = side_paths  # where nodes/lora.py keeps them
        references = [weakref.ref(model), weakref.ref(side_paths)] + [weakref.ref(f) for f in
                                                                       side_paths.layers.values()]
        del model, side_paths, layer
        assert all(r() is None for r in references)
        dropped = nn.Linear(4, 4)
        SidePaths(signature=2).add("x", dropped, stack_terms([lora_term(4, (4,), 1)], layer_geometry(dropped), "cpu",
                                                             torch.float32))
        assert not dropped._forward_hooks, "dropping the side paths removes their hooks"
    finally:
        gc.enable()


def test_torch_compile_traces_the_side_path_once_for_every_block():
    """Core's per-layer LowVramPatch objects make Dynamo recompile each block (Comfy-Org/ComfyUI#14536); the side
    path's hooks and factors are the same objects every step, so twelve compiled blocks of one class compile one
    frame (plus one for dynamic shapes), whatever the number of steps."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    blocks = [ToyDiTBlock(32, 2, 64) for _ in range(12)]
    side_paths = SidePaths(signature=0)
    for index, block in enumerate(blocks):
        for name in ("qkv", "proj", "fc1", "fc2"):
            layer = getattr(block, name)
            term = lora_term(layer.out_features, (layer.in_features,), 4, seed=index)
            side_paths.add(f"{index}.{name}", layer, stack_terms([term], layer_geometry(layer), "cpu", torch.float32))
    counter = CompileCounter()
    compiled = [torch.compile(block, backend=counter) for block in blocks]
    x, t_emb = torch.randn(1, 8, 32, generator=seeded(17)), torch.randn(1, 32, generator=seeded(18))
    with torch.no_grad():
        eager = functools.reduce(lambda h, block: block(h, t_emb), blocks, x)
        for _ in range(3):
            out = functools.reduce(lambda h, block: block(h, t_emb), compiled, x)
    torch._dynamo.reset()
    assert counter.frame_count <= 2, f"{counter.frame_count} compiled frames for 12 blocks"
    torch.testing.assert_close(out, eager)
