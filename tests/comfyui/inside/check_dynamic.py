"""A DisTorch model beside Dynamic VRAM (ComfyUI 2026): a classic patcher, built without a second read of the
file, with core's prefetch queue off, its slots allocated outside the memory compiler's recording, core's
pinned-memory budget and --vram-headroom honoured, and a `cached_patcher_init` factory that rebuilds it with
its plan. Cores without these features take (and are checked on) the classic path."""

import inspect
import sys
import types

import comfy.model_management as mm
import comfy.model_patcher
import comfy.patcher_extension
import comfy.sd
import comfy.utils
import folder_paths
import pytest
import torch
from conftest import HAS_DYNAMIC, MODELS
from distorch_pack.nodes import loading, memory_policy
from distorch_pack.nodes import patcher as distorch_patcher
from distorch_pack.nodes.loading import load_clip, load_unet, load_vae
from distorch_pack.nodes.memory_policy import loader_inventory
from distorch_pack.nodes.patcher import DisTorchModelPatcher
from distorch_pack.nodes.settings import DisTorchSettings
from distorch_pack.nodes.state import DisTorchState
from pack_in_comfyui import wan_forward
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode

WAN = "tiny_wan21.safetensors"
HALF = DisTorchSettings("cpu", 0.0015, "cpu")
dynamic_only = pytest.mark.skipif(not HAS_DYNAMIC, reason="this ComfyUI has no Dynamic VRAM")


def loaded_wan_forward(patcher) -> torch.Tensor:
    mm.load_models_gpu([patcher])
    return wan_forward(patcher.model.diffusion_model)


@dynamic_only
def test_loaders_get_a_classic_patcher_from_core_and_read_each_file_once(dynamic_core, file_reads):
    unet, _ = load_unet(WAN, "default", HALF)
    clip, _ = load_clip(["random_clip_l.safetensors"], "stable_diffusion", HALF)
    assert dynamic_core.instances == 0, "core's loaders must build the classic patcher (disable_dynamic=True)"
    for patcher in (unet, clip.patcher):
        assert isinstance(patcher, DisTorchModelPatcher) and not patcher.is_dynamic()
    assert file_reads == {WAN: 1, "random_clip_l.safetensors": 1}


@dynamic_only
def test_a_vae_built_for_dynamic_vram_is_adopted_without_a_second_read(dynamic_core, file_reads, tmp_path,
                                                                       monkeypatch):
    """comfy.sd.VAE takes no disable_dynamic: the dynamic patcher core builds is replaced by a classic one over
    the same model, whose weights (assigned as stored: bf16 here) are converted as a classic load copies them."""
    stored = comfy.utils.load_torch_file(str(MODELS / "vae" / "tiny_taesd.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in stored.items()}, str(tmp_path / "taesd_bf16.safetensors"))
    folder_paths.add_model_folder_path("vae", str(tmp_path))
    file_reads.clear()
    vae, _ = load_vae("taesd_bf16.safetensors", HALF)
    assert dynamic_core.instances == 1 and file_reads == {"taesd_bf16.safetensors": 1}
    assert isinstance(vae.patcher, DisTorchModelPatcher) and not vae.patcher.is_dynamic()
    monkeypatch.setattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
    classic = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(tmp_path / "taesd_bf16.safetensors")),
                           device=torch.device("cpu"), **loading._not_dynamic(comfy.sd.VAE))
    assert not classic.patcher.is_dynamic()
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(vae.decode(latent), classic.decode(latent))


def test_core_prefetch_queue_stays_off(monkeypatch):
    """model_base enables core's block prefetch per forward from `patcher.is_dynamic()`; the DisTorch patcher says
    no, and its DIFFUSION_MODEL wrapper turns the flag off should anything else have set it."""
    unet, _ = load_unet(WAN, "default", HALF)
    assert not unet.is_dynamic()
    wrapper, = unet.get_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "distorch")
    seen = []
    wrapper(lambda *args, **kwargs: seen.append(dict(kwargs["transformer_options"])), "x", "t",
            transformer_options={"prefetch_dynamic_vbars": True})
    assert seen == [{"prefetch_dynamic_vbars": False}]

    observed = []

    def spy(executor, *args, **kwargs):
        observed.extend(v.get("prefetch_dynamic_vbars", False) for v in (*args, *kwargs.values())
                        if isinstance(v, dict) and "wrappers" in v)
        return executor(*args, **kwargs)

    sampling = unet.clone()
    sampling.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "distorch")
    sampling.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "spy", spy)
    sample(sampling)
    assert observed and not any(observed), "core turned its prefetch queue on for a DisTorch model"


