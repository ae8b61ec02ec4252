"""Real files as llama.cpp writes them: Mistral tekken vocabularies through its own converter, and its vocab files.

Mistral's NeMo (tekken_240718) and Pixtral (tekken_240911) tokenizers ship inside mistral_common. llama.cpp's
`convert_hf_to_gguf.py --mistral-format` (from the llama-cpp-python sdist, tests/llama_cpp_material.py) writes their
`tokenizer.ggml.scores` as INT32 zeros; the loader used to stop there with a bare StopIteration (issue 17, item 4).
The tekken.json rebuilt from the file must tokenize like the original in mistral_common and in ComfyUI's Flux.2
tokenizer (0.33's pure-Python BPE, loaded from the ComfyUI install).
"""

import importlib.util
import json
from pathlib import Path

import pytest
from comfyui_harness import installs
from gguf import GGUFValueType
from llama_cpp_material import convert_mistral_vocab, llama_cpp_tree

from gguf_loader import read_gguf, read_gguf_header, text_encoder_state_dict
from gguf_loader.bounds import MAX_HEADER_BYTES, MAX_METADATA_ITEMS

mistral_common = pytest.importorskip("mistral_common")
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy, TokenizerVersion  # noqa: E402
from mistral_common.tokens.tokenizers.tekken import Tekkenizer  # noqa: E402

TEKKEN_FILES = {"nemo": "tekken_240718.json", "pixtral": "tekken_240911.json"}
PROMPTS = ["A corgi 🐕 runs along the beach at sunset, crème brûlée, 柯基犬, 해변, Корги, ＦＵＬＬ width ﬁne  print",
           "[SYSTEM_PROMPT]You are an AI.[/SYSTEM_PROMPT][INST]a corgi at sunset[/INST]",
           "  code:\tdef f(x):\n        return x**2  # 1234567 <s></s>\r\n"]


@pytest.fixture(scope="session")
def llama_cpp() -> Path:
    return llama_cpp_tree()


@pytest.fixture(scope="module", params=list(TEKKEN_FILES), ids=list(TEKKEN_FILES))
def tekken(request, llama_cpp, tmp_path_factory) -> tuple[Path, Path]:
    """(the original tekken.json, the GGUF llama.cpp writes from it): ~4 s each."""
    original = Path(mistral_common.__file__).parent / "data" / TEKKEN_FILES[request.param]
    gguf_path = tmp_path_factory.mktemp(request.param) / f"{request.param}.gguf"
    return original, convert_mistral_vocab(llama_cpp, original, gguf_path)


@pytest.fixture(scope="module")
def rebuilt(tekken) -> dict:
    """The tekken.json text_encoder_state_dict rebuilds from the file."""
    state_dict = text_encoder_state_dict(read_gguf(tekken[1]))
    return json.loads(state_dict["tekken_model"].numpy().tobytes())


def test_llama_cpp_writes_tekken_scores_as_int32_zeros(tekken):
    header = read_gguf_header(tekken[1])
    assert header.metadata_types["tokenizer.ggml.scores"] == (GGUFValueType.ARRAY, GGUFValueType.INT32)
    assert set(header.metadata["tokenizer.ggml.scores"]) == {0}


def test_int32_scores_load_as_a_text_encoder(rebuilt):
    """Regression (issue 17, item 4): `_scores` raised StopIteration on integer scores, which tekken never reads."""
    assert rebuilt["config"]["default_vocab_size"] == 131072 and rebuilt["config"]["default_num_special_tokens"] == 1000


def test_rebuilt_tekken_tokenizes_like_mistral_common(tekken, rebuilt):
    """The file carries ranks and special tokens; the pre-tokenizer pattern and version are what llama.cpp's
    "tekken" pre-tokenizer stands for, so they come from the original."""
    original = Tekkenizer.from_file(tekken[0])
    config = json.loads(tekken[0].read_text())["config"]
    ours = Tekkenizer(vocab=rebuilt["vocab"], special_tokens=rebuilt["special_tokens"], pattern=config["pattern"],
                      vocab_size=rebuilt["config"]["default_vocab_size"],
                      num_special_tokens=rebuilt["config"]["default_num_special_tokens"],
                      version=TokenizerVersion(config["version"]))
    assert ours.n_words == original.n_words
    keep = SpecialTokenPolicy.KEEP
    assert all(ours.id_to_byte_piece(i, keep) == original.id_to_byte_piece(i, keep) for i in range(original.n_words))
    for prompt in PROMPTS:
        assert ours.encode(prompt, bos=True, eos=False) == original.encode(prompt, bos=True, eos=False), prompt


def comfyui_tekken_reader():
    """ComfyUI's tekken.json reader (comfy/text_encoders/bpe_tokenizer.py, 0.33+: standard library only)."""
    found = [i for i in installs() if (i.path / "comfy" / "text_encoders" / "bpe_tokenizer.py").is_file()]
    if not found:
        pytest.skip("no ComfyUI install with comfy/text_encoders/bpe_tokenizer.py (0.33+)")
    spec = importlib.util.spec_from_file_location(f"comfy_bpe_{found[-1].version.replace('.', '_')}",
                                                  found[-1].path / "comfy" / "text_encoders" / "bpe_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.from_tekken_json


@pytest.mark.parametrize("tekken", ["nemo"], indirect=True)
def test_rebuilt_tekken_equals_the_original_in_comfyuis_flux2_tokenizer(tekken, rebuilt):
    """ComfyUI needs `special_tokens` in the file, which these v3 files leave to mistral_common: the original gets
    mistral_common's list. Equal vocabulary, merges and special ids give equal tokens for every prompt. (Pixtral's
    file holds the same 150,000 ranks, only its image config differs: one run covers both; each takes ~7 s.)"""
    from_tekken_json = comfyui_tekken_reader()
    document = json.loads(tekken[0].read_text())
    document["special_tokens"] = Tekkenizer.from_file(tekken[0])._all_special_tokens
    original, ours = from_tekken_json(json.dumps(document)), from_tekken_json(json.dumps(rebuilt))
    assert ours._vocab == original._vocab
    assert ours._merges == original._merges
    assert ours._special_token_ids == original._special_token_ids
    for prompt in PROMPTS:
        assert ours(prompt)["input_ids"] == original(prompt)["input_ids"], prompt


def test_every_llama_cpp_vocabulary_reads_within_the_bounds(llama_cpp):
    """llama.cpp's test vocabularies (Gemma 4: 262,144 tokens and 514,906 merges; Command-R, Qwen, Llama 3, ...)
    read well inside the metadata bounds."""
    paths = sorted((llama_cpp / "models").glob("ggml-vocab-*.gguf"))
    assert len(paths) >= 15
    for path in paths:
        header = read_gguf_header(path)
        items = sum(len(value) for value in header.metadata.values() if isinstance(value, list))
        assert items < MAX_METADATA_ITEMS // 3 and header.data_offset < MAX_HEADER_BYTES // 16, path.name
