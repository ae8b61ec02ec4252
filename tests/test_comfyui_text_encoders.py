"""GGUF text encoders through real ComfyUI: conditioning from our GGUF loader equals core's on the same weights.

For each family with a GGUF text encoder (UMT5 for Wan, T5-XXL for Flux, Gemma 3 for LTX-2, Gemma 2 for
Lumina 2, Mistral-Small-3 for Flux.2, GPT-OSS with MXFP4 experts for Lens, Gemma 4 12B alone and for LTX-2,
Gemma 4 E2B, Qwen2.5-VL + mmproj for Qwen-Image-Edit; GPT-OSS and Gemma 4 only where ComfyUI has them, 0.33)
tests/comfyui/make_text_encoders.py
writes the same random weights twice: as ComfyUI's own safetensors (with the original tokenizer inside, as
Comfy-Org's files carry it) and as a llama.cpp GGUF (tokenizer as metadata). ComfyUI's real encoder classes
are built small with its `<encoder>_model_config` model option. Core's loader reads the safetensors, the
DisTorch loader the GGUF; the prompt (many scripts, emoji, full-width forms, ligatures) must give identical
conditioning - names, Q/K un-permutation, norms, quantized weights and the rebuilt tokenizer all have to be right.

The fixed-size T5-XXL and UMT5-XXL are also built at full size from random Q8_0/Q4_K blocks and compared with
city96/ComfyUI-GGUF's CLIPLoaderGGUF node (marked slow).
"""

import json
import os
import subprocess

import gemma4_tokenizer_fixtures as g4
import o200k_fixtures as ox
import pytest
import tokenizer_fixtures as fx
import torch
from comfyui_harness import REPO
from safetensors.torch import load_file

pytestmark = pytest.mark.comfyui

PROMPT = "A corgi 🐕 runs along the beach at sunset, crème brûlée, 柯基犬, 해변, Корги, ＦＵＬＬ width ﬁne  print"
SMALL_FAMILIES = ["umt5", "t5xxl", "gemma3", "gemma2", "mistral", "gptoss", "gemma4", "gemma4_ltx2", "gemma4_e2b"]


def run_ok(server, prompt, timeout=600):
    result = server.run(prompt, timeout=timeout)
    assert result.ok, f"{result.error_text()[:3000]}\n--- server log ---\n{server.log()[-3000:]}"
    return result


def make_encoders(server, tmp_path_factory, families: list[str]) -> dict:
    tokenizers = tmp_path_factory.mktemp("tokenizers")
    fx.write_comfy_tokenizers(tokenizers)
    ox.write_comfy_gptoss_tokenizer(tokenizers)
    g4.write_comfy_tokenizer(tokenizers)
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
                 image: bool = False) -> tuple[dict, str]:
    """The saved conditioning tensors and the loader's report (DisTorch's plan table, or "core")."""
    load = {"class_type": "DisTorchTestCLIPWithConfig", "inputs": {
        "loader": loader, "clip_names": ",".join(files), "type": family["type"],
        "model_options": json.dumps(family["model_options"]), "virtual_vram_gb": virtual_vram_gb}}
    encode = ({"class_type": "DisTorchTestEncodeWithImage", "inputs": {"clip": ["1", 0], "text": PROMPT, "size": 56}}
              if image else {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 0], "text": PROMPT}})
    result = run_ok(server, {"1": load, "2": encode, "9": {"class_type": "DisTorchTestSaveConditioning",
                                                           "inputs": {"conditioning": ["2", 0], "filename": name}}})
    # A loader ComfyUI reuses from its cache (same inputs as the prompt before) reports nothing.
    report = result.body["outputs"].get("1", {}).get("text", [""])[0]
    return load_file(str(server.base / "output" / f"{name}.safetensors")), report


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
    core, _ = conditioning(server, "core", entry["core"], entry, f"te_core_{family}")
    ours, plan = conditioning(server, "distorch", entry["gguf"], entry, f"te_ours_{family}")
    assert core["context"].abs().sum() > 0 and "DisTorch plan" in plan
    assert_identical(core, ours)


