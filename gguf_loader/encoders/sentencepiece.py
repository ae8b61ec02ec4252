"""SentencePiece models rebuilt from a GGUF file's tokenizer metadata (T5/UMT5 and Gemma 1-3 share them).

ComfyUI's UMT5 (Wan), Gemma 2/3 (Lumina 2, NewBie, LTX-2) and UMT5-base (ACE) encoders tokenize with
the serialized SentencePiece model they find under `spiece_model` in the text encoder's state dict;
a GGUF file carries the same vocabulary as `tokenizer.ggml.*` metadata instead. llama.cpp writes
SentencePiece unigram vocabularies (T5/UMT5) as tokenizer model "t5" and SentencePiece BPE ones
(Llama 2, Gemma) as "llama". The ModelProto is written here with a few lines of protobuf wire format,
so neither `protobuf` nor `sentencepiece_model_pb2` is needed (ComfyUI ships without protobuf).

What the conversion to GGUF lost and how it is restored:

* `byte_fallback`: on when the vocabulary has BYTE pieces (`<0x00>` ... `<0xFF>`: the mT5/UMT5 and
  Gemma layout). SentencePiece refuses byte pieces without it and falls back to `<unk>` with it off.
* special pieces: SentencePiece finds BOS/EOS/PAD by *name* (`TrainerSpec.bos_piece`, default "<s>"),
  so the names are taken from the tokens at the ids the file declares (Gemma's are "<bos>", "<eos>").
* user-defined pieces: llama.cpp stores them with plain spaces ("pre-normalized" for its own matcher);
  SentencePiece matches them after escaping spaces to U+2581, so the U+2581 form is restored.
* "llama" vocabularies: llama.cpp types every added token the model card marks special (or that looks
  special, like `<start_of_turn>`) as CONTROL, although in the SentencePiece model such tokens are
  user-defined and are matched in the text. Only the declared special tokens (BOS, EOS, PAD) stay
  control pieces; the others are user-defined again.
* the normalization table (`precompiled_charsmap`, T5/UMT5) is kept; without it full-width letters,
  ligatures and compatibility characters tokenize differently.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

from gguf import Keys, TokenType

from ..vocab import Vocabulary, echo, flag, read_vocabulary, special_token_id, tokenizer_error

# sentencepiece_model.proto field numbers (ModelProto, SentencePiece, TrainerSpec, NormalizerSpec).
_MODEL_PIECES, _MODEL_TRAINER, _MODEL_NORMALIZER = 1, 2, 3
_PIECE_TEXT, _PIECE_SCORE, _PIECE_TYPE = 1, 2, 3
_TRAINER_MODEL_TYPE, _TRAINER_VOCAB_SIZE, _TRAINER_BYTE_FALLBACK = 3, 4, 35
_TRAINER_IDS = {"unk": 40, "bos": 41, "eos": 42, "pad": 43}
_TRAINER_PIECES = {"unk": 45, "bos": 46, "eos": 47, "pad": 48}
_NORMALIZER_NAME, _NORMALIZER_CHARSMAP, _NORMALIZER_DUMMY_PREFIX = 1, 2, 3
_NORMALIZER_REMOVE_SPACES, _NORMALIZER_ESCAPE_SPACES = 4, 5

UNIGRAM, BPE = 1, 2
# llama.cpp tokenizer model -> SentencePiece model type.
_MODEL_TYPES = {"t5": UNIGRAM, "llama": BPE}
_SPECIAL_KEYS = {"unk": Keys.Tokenizer.UNK_ID, "bos": Keys.Tokenizer.BOS_ID, "eos": Keys.Tokenizer.EOS_ID,
                 "pad": Keys.Tokenizer.PAD_ID}
_SPACE, _ESCAPED_SPACE = " ", "\u2581"
_MAX_PIECE_BYTES = 8000  # SentencePiece refuses longer pieces
_NORMAL, _UNKNOWN, _CONTROL = int(TokenType.NORMAL), int(TokenType.UNKNOWN), int(TokenType.CONTROL)
_USER_DEFINED, _BYTE = int(TokenType.USER_DEFINED), int(TokenType.BYTE)


def sentencepiece_model(metadata: Mapping, source: str = "tokenizer") -> bytes | None:
    """The serialized SentencePiece ModelProto of a "t5" (unigram) or "llama" (BPE) GGUF tokenizer.

    Args:
        metadata: the file's metadata (`tokenizer.ggml.tokens`, `.scores`, `.token_type`, the special
            token ids, `.add_space_prefix`, `.remove_extra_whitespaces`, `.precompiled_charsmap`).
        source: the file name, for error messages.

    Returns:
        The ModelProto bytes (what `SentencePieceProcessor(model_proto=...)` loads), or None for other
        tokenizer models (gpt2 BPE, ...).

    Raises:
        GGUFError: malformed tokenizer metadata; the message names the file and the key.

    Example:
        >>> f = read_gguf("umt5-xxl-encoder-Q8_0.gguf")  # doctest: +SKIP
        >>> sp = sentencepiece.SentencePieceProcessor(model_proto=sentencepiece_model(f.metadata, f.path))
    """
    model_type = _MODEL_TYPES.get(metadata.get(Keys.Tokenizer.MODEL))
    if model_type is None:
        return None
    vocab = read_vocabulary(metadata, source, with_scores=True)
    specials = {name: special_token_id(metadata, key, vocab) for name, key in _SPECIAL_KEYS.items()}
    texts, types = _pieces(vocab, model_type, specials)
    _check_pieces(texts, types, vocab.source)
    trainer = _trainer_spec(model_type, texts, types, specials)
    return _pieces_message(texts, vocab.scores, types) + _message(_MODEL_TRAINER, trainer) + \
        _message(_MODEL_NORMALIZER, _normalizer_spec(metadata, source))


def _pieces(vocab: Vocabulary, model_type: int, specials: dict[str, int | None]) -> tuple[list[str], list[int]]:
    texts, types = list(vocab.tokens), list(vocab.types)
    if model_type == BPE:
        declared = {i for i in specials.values() if i is not None}
        types = [_USER_DEFINED if kind == _CONTROL and i not in declared else kind for i, kind in enumerate(types)]
    if _UNKNOWN not in types and specials["unk"] is not None:
        types[specials["unk"]] = _UNKNOWN  # typed NORMAL by some converters; SentencePiece needs one
    texts = [text.replace(_SPACE, _ESCAPED_SPACE) if kind == _USER_DEFINED else text
             for text, kind in zip(texts, types)]
    return texts, types


def _check_pieces(texts: list[str], types: list[int], source: str) -> None:
    """What SentencePiece would refuse when loading the model, reported against the GGUF key."""
    key = Keys.Tokenizer.LIST
    seen: dict[str, int] = {}
    for index, text in enumerate(texts):
        if not text or "\0" in text or len(text.encode("utf-8")) >= _MAX_PIECE_BYTES:
            raise tokenizer_error(source, f"{key}[{index}]", f"{echo(text)} cannot be a SentencePiece piece "
                                                             "(empty, NUL or too long)")
        first = seen.setdefault(text, index)
        if first != index:
            raise tokenizer_error(source, f"{key}[{index}]", f"{echo(text)} repeats token {first}")
    unknown = [i for i, kind in enumerate(types) if kind == _UNKNOWN]
    if len(unknown) != 1:
        raise tokenizer_error(source, Keys.Tokenizer.TOKEN_TYPE,
                              f"needs exactly one UNKNOWN ({_UNKNOWN}) token, found {len(unknown)}")
    _check_byte_pieces(texts, types, source)


def _check_byte_pieces(texts: list[str], types: list[int], source: str) -> None:
    found = set()
    for index, (text, kind) in enumerate(zip(texts, types)):
        if kind != _BYTE:
            continue
        value = _byte_of(text)
        if value is None:
            raise tokenizer_error(source, f"{Keys.Tokenizer.LIST}[{index}]",
                                  f"BYTE token {echo(text)} is not of the form <0xNN>")
        found.add(value)
    if found and len(found) != 256:
        raise tokenizer_error(source, Keys.Tokenizer.TOKEN_TYPE, f"{len(found)} of the 256 BYTE tokens "
                                                                 "<0x00>..<0xFF> present; byte fallback needs all")


def _byte_of(text: str) -> int | None:
    if len(text) != 6 or not text.startswith("<0x") or not text.endswith(">"):
        return None
    digits = text[3:5]
    if digits != digits.upper() or any(c not in "0123456789ABCDEF" for c in digits):
        return None
    return int(digits, 16)


def _trainer_spec(model_type: int, texts: list[str], types: list[int], specials: dict[str, int | None]) -> bytes:
    spec = _varint_field(_TRAINER_MODEL_TYPE, model_type) + _varint_field(_TRAINER_VOCAB_SIZE, len(texts))
    if _BYTE in types:
        spec += _varint_field(_TRAINER_BYTE_FALLBACK, 1)
    for name, index in specials.items():
        spec += _varint_field(_TRAINER_IDS[name], -1 if index is None else index)
    for name, index in specials.items():
        if index is not None:  # SentencePiece resolves BOS/EOS/PAD by these names at run time
            spec += _string(_TRAINER_PIECES[name], texts[index])
    return spec


def _normalizer_spec(metadata: Mapping, source: str) -> bytes:
    charsmap = _charsmap(metadata, source)
    spec = _string(_NORMALIZER_NAME, "nmt_nfkc" if charsmap else "identity")
    if charsmap:
        spec += _bytes(_NORMALIZER_CHARSMAP, charsmap)
    # llama.cpp's defaults when a key is absent: a space prefix, extra whitespace kept.
    spec += _varint_field(_NORMALIZER_DUMMY_PREFIX, int(flag(metadata, Keys.Tokenizer.ADD_PREFIX, True, source)))
    spec += _varint_field(_NORMALIZER_REMOVE_SPACES,
                          int(flag(metadata, Keys.Tokenizer.REMOVE_EXTRA_WS, False, source)))
    return spec + _varint_field(_NORMALIZER_ESCAPE_SPACES, 1)


def _charsmap(metadata: Mapping, source: str) -> bytes:
    key = Keys.Tokenizer.PRECOMPILED_CHARSMAP
    value = metadata.get(key)
    if value is None:
        return b""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    # gguf-py writes it as UINT8 items; older writers used INT8.
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and -128 <= v <= 255
                                       for v in value):
        return bytes(v & 0xFF for v in value)
    raise tokenizer_error(source, key, f"not an array of bytes: {echo(value)}")


# -- protobuf wire format -----------------------------------------------------------------------------

def _pieces_message(texts: list[str], scores: tuple[float, ...], types: list[int]) -> bytes:
    """Every `pieces` entry of the ModelProto; the hot loop of 250k-token vocabularies, so keys are constants,
    scores are packed at once and types (1..6) are one-byte varints."""
    text_key, score_key, type_key, piece_key = (_key(_PIECE_TEXT, 2), _key(_PIECE_SCORE, 5), _key(_PIECE_TYPE, 0),
                                                _key(_MODEL_PIECES, 2))
    packed = struct.pack(f"<{len(scores)}f", *scores)
    out = []
    for index, (text, kind) in enumerate(zip(texts, types)):
        raw = text.encode("utf-8")
        body = b"".join((text_key, _varint(len(raw)), raw, score_key, packed[4 * index:4 * index + 4], type_key,
                         bytes((kind,))))
        out.append(piece_key + _varint(len(body)) + body)
    return b"".join(out)


def _varint(value: int) -> bytes:
    if 0 <= value < 0x80:
        return bytes((value,))
    value &= (1 << 64) - 1  # negative int32/int64 values are written as 64-bit two's complement
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _varint_field(field: int, value: int) -> bytes:
    return _key(field, 0) + _varint(value)


def _bytes(field: int, value: bytes) -> bytes:
    return _key(field, 2) + _varint(len(value)) + value


def _string(field: int, value: str) -> bytes:
    return _bytes(field, value.encode("utf-8"))


def _message(field: int, payload: bytes) -> bytes:
    return _bytes(field, payload)
