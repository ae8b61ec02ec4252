"""Seeded fuzzing in CI: a bounded number of mutants per target, zero escapes (tests/fuzzing.py has the targets).

`python bench/fuzz.py` runs 10,000+ per target on demand and writes docs/fuzzing.md. A failure here prints
the escaping mutants' indices: `run_target(target, index + 1, SEED, path)` replays them.
"""

import pytest
from fuzzing import TARGETS, run_target

from distorch import headers
from gguf_loader.dequant import fields

SEED = 13
# About 10 s per target on a loaded 2-core runner (gguf: read + dequantize every tensor of a 27-tensor file).
CI_MUTANTS = {"gguf": 1000, "gguf-plan": 800, "safetensors-plan": 800, "expert": 1000}


@pytest.mark.parametrize("target", TARGETS)
def test_no_escapes(target, tmp_path):
    report = run_target(target, CI_MUTANTS[target], SEED, tmp_path)
    assert report.escaped == 0, "\n".join(report.escapes)
    assert report.counts["ok"] >= CI_MUTANTS[target] // 100, report.counts  # mutants that still parse
    assert sum(n for key, n in report.counts.items() if key.startswith("error")) >= CI_MUTANTS[target] // 2


def test_the_gguf_target_finds_a_reverted_fix(tmp_path, monkeypatch):
    """With the int32 view helper of issue #13 escape 1 put back (`.contiguous()` instead of an aligned copy),
    the seed's one-block tensors fail to dequantize with a raw torch RuntimeError, and the fuzzer says so."""

    def old_reinterpret(raw, dtype):
        return raw.contiguous().view(dtype)

    monkeypatch.setattr(fields, "reinterpret", old_reinterpret)
    report = run_target("gguf", 50, SEED, tmp_path)
    assert report.escaped and "RuntimeError" in report.escapes[0], report.counts


def test_the_plan_targets_find_an_unbounded_echo(tmp_path, monkeypatch):
    """A header error that echoes a whole value, as before issue #13, is an escape (not one bounded line)."""
    monkeypatch.setattr(headers, "echo", repr)
    report = run_target("safetensors-plan", 300, SEED, tmp_path)
    assert any("not one bounded line" in escape for escape in report.escapes), report.counts


def test_the_file_targets_find_a_removed_bound(tmp_path, monkeypatch):
    """With the overlap check removed, a hostile mutant of 100 tensors over the same bytes (every mutant here) is
    accepted by the plan: an escape."""
    import fuzzing

    from gguf_loader.gguf_header import _TensorTable

    monkeypatch.setattr(fuzzing, "HOSTILE_RATE", 1.0)
    monkeypatch.setattr(fuzzing, "HOSTILE_GGUF", {"overlap": fuzzing.HOSTILE_GGUF["overlap"]})
    assert run_target("gguf-plan", 3, SEED, tmp_path).counts == {"error: exit 2": 3}
    monkeypatch.setattr(_TensorTable, "_check_disjoint", lambda self, infos: None)
    report = run_target("gguf-plan", 3, SEED, tmp_path)
    assert report.escaped == 3 and "hostile file overlap accepted" in report.escapes[0], report.counts