def sample(patcher) -> torch.Tensor:
    import comfy.sample

    latent = torch.zeros(1, 16, 2, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 0)
    cond = [[torch.zeros(1, 8, 4096), {}]]
    return comfy.sample.sample(patcher, noise, 1, 1.0, "euler", "simple", cond, cond, latent)


class CompilerRecording(TorchDispatchMode):
    """A memory compiler's recording scope, as far as allocations go: every tensor allocated while recording and
    not paused would be recorded (and replayed) by ComfyUI's memory compiler."""

    ALLOCATING = ("aten.empty", "aten.new_empty", "aten.zeros", "aten.ones", "aten.full", "aten._to_copy")

    def __init__(self):
        super().__init__()
        self.paused = 0
        self.recorded = []

    def pause(self, sync=False):
        recording = self

        class Paused:
            def __enter__(self):
                recording.paused += 1

            def __exit__(self, *exc):
                recording.paused -= 1

        return Paused()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused and str(func).startswith(self.ALLOCATING):
            self.recorded.append(str(func))
        return func(*args, **(kwargs or {}))


def test_slots_and_staging_are_allocated_outside_the_memory_compiler_recording(monkeypatch):
    recording = CompilerRecording()
    prefetch = sys.modules.get("comfy.model_prefetch")
    if prefetch is None:  # cores before 2026 have no prefetch module; stand one in with the compiler's pause API
        try:
            import comfy.model_prefetch as prefetch
        except ImportError:
            prefetch = types.ModuleType("comfy.model_prefetch")
            monkeypatch.setitem(sys.modules, "comfy.model_prefetch", prefetch)
    monkeypatch.setattr(prefetch, "pause_malloc_graph", recording.pause, raising=False)
    unet, _ = load_unet(WAN, "default", HALF)
    state = DisTorchState.of(unet.model)
    with recording:
        mm.load_models_gpu([unet])
    assert state.streamer.is_open and state.streamer._slots
    assert recording.recorded == [], "slots or staging buffers were allocated inside the compiler's recording"


def test_pinning_honours_core_flags_and_budget(monkeypatch):
    may_pin, pinned_budget = memory_policy.may_pin, memory_policy.pinned_budget
    if not hasattr(mm, "MAX_PINNED_MEMORY"):  # 0.3.64 pins nothing itself: the plan's budget is the only limit
        budget, pinned_by_core = pinned_budget(64 << 30)
        assert may_pin(1 << 30) and budget > 0 and pinned_by_core == 0
        return
    asked = []
    monkeypatch.setattr(mm, "ensure_pin_registerable", lambda size, *a, **k: asked.append(size), raising=False)
    monkeypatch.setattr(mm, "MAX_PINNED_MEMORY", 8 << 30)
    monkeypatch.setattr(mm, "TOTAL_PINNED_MEMORY", 6 << 30)
    assert may_pin(1 << 30) and asked == [1 << 30]
    assert not may_pin(3 << 30), "beyond what core's pinned budget has left"
    assert pinned_budget(64 << 30) == (8 << 30, 6 << 30), "the shared cap, and core's part of it"
    monkeypatch.setattr(mm, "MAX_PINNED_MEMORY", -1)  # --disable-pinned-memory, or a GPU core does not pin on
    assert not may_pin(1) and pinned_budget(64 << 30)[0] == 0
    monkeypatch.setattr(mm, "MAX_PINNED_MEMORY", 8 << 30)
    monkeypatch.setattr(mm.args, "disable_pinned_memory", True, raising=False)
    assert not may_pin(1) and pinned_budget(64 << 30) == (0, 0)


def test_vram_headroom_is_left_free_by_the_plan(monkeypatch):
    total = 16 << 30
    monkeypatch.setattr(mm, "get_total_memory", lambda dev=None, torch_total_too=False: total)
    settings = DisTorchSettings("cuda:0", 4.0, "cpu")
    without = loader_inventory(settings).get("cuda:0").free
    monkeypatch.setattr(mm.args, "vram_headroom", 2.0, raising=False)
    assert without == total - int(mm.minimum_inference_memory())
    assert loader_inventory(settings).get("cuda:0").free == without - (2 << 30)


