"""Test-only ComfyUI nodes for the integration tests (loaded into a throwaway custom_nodes folder)."""

import torch


class DisTorchTestZeroConditioning:
    """All-zero conditioning, so diffusion models can be sampled without a text encoder.

    Wan needs a 4096-wide context; SD3 also needs a 2048-wide pooled output.
    """

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "tokens": ("INT", {"default": 8, "min": 1, "max": 512}),
            "context_dim": ("INT", {"default": 4096, "min": 1, "max": 16384}),
            "pooled_dim": ("INT", {"default": 0, "min": 0, "max": 16384}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, tokens, context_dim, pooled_dim):
        extra = {"pooled_output": torch.zeros(1, pooled_dim)} if pooled_dim else {}
        return ([[torch.zeros(1, tokens, context_dim), extra]],)


NODE_CLASS_MAPPINGS = {"DisTorchTestZeroConditioning": DisTorchTestZeroConditioning}
