"""Token ids past a GGUF embedding table end in one line naming the token and the file (issue 17, item 5).

ComfyUI's Gemma 3 tokenizers (comfy/text_encoders/lt.py `Gemma3_12BTokenizer`, lumina2.py `Gemma3_4BTokenizer`) map
the literal text `<image_soft_token>` to id 262144 through their `special_tokens`, whatever the vocabulary. Google's
safetensors have 262,208 embedding rows; a llama.cpp Gemma 3 GGUF has 262,144, so the encoder used to die with
torch's `IndexError: index out of range in self`. That row's values are not in the file, so the safetensors result
cannot be reproduced: the layer refuses the id.
"""

import re

import pytest
import tokenizer_fixtures as fx
import torch
from ggml_samples import random_blocks
from gguf_helpers import QT

from gguf_loader import (
    GGUFError,
    GGUFFileWriter,
    GGUFOpsConfig,
    dequantize,
    embedding_table,
    make_ops,
    read_gguf,
    text_encoder_state_dict,
)

spm = pytest.importorskip("sentencepiece")
GEMMA3_ROWS = 262_144  # llama.cpp's Gemma 3 GGUFs (the 270M's config; converters cut the table to the vocabulary)
WIDTH = 32  # one Q8_0 block per row: the 262,144-row table is 8.9 MB


@pytest.fixture(scope="module")
def gemma3_gguf(tmp_path_factory):
    """A Gemma 3 text-encoder GGUF as llama.cpp lays it out: Gemma's SentencePiece vocabulary as metadata and a
    262,144-row Q8_0 token embedding (the vocabulary is small; the table has the real row count)."""
    sp = fx.train_sentencepiece("bpe", byte_fallback=True, normalization="identity", gemma_layout=True)
    path = tmp_path_factory.mktemp("gemma3") / "gemma-3-q8_0.gguf"
    writer = GGUFFileWriter(path, architecture="gemma3")
    for key, value in fx.gemma_metadata(sp).items():
        writer.add_metadata(key, value)
    writer.add_tensor("token_embd.weight", random_blocks(QT.Q8_0, GEMMA3_ROWS, seed=3), "Q8_0",
                      shape=(GEMMA3_ROWS, WIDTH))
    writer.add_tensor("output_norm.weight", torch.ones(WIDTH))
    writer.write()
    return path


def comfyui_gemma3_ids(spiece_model: bytes, text: str) -> list[int]:
    """What ComfyUI's Gemma 3 tokenizer gives: BOS, then SentencePiece around its special tokens (spiece_tokenizer.py
    splits the text at `<image_soft_token>` -> 262144 and `<end_of_turn>` -> 106)."""
    sp = spm.SentencePieceProcessor(model_proto=spiece_model)
    ids = [sp.bos_id()]
    for part in re.split(r"(<image_soft_token>|<end_of_turn>)", text):
        if part:
            ids += {"<image_soft_token>": [262144], "<end_of_turn>": [106]}.get(part) or sp.encode(part)
    return ids


def embedding_layer(gguf_file, state_dict):
    layer = make_ops(GGUFOpsConfig(embedding_tables=(embedding_table(gguf_file),))).Embedding(262_208, WIDTH)
    layer.load_state_dict({"weight": state_dict["model.embed_tokens.weight"]})
    return layer


def test_image_soft_token_in_a_prompt_names_the_token_and_the_file(gemma3_gguf):
    gguf_file = read_gguf(gemma3_gguf)
    state_dict = text_encoder_state_dict(gguf_file)
    layer = embedding_layer(gguf_file, state_dict)
    ids = comfyui_gemma3_ids(state_dict["spiece_model"].numpy().tobytes(), "a corgi <image_soft_token> at sunset")
    assert 262144 in ids
    expected = (f"{gemma3_gguf}: tensor 'token_embd.weight': the prompt holds '<image_soft_token>', token id 262144, "
                "past the 262144 rows of the embedding table: ComfyUI reads it as Gemma 3's image placeholder; remove "
                "it from the prompt, or use the safetensors text encoder")
    with pytest.raises(GGUFError) as caught:
        layer(torch.tensor([ids]))
    assert str(caught.value) == expected


def test_the_last_row_of_a_262144_row_table_still_embeds(gemma3_gguf):
    gguf_file = read_gguf(gemma3_gguf)
    layer = embedding_layer(gguf_file, text_encoder_state_dict(gguf_file))
    ids = torch.tensor([[0, 5, GEMMA3_ROWS - 1]])
    expected = dequantize(gguf_file.tensors["token_embd.weight"], torch.float32)[ids[0]]
    assert torch.equal(layer(ids)[0], expected)


@pytest.mark.parametrize("quantized", [True, False], ids=["q8_0", "f16"])
@pytest.mark.parametrize("bad", [10, 1000, -1])
def test_any_id_outside_the_table_is_one_line_not_an_index_error(tmp_path, quantized, bad):
    """Without a table record the message names what the weight knows: its file and tensor when quantized."""
    path = tmp_path / "emb.gguf"
    writer = GGUFFileWriter(path, architecture="llama")
    if quantized:
        writer.add_tensor("token_embd.weight", random_blocks(QT.Q8_0, 10, seed=1), "Q8_0", shape=(10, WIDTH))
    else:
        writer.add_tensor("token_embd.weight", torch.randn(10, WIDTH).half())
    writer.write()
    layer = make_ops().Embedding(10, WIDTH)
    layer.load_state_dict({"weight": read_gguf(path).tensors["token_embd.weight"]})
    where = f"{path}: tensor 'token_embd.weight'" if quantized else "GGUF embedding table"
    with pytest.raises(GGUFError, match=re.escape(f"{where}: token id {bad} is outside the embedding table's 10 rows "
                                                  "(0..9)") + "$"):
        layer(torch.tensor([[1, bad, 2]]))
    assert layer(torch.tensor([[9, 0]])).shape == (1, 2, WIDTH)
    assert layer(torch.zeros(1, 0, dtype=torch.long)).shape == (1, 0, WIDTH)


def test_a_vocabulary_longer_than_the_table_names_its_tokens(tmp_path):
    """Tokens a rebuilt tokenizer can match (not UNUSED padding) past the table are named from the file."""
    path = tmp_path / "longer.gguf"
    writer = GGUFFileWriter(path, architecture="llama")
    writer.add_metadata("tokenizer.ggml.tokens", ["a", "b", "c", "<extra>", "[PAD4]"])
    writer.add_metadata("tokenizer.ggml.token_type", [1, 1, 1, 4, 5])
    writer.add_tensor("token_embd.weight", random_blocks(QT.Q8_0, 3, seed=2), "Q8_0", shape=(3, WIDTH))
    writer.write()
    gguf_file = read_gguf(path)
    table = embedding_table(gguf_file)
    assert table.rows == 3 and [(entry.token_id, entry.text) for entry in table.named_ids] == [(3, "<extra>")]
    layer = make_ops(GGUFOpsConfig(embedding_tables=(table,))).Embedding(5, WIDTH)
    layer.load_state_dict({"weight": gguf_file.tensors["token_embd.weight"]})
    with pytest.raises(GGUFError, match=r"the prompt holds '<extra>', token id 3, past the 3 rows"):
        layer(torch.tensor([[0, 3]]))
    with pytest.raises(GGUFError, match=r"token id 4 is outside the embedding table's 3 rows"):
        layer(torch.tensor([[0, 4]]))
