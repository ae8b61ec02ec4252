"""The vocabulary arrays of a GGUF file's tokenizer metadata (`tokenizer.ggml.*`), read and checked once.

llama.cpp's converters write a vocabulary as three parallel arrays: the token texts, their scores
(SentencePiece log probabilities or merge ranks) and their types, which use SentencePiece's numbering
(`gguf.TokenType`: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte). Everything that
rebuilds a tokenizer from them goes through `read_vocabulary`, so a malformed array is reported the
same way everywhere: one line naming the file, the key and, where it helps, the index and a short
echo of the offending value.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from gguf import Keys, TokenType

from .errors import GGUFError

_ECHO_CHARS = 40
_FLOAT32_MAX = 3.4028234663852886e38
VALID_TYPES = frozenset(int(t) for t in TokenType)


@dataclass(frozen=True)
class Vocabulary:
    """Token texts, scores (None when the file has none) and types, all of the same length."""

    tokens: tuple[str, ...]
    scores: tuple[float, ...] | None
    types: tuple[int, ...]
    source: str  # the file, for error messages

    def __len__(self) -> int:
        return len(self.tokens)


def echo(value: object) -> str:
    """A short, printable rendering of an untrusted value for an error message."""
    text = repr(value)
    return text if len(text) <= _ECHO_CHARS else text[:_ECHO_CHARS - 1] + "…"


def tokenizer_error(source: str, key: str, problem: str) -> GGUFError:
    return GGUFError(f"{source}: {key}: {problem}")


def read_vocabulary(metadata: Mapping, source: str, with_scores: bool) -> Vocabulary:
    """The file's vocabulary, checked for shape and value types.

    Args:
        metadata: the file's metadata.
        source: the file name, for error messages.
        with_scores: `tokenizer.ggml.scores` is required (SentencePiece vocabularies).

    Raises:
        GGUFError: an array is missing, of the wrong kind, of the wrong length, or holds an invalid
            item (the message names the key and the first bad index).
    """
    tokens = metadata.get(Keys.Tokenizer.LIST)
    if not isinstance(tokens, list) or not tokens:
        raise tokenizer_error(source, Keys.Tokenizer.LIST, f"missing or not a non-empty array (got {echo(tokens)})")
    bad = None if all(type(t) is str for t in tokens) else next(i for i, t in enumerate(tokens) if type(t) is not str)
    if bad is not None:
        raise tokenizer_error(source, f"{Keys.Tokenizer.LIST}[{bad}]", f"not a string: {echo(tokens[bad])}")
    scores = _scores(metadata, source, len(tokens), with_scores)
    types = _types(metadata, source, len(tokens))
    return Vocabulary(tuple(tokens), scores, types, source)


def _scores(metadata: Mapping, source: str, count: int, required: bool) -> tuple[float, ...] | None:
    key = Keys.Tokenizer.SCORES
    scores = metadata.get(key)
    if scores is None and not required:
        return None
    if not isinstance(scores, list):
        raise tokenizer_error(source, key, f"missing or not an array (got {echo(scores)}); SentencePiece "
                                           "vocabularies need one score per token")
    _check_length(source, key, len(scores), count)
    bad = _first_bad_score(scores)
    if bad is not None:
        raise tokenizer_error(source, f"{key}[{bad}]", f"not a finite float32: {echo(scores[bad])}")
    return tuple(float(s) for s in scores)


def _first_bad_score(values: list) -> int | None:
    """The index of the first score that is not a finite number in float32 range, or None.

    Any numeric array type is a score array: llama.cpp writes a vocabulary converted from Mistral's
    tekken.json (`MistralVocab`) with integer zeros, which gguf-py stores as INT32.
    """
    if all(type(v) is float or type(v) is int for v in values):  # the 250k-score fast path: one numpy pass
        try:
            array = np.asarray(values, dtype=np.float64)
        except OverflowError:  # an integer beyond float64: the scan below names it
            pass
        else:
            good = np.isfinite(array) & (np.abs(array) <= _FLOAT32_MAX)
            return None if good.all() else int(np.argmin(good))
    return next((i for i, s in enumerate(values) if not _is_float32(s)), None)


def _is_float32(value: object) -> bool:
    # NaN and infinities fail the comparison; math.isfinite would raise OverflowError on an integer beyond float64.
    return type(value) in (int, float) and abs(value) <= _FLOAT32_MAX


def _types(metadata: Mapping, source: str, count: int) -> tuple[int, ...]:
    key = Keys.Tokenizer.TOKEN_TYPE
    types = metadata.get(key)
    if types is None:
        return (int(TokenType.NORMAL),) * count
    if not isinstance(types, list):
        raise tokenizer_error(source, key, f"not an array (got {echo(types)})")
    _check_length(source, key, len(types), count)
    valid = all(type(t) is int for t in types) and set(types) <= VALID_TYPES
    bad = None if valid else next(i for i, t in enumerate(types) if type(t) is not int or t not in VALID_TYPES)
    if bad is not None:
        raise tokenizer_error(source, f"{key}[{bad}]", f"{echo(types[bad])} is not a token type "
                                                       f"({min(VALID_TYPES)}..{max(VALID_TYPES)})")
    return tuple(types)


def _check_length(source: str, key: str, length: int, count: int) -> None:
    if length != count:
        raise tokenizer_error(source, key, f"has {length} items for {count} tokens in {Keys.Tokenizer.LIST}")


def special_token_id(metadata: Mapping, key: str, vocab: Vocabulary) -> int | None:
    """`tokenizer.ggml.<x>_token_id` as a valid index into the vocabulary, or None when absent."""
    value = metadata.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(vocab):
        raise tokenizer_error(vocab.source, key, f"{echo(value)} is not a token id (0..{len(vocab) - 1})")
    return value


def flag(metadata: Mapping, key: str, default: bool, source: str) -> bool:
    """A boolean tokenizer setting; integers 0/1 are accepted as some writers store them."""
    value = metadata.get(key, default)
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    raise tokenizer_error(source, key, f"not a boolean: {echo(value)}")


def merge_pairs(metadata: Mapping, source: str, ids: Mapping[str, int]) -> list[list[str]]:
    """A BPE vocabulary's merges (`tokenizer.ggml.merges`) as [left, right] pairs for a tokenizer.json.

    Split as llama.cpp splits them (at the first space after the first character); both sides and their
    concatenation must be tokens in `ids`, or `tokenizers` refuses the file with a message that names neither the
    file nor the merge.
    """
    key = Keys.Tokenizer.MERGES
    merges = metadata.get(key)
    if not isinstance(merges, list) or not merges:
        raise tokenizer_error(source, key, f"missing or not a non-empty array (got {echo(merges)}); a BPE vocabulary "
                                           "needs its merges")
    # Set operations first (real vocabularies have 400-500k merges); the slow scan only runs to name a bad one.
    cuts = [merge.find(" ", 1) for merge in merges] if all(type(m) is str for m in merges) else None
    pairs = [[merge[:cut], merge[cut + 1:]] for merge, cut in zip(merges, cuts)] if cuts and -1 not in cuts else None
    if pairs is not None:
        lefts, rights = {pair[0] for pair in pairs}, {pair[1] for pair in pairs}
        if "" not in rights and lefts <= ids.keys() and rights <= ids.keys() \
                and {left + right for left, right in pairs} <= ids.keys():
            return pairs
    for index, merge in enumerate(merges):
        cut = merge.find(" ", 1) if type(merge) is str else -1
        left, right = (merge[:cut], merge[cut + 1:]) if cut > 0 else ("", "")
        if not right or left not in ids or right not in ids or left + right not in ids:
            raise tokenizer_error(source, f"{key}[{index}]", _merge_problem(merge, cut, left, right, ids))
    raise AssertionError("unreachable: the set checks failed, so some merge is invalid")


def _merge_problem(merge: object, cut: int, left: str, right: str, ids: Mapping[str, int]) -> str:
    if type(merge) is not str:
        return f"not a string: {echo(merge)}"
    if cut <= 0 or not right:
        return f"{echo(merge)} is not two tokens separated by a space"
    missing = next(part for part in (left, right, left + right) if part not in ids)
    return f"{echo(merge)}: {echo(missing)} is not a token of {Keys.Tokenizer.LIST}"
