"""Time to open a GGUF file with a large tokenizer: ours (full and header-only) vs gguf-py's GGUFReader.

    python bench/open.py                       # 150,000-token vocabulary, 2,000 tensors
    python bench/open.py --tokens 256000 --tensors 20000 --repeat 7 --reader-repeat 1

The file is built in a temporary directory: tokenizer.ggml.tokens (string array), .scores (float
array) and .token_type (int array) plus small Q8_0/F32 tensors. Times are medians over --repeat opens
of the same (page-cached) file; the goal for ours is <= 0.2 s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the packages, and the test helpers

from ggml_samples import random_blocks  # noqa: E402

from gguf_loader import GGUFFileWriter, read_gguf, read_gguf_header  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=150_000)
    parser.add_argument("--tensors", type=int, default=2_000)
    parser.add_argument("--repeat", type=int, default=5, help="opens per reader of ours (median reported)")
    parser.add_argument("--reader-repeat", type=int, default=2, help="opens with gguf.GGUFReader (slow)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "vocab.gguf"
        build(path, args.tokens, args.tensors)
        print(f"file: {path.stat().st_size / 2**20:.1f} MiB, {args.tokens:,} tokens, {args.tensors:,} tensors")
        results = {
            "ours: read_gguf (tensors as mmap views)": timed(lambda: read_gguf(path), args.repeat),
            "ours: read_gguf_header (no tensors)": timed(lambda: read_gguf_header(path), args.repeat),
            "gguf-py: GGUFReader": timed(lambda: gguf.GGUFReader(path), args.reader_repeat),
        }
    baseline = results["gguf-py: GGUFReader"]
    print("| reader | median s | vs GGUFReader |")
    print("|---|---|---|")
    for name, seconds in results.items():
        print(f"| {name} | {seconds:.3f} | {baseline / seconds:.0f}× faster |" if seconds != baseline
              else f"| {name} | {seconds:.3f} | 1× |")


def build(path: Path, n_tokens: int, n_tensors: int) -> None:
    rng = np.random.default_rng(0)
    writer = GGUFFileWriter(path, architecture="llama")
    writer.add_metadata("tokenizer.ggml.model", "llama")
    writer.add_metadata("tokenizer.ggml.tokens", [f"▁tok{i}_{'ab' * (i % 5)}" for i in range(n_tokens)])
    writer.add_metadata("tokenizer.ggml.scores", rng.standard_normal(n_tokens).astype(np.float32))
    writer.add_metadata("tokenizer.ggml.token_type", [1] * n_tokens, gguf.GGUFValueType.ARRAY,
                        gguf.GGUFValueType.INT32)
    for i in range(n_tensors):
        if i % 4 == 3:
            writer.add_tensor(f"blk.{i // 4}.attn_norm.weight", rng.standard_normal(256).astype(np.float32))
        else:
            writer.add_tensor(f"blk.{i // 4}.w{i % 4}.weight", random_blocks("Q8_0", 64, seed=i), "Q8_0",
                              shape=(8, 256))
    writer.write()


def timed(work, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        begin = time.perf_counter()
        work()
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


if __name__ == "__main__":
    main()
