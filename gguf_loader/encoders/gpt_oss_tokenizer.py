"""GPT-OSS's Hugging Face `tokenizer.json`, rebuilt from a GGUF file's byte-level BPE ("gpt2") tokenizer metadata.

ComfyUI 0.33's GPT-OSS encoder (Lens) reads its tokenizer as a `tokenizer_json` state-dict entry and builds it
with the `tokenizers` library (`Tokenizer.from_str`). llama.cpp's converter (`_set_vocab_gpt2`) writes that
tokenizer as parallel arrays: every token (byte-level strings in GPT-2's byte-to-unicode alphabet; added tokens
as plain text), its type (NORMAL for the BPE vocabulary, CONTROL for special added tokens such as the harmony
markers `<|start|>`, USER_DEFINED for other added tokens, UNUSED for `[PAD<i>]` padding up to the embedding
size), the merges as "left right" strings, and the pre-tokenizer as a name (`tokenizer.ggml.pre`, a hash of
how the original split text). The rebuild is the inverse:

* NORMAL tokens -> the BPE model's vocabulary (same ids), merges in file order (their rank);
* CONTROL / USER_DEFINED -> `added_tokens` (special / not special), matched whole in the text;
* UNUSED padding is left out (its ids stay unassigned, as in the original);
* `pre` -> the original's Split regex, followed by ByteLevel without its own regex, and a ByteLevel decoder.

BPE flags follow llama.cpp's reading of the same file: no byte fallback, no unknown token, and merges not
ignored (llama.cpp ignores merges only for its LLAMA3 pre-tokenizers, none of which is mapped here).
Stdlib only: the `tokenizers` library is ComfyUI's, not needed to write the file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import lru_cache

from gguf import Keys, TokenType

from ..vocab import Vocabulary, echo, merge_pairs, read_vocabulary, tokenizer_error

# tiktoken's o200k_base split (GPT-4o, gpt-oss's o200k_harmony), as written in their tokenizer.json.
_O200K_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp `tokenizer.ggml.pre` name -> the original's Split regex.
PRE_TOKENIZER_SPLITS: dict[str, str] = {"gpt-4o": _O200K_SPLIT}

_VOCABULARY_TYPES = frozenset({int(TokenType.NORMAL), int(TokenType.BYTE), int(TokenType.UNKNOWN)})
_ADDED_TYPES = frozenset({int(TokenType.CONTROL), int(TokenType.USER_DEFINED)})
_UNUSED = int(TokenType.UNUSED)


def hf_tokenizer_json(metadata: Mapping, source: str = "tokenizer") -> bytes:
    """A `tokenizer.json` (UTF-8 bytes) equivalent to the file's "gpt2" tokenizer.

    Raises:
        GGUFError: not a "gpt2" tokenizer, a pre-tokenizer this module does not know, or malformed
            metadata (the message names the file, the key and, where it helps, the index).

    Example:
        >>> f = read_gguf("gpt-oss-20b-MXFP4.gguf")  # doctest: +SKIP
        >>> tokenizers.Tokenizer.from_str(hf_tokenizer_json(f.metadata, f.path).decode())  # doctest: +SKIP
    """
    model = metadata.get(Keys.Tokenizer.MODEL)
    if model != "gpt2":
        raise tokenizer_error(source, Keys.Tokenizer.MODEL, f"{echo(model)}; a tokenizer.json is rebuilt only from a "
                                                            "'gpt2' (byte-level BPE) vocabulary")
    pre = metadata.get(Keys.Tokenizer.PRE)
    if pre not in PRE_TOKENIZER_SPLITS:
        raise tokenizer_error(source, Keys.Tokenizer.PRE, f"{echo(pre)} is not a known pre-tokenizer (known: "
                                                          f"{', '.join(sorted(PRE_TOKENIZER_SPLITS))})")
    vocab = read_vocabulary(metadata, source, with_scores=False)
    bpe_vocab, added = _split_vocabulary(vocab)
    document = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": PRE_TOKENIZER_SPLITS[pre]}, "behavior": "Isolated",
             "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": bpe_vocab, "merges": merge_pairs(metadata, source, bpe_vocab)},
    }
    return json.dumps(document, ensure_ascii=False).encode("utf-8")


def _split_vocabulary(vocab: Vocabulary) -> tuple[dict[str, int], list[dict]]:
    bpe_vocab: dict[str, int] = {}
    added: list[dict] = []
    added_ids: dict[str, int] = {}
    for index, (token, kind) in enumerate(zip(vocab.tokens, vocab.types)):
        if kind == _UNUSED:
            continue
        where = f"{Keys.Tokenizer.LIST}[{index}]"
        if kind in _ADDED_TYPES:
            if not token or token in added_ids or token in bpe_vocab:
                first = added_ids.get(token, bpe_vocab.get(token))
                raise tokenizer_error(vocab.source, where, "empty added token" if not token else
                                      f"{echo(token)} repeats token {first}")
            added_ids[token] = index
            added.append({"id": index, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": kind == int(TokenType.CONTROL)})
            continue
        if not _is_byte_level(token):
            raise tokenizer_error(vocab.source, where, f"{echo(token)} is empty or not a byte-level (GPT-2 alphabet) "
                                                       "token")
        if token in bpe_vocab or token in added_ids:
            raise tokenizer_error(vocab.source, where,
                                  f"{echo(token)} repeats token {bpe_vocab.get(token, added_ids.get(token))}")
        bpe_vocab[token] = index
    if not bpe_vocab:
        raise tokenizer_error(vocab.source, Keys.Tokenizer.TOKEN_TYPE, "no NORMAL tokens: the BPE vocabulary is empty")
    return bpe_vocab, added


def _is_byte_level(token: str) -> bool:
    return bool(token) and all(char in _byte_alphabet() for char in token)


@lru_cache(maxsize=1)
def _byte_alphabet() -> frozenset[str]:
    """GPT-2's 256 printable stand-ins for the bytes (the characters byte-level tokens are spelled in)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [256 + n for n in range(256 - len(printable))]
    return frozenset(chr(code) for code in (*printable, *shifted))
