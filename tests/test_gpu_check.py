"""bench/gpu_check.sh in its dry run: every step of the GPU check runs on the CPU at toy sizes and writes its
table, so the script a GPU run depends on cannot rot unseen (it takes about a minute)."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_writes_every_table(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    result = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=1500)
    summary = (tmp_path / "summary.md").read_text()
    assert result.returncode == 0, summary + result.stdout[-2000:] + result.stderr[-2000:]
    assert summary.count("| PASS |") == 8 and "FAIL" not in summary, summary
    assert "skipped" in (tmp_path / "cuda_tests.txt").read_text()  # collected, and skipped without a GPU
    assert "| tiny | 64 | fp32 | 50 |" in (tmp_path / "stream.md").read_text()
    assert "| Q8_0 |" in (tmp_path / "dequant.md").read_text()
    steady = (tmp_path / "steady_state.md").read_text()
    assert "| allocations per pass, streamed vs resident |" in steady and "FAIL" not in steady, steady
    assert "| q8_0 | 16 | 1 | side |" in (tmp_path / "lora.md").read_text()
    auto = (tmp_path / "auto_budget.md").read_text()
    assert "| 720p (32 tokens): peak VRAM / card" in auto and "FAIL" not in auto, auto
    formats = (tmp_path / "stream_formats.md").read_text()
    assert all(f"| tiny | 64 | fp32 | 100 | interleave | {fmt} |" in formats
               for fmt in ("stored", "q8_0", "fp8_e4m3fn"))
    assert {p.name for p in tmp_path.iterdir()} == {"summary.md", "env.txt", "cuda_tests.txt", "stream.md",
                                                    "dequant.md", "steady_state.md", "lora.md", "auto_budget.md",
                                                    "stream_formats.md"}
