"""Well-formed but hostile headers are refused fast with one line; real-size vocabularies still load (issue 17, item 6).

Before the bounds (gguf_loader/bounds.py), `python -m distorch plan` spent 37 s and 1.4 GB on 192 MB of nested empty
arrays, 13 s and 5.2 GB on 2.5 GB of metadata strings, 12 s and 0.9 GB on 4 million keys, and planned 1,000 tensors
over the same 64 MB as a 62.5 GB model. Each file here passes one bound just past it (tests/hostile_files.py).
"""

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gguf_helpers import QT, gguf_bytes, tensor_info
from hostile_files import HOSTILE_GGUF, HOSTILE_SAFETENSORS, real_size_vocabulary, write_hostile

from distorch.cli import main as cli_main
from gguf_loader import GGUFError, read_gguf, read_gguf_header
from gguf_loader.bounds import MAX_METADATA_ITEMS

FAST_SECONDS = 5.0  # each refusal takes well under a second; this leaves room for a loaded 2-core runner
MAX_ERROR_CHARS = 400


@pytest.mark.parametrize("kind", list(HOSTILE_GGUF))
def test_hostile_gguf_is_refused_fast_with_one_line(tmp_path, kind):
    path = tmp_path / f"{kind}.gguf"
    fragment = write_hostile(kind, path)
    start = time.perf_counter()
    with pytest.raises(GGUFError) as caught:
        read_gguf(path)
    seconds = time.perf_counter() - start
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and fragment in message, message
    assert "\n" not in message and len(message) < MAX_ERROR_CHARS
    assert seconds < FAST_SECONDS, f"{kind}: {seconds:.1f} s"


@pytest.mark.parametrize("kind, suffix", [(k, ".gguf") for k in HOSTILE_GGUF] + [(k, ".safetensors")
                                                                                  for k in HOSTILE_SAFETENSORS])
def test_plan_refuses_hostile_headers_with_exit_2(tmp_path, capsys, kind, suffix):
    path = tmp_path / f"{kind}{suffix}"
    fragment = write_hostile(kind, path)
    start = time.perf_counter()
    code = cli_main(["plan", str(path), "--vram-gb", "8", "--ram-gb", "64"])
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and len(err) < MAX_ERROR_CHARS, err[:500]
    assert path.name in err and fragment in err, err
    assert seconds < FAST_SECONDS, f"{kind}: {seconds:.1f} s"


def test_overlapping_gguf_tensors_name_both(tmp_path):
    """The first pair sharing bytes is named with both ranges (absolute file offsets); adjacent tensors are fine."""
    infos = [tensor_info("a", (32,), QT.F32, 0), tensor_info("b", (16,), QT.F32, 128),
             tensor_info("c", (8,), QT.F32, 160)]
    path = tmp_path / "overlap.gguf"
    path.write_bytes(gguf_bytes([], infos, bytes(256)))
    pair = r"tensors 'b' \(bytes (\d+)-(\d+)\) and 'c' \(bytes (\d+)-(\d+)\) overlap$"
    with pytest.raises(GGUFError, match=pair) as caught:
        read_gguf(path)
    infos[2] = tensor_info("c", (8,), QT.F32, 192)  # now begins where b ends
    path.write_bytes(gguf_bytes([], infos, bytes(256)))
    data = read_gguf(path).data_offset
    b_begin, b_end, c_begin, c_end = (int(n) for n in re.search(pair, str(caught.value)).groups())
    assert (b_begin, b_end, c_begin, c_end) == (data + 128, data + 192, data + 160, data + 192)


def test_a_real_size_vocabulary_loads_within_the_bounds(tmp_path):
    """262,144 tokens with scores and types and 520,000 merges (the largest real vocabularies) load in about 0.5 s."""
    path = tmp_path / "vocab.gguf"
    real_size_vocabulary(path)
    start = time.perf_counter()
    header = read_gguf_header(path)
    seconds = time.perf_counter() - start
    assert len(header.metadata["tokenizer.ggml.tokens"]) == 262_144
    assert len(header.metadata["tokenizer.ggml.merges"]) == 520_000
    assert 262_144 * 3 + 520_000 < MAX_METADATA_ITEMS // 3  # three times the largest real vocabulary still fits
    assert seconds < FAST_SECONDS


RSS_PROBE = """
import resource, sys
from gguf_loader import GGUFError, read_gguf_header
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    read_gguf_header(sys.argv[1])
except GGUFError:
    pass
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_the_costliest_refusal_stays_bounded_in_memory(tmp_path):
    """The header-bytes file reads 256 MB of strings (each within its bound) before the sum passes the header bound:
    peak RSS grows by those strings and the mapped pages, about 0.5 GB (2.5 GB of strings took 5.2 GB before)."""
    path = tmp_path / "header-bytes.gguf"
    write_hostile("header-bytes", path)
    probe = subprocess.run([sys.executable, "-c", RSS_PROBE, str(path)], capture_output=True, text=True, timeout=120,
                           cwd=Path(__file__).resolve().parents[1])
    assert probe.returncode == 0, probe.stderr[-2000:]
    grown_mib = int(probe.stdout.strip())
    assert grown_mib < 800, f"peak RSS grew by {grown_mib} MiB"  # measured: 576 MiB


def test_error_messages_name_the_key(tmp_path):
    for kind, key in [("nested-arrays", "nested"), ("long-string", "text.0"), ("array-items", "bytes")]:
        path = tmp_path / f"{kind}.gguf"
        write_hostile(kind, path)
        with pytest.raises(GGUFError, match=re.escape(f"metadata key '{key}'")):
            read_gguf_header(path)
