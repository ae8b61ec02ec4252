"""Tokenizers rebuilt from GGUF metadata tokenize exactly like the original vocabulary.

The originals are built here (tokenizer_fixtures.py): SentencePiece models trained on a small corpus
(unigram with and without byte pieces like T5/UMT5, BPE like Gemma) and a tekken-style (Mistral)
vocabulary learned by byte-pair merging. Their metadata is written the way llama.cpp writes it, into
a real GGUF file with gguf-py's writer, read back with `read_gguf` and rebuilt; both tokenizers must
agree token for token on prompts in many scripts, with emoji, full-width forms, ligatures,
whitespace runs and long text.
"""

import json
import re

import pytest
import tokenizer_fixtures as fx

from gguf_loader import GGUFError, read_gguf, sentencepiece_model, tekken_model

spm = pytest.importorskip("sentencepiece")
model_pb2 = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")

PADDING = 7  # llama.cpp pads the vocabulary to the embedding size with UNUSED "[PADn]" tokens


@pytest.fixture(scope="module")
def umt5_byte():
    return fx.train_sentencepiece("unigram", byte_fallback=True)


@pytest.fixture(scope="module")
def umt5_plain():
    return fx.train_sentencepiece("unigram", byte_fallback=False)


@pytest.fixture(scope="module")
def gemma():
    return fx.train_sentencepiece("bpe", byte_fallback=True, normalization="identity", gemma_layout=True)


def rebuilt_from_file(tmp_path, metadata, architecture="t5"):
    path = tmp_path / "encoder.gguf"
    fx.write_tokenizer_gguf(path, metadata, architecture)
    proto = sentencepiece_model(read_gguf(path).metadata, str(path))
    return spm.SentencePieceProcessor(model_proto=proto), proto


def assert_same_tokens(original, rebuilt, **options):
    for text in fx.PROMPTS + fx.CORPUS_LINES:
        assert rebuilt.encode(text, **options) == original.encode(text, **options), text[:60]


def parsed(proto: bytes):
    model = model_pb2.ModelProto()
    model.ParseFromString(proto)
    return model


@pytest.mark.parametrize("byte_pieces", [True, False], ids=["byte-pieces", "no-byte-pieces"])
def test_umt5_style_vocabulary_tokenizes_like_the_original(tmp_path, umt5_byte, umt5_plain, byte_pieces):
    """Regression: a vocabulary with the 256 <0xNN> pieces (mT5/UMT5) failed to load ("byte piece <0x00> is found
    although byte_fallback is false"); one without them must load too (ComfyUI-GGUF always sets byte fallback)."""
    original = umt5_byte if byte_pieces else umt5_plain
    assert any(original.is_byte(i) for i in range(original.get_piece_size())) == byte_pieces
    rebuilt, proto = rebuilt_from_file(tmp_path, fx.t5_metadata(original, original.get_piece_size() + PADDING))
    assert rebuilt.get_piece_size() == original.get_piece_size() + PADDING
    assert parsed(proto).trainer_spec.byte_fallback == byte_pieces
    assert_same_tokens(original, rebuilt)
    assert_same_tokens(original, rebuilt, add_eos=True)  # ComfyUI's UMT5 tokenizer appends </s>
    assert (rebuilt.unk_id(), rebuilt.bos_id(), rebuilt.eos_id(), rebuilt.pad_id()) == \
        (original.unk_id(), original.bos_id(), original.eos_id(), original.pad_id())


def test_normalization_table_is_kept(tmp_path, umt5_plain):
    """Full-width letters, ligatures and compatibility characters depend on the precompiled charsmap."""
    rebuilt, proto = rebuilt_from_file(tmp_path, fx.t5_metadata(umt5_plain))
    charsmap = fx.normalizer_spec(umt5_plain)["precompiled_charsmap"]
    assert charsmap and parsed(proto).normalizer_spec.precompiled_charsmap == charsmap
    assert rebuilt.encode("ＦＵＬＬ ﬁne") == umt5_plain.encode("ＦＵＬＬ ﬁne") == umt5_plain.encode("FULL fine")


def test_identity_normalization(tmp_path):
    original = fx.train_sentencepiece("unigram", byte_fallback=False, normalization="identity")
    rebuilt, proto = rebuilt_from_file(tmp_path, fx.t5_metadata(original))
    assert not parsed(proto).normalizer_spec.precompiled_charsmap
    assert_same_tokens(original, rebuilt)


