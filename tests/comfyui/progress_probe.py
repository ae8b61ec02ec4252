"""Runs inside ComfyUI (CPU): staging reports to the loader node's progress bar, and an interrupt stops it cleanly.

Usage: python progress_probe.py --comfyui PATH --models MODELS_DIR --virtual-vram-gb G   (prints RESULT <json>)

Installs a progress hook as ComfyUI's main.py does (it receives what `comfy.utils.ProgressBar` sends),
opens a progress registry for a prompt holding the loader node "7", loads the tiny Wan model with the
DisTorch loader code, and lets core load it (which stages the streamed blocks). Then the same with the
loader absent from the running prompt, and with the user's interrupt raised by the hook mid-staging.
"""

import json
from pathlib import Path

import torch
from pack_in_comfyui import patcher_forward, start_probe

WAN = "tiny_wan21.safetensors"


def main() -> None:
    args = start_probe()
    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils
    from comfy_execution.graph import DynamicPrompt
    from comfy_execution.progress import get_progress_state, reset_progress_state
    from distorch_pack.nodes.loading import load_unet
    from distorch_pack.nodes.settings import DisTorchSettings

    calls = []
    interrupt_at = {"call": None}

    def hook(value, total, preview, prompt_id=None, node_id=None):
        calls.append({"value": value, "total": total, "node": node_id})
        if interrupt_at["call"] == len(calls):
            mm.interrupt_current_processing(True)
        mm.throw_exception_if_processing_interrupted()  # as main.py's hook does
        get_progress_state().update_progress(node_id, value, total)

    comfy.utils.set_progress_bar_global_hook(hook)
    # Cores from 0.3.6x send only the first and last update of a fast bar; a tiny model stages in microseconds,
    # where a real one takes seconds per block. Unthrottled, every staged block reaches the hook as it would then.
    for name in ("PROGRESS_THROTTLE_MIN_INTERVAL", "PROGRESS_THROTTLE_MIN_PERCENT"):
        if hasattr(comfy.utils, name):
            setattr(comfy.utils, name, 0)
    settings = DisTorchSettings("cpu", args.virtual_vram_gb, "cpu")
    expected = patcher_forward(comfy.sd.load_diffusion_model(str(Path(args.models) / "diffusion_models" / WAN)))
    report = {}

    reset_progress_state("p1", DynamicPrompt({"7": {"class_type": "DisTorchUNetLoader", "inputs": {}},
                                              "9": {"class_type": "KSampler", "inputs": {}}}))
    patcher, plan_ui = load_unet(WAN, "default", settings, node_id="7")
    mm.load_models_gpu([patcher])
    report["in_prompt"] = {"calls": calls[:], "state": get_progress_state().nodes.get("7", {}).get("state"),
                           "streamed_blocks": len(plan_ui["distorch_plan"][0]["blocks"]),
                           "plan_keys": sorted(plan_ui)}
    report["in_prompt"]["state"] = getattr(report["in_prompt"]["state"], "value", None)
    mm.unload_all_models()
    mm.soft_empty_cache()

    calls.clear()
    reset_progress_state("p2", DynamicPrompt({"9": {"class_type": "KSampler", "inputs": {}}}))
    patcher, _ = load_unet(WAN, "default", settings, node_id="7")
    mm.load_models_gpu([patcher])
    report["not_in_prompt"] = {"nodes": sorted({str(c["node"]) for c in calls}), "calls": len(calls)}
    mm.unload_all_models()

    calls.clear()
    reset_progress_state("p3", DynamicPrompt({"7": {"class_type": "DisTorchUNetLoader", "inputs": {}}}))
    patcher, _ = load_unet(WAN, "default", settings, node_id="7")
    interrupt_at["call"] = 2  # the start, then the first staged block
    try:
        mm.load_models_gpu([patcher])
        report["interrupted"] = False
    except mm.InterruptProcessingException:
        report["interrupted"] = True
    mm.interrupt_current_processing(False)
    interrupt_at["call"] = None
    report["calls_before_interrupt"] = len(calls)
    calls.clear()
    mm.load_models_gpu([patcher])
    report["resumed_calls"] = calls[:]
    report["equal_after_resumed_staging"] = torch.equal(patcher_forward(patcher), expected)
    report["open_after_resume"] = patcher.model._distorch_state.streamer.is_open
    print("RESULT " + json.dumps(report))


if __name__ == "__main__":
    main()
