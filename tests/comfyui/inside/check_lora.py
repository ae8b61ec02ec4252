"""LoRA on streamed and GGUF layers as a low-rank side path (issue #19), against core's own LoRA.

Layer by layer: core's adapters (`comfy.lora.load_lora`, `ModelPatcher.add_patches`) of every kind core's
LoraLoader makes, on float32, bfloat16, GGUF Q8_0 and Q4_K layers, through the side path vs core's
`LowVramPatch` merge. Model by model: a DisTorch UNet (streamed, GGUF resident, GGUF streamed) with two stacked
LoRAs loaded by core's `load_models_gpu`, vs core's own loader merging the same LoRAs once; core's merge is
never called per forward, the factors stay across loads, and clones with other LoRAs or none swap them
without reloading the model. The tolerance is distorch/lowrank.py's: per layer within 2 epsilons of the compute
dtype plus 8 of float32 of core's merge (relative, Frobenius); float32 models agree to 1e-4 after every layer.
"""

import gc
import weakref

import comfy.lora
import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.sd
import comfy.utils
import folder_paths
import numpy as np
import pytest
import torch
from conftest import FAKE_GPU
from distorch_pack.gguf_loader import GGMLTensor, quantize_q8_0
from distorch_pack.nodes import lora
from distorch_pack.nodes.folders import register_gguf_folders
from distorch_pack.nodes.gguf_support import comfy_gguf_operations
from distorch_pack.nodes.loading import load_unet
from distorch_pack.nodes.settings import DisTorchSettings
from distorch_pack.nodes.state import DisTorchState
from ggml_samples import random_blocks
from make_models import STACKED_LORAS
from pack_in_comfyui import wan_forward
from torch import nn

FP32_EPS = torch.finfo(torch.float32).eps


def tolerance(dtype: torch.dtype) -> float:
    """distorch/lowrank.py's bound on side path vs merge: relative, Frobenius, per layer."""
    return 2 * torch.finfo(dtype).eps + 8 * FP32_EPS
LORA_A, LORA_B = STACKED_LORAS
HALF = 0.0015  # GB: about half of the tiny Wan's blocks streamed

register_gguf_folders()  # what the pack's extension does when ComfyUI registers it: .gguf files in diffusion_models


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed: int, scale: float = 0.1, dtype=torch.float16) -> torch.Tensor:
    return (torch.randn(*shape, generator=generator(seed)) * scale).to(dtype)


# -- layer by layer: core's adapters, side path vs LowVramPatch ----------------------------------------------

def linear(kind: str, dtype: torch.dtype, out_features: int = 96, in_features: int = 64) -> nn.Module:
    """A layer as a model built by core (manual_cast) or by the pack's GGUF operations holds it."""
    if kind in ("Q8_0", "Q4_K"):
        layer = comfy_gguf_operations().Linear(in_features, out_features, bias=True)
        weight = (quantize_q8_0(torch.randn(out_features, in_features, generator=generator(1)) * 0.05)
                  if kind == "Q8_0" else q4_k(out_features, in_features))
        layer.load_state_dict({"weight": weight, "bias": torch.randn(out_features, generator=generator(2)) * 0.01})
        return layer
    layer = comfy.ops.manual_cast.Linear(in_features, out_features, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_features, in_features, generator=generator(1)) * 0.05)
        layer.bias.copy_(torch.randn(out_features, generator=generator(2)) * 0.01)
    return layer


