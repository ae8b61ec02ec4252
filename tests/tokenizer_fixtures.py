"""Original tokenizers built in the tests, and their GGUF metadata written the way llama.cpp writes it.

Nothing here ships another project's vocabulary: small SentencePiece models are trained on the corpus
below (unigram like T5/UMT5, BPE like Gemma) and a small tekken-style (Mistral) vocabulary is learned
by plain byte-pair merging. The `*_metadata` functions restate what llama.cpp's convert_hf_to_gguf.py
and gguf-py's MistralVocab write for these families, so the rebuild in gguf_loader is checked against
an independent conversion, not against itself.
"""

from __future__ import annotations

import base64
import io
import json
import re
from collections import Counter

import numpy as np

CORPUS_LINES = [
    "A corgi runs along a beach at sunset, waves splashing in slow motion.",
    "The quick brown fox jumps over the lazy dog 42 times, then naps under an oak tree.",
    "a cinematic photo of a lighthouse on a cliff, dramatic clouds, 35mm film grain, golden hour",
    "Ein Corgi läuft bei Sonnenuntergang am Strand entlang; die Wellen glitzern.",
    "Un corgi court le long d'une plage au coucher du soleil, à côté d'un phare.",
    "Un perro corre por la playa al atardecer, las olas rompen suavemente.",
    "一只柯基犬在日落时沿着海滩奔跑，海浪拍打着沙滩。",
    "夕暮れの海辺を走るコーギー、波がゆっくりと砕ける。",
    "해질녘 해변을 따라 달리는 코기, 파도가 천천히 부서진다.",
    "Корги бежит по пляжу на закате, волны медленно разбиваются.",
    "كلب كورجي يركض على طول الشاطئ عند غروب الشمس",
    "सूर्यास्त के समय समुद्र तट पर दौड़ता हुआ कॉर्गी कुत्ता",
    "ＦＵＬＬ　ＷＩＤＴＨ letters and numbers １２３ should normalise to ascii.",
    "office ﬁle ﬂow ﬀ ligatures and the ﬁnal ﬂag",
    "emoji: 🐕 🌅 🌊 ✨ and a family 👨‍👩‍👧 in one glyph",
    "    indented  code\n\tand tabs\n\nnew paragraph   with   runs   of   spaces",
    "<start_of_turn>user\ndescribe the scene<end_of_turn>\n<start_of_turn>model\n",
    "Numbers: 3.14159, 2026-08-01, 1,000,000 and 007.",
]
CORPUS = [f"{line} {i}" if i % 3 else line for i, line in enumerate(CORPUS_LINES * 12)]

PROMPTS = [
    "a corgi at sunset",
    "Crème brûlée, naïve café, façade, Ångström, Øresund",
    "柯基犬 和 一只狐狸 在雪地里",
    "東京タワーの夜景",
    "한국어 문장과 English mixed",
    "Съешь же ещё этих мягких французских булок",
    "مرحبا بالعالم",
    "नमस्ते दुनिया, यह एक परीक्षण है",
    "🦊🦊 fox emoji, 🏳️‍🌈 flag, 👩🏽‍🚀 astronaut",
    "ＦＵＬＬ　ｗｉｄｔｈ ａｎｄ half width １２３",
    "ﬁne ﬂowers ﬃ ﬄ Ĳ ǆ ㎏ ½ ²",
    "  leading and trailing spaces  ",
    "runs   of     spaces\t\ttabs\n\n\nnewlines",
    "<start_of_turn>user\nhello<end_of_turn>",
    "unseen: ꙮ 𓀀 ᚠᛇᚻ ⵣ zyxwv qqq",
    "mixed 42 numbers 1234567 and 3.5e-7",
    "The " + "quick brown fox jumps over the lazy dog near the lighthouse; " * 40,
]


# -- SentencePiece ----------------------------------------------------------------------------------------

