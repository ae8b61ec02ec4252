"""llama.cpp's own converter and vocabulary files for tests, from the llama-cpp-python sdist on PyPI (never vendored).

`llama_cpp_tree()` downloads the pinned sdist once with pip, extracts only what tests read (convert_hf_to_gguf.py,
conversion/, gguf-py/ and models/ggml-vocab-*.gguf with their .inp/.out vectors, ~80 MB) into
~/.cache/distorch/llama-cpp-python-<version>/ (or $DISTORCH_TEST_CACHE), and later sessions reuse it.
`convert_mistral_vocab` runs the real converter on a tekken.json, as a user converting a Mistral model does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

LLAMA_CPP_PYTHON = "0.3.36"
_WANTED = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "models/ggml-vocab-")
# The converter imports transformers at module level (for Hugging Face configs); the --mistral-format path never
# calls it, so a stub stands in rather than a 100 MB test dependency.
_TRANSFORMERS_STUB = '''class AutoConfig:
    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        raise RuntimeError("transformers stub: the test runs convert_hf_to_gguf.py on Mistral-format folders only")
'''
# A Mistral-format params.json: only the vocabulary is written (--vocab-only), so the model can be tiny.
_PARAMS = {"dim": 64, "n_layers": 1, "head_dim": 16, "hidden_dim": 128, "n_heads": 4, "n_kv_heads": 2,
           "norm_eps": 1e-05, "vocab_size": 131072, "rope_theta": 1000000.0}


def cache_root() -> Path:
    return Path(os.environ.get("DISTORCH_TEST_CACHE", Path.home() / ".cache" / "distorch"))


def llama_cpp_tree() -> Path:
    """vendor/llama.cpp of the pinned sdist, fetched and extracted on first use (skipped offline, failed in CI)."""
    home = cache_root() / f"llama-cpp-python-{LLAMA_CPP_PYTHON}"
    tree = home / "llama.cpp"
    if (tree / "convert_hf_to_gguf.py").is_file():
        return tree
    home.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=home) as work:
        download = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
                                   ":all:", f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", work],
                                  capture_output=True, text=True, timeout=900)
        sdists = list(Path(work).glob("llama_cpp_python-*.tar.gz"))
        if download.returncode != 0 or not sdists:
            message = f"cannot download llama-cpp-python {LLAMA_CPP_PYTHON}: {download.stderr[-500:]}"
            if os.environ.get("CI") == "true":
                pytest.fail(message)
            pytest.skip(message)
        staged = Path(work) / "llama.cpp"
        _extract(sdists[0], staged)
        if not tree.exists():  # another session may have finished first
            shutil.move(str(staged), tree)
    return tree


def _extract(sdist: Path, target: Path) -> None:
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
    with tarfile.open(sdist) as archive:
        members = []
        for member in archive.getmembers():
            inner = member.name[len(prefix):] if member.name.startswith(prefix) else None
            if inner and member.isfile() and inner.startswith(_WANTED):
                member.name = inner
                members.append(member)
        archive.extractall(target, members=members, filter="data")
    stub = target / "_stubs" / "transformers"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text(_TRANSFORMERS_STUB)


def convert_mistral_vocab(tree: Path, tekken_json: Path, out: Path) -> Path:
    """`convert_hf_to_gguf.py --mistral-format --vocab-only` on a folder holding `tekken_json` as tekken.json.

    The converter writes the vocabulary with its own gguf-py (llama.cpp's MistralVocab and GGUFWriter); it needs
    mistral_common installed, as it does for users.
    """
    folder = out.with_suffix(".model")
    folder.mkdir(parents=True)
    shutil.copyfile(tekken_json, folder / "tekken.json")
    (folder / "params.json").write_text(json.dumps(_PARAMS))
    env = {**os.environ, "PYTHONPATH": str(tree / "_stubs")}
    env.pop("NO_LOCAL_GGUF", None)
    run = subprocess.run([sys.executable, str(tree / "convert_hf_to_gguf.py"), "--mistral-format", "--vocab-only",
                          "--outfile", str(out), str(folder)], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0 and out.is_file(), run.stderr[-3000:]
    return out
