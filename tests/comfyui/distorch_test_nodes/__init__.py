"""Test-only ComfyUI nodes for the integration tests (loaded into a throwaway custom_nodes folder)."""

import ctypes
import gc
import importlib
import json
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


class DisTorchTestDynamoGraphs:
    """Reports how many graphs torch.compile has captured in this server so far (Dynamo's `unique_graphs`), once
    `samples` exist: a compiled model that recompiles per step or per layer shows new graphs on a later run."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",)}}

    RETURN_TYPES = ()
    FUNCTION = "count"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    @classmethod
    def IS_CHANGED(cls, samples):
        return float("nan")

    def count(self, samples):
        from torch._dynamo.utils import counters

        return {"ui": {"graphs": [int(counters["stats"]["unique_graphs"])]}}


class DisTorchTestCLIPWithConfig:
    """Text encoders through core's loader or DisTorch's, with extra core model options: `<encoder>_model_config`
    (a core option) builds ComfyUI's real encoder classes at a few MB, keeping what model detection reads."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "loader": (["core", "distorch"],),
            "clip_names": ("STRING", {"default": ""}),  # comma-separated files in models/text_encoders
            "type": ("STRING", {"default": "stable_diffusion"}),
            "model_options": ("STRING", {"default": "{}"}),
            "virtual_vram_gb": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 128.0, "step": 0.0001}),
        }}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, loader, clip_names, type, model_options, virtual_vram_gb):
        import comfy.sd
        import folder_paths

        names = [name.strip() for name in clip_names.split(",") if name.strip()]
        options = json.loads(model_options)
        if loader == "core":
            paths = [folder_paths.get_full_path_or_raise("text_encoders", name) for name in names]
            embeddings = folder_paths.get_folder_paths("embeddings")
            clip = comfy.sd.load_clip(ckpt_paths=paths, embedding_directory=embeddings,
                                      clip_type=getattr(comfy.sd.CLIPType, type.upper()), model_options=options)
            return {"ui": {"text": ["core"]}, "result": (clip,)}
        settings = _pack_module("nodes.settings").DisTorchSettings("cpu", virtual_vram_gb, "cpu", "")
        clip, plan_ui = _pack_module("nodes.loading").load_clip(names, type, settings, model_options=options)
        return {"ui": plan_ui, "result": (clip,)}


class DisTorchTestEncodeWithImage:
    """A prompt encoded with one image, as TextEncodeQwenImageEdit does (clip.tokenize(prompt, images=...)), but
    with a small image instead of its megapixel resize, so the vision tower runs on a few patches."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip": ("CLIP",), "text": ("STRING", {"default": ""}),
                             "size": ("INT", {"default": 56, "min": 28, "max": 1024})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "testing"

    def encode(self, clip, text, size):
        ramp = torch.linspace(0, 1, size)
        image = torch.stack([ramp[None, :].expand(size, size), ramp[:, None].expand(size, size),
                             (ramp[None, :] * ramp[:, None])], dim=-1)[None]
        tokens = clip.tokenize(text, images=[image])
        return (clip.encode_from_tokens_scheduled(tokens),)


class DisTorchTestConsumeModel:
    """An output node that only needs a MODEL, so a loader runs in a prompt without sampling."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    RETURN_TYPES = ()
    FUNCTION = "consume"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def consume(self, model):
        return {}


class DisTorchTestSimulatedGpu:
    """The DisTorch model on a simulated GPU of `vram_gb`, for the server runs with `--cpu` (where core sets no weight
    budget): each load gets the budget core's formula gives that card for the run's own activation estimate,
    `vram_gb - max(minimum_inference_memory, minimum_memory_required + reserved)`. The model's memory_usage_factor is
    set so that core estimates `bytes_per_cell` per latent cell (frames x height x width), so latents of a few frames
    take a few blocks' worth of a test model."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",),
                             "vram_gb": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1024.0, "step": 0.0001}),
                             "bytes_per_cell": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1e12, "step": 1.0})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "simulate"
    CATEGORY = "testing"

    def simulate(self, model, vram_gb, bytes_per_cell):
        simulated = _simulated_class(type(model)).__new__(_simulated_class(type(model)))
        simulated.__dict__.update(vars(model.clone()))
        simulated.model_options["distorch_test_vram"] = int(vram_gb * 1024**3)
        base_model = simulated.model
        base_model.memory_usage_factor = 1.0
        base_model.memory_usage_factor = bytes_per_cell / base_model.memory_required([1, 16, 1, 1, 1])
        return (simulated,)


_SIMULATED = {}


def _simulated_class(base: type) -> type:
    """A subclass of the pack's patcher whose run budget is the simulated card's (clones keep the class)."""
    if base.__name__ == "SimulatedGpuPatcher":
        return base
    if base not in _SIMULATED:
        import comfy.model_management as mm

        budget_type = sys.modules[base.__module__].ComputeBudget

        def _run_budget(self, state, lowvram_model_memory):
            workload = state.workload
            base._run_budget(self, state, lowvram_model_memory)  # takes the recorded workload, as a real run does
            minimum = workload.minimum_bytes if workload is not None else 0
            reserve = max(mm.minimum_inference_memory(), minimum + mm.extra_reserved_memory())
            vram = self.model_options["distorch_test_vram"]
            return budget_type(max(0, vram - reserve), self.device_extra_bytes(), minimum or None,
                               f"a simulated GPU of {vram / 1024**3:.4f} GB (test node)")

        _SIMULATED[base] = type("SimulatedGpuPatcher", (base,), {"_run_budget": _run_budget})
    return _SIMULATED[base]


def _pack_module(name: str):
    """A module of the DisTorch pack as ComfyUI imported it (its package name is the custom node's path)."""
    import nodes

    extension = sys.modules[nodes.NODE_CLASS_MAPPINGS["DisTorchCLIPLoader"].__module__]
    root = extension.__name__.rsplit(".", 2)[0]  # "<pack>.nodes.extension" -> "<pack>"
    return importlib.import_module(f"{root}.{name}")


def _save(tensors: dict, filename: str) -> None:
    import folder_paths
    from safetensors.torch import save_file

    directory = folder_paths.get_output_directory()
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, f"{filename}.safetensors"))


NODE_CLASS_MAPPINGS = {"DisTorchTestZeroConditioning": DisTorchTestZeroConditioning,
                       "DisTorchTestSaveImageTensor": DisTorchTestSaveImageTensor,
                       "DisTorchTestSaveConditioning": DisTorchTestSaveConditioning,
                       "DisTorchTestProcessRSS": DisTorchTestProcessRSS,
                       "DisTorchTestDynamoGraphs": DisTorchTestDynamoGraphs,
                       "DisTorchTestCLIPWithConfig": DisTorchTestCLIPWithConfig,
                       "DisTorchTestEncodeWithImage": DisTorchTestEncodeWithImage,
                       "DisTorchTestConsumeModel": DisTorchTestConsumeModel,
                       "DisTorchTestSimulatedGpu": DisTorchTestSimulatedGpu}
