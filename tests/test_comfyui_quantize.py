"""The quantize command's GGUF read by city96/ComfyUI-GGUF's UNet loader (unpacked from the shared folder, run in a
ComfyUI interpreter by tests/comfyui/run_reference.py): its architecture check passes, and its state dict, every
tensor dequantized with float32 math, equals ours bit for bit (same keys, shapes and types)."""

import json
import subprocess

import pytest
import torch
from comfyui_harness import REPO
from quantize_models import wan_state_dict, write_model
from safetensors.torch import load_file

from distorch.cli import main
from gguf_loader import dequantize, read_gguf

pytestmark = pytest.mark.comfyui


def test_comfyui_gguf_loads_the_quantized_model_as_we_do(comfy_install, reference_gguf_pack, tmp_path):
    if reference_gguf_pack is None:
        pytest.skip("no ComfyUI-GGUF snapshot in ../shared/reference")
    source = write_model(tmp_path / "wan.safetensors", wan_state_dict())
    target = tmp_path / "wan-Q8_0.gguf"
    assert main(["quantize", str(source), str(target), "--quiet"]) == 0
    plan = [{"name": "wan", "kind": "unet_state_dict", "path": str(target)}]
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    run = subprocess.run([comfy_install.python, str(REPO / "tests" / "comfyui" / "run_reference.py"),
                          "--comfyui", str(comfy_install.path), "--reference", str(reference_gguf_pack),
                          "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())["wan"]
    assert "error" not in report, report
    assert report["arch"] == "wan"
    theirs = load_file(str(tmp_path / "wan.safetensors"))
    with read_gguf(target) as ours:
        assert set(theirs) == set(ours.tensors)
        for name, tensor in ours.tensors.items():
            ours_values = dequantize(tensor, torch.float32)
            assert theirs[name].shape == ours_values.shape, name
            assert torch.equal(theirs[name], ours_values), name
    assert {k for k, v in report["qtypes"].items() if v == "Q8_0"} == \
        {k for k, v in wan_state_dict().items() if v.ndim == 2 and k.startswith("blocks.") and
         not k.endswith(("odd.weight", "tiny.weight", "scale_shift_table"))}
    assert report["qtypes"]["blocks.0.modulation"] == "F32"  # a plain tensor there, as Wan's code needs
