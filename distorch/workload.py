"""How much activation memory a run needs, estimated the way ComfyUI does it, and the weight budget that leaves.

ComfyUI (0.3.64 to 0.33, the non-dynamic path every DisTorch model takes) sizes a sampler's load like this:

- `BaseModel.memory_required(shape)`: with flash or SDPA attention, `batch x prod(latent dims after the channels)
  x dtype bytes x 0.01 x memory_usage_factor` MB (the factor is per model family, `comfy/supported_models.py`);
- `sampler_helpers.estimate_memory`: that for batch x 2 (`memory_required`, cond and uncond together) and for
  batch x 1 (`minimum_memory_required`);
- `model_management.load_models_gpu`: `minimum = max(0.8 GiB + reserved, minimum_memory_required + reserved)` and
  the model's weights may take `lowvram_model_memory = max(0, free - minimum)` (NVIDIA: the other term, a share
  of free memory, is 0), `reserved` being `EXTRA_RESERVED_VRAM` (400 MiB on Linux, `--reserve-vram`).

This module repeats that arithmetic for a model file, from its tensor names and shapes (`detect_family`), so
`python -m distorch plan --width --height --frames` predicts the plan a DisTorch loader in auto mode makes. In
ComfyUI the loader reads the real numbers from core instead (nodes/patcher.py). Pure Python, no torch.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .units import GIB, MIB

# model_management.minimum_inference_memory(): 0.8 GiB plus EXTRA_RESERVED_VRAM (400 MiB on Linux, 600 on Windows).
CORE_INFERENCE_MIN = int(0.8 * GIB)
CORE_RESERVED_VRAM = 400 * MIB
INFERENCE_DTYPE_BYTES = 2  # ComfyUI runs these families in bf16/fp16 (fp8 and GGUF weights are cast to it)

# Checkpoints prefix the diffusion model's names; ComfyUI strips the same ones (unet_prefix_from_state_dict).
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")


class WorkloadError(ValueError):
    """A workload that cannot be estimated (unknown family, bad size); the message names the problem."""


@dataclass(frozen=True)
class Workload:
    """One sampler run: output size in pixels, video frames (1 for images) and the batch."""

    width: int
    height: int
    frames: int = 1
    batch: int = 1

    def __post_init__(self):
        for name in ("width", "height", "frames", "batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise WorkloadError(f"{name} must be a whole number >= 1, got {value!r}")

    def describe(self) -> str:
        frames = f" x {self.frames} frames" if self.frames > 1 else ""
        return f"{self.width}x{self.height}{frames}, batch {self.batch}"


@dataclass(frozen=True)
class Family:
    """A model family as ComfyUI estimates its activations: its latent layout and its `memory_usage_factor`."""

    name: str
    memory_usage_factor: float
    latent_channels: int
    spatial: int  # pixels per latent cell along each side
    temporal: int = 0  # frames per latent frame after the first (video: 4 or 8); 0 for images
    packed: bool = False  # ComfyUI packs the latent to (batch, 1, elements): the channels count in the area

    def latent_shape(self, workload: Workload, batch: int | None = None) -> tuple[int, ...]:
        """The latent ComfyUI's empty-latent node for this family makes (its `noise_shape`)."""
        batch = workload.batch if batch is None else batch
        height, width = workload.height // self.spatial, workload.width // self.spatial
        if not self.temporal:
            return (batch, self.latent_channels, height, width)
        frames = (workload.frames - 1) // self.temporal + 1
        shape = (batch, self.latent_channels, frames, height, width)
        return (batch, 1, math.prod(shape[1:])) if self.packed else shape

    def activation_bytes(self, shape: Sequence[int]) -> int:
        """`BaseModel.memory_required(shape)` with flash/SDPA attention, in bytes."""
        area = shape[0] * math.prod(shape[2:])
        return int(area * INFERENCE_DTYPE_BYTES * 0.01 * self.memory_usage_factor * MIB)


@dataclass(frozen=True)
class ActivationEstimate:
    """ComfyUI's two activation estimates for one run of a family, and the latent they were made for."""

    family: str
    latent_shape: tuple[int, ...]
    minimum_bytes: int  # batch x 1: what the weight budget subtracts
    cfg_bytes: int  # batch x 2 (cond and uncond in one forward): what core frees room for

    def as_dict(self) -> dict:
        return {"family": self.family, "latent_shape": list(self.latent_shape), "bytes": self.minimum_bytes,
                "cfg_bytes": self.cfg_bytes}


