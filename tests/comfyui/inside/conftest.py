"""Boots ComfyUI's modules headless (as `--cpu`) inside its own interpreter and imports the pack as ComfyUI does.

Environment (set by tests/test_comfyui_core.py): COMFYUI_PATH (the ComfyUI tree), DISTORCH_TEST_MODELS (the
tiny models tests/comfyui/make_models.py built for the running server). The checks drive core's own entry
points (load_models_gpu, free_memory, the loaders, clone, deepclone_multigpu) with test doubles only where a
CPU cannot play the part: a fake GPU's free-memory numbers, comfy-aimdo's CUDA-only host buffers, the reroute
of CPU devices away from Dynamic VRAM, and a memory compiler's recording scope.
"""

import os
import sys
import weakref
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[3]
MODELS = Path(os.environ["DISTORCH_TEST_MODELS"])
sys.path.insert(0, os.environ["COMFYUI_PATH"])
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/comfyui: pack_in_comfyui
sys.path.append(str(Path(__file__).resolve().parents[2]))  # tests: ggml_samples (last: it shadows nothing)

import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True  # what `--cpu` sets, before model_management reads it at import
import comfy.lora  # noqa: E402
import comfy.model_management as mm  # noqa: E402
import comfy.model_patcher  # noqa: E402
import folder_paths  # noqa: E402
from pack_in_comfyui import import_pack  # noqa: E402

for folder in ("diffusion_models", "text_encoders", "vae", "loras"):
    folder_paths.add_model_folder_path(folder, str(MODELS / folder), is_default=True)


import_pack()

HAS_DYNAMIC = hasattr(comfy.model_patcher, "ModelPatcherDynamic")
FAKE_GPU = torch.device("cpu", 1)  # a device core treats as a GPU (not torch.device("cpu")) whose tensors stay in RAM


@pytest.fixture(autouse=True)
def no_models_left_loaded():
    yield
    for loaded in list(mm.current_loaded_models):
        if loaded.model is not None and loaded.model_finalizer is not None:
            loaded.model_unload()
    mm.current_loaded_models.clear()


class FakeGpuMemory:
    """Free memory of FAKE_GPU as core's get_free_memory reports it: its size minus what is loaded there.

    Loaded means the models core tracks on FAKE_GPU plus the patchers a test `track`s: core takes a model it is
    about to load again out of its list first (it is its own clone), while its weights stay on the device.
    """

    def __init__(self, total: int, real):
        self.total = total
        self._real = real
        self._tracked = weakref.WeakSet()

    def track(self, patcher):
        self._tracked.add(patcher)
        return patcher

    def used(self) -> int:
        patchers = [m.model for m in mm.current_loaded_models if m.device == FAKE_GPU and m.model is not None]
        patchers += [p for p in self._tracked if p.load_device == FAKE_GPU]
        return sum({id(p.model): p.loaded_size() for p in patchers}.values())

    def __call__(self, dev=None, torch_free_too=False):
        if dev != FAKE_GPU:
            return self._real(dev, torch_free_too)
        free = self.total - self.used()
        return (free, 0) if torch_free_too else free


@pytest.fixture
def fake_gpu(monkeypatch):
    """Installs a FakeGpuMemory (its `total` is set by the test) as core's get_free_memory."""
    memory = FakeGpuMemory(0, mm.get_free_memory)
    monkeypatch.setattr(mm, "get_free_memory", memory)
    return memory


@pytest.fixture
def fake_cuda(fake_gpu, monkeypatch):
    """Core treats FAKE_GPU as an NVIDIA GPU of `fake_gpu.total` bytes and computes a weight budget for models on it
    (`lowvram_model_memory`), which it does for no CPU device under `--cpu`."""
    real = mm.is_device_cpu
    monkeypatch.setattr(mm, "is_device_cpu", lambda device: False if device == FAKE_GPU else real(device))
    monkeypatch.setattr(mm, "vram_state", mm.VRAMState.NORMAL_VRAM)
    monkeypatch.setattr(mm, "MIN_WEIGHT_MEMORY_RATIO", 0.0)  # NVIDIA's: the budget is free memory minus the reserve
    return fake_gpu


if HAS_DYNAMIC:
    class FakeDynamicPatcher(comfy.model_patcher.ModelPatcherDynamic):
        """Core's ModelPatcherDynamic without its reroute of CPU load devices to the classic patcher, so the
        Dynamic VRAM branches run on a CPU. Constructed where ComfyUI's main.py would install the real class
        as `CoreModelPatcher` (Dynamic VRAM on NVIDIA)."""

        instances = 0

        def __new__(cls, *args, **kwargs):
            FakeDynamicPatcher.instances += 1
            return comfy.model_patcher.ModelPatcher.__new__(cls)


class EmptyHostBuffer:
    """Stand-in for comfy-aimdo's pinned HostBuffer (its library needs CUDA): an empty buffer."""

    size = 0

    def __init__(self, *args, **kwargs):
        pass


@pytest.fixture
def dynamic_core(monkeypatch):
    """Core as ComfyUI 2026's main.py sets it up on NVIDIA: every loader builds Dynamic VRAM patchers."""
    import comfy_aimdo.host_buffer

    FakeDynamicPatcher.instances = 0
    monkeypatch.setattr(comfy_aimdo.host_buffer, "HostBuffer", EmptyHostBuffer)
    monkeypatch.setattr(comfy.model_patcher, "CoreModelPatcher", FakeDynamicPatcher)
    return FakeDynamicPatcher


@pytest.fixture
def merge_calls(monkeypatch):
    """Keys core's calculate_weight merges (LowVramPatch and patch_weight_to_device both call it)."""
    calls = []
    real = comfy.lora.calculate_weight

    def counting(patches, weight, key, *args, **kwargs):
        calls.append(key)
        return real(patches, weight, key, *args, **kwargs)

    monkeypatch.setattr(comfy.lora, "calculate_weight", counting)
    return calls


@pytest.fixture
def file_reads(monkeypatch):
    """Counts core's reads of model files (comfy.utils.load_torch_file), by file name."""
    import comfy.utils

    reads = {}
    real = comfy.utils.load_torch_file

    def counting(ckpt, *args, **kwargs):
        reads[Path(ckpt).name] = reads.get(Path(ckpt).name, 0) + 1
        return real(ckpt, *args, **kwargs)

    monkeypatch.setattr(comfy.utils, "load_torch_file", counting)
    return reads
