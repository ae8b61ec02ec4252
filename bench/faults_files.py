"""A model file changed under a loaded model, counted (issue #17): what random faults do to a streamed model.

    python bench/faults_files.py                          # this checkout
    python bench/faults_files.py --pack /tmp/before       # another checkout of the pack, e.g. the one before the fix:
                                                          #   git worktree add /tmp/before 60fc65b
    python bench/faults_files.py --load-cost              # one disk-tier block load, timed (also with --pack)

Cases (compute on the CPU; ToyDiTs from tests/file_faults.py, GGUF and safetensors trials alternating, the rest of
the model in RAM as a GPU run keeps it in VRAM):
- truncate, disk tier: a child process streams the file with every block on the disk tier, runs a forward, the
  file is truncated to a uniformly random share of its size, and the child runs one more forward;
- truncate, staging: the file is truncated to a random share after planning, before staging (RAM roomy);
- rewrite in place, disk tier: a prefix of random length of another model of the same shapes is written over the
  file (a `cp` over it, finished or not; same inode) between two forwards, then two more forwards;
- replaced by rename / deleted, disk tier: two forwards after, then a re-plan: does it count the staging as RAM?
Outcomes of a forward: right (bit-exact), wrong (no error), error (the exception type), signal (the child died).
Children run two at a time. The pack under test is imported from --pack; the helpers from this checkout's tests/.
"""

import argparse
import functools
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def _import_path(pack: Path) -> None:
    # The pack under test first (its distorch and tests/memory_models), then this checkout's tests/file_faults.py.
    sys.path[:0] = [str(pack), str(pack / "tests"), str(HERE / "tests")]


def truncation_trials(pack: Path, tier: str, trials: int, seed: int) -> Counter:
    import file_faults

    chooser = random.Random(seed)
    with tempfile.TemporaryDirectory() as directory:
        sources = {kind: file_faults.write_aged(kind, Path(directory) / f"source-{kind}") for kind in file_faults.KINDS}
        jobs = [(i, file_faults.KINDS[i % 2], chooser.random()) for i in range(trials)]

        def run(job) -> str:
            index, kind, fraction = job
            path = Path(directory) / f"trial-{index}"
            path.write_bytes(sources[kind].read_bytes())
            os.utime(path, ns=(os.stat(sources[kind]).st_mtime_ns,) * 2)
            child = subprocess.run([sys.executable, __file__, "--pack", str(pack), "--child", kind, str(path), tier,
                                    str(fraction)], capture_output=True, text=True, timeout=300)
            path.unlink()
            if child.returncode < 0:
                return f"signal {-child.returncode}"
            lines = child.stdout.strip().splitlines()
            return _kind_of(lines[-1] if lines else f"exit {child.returncode}: {child.stderr.strip()[-200:]}")

        with ThreadPoolExecutor(2) as pool:
            return Counter(pool.map(run, jobs))


def _model_and_other(directory: Path, index: int):
    """A model file (GGUF or safetensors by turn) loaded, its resident output, and another file of the same shapes."""
    import file_faults
    from memory_models import forward

    kind = file_faults.KINDS[index % 2]
    path = file_faults.write_aged(kind, directory / f"model-{index}")
    other = file_faults.write_aged(kind, directory / f"other-{index}", seed=1 + index)
    model = file_faults.load(kind, path)
    return path, other, model, forward(model)


def rewrite_trials(trials: int, seed: int) -> Counter:
    import file_faults
    import torch
    from memory_models import forward

    import distorch
    from distorch.ledger import Ledger

    chooser = random.Random(seed)
    outcomes = Counter()
    with tempfile.TemporaryDirectory() as directory:
        for index in range(trials):
            path, other, model, expected = _model_and_other(Path(directory), index)
            with distorch.stream(model, file_faults.plan(model, "disk"), ledger=Ledger()):
                assert torch.equal(forward(model), expected)
                end = chooser.randint(1, path.stat().st_size)
                file_faults.rewrite_in_place(path, other, 0, end)
                seen = _two_forwards(model, expected)
            outcomes[_worst(seen)] += 1
            del model
            path.unlink()
            other.unlink()
    return outcomes