def test_gemma_style_vocabulary_tokenizes_like_the_original(tmp_path, gemma):
    """SentencePiece BPE ("llama" in GGUF) as Gemma uses it: BOS/EOS named <bos>/<eos>, turn markers and
    whitespace runs as user-defined pieces (llama.cpp stores those as CONTROL or with plain spaces)."""
    metadata = fx.gemma_metadata(gemma, gemma.get_piece_size() + PADDING)
    types = metadata["tokenizer.ggml.token_type"]
    assert types[gemma.piece_to_id("<start_of_turn>")] == 3 and "  " in metadata["tokenizer.ggml.tokens"]
    rebuilt, proto = rebuilt_from_file(tmp_path, metadata, "gemma3")
    assert parsed(proto).trainer_spec.model_type == model_pb2.TrainerSpec.BPE
    assert_same_tokens(gemma, rebuilt)
    assert_same_tokens(gemma, rebuilt, add_bos=True)  # ComfyUI's Gemma tokenizers prepend <bos>
    assert rebuilt.encode("<start_of_turn>user\n  hi") == gemma.encode("<start_of_turn>user\n  hi")
    assert (rebuilt.bos_id(), rebuilt.eos_id(), rebuilt.pad_id(), rebuilt.unk_id()) == (2, 1, 0, 3)


