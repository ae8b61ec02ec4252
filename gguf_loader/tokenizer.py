"""SentencePiece models rebuilt from a GGUF file's tokenizer metadata (llama.cpp's "t5" unigram vocab).

ComfyUI's UMT5 encoder (Wan) tokenizes with the serialized SentencePiece model it finds under
`spiece_model` in the text encoder's state dict; a GGUF file carries the same vocabulary as
`tokenizer.ggml.*` metadata instead. The ModelProto is written here with a few lines of protobuf
wire format, so neither `protobuf` nor `sentencepiece_model_pb2` is needed (ComfyUI ships without
protobuf).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

from .errors import GGUFError

# sentencepiece_model.proto field numbers (ModelProto, SentencePiece, TrainerSpec, NormalizerSpec).
_MODEL_PIECES, _MODEL_TRAINER, _MODEL_NORMALIZER = 1, 2, 3
_PIECE_TEXT, _PIECE_SCORE, _PIECE_TYPE = 1, 2, 3
_TRAINER_MODEL_TYPE, _TRAINER_VOCAB_SIZE = 3, 4
_TRAINER_UNK, _TRAINER_BOS, _TRAINER_EOS, _TRAINER_PAD = 40, 41, 42, 43
_NORMALIZER_NAME, _NORMALIZER_CHARSMAP, _NORMALIZER_DUMMY_PREFIX = 1, 2, 3
_NORMALIZER_REMOVE_SPACES, _NORMALIZER_ESCAPE_SPACES = 4, 5
_UNIGRAM = 1
_NORMAL_PIECE = 1  # llama.cpp token types use SentencePiece's numbering (1 normal ... 6 byte)


def sentencepiece_model(metadata: Mapping, source: str = "tokenizer") -> bytes | None:
    """The serialized SentencePiece ModelProto of a "t5" (unigram) GGUF tokenizer, or None for other kinds.

    Args:
        metadata: the file's metadata (`tokenizer.ggml.tokens`, `.scores`, `.token_type`, special ids,
            `.add_space_prefix`, `.remove_extra_whitespaces`, `.precompiled_charsmap`).
        source: the file name, for error messages.

    Raises:
        GGUFError: the vocabulary arrays are missing or disagree in length.
    """
    if metadata.get("tokenizer.ggml.model") != "t5":
        return None
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not tokens:
        raise GGUFError(f"{source}: tokenizer.ggml.model is 't5' but tokenizer.ggml.tokens is missing or empty")
    scores = metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = metadata.get("tokenizer.ggml.token_type") or [_NORMAL_PIECE] * len(tokens)
    if not len(tokens) == len(scores) == len(types):
        raise GGUFError(f"{source}: tokenizer has {len(tokens)} tokens, {len(scores)} scores and {len(types)} "
                        "token types; they must be equally long")
    pieces = b"".join(_message(_MODEL_PIECES, _string(_PIECE_TEXT, t) + _float(_PIECE_SCORE, s) +
                               _varint_field(_PIECE_TYPE, int(k))) for t, s, k in zip(tokens, scores, types))
    return pieces + _message(_MODEL_TRAINER, _trainer_spec(metadata, len(tokens))) + \
        _message(_MODEL_NORMALIZER, _normalizer_spec(metadata))


def _trainer_spec(metadata: Mapping, vocab_size: int) -> bytes:
    spec = _varint_field(_TRAINER_MODEL_TYPE, _UNIGRAM) + _varint_field(_TRAINER_VOCAB_SIZE, vocab_size)
    for field, key in ((_TRAINER_UNK, "unknown_token_id"), (_TRAINER_BOS, "bos_token_id"),
                       (_TRAINER_EOS, "eos_token_id"), (_TRAINER_PAD, "padding_token_id")):
        value = metadata.get(f"tokenizer.ggml.{key}")
        spec += _varint_field(field, -1 if value is None else int(value))
    return spec


def _normalizer_spec(metadata: Mapping) -> bytes:
    charsmap = bytes(metadata.get("tokenizer.ggml.precompiled_charsmap") or b"")
    spec = _string(_NORMALIZER_NAME, "nmt_nfkc" if charsmap else "identity")
    if charsmap:
        spec += _bytes(_NORMALIZER_CHARSMAP, charsmap)
    spec += _varint_field(_NORMALIZER_DUMMY_PREFIX, int(bool(metadata.get("tokenizer.ggml.add_space_prefix", True))))
    spec += _varint_field(_NORMALIZER_REMOVE_SPACES,
                          int(bool(metadata.get("tokenizer.ggml.remove_extra_whitespaces", True))))
    return spec + _varint_field(_NORMALIZER_ESCAPE_SPACES, 1)


def _varint(value: int) -> bytes:
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


def _float(field: int, value: float) -> bytes:
    return _key(field, 5) + struct.pack("<f", value)


def _bytes(field: int, value: bytes) -> bytes:
    return _key(field, 2) + _varint(len(value)) + value


def _string(field: int, value: str) -> bytes:
    return _bytes(field, value.encode("utf-8"))


def _message(field: int, payload: bytes) -> bytes:
    return _bytes(field, payload)