def replace_trials(how: str, trials: int) -> Counter:
    import file_faults
    import torch
    from memory_models import forward

    import distorch
    from distorch.ledger import Ledger
    from distorch.units import GIB

    outcomes = Counter()
    with tempfile.TemporaryDirectory() as directory:
        for index in range(trials):
            path, other, model, expected = _model_and_other(Path(directory), index)
            with distorch.stream(model, file_faults.plan(model, "disk"), ledger=Ledger()):
                assert torch.equal(forward(model), expected)
                file_faults.replace_by_rename(path, other) if how == "rename" else path.unlink()
                seen = _two_forwards(model, expected)
            blocks = distorch.discover(model).block_bytes
            again = distorch.plan(model, compute_device="cpu", virtual_vram_gb=blocks / GIB,
                                  memory=file_faults.ROOMY, ledger=Ledger())
            counted = again.ram_added >= again.streamed_bytes
            outcomes[f"{_worst(seen)}, re-plan {'counts' if counted else 'undercounts'} the staging"] += 1
            del model
            path.unlink(missing_ok=True)
            other.unlink()
    return outcomes


def load_cost(dim: int, loads: int) -> dict:
    """Milliseconds for one disk-tier block load into a slot (page cache warm), median of `loads`."""
    import file_faults
    from memory_models import load_model, write_model

    import distorch
    from distorch.ledger import Ledger

    with tempfile.TemporaryDirectory() as directory:
        path = write_model("gguf", Path(directory) / "model.gguf", dim, 6)
        path.read_bytes()  # into the page cache
        model = load_model("gguf", path, dim, 6)
        with distorch.stream(model, file_faults.plan(model, "disk"), ledger=Ledger()) as handle:
            streamer = handle.streamer
            times = []
            for index in range(loads):
                block = index % len(streamer._blocks)
                start = time.perf_counter()
                streamer._load(block, 0)
                times.append(time.perf_counter() - start)
            nbytes = streamer._blocks[0].nbytes
            clusters = len(streamer._blocks[0].clusters)
    median = statistics.median(times)
    return {"block_mb": nbytes / 2**20, "clusters": clusters, "ms": median * 1e3, "gb_s": nbytes / median / 1e9}


def _two_forwards(model, expected) -> list[str]:
    import file_faults
    from memory_models import forward

    return [_kind_of(file_faults.outcome(expected, functools.partial(forward, model))) for _ in range(2)]


def _kind_of(line: str) -> str:
    """An outcome line without its message: "right", "wrong", "error ModelFileChanged", ..."""
    return line.split(":", 1)[0]


def _worst(seen: list[str]) -> str:
    for kind in ("wrong", "error", "right"):
        found = [s for s in seen if s.startswith(kind)]
        if found:
            return found[0]
    return seen[0]


def _table(case: str, outcomes: Counter) -> str:
    tries = sum(outcomes.values())
    return f"{case:<32} {tries:>5}  " + "; ".join(f"{n} {o}" for o, n in outcomes.most_common())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--pack", type=Path, default=HERE, help="checkout of the pack to test (default: this one)")
    parser.add_argument("--trials", type=int, nargs=4, default=[96, 48, 144, 16],
                        metavar=("TRUNCATE_DISK", "TRUNCATE_STAGING", "REWRITE", "REPLACE"))
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--load-cost", action="store_true", help="time one disk-tier block load instead")
    parser.add_argument("--child", nargs=4, metavar=("KIND", "FILE", "TIER", "FRACTION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    _import_path(args.pack.resolve())
    # torch repeats the error of a streamer's end-of-pass hook as a warning; the outcome already records it.
    warnings.filterwarnings("ignore", message="module forward hook with ``always_call=True``")
    if args.child:
        import file_faults

        kind, file, tier, fraction = args.child
        sys.stdout.write(file_faults.child(kind, Path(file), tier, float(fraction)) + "\n")
        return
    if args.load_cost:
        for dim in (128, 1024):
            cost = load_cost(dim, 200)
            sys.stdout.write(f"pack {args.pack}: block {cost['block_mb']:.2f} MB in {cost['clusters']} clusters: "
                             f"{cost['ms']:.3f} ms per load ({cost['gb_s']:.2f} GB/s)\n")
        return
    truncate_disk, truncate_staging, rewrite, replace = args.trials
    sys.stdout.write(f"pack {args.pack}, seed {args.seed}\n{'case':<32} {'tries':>5}  outcomes\n")
    rows = [
        ("truncate, disk tier", lambda: truncation_trials(args.pack, "disk", truncate_disk, args.seed)),
        ("truncate, staging", lambda: truncation_trials(args.pack, "staging", truncate_staging, args.seed + 1)),
        ("rewrite in place, disk tier", lambda: rewrite_trials(rewrite, args.seed + 2)),
        ("replaced by rename, disk tier", lambda: replace_trials("rename", replace)),
        ("deleted, disk tier", lambda: replace_trials("delete", replace)),
    ]
    for case, run in rows:
        sys.stdout.write(_table(case, run()) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
