"""Auto placement inside ComfyUI (#18): core's own `load_models_gpu` budget for two latent shapes in a row re-places
the model (only the blocks whose tier changes move, the file is not read again, RAM does not grow beyond the moved
blocks, one ledger entry), outputs stay bit-exact against a fresh load with the same plan and against core's own
model, and core's per-layer cast-on-use path never takes a DisTorch layer: not when a load's budget is short, not in
fixed mode, not when core asks for memory back (`partially_unload`).

Core computes a weight budget only for a GPU: the `fake_cuda` fixture (conftest.py) makes core see FAKE_GPU (whose
tensors stay in RAM) as one, with `fake_gpu`'s free memory. The budgets follow from core's activation estimate of
each latent (`sampler_helpers.estimate_memory`, core's formula, through core's `prepare_sampling`); the medium Wan
model's `memory_usage_factor` is set so that two latents a few frames apart differ by a few blocks, since the real
factor makes a 290 MB model's activations either tiny or far larger than the model."""

import ctypes
import gc
import math

import comfy.model_management as mm
import comfy.model_patcher
import comfy.sampler_helpers
import comfy.sd
import folder_paths
import psutil
import pytest
import torch
from conftest import FAKE_GPU
from distorch_pack.distorch.ledger import LEDGER
from distorch_pack.nodes import lora, runs
from distorch_pack.nodes.loading import load_unet
from distorch_pack.nodes.patcher import DisTorchModelPatcher
from distorch_pack.nodes.settings import DisTorchSettings
from distorch_pack.nodes.state import DisTorchState
from pack_in_comfyui import wan_forward

MEDIUM = "medium_wan21.safetensors"
AUTO = DisTorchSettings.validate("cpu", 0.0, "cpu", "", ("cpu",), True)
MIB = 1 << 20
FRAME_SIDE = (90, 160)  # a 720p Wan latent frame


@pytest.fixture
def core_unloads(monkeypatch):
    """Calls of core's own per-layer partial unload on a DisTorch patcher."""
    calls = []
    real = comfy.model_patcher.ModelPatcher.partially_unload

    def spy(self, *args, **kwargs):
        if isinstance(self, DisTorchModelPatcher):
            calls.append(type(self.model).__name__)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(comfy.model_patcher.ModelPatcher, "partially_unload", spy)
    return calls


def lora_patches(model) -> dict:
    """A 'diff' patch on one layer of every block: baked into resident layers, applied per forward when streamed."""
    generator = torch.Generator().manual_seed(11)
    patches = {}
    for key, tensor in model.state_dict().items():
        if key.endswith("ffn.0.weight") and ".blocks." in key:
            patches[key] = (torch.randn(tensor.shape, generator=generator) * 0.01,)
    return patches


def distorch_medium(settings=AUTO, fake_gpu=None):
    patcher, _ = load_unet(MEDIUM, "default", settings)
    patcher.load_device = FAKE_GPU
    lora = patcher.clone()
    lora.add_patches(lora_patches(patcher.model))
    return fake_gpu.track(lora) if fake_gpu is not None else lora


def core_reference():
    """Core's own loader and load, the same LoRA: what every placement must compute."""
    patcher = comfy.sd.load_diffusion_model(folder_paths.get_full_path("diffusion_models", MEDIUM))
    patcher.add_patches(lora_patches(patcher.model))
    mm.load_models_gpu([patcher])
    return wan_forward(patcher.model.diffusion_model)


class Shapes:
    """Latents whose activation estimates (core's formula) sit above core's floor and `step` frames apart differ
    by `blocks_apart` blocks."""

    def __init__(self, patcher, blocks_apart: float = 3.5, step: int = 2):
        block = max(b.nbytes for b in DisTorchState.of(patcher.model).plan.blocks)
        per_frame = blocks_apart * block / step
        patcher.model.memory_usage_factor = 1.0
        patcher.model.memory_usage_factor = per_frame / patcher.model.memory_required([1, 16, 1, *FRAME_SIDE])
        floor = mm.minimum_inference_memory() - mm.extra_reserved_memory()
        self.first = math.ceil(floor / per_frame) + 1  # frames of the smaller latent
        self.step = step
        self.patcher = patcher

    def shape(self, larger: bool) -> tuple[int, ...]:
        return (1, 16, self.first + (self.step if larger else 0), *FRAME_SIDE)

    def estimate(self, larger: bool) -> tuple[int, int]:
        return comfy.sampler_helpers.estimate_memory(self.patcher, self.shape(larger), {})


def sample_load(patcher, shapes: Shapes, larger: bool) -> None:
    """What a sampler does before its steps for this latent: the patcher's wrappers into the model options, then
    core's `prepare_sampling` (its activation estimate and `load_models_gpu`)."""
    options = comfy.model_patcher.create_model_options_clone(patcher.model_options)
    comfy.sampler_helpers.prepare_model_patcher(patcher, {}, options)
    comfy.sampler_helpers.prepare_sampling(patcher, shapes.shape(larger), {}, model_options=options)


