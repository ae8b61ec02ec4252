"""The DisTorch nodes' ids, titles and widget inputs in order: one table the ComfyUI nodes, the example
workflows, the workflow converter and their tests share (pure data, no ComfyUI import)."""

# `auto_placement` comes after the four MultiGPU inputs: UI workflows match widget values by position (a workflow
# saved before it existed lacks it).
DISTORCH_INPUTS = ("compute_device", "virtual_vram_gb", "donor_device", "expert_mode_allocations", "auto_placement")
# Inputs added after auto_placement, each appended as the last widget of every DisTorch loader (saved workflows keep
# their widget positions; a workflow without one loads with its default).
LATER_INPUTS = {"stream_format": "stored"}

NODE_TITLES = {
    "DisTorchUNetLoader": "Load Diffusion Model (DisTorch)",
    "DisTorchCLIPLoader": "Load CLIP (DisTorch)",
    "DisTorchDualCLIPLoader": "DualCLIPLoader (DisTorch)",
    "DisTorchTripleCLIPLoader": "TripleCLIPLoader (DisTorch)",
    "DisTorchQuadrupleCLIPLoader": "QuadrupleCLIPLoader (DisTorch)",
    "DisTorchVAELoader": "Load VAE (DisTorch)",
    "DisTorchCheckpointLoader": "Load Checkpoint (DisTorch)",
}

# Single-model loaders: their widgets before the DisTorch inputs, in order.
FILE_INPUTS = {
    "DisTorchUNetLoader": ("unet_name", "weight_dtype"),
    "DisTorchCLIPLoader": ("clip_name", "type"),
    "DisTorchDualCLIPLoader": ("clip_name1", "clip_name2", "type"),
    "DisTorchTripleCLIPLoader": ("clip_name1", "clip_name2", "clip_name3"),
    "DisTorchQuadrupleCLIPLoader": ("clip_name1", "clip_name2", "clip_name3", "clip_name4"),
    "DisTorchVAELoader": ("vae_name",),
}

# The checkpoint loader's widgets: the names and order of ComfyUI-MultiGPU's advanced checkpoint loader, so a
# diffusion model and its text encoders each get their own virtual VRAM; the two expert strings are optional, and the
# two auto_placement switches come after them (added later: position-matched UI workflows keep their values).
CHECKPOINT_INPUTS = ("ckpt_name", "unet_compute_device", "unet_virtual_vram_gb", "unet_donor_device",
                     "clip_compute_device", "clip_virtual_vram_gb", "clip_donor_device", "vae_device",
                     "unet_expert_mode_allocations", "clip_expert_mode_allocations", "unet_auto_placement",
                     "clip_auto_placement")

OUTPUT_TYPES = {
    "DisTorchUNetLoader": ("MODEL",),
    "DisTorchVAELoader": ("VAE",),
    "DisTorchCheckpointLoader": ("MODEL", "CLIP", "VAE"),
}


def widget_inputs(node_id: str) -> tuple[str, ...]:
    """All widget inputs of a DisTorch node in the order ComfyUI lists them."""
    if node_id == "DisTorchCheckpointLoader":
        return CHECKPOINT_INPUTS + tuple(LATER_INPUTS)
    return FILE_INPUTS[node_id] + DISTORCH_INPUTS + tuple(LATER_INPUTS)


def output_types(node_id: str) -> tuple[str, ...]:
    return OUTPUT_TYPES.get(node_id, ("CLIP",))


def output_type(node_id: str) -> str:
    """The output of a single-model loader."""
    return output_types(node_id)[0]
