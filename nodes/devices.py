"""The devices of this ComfyUI: what the loader widgets offer, what validation accepts, what old workflows map onto.

ComfyUI decides which devices a model may use (`--cpu` makes every GPU unusable); this module alone asks it.
The choices themselves are pure functions in settings.py (tested without ComfyUI).
"""

import comfy.model_management as mm
import torch

from ..distorch.legacy_loaders import Machine
from .settings import device_choices, donor_choices


def _gpu_count() -> tuple[int, bool]:
    cpu_only = getattr(mm, "cpu_state", None) == mm.CPUState.CPU
    return (torch.cuda.device_count() if torch.cuda.is_available() else 0), cpu_only


def compute_devices() -> tuple[str, ...]:
    """The compute devices, main GPU first ('cpu' alone without a usable GPU): the widget and validation list."""
    return device_choices(*_gpu_count())


def donor_devices() -> tuple[str, ...]:
    return donor_choices(*_gpu_count())


def machine() -> Machine:
    """This machine as the ComfyUI-MultiGPU mapping (distorch/legacy_loaders.py) sees it: default device and GPUs."""
    devices = compute_devices()
    return Machine(default_device=devices[0], gpus=tuple(d for d in devices if d != "cpu"))