def train_sentencepiece(model_type: str, byte_fallback: bool, normalization: str = "nmt_nfkc",
                        vocab_size: int = 700, gemma_layout: bool = False):
    """A trained SentencePieceProcessor. `gemma_layout`: Gemma's special ids, user-defined pieces and
    normalizer (no dummy prefix, whitespace kept, digits split); otherwise T5's (pad 0, eos 1, unk 2)."""
    import sentencepiece as spm

    model = io.BytesIO()
    options = dict(sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=vocab_size, model_type=model_type,
                   byte_fallback=byte_fallback, normalization_rule_name=normalization, character_coverage=0.9995,
                   minloglevel=2, num_threads=1, hard_vocab_limit=False)
    if gemma_layout:
        options.update(pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
                       unk_piece="<unk>", add_dummy_prefix=False, remove_extra_whitespaces=False, split_digits=True,
                       allow_whitespace_only_pieces=True, control_symbols=["<mask>"],
                       user_defined_symbols=GEMMA_USER_DEFINED)
    else:
        options.update(pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    spm.SentencePieceTrainer.train(**options)
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


# Gemma's tokenizer.model holds its turn markers, whitespace runs and HTML tags as user-defined pieces.
GEMMA_USER_DEFINED = ["<start_of_turn>", "<end_of_turn>", "<unused0>", "\n\n", "\u2581\u2581",
                      "\u2581\u2581\u2581\u2581", "\t\t", "<table>"]
# What Gemma's tokenizer_config.json says of them (added_tokens_decoder: content -> special).
GEMMA_ADDED_TOKENS = {"<start_of_turn>": True, "<end_of_turn>": True, "<unused0>": False, "\n\n": False,
                      "\u2581\u2581": False, "\u2581\u2581\u2581\u2581": False, "\t\t": False, "<table>": False,
                      "<mask>": False}


def _llama_cpp_token_type(sp, token_id: int) -> int:
    """convert_hf_to_gguf.py's SentencePiece token type (user-defined pieces become NORMAL there)."""
    if sp.is_unknown(token_id):
        return 2
    if sp.is_control(token_id):
        return 3
    if sp.is_unused(token_id):
        return 5
    if sp.is_byte(token_id):
        return 6
    return 1


def _looks_special(token: str) -> bool:
    """llama.cpp's TextModel.does_token_look_special."""
    return token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") \
        or (token.startswith("<|") and token.endswith("|>")) \
        or (token.startswith("<\uff5c") and token.endswith("\uff5c>")) \
        or (token.startswith("<unused") and token.endswith(">"))


def normalizer_spec(sp) -> dict:
    """The NormalizerSpec of a processor's model, read with protobuf (independent of the code under test)."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    spec = proto.normalizer_spec
    return {"add_dummy_prefix": spec.add_dummy_prefix, "remove_extra_whitespaces": spec.remove_extra_whitespaces,
            "precompiled_charsmap": bytes(spec.precompiled_charsmap)}


def t5_metadata(sp, vocab_size: int | None = None) -> dict:
    """llama.cpp T5Model.set_vocab + SpecialVocab for a unigram model: "t5", padded to `vocab_size`."""
    size = sp.get_piece_size()
    vocab_size = vocab_size or size
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores, types = [-10000.0] * vocab_size, [5] * vocab_size
    for i in range(size):
        tokens[i], scores[i], types[i] = sp.id_to_piece(i), sp.get_score(i), _llama_cpp_token_type(sp, i)
    spec = normalizer_spec(sp)
    metadata = {"tokenizer.ggml.model": "t5", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
                "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
                "tokenizer.ggml.add_space_prefix": spec["add_dummy_prefix"],
                "tokenizer.ggml.remove_extra_whitespaces": spec["remove_extra_whitespaces"]}
    if spec["precompiled_charsmap"]:
        metadata["tokenizer.ggml.precompiled_charsmap"] = list(spec["precompiled_charsmap"])
    metadata.update(_special_ids(sp))
    return metadata


def gemma_metadata(sp, vocab_size: int | None = None) -> dict:
    """llama.cpp Gemma3Model.set_vocab: _create_vocab_sentencepiece (tokenizer_config's added tokens become
    CONTROL or USER_DEFINED with plain spaces, score -1000), "llama", no space prefix."""
    size = sp.get_piece_size()
    vocab_size = vocab_size or size
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores, types = [-10000.0] * vocab_size, [5] * vocab_size
    for i in range(size):
        tokens[i], scores[i], types[i] = sp.id_to_piece(i), sp.get_score(i), _llama_cpp_token_type(sp, i)
    for content, special in GEMMA_ADDED_TOKENS.items():
        token_id = sp.piece_to_id(content)
        if special or _looks_special(content):
            types[token_id] = 3
        else:
            content = content.replace("\u2581", " ")
            types[token_id] = 4
        scores[token_id], tokens[token_id] = -1000.0, content
    metadata = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
                "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
                "tokenizer.ggml.add_space_prefix": False}
    metadata.update(_special_ids(sp))
    return metadata


def _special_ids(sp) -> dict:
    ids = {"tokenizer.ggml.unknown_token_id": sp.unk_id(), "tokenizer.ggml.bos_token_id": sp.bos_id(),
           "tokenizer.ggml.eos_token_id": sp.eos_id(), "tokenizer.ggml.padding_token_id": sp.pad_id()}
    return {k: v for k, v in ids.items() if v >= 0}


# -- tekken (Mistral) -------------------------------------------------------------------------------------

TEKKEN_SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                   "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]",
                   "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                   "[TOOL_CONTENT]"] + [f"<SPECIAL_{i}>" for i in range(20, 40)]
# Splits text roughly like tiktoken's pre-tokenizer, for learning merges only (never for encoding).
_WORDS = re.compile(r" ?\w+| ?[^\w\s]+|\s+")


def learn_tekken_ranks(merges: int = 600) -> list[bytes]:
    """A tekken-style rank list: the 256 single bytes, then byte-pair merges learned on the corpus."""
    words = Counter(tuple(bytes([b]) for b in w.encode("utf-8")) for line in CORPUS for w in _WORDS.findall(line))
    ranks = [bytes([b]) for b in range(256)]
    known = set(ranks)
    for _ in range(merges):
        pairs: Counter = Counter()
        for word, count in words.items():
            for left, right in zip(word, word[1:]):
                pairs[left, right] += count
        if not pairs:
            break
        (left, right), _ = max(pairs.items(), key=lambda item: (item[1], item[0]))
        merged = left + right
        if merged not in known:
            known.add(merged)
            ranks.append(merged)
        words = Counter({_merge(word, left, right): count for word, count in words.items()})
    return ranks


def _merge(word: tuple, left: bytes, right: bytes) -> tuple:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == left and word[i + 1] == right:
            out.append(left + right)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def tekken_json(ranks: list[bytes], specials: list[str] = TEKKEN_SPECIALS, extra_ranks: int = 16) -> bytes:
    """A tekken.json in Mistral's layout: more vocabulary ranks than the model uses (`default_vocab_size`)."""
    unused = [b"\xf0\x9f" + bytes([0x80 + i]) for i in range(extra_ranks)]  # ranks beyond the model's vocabulary
    vocab = []
    for rank, token in enumerate(ranks + unused):
        try:
            text = token.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        vocab.append({"rank": rank, "token_bytes": base64.b64encode(token).decode(), "token_str": text})
    document = {
        "config": {"pattern": r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
                   "num_vocab_tokens": len(vocab), "default_vocab_size": len(ranks) + len(specials),
                   "default_num_special_tokens": len(specials), "version": "v7"},
        "vocab": vocab,
        "special_tokens": [{"rank": i, "token_str": s, "is_control": True} for i, s in enumerate(specials)],
    }
    return json.dumps(document).encode()


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (restated from its definition)."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def tekken_metadata(document: bytes) -> dict:
    """gguf-py MistralVocab for a tekken file: specials (CONTROL), then every model rank in GPT-2 byte-level
    spelling (NORMAL); "gpt2" with the "tekken" pre-tokenizer. Ranks past default_vocab_size are dropped."""
    data = json.loads(document)
    config, encode = data["config"], byte_to_unicode()
    specials = [s["token_str"] for s in sorted(data["special_tokens"], key=lambda s: s["rank"])]
    ranks = sorted(data["vocab"], key=lambda v: v["rank"])[:config["default_vocab_size"] - len(specials)]
    tokens = specials + ["".join(encode[b] for b in base64.b64decode(v["token_bytes"])) for v in ranks]
    types = [3] * len(specials) + [1] * len(ranks)
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "tekken", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": specials.index("<s>"),
            "tokenizer.ggml.eos_token_id": specials.index("</s>"), "tokenizer.ggml.unknown_token_id": 0,
            "tokenizer.ggml.padding_token_id": specials.index("<pad>")}


