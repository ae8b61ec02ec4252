"""`python -m distorch quantize` on a multi-GB file: wall time and peak RSS against the largest tensor.

    python bench/quantize.py --blocks 10 --folder /tmp    # a 7.0 GB Wan 2.1 14B-shaped bf16 file

Writes a bf16 safetensors file with Wan 2.1 14B block shapes (random values; one payload per shape, written as
often as needed), runs the command in a child process that reports its own peak RSS (VmHWM: ru_maxrss of children
would count the parent's pages the child had between fork and exec), and deletes both files. The bound to
compare with: the largest tensor (bytes + its Q8_0 bytes) plus the interpreter.
"""

import argparse
import json
import os
import platform
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
from stream_shapes import wan_block  # noqa: E402


def write_file(path: Path, blocks: int) -> tuple[int, int]:
    """A Wan-named bf16 file of `blocks` 14B blocks; returns (file bytes, largest tensor bytes)."""
    shapes = {"head.modulation": (1, 2, 5120), "head.head.weight": (64, 5120), "text_embedding.0.weight": (5120, 4096),
              "text_embedding.2.weight": (5120, 5120)}
    for index in range(blocks):
        shapes.update({f"blocks.{index}.{name}": shape for name, shape in wan_block().items()})
    header, offset = {}, 0
    for name, shape in shapes.items():
        nbytes = 2 * int(torch.Size(shape).numel())
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    payloads, generator = {}, torch.Generator().manual_seed(0)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)) + text)
        for shape in shapes.values():
            if shape not in payloads:
                payloads[shape] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
            handle.write(payloads[shape].view(torch.uint8).numpy().data)
    largest = max(2 * int(torch.Size(s).numel()) for s in shapes.values())
    return path.stat().st_size, largest


_CHILD = """
import json, sys
from distorch.cli import main
code = main(json.loads(sys.argv[1]))
with open("/proc/self/status") as handle:
    print(next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmHWM:")), file=sys.stderr)
sys.exit(code)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--folder", default="/tmp")
    args = parser.parse_args()
    source = Path(args.folder) / "distorch-bench-quantize.safetensors"
    target = source.with_suffix(".gguf")
    try:
        size, largest = write_file(source, args.blocks)
        started = time.monotonic()
        argv = ["quantize", str(source), str(target), "--force", "--quiet"]
        run = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(argv)], cwd=ROOT, capture_output=True,
                             text=True)
        seconds = time.monotonic() - started
        if run.returncode:
            raise SystemExit(run.stderr)
        peak = int(run.stderr.strip().splitlines()[-1])
        print(run.stdout.strip())
        print(f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
        print(f"input {size / 2**30:.2f} GiB, output {target.stat().st_size / 2**30:.2f} GiB, {seconds:.1f} s "
              f"({size / 2**20 / seconds:.0f} MiB/s of input), peak RSS {peak / 2**20:.0f} MiB, largest tensor "
              f"{largest / 2**20:.0f} MiB")
    finally:
        for path in (source, target):
            if path.exists():
                path.unlink()


if __name__ == "__main__":
    main()