def q4_k(out_features: int, in_features: int) -> GGMLTensor:
    """Random Q4_K blocks with their fp16 d and dmin scaled down, so values are of a trained layer's size."""
    blocks = random_blocks("Q4_K", out_features * in_features // 256, seed=1)
    blocks[:, :4] = (blocks[:, :4].copy().view(np.float16) * 0.001).view(np.uint8)
    return GGMLTensor(torch.from_numpy(blocks), "Q4_K", (out_features, in_features))


def lora_file(prefix: str, out_features: int, in_shape: tuple, rank: int, seed: int, style: str = "lora") -> dict:
    """A LoRA file's tensors for one layer, in the naming `style` (what core's loaders read)."""
    up, down = randn(out_features, rank, seed=seed), randn(rank, *in_shape, seed=seed + 1)
    if style == "diffusers":  # lora_A/lora_B, no alpha
        return {f"{prefix}.lora_B.weight": up, f"{prefix}.lora_A.weight": down}
    return {f"{prefix}.lora_up.weight": up, f"{prefix}.lora_down.weight": down,
            f"{prefix}.alpha": torch.tensor(float(rank) / 2)}


def patched(layer: nn.Module, loras: list[tuple[dict, dict, float]]) -> comfy.model_patcher.ModelPatcher:
    """A core patcher over a model holding `layer`, with each (file tensors, key map, strength) added as core's
    load_lora_for_models adds it."""
    patcher = comfy.model_patcher.ModelPatcher(nn.ModuleDict({"layer": layer}), torch.device("cpu"),
                                               torch.device("cpu"))
    for tensors, key_map, strength in loras:
        patcher.add_patches(comfy.lora.load_lora(tensors, key_map), strength)
    return patcher


def core_merge_output(layer: nn.Module, patcher, x: torch.Tensor) -> torch.Tensor:
    """The layer's output with core's per-forward merge (what DisTorch did for streamed and GGUF layers)."""
    layer.weight_function = [comfy.model_patcher.LowVramPatch("layer.weight", patcher.patches)]
    layer.prev_comfy_cast_weights, layer.comfy_cast_weights = layer.comfy_cast_weights, True
    try:
        with torch.inference_mode():
            return layer(x)
    finally:
        layer.weight_function = []
        layer.comfy_cast_weights = layer.prev_comfy_cast_weights
        del layer.prev_comfy_cast_weights


def side_path_output(layer: nn.Module, patcher, x: torch.Tensor) -> torch.Tensor:
    routing = lora.route(patcher, [("layer", layer)], torch.device("cpu"), x.dtype)
    assert routing.layers == {"layer"}, "a plain LoRA must run as a side path"
    lora.install(patcher, routing)
    try:
        assert len(layer._forward_hooks) == 1
        with torch.inference_mode():
            return layer(x)
    finally:
        lora.remove(patcher.model)
        assert not layer._forward_hooks


def assert_within_tolerance(side: torch.Tensor, merge: torch.Tensor, plain: torch.Tensor) -> None:
    """Within `tolerance` of core's merge, for LoRAs that change the layer's output (`plain` without them) by four
    times that at least."""
    bound = tolerance(side.dtype)
    share = ((merge.double() - plain.double()).norm() / merge.double().norm()).item()
    assert share >= 4 * bound, f"the LoRAs change the output by {share:.3g} only"
    difference = ((side.double() - merge.double()).norm() / merge.double().norm()).item()
    assert difference <= bound, f"{difference:.3g} > {bound:.3g}"


def qkv_offsets(rank: int) -> list[tuple[dict, dict, float]]:
    """Three LoRAs on the q, k and v thirds of a fused (96, 64) qkv weight, mapped by core's offset keys."""
    loras = []
    for index, part in enumerate("qkv"):
        tensors = lora_file(f"to_{part}", 32, (64,), rank, seed=10 + index)
        loras.append((tensors, {f"to_{part}": ("layer.weight", (0, 32 * index, 32))}, 1.0))
    return loras


LINEAR_CASES = {
    "lora": lambda: [(lora_file("lin", 96, (64,), 8, seed=3), {"lin": "layer.weight"}, 0.8)],
    "diffusers-naming": lambda: [(lora_file("lin", 96, (64,), 8, seed=3, style="diffusers"), {"lin": "layer.weight"},
                                  1.0)],
    "negative-strength": lambda: [(lora_file("lin", 96, (64,), 8, seed=3), {"lin": "layer.weight"}, -1.3)],
    "stacked": lambda: [(lora_file("lin", 96, (64,), 8, seed=3), {"lin": "layer.weight"}, 0.7),
                        (lora_file("lin", 96, (64,), 16, seed=5), {"lin": "layer.weight"}, -0.4)],
    "qkv-offsets": lambda: qkv_offsets(4),
}


@pytest.mark.parametrize("kind, dtype", [("float", torch.float32), ("float", torch.bfloat16),
                                         ("Q8_0", torch.float32), ("Q4_K", torch.bfloat16)],
                         ids=["fp32", "bf16", "Q8_0", "Q4_K-bf16"])
@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_core_lora_on_a_linear_runs_beside_it_as_core_merges_it(kind, dtype, case):
    layer = linear(kind, dtype)
    patcher = patched(layer, LINEAR_CASES[case]())
    x = torch.randn(2, 10, 64, generator=generator(4)).to(dtype)
    with torch.inference_mode():
        plain = layer(x)
    merge = core_merge_output(layer, patcher, x)
    side = side_path_output(layer, patcher, x)
    assert_within_tolerance(side, merge, plain)
    with torch.inference_mode():
        assert torch.equal(layer(x), plain), "removing the side path must give the layer back"


@pytest.mark.parametrize("mid", [False, True], ids=["locon", "locon-tucker"])
def test_core_locon_on_a_conv2d_runs_beside_it_as_core_merges_it(mid):
    layer = comfy.ops.manual_cast.Conv2d(8, 12, 3, padding=1, stride=2)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(12, 8, 3, 3, generator=generator(1)) * 0.1)
        layer.bias.zero_()
    tensors = {"conv.lora_up.weight": randn(12, 4, 1, 1, seed=2), "conv.alpha": torch.tensor(2.0 if mid else 4.0)}
    if mid:  # a 1x1 down projection and a kernel-sized mid (Tucker)
        tensors["conv.lora_down.weight"] = randn(4, 8, 1, 1, seed=3)
        tensors["conv.lora_mid.weight"] = randn(4, 4, 3, 3, seed=4)
    else:
        tensors["conv.lora_down.weight"] = randn(4, 8, 3, 3, seed=3)
    patcher = patched(layer, [(tensors, {"conv": "layer.weight"}, 0.9)])
    x = torch.randn(2, 8, 9, 7, generator=generator(5))
    with torch.inference_mode():
        plain = layer(x)
    assert_within_tolerance(side_path_output(layer, patcher, x), core_merge_output(layer, patcher, x), plain)