@pytest.mark.parametrize("kind", ["unet", "clip", "vae"])
def test_every_patcher_carries_a_factory_that_rebuilds_it_with_its_plan(kind, file_reads):
    if kind == "unet":
        patcher = load_unet(WAN, "default", HALF)[0]
    elif kind == "clip":
        patcher = load_clip(["random_clip_l.safetensors"], "stable_diffusion", HALF)[0].patcher
    else:
        patcher = load_vae("tiny_taesd.safetensors", DisTorchSettings("cpu", 0.001, "cpu"))[0].patcher
    factory, args = patcher.cached_patcher_init
    rebuilt = factory(*args, disable_dynamic=True)
    assert isinstance(rebuilt, DisTorchModelPatcher) and rebuilt.model is not patcher.model
    before, after = (DisTorchState.of(p.model) for p in (patcher, rebuilt))
    assert after.plan == before.plan and after.plan.streamed
    assert rebuilt.cached_patcher_init == patcher.cached_patcher_init


def test_a_clip_factory_keeps_the_model_options_it_was_loaded_with():
    """Extra core model options given to load_clip (a dtype here; the text-encoder tests' small configs) are
    part of its `cached_patcher_init`, so a rebuilt CLIP is the same model."""
    patcher = load_clip(["random_clip_l.safetensors"], "stable_diffusion", HALF,
                        model_options={"dtype": torch.bfloat16})[0].patcher
    factory, args = patcher.cached_patcher_init
    rebuilt = factory(*args, disable_dynamic=True)
    dtypes = {p.dtype for p in rebuilt.model.parameters() if p.is_floating_point()}
    assert torch.bfloat16 in {p.dtype for p in patcher.model.parameters()} and torch.bfloat16 in dtypes


@pytest.mark.skipif(not hasattr(comfy.model_patcher.ModelPatcher, "deepclone_multigpu"),
                    reason="this ComfyUI has no multi-GPU deep clone")
def test_core_multigpu_deep_clone_rebuilds_a_distorch_model():
    unet, _ = load_unet(WAN, "default", HALF)
    unet.add_patches({"diffusion_model.head.head.weight": (torch.zeros(64, 128) + 0.01,)}, 1.0)
    expected = loaded_wan_forward(unet)
    clone = unet.deepclone_multigpu(new_load_device=torch.device("cpu"))
    assert isinstance(clone, DisTorchModelPatcher) and clone.model is not unet.model
    assert DisTorchState.of(clone.model).plan == DisTorchState.of(unet.model).plan
    assert torch.equal(loaded_wan_forward(clone), expected), "the LoRA-style patch must carry over to the rebuilt model"


def test_load_plans_for_the_device_core_loads_to(monkeypatch):
    seen = []
    real = distorch_patcher._planned_for
    monkeypatch.setattr(distorch_patcher, "_planned_for", lambda model, state, device: seen.append(device) or
                        real(model, state, device))
    unet, _ = load_unet(WAN, "default", HALF)
    unet.load_device = torch.device("cpu", 1)
    mm.load_models_gpu([unet])
    assert seen == [torch.device("cpu", 1)]


def test_a_plan_follows_the_patcher_to_another_compute_device(monkeypatch):
    monkeypatch.setattr(mm, "get_total_memory", lambda dev=None, torch_total_too=False: 16 << 30)
    unet, _ = load_unet(WAN, "default", HALF)
    state = DisTorchState.of(unet.model)
    moved = distorch_patcher._planned_for(unet.model, state, torch.device("cuda", 1))
    assert moved.plan.compute_device == "cuda:1" and DisTorchState.of(unet.model) is moved
    assert distorch_patcher._planned_for(unet.model, moved, torch.device("cuda", 1)) is moved
    staged, _ = load_unet(WAN, "default", HALF)
    loaded_wan_forward(staged)
    with pytest.raises(RuntimeError, match="cannot move to cuda:1 while staged"):
        distorch_patcher._planned_for(staged.model, DisTorchState.of(staged.model), torch.device("cuda", 1))


@pytest.mark.skipif("return_weight" not in inspect.signature(comfy.model_patcher.ModelPatcher.patch_weight_to_device)
                    .parameters, reason="this ComfyUI has no return_weight (checkpoint saving reads weights so)")
def test_patched_weights_can_be_read_back_as_checkpoint_saving_does():
    unet, _ = load_unet(WAN, "default", HALF)
    key = "diffusion_model.head.head.weight"
    diff = torch.full((64, 128), 0.01)
    unet.add_patches({key: (diff,)}, 1.0)
    original = comfy.utils.get_attr(unet.model, key).detach().clone()
    patched = unet.patch_weight_to_device(key, device_to=torch.device("cpu"), return_weight=True)
    torch.testing.assert_close(patched, original + diff)
    assert torch.equal(comfy.utils.get_attr(unet.model, key), original), "reading back must not patch the model"
