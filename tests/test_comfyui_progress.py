"""Staging progress reaches the loader node's progress bar inside real ComfyUI, and an interrupt during staging
leaves the model loadable (tests/comfyui/progress_probe.py runs in the server's interpreter)."""

import json
import re
import subprocess

import pytest
from comfyui_harness import REPO

pytestmark = pytest.mark.comfyui


def test_staging_drives_the_loader_nodes_progress_bar_and_survives_an_interrupt(server):
    result = subprocess.run([server.python, str(REPO / "tests" / "comfyui" / "progress_probe.py"), "--comfyui",
                             str(server.comfyui), "--models", str(server.base / "models"), "--virtual-vram-gb",
                             "0.0015"], capture_output=True, text=True, timeout=600)
    match = re.search(r"^RESULT (.*)$", result.stdout, re.MULTILINE)
    assert match, f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    report = json.loads(match.group(1))
    staged = report["in_prompt"]
    assert staged["calls"], "staging must report progress"
    assert {c["node"] for c in staged["calls"]} == {"7"}, "the bar belongs to the loader node, not the sampler"
    assert staged["calls"][0]["value"] == 0 and staged["calls"][-1]["value"] == staged["calls"][-1]["total"]
    assert staged["state"] == "finished", "the loader's bar must not linger as running"
    assert staged["plan_keys"] == ["distorch_plan", "text"]
    assert report["not_in_prompt"]["nodes"] == ["None"], "a loader outside the prompt: the executing node's bar"
    assert report["interrupted"] and report["calls_before_interrupt"] == 2
    assert report["open_after_resume"] and report["equal_after_resumed_staging"]
    resumed = report["resumed_calls"]
    assert resumed and resumed[-1]["value"] == resumed[-1]["total"]
