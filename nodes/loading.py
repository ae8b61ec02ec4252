"""Loads diffusion models, text encoders and VAEs through ComfyUI's own loaders, then hands them to DisTorch.

The files are read by `comfy.sd` (safetensors) or by the pack's GGUF engine (.gguf, with GGUF
operations passed as `custom_operations`); the resulting patcher is adopted as a
`DisTorchModelPatcher` and the model is planned once, here, so every queue run reuses the placement.
Each patcher carries a `cached_patcher_init` factory (these loaders again, with the same settings),
the way ComfyUI 2026 rebuilds a model for its multi-GPU work split or a device change.
"""

import inspect

import comfy.model_management as mm
import comfy.sd
import comfy.utils
import folder_paths
import torch

from ..distorch.report import plan_to_dict
from .folders import full_path
from .memory_policy import loader_inventory
from .patcher import DisTorchModelPatcher
from .settings import DisTorchSettings
from .state import DisTorchState

UNET_WEIGHT_DTYPES = {
    "default": {},
    "fp8_e4m3fn": {"dtype": torch.float8_e4m3fn},
    "fp8_e4m3fn_fast": {"dtype": torch.float8_e4m3fn, "fp8_optimizations": True},
    "fp8_e5m2": {"dtype": torch.float8_e5m2},
}


def load_unet(unet_name: str, weight_dtype: str, settings: DisTorchSettings,
              node_id: str | None = None) -> tuple[DisTorchModelPatcher, dict]:
    if weight_dtype not in UNET_WEIGHT_DTYPES:
        raise ValueError(f"DisTorch: weight_dtype {weight_dtype!r} is not one of {', '.join(UNET_WEIGHT_DTYPES)}")
    path = full_path("diffusion_models", unet_name)
    model_options = dict(UNET_WEIGHT_DTYPES[weight_dtype])
    if path.lower().endswith(".gguf"):
        from .gguf_support import load_gguf_unet_state_dict

        state_dict, model_options["custom_operations"] = load_gguf_unet_state_dict(path, model_options)
        loader = comfy.sd.load_diffusion_model_state_dict
        patcher = loader(state_dict, model_options=model_options, **_not_dynamic(loader))
    else:
        loader = comfy.sd.load_diffusion_model
        patcher = loader(path, model_options=model_options, **_not_dynamic(loader))
    if patcher is None:
        raise ValueError(f"DisTorch: could not detect the model type of {unet_name!r}; is it a diffusion model?")
    adopted = DisTorchModelPatcher.adopt(patcher, torch.device(settings.compute_device),
                                         factory=(reload_unet, (unet_name, weight_dtype, settings)))
    return adopted, plan_model(adopted.model, settings, unet_name, node_id)


def load_clip(clip_names: list[str], clip_type: str, settings: DisTorchSettings,
              node_id: str | None = None, model_options: dict | None = None) -> tuple[comfy.sd.CLIP, dict]:
    """Text encoders from `clip_names` (a Qwen2.5-VL mmproj .gguf joins the text encoder beside it) as one CLIP.

    `model_options` are extra core model options (e.g. `<encoder>_model_config` overrides) under DisTorch's own.
    """
    paths = [full_path("text_encoders", name) for name in clip_names]
    options = {
        **(model_options or {}),
        "load_device": torch.device(settings.compute_device),
        "offload_device": mm.text_encoder_offload_device(),
        # Build on the offload device: a text encoder larger than the GPU must never be loaded whole.
        "initial_device": mm.text_encoder_offload_device(),
    }
    enum_type = getattr(comfy.sd.CLIPType, clip_type.upper(), comfy.sd.CLIPType.STABLE_DIFFUSION)
    embeddings = folder_paths.get_folder_paths("embeddings")
    if any(p.lower().endswith(".gguf") for p in paths):
        from .gguf_support import load_text_encoder_state_dicts

        state_dicts, options["custom_operations"] = load_text_encoder_state_dicts(paths)
        loader = comfy.sd.load_text_encoder_state_dicts
        clip = loader(state_dicts, embedding_directory=embeddings, clip_type=enum_type, model_options=options,
                      **_not_dynamic(loader))
    else:
        loader = comfy.sd.load_clip
        clip = loader(ckpt_paths=paths, embedding_directory=embeddings, clip_type=enum_type,
                      model_options=options, **_not_dynamic(loader))
    clip.patcher = DisTorchModelPatcher.adopt(clip.patcher, torch.device(settings.compute_device),
                                              factory=(reload_clip, (tuple(clip_names), clip_type, settings,
                                                                     model_options)))
    return clip, plan_model(clip.patcher.model, settings, " + ".join(clip_names), node_id)


