"""A Gemma 4-style tokenizer built in the tests, and its GGUF metadata written the way llama.cpp writes it.

The original is a Hugging Face `tokenizers` BPE trained on tokenizer_fixtures.CORPUS and laid out like
Google's Gemma 4 tokenizer.json: BPE with byte fallback and `<unk>` fused, a normalizer replacing spaces by `▁`,
a split on plain spaces, the `▁`/byte-fallback/fuse decoder, a `<bos>` template; special tokens at the start of
the vocabulary (pad, eos, bos, unk, mask, the tool/think/channel/turn markers), the 256 `<0xNN>` byte pieces
inside the model vocabulary, and image/audio markers plus one non-special token added after it.

`gemma4_metadata` restates llama.cpp's conversion (convert_hf_to_gguf.py `Gemma4Model.set_vocab`, gguf-py
`LlamaHfVocab` and `SpecialVocab`), so the rebuild in gguf_loader is checked against an independent conversion.
"""

from __future__ import annotations

import json
import re

import tokenizer_fixtures as fx

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<|tool>", "<tool|>", "<|tool_call>", "<tool_call|>",
            "<|tool_response>", "<tool_response|>", '<|"|>', "<|think|>", "<|channel>", "<channel|>", "<|turn>",
            "<turn|>"]
MEDIA_MARKERS = ["<|image>", "<image|>", "<|image|>", "<|audio>", "<audio|>", "<|audio|>", "<|video|>"]
PLAIN_ADDED = ["<custom_marker>"]  # added, not special: llama.cpp types it USER_DEFINED
# Gemma4Model.set_vocab: always rendered, so typed USER_DEFINED whatever Hugging Face says.
VISIBLE = {"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>",
           '<|"|>'}
SPECIAL_IDS = {"bos": "<bos>", "eos": "<eos>", "unknown": "<unk>", "padding": "<pad>", "mask": "<mask>"}
MARKER_PROMPTS = [
    "<|turn>user\nA corgi on the beach<turn|>\n<|turn>model\n<|channel>thought\n<channel|>",
    "<|image><|image|><image|> and <|audio><|audio|><audio|> <|video|>",
    '<|tool_call>call:paint{style:<|"|>oil<|"|>}<tool_call|><|tool_response>ok<tool_response|>',
    "<bos><eos><pad><mask><unk> <custom_marker>x<custom_marker>",
    "<|think|>\n<|tool><tool|>",
]


def train_gemma4(vocab_size: int = 900):
    """The original tokenizer (tokenizers.Tokenizer)."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
    from tokenizers.models import BPE

    def pipeline(tokenizer):
        tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
        tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous", invert=False)
        tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                               decoders.Fuse()])
        return tokenizer

    learner = pipeline(Tokenizer(BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True)))
    learner.train_from_iterator(fx.CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    vocab = {token: index for index, token in enumerate(SPECIALS + [f"<0x{b:02X}>" for b in range(256)])}
    for token in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(token, len(vocab))
    model = BPE(vocab=vocab, merges=[tuple(pair) for pair in learned["merges"]], unk_token="<unk>",
                byte_fallback=True, fuse_unk=True)
    tokenizer = pipeline(Tokenizer(model))
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                             special_tokens=[("<bos>", vocab["<bos>"])])
    tokenizer.add_special_tokens(SPECIALS + MEDIA_MARKERS)
    tokenizer.add_tokens([AddedToken(token, normalized=False) for token in PLAIN_ADDED])
    return tokenizer


def gemma4_metadata(tokenizer) -> dict:
    """`tokenizer.ggml.*` as llama.cpp's converter writes them for this tokenizer."""
    document = json.loads(tokenizer.to_str())
    base = tokenizer.get_vocab_size(with_added_tokens=False)
    reverse = {index: token for token, index in tokenizer.get_vocab(with_added_tokens=True).items()}
    special_ids = {added["id"] for added in document["added_tokens"] if added["special"]}
    tokens, types = [], []
    for index in range(base):  # LlamaHfVocab.hf_tokens
        text = reverse[index]
        tokens.append(text)
        types.append(6 if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text) else 3 if index in special_ids else 1)
    for added in sorted((a for a in document["added_tokens"] if a["id"] >= base), key=lambda a: a["id"]):
        tokens.append(added["content"])  # LlamaHfVocab.added_tokens
        types.append(3 if added["special"] else 4)
    types = [4 if token in VISIBLE else kind for token, kind in zip(tokens, types)]
    merges = [" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in pair)
              for pair in document["model"]["merges"]]  # SpecialVocab, list-of-pairs merges
    metadata = {"tokenizer.ggml.model": "gemma4", "tokenizer.ggml.tokens": tokens,
                "tokenizer.ggml.scores": [-1000.0] * len(tokens), "tokenizer.ggml.token_type": types,
                "tokenizer.ggml.merges": merges}
    metadata.update({f"tokenizer.ggml.{kind}_token_id": tokens.index(token) for kind, token in SPECIAL_IDS.items()})
    metadata.update({"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_space_prefix": False})
    return metadata


def write_comfy_tokenizer(folder) -> None:
    """gemma4.json for tests/comfyui/make_text_encoders.py: the metadata and the original tokenizer.json."""
    from pathlib import Path

    tokenizer = train_gemma4()
    document = {"metadata": gemma4_metadata(tokenizer), "original": tokenizer.to_str().encode("utf-8").hex(),
                "entry": "tokenizer_json"}
    (Path(folder) / "gemma4.json").write_text(json.dumps(document))
