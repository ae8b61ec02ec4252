"""Errors of the pack as a ComfyUI user sees them: the execution error's type and message.

ComfyUI shows `exception_type: exception_message`, with the type as `module + "." + qualname`; it names
a custom node's modules by their file path, so without a public `__module__` a corrupt GGUF read
"/…/custom_nodes/ComfyUI-DisTorch.gguf_loader.errors.GGUFError" (issue #13, escape 5).
"""

import pytest
from comfyui_harness import distorch_unet, sampling_prompt

pytestmark = pytest.mark.comfyui

HALF = 0.0015  # GB: about half of the tiny Wan model's blocks


def execution_error(server, prompt) -> dict:
    result = server.run(prompt)
    assert result.status == 200 and not result.ok, result.error_text()[:2000]
    errors = [data for kind, data in result.body["status"]["messages"] if kind == "execution_error"]
    assert len(errors) == 1, result.error_text()[:2000]
    return errors[0]


@pytest.mark.parametrize(("damage", "message"), [
    (lambda data: b"GGUX" + data[4:], "not a GGUF file (starts with b'GGUX', expected b'GGUF')"),
    (lambda data: data[:len(data) // 2], "data ends at byte"),
], ids=["magic", "truncated"])
def test_corrupt_gguf_reads_as_a_gguf_error(server, damage, message):
    folder = server.base / "models" / "diffusion_models"
    name = f"corrupt_{message[:8].replace(' ', '_')}.gguf"
    (folder / name).write_bytes(damage((folder / "tiny_wan21_Q8_0.gguf").read_bytes()))
    error = execution_error(server, sampling_prompt(distorch_unet(name, HALF), "wan", "corrupt"))
    assert error["exception_type"] == "gguf_loader.GGUFError"
    text = error["exception_message"].strip()
    assert f"{name}: " in text and message in text and "\n" not in text and len(text) < 400, text

