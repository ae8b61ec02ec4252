"""Runs inside ComfyUI (CPU): checks that ComfyUI's memory bookkeeping stays true for a DisTorch model.

Usage: python accounting_probe.py --comfyui PATH --models MODELS_DIR --virtual-vram-gb G   (prints JSON)

Loads the tiny Wan model with the DisTorch loader code and with core's loader, then drives
ComfyUI's own entry points (load_models_gpu, free_memory, partially_unload) and reports
loaded_size(), the streamer state and whether the forward still matches the core model.
"""

import json
from pathlib import Path

import torch
from pack_in_comfyui import patcher_forward, start_probe


def leaf_weight_bytes(model, state) -> int:
    """Bytes of the layers core loads, counted here independently: leaf modules with weights outside the
    streamed blocks."""
    total = 0
    for name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if own and not any(True for _ in module.children()) and not state.is_streamed(name):
            total += sum(p.numel() * p.element_size() for _, p in own)
    return total


def main() -> None:
    args = start_probe()
    import comfy.model_management as mm
    import comfy.sd
    from distorch_pack.nodes.loading import load_unet
    from distorch_pack.nodes.settings import DisTorchSettings
    from distorch_pack.nodes.state import DisTorchState

    reference = comfy.sd.load_diffusion_model(str(Path(args.models) / "diffusion_models" / "tiny_wan21.safetensors"))
    expected = patcher_forward(reference)
    patcher, _ = load_unet("tiny_wan21.safetensors", "default", DisTorchSettings("cpu", args.virtual_vram_gb, "cpu"))
    state = DisTorchState.of(patcher.model)
    report = {"streamed_blocks": len(state.plan.streamed), "slot_bytes": state.slot_bytes}

    mm.load_models_gpu([patcher])
    report["loaded"] = patcher.loaded_size()
    report["expected_loaded"] = leaf_weight_bytes(patcher.model, state) + state.slot_bytes
    report["state_resident_layers"] = state.resident_layer_bytes(patcher.model) + state.slot_bytes
    report["open_after_load"] = state.streamer.is_open
    report["equal_after_load"] = torch.equal(patcher_forward(patcher), expected)

    mm.load_models_gpu([patcher])  # a second queue run: nothing may be re-placed
    report["same_streamer_after_second_load"] = state.streamer.is_open and report["loaded"] == patcher.loaded_size()

    freed = patcher.partially_unload(patcher.offload_device, memory_to_free=1)
    report["partially_unloaded"] = freed
    report["streamed_after_partial_unload"] = len(state.plan.streamed)
    report["loaded_after_partial_unload"] = patcher.loaded_size()
    report["equal_after_partial_unload"] = torch.equal(patcher_forward(patcher), expected)

    mm.free_memory(1e30, torch.device("cpu"))
    mm.unload_all_models()
    report["loaded_after_unload"] = patcher.loaded_size()
    report["open_after_unload"] = state.streamer.is_open
    report["staged_after_unload"] = all(b.is_staged for b in state.streamer._blocks)

    mm.load_models_gpu([patcher])
    report["loaded_after_reload"] = patcher.loaded_size()
    report["expected_after_reload"] = leaf_weight_bytes(patcher.model, state) + state.slot_bytes
    report["streamed_after_reload"] = len(state.plan.streamed)
    report["open_after_reload"] = state.streamer.is_open
    report["equal_after_reload"] = torch.equal(patcher_forward(patcher), expected)
    print("RESULT " + json.dumps(report))


if __name__ == "__main__":
    main()
