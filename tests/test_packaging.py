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
