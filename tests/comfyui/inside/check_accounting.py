"""Core is told true sizes for a DisTorch model (#8 part 4): its memory request for a streamed model is the
resident weights plus the slots (plus core's own activation estimate), so a text encoder beside it stays
loaded across queue runs. Sizes are counted here independently of the pack, the way core's load counts
them: weights of the layers outside the streamed blocks."""

import comfy.model_management as mm
import comfy.sd
import folder_paths
import pytest
import torch
from conftest import FAKE_GPU
from distorch_pack.nodes.loading import load_unet
from distorch_pack.nodes.settings import DisTorchSettings
from distorch_pack.nodes.state import DisTorchState

WAN = "tiny_wan21.safetensors"
ACTIVATIONS = 3 * 1024**2  # what a sampler would pass as memory_required (core's activation estimate)


def resident_bytes(patcher) -> int:
    """Weights of the leaf layers outside the streamed blocks: what core's load puts on the compute device."""
    state = DisTorchState.of(patcher.model)
    total = 0
    for name, module in patcher.model.named_modules():
        own = list(module.parameters(recurse=False))
        if own and not any(True for _ in module.children()) and not state.is_streamed(name):
            total += sum(p.numel() * p.element_size() for p in own)
    return total


def streamed_unet(virtual_vram_gb: float):
    patcher, _ = load_unet(WAN, "default", DisTorchSettings("cpu", virtual_vram_gb, "cpu"))
    patcher.load_device = FAKE_GPU  # core manages it as a GPU model; its tensors stay in RAM
    state = DisTorchState.of(patcher.model)
    assert len(state.plan.streamed) >= 3 and state.slot_bytes < state.plan.streamed_bytes
    return patcher, state


def requests_to_free(monkeypatch) -> list[float]:
    """The memory_required of every free_memory call core makes for FAKE_GPU."""
    calls = []
    real = mm.free_memory

    def spy(memory_required, device, *args, **kwargs):
        if device == FAKE_GPU:
            calls.append(memory_required)
        return real(memory_required, device, *args, **kwargs)

    monkeypatch.setattr(mm, "free_memory", spy)
    return calls


def expected_request(weights: int) -> float:
    extra = max(mm.minimum_inference_memory(), ACTIVATIONS + mm.extra_reserved_memory())
    return weights * 1.1 + extra


def test_core_asks_for_resident_weights_plus_slots(fake_gpu, monkeypatch):
    patcher, state = streamed_unet(1.0)
    fake_gpu.total = 64 * 1024**3
    requests = requests_to_free(monkeypatch)
    resident = resident_bytes(patcher)
    assert patcher.model_size() == resident + state.slot_bytes
    mm.load_models_gpu([patcher], memory_required=ACTIVATIONS, minimum_memory_required=ACTIVATIONS)
    assert patcher.loaded_size() == resident + state.slot_bytes and state.streamer.is_open
    mm.load_models_gpu([patcher], memory_required=ACTIVATIONS, minimum_memory_required=ACTIVATIONS)
    assert requests[:2] == [pytest.approx(expected_request(resident + state.slot_bytes)),
                            pytest.approx(expected_request(0))], "first load: resident + slots; loaded: nothing more"


def test_text_encoder_stays_loaded_across_queue_runs(fake_gpu):
    """The miniature of a 14 GB-streamed UNet and a text encoder on a 16 GB card: the card holds the encoder,
    the UNet's resident layers and slots and core's reserve, with less room to spare than the streamed bytes."""
    unet, state = streamed_unet(1.0)
    clip = comfy.sd.load_clip(ckpt_paths=[folder_paths.get_full_path("text_encoders", "random_clip_l.safetensors")],
                              model_options={"load_device": FAKE_GPU, "offload_device": torch.device("cpu"),
                                             "initial_device": torch.device("cpu")})
    encoder = clip.patcher
    spare = state.plan.streamed_bytes // 4
    fake_gpu.total = int(encoder.model_size() + expected_request(resident_bytes(unet) + state.slot_bytes) + spare)
    for queue_run in range(3):
        mm.load_models_gpu([encoder], force_full_load=True)  # CLIPTextEncode
        mm.load_models_gpu([unet], memory_required=ACTIVATIONS, minimum_memory_required=ACTIVATIONS)  # KSampler
        loaded = {id(m.model): m.model_loaded_memory() for m in mm.current_loaded_models}
        assert loaded.get(id(encoder)) == encoder.model_size(), f"queue run {queue_run}: the text encoder was evicted"
        assert loaded.get(id(unet)) == resident_bytes(unet) + state.slot_bytes and state.streamer.is_open
