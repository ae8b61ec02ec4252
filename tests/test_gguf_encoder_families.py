"""The text-encoder family table (gguf_loader/encoders): each record's module keeps the record's promises, and the
architectures stay in the table (a static check on the runtime source, issue 21)."""

import re
from pathlib import Path

import pytest

from gguf_loader.encoders import FAMILIES, TEXT_ARCHITECTURES, TextEncoderFamily, family_for

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_PACKAGES = ("distorch", "gguf_loader", "nodes")


@pytest.mark.parametrize("family", FAMILIES, ids=lambda family: family.name)
def test_each_family_module_defines_what_its_record_names(family):
    code = family.code()
    assert callable(code.map_tensors)
    assert hasattr(code, "tokenizer_model") == (family.tokenizer_key is not None)
    assert callable(getattr(code, "check_file", print))


@pytest.mark.parametrize("family", FAMILIES, ids=lambda family: family.name)
def test_a_family_guesses_only_its_own_architectures(family):
    assert {signature.architecture for signature in family.signatures} <= set(family.architectures)
    assert all(family_for(architecture) is family for architecture in family.architectures)


BLOCK = ["token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.ffn_up.weight"]


@pytest.mark.parametrize("architecture, extra", [
    ("gemma4", ["blk.0.attn_q_norm.weight", "blk.0.post_ffw_norm.weight", "blk.0.layer_output_scale.weight"]),
    ("gemma3", ["blk.0.attn_q_norm.weight", "blk.0.post_ffw_norm.weight"]),
    ("gemma2", ["blk.0.post_ffw_norm.weight"]),
    ("qwen3", ["blk.0.attn_q_norm.weight"]),
    ("qwen2", ["blk.0.attn_q.bias"]),
    ("gpt-oss", ["blk.0.attn_sinks.weight", "blk.0.ffn_gate_inp.weight", "blk.0.attn_q.bias"]),
    ("llama", []),
])
def test_a_whole_decoder_block_is_guessed_as_its_own_architecture(architecture, extra):
    """The order of the table decides between families whose signatures contain one another's."""
    from gguf_loader.arch import guess_from_names

    assert guess_from_names(BLOCK + extra) == architecture


def test_every_architecture_has_one_family():
    assert TEXT_ARCHITECTURES == {architecture for family in FAMILIES for architecture in family.architectures}
    assert family_for("minimax-m2") is None and family_for(None) is None


def test_an_architecture_claimed_by_two_families_is_refused():
    from gguf_loader.encoders import _by_architecture

    twins = (TextEncoderFamily("A", ("x", "y"), "t5"), TextEncoderFamily("B", ("y",), "clip"))
    with pytest.raises(ValueError, match=r"architecture 'y' is in two text-encoder families: A and B"):
        _by_architecture(twins)


def runtime_files() -> list[Path]:
    """What ComfyUI loads: the pack's __init__.py and the three packages (not tests, bench, docs or scripts)."""
    packages = (sorted((ROOT / package).rglob("*.py")) for package in RUNTIME_PACKAGES)
    return [ROOT / "__init__.py", *(path for files in packages for path in files)]


@pytest.mark.parametrize("architecture", ["gemma3", "gemma4", "t5encoder", "qwen2vl", "gpt-oss"])
def test_a_text_encoder_architecture_is_written_in_at_most_two_runtime_files(architecture):
    """A family's architectures are written in its record (gguf_loader/encoders/__init__.py) and at most one more
    file, its own module; a third file means another `if architecture in ...` chain outside the family table.
    Quoted anywhere counts, docstrings and comments included."""
    quoted = re.compile(rf"([\"']){re.escape(architecture)}\1")
    files = [path.relative_to(ROOT).as_posix() for path in runtime_files() if quoted.search(path.read_text("utf-8"))]
    assert len(files) <= 2, f"{architecture!r} is written in {files}"
