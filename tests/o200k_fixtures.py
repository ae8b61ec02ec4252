"""A small GPT-OSS-style (o200k_harmony) tokenizer trained in the tests, and its GGUF metadata as llama.cpp writes it.

No vocabulary is shipped: a byte-level BPE is trained with HF `tokenizers` on the shared corpus, with the
structure of gpt-oss's tokenizer.json (Split by the o200k regex, Isolated; ByteLevel without prefix space or
regex; ByteLevel decoder), then the harmony markers are added as special tokens after the vocabulary (ids
after the BPE ranks, as in o200k_harmony), plus one non-special added token. `gguf_metadata` restates
llama.cpp's convert_hf_to_gguf.py `_set_vocab_gpt2` (get_vocab_base + gguf-py SpecialVocab merges), so the
rebuild in gguf_loader/encoders/gpt_oss_tokenizer.py is checked against an independent conversion.
"""

from __future__ import annotations

import json

from tokenizer_fixtures import CORPUS, PROMPTS

O200K_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
HARMONY_SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|return|>", "<|constrain|>", "<|channel|>", "<|start|>",
                    "<|end|>", "<|message|>", "<|call|>", "<|endofprompt|>"]
USER_DEFINED = "lens:marker"  # an added token that is not special and does not look special
PADDING = 6  # llama.cpp pads the vocabulary up to the embedding rows with UNUSED [PAD<i>] tokens

# The Lens chat template's fixed text (ComfyUI 0.33 gpt_oss._lens_render_chat), so merges cover it.
LENS_TEXT = ("You are ChatGPT, a large language model trained by OpenAI.\nKnowledge cutoff: 2024-06\n"
             "Current date: 2026-05-23\n\nReasoning: medium\n\n# Valid channels: analysis, commentary, final. "
             "Channel must be included for every message. # Instructions Describe the image by detailing the "
             "color, shape, size, texture, quantity, text, spatial relationships of the objects and background. "
             "Need to generate one image according to the description. system developer user assistant")


def train_o200k_tokenizer(vocab_size: int = 1400):
    """An original o200k-structured tokenizer (HF `tokenizers` object) with the harmony added tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(byte_fallback=False, fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(O200K_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(CORPUS + [LENS_TEXT] * 4, trainer=trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in HARMONY_SPECIALS])
    tokenizer.add_tokens([AddedToken(USER_DEFINED, special=False, normalized=False)])
    return tokenizer


def _looks_special(token: str) -> bool:
    """convert_hf_to_gguf.py does_token_look_special (the parts that apply here)."""
    return token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>")) \
        or (token.startswith("<｜") and token.endswith("｜>")) or (token.startswith("<unused") and token.endswith(">"))


def gguf_metadata(tokenizer, padding: int = PADDING) -> dict:
    """The `tokenizer.ggml.*` keys llama.cpp writes for a "gpt2" vocabulary (get_vocab_base, SpecialVocab).

    Token types use gguf.TokenType's numbering: 1 NORMAL, 3 CONTROL, 4 USER_DEFINED, 5 UNUSED.
    """
    document = json.loads(tokenizer.to_str())
    reverse = {i: t for t, i in tokenizer.get_vocab(with_added_tokens=True).items()}
    added = tokenizer.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(len(reverse) + padding):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(5)
            continue
        token = reverse[i]
        if i in added:
            if not added[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False).ids,
                                         skip_special_tokens=False)
            if added[i].special or _looks_special(token):
                types.append(3)
            else:
                types.append(4)
                token = token.replace("\u2581", " ")
        else:
            types.append(1)
        tokens.append(token)
    merges = document["model"]["merges"]
    if merges and isinstance(merges[0], list):  # gguf-py SpecialVocab: pairs -> "left right", spaces as U+0120
        merges = [" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in pair)
                  for pair in merges]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-4o", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.bos_token_id": tokenizer.token_to_id("<|startoftext|>"),
            "tokenizer.ggml.eos_token_id": tokenizer.token_to_id("<|return|>"),
            "tokenizer.ggml.padding_token_id": tokenizer.token_to_id("<|endoftext|>")}


def lens_chat(prompt: str) -> str:
    """ComfyUI 0.33's Lens rendering of a prompt (gpt_oss._lens_render_chat), restated for the tokenizer tests."""
    return (
        "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
        "Knowledge cutoff: 2024-06\nCurrent date: 2026-05-23\n\nReasoning: medium\n\n"
        "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>"
        "<|start|>developer<|message|># Instructions\n\nDescribe the image by detailing the color, shape, size, "
        "texture, quantity, text, spatial relationships of the objects and background.\n\n<|end|>"
        f"<|start|>user<|message|>{prompt}<|end|>"
        "<|start|>assistant<|channel|>analysis<|message|>Need to generate one image according to the description."
        "<|end|><|start|>assistant<|channel|>final<|message|>"
    )


def write_comfy_gptoss_tokenizer(folder) -> None:
    """`gptoss.json` for tests/comfyui/make_text_encoders.py: GGUF metadata as llama.cpp writes it and the original
    tokenizer.json as ComfyUI reads it from a state dict (`tokenizer_json`)."""
    from pathlib import Path

    tokenizer = train_o200k_tokenizer()
    document = {"metadata": gguf_metadata(tokenizer), "original": tokenizer.to_str().encode("utf-8").hex(),
                "entry": "tokenizer_json"}
    (Path(folder) / "gptoss.json").write_text(json.dumps(document))


__all__ = ["PROMPTS", "HARMONY_SPECIALS", "USER_DEFINED", "train_o200k_tokenizer", "gguf_metadata", "lens_chat",
           "write_comfy_gptoss_tokenizer"]
