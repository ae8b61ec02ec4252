"""Gemma 4 tokenizers rebuilt as Hugging Face `tokenizer.json` from a GGUF file's tokenizer metadata.

ComfyUI 0.33's Gemma 4 encoders (the `gemma4` text encoders and LTX-2's Gemma 4) read Google's
`tokenizer.json` from the state-dict entry `tokenizer_json` and load it with `tokenizers.Tokenizer.from_str`.
llama.cpp's converter (`Gemma4Model.set_vocab`, gguf-py `LlamaHfVocab`) writes that vocabulary as
`tokenizer.ggml.model` "gemma4": every token text in id order (SentencePiece-style `▁` for spaces, `<0xNN>` byte
pieces), scores all -1000, types BYTE / CONTROL (Hugging Face's special tokens) / USER_DEFINED (added tokens that
are not special, and the seven chat markers llama.cpp always renders: `<|channel>`, `<|tool_call>`, ...) /
NORMAL, the BPE merges as "left right" strings, the special ids and `add_bos_token`.

Gemma's tokenizer.json is a fixed pipeline around that vocabulary, rebuilt here: a BPE model with byte fallback
(`<unk>` fused), a normalizer that replaces spaces by `▁` (preceded by a `▁` prefix only when the file asks for
one), a split on plain spaces (a no-op after that normalizer; Google's file carries it), the decoder that undoes
`▁` and byte pieces, and a template that adds `<bos>` when `add_bos_token` is set. CONTROL and USER_DEFINED
tokens become added tokens (matched whole in text before BPE); CONTROL ones are marked special.

What the GGUF does not keep: Hugging Face added tokens that were neither special nor re-typed (typed NORMAL by the
converter, e.g. `<unusedN>`) are not added tokens here, so such a literal string in a prompt is split by the
merges. A token text that appears twice maps to its later id, as in llama.cpp's token map.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from gguf import Keys, TokenType

from .errors import echo
from .vocab import Vocabulary, flag, read_vocabulary, special_token_id, tokenizer_error

GEMMA4_TOKENIZER_MODEL = "gemma4"
_SPACE = "\u2581"
_CONTROL, _USER_DEFINED, _UNKNOWN = int(TokenType.CONTROL), int(TokenType.USER_DEFINED), int(TokenType.UNKNOWN)
_ADDED_TYPES = frozenset({_CONTROL, _USER_DEFINED, _UNKNOWN})


def gemma4_tokenizer_json(metadata: Mapping, source: str = "tokenizer") -> bytes | None:
    """Gemma 4's tokenizer.json (UTF-8 bytes) for a "gemma4" GGUF tokenizer, or None for other tokenizers.

    Raises:
        GGUFError: malformed tokenizer metadata, one line naming the file, the key and (for arrays) the index.

    Example:
        >>> f = read_gguf("gemma-4-E4B-it-Q8_0.gguf")  # doctest: +SKIP
        >>> json.loads(gemma4_tokenizer_json(f.metadata, f.path))["model"]["type"]
        'BPE'
    """
    if metadata.get(Keys.Tokenizer.MODEL) != GEMMA4_TOKENIZER_MODEL:
        return None
    vocab = read_vocabulary(metadata, source, with_scores=False)
    ids = {token: index for index, token in enumerate(vocab.tokens)}  # a repeated text keeps its later id
    merges = _merges(metadata, source, ids)
    unknown = special_token_id(metadata, Keys.Tokenizer.UNK_ID, vocab)
    bos = special_token_id(metadata, Keys.Tokenizer.BOS_ID, vocab)
    add_bos = flag(metadata, Keys.Tokenizer.ADD_BOS, True, source)
    space_prefix = flag(metadata, Keys.Tokenizer.ADD_PREFIX, False, source)
    if add_bos and bos is None:
        raise tokenizer_error(source, Keys.Tokenizer.BOS_ID, f"missing although {Keys.Tokenizer.ADD_BOS} is set")
    document = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": _added_tokens(vocab),
        "normalizer": _normalizer(space_prefix),
        "pre_tokenizer": {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious",
                          "invert": False},
        "post_processor": _bos_template(vocab.tokens[bos], bos) if add_bos else None,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": _SPACE}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
        ]},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None if unknown is None else vocab.tokens[unknown],
            "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
            "byte_fallback": True, "ignore_merges": False, "vocab": ids, "merges": merges,
        },
    }
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _merges(metadata: Mapping, source: str, ids: Mapping[str, int]) -> list[list[str]]:
    """The merges as [left, right] pairs. Split as llama.cpp splits them (at the first space after the first
    character); both sides and their concatenation must be tokens, or `tokenizers` refuses the file."""
    key = Keys.Tokenizer.MERGES
    merges = metadata.get(key)
    if not isinstance(merges, list) or not merges:
        raise tokenizer_error(source, key, f"missing or not a non-empty array (got {echo(merges)}); Gemma 4's BPE "
                                           "needs its merges")
    # Set operations first (Gemma 4 has 515k merges); the slow scan only runs to name a bad one.
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


def _added_tokens(vocab: Vocabulary) -> list[dict]:
    return [{"id": index, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": kind != _USER_DEFINED}
            for index, (token, kind) in enumerate(zip(vocab.tokens, vocab.types))
            if kind in _ADDED_TYPES and token]


def _normalizer(space_prefix: bool) -> dict:
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": _SPACE}
    if not space_prefix:
        return replace
    return {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": _SPACE}, replace]}


def _bos_template(token: str, token_id: int) -> dict:
    bos = {"SpecialToken": {"id": token, "type_id": 0}}
    return {
        "type": "TemplateProcessing",
        "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos, {"Sequence": {"id": "B", "type_id": 0}}],
        "special_tokens": {token: {"id": token, "ids": [token_id], "tokens": [token]}},
    }