def load_vae(vae_name: str, settings: DisTorchSettings, node_id: str | None = None) -> tuple[comfy.sd.VAE, dict]:
    path = full_path("vae", vae_name)
    device = torch.device(settings.compute_device)
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(path), device=device, **_not_dynamic(comfy.sd.VAE))
    vae.throw_exception_if_invalid()
    vae.patcher = DisTorchModelPatcher.adopt(vae.patcher, device, factory=(reload_vae, (vae_name, settings)))
    return vae, plan_model(vae.patcher.model, settings, vae_name, node_id)


# `cached_patcher_init` factories: core calls them with the stored arguments (plus `disable_dynamic=True` when
# it wants a non-dynamic model, which a DisTorch model always is) and takes the patcher they return.

def reload_unet(unet_name: str, weight_dtype: str, settings: DisTorchSettings,
                disable_dynamic: bool = True) -> DisTorchModelPatcher:
    return load_unet(unet_name, weight_dtype, settings)[0]


def reload_clip(clip_names: tuple[str, ...], clip_type: str, settings: DisTorchSettings,
                model_options: dict | None = None, disable_dynamic: bool = True) -> DisTorchModelPatcher:
    return load_clip(list(clip_names), clip_type, settings, model_options=model_options)[0].patcher


def reload_vae(vae_name: str, settings: DisTorchSettings, disable_dynamic: bool = True) -> DisTorchModelPatcher:
    return load_vae(vae_name, settings)[0].patcher


def _not_dynamic(loader) -> dict:
    """`disable_dynamic=True` where core's loader takes it (ComfyUI 2026: the loader then builds a classic
    patcher and copies the weights once); older cores have no Dynamic VRAM and no such argument."""
    return {"disable_dynamic": True} if "disable_dynamic" in inspect.signature(loader).parameters else {}


def plan_model(model: torch.nn.Module, settings: DisTorchSettings, label: str, node_id: str | None = None,
               widget_prefix: str = "") -> dict:
    """Plans `model` once and stores the plan on it; returns the node's UI output.

    `text` is the plan table; `distorch_plan` the same plan as data (distorch.report.plan_to_dict) for the
    block map nodes/web/js/distorch.js draws. `node_id` is the loader node: staging reports to its bar.
    `widget_prefix` names the part of a node that loads several ("unet_", "clip_"): its amount widget.
    """
    state = DisTorchState.attach(model, settings, loader_inventory(settings))
    state.ui_node = node_id
    state.label = label
    state.amount_widget = f"{widget_prefix}virtual_vram_gb"
    # The log gets the table when the model is loaded (patcher.py); the node shows it now.
    text = state.plan.report().replace(f"DisTorch plan for {state.plan.model_name}",
                                       f"DisTorch plan for {label} ({state.plan.model_name})", 1)
    return {"text": [text], "distorch_plan": [plan_to_dict(state.plan, label)]}


def combined_ui(parts: list[dict], note: str = "") -> dict:
    """One node's UI output for several planned models (a checkpoint's diffusion model and text encoders):
    the tables one after the other, the plans in the same order (the node's view draws the first)."""
    text = "\n\n".join(part["text"][0] for part in parts) + (f"\n\n{note}" if note else "")
    return {"text": [text], "distorch_plan": [plan for part in parts for plan in part["distorch_plan"]]}
