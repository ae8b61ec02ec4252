"""Mistral "tekken" tokenizers rebuilt from a GGUF file's tokenizer metadata.

ComfyUI's Mistral encoders (Flux.2's Mistral-Small-3, ERNIE's Ministral-3) read Mistral's own tokenizer
file, `tekken.json`, from the state dict entry `tekken_model`. llama.cpp writes that vocabulary as a
GPT-2 style byte-level BPE (`tokenizer.ggml.model` "gpt2", `tokenizer.ggml.pre` "tekken" or "pixtral"): the special
tokens first (CONTROL), then every tekken rank as its bytes spelled in GPT-2's byte-to-unicode
alphabet. Rank order is all tekken's BPE needs (merges follow from it), so the JSON is rebuilt from the
tokens alone: special token i keeps rank i, vocabulary token i becomes rank i - (number of specials).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from functools import lru_cache

from gguf import Keys, TokenType

from ..vocab import Vocabulary, echo, read_vocabulary, tokenizer_error

_CONTROL, _UNUSED = int(TokenType.CONTROL), int(TokenType.UNUSED)
# llama.cpp's names for the tekken pre-tokenizer (Mistral-Nemo/Small-3 hash to "tekken", Pixtral-based to "pixtral").
TEKKEN_PRE_TOKENIZERS = frozenset({"tekken", "pixtral"})


def tekken_model(metadata: Mapping, source: str = "tokenizer") -> bytes | None:
    """A tekken.json (UTF-8 bytes) for a "gpt2"/"tekken" GGUF tokenizer, or None for other tokenizers.

    The config carries what tekken readers need to size the vocabulary: `default_vocab_size`,
    `default_num_special_tokens` (ComfyUI 0.33's reader) and one `special_tokens` entry per special
    token (older readers count those).

    Raises:
        GGUFError: malformed tokenizer metadata (the message names the file, the key and the index).

    Example:
        >>> f = read_gguf("Mistral-Small-3.2-24B-Instruct-Q4_K_M.gguf")  # doctest: +SKIP
        >>> json.loads(tekken_model(f.metadata, f.path))["config"]["default_num_special_tokens"]
        1000
    """
    if metadata.get(Keys.Tokenizer.MODEL) != "gpt2" or metadata.get(Keys.Tokenizer.PRE) not in TEKKEN_PRE_TOKENIZERS:
        return None
    vocab = read_vocabulary(metadata, source, with_scores=False)
    specials = _special_count(vocab)
    end = _vocabulary_end(vocab, specials)
    entries = [_vocab_entry(vocab, index, index - specials) for index in range(specials, end)]
    _check_unique(vocab, entries, specials)
    document = {
        "config": {"num_vocab_tokens": len(entries), "default_vocab_size": end,
                   "default_num_special_tokens": specials},
        "vocab": entries,
        "special_tokens": [{"rank": i, "token_str": vocab.tokens[i], "is_control": True} for i in range(specials)],
    }
    return json.dumps(document, ensure_ascii=False).encode("utf-8")


def _special_count(vocab: Vocabulary) -> int:
    count = next((i for i, kind in enumerate(vocab.types) if kind != _CONTROL), len(vocab))
    later = next((i for i in range(count, len(vocab)) if vocab.types[i] == _CONTROL), None)
    if count == 0 or later is not None:
        where = "none at the start" if count == 0 else f"token {later} follows ordinary tokens"
        raise tokenizer_error(vocab.source, Keys.Tokenizer.TOKEN_TYPE,
                              f"tekken special (CONTROL) tokens must come first; {where}")
    return count


def _vocabulary_end(vocab: Vocabulary, start: int) -> int:
    """Trailing UNUSED tokens are llama.cpp's padding up to the embedding size, not tekken ranks."""
    end = len(vocab)
    while end > start and vocab.types[end - 1] == _UNUSED:
        end -= 1
    return end


def _vocab_entry(vocab: Vocabulary, index: int, rank: int) -> dict:
    raw = _token_bytes(vocab.tokens[index])
    if not raw:
        raise tokenizer_error(vocab.source, f"{Keys.Tokenizer.LIST}[{index}]",
                              f"{echo(vocab.tokens[index])} is empty or not a byte-level (GPT-2 alphabet) token")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None  # partial UTF-8 sequences are ordinary tekken ranks; tekken.json writes null for them
    return {"rank": rank, "token_bytes": base64.b64encode(raw).decode("ascii"), "token_str": text}


def _check_unique(vocab: Vocabulary, entries: list[dict], specials: int) -> None:
    seen: dict[str, int] = {}
    for entry in entries:
        first = seen.setdefault(entry["token_bytes"], entry["rank"])
        if first != entry["rank"]:
            raise tokenizer_error(vocab.source, f"{Keys.Tokenizer.LIST}[{entry['rank'] + specials}]",
                                  f"{echo(vocab.tokens[entry['rank'] + specials])} repeats token {first + specials}")


def _token_bytes(token: str) -> bytes | None:
    """The bytes a GPT-2 byte-level token spells, or None when it has characters outside that alphabet."""
    try:
        return token.translate(_byte_translation()).encode("latin-1")
    except UnicodeEncodeError:
        return None


@lru_cache(maxsize=1)
def _byte_translation() -> dict[int, str]:
    """GPT-2's reversible byte <-> printable character table, inverted (character -> the byte as a latin-1
    character). Characters below 256 outside the alphabet map to a character latin-1 cannot encode, so no
    character passes through unchanged and is mistaken for its own byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable}
    table.update({256 + n: chr(b) for n, b in enumerate(shifted)})
    table.update({code: "\uffff" for code in range(256) if code not in printable})
    return table