def non_low_rank(kind: str) -> tuple[dict, float]:
    """(LoRA file tensors for the prefix "lin" of a (96, 64) weight, strength_model) of patches that merge."""
    if kind == "loha":
        return {"lin.hada_w1_a": randn(96, 4, seed=1), "lin.hada_w1_b": randn(4, 64, seed=2),
                "lin.hada_w2_a": randn(96, 4, seed=3), "lin.hada_w2_b": randn(4, 64, seed=4),
                "lin.alpha": torch.tensor(4.0)}, 1.0
    if kind == "lokr":
        return {"lin.lokr_w1": randn(8, 4, seed=1), "lin.lokr_w2": randn(12, 16, seed=2)}, 1.0
    if kind == "dora":
        return {**lora_file("lin", 96, (64,), 8, seed=3), "lin.dora_scale": randn(96, 1, seed=5, scale=1.0)}, 1.0
    if kind == "diff":
        return {"lin.diff": randn(96, 64, seed=6, scale=0.01)}, 1.0
    return lora_file("lin", 96, (64,), 8, seed=3), 0.5  # strength_model != 1 scales the whole weight


@pytest.mark.parametrize("kind", ["loha", "lokr", "dora", "diff", "strength_model", "lora+loha"])
def test_a_key_with_a_patch_that_is_not_plain_low_rank_stays_on_cores_merge(kind):
    layer = linear("Q8_0", torch.float32)
    patcher = comfy.model_patcher.ModelPatcher(nn.ModuleDict({"layer": layer}), torch.device("cpu"),
                                               torch.device("cpu"))
    if kind == "lora+loha":  # the whole key goes one way
        patcher.add_patches(comfy.lora.load_lora(lora_file("lin", 96, (64,), 8, seed=3), {"lin": "layer.weight"}), 1.0)
        kind = "loha"
    tensors, strength_model = non_low_rank(kind)
    patches = comfy.lora.load_lora(tensors, {"lin": "layer.weight"})
    assert "layer.weight" in patches
    patcher.add_patches(patches, 1.0, strength_model)
    assert lora.route(patcher, [("layer", layer)], torch.device("cpu"), torch.float32).layers == frozenset()


