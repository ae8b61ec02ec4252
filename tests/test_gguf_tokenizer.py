"""SentencePiece models rebuilt from GGUF tokenizer metadata encode exactly like the original model.

The reference is a small unigram model trained here with the sentencepiece library; its vocabulary is
turned into the metadata llama.cpp writes for T5/UMT5 ("t5" tokenizers), rebuilt, and both
processors must agree token for token.
"""

import pytest

from gguf_loader import GGUFError
from gguf_loader.tokenizer import sentencepiece_model

spm = pytest.importorskip("sentencepiece")

CORPUS = [
    "A corgi runs along a beach at sunset, waves splashing in slow motion.",
    "Ein Corgi läuft bei Sonnenuntergang am Strand entlang.",
    "一只柯基犬在日落时沿着海滩奔跑。",
    "Un corgi court le long d'une plage au coucher du soleil.",
    "ＦＵＬＬ　ＷＩＤＴＨ letters and numbers １２３ should normalise.",
    "The quick brown fox jumps over the lazy dog 42 times!",
] * 40
SAMPLES = ["a corgi at sunset", "Ein Strand!", "柯基犬 and a fox", "ＦＵＬＬ width １２３", "  extra   spaces  ",
           "unseen words: zyxwv qqq"]


def train(tmp_path, normalization: str):
    prefix = tmp_path / f"m_{normalization}"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_prefix=str(prefix), vocab_size=100,
                                   model_type="unigram", normalization_rule_name=normalization,
                                   character_coverage=1.0, pad_id=3, minloglevel=2)
    return spm.SentencePieceProcessor(model_file=f"{prefix}.model")


def _type_of(sp, i):
    for code, test in ((2, sp.is_unknown), (3, sp.is_control), (5, sp.is_unused), (6, sp.is_byte)):
        if test(i):
            return code
    return 1


def gguf_metadata(sp, charsmap: bytes = b"") -> dict:
    """What llama.cpp's converter writes for a T5-family SentencePiece tokenizer."""
    size = sp.get_piece_size()
    return {
        "tokenizer.ggml.model": "t5",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(size)],
        "tokenizer.ggml.scores": [sp.get_score(i) for i in range(size)],
        "tokenizer.ggml.token_type": [_type_of(sp, i) for i in range(size)],
        "tokenizer.ggml.unknown_token_id": sp.unk_id(),
        "tokenizer.ggml.bos_token_id": sp.bos_id(),
        "tokenizer.ggml.eos_token_id": sp.eos_id(),
        "tokenizer.ggml.padding_token_id": sp.pad_id(),
        "tokenizer.ggml.add_space_prefix": True,
        "tokenizer.ggml.remove_extra_whitespaces": True,
        "tokenizer.ggml.precompiled_charsmap": list(charsmap),
    }


def normalizer_charsmap(serialized: bytes) -> bytes:
    """Field 3 (NormalizerSpec) → field 2 (precompiled_charsmap) of a serialized ModelProto; an independent
    minimal protobuf reader, so the test does not share the code under test."""
    def fields(data):
        pos = 0
        while pos < len(data):
            key, pos = varint(data, pos)
            number, wire = key >> 3, key & 7
            if wire == 0:
                value, pos = varint(data, pos)
            elif wire == 5:
                value, pos = data[pos:pos + 4], pos + 4
            elif wire == 2:
                length, pos = varint(data, pos)
                value, pos = data[pos:pos + length], pos + length
            else:
                raise AssertionError(f"unexpected wire type {wire}")
            yield number, value

    def varint(data, pos):
        result = shift = 0
        while True:
            byte = data[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return result, pos

    normalizer = next(v for n, v in fields(serialized) if n == 3)
    return next((v for n, v in fields(normalizer) if n == 2), b"")


@pytest.mark.parametrize("normalization", ["identity", "nmt_nfkc"])
def test_rebuilt_model_tokenizes_like_the_original(tmp_path, normalization):
    original = train(tmp_path, normalization)
    charsmap = normalizer_charsmap(original.serialized_model_proto()) if normalization != "identity" else b""
    assert bool(charsmap) == (normalization != "identity")
    rebuilt = spm.SentencePieceProcessor(model_proto=sentencepiece_model(gguf_metadata(original, charsmap)))
    assert rebuilt.get_piece_size() == original.get_piece_size()
    for text in SAMPLES + CORPUS[:6]:
        assert rebuilt.encode(text) == original.encode(text), text
    assert (rebuilt.unk_id(), rebuilt.bos_id(), rebuilt.eos_id(), rebuilt.pad_id()) == \
        (original.unk_id(), original.bos_id(), original.eos_id(), original.pad_id())


def test_other_tokenizer_kinds_are_not_rebuilt():
    assert sentencepiece_model({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"]}) is None
    assert sentencepiece_model({}) is None


def test_inconsistent_vocabulary_is_a_clear_error():
    metadata = {"tokenizer.ggml.model": "t5", "tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.scores": [0.0]}
    with pytest.raises(GGUFError, match="umt5.gguf: tokenizer has 2 tokens, 1 scores"):
        sentencepiece_model(metadata, "umt5.gguf")
    with pytest.raises(GGUFError, match="tokens is missing"):
        sentencepiece_model({"tokenizer.ggml.model": "t5"}, "umt5.gguf")