@pytest.mark.parametrize("family", ["gemma2", "gptoss"])
def test_streamed_gguf_text_encoder_equals_resident(server, encoders, family):
    """Gemma 2 (Lumina 2, 26 layers) and GPT-OSS (Lens, MXFP4 expert banks; ComfyUI 0.33+) with part of their layers
    streamed from RAM give the same conditioning."""
    entry = encoders[family]
    if "unsupported" in entry:
        pytest.skip(entry["unsupported"])
    resident, plan = conditioning(server, "distorch", entry["gguf"], entry, f"te_{family}_resident")
    streamed, streamed_plan = conditioning(server, "distorch", entry["gguf"], entry, f"te_{family}_streamed",
                                           virtual_vram_gb=0.001)
    assert "streamed" not in plan and "streamed" in streamed_plan, streamed_plan
    assert_identical(resident, streamed)


@pytest.mark.parametrize("family", ["gemma4", "gemma4_e2b"])
def test_streamed_gemma4_equals_core(server, encoders, family):
    """Gemma 4 12B and E2B with part of their layers streamed from RAM condition exactly like core's loader on the
    same weights (LTX-2's Gemma 4 is the same encoder; its 1024-token padding makes a streamed run cost ~50 s)."""
    entry = encoders[family]
    if "unsupported" in entry:
        pytest.skip(entry["unsupported"])
    core, _ = conditioning(server, "core", entry["core"], entry, f"te_core_{family}")
    streamed, plan = conditioning(server, "distorch", entry["gguf"], entry, f"te_{family}_streamed",
                                  virtual_vram_gb=0.001)
    assert "streamed" in plan, plan
    assert_identical(core, streamed)


def test_gemma3_prompt_with_image_soft_token_is_one_line(server, encoders):
    """ComfyUI's Gemma 3 tokenizer reads the text `<image_soft_token>` as id 262144 whatever the vocabulary; a GGUF's
    table lacks that row (llama.cpp cuts it at 262,144; here the table is the small test vocabulary). The user sees
    one line naming the token and the file, not torch's IndexError (issue 17, item 5)."""
    entry = encoders["gemma3"]
    if "unsupported" in entry:
        pytest.skip(entry["unsupported"])
    load = {"class_type": "DisTorchTestCLIPWithConfig", "inputs": {
        "loader": "distorch", "clip_names": ",".join(entry["gguf"]), "type": entry["type"],
        "model_options": json.dumps(entry["model_options"]), "virtual_vram_gb": 0.0}}
    encode = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 0], "text": "a corgi <image_soft_token>"}}
    result = server.run({"1": load, "2": encode, "9": {"class_type": "DisTorchTestSaveConditioning",
                                                       "inputs": {"conditioning": ["2", 0], "filename": "soft"}}})
    errors = [data for kind, data in result.body.get("status", {}).get("messages", []) if kind == "execution_error"]
    assert not result.ok and len(errors) == 1, result.error_text()[:2000]
    assert errors[0]["exception_type"] == "gguf_loader.GGUFError", errors[0]
    text = errors[0]["exception_message"].strip()
    gguf_name = next(name for name in entry["gguf"] if name.endswith(".gguf"))
    assert "the prompt holds '<image_soft_token>', token id 262144" in text and gguf_name in text, text
    assert "\n" not in text and len(text) < 600, text


def free_server_memory(server) -> None:
    """Drops the models the last prompts loaded (ComfyUI keeps a prompt's outputs until the next one runs)."""
    import urllib.request

    request = urllib.request.Request(server.url + "/free", data=json.dumps({"unload_models": True,
                                                                            "free_memory": True}).encode(),
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=60).close()


def venv_has_protobuf(server) -> bool:
    found = subprocess.run([server.python, "-c", "import google.protobuf"], capture_output=True, timeout=120)
    return found.returncode == 0


def need_free_ram(gigabytes: float) -> None:
    import psutil

    available = psutil.virtual_memory().available / 2 ** 30
    if available < gigabytes:
        pytest.skip(f"needs {gigabytes} GB of free RAM, {available:.1f} GB available")


@pytest.mark.slow
def test_qwen_image_edit_encoder_from_gguf_and_mmproj_equals_core(server, tmp_path_factory):
    """Qwen-Image-Edit: a Qwen2.5-VL GGUF with its mmproj loaded as the second file reaches ComfyUI's vision tower
    (fixed at its real size: 670M parameters, F16) and conditions a prompt with an image exactly like core's
    loader on the same weights in one safetensors file. About 2.7 GB of files, 4 GB of RAM."""
    need_free_ram(8)
    entry = make_encoders(server, tmp_path_factory, ["qwen25vl"])["qwen25vl"]
    if "unsupported" in entry:
        pytest.skip(entry["unsupported"])
    try:
        core, _ = conditioning(server, "core", entry["core"], entry, "te_core_qwen", image=True)
        ours, _ = conditioning(server, "distorch", entry["gguf"], entry, "te_ours_qwen", image=True)
        text_only, _ = conditioning(server, "distorch", entry["gguf"], entry, "te_ours_qwen_text")
    finally:
        free_server_memory(server)
        for name in entry["core"] + entry["gguf"]:
            (server.base / "models" / "text_encoders" / name).unlink(missing_ok=True)
    assert_identical(core, ours)
    assert ours["context"].shape[1] > text_only["context"].shape[1]  # the image's tokens came from the vision tower


