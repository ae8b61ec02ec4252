"""GGUF text encoders through real ComfyUI: conditioning from our GGUF loader equals core's on the same weights.

For each family with a GGUF text encoder (UMT5 for Wan, T5-XXL for Flux, Gemma 3 for LTX-2, Gemma 2 for
Lumina 2, Mistral-Small-3 for Flux.2, Qwen2.5-VL + mmproj for Qwen-Image-Edit) tests/comfyui/make_text_encoders.py
writes the same random weights twice: as ComfyUI's own safetensors (with the original tokenizer inside, as
Comfy-Org's files carry it) and as a llama.cpp GGUF (tokenizer as metadata). ComfyUI's real encoder classes
are built small with its `<encoder>_model_config` model option. Core's loader reads the safetensors, the
DisTorch loader the GGUF; the prompt (many scripts, emoji, full-width forms, ligatures) must give identical
conditioning - names, Q/K un-permutation, norms, quantized weights and the rebuilt tokenizer all have to be right.

The fixed-size T5-XXL and UMT5-XXL are also built at full size from random Q8_0/Q4_K blocks and compared with
city96/ComfyUI-GGUF's CLIPLoaderGGUF node (marked slow).
"""

import json
import subprocess

import pytest
import tokenizer_fixtures as fx
import torch
from comfyui_harness import REPO
from safetensors.torch import load_file

pytestmark = pytest.mark.comfyui

PROMPT = "A corgi 🐕 runs along the beach at sunset, crème brûlée, 柯基犬, 해변, Корги, ＦＵＬＬ width ﬁne  print"
SMALL_FAMILIES = ["umt5", "t5xxl", "gemma3", "gemma2", "mistral"]


def run_ok(server, prompt, timeout=600):
    result = server.run(prompt, timeout=timeout)
    assert result.ok, f"{result.error_text()[:3000]}\n--- server log ---\n{server.log()[-3000:]}"
    return result


def make_encoders(server, tmp_path_factory, families: list[str]) -> dict:
    tokenizers = tmp_path_factory.mktemp("tokenizers")
    fx.write_comfy_tokenizers(tokenizers)
    made = subprocess.run([server.python, str(REPO / "tests" / "comfyui" / "make_text_encoders.py"), "--comfyui",
                           str(server.comfyui), "--out", str(server.base / "models" / "text_encoders"),
                           "--tokenizers", str(tokenizers), "--families", ",".join(families)],
                          capture_output=True, text=True, timeout=900)
    assert made.returncode == 0, made.stderr[-3000:]
    return json.loads(made.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def encoders(server, tmp_path_factory) -> dict:
    return make_encoders(server, tmp_path_factory, SMALL_FAMILIES)


def conditioning(server, loader: str, files: list[str], family: dict, name: str, virtual_vram_gb: float = 0.0,
                 image: bool = False) -> dict:
    load = {"class_type": "DisTorchTestCLIPWithConfig", "inputs": {
        "loader": loader, "clip_names": ",".join(files), "type": family["type"],
        "model_options": json.dumps(family["model_options"]), "virtual_vram_gb": virtual_vram_gb}}
    encode = ({"class_type": "DisTorchTestEncodeWithImage", "inputs": {"clip": ["1", 0], "text": PROMPT, "size": 56}}
              if image else {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 0], "text": PROMPT}})
    run_ok(server, {"1": load, "2": encode, "9": {"class_type": "DisTorchTestSaveConditioning",
                                                  "inputs": {"conditioning": ["2", 0], "filename": name}}})
    return load_file(str(server.base / "output" / f"{name}.safetensors"))


def assert_identical(core: dict, ours: dict) -> None:
    assert set(core) == set(ours)
    for key in core:
        assert core[key].shape == ours[key].shape, key
        assert torch.equal(core[key], ours[key]), f"{key}: max difference {(core[key] - ours[key]).abs().max()}"


@pytest.mark.parametrize("family", SMALL_FAMILIES)
def test_conditioning_from_gguf_equals_core_on_the_same_weights(server, encoders, family):
    entry = encoders[family]
    if "unsupported" in entry:
        pytest.skip(entry["unsupported"])
    core = conditioning(server, "core", entry["core"], entry, f"te_core_{family}")
    ours = conditioning(server, "distorch", entry["gguf"], entry, f"te_ours_{family}")
    assert core["context"].abs().sum() > 0
    assert_identical(core, ours)


def test_streamed_gguf_text_encoder_equals_resident(server, encoders):
    """Gemma 2 (Lumina 2) with part of its 26 layers streamed from RAM gives the same conditioning."""
    entry = encoders["gemma2"]
    if "unsupported" in entry:
        pytest.skip(entry["unsupported"])
    resident = conditioning(server, "distorch", entry["gguf"], entry, "te_gemma2_resident")
    streamed = conditioning(server, "distorch", entry["gguf"], entry, "te_gemma2_streamed", virtual_vram_gb=0.001)
    assert_identical(resident, streamed)
