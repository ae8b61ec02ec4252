"""Shared by the scripts that run inside a ComfyUI interpreter (the probes and tests/comfyui/inside): the pack
imported as ComfyUI imports a custom node, and one forward of the tiny Wan model they all load."""

import argparse
import importlib.util
import os
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


def start_probe() -> argparse.Namespace:
    """A probe's start: reads `--comfyui PATH --models DIR --virtual-vram-gb G`, boots ComfyUI's modules as
    `--cpu` with DIR's diffusion models, and imports the pack as `distorch_pack`."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--comfyui", required=True)
    parser.add_argument("--models", required=True)
    parser.add_argument("--virtual-vram-gb", type=float, required=True)
    args = parser.parse_args()
    sys.argv = sys.argv[:1] + ["--cpu"]
    sys.path.insert(0, os.path.abspath(args.comfyui))
    import comfy.options

    comfy.options.enable_args_parsing()
    import folder_paths

    folder_paths.add_model_folder_path("diffusion_models", str(Path(args.models) / "diffusion_models"), is_default=True)
    import_pack()
    return args


def patcher_forward(patcher) -> torch.Tensor:
    """`wan_forward` of a ModelPatcher's diffusion model."""
    return wan_forward(patcher.model.diffusion_model)