def write_tokenizer_gguf(path, metadata: dict, architecture: str = "t5") -> None:
    """A GGUF file holding `metadata` (and one tiny tensor), written with gguf-py's GGUFWriter as llama.cpp writes
    tokenizers (string arrays, FLOAT32 scores, INT32 types, UINT8 charsmap, UINT32 ids, BOOL flags)."""
    from gguf import GGUFValueType, GGUFWriter

    writer = GGUFWriter(str(path), architecture)
    for key, value in metadata.items():
        if key == "tokenizer.ggml.precompiled_charsmap":
            writer.add_array(key, bytes(value))
        elif isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_key_value(key, value, GGUFValueType.STRING)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_comfy_tokenizers(folder) -> None:
    """The tokenizers of tests/comfyui/make_text_encoders.py: GGUF metadata as llama.cpp writes it and the original
    as ComfyUI reads it from a state dict (`spiece_model` / `tekken_model`), one JSON per vocabulary."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    umt5 = train_sentencepiece("unigram", byte_fallback=True)
    gemma = train_sentencepiece("bpe", byte_fallback=True, normalization="identity", gemma_layout=True)
    tekken = tekken_json(learn_tekken_ranks())
    artifacts = {
        "umt5": (t5_metadata(umt5, umt5.get_piece_size() + 8), umt5.serialized_model_proto(), "spiece_model"),
        "gemma": (gemma_metadata(gemma, gemma.get_piece_size() + 8), gemma.serialized_model_proto(), "spiece_model"),
        "tekken": (tekken_metadata(tekken), tekken, "tekken_model"),
    }
    for name, (metadata, original, entry) in artifacts.items():
        document = {"metadata": metadata, "original": original.hex(), "entry": entry}
        (folder / f"{name}.json").write_text(json.dumps(document))