def card_for(patcher, shapes: Shapes, resident_blocks: float) -> int:
    """A card on which the smaller latent leaves room for the rest, `resident_blocks` blocks and two slots."""
    plan = DisTorchState.of(patcher.model).plan
    block = max(b.nbytes for b in plan.blocks)
    _, minimum = shapes.estimate(False)
    reserve = max(mm.minimum_inference_memory(), minimum + mm.extra_reserved_memory())
    return int(reserve + plan.rest_bytes + (resident_blocks + 2) * block)


def core_cast_layers(patcher) -> list[str]:
    """Layers outside the streamed blocks that core's lowvram path marked cast-on-use or gave a LowVramPatch."""
    state = DisTorchState.of(patcher.model)
    found = []
    for name, module in patcher.model.named_modules():
        if state.is_streamed(name):
            continue
        functions = list(getattr(module, "weight_function", [])) + list(getattr(module, "bias_function", []))
        if hasattr(module, "prev_comfy_cast_weights") or any(isinstance(f, comfy.model_patcher.LowVramPatch)
                                                              for f in functions):
            found.append(name)
    return found


def fresh_forward(plan, patches=None) -> torch.Tensor:
    """A fresh DisTorch load of the model placed by `plan` from the start (its load keeps the plan it is given:
    without a budget from core a fixed amount would re-plan for its number) with `patches` (a LoRA's tensors)
    or the 'diff' patches of `distorch_medium`."""
    if patches is None:
        fresh = distorch_medium(DisTorchSettings.validate("cpu", 0.0, "cpu", "", ("cpu",), False))
    else:
        fresh, _ = load_unet(MEDIUM, "default", DisTorchSettings.validate("cpu", 0.0, "cpu", "", ("cpu",), False))
        fresh = comfy.sd.load_lora_for_models(fresh, None, patches, 1.0, 0)[0]
    DisTorchState.of(fresh.model).placement.move_to(plan)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runs, "place_for_run", lambda *args: None)
        mm.load_models_gpu([fresh])
    assert DisTorchState.of(fresh.model).plan is plan
    out = wan_forward(fresh.model.diffusion_model)
    index = next(i for i, loaded in enumerate(mm.current_loaded_models) if loaded.model is fresh)
    mm.current_loaded_models.pop(index).model_unload()  # the fresh model only: a test's model stays loaded
    return out


def rss() -> int:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return psutil.Process().memory_info().rss


def streamed(patcher) -> frozenset[str]:
    return DisTorchState.of(patcher.model).plan.streamed


def test_two_latents_in_a_row_move_only_the_blocks_that_change_tier(fake_cuda, core_unloads, file_reads):
    expected = core_reference()
    mm.unload_all_models()
    patcher = distorch_medium(fake_gpu=fake_cuda)
    file_reads.clear()
    shapes = Shapes(patcher)
    block = max(b.nbytes for b in DisTorchState.of(patcher.model).plan.blocks)
    fake_cuda.total = card_for(patcher, shapes, resident_blocks=10.5)

    assert patcher.model_size() == mm.module_size(patcher.model), "auto mode: the whole model, as core counts it"
    sample_load(patcher, shapes, larger=False)
    state = DisTorchState.of(patcher.model)
    small = state.plan
    assert small.mode == "auto" and len(small.streamed) == 6, small.report()
    assert patcher.model_size() == mm.module_size(patcher.model), "loaded, still the whole model"
    assert small.budget.activation_bytes == shapes.estimate(False)[1], "the sampler's estimate is reported"
    assert patcher.loaded_size() <= small.budget.weight_bytes
    assert core_cast_layers(patcher) == [] and patcher.model.lowvram_patch_counter == 0
    out_small = wan_forward(patcher.model.diffusion_model)
    assert torch.equal(out_small, expected)
    buffers = {b.name: b.host.data_ptr() for b in state.streamer._blocks if b.host is not None}
    before = rss()

    sample_load(patcher, shapes, larger=True)
    large = state.plan
    assert large.streamed > small.streamed and len(large.streamed) == 9, large.report()
    assert patcher.loaded_size() <= large.budget.weight_bytes
    assert core_cast_layers(patcher) == [] and core_unloads == []
    kept = {b.name: b.host.data_ptr() for b in state.streamer._blocks if b.name in small.streamed}
    assert kept == {n: p for n, p in buffers.items() if n in small.streamed}, "streamed blocks keep their buffers"
    growth = rss() - before
    assert growth <= (len(large.streamed - small.streamed) + 1) * block + 16 * MIB, f"RSS grew {growth / MIB:.0f} MiB"
    out_large = wan_forward(patcher.model.diffusion_model)
    assert torch.equal(out_large, expected)
    accounts = [h for h in LEDGER.holdings() if h not in LEDGER.others(patcher.model)]
    assert len(accounts) == 1 and accounts[0].staged
    assert accounts[0].pinned + accounts[0].pageable == large.streamed_bytes, "the one entry holds the new numbers"

    sample_load(patcher, shapes, larger=False)
    assert state.plan.streamed < large.streamed, "back at the smaller latent: blocks come back, none leaves"
    assert len(state.plan.streamed) <= len(small.streamed)
    assert core_cast_layers(patcher) == [] and torch.equal(wan_forward(patcher.model.diffusion_model), expected)
    again = state.plan
    sample_load(patcher, shapes, larger=False)
    assert state.plan is again, "the same budget moves nothing"
    assert file_reads == {}, "re-placing never reads the file again"
    mm.unload_all_models()
    assert torch.equal(fresh_forward(large), out_large) and torch.equal(fresh_forward(small), out_small)


