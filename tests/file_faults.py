"""A model file changed under a loaded model: the models, the faults and a child process to run them in (issue #17).

Shared by tests/test_model_files.py and bench/faults_files.py. Models are ToyDiTs read from a file as users load
them (memory_models.py): "gguf" (a read-only shared mapping, gguf_loader) and "safetensors_mmap" (the private
mapping `safetensors.torch.load_file` returns). The rest of the model (outside the blocks) is copied into RAM,
as a GPU run moves it to VRAM at load: compute here is the CPU, so weights left in the file would be computed on
from the mapping, which only a GPU run avoids (README "How it works").

Run as a script, it is the child a truncation needs (a SIGBUS kills the whole process):
    python tests/file_faults.py KIND FILE TIER FRACTION
streams FILE on TIER ("disk": RAM short, every block read from the file; "staging": RAM roomy, blocks staged into
RAM), truncates FILE to FRACTION of its size before the forward (disk) or before staging (staging), and prints one
line: "right", "wrong" or "error <type>: <message>"; an uncaught error or a signal ends it otherwise.
"""

import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if __name__ == "__main__":  # a child: the pack and these helpers from the checkout this file is in
    sys.path[:0] = [str(HERE.parent), str(HERE)]

from memory_models import forward, load_model, write_model  # noqa: E402

import distorch  # noqa: E402
from distorch.ledger import Ledger  # noqa: E402
from distorch.memory import RAM_RESERVE_FIXED, RAM_RESERVE_SHARE, DeviceMemory, MemoryInventory  # noqa: E402
from distorch.units import GIB  # noqa: E402

KINDS = ("gguf", "safetensors_mmap")
SHAPE = (128, 6)  # dim, depth: ~0.3 MB (GGUF) / ~0.8 MB (float32) per block
DAY_NS = 86_400 * 10**9
ROOMY = {"cpu": 64 * GIB}


def write_aged(kind: str, path: Path, seed: int = 0) -> Path:
    """A model file written a day ago, as a file downloaded long before it is loaded (a rewrite gets a new time)."""
    write_model(kind, path, *SHAPE, seed=seed)
    aged = time.time_ns() - DAY_NS
    os.utime(path, ns=(aged, aged))
    return path


def load(kind: str, path: Path) -> torch.nn.Module:
    """The model of `path`, its blocks in the file's mapping and the rest copied into RAM."""
    model = load_model(kind, path, *SHAPE)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if not name.startswith("blocks."):
            tensor.data = tensor.data.clone()
    return model


def ram_usable(nbytes: int) -> MemoryInventory:
    """A machine whose RAM has exactly `nbytes` left after the safety reserve."""
    total = 8 * GIB
    reserve = int(RAM_RESERVE_FIXED + RAM_RESERVE_SHARE * total)
    return MemoryInventory({"cpu": DeviceMemory("cpu", nbytes + reserve, total)})


def plan(model: torch.nn.Module, tier: str) -> distorch.Plan:
    """Every block streamed: from the file (RAM for the slots only) or from RAM (roomy)."""
    blocks = distorch.discover(model).block_bytes / GIB
    roomy = distorch.plan(model, compute_device="cpu", virtual_vram_gb=blocks, memory=ROOMY, ledger=Ledger())
    if tier == "staging":
        return roomy
    slots_only = ram_usable(roomy.prefetch * roomy.slot_bytes)
    return distorch.plan(model, compute_device="cpu", virtual_vram_gb=blocks, memory=slots_only, ledger=Ledger())


def rewrite_in_place(path: Path, other: Path, start: int = 0, end: int | None = None) -> None:
    """Writes `other`'s bytes [start, end) over `path`'s, as `cp other path` does (same inode)."""
    data = other.read_bytes()[start:end]
    with open(path, "r+b") as handle:
        handle.seek(start)
        handle.write(data)


def replace_by_rename(path: Path, other: Path) -> None:
    """Renames a copy of `other` over `path`, as rsync or a download manager does (a new inode)."""
    fresh = path.with_name(path.name + ".partial")
    fresh.write_bytes(other.read_bytes())
    os.replace(fresh, path)


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def outcome(expected: torch.Tensor, run) -> str:
    """"right", "wrong" (no error) or "error <type>: <message>" for one forward `run()`."""
    try:
        got = run()
    except Exception as error:  # the outcome is recorded, not raised
        return f"error {type(error).__name__}: {error}"
    return "right" if torch.equal(expected, got) else "wrong"


def child(kind: str, path: Path, tier: str, fraction: float) -> str:
    """Streams `path` on `tier`, truncates it to `fraction` of its size and runs the forward."""
    model = load(kind, path)
    expected = forward(model)
    model_plan = plan(model, tier)
    size = path.stat().st_size
    if tier == "staging":
        os.truncate(path, int(fraction * size))
        return outcome(expected, lambda: _stream_and_forward(model, model_plan))
    with distorch.stream(model, model_plan, ledger=Ledger()):
        assert torch.equal(forward(model), expected)
        os.truncate(path, int(fraction * size))
        return outcome(expected, lambda: forward(model))


def _stream_and_forward(model, model_plan) -> torch.Tensor:
    with distorch.stream(model, model_plan, ledger=Ledger()):
        return forward(model)


if __name__ == "__main__":
    kind_arg, file_arg, tier_arg, fraction_arg = sys.argv[1:5]
    result = child(kind_arg, Path(file_arg), tier_arg, float(fraction_arg))
    sys.stdout.write(result + "\n")
    if result.startswith("error"):
        sys.exit(1)
