"""Gemma 4's tokenizer.json rebuilt from GGUF metadata tokenizes exactly like the original.

The original (gemma4_tokenizer_fixtures.py) is a BPE trained with Hugging Face `tokenizers` in Google's Gemma 4
layout; its metadata is converted as llama.cpp converts it, written into a real GGUF file with gguf-py's writer,
read back with `read_gguf` and rebuilt by gguf_loader. Both must give the same ids on prompts in many scripts,
with emoji, full-width forms, ligatures, whitespace runs, long text and the chat/media markers ComfyUI's Gemma 4
encoder puts into its templates (each one token).
"""

import copy
import json
import re

import gemma4_tokenizer_fixtures as g4
import pytest
import tokenizer_fixtures as fx
import torch

from gguf_loader import GGUFError, gemma4_tokenizer_json, read_gguf, tokenizer_entries

tokenizers = pytest.importorskip("tokenizers")

TEXTS = fx.PROMPTS + fx.CORPUS_LINES + g4.MARKER_PROMPTS


@pytest.fixture(scope="module")
def original():
    return g4.train_gemma4()


@pytest.fixture(scope="module")
def metadata(original):
    return g4.gemma4_metadata(original)


def rebuilt(metadata, source="gemma4.gguf"):
    return tokenizers.Tokenizer.from_str(gemma4_tokenizer_json(metadata, source).decode("utf-8"))


def assert_same_ids(original, rebuilt_tokenizer):
    for text in TEXTS:
        for special in (False, True):
            expected = original.encode(text, add_special_tokens=special).ids
            assert rebuilt_tokenizer.encode(text, add_special_tokens=special).ids == expected, (special, text[:60])


def test_rebuilt_from_a_gguf_file_tokenizes_like_the_original(tmp_path, original, metadata):
    path = tmp_path / "gemma4.gguf"
    fx.write_tokenizer_gguf(path, metadata, architecture="gemma4")
    gguf_file = read_gguf(path)
    tokenizer = rebuilt(gguf_file.metadata, str(path))
    assert_same_ids(original, tokenizer)
    for text in TEXTS:
        ids = original.encode(text, add_special_tokens=False).ids
        assert tokenizer.decode(ids, skip_special_tokens=False) == original.decode(ids, skip_special_tokens=False)
    # what ComfyUI's Gemma 4 encoder gets from the state dict
    entry = tokenizer_entries(gguf_file.metadata, "gemma4", str(path))["tokenizer_json"]
    assert entry.dtype == torch.uint8 and bytes(entry.tolist()) == gemma4_tokenizer_json(gguf_file.metadata, "x")


def test_markers_are_single_tokens_with_their_ids(original, metadata):
    tokenizer = rebuilt(metadata)
    for marker in g4.SPECIALS + g4.MEDIA_MARKERS + g4.PLAIN_ADDED:
        expected = original.token_to_id(marker)
        assert tokenizer.encode(f"a{marker}b", add_special_tokens=False).ids[1:2] == [expected], marker
    added = {token["content"]: token["special"] for token in json.loads(tokenizer.to_str())["added_tokens"]}
    assert added["<|turn>"] and added["<|image|>"] and not added["<custom_marker>"] and not added["<|channel>"]
    assert "<0x41>" not in added  # byte pieces stay in the BPE vocabulary (matched only as fallback)


def test_space_prefix_when_the_file_asks_for_one(original, metadata):
    """`add_space_prefix` (llama.cpp writes False for Gemma 4) becomes a `▁` prepended before the space replace."""
    prefixed = tokenizers.Tokenizer.from_str(original.to_str())
    prefixed.normalizer = tokenizers.normalizers.Sequence([tokenizers.normalizers.Prepend("\u2581"),
                                                           tokenizers.normalizers.Replace(" ", "\u2581")])
    assert_same_ids(prefixed, rebuilt({**metadata, "tokenizer.ggml.add_space_prefix": True}))
    assert rebuilt(metadata).encode("corgi").ids != prefixed.encode("corgi").ids