def test_a_patch_with_a_function_or_an_offset_off_the_rows_stays_on_cores_merge():
    """The offset narrows the (96, 64) weight's columns to (96, 32); core reshapes the LoRA's (48, 64) product onto
    that slice, which no side path on output rows reproduces, though the factors' sizes would fit the layer."""
    layer = linear("Q8_0", torch.float32)
    tensors = lora_file("lin", 48, (64,), 8, seed=3)
    for key in (("layer.weight", (1, 0, 32)), ("layer.weight", None, lambda w: w * 2)):
        patcher = comfy.model_patcher.ModelPatcher(nn.ModuleDict({"layer": layer}), torch.device("cpu"),
                                                   torch.device("cpu"))
        patcher.add_patches({key: comfy.lora.load_lora(tensors, {"lin": "layer.weight"})["layer.weight"]}, 1.0)
        assert lora.route(patcher, [("layer", layer)], torch.device("cpu"), torch.float32).layers == frozenset()


# -- model by model: a DisTorch UNet with LoRAs through core's loading ---------------------------------------

def lora_tensors(name: str) -> dict:
    return comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("loras", name), safe_load=True)


def with_loras(patcher, *loras: tuple[str, float]):
    """What chained LoraLoaderModelOnly nodes return: clones with each file's patches added."""
    for name, strength in loras:
        patcher = comfy.sd.load_lora_for_models(patcher, None, lora_tensors(name), strength, 0)[0]
    return patcher


def loaded_forward(patcher) -> torch.Tensor:
    mm.load_models_gpu([patcher])
    return wan_forward(patcher.model.diffusion_model)


CORE_REFERENCE = {"tiny_wan21.safetensors": "tiny_wan21.safetensors",
                  "tiny_wan21_Q8_0.gguf": "tiny_wan21_Q8_0_dequant.safetensors"}


@pytest.mark.parametrize("file, virtual_vram_gb", [("tiny_wan21.safetensors", HALF), ("tiny_wan21_Q8_0.gguf", 0.0),
                                                   ("tiny_wan21_Q8_0.gguf", HALF)],
                         ids=["streamed", "gguf-resident", "gguf-streamed"])
def test_stacked_loras_run_beside_streamed_and_gguf_layers_as_core_merges_them(file, virtual_vram_gb, merge_calls):
    """Two LoRAs (rank 32, strengths 0.8 and -0.5) on every attention and FFN matrix: the output is core's own
    loader's with the same LoRAs, core never merges per forward, the factors are counted in what core is told and
    stay across loads, and the base model without LoRAs gives its output back bit for bit."""
    loras = ((LORA_A, 0.8), (LORA_B, -0.5))
    core = with_loras(comfy.sd.load_diffusion_model(folder_paths.get_full_path_or_raise(
        "diffusion_models", CORE_REFERENCE[file])), *loras)
    reference = loaded_forward(core)
    mm.unload_all_models()
    base, _ = load_unet(file, "default", DisTorchSettings("cpu", virtual_vram_gb, "cpu"))
    plain = loaded_forward(base)
    state = DisTorchState.of(base.model)
    streamer = state.streamer
    patched_unet = with_loras(base, *loras)
    mm.load_models_gpu([patched_unet])
    side_paths = lora.installed(patched_unet.model)
    beside = {name for name in lora_layers(LORA_A) if state.is_streamed(name) or file.endswith(".gguf")}
    assert set(side_paths.layers) == beside and len(beside) >= 20, "every streamed or GGUF layer; core merges the rest"
    assert side_paths.nbytes == factor_bytes(LORA_A, LORA_B, layers=beside)
    assert patched_unet.loaded_size() == patched_unet.model_size() == base.model_size() + side_paths.nbytes
    merge_calls.clear()
    ours = wan_forward(patched_unet.model.diffusion_model)
    assert merge_calls == [], f"core merged {sorted(set(merge_calls))[:3]} on a forward"
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
    factors = side_paths.layers
    assert torch.equal(loaded_forward(patched_unet), ours)
    assert lora.installed(patched_unet.model) is side_paths and all(
        side_paths.layers[name] is f for name, f in factors.items()), "a second load must keep the factors"
    assert torch.equal(loaded_forward(base), plain), "without the LoRAs the model must give its output back"
    assert lora.installed(base.model) is None
    assert DisTorchState.of(base.model).streamer is streamer, "switching LoRAs must not reload the model"