def test_only_sentencepiece_vocabularies_are_rebuilt():
    assert sentencepiece_model({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"]}) is None
    assert sentencepiece_model({}) is None


# -- malformed metadata -------------------------------------------------------------------------------------

def _small_t5() -> dict:
    tokens = ["<pad>", "</s>", "<unk>", "\u2581a", "b"]
    return {"tokenizer.ggml.model": "t5", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": [0.0] * 5,
            "tokenizer.ggml.token_type": [3, 3, 2, 1, 1], "tokenizer.ggml.eos_token_id": 1}


BAD_METADATA = [
    ({"tokenizer.ggml.tokens": None}, r"tokens: missing or not a non-empty array \(got None\)"),
    ({"tokenizer.ggml.tokens": ["<pad>", "</s>", "<unk>", 5, "b"]}, r"tokens\[3\]: not a string: 5"),
    ({"tokenizer.ggml.scores": None}, r"scores: missing or not an array"),
    ({"tokenizer.ggml.scores": [0.0] * 4}, r"scores: has 4 items for 5 tokens"),
    ({"tokenizer.ggml.scores": [0.0, 0.0, float("nan"), 0.0, 0.0]}, r"scores\[2\]: not a finite float32: nan"),
    ({"tokenizer.ggml.scores": [0.0, 0.0, 0.0, 1e300, 0.0]}, r"scores\[3\]: not a finite float32: 1e\+300"),
    ({"tokenizer.ggml.token_type": [3, 3, 2, 1]}, r"token_type: has 4 items for 5 tokens"),
    ({"tokenizer.ggml.token_type": [3, 3, 2, 9, 1]}, r"token_type\[3\]: 9 is not a token type \(1\.\.6\)"),
    ({"tokenizer.ggml.token_type": [3, 3, 1, 1, 1]}, r"token_type: needs exactly one UNKNOWN \(2\) token, found 0"),
    ({"tokenizer.ggml.token_type": [3, 2, 2, 1, 1]}, r"token_type: needs exactly one UNKNOWN \(2\) token, found 2"),
    ({"tokenizer.ggml.eos_token_id": 5}, r"eos_token_id: 5 is not a token id \(0\.\.4\)"),
    ({"tokenizer.ggml.eos_token_id": "1"}, r"eos_token_id: '1' is not a token id"),
    ({"tokenizer.ggml.tokens": ["<pad>", "</s>", "<unk>", "b", "b"]}, r"tokens\[4\]: 'b' repeats token 3"),
    ({"tokenizer.ggml.tokens": ["<pad>", "</s>", "<unk>", "", "b"]}, r"tokens\[3\]: '' cannot be a SentencePiece"),
    ({"tokenizer.ggml.tokens": ["<pad>", "</s>", "<unk>", "a\0", "b"]}, r"tokens\[3\]: 'a\\x00' cannot be"),
    ({"tokenizer.ggml.token_type": [3, 3, 2, 6, 1]}, r"tokens\[3\]: BYTE token '▁a' is not of the form <0xNN>"),
    ({"tokenizer.ggml.tokens": ["<pad>", "</s>", "<unk>", "<0x41>", "b"], "tokenizer.ggml.token_type": [3, 3, 2, 6, 1]},
     r"token_type: 1 of the 256 BYTE tokens"),
    ({"tokenizer.ggml.precompiled_charsmap": [1, 2, 999]}, r"precompiled_charsmap: not an array of bytes"),
    ({"tokenizer.ggml.add_space_prefix": "yes"}, r"add_space_prefix: not a boolean: 'yes'"),
]


@pytest.mark.parametrize("change, message", BAD_METADATA, ids=[m for _, m in BAD_METADATA])
def test_malformed_metadata_is_one_clear_error_naming_file_and_key(change, message):
    metadata = {**_small_t5(), **change}
    metadata = {k: v for k, v in metadata.items() if v is not None}
    with pytest.raises(GGUFError, match=r"^bad\.gguf: tokenizer\.ggml\." + message) as caught:
        sentencepiece_model(metadata, "bad.gguf")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("long_tokens, message", [
    (["x" * 5_000, "x" * 5_000], r"tokens\[4\]: 'x{38}… repeats token 3$"),
    (["x" * 100_000, "b"], r"tokens\[3\]: 'x{38}… cannot be a SentencePiece piece \(empty, NUL or too long\)$"),
])
def test_echo_of_an_untrusted_value_is_bounded(long_tokens, message):
    metadata = {**_small_t5(), "tokenizer.ggml.tokens": ["<pad>", "</s>", "<unk>", *long_tokens]}
    with pytest.raises(GGUFError, match=message) as caught:
        sentencepiece_model(metadata, "bad.gguf")
    assert len(str(caught.value)) < 140


def test_the_small_vocabulary_itself_is_valid():
    sp = spm.SentencePieceProcessor(model_proto=sentencepiece_model(_small_t5(), "ok.gguf"))
    assert sp.get_piece_size() == 5 and sp.eos_id() == 1 and sp.unk_id() == 2


def test_unknown_token_typed_normal_is_taken_from_the_declared_id():
    metadata = {**_small_t5(), "tokenizer.ggml.token_type": [3, 3, 1, 1, 1], "tokenizer.ggml.unknown_token_id": 2}
    assert spm.SentencePieceProcessor(model_proto=sentencepiece_model(metadata, "ok.gguf")).unk_id() == 2


# -- tekken (Mistral) -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tekken_original():
    return fx.tekken_json(fx.learn_tekken_ranks())


def tekken_table(document: bytes) -> tuple[dict, list, int, int]:
    """What a tekken reader uses: model ranks (bytes -> rank), specials, vocabulary size, number of specials."""
    import base64

    data = json.loads(document)
    config = data["config"]
    specials = [(s["rank"], s["token_str"]) for s in data["special_tokens"]]
    limit = config["default_vocab_size"] - config["default_num_special_tokens"]
    ranks = {base64.b64decode(v["token_bytes"]): v["rank"] for v in data["vocab"] if v["rank"] < limit}
    return ranks, specials, config["default_vocab_size"], config["default_num_special_tokens"]


def test_tekken_vocabulary_round_trips_through_a_gguf_file(tmp_path, tekken_original):
    path = tmp_path / "mistral.gguf"
    fx.write_tokenizer_gguf(path, fx.tekken_metadata(tekken_original), "llama")
    rebuilt = tekken_model(read_gguf(path).metadata, str(path))
    assert tekken_table(rebuilt) == tekken_table(tekken_original)
    assert len(json.loads(rebuilt)["special_tokens"]) == len(fx.TEKKEN_SPECIALS)  # readers that count them


def test_tekken_padding_tokens_are_not_vocabulary(tekken_original):
    metadata = fx.tekken_metadata(tekken_original)
    metadata["tokenizer.ggml.tokens"] += ["[PAD900]", "[PAD901]"]
    metadata["tokenizer.ggml.token_type"] += [5, 5]
    assert tekken_table(tekken_model(metadata, "m.gguf")) == tekken_table(tekken_original)


def test_pixtral_pre_tokenizer_is_tekken_and_other_gpt2_vocabularies_are_not(tekken_original):
    metadata = fx.tekken_metadata(tekken_original)
    assert tekken_model({**metadata, "tokenizer.ggml.pre": "pixtral"}, "m.gguf") is not None
    assert tekken_model({**metadata, "tokenizer.ggml.pre": "llama-bpe"}, "m.gguf") is None
    assert tekken_model({**metadata, "tokenizer.ggml.model": "llama"}, "m.gguf") is None


def _small_tekken(tokens, types) -> dict:
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "tekken", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types}


@pytest.mark.parametrize("tokens, types, message", [
    (["<s>", "a", "b"], [1, 1, 1], r"token_type: tekken special \(CONTROL\) tokens must come first; none at the start"),
    (["<s>", "a", "</s>"], [3, 1, 3], r"token_type: .* token 2 follows ordinary tokens"),
    (["<s>", "a b", "c"], [3, 1, 1], r"tokens\[1\]: 'a b' is empty or not a byte-level"),
    (["<s>", "", "c"], [3, 1, 1], r"tokens\[1\]: '' is empty or not a byte-level"),
    (["<s>", "ab", "ab"], [3, 1, 1], r"tokens\[2\]: 'ab' repeats token 1"),
    (["<s>", "a"], [3, 1, 1], r"token_type: has 3 items for 2 tokens"),
])
def test_malformed_tekken_metadata(tokens, types, message):
    with pytest.raises(GGUFError, match=r"^m\.gguf: tokenizer\.ggml\." + message):
        tekken_model(_small_tekken(tokens, types), "m.gguf")


def test_byte_level_spelling_covers_all_256_bytes():
    encode = fx.byte_to_unicode()
    tokens = ["<s>"] + ["".join(encode[b] for b in bytes([i, 255 - i])) for i in range(256)]
    table, _, size, specials = tekken_table(tekken_model(_small_tekken(tokens, [3] + [1] * 256), "m.gguf"))
    assert table == {bytes([i, 255 - i]): i for i in range(256)} and (size, specials) == (257, 1)
    assert not re.search(r"\s", "".join(tokens[1:]))  # the alphabet has no whitespace characters
