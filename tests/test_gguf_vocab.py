"""Vocabulary arrays of any numeric type (gguf_loader/vocab.py): scores are numbers, whatever array type holds them.

llama.cpp writes a tekken (Mistral) vocabulary's scores as INT32 zeros; `_scores` used to raise a bare StopIteration
on them (issue 17, item 4; tests/test_gguf_llama_cpp_files.py checks the real files).
"""

import json
import re

import pytest
import tokenizer_fixtures as fx
from gguf import GGUFValueType

from gguf_loader import GGUFError, GGUFFileWriter, read_gguf, tekken_model
from gguf_loader.vocab import read_vocabulary

TOKENS = ["<s>", "a", "b"]


@pytest.mark.parametrize("item_type", [GGUFValueType.INT32, GGUFValueType.UINT8, GGUFValueType.INT64,
                                       GGUFValueType.FLOAT64, GGUFValueType.FLOAT32])
def test_scores_of_any_numeric_array_type_are_read(tmp_path, item_type):
    path = tmp_path / "scores.gguf"
    writer = GGUFFileWriter(path)
    writer.add_metadata("tokenizer.ggml.tokens", TOKENS)
    writer.add_metadata("tokenizer.ggml.scores", [0, 1, 2], GGUFValueType.ARRAY, item_type)
    writer.write()
    metadata = read_gguf(path).metadata
    assert read_vocabulary(metadata, "scores.gguf", with_scores=True).scores == (0.0, 1.0, 2.0)


@pytest.mark.parametrize(("scores", "bad"), [([0, 1, True], "[2]: not a finite float32: True"),
                                             ([0, 10**400, 1], "[1]: not a finite float32: 1000000000"),
                                             ([0.0, float("nan"), 1], "[1]: not a finite float32: nan"),
                                             ([0, 1e39, 1], "[1]: not a finite float32: 1e+39"),
                                             ([0, "x", 1], "[1]: not a finite float32: 'x'")])
def test_a_bad_score_is_named_by_index(scores, bad):
    metadata = {"tokenizer.ggml.tokens": TOKENS, "tokenizer.ggml.scores": scores}
    with pytest.raises(GGUFError, match="^" + re.escape(f"m.gguf: tokenizer.ggml.scores{bad}")):
        read_vocabulary(metadata, "m.gguf", with_scores=True)


def test_tekken_with_integer_scores_rebuilds():
    """The layout llama.cpp's MistralVocab writes: CONTROL specials first, integer zero scores."""
    metadata = fx.tekken_metadata(fx.tekken_json([bytes([b]) for b in range(256)] + [b"ab"]))
    metadata["tokenizer.ggml.scores"] = [0] * len(metadata["tokenizer.ggml.tokens"])
    document = json.loads(tekken_model(metadata, "m.gguf"))
    assert document["config"]["default_num_special_tokens"] == len(fx.TEKKEN_SPECIALS)