# -- full-size T5-XXL / UMT5-XXL against ComfyUI-GGUF --------------------------------------------------------------

T5_XXL = dict(blocks=24, width=4096, heads=64, head_dim=64, ffn=10240)
# Random blocks with scales that give weights of std ~0.015, as a trained T5's: Q8_0 d * q (q ~ +-73 rms);
# Q4_K d * scale * q - dmin * min with 6-bit scale/min and 4-bit q (dmin = 7.5 d centres the values).
SCALES = {"Q8_0": (2e-4,), "Q4_K": (6e-5, 4.5e-4)}


def scaled_blocks(qtype: str, count: int, seed: int, scales: tuple) -> torch.Tensor:
    from ggml_samples import random_blocks

    blocks = random_blocks(qtype, count, seed=seed)
    for offset, value in zip((0, 2), scales):
        blocks[:, offset:offset + 2] = torch.tensor([value], dtype=torch.float16).view(torch.uint8).numpy()
    return torch.from_numpy(blocks)


def _random_half(rows: int, cols: int, seed: int) -> torch.Tensor:
    """rows x cols float16 N(0, 0.5) values, drawn in chunks (UMT5's table is 1.05 G values)."""
    generator, out = torch.Generator().manual_seed(seed), torch.empty(rows, cols, dtype=torch.float16)
    for start in range(0, rows, 16384):
        chunk = out[start:start + 16384]
        chunk.copy_(torch.randn(chunk.shape, generator=generator) * 0.5)
    return out


