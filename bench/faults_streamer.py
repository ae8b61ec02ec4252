"""Interrupt sweeps of the streamer on demand: a KeyboardInterrupt at every line it executes, outcomes counted.

    python bench/faults_streamer.py                    # every executed line, every config (a few minutes)
    python bench/faults_streamer.py --every site       # each distinct site once (what tests/ runs in CI)
    python bench/faults_streamer.py --cases open --configs 0

Cases (tests/fault_injection.py has the trials and what each outcome means):

    forward-cold  the first forward after open() interrupted at each point
    forward-warm  the second forward (its schedule learned, prefetch wrapping around) interrupted at each point
    open          BlockStreamer.open() interrupted at each point, and from the progress callback at each call
    stream        distorch.stream() interrupted at each point inside the streamer
    close         close() interrupted at each point, unstaging (distorch.stream's handle) and keeping the staged
                  buffers (ComfyUI's unload)

Exit code 1 when any trial is not "ok".
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from fault_injection import (  # noqa: E402
    CLOSE_MODES,
    CONFIGS,
    FORWARD_PHASES,
    KINDS,
    close_trial,
    forward_trial,
    open_trial,
    run_sweep,
)

CASES = ("forward-cold", "forward-warm", "open", "stream", "close")


def main() -> int:
    args = parse_args()
    configs = [CONFIGS[i] for i in args.configs]
    print(f"# {platform.machine()} {platform.system()}, Python {platform.python_version()}; "
          f"every {args.every}; configs: {', '.join(map(str, configs))}")
    totals: dict[str, Counter] = {}
    for case in args.cases:
        totals[case] = Counter()
        for config in configs:
            for sweep in sweeps(case, config, args.every):
                totals[case].update(sweep.counts)
                for failure in sweep.failures(args.show):
                    print(f"    {failure}")
    print("| case | tries | " + " | ".join(KINDS) + " |")
    print("|---|---|" + "---|" * len(KINDS))
    for case, counts in totals.items():
        print(f"| {case} | {sum(counts.values())} | " + " | ".join(str(counts[k]) for k in KINDS) + " |")
    return 1 if any(counts[k] for counts in totals.values() for k in KINDS if k != "ok") else 0


def sweeps(case: str, config, every: str):
    if case.startswith("forward-"):
        phase = case.removeprefix("forward-")
        assert phase in FORWARD_PHASES
        runs = [(forward_trial, phase, every)]
    elif case == "open":
        runs = [(open_trial, "open", every), (open_trial, "open", "progress")]
    elif case == "stream":
        runs = [(open_trial, "stream", every)]
    else:
        runs = [(close_trial, mode, every) for mode in CLOSE_MODES]
    for trial, mode, points in runs:
        start = time.perf_counter()
        sweep = run_sweep(trial, config, mode, points)
        counts = ", ".join(f"{k} {n}" for k, n in sorted(sweep.counts.items()))
        print(f"{case:13} {mode:7} {points:8} {config}: {len(sweep.outcomes)} points: {counts} "
              f"({time.perf_counter() - start:.1f} s)", flush=True)
        yield sweep


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--every", choices=("line", "site"), default="line")
    parser.add_argument("--configs", nargs="+", type=int, default=list(range(len(CONFIGS))),
                        help=f"indices into {[str(c) for c in CONFIGS]}")
    parser.add_argument("--show", type=int, default=3, help="failures listed per sweep")
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(main())
