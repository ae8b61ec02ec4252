"""Test-only ComfyUI nodes for the integration tests (loaded into a throwaway custom_nodes folder)."""

import ctypes
import gc
import os
import sys

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


class DisTorchTestSaveImageTensor:
    """Saves an IMAGE tensor as safetensors in the output folder, so tests compare exact pixels
    (SaveImage's PNGs also embed the prompt, which differs between the compared workflows)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "filename": ("STRING", {"default": "image"})}}

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def save(self, images, filename):
        _save({"images": images.contiguous()}, filename)
        return {}


class DisTorchTestSaveConditioning:
    """Saves a CONDITIONING's context (and pooled output) as safetensors in the output folder."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("CONDITIONING",), "filename": ("STRING", {"default": "cond"})}}

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def save(self, conditioning, filename):
        context, extra = conditioning[0]
        tensors = {"context": context.contiguous()}
        if extra.get("pooled_output") is not None:
            tensors["pooled_output"] = extra["pooled_output"].contiguous()
        _save(tensors, filename)
        return {}


class DisTorchTestProcessRSS:
    """Reports the server's resident memory (bytes) once `samples` exist, after a full garbage collection and
    glibc's malloc_trim, so freed memory is not counted. Runs every time (never cached)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",)}}

    RETURN_TYPES = ()
    FUNCTION = "measure"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    @classmethod
    def IS_CHANGED(cls, samples):
        return float("nan")

    def measure(self, samples):
        import psutil

        gc.collect()
        if sys.platform.startswith("linux"):
            ctypes.CDLL(None).malloc_trim(0)
        return {"ui": {"rss": [psutil.Process().memory_info().rss]}}


def _save(tensors: dict, filename: str) -> None:
    import folder_paths
    from safetensors.torch import save_file

    directory = folder_paths.get_output_directory()
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, f"{filename}.safetensors"))


NODE_CLASS_MAPPINGS = {"DisTorchTestZeroConditioning": DisTorchTestZeroConditioning,
                       "DisTorchTestSaveImageTensor": DisTorchTestSaveImageTensor,
                       "DisTorchTestSaveConditioning": DisTorchTestSaveConditioning,
                       "DisTorchTestProcessRSS": DisTorchTestProcessRSS}