def lora_layers(name: str) -> set[str]:
    """The layers a LoRA file patches (4 blocks x self-attention q k v o, cross-attention q k v o, FFN 0 and 2)."""
    return {key.removesuffix(".lora_up.weight") for key in lora_tensors(name) if key.endswith(".lora_up.weight")}


def factor_bytes(*names: str, layers: set[str] | None = None) -> int:
    """Bytes of the stacked factors of LoRA files on `layers` (default: all), counted from the files: every up and
    down projection once, in float32 (the compute dtype under --cpu)."""
    return sum(t.numel() * 4 for name in names for key, t in lora_tensors(name).items()
               if key.endswith("weight") and (layers is None or key.rsplit(".", 2)[0] in layers))


def test_strength_changes_and_other_loras_follow_the_patcher_being_loaded():
    unet, _ = load_unet("tiny_wan21_Q8_0.gguf", "default", DisTorchSettings("cpu", HALF, "cpu"))
    core = comfy.sd.load_diffusion_model(folder_paths.get_full_path_or_raise(
        "diffusion_models", "tiny_wan21_Q8_0_dequant.safetensors"))
    for loras in (((LORA_A, 1.0),), ((LORA_A, 0.3),), ((LORA_B, 1.0), (LORA_A, -0.2)), ((LORA_A, 1.0),)):
        expected = loaded_forward(with_loras(core, *loras))
        torch.testing.assert_close(loaded_forward(with_loras(unet, *loras)), expected, rtol=1e-4, atol=1e-5)


def test_a_key_with_a_non_low_rank_patch_keeps_cores_merge_on_a_streamed_layer(merge_calls):
    """LoHa on one FFN matrix beside the LoRA: that key merges through core's LowVramPatch each forward (core's own
    arithmetic, so core's output), every other key runs beside its layer."""
    unet, _ = load_unet("tiny_wan21.safetensors", "default", DisTorchSettings("cpu", HALF, "cpu"))
    name = next(n for n, _ in DisTorchState.of(unet.model).streamed_modules(unet.model) if n.endswith(".ffn.0"))
    loha = {f"{name}.hada_w1_a": randn(256, 4, seed=1), f"{name}.hada_w1_b": randn(4, 128, seed=2),
            f"{name}.hada_w2_a": randn(256, 4, seed=3), f"{name}.hada_w2_b": randn(4, 128, seed=4)}
    patched_unet = comfy.sd.load_lora_for_models(with_loras(unet, (LORA_A, 0.8)), None, loha, 1.0, 0)[0]
    core = comfy.sd.load_diffusion_model(folder_paths.get_full_path_or_raise("diffusion_models",
                                                                             "tiny_wan21.safetensors"))
    core = comfy.sd.load_lora_for_models(with_loras(core, (LORA_A, 0.8)), None, loha, 1.0, 0)[0]
    reference = loaded_forward(core)
    mm.load_models_gpu([patched_unet])
    layer = patched_unet.model.get_submodule(name)
    assert not layer._forward_hooks and isinstance(layer.weight_function[0], comfy.model_patcher.LowVramPatch)
    state = DisTorchState.of(unet.model)
    beside = {n for n in lora_layers(LORA_A) if state.is_streamed(n)} - {name}
    assert set(lora.installed(patched_unet.model).layers) == beside
    merge_calls.clear()
    torch.testing.assert_close(wan_forward(patched_unet.model.diffusion_model), reference, rtol=1e-4, atol=1e-5)
    assert set(merge_calls) == {f"{name}.weight"}


