"""The pack against ComfyUI's internals, once per install: the checks in tests/comfyui/inside run in the
install's own interpreter (they import ComfyUI, which this interpreter cannot): core's memory requests for a
DisTorch model, a text encoder kept loaded beside it, and the Dynamic VRAM era (ComfyUI 2026) branches with
test doubles for what needs a GPU. See tests/comfyui/inside/conftest.py."""

import os
import re
import subprocess

import pytest
from comfyui_harness import REPO

pytestmark = pytest.mark.comfyui

INSIDE = REPO / "tests" / "comfyui" / "inside"


def test_core_internals_checks_pass_inside_comfyui(server):
    env = dict(os.environ, COMFYUI_PATH=str(server.comfyui), DISTORCH_TEST_MODELS=str(server.base / "models"))
    result = subprocess.run([server.python, "-m", "pytest", "-c", str(INSIDE / "pytest.ini"), str(INSIDE), "-q",
                             "-rs", "--basetemp", str(server.base / "inside")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    output = result.stdout[-6000:] + result.stderr[-3000:]
    assert result.returncode == 0, output
    summary = output.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary) and "failed" not in summary and "error" not in summary, output
    # Only checks of features this core does not have may be skipped (named in the skip reason).
    skipped = re.findall(r"SKIPPED \[\d+\] .*?: (.*)", output)
    assert all(reason.startswith("this ComfyUI has no ") for reason in skipped), output
