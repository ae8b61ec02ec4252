"""What users install: the pack never asks for torch (ComfyUI brings its own) and imports without ComfyUI."""

import re
import sys
import tomllib
from pathlib import Path

import distorch_pack

ROOT = Path(__file__).resolve().parents[1]


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", line.strip(), maxsplit=1)[0].lower() for line in requirements
            if line.strip() and not line.strip().startswith("#")}


def test_runtime_requirements_never_pull_torch():
    listed = _names((ROOT / "requirements.txt").read_text().splitlines())
    declared = _names(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    assert listed == declared
    assert not listed & {"torch", "torchvision", "torchaudio"}


def test_pack_imports_without_comfyui_and_registers_nothing():
    assert "comfy" not in sys.modules
    assert not hasattr(distorch_pack, "comfy_entrypoint")


def test_fixed_top_level_layout_and_license():
    for name in ("__init__.py", "nodes", "distorch", "gguf_loader", "workflows", "tests", "pyproject.toml",
                 "README.md"):
        assert (ROOT / name).exists(), name
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]["text"] == "GPL-3.0-or-later"


def test_errors_show_their_public_import_path_inside_the_pack():
    """ComfyUI shows an error's type as `module.qualname` and names a custom node's modules by file path
    ("/…/custom_nodes/<pack>.gguf_loader.errors"): each pack error states its public import path instead.
    Those paths resolve to the classes, so the errors still pickle (tests/test_comfyui_errors.py checks
    what a ComfyUI server shows)."""
    import pickle

    from distorch_pack.distorch import AllocationError, PlanError
    from distorch_pack.distorch.headers import HeaderError
    from distorch_pack.gguf_loader.errors import GGUFError

    import distorch
    import distorch.headers
    import gguf_loader

    shown = [f"{cls.__module__}.{cls.__qualname__}" for cls in (GGUFError, AllocationError, PlanError, HeaderError)]
    assert shown == ["gguf_loader.GGUFError", "distorch.AllocationError", "distorch.PlanError",
                     "distorch.headers.HeaderError"]
    for public in (gguf_loader.GGUFError, distorch.AllocationError, distorch.PlanError, distorch.headers.HeaderError):
        assert type(pickle.loads(pickle.dumps(public("x")))) is public