def test_core_partially_unloading_a_gguf_model_keeps_one_lora_per_layer():
    """Core gives every layer it moves off the device its own LowVramPatch; on a GGUF layer beside a side path (or
    its earlier LowVramPatch) that would apply the LoRA twice."""
    unet, _ = load_unet("tiny_wan21_Q8_0.gguf", "default", DisTorchSettings("cpu", 0.0, "cpu"))
    unet.load_device = FAKE_GPU  # core manages it as a GPU model; its tensors stay in RAM
    patched_unet = with_loras(unet, (LORA_A, 0.8))
    before = loaded_forward(patched_unet)
    freed = patched_unet.partially_unload(torch.device("cpu"), patched_unet.loaded_size() // 2)
    assert freed > 0
    assert torch.equal(wan_forward(patched_unet.model.diffusion_model), before)


def test_unloading_frees_the_factors_and_what_core_is_told():
    unet, _ = load_unet("tiny_wan21_Q8_0.gguf", "default", DisTorchSettings("cpu", HALF, "cpu"))
    patched_unet = with_loras(unet, (LORA_A, 1.0), (LORA_B, 1.0))
    assert patched_unet.model_size() == unet.model_size() + factor_bytes(LORA_A, LORA_B), "told before it loads"
    mm.load_models_gpu([patched_unet])
    side_paths = lora.installed(patched_unet.model)
    assert patched_unet.loaded_size() == patched_unet.model_size()
    mm.unload_all_models()
    assert lora.installed(patched_unet.model) is None and side_paths.nbytes == 0 and not side_paths.layers
    assert patched_unet.loaded_size() == 0


def test_the_older_tuple_form_of_a_lora_runs_as_the_adapter_does():
    """Cores before the weight adapters kept a LoRA as ("lora", (up, down, alpha, mid, dora_scale, reshape))."""
    layer = linear("Q8_0", torch.float32)
    adapter_patcher = patched(layer, [(lora_file("lin", 96, (64,), 8, seed=3), {"lin": "layer.weight"}, 0.8)])
    (strength, adapter, strength_model, offset, function), = adapter_patcher.patches["layer.weight"]
    tuple_patcher = comfy.model_patcher.ModelPatcher(nn.ModuleDict({"layer": layer}), torch.device("cpu"),
                                                     torch.device("cpu"))
    tuple_patcher.patches["layer.weight"] = [(strength, ("lora", tuple(adapter.weights)), strength_model, offset,
                                              function)]
    x = torch.randn(3, 64, generator=generator(6))
    torch.testing.assert_close(side_path_output(layer, tuple_patcher, x), side_path_output(layer, adapter_patcher, x),
                               rtol=0, atol=0)


def test_a_loaded_model_with_side_paths_is_freed_by_reference_counting():
    """ComfyUI drops a model by dropping its patchers (a loader's output leaves the cache), loaded or not. model ->
    side paths -> factors and layer -> hook -> factors make no cycle, so the model and its factors go at once
    (with a cycle they would wait for a garbage collection, and core would warn "memory leak")."""
    gc.collect()
    gc.disable()
    try:
        unet, _ = load_unet("tiny_wan21_Q8_0.gguf", "default", DisTorchSettings("cpu", HALF, "cpu"))
        patched_unet = with_loras(unet, (LORA_A, 1.0), (LORA_B, 0.5))
        loaded_forward(patched_unet)
        side_paths = lora.installed(unet.model)
        references = [weakref.ref(unet.model), weakref.ref(side_paths)] + [weakref.ref(f) for f in
                                                                             side_paths.layers.values()]
        del unet, patched_unet, side_paths
        assert all(r() is None for r in references)
    finally:
        gc.enable()