def estimate(family: Family, workload: Workload) -> ActivationEstimate:
    """`sampler_helpers.estimate_memory` for an empty latent of `workload` (text conditioning adds nothing)."""
    single = family.latent_shape(workload)
    double = family.latent_shape(workload, batch=2 * workload.batch)
    return ActivationEstimate(family.name, single, family.activation_bytes(single), family.activation_bytes(double))


def core_weight_budget(free_bytes: int, activation_bytes: int, reserved: int = CORE_RESERVED_VRAM) -> int:
    """`lowvram_model_memory` of `load_models_gpu` for a card with `free_bytes` free (NVIDIA: no share term)."""
    minimum = max(CORE_INFERENCE_MIN + reserved, activation_bytes + reserved)
    return max(0, free_bytes - minimum)


# -- families, from a file's tensor names and shapes -------------------------------------------------------------

def detect_family(shapes: Mapping[str, Sequence[int]]) -> Family | None:
    """The family of a diffusion model from its tensors (name -> shape), with ComfyUI's own tests
    (`comfy/model_detection.py`) and factors (`comfy/supported_models.py`, ComfyUI 0.33); None when unknown."""
    names = _unprefixed(shapes)
    for detector in _DETECTORS:
        family = detector(names)
        if family is not None:
            return family
    return None


def known_families() -> str:
    return "Wan 2.1/2.2 (14B, 1.3B, 5B), Flux, Flux.2, HunyuanVideo (1.0, 1.5), Qwen-Image, LTX-Video, LTX-2"


def _unprefixed(shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
    for prefix in _PREFIXES:
        if any(name.startswith(prefix) for name in shapes):
            return {name[len(prefix):]: tuple(shape) for name, shape in shapes.items() if name.startswith(prefix)}
    return {name: tuple(shape) for name, shape in shapes.items()}


def _dim(names: dict, name: str, axis: int) -> int | None:
    shape = names.get(name) or ()
    return shape[axis] if -len(shape) <= axis < len(shape) else None


def _wan(names: dict) -> Family | None:
    dim = _dim(names, "head.modulation", -1)
    if dim is None:
        return None
    factor = dim / 2222 * (1.2 if "vace_patch_embedding.weight" in names else 1.0)
    out_dim = (_dim(names, "head.head.weight", 0) or 64) // 4
    if out_dim == 48:  # Wan 2.2 TI2V 5B: its own VAE, 48 channels, 16x smaller
        return Family("Wan 2.2 5B", factor, 48, 16, temporal=4)
    return Family(f"Wan 2.1/2.2 (dim {dim})", factor, 16, 8, temporal=4)


def _hunyuan_video(names: dict) -> Family | None:
    if "txt_in.individual_token_refiner.blocks.0.norm1.weight" not in names:
        return None
    if "cond_type_embedding.weight" in names:
        return Family("HunyuanVideo 1.5", 4.0, 32, 16, temporal=4)
    return Family("HunyuanVideo", 1.8, 16, 8, temporal=4)


def _flux(names: dict) -> Family | None:
    if not any(n.startswith("double_blocks.0.img_attn.norm.key_norm.") for n in names):
        return None
    if "double_stream_modulation_img.lin.weight" in names:
        hidden = _dim(names, "img_in.weight", 0) or 6144
        return Family("Flux.2", 3.1 * 4.0 * hidden / 2604, 128, 16)
    return Family("Flux", 3.1, 16, 8)


def _ltx(names: dict) -> Family | None:
    if "adaln_single.emb.timestep_embedder.linear_1.bias" not in names:
        return None
    if "audio_adaln_single.linear.weight" in names:
        # The audio latent joins the video's in one packed latent; it is about 1 % of the elements, left out here.
        return Family("LTX-2", 0.077, 128, 32, temporal=8, packed=True)
    cross = _dim(names, "transformer_blocks.0.attn2.to_k.weight", 1) or 2048
    return Family("LTX-Video", cross / 2048 * 5.5, 128, 32, temporal=8)


def _qwen_image(names: dict) -> Family | None:
    if "txt_norm.weight" not in names or (_dim(names, "txt_norm.weight", 0) == 2560):  # 2560: Mage-Flow
        return None
    return Family("Qwen-Image", 1.8, 16, 8)


_DETECTORS = (_hunyuan_video, _flux, _ltx, _qwen_image, _wan)
