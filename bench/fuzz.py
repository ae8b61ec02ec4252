"""Fuzzing on demand: 10,000+ seeded mutants per target, counts per outcome, escapes listed for replay.

    python bench/fuzz.py                                  # every target, 10,000 mutants each, seed 13
    python bench/fuzz.py --iterations 50000 --targets gguf expert --seed 7
    python bench/fuzz.py --markdown docs/fuzzing.md       # also rewrite the results section of that file

The targets and the rules for "ok", "error" and "escape" are in tests/fuzzing.py (tests/test_fuzz.py runs a
few hundred of each in CI). Exit code 1 when anything escaped. Mutant i of a target is rebuilt from
`random.Random(f"{seed}:{target}:{i}")`, so an escape is replayed with
`run_target(target, i + 1, seed, workdir)`.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
from fuzzing import TARGETS, Report, run_target  # noqa: E402

RESULTS_MARKER = "<!-- results: bench/fuzz.py writes below this line -->"


def main() -> int:
    args = parse_args()
    reports = []
    with tempfile.TemporaryDirectory(prefix="distorch-fuzz-") as scratch:
        for target in args.targets:
            start = time.perf_counter()
            report = run_target(target, args.iterations, args.seed, Path(scratch) / target)
            seconds = time.perf_counter() - start
            reports.append((report, seconds))
            print(summary_line(report, seconds), flush=True)
            for escape in report.escapes:
                print(f"    {escape}")
    table = markdown(reports, args)
    print(table)
    if args.markdown:
        write_results(args.markdown, table)
    return 1 if any(report.escaped for report, _ in reports) else 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=10_000, help="mutants per target (default 10,000)")
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS))
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--markdown", type=Path, help="rewrite the results section of this markdown file")
    return parser.parse_args()


def summary_line(report: Report, seconds: float) -> str:
    counts = ", ".join(f"{key}: {n}" for key, n in report.counts.most_common())
    return (f"{report.target}: {report.iterations} mutants in {seconds:.0f} s (slowest {report.slowest:.2f} s); "
            f"{counts}")


def markdown(reports: list[tuple[Report, float]], args: argparse.Namespace) -> str:
    lines = [
        f"Run {datetime.date.today().isoformat()} on {platform.machine()} {platform.system()} "
        f"({os.cpu_count()} CPUs), "
        f"Python {platform.python_version()}, torch {torch.__version__}: "
        f"`python bench/fuzz.py --iterations {args.iterations} --seed {args.seed}`",
        "",
        "| target | mutants | ok | expected error | escapes | slowest mutant | wall time |",
        "|---|---|---|---|---|---|---|",
    ]
    for report, seconds in reports:
        errors = sum(n for key, n in report.counts.items() if key.startswith("error"))
        lines.append(f"| {report.target} | {report.iterations:,} | {report.counts['ok']:,} | {errors:,} | "
                     f"{report.escaped} | {report.slowest:.2f} s | {seconds:.0f} s |")
    escapes = [f"- {report.target} {escape}" for report, _ in reports for escape in report.escapes]
    return "\n".join(lines + ([""] + escapes if escapes else []))


def write_results(path: Path, table: str) -> None:
    text = path.read_text() if path.exists() else RESULTS_MARKER + "\n"
    head, _, results = text.partition(RESULTS_MARKER)
    later = results[results.find("\n## "):] if "\n## " in results else ""  # sections after the results stay
    path.write_text(f"{head}{RESULTS_MARKER}\n\n{table}\n{later}")


if __name__ == "__main__":
    sys.exit(main())