def test_a_fixed_amount_that_does_not_fit_the_budget_streams_more(fake_cuda):
    """Fixed mode, nothing to stream by its number: the budget still decides, and no layer is cast per use."""
    patcher = distorch_medium(DisTorchSettings.validate("cpu", 0.0, "cpu", "", ("cpu",), False), fake_cuda)
    shapes = Shapes(patcher)
    assert not streamed(patcher)
    fake_cuda.total = card_for(patcher, shapes, resident_blocks=8)
    sample_load(patcher, shapes, larger=False)
    plan = DisTorchState.of(patcher.model).plan
    assert plan.mode == "fixed" and len(plan.streamed) >= 8
    assert any("does not fit the budget for this run" in w for w in plan.warnings)
    assert core_cast_layers(patcher) == [] and patcher.loaded_size() <= plan.budget.weight_bytes


def test_core_asking_for_memory_back_streams_more_blocks(fake_cuda, core_unloads):
    """A second model loaded beside it: core's free_memory asks the DisTorch model for room (partially_unload), and
    it streams more blocks rather than having core cast its layers; it stays loaded."""
    patcher = distorch_medium(fake_gpu=fake_cuda)
    shapes = Shapes(patcher)
    fake_cuda.total = card_for(patcher, shapes, resident_blocks=12)
    sample_load(patcher, shapes, larger=False)
    before = (streamed(patcher), patcher.loaded_size())
    other = comfy.sd.load_diffusion_model(folder_paths.get_full_path("diffusion_models", "tiny_wan21.safetensors"))
    other.load_device = FAKE_GPU
    block = max(b.nbytes for b in DisTorchState.of(patcher.model).plan.blocks)
    # Something else took memory meanwhile: the other model needs about three blocks of the DisTorch model's room.
    fake_cuda.total = int(patcher.loaded_size() + mm.minimum_inference_memory() + other.model_size() * 1.1
                          - 3 * block)
    mm.load_models_gpu([fake_cuda.track(other)], force_full_load=True)
    after = (streamed(patcher), patcher.loaded_size())
    assert after[0] > before[0] and after[1] < before[1]
    loaded = [m.model for m in mm.current_loaded_models]
    assert patcher in loaded and other in loaded, "both stay loaded: the DisTorch model made room by streaming"
    assert core_unloads == [] and core_cast_layers(patcher) == []
    assert sum(m.loaded_size() for m in loaded) <= fake_cuda.total


def test_timings_of_a_run_feed_the_next_plan(fake_cuda):
    """Auto mode times the first passes of a run (on the CPU: the clock) and the next load's plan uses them."""
    patcher = distorch_medium(fake_gpu=fake_cuda)
    shapes = Shapes(patcher)
    fake_cuda.total = card_for(patcher, shapes, resident_blocks=10.5)
    sample_load(patcher, shapes, larger=False)
    state = DisTorchState.of(patcher.model)
    assert "no run measured yet" in state.plan.prefetch_reason
    for _ in range(4):  # one warm-up pass, three measured
        wan_forward(patcher.model.diffusion_model)
    sample_load(patcher, shapes, larger=True)
    assert state.timings is not None and len(state.timings.compute_s) == len(state.plan.blocks)
    assert all(t > 0 for t in state.timings.compute_s) and state.timings.passes == 3
    assert "predicted pass" in state.plan.prefetch_reason and state.plan.schedule.pass_s is not None


