"""Shared by the scripts that run inside a ComfyUI interpreter (the probes and tests/comfyui/inside): the pack
imported as ComfyUI imports a custom node, and one forward of the tiny Wan model they all load."""

import importlib.util
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def import_pack(name: str = "distorch_pack"):
    """Imports this repository as the package `name`, the way ComfyUI loads a custom node folder."""
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def wan_forward(diffusion_model) -> torch.Tensor:
    """One denoising call of tests/comfyui/make_models.py's tiny Wan 2.1 on fixed random inputs."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 2, 8, 8, generator=generator)
    context = torch.randn(1, 8, 4096, generator=generator)
    with torch.inference_mode():
        return diffusion_model(x, torch.tensor([500.0]), context)
