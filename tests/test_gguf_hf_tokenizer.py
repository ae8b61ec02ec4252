"""GPT-OSS's tokenizer.json rebuilt from GGUF metadata tokenizes exactly like the original.

The original is trained here with HF `tokenizers` in gpt-oss's structure (o200k split, byte-level BPE, harmony
markers as special added tokens after the vocabulary); its metadata is written the way llama.cpp writes it
(o200k_fixtures.gguf_metadata) into a real GGUF file with gguf-py's writer, read back with `read_gguf` and
rebuilt with `hf_tokenizer_json`. Both must give the same ids on the shared prompt set and on ComfyUI's Lens
chat rendering of each prompt.
"""

import json

import o200k_fixtures as ox
import pytest
import tokenizer_fixtures as fx

from gguf_loader import GGUFError, read_gguf

tokenizers = pytest.importorskip("tokenizers")

from gguf_loader.encoders.gpt_oss_tokenizer import hf_tokenizer_json  # noqa: E402


@pytest.fixture(scope="module")
def original():
    return ox.train_o200k_tokenizer()


@pytest.fixture(scope="module")
def metadata(original):
    return ox.gguf_metadata(original)


@pytest.fixture(scope="module")
def rebuilt(original, metadata, tmp_path_factory):
    path = tmp_path_factory.mktemp("o200k") / "gpt-oss.gguf"
    fx.write_tokenizer_gguf(path, metadata, "gpt-oss")
    return tokenizers.Tokenizer.from_str(hf_tokenizer_json(read_gguf(path).metadata, str(path)).decode("utf-8"))


def ids(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False).ids


def test_the_original_has_gpt_oss_structure(original, metadata):
    types = metadata["tokenizer.ggml.token_type"]
    assert len(metadata["tokenizer.ggml.merges"]) > 1000
    assert types.count(3) == len(ox.HARMONY_SPECIALS) and types.count(4) == 1 and types.count(5) == ox.PADDING
    start = original.token_to_id("<|start|>")
    assert start > max(i for i, kind in enumerate(types) if kind == 1)  # markers follow the BPE ranks


@pytest.mark.parametrize("prompt", fx.PROMPTS, ids=range(len(fx.PROMPTS)))
def test_rebuilt_tokenizer_gives_the_original_ids(original, rebuilt, prompt):
    assert ids(rebuilt, prompt) == ids(original, prompt)
    assert rebuilt.decode(ids(rebuilt, prompt)) == prompt


def test_lens_chat_rendering_tokenizes_the_same(original, rebuilt):
    """What ComfyUI's Lens tokenizer encodes: the harmony chat around each prompt, markers as single tokens."""
    for prompt in fx.PROMPTS:
        text = ox.lens_chat(prompt)
        assert ids(rebuilt, text) == ids(original, text), prompt[:40]
    rendered = ids(rebuilt, ox.lens_chat("a corgi"))
    for marker in ("<|start|>", "<|message|>", "<|end|>", "<|channel|>"):
        assert original.token_to_id(marker) in rendered
    assert ids(rebuilt, "x<|channel|>y") == [*ids(original, "x"), original.token_to_id("<|channel|>"),
                                             *ids(original, "y")]


def test_added_tokens_keep_ids_and_kind(original, rebuilt):
    for token in [*ox.HARMONY_SPECIALS, ox.USER_DEFINED]:
        assert rebuilt.token_to_id(token) == original.token_to_id(token)
    specials = {t.content for t in rebuilt.get_added_tokens_decoder().values() if t.special}
    assert specials == set(ox.HARMONY_SPECIALS)
    assert rebuilt.decode(ids(rebuilt, "a <|end|> b"), skip_special_tokens=True) == \
        original.decode(ids(original, "a <|end|> b"), skip_special_tokens=True)
    assert "[PAD" not in "".join(rebuilt.get_vocab())


# -- malformed metadata -------------------------------------------------------------------------------------

def _changed(metadata, **changes):
    copy = {k: list(v) if isinstance(v, list) else v for k, v in metadata.items()}
    for key, change in changes.items():
        change(copy[f"tokenizer.ggml.{key}"]) if callable(change) else copy.__setitem__(f"tokenizer.ggml.{key}", change)
    return copy


def _set(index, value):
    return lambda items: items.__setitem__(index, value)


MALFORMED = {
    "unknown pre-tokenizer": (dict(pre="llama-bpe"), "tokenizer.ggml.pre: 'llama-bpe' is not a known pre-tokenizer"),
    "no pre-tokenizer": (dict(pre=None), "tokenizer.ggml.pre: None is not a known pre-tokenizer"),
    "not gpt2": (dict(model="llama"), "tokenizer.ggml.model: 'llama'; a tokenizer.json is rebuilt only"),
    "no merges": (dict(merges=None), "tokenizer.ggml.merges: missing or not a non-empty array"),
    "merge of three": (dict(merges=_set(0, "a b c")), "tokenizer.ggml.merges[0]: 'a b c': 'b c' is not a token"),
    "merge not a string": (dict(merges=_set(2, 7)), "tokenizer.ggml.merges[2]: not a string: 7"),
    "merge of unknown tokens": (dict(merges=_set(1, "Ġ zz")),
                                "tokenizer.ggml.merges[1]: 'Ġ zz': 'zz' is not a token of tokenizer.ggml.tokens"),
    "token outside the byte alphabet": (dict(tokens=_set(300, "a b")),
                                        "tokenizer.ggml.tokens[300]: 'a b' is empty or not a byte-level"),
    "duplicate token": (dict(tokens=_set(301, "!")), "tokenizer.ggml.tokens[301]: '!' repeats token 0"),
    "duplicate added token": (dict(token_type=_set(0, 3), tokens=_set(0, "<|end|>")), "repeats token 0"),
    "bad token type": (dict(token_type=_set(5, 9)), "tokenizer.ggml.token_type[5]: 9 is not a token type"),
    "types too short": (dict(token_type=lambda t: t.pop()), "tokenizer.ggml.token_type: has"),
}


@pytest.mark.parametrize("change,message", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_metadata_is_one_clear_error_naming_file_and_key(metadata, change, message):
    with pytest.raises(GGUFError) as error:
        hf_tokenizer_json(_changed(metadata, **change), "model.gguf")
    text = str(error.value)
    assert text.startswith("model.gguf: tokenizer.ggml.") and message in text and "\n" not in text


def test_echo_of_an_untrusted_value_is_bounded(metadata):
    with pytest.raises(GGUFError) as error:
        hf_tokenizer_json(_changed(metadata, pre="x" * 10_000), "model.gguf")
    assert len(str(error.value)) < 200


def test_rebuilt_document_is_plain_json(metadata):
    document = json.loads(hf_tokenizer_json(metadata, "m.gguf"))
    assert document["model"]["ignore_merges"] is False and document["model"]["byte_fallback"] is False
    assert [p["type"] for p in document["pre_tokenizer"]["pretokenizers"]] == ["Split", "ByteLevel"]
