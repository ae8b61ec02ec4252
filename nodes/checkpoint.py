"""Loads an all-in-one checkpoint through core's own checkpoint code, each part placed on its own terms.

The diffusion model and the text encoders each get their own DisTorch settings (virtual VRAM, donor,
expert string) and are planned like the single-model loaders; the VAE is built on its chosen device.
Core reads the file once: `load_state_dict_guess_config` builds the model and the CLIP, and the VAE is
built here from the same state dict with core's key prefix, so the weights are those CheckpointLoaderSimple
would load.
"""

import comfy.model_management as mm
import comfy.sd
import comfy.utils
import folder_paths
import torch

from .loading import combined_ui, plan_model
from .patcher import DisTorchModelPatcher
from .settings import CheckpointSettings


def load_checkpoint(ckpt_name: str, settings: CheckpointSettings, node_id: str | None = None) -> tuple[tuple, dict]:
    """Returns (MODEL, CLIP, VAE) as CheckpointLoaderSimple does, and the node's UI output (both plans)."""
    path = folder_paths.get_full_path_or_raise("checkpoints", ckpt_name)
    state_dict, metadata = comfy.utils.load_torch_file(path, return_metadata=True)
    text_encoder_options = {
        "load_device": torch.device(settings.clip.compute_device),
        "offload_device": mm.text_encoder_offload_device(),
        # Build on the offload device: text encoders larger than the GPU must never be loaded whole.
        "initial_device": mm.text_encoder_offload_device(),
    }
    loaded = comfy.sd.load_state_dict_guess_config(
        state_dict, output_vae=False, output_clip=True, embedding_directory=folder_paths.get_folder_paths("embeddings"),
        te_model_options=text_encoder_options, metadata=metadata)
    if loaded is None or loaded[0] is None:
        raise ValueError(f"DisTorch: could not detect the model type of checkpoint {ckpt_name!r}")
    patcher, clip = loaded[0], loaded[1]
    vae = _vae(state_dict, patcher.model.model_config, settings.vae_device, metadata)
    model = DisTorchModelPatcher.adopt(patcher, torch.device(settings.unet.compute_device))
    parts = [plan_model(model.model, settings.unet, f"{ckpt_name} diffusion model", node_id, "unet_")]
    if clip is not None:
        clip.patcher = DisTorchModelPatcher.adopt(clip.patcher, torch.device(settings.clip.compute_device))
        parts.append(plan_model(clip.patcher.model, settings.clip, f"{ckpt_name} text encoders", node_id, "clip_"))
    return (model, clip, vae), combined_ui(parts, f"VAE on {settings.vae_device}")


def _vae(state_dict: dict, model_config, device: str, metadata) -> comfy.sd.VAE:
    # The keys core's checkpoint loader gives its VAE (the model's key prefix, the model's own key fix-ups).
    vae_sd = comfy.utils.state_dict_prefix_replace(state_dict, {k: "" for k in model_config.vae_key_prefix},
                                                   filter_keys=True)
    vae_sd = model_config.process_vae_state_dict(vae_sd)
    return comfy.sd.VAE(sd=vae_sd, device=torch.device(device), metadata=metadata)