def write_full_size_t5(path, umt5: bool, tokenizer: dict | None) -> None:
    """A T5-XXL (or UMT5-XXL: relative bias in every block, 256,384-token vocabulary) encoder as llama.cpp names
    it, Q4_K and Q8_0 blocks drawn at write time one tensor at a time."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    from gguf_loader import GGUFFileWriter

    writer = GGUFFileWriter(path, architecture="t5encoder")
    for key, value in (tokenizer or {}).items():
        writer.add_metadata(key, value)
    width, ffn, vocab = T5_XXL["width"], T5_XXL["ffn"], 256384 if umt5 else 32128
    seed = iter(range(10_000))

    def quantized(name, rows, cols, qtype, scales=None):
        block = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]][0]
        count, this_seed = rows * cols // block, next(seed)
        writer.add_tensor(name, lambda: scaled_blocks(qtype, count, this_seed, scales or SCALES[qtype]), qtype,
                          shape=(rows, cols))

    # F16 embedding: the reference's embedding layer dequantizes in float16 arithmetic whatever its settings.
    embedding_seed = next(seed)
    writer.add_tensor("token_embd.weight", lambda: _random_half(vocab, width, embedding_seed), "F16",
                      shape=(vocab, width))
    writer.add_tensor("enc.output_norm.weight", torch.ones(width))
    for i in range(T5_XXL["blocks"]):
        for part in "qkv":
            quantized(f"enc.blk.{i}.attn_{part}.weight", width, width, "Q4_K")
        quantized(f"enc.blk.{i}.attn_o.weight", width, width, "Q8_0")
        quantized(f"enc.blk.{i}.ffn_gate.weight", ffn, width, "Q4_K")
        quantized(f"enc.blk.{i}.ffn_up.weight", ffn, width, "Q4_K")
        quantized(f"enc.blk.{i}.ffn_down.weight", width, ffn, "Q4_K")
        writer.add_tensor(f"enc.blk.{i}.attn_norm.weight", torch.ones(width))
        writer.add_tensor(f"enc.blk.{i}.ffn_norm.weight", torch.ones(width))
        if i == 0 or umt5:
            generator = torch.Generator().manual_seed(i)
            writer.add_tensor(f"enc.blk.{i}.attn_rel_b.weight", torch.randn(32, T5_XXL["heads"], generator=generator))
    writer.write()


def encode_prompt(server, loader: dict, name: str) -> torch.Tensor:
    encode = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 0], "text": FULL_PROMPT}}
    save = {"class_type": "DisTorchTestSaveConditioning", "inputs": {"conditioning": ["2", 0], "filename": name}}
    run_ok(server, {"1": loader, "2": encode, "9": save}, timeout=1800)
    return load_file(str(server.base / "output" / f"{name}.safetensors"))["context"]


FULL_PROMPT = "a corgi runs along a beach at sunset"  # ASCII: the reference drops UMT5's normalization table


@pytest.fixture(scope="module")
def full_size_server(comfy_install, reference_gguf_pack, tmp_path_factory):
    """A server of its own for the full-size encoders: it computes text encoders in float32 (`--fp32-text-enc`;
    on a CPU ComfyUI otherwise runs them in float16, which CPUs compute many times slower) and its memory goes
    when it stops. Only on the newest ComfyUI: the loaders compared do not change between versions."""
    from comfyui_harness import ComfyServer, installs

    if reference_gguf_pack is None:
        pytest.skip("no ComfyUI-GGUF snapshot in ../shared/reference")
    if comfy_install != installs()[-1]:
        pytest.skip("the full-size comparison runs on the newest ComfyUI install only")
    need_free_ram(10)
    instance = ComfyServer(tmp_path_factory.mktemp(f"full-size-{comfy_install.version}"), comfy_install,
                           (reference_gguf_pack,), ("--fp32-text-enc",))
    instance.prepare()
    instance.start()
    yield instance
    instance.stop()


@pytest.mark.slow
@pytest.mark.parametrize("model", ["t5xxl", "umt5xxl"])
def test_full_size_t5_encoders_match_the_reference_node(full_size_server, model):
    """Full-size random Q4_K/Q8_0 T5-XXL (SD3, Flux, LTX-Video) and UMT5-XXL (Wan, tokenizer rebuilt from the
    file): our loader and ComfyUI-GGUF's CLIPLoaderGGUF give identical conditioning. The reference dequantizes
    in float16 arithmetic by default; its UnetLoaderGGUFAdvanced(dequant_dtype=float32) switches every GGMLOps
    Linear of the process to float32 (its class-level setting), which puts it in the same arithmetic as ours.
    Files of 3.1 / 4.9 GB, written and deleted by the test."""
    server = full_size_server
    umt5 = model == "umt5xxl"
    if umt5 and not venv_has_protobuf(server) and os.environ.get("CI") != "true":
        pytest.skip("this ComfyUI venv has no protobuf, which ComfyUI-GGUF's UMT5 tokenizer needs "
                    "(scripts/setup_comfyui.sh installs it)")
    name = f"full_{model}-Q4_K_M.gguf"
    path = server.base / "models" / "text_encoders" / name
    tokenizer = None
    if umt5:
        sp = fx.train_sentencepiece("unigram", byte_fallback=True)
        tokenizer = fx.t5_metadata(sp, 256384)
    write_full_size_t5(path, umt5, tokenizer)
    clip_type = "wan" if umt5 else "sd3"
    try:
        ours = encode_prompt(server, {"class_type": "DisTorchCLIPLoader", "inputs": {
            "clip_name": name, "type": clip_type, "compute_device": "cpu", "virtual_vram_gb": 0.0,
            "donor_device": "cpu", "expert_mode_allocations": ""}}, f"full_ours_{model}")
        free_server_memory(server)
        run_ok(server, {"1": {"class_type": "UnetLoaderGGUFAdvanced", "inputs": {
            "unet_name": "tiny_wan21_Q8_0.gguf", "dequant_dtype": "float32", "patch_dtype": "default",
            "patch_on_device": False}}, "2": {"class_type": "DisTorchTestConsumeModel", "inputs": {"model": ["1", 0]}}})
        theirs = encode_prompt(server, {"class_type": "CLIPLoaderGGUF", "inputs": {
            "clip_name": name, "type": clip_type}}, f"full_reference_{model}")
    finally:
        free_server_memory(server)
        path.unlink(missing_ok=True)
    assert ours.shape == theirs.shape == (1, 512 if umt5 else 77, T5_XXL["width"])
    assert torch.isfinite(ours).all() and ours.abs().max() > 0
    assert torch.equal(ours, theirs), f"relative difference {float((ours - theirs).norm() / theirs.norm())}"