def test_a_repeated_token_text_maps_to_its_later_id(metadata):
    """Real Gemma 4 files repeat a few token texts; llama.cpp's token map keeps the later id, and so do we."""
    tokens = list(metadata["tokenizer.ggml.tokens"])
    repeated = tokens.index("<custom_marker>")
    changed = {**metadata, "tokenizer.ggml.tokens": tokens + ["corgi"],
               "tokenizer.ggml.scores": [-1000.0] * (len(tokens) + 1),
               "tokenizer.ggml.token_type": metadata["tokenizer.ggml.token_type"] + [1]}
    tokenizer = rebuilt(changed)
    assert tokenizer.token_to_id("corgi") == len(tokens)
    assert tokenizer.encode("<custom_marker>", add_special_tokens=False).ids == [repeated]


def test_other_tokenizers_are_not_gemma4_and_a_gemma4_file_needs_one(metadata):
    assert gemma4_tokenizer_json({**metadata, "tokenizer.ggml.model": "llama"}) is None
    with pytest.raises(GGUFError, match=r"^g\.gguf: tokenizer\.ggml\.model is 'llama'; a Gemma 4 text encoder"):
        tokenizer_entries({**metadata, "tokenizer.ggml.model": "llama"}, "gemma4", "g.gguf")
    assert tokenizer_entries({}, "gemma4", "g.gguf") == {}  # no tokenizer metadata: nothing to rebuild


def _set(key, index, value):
    def change(metadata):
        if index is None:
            metadata[key] = value
        else:
            metadata[key] = list(metadata[key])
            metadata[key][index] = value
    return change


def _delete(key):
    return lambda metadata: metadata.pop(key)


MALFORMED = {
    "merges missing": (_delete("tokenizer.ggml.merges"), "tokenizer.ggml.merges: missing"),
    "merge not a string": (_set("tokenizer.ggml.merges", 3, 42), r"tokenizer.ggml.merges\[3\]: not a string: 42"),
    "merge without a space": (_set("tokenizer.ggml.merges", 5, "corgi"),
                              r"tokenizer.ggml.merges\[5\]: 'corgi' is not two tokens"),
    "merge of an unknown token": (_set("tokenizer.ggml.merges", 2, "\u2581 qqqq"),
                                  r"tokenizer.ggml.merges\[2\]: .*'qqqq' is not a token"),
    "merge result not a token": (_set("tokenizer.ggml.merges", 4, "<pad> <eos>"),
                                 r"tokenizer.ggml.merges\[4\]: .*'<pad><eos>' is not a token"),
    "huge merge": (_set("tokenizer.ggml.merges", 0, "x" * 100_000 + " y"), r"tokenizer.ggml.merges\[0\]: 'xxx"),
    "bos out of range": (_set("tokenizer.ggml.bos_token_id", None, 10 ** 6),
                         "tokenizer.ggml.bos_token_id: 1000000 is not a token id"),
    "bos missing": (_delete("tokenizer.ggml.bos_token_id"), "tokenizer.ggml.bos_token_id: missing although"),
    "add_bos not a flag": (_set("tokenizer.ggml.add_bos_token", None, "yes"),
                           "tokenizer.ggml.add_bos_token: not a boolean"),
    "token type": (_set("tokenizer.ggml.token_type", 3, 99), r"tokenizer.ggml.token_type\[3\]: 99 is not a token"),
    "token not a string": (_set("tokenizer.ggml.tokens", 2, 7), r"tokenizer.ggml.tokens\[2\]: not a string"),
}


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_malformed_metadata_is_one_clear_error_naming_file_and_key(metadata, case):
    change, message = MALFORMED[case]
    broken = copy.copy(metadata)
    change(broken)
    with pytest.raises(GGUFError) as raised:
        gemma4_tokenizer_json(broken, "gemma4.gguf")
    text = str(raised.value)
    assert text.startswith("gemma4.gguf: ") and "\n" not in text and len(text) < 300, text[:400]
    assert re.search(message, text), text
