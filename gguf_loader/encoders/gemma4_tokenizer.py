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

from ..vocab import Vocabulary, flag, merge_pairs, read_vocabulary, special_token_id, tokenizer_error

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
    merges = merge_pairs(metadata, source, ids)
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
