"""The DisTorch nodes' ids, titles and widget inputs in order: one table the nodes, the example
workflows and their tests share (no ComfyUI import)."""

DISTORCH_INPUTS = ("compute_device", "virtual_vram_gb", "donor_device", "expert_mode_allocations")

NODE_TITLES = {
    "DisTorchUNetLoader": "Load Diffusion Model (DisTorch)",
    "DisTorchCLIPLoader": "Load CLIP (DisTorch)",
    "DisTorchDualCLIPLoader": "DualCLIPLoader (DisTorch)",
    "DisTorchTripleCLIPLoader": "TripleCLIPLoader (DisTorch)",
    "DisTorchQuadrupleCLIPLoader": "QuadrupleCLIPLoader (DisTorch)",
    "DisTorchVAELoader": "Load VAE (DisTorch)",
}

# Widgets before the four DisTorch inputs, in order.
FILE_INPUTS = {
    "DisTorchUNetLoader": ("unet_name", "weight_dtype"),
    "DisTorchCLIPLoader": ("clip_name", "type"),
    "DisTorchDualCLIPLoader": ("clip_name1", "clip_name2", "type"),
    "DisTorchTripleCLIPLoader": ("clip_name1", "clip_name2", "clip_name3"),
    "DisTorchQuadrupleCLIPLoader": ("clip_name1", "clip_name2", "clip_name3", "clip_name4"),
    "DisTorchVAELoader": ("vae_name",),
}

OUTPUT_TYPES = {
    "DisTorchUNetLoader": "MODEL",
    "DisTorchVAELoader": "VAE",
}


def widget_inputs(node_id: str) -> tuple[str, ...]:
    """All widget inputs of a DisTorch node in the order ComfyUI lists them."""
    return FILE_INPUTS[node_id] + DISTORCH_INPUTS


def output_type(node_id: str) -> str:
    return OUTPUT_TYPES.get(node_id, "CLIP")