def test_an_auto_model_gets_its_room_back_from_a_model_core_can_evict(fake_cuda):
    """A model loaded meanwhile took part of the card (core partially unloaded the DisTorch model for it: more blocks
    streamed); the next sampler run has core unload it again (for the run's estimate and the model's whole size,
    which auto mode reports as core reports its own), and the blocks streamed for it come back."""
    patcher = distorch_medium(fake_gpu=fake_cuda)
    shapes = Shapes(patcher)
    fake_cuda.total = card_for(patcher, shapes, resident_blocks=10.5)
    sample_load(patcher, shapes, larger=False)
    first = streamed(patcher)
    # A model of half this one's size: core makes room for it by a partial unload, not a whole one.
    other = comfy.sd.load_diffusion_model(folder_paths.get_full_path("diffusion_models", MEDIUM),
                                          model_options={"dtype": torch.float16})
    other.load_device = FAKE_GPU
    mm.load_models_gpu([fake_cuda.track(other)], force_full_load=True)
    assert streamed(patcher) > first and patcher in [m.model for m in mm.current_loaded_models], \
        "room for the other model: more streamed, still loaded"
    sample_load(patcher, shapes, larger=False)
    assert other not in [m.model for m in mm.current_loaded_models], "core unloads the other model for it"
    assert len(streamed(patcher)) <= len(first) and core_cast_layers(patcher) == []


def test_a_model_loaded_whole_streams_when_core_asks_for_room(fake_cuda, core_unloads):
    """Nothing streamed on a roomy card (core loaded the model whole); a second model then needs room: the blocks
    that leave are staged and streamed (their bytes really leave the device), outputs unchanged."""
    expected = core_reference()
    mm.unload_all_models()
    patcher = distorch_medium(fake_gpu=fake_cuda)
    shapes = Shapes(patcher)
    fake_cuda.total = card_for(patcher, shapes, resident_blocks=16)
    sample_load(patcher, shapes, larger=False)
    state = DisTorchState.of(patcher.model)
    assert not state.plan.streamed and state.streamer is None, state.plan.report()
    other = comfy.sd.load_diffusion_model(folder_paths.get_full_path("diffusion_models", MEDIUM),
                                          model_options={"dtype": torch.float16})
    other.load_device = FAKE_GPU
    mm.load_models_gpu([fake_cuda.track(other)], force_full_load=True)
    assert state.plan.streamed and state.streamer is not None and state.streamer.is_open
    staged = {b.name for b in state.streamer._blocks if b.is_staged}
    assert staged == set(state.plan.streamed), "every block that left is staged in its buffer"
    assert patcher.loaded_size() <= fake_cuda.total - other.loaded_size()
    assert core_unloads == [] and core_cast_layers(patcher) == []
    assert torch.equal(wan_forward(patcher.model.diffusion_model), expected)


def low_rank_lora(model, rank: int = 4) -> dict:
    """A LoRA file's tensors (rank 4 on every block's first FFN matrix), as LoraLoaderModelOnly reads them."""
    generator = torch.Generator().manual_seed(13)
    tensors = {}
    for key, weight in model.state_dict().items():
        if key.endswith("ffn.0.weight") and ".blocks." in key:
            layer = key.removesuffix(".weight")
            tensors[f"{layer}.lora_up.weight"] = torch.randn(weight.shape[0], rank, generator=generator) * 0.05
            tensors[f"{layer}.lora_down.weight"] = torch.randn(rank, weight.shape[1], generator=generator) * 0.05
            tensors[f"{layer}.alpha"] = torch.tensor(float(rank))
    return tensors


def test_low_rank_loras_follow_the_blocks_that_move(fake_cuda):
    """A plain LoRA runs as a side path on streamed layers and is baked into resident ones: when blocks change tier
    the side paths are built again for the new streamed set (none left on a resident layer, none missing on a
    streamed one), and the output equals a fresh load with the same plan bit for bit and core's within rounding."""
    patcher, _ = load_unet(MEDIUM, "default", AUTO)
    patcher.load_device = FAKE_GPU
    tensors = low_rank_lora(patcher.model)
    patched = fake_cuda.track(comfy.sd.load_lora_for_models(patcher, None, tensors, 1.0, 0)[0])
    core = comfy.sd.load_diffusion_model(folder_paths.get_full_path("diffusion_models", MEDIUM))
    core = comfy.sd.load_lora_for_models(core, None, tensors, 1.0, 0)[0]
    mm.load_models_gpu([core])
    expected = wan_forward(core.model.diffusion_model)
    mm.unload_all_models()
    shapes = Shapes(patched)
    fake_cuda.total = card_for(patched, shapes, resident_blocks=10.5)
    state = DisTorchState.of(patched.model)
    for larger in (False, True, False):
        sample_load(patched, shapes, larger)
        side = set(lora.installed(patched.model).layers)
        assert side == {f"{b}.ffn.0" for b in state.plan.streamed}, "side paths on the streamed blocks only"
        assert core_cast_layers(patched) == []
        out = wan_forward(patched.model.diffusion_model)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
        assert torch.equal(fresh_forward(state.plan, tensors), out), "as a fresh load with this plan"
