"""Seeded fuzzing of every parser that takes untrusted input, shared by tests/test_fuzz.py and bench/fuzz.py.

Targets (each mutant is built from its own `random.Random(f"{seed}:{target}:{index}")`, so any escape can be
replayed from its index):

    gguf            a mutated GGUF file through `gguf_loader.read_gguf`, then `.dequantize()` of every tensor:
                    anything but GGUFError is an escape
    gguf-plan       a mutated GGUF file through `python -m distorch plan` (the CLI's `main`, in-process)
    safetensors-plan  a mutated safetensors header (structure-aware and byte-level) through the same entry point

A share (HOSTILE_RATE) of the file mutants are instead well-formed but hostile files, each just past one bound on what
a header may cost (tests/hostile_files.py: nested arrays, long strings, header bytes, keys, array items, tensors,
overlapping tensor data, JSON containers and commas): those must end in an error whose message says which bound,
and one that is accepted is an escape.
    expert          a generated/mutated expert allocation string through `plan --expert=...`

A CLI outcome is "ok" (exit 0), "error" (exit 2, one line on stderr, at most MAX_ERROR_CHARS, naming the file
for header errors) or an escape: any exception, any other exit code, a traceback, a multi-line or longer
message, or a mutant that takes longer than SLOW_SECONDS.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import signal
import struct
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from ggml_samples import random_blocks
from gguf import GGML_QUANT_SIZES
from hostile_files import HOSTILE_GGUF, HOSTILE_SAFETENSORS, write_hostile

from distorch.cli import main as cli_main
from gguf_loader import GGUFError, GGUFFileWriter, dequantize, read_gguf, supported_qtypes
from gguf_loader.torch_dtypes import PLAIN_TORCH_DTYPES

MAX_ERROR_CHARS = 400
SLOW_SECONDS = 10.0  # a mutant taking longer is an escape ("slow"); the slowest take 0.5-3 s on a busy 2-core VM
HANG_SECONDS = 30.0  # one taking this long is interrupted and counted as a hang
TARGETS = ("gguf", "gguf-plan", "safetensors-plan", "expert")
HOSTILE_RATE = 0.03  # share of file mutants that are well-formed but hostile (tests/hostile_files.py)
# A card that any mutant fits, one that fits nothing but the reserve, and one in between: the CLI answers from
# the header alone, and without --virtual-vram-gb it searches the smallest value that fits.
_VRAM_GB = ("24", "24", "24", "2.0001", "2.000001", "0")


def plan_args(rng: random.Random) -> list[str]:
    return ["--vram-gb", rng.choice(_VRAM_GB), "--ram-gb", "64"]


@dataclass(frozen=True)
class Outcome:
    kind: str  # "ok", "error" or "escape"
    detail: str  # for errors the exception type, for escapes what went wrong
    message: str = ""  # for errors the message the user sees


@dataclass
class Report:
    """Counts per outcome of one target, with the first escapes in full."""

    target: str
    seed: int
    iterations: int = 0
    counts: Counter = field(default_factory=Counter)  # "ok", "error: GGUFError", "escape: ..." -> mutants
    escapes: list[str] = field(default_factory=list)  # "mutant 17: ..." (the first 20)
    slowest: float = 0.0  # seconds

    @property
    def escaped(self) -> int:
        return sum(n for key, n in self.counts.items() if key.startswith("escape"))

    def add(self, index: int, outcome: Outcome, seconds: float) -> None:
        self.iterations += 1
        self.slowest = max(self.slowest, seconds)
        if outcome.kind == "escape" or seconds > SLOW_SECONDS:
            detail = outcome.detail if outcome.kind == "escape" else f"slow ({seconds:.1f} s)"
            self.counts[f"escape: {detail.splitlines()[0][:80]}"] += 1
            if len(self.escapes) < 20:
                self.escapes.append(f"mutant {index}: {detail}")
        else:
            self.counts[outcome.kind if outcome.kind == "ok" else f"error: {outcome.detail}"] += 1


def run_target(target: str, iterations: int, seed: int, workdir: Path) -> Report:
    """Runs `iterations` mutants of `target` in `workdir` (a scratch folder)."""
    workdir.mkdir(parents=True, exist_ok=True)
    mutant = _MUTANTS[target](workdir)
    report = Report(target, seed)
    for index in range(iterations):
        rng = random.Random(f"{seed}:{target}:{index}")
        start = time.perf_counter()
        try:
            with _time_limit(HANG_SECONDS):
                outcome = mutant(rng, index)
        except _Hang:
            outcome = Outcome("escape", f"hang: interrupted after {HANG_SECONDS:.0f} s")
        report.add(index, outcome, time.perf_counter() - start)
    return report


class _Hang(BaseException):
    """Raised by the alarm inside a mutant that runs too long (a BaseException: no `except Exception` eats it)."""


@contextlib.contextmanager
def _time_limit(seconds: float):
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield  # no alarms here: a hang hangs the run, as it would without this guard
        return

    def interrupt(signum, frame):
        raise _Hang()

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# -- the GGUF reader and dequantization ------------------------------------------------------------------

def seed_gguf(path: Path) -> bytes:
    """A small valid file: one tensor of every dequantizable type (1 to 3 blocks, some reshaped by an
    orig_shape key), float tensors and metadata of every kind."""
    writer = GGUFFileWriter(path, architecture="flux")
    writer.add_metadata("general.name", "fuzz seed")
    writer.add_metadata("tokenizer.ggml.tokens", ["<s>", "</s>", "hello", "wörld"])
    writer.add_metadata("tokenizer.ggml.scores", [0.0, -1.5, 2.25, 3.0])
    writer.add_metadata("fuzz.flag", True)
    for index, qtype in enumerate(supported_qtypes()):
        if qtype in PLAIN_TORCH_DTYPES:
            continue
        block_size, _ = GGML_QUANT_SIZES[qtype]
        n_blocks = 1 + index % 3
        shape = (n_blocks, block_size) if index % 2 else (n_blocks * block_size,)
        writer.add_tensor(f"blocks.{index % 4}.{qtype.name.lower()}.weight",
                          random_blocks(qtype, n_blocks, seed=index), qtype.name, shape=shape)
    generator = torch.Generator().manual_seed(0)
    writer.add_tensor("img_in.weight", torch.randn(4, 8, generator=generator))
    writer.add_tensor("blocks.0.norm.scale", torch.randn(8, generator=generator).half())
    writer.add_tensor("blocks.1.norm.scale", torch.randn(8, generator=generator).bfloat16())
    writer.add_tensor("conv.weight", torch.randn(2, 2, 2, 2, 2, generator=generator))  # 5-D: orig_shape
    writer.write()
    return path.read_bytes()


def mutate_bytes(data: bytes, rng: random.Random, hot: int) -> bytes:
    """One to three byte-level mutations, mostly in the first `hot` bytes (header, metadata, tensor table)."""
    mutated = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 3))):
        if not mutated:
            break
        where = rng.randrange(min(len(mutated), hot)) if rng.random() < 0.8 else rng.randrange(len(mutated))
        kind = rng.randrange(7)
        if kind == 0:
            return bytes(mutated[:rng.randrange(len(mutated))])  # truncate
        if kind == 1:
            mutated[where] ^= 1 << rng.randrange(8)
        elif kind == 2:
            mutated[where] = rng.randrange(256)
        elif kind == 3:  # an extreme or small count/length/offset/type over a 4- or 8-byte field
            width = rng.choice((4, 8))
            value = rng.choice((0, 1, 2, 3, 31, 32, 255, 2**31 - 1, 2**31, 2**32 - 1, 2**62, 2**63, 2**64 - 1,
                                rng.randrange(4096), rng.randrange(2**width * 8) % 2**(width * 8)))
            mutated[where:where + width] = (value % 2**(width * 8)).to_bytes(width, "little")
        elif kind == 4:
            del mutated[where:where + rng.randint(1, 16)]
        elif kind == 5:
            mutated[where:where] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        else:  # copy a chunk over another place (duplicates names, counts and type ids)
            source = rng.randrange(len(mutated))
            size = rng.randint(1, 32)
            mutated[where:where + size] = mutated[source:source + size]
    return bytes(mutated)


class Hostile(NamedTuple):
    kind: str
    fragment: str  # what its error message must say
    path: Path


class _FileTarget:
    """Writes each mutant to a fresh file: an earlier mutant's tensors may still map the previous one."""

    def __init__(self, workdir: Path, suffix: str):
        self.path = workdir / f"mutant{suffix}"
        self.written: dict[str, Hostile] = {}  # hostile kind -> its file

    def hostile(self, rng: random.Random, kinds: dict) -> Hostile | None:
        """For a HOSTILE_RATE share of mutants a hostile file of a random kind (each kind written once: its bytes
        never change), otherwise None."""
        if rng.random() >= HOSTILE_RATE:
            return None
        kind = rng.choice(sorted(kinds))
        if kind not in self.written:
            path = self.path.with_name(f"hostile-{kind}{self.path.suffix}")
            self.written[kind] = Hostile(kind, write_hostile(kind, path), path)
        return self.written[kind]

    def write(self, data: bytes, size: int | None = None) -> Path:
        """`data`, then zeros up to `size` bytes (a sparse file: large data sections cost no disk)."""
        self.path.unlink(missing_ok=True)
        with open(self.path, "wb") as handle:
            handle.write(data)
            if size is not None and size > len(data):
                handle.truncate(size)
        return self.path


def _gguf_reader(workdir: Path) -> Callable[[random.Random, int], Outcome]:
    original = seed_gguf(workdir / "seed.gguf")
    files = _FileTarget(workdir, ".gguf")

    def run(rng: random.Random, index: int) -> Outcome:
        hostile = files.hostile(rng, HOSTILE_GGUF)
        path = hostile.path if hostile else files.write(mutate_bytes(original, rng, hot=2048))
        try:
            gguf_file = read_gguf(path)
            for tensor in gguf_file.tensors.values():
                dequantize(tensor)
        except GGUFError as error:
            return _expected(hostile, _error_outcome(error, path.name))
        except Exception as error:  # noqa: BLE001 - the point: everything else is an escape
            return Outcome("escape", _describe(error))
        return _expected(hostile, Outcome("ok", ""))

    return run


def _expected(hostile: Hostile | None, outcome: Outcome) -> Outcome:
    """A hostile file must be refused by its bound: accepted, or refused for another reason, is an escape."""
    if hostile is None or outcome.kind == "escape":
        return outcome
    kind, fragment = hostile.kind, hostile.fragment
    if outcome.kind == "ok":
        return Outcome("escape", f"hostile file {kind} accepted")
    if fragment not in outcome.message:
        return Outcome("escape", f"hostile file {kind}: error does not say {fragment!r}: {outcome.message[:200]!r}")
    return outcome


def _error_outcome(error: Exception, name: str) -> Outcome:
    message = str(error)
    if "\n" in message or len(message) > MAX_ERROR_CHARS or name not in message:
        return Outcome("escape", f"{type(error).__name__} message not one bounded line naming the file: "
                                 f"{message[:300]!r} ({len(message)} chars)")
    return Outcome("error", type(error).__name__, message)


def _describe(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return f"{type(error).__name__}{where}: {str(error)[:300]}"


# -- the CLI entry point -------------------------------------------------------------------------------------

def plan_in_process(argv: list[str], names: str | None) -> Outcome:
    """`python -m distorch plan ...` through `distorch.cli.main`, judged as a user sees it."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli_main(argv)
    except SystemExit as stop:  # argparse
        code = stop.code
    except Exception as error:  # noqa: BLE001 - a traceback is exactly what must never reach the user
        return Outcome("escape", _describe(error))
    message = err.getvalue()
    if code == 0:
        return Outcome("ok", "") if not message else Outcome("escape", f"exit 0 with stderr {message[:200]!r}")
    if code != 2:
        return Outcome("escape", f"exit code {code!r}: {message[:300]!r}")
    if message.count("\n") != 1 or len(message) > MAX_ERROR_CHARS or "Traceback" in message:
        return Outcome("escape", f"not one bounded line ({len(message)} chars): {message[:300]!r}")
    if names is not None and names not in message:
        return Outcome("escape", f"does not name {names}: {message[:300]!r}")
    return Outcome("error", "exit 2", message)


def _gguf_plan(workdir: Path) -> Callable[[random.Random, int], Outcome]:
    original = seed_gguf(workdir / "seed.gguf")
    files = _FileTarget(workdir, ".gguf")

    def run(rng: random.Random, index: int) -> Outcome:
        hostile = files.hostile(rng, HOSTILE_GGUF)
        path = hostile.path if hostile else files.write(mutate_bytes(original, rng, hot=2048))
        return _expected(hostile, plan_in_process(["plan", str(path), *plan_args(rng)], path.name))

    return run


# -- safetensors headers -----------------------------------------------------------------------------------

def seed_safetensors_header() -> dict:
    """A header like a small DiT's: blocks with several tensors, a rest, metadata; offsets back to back."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    names = [("img_in.weight", "F32", [4, 8])]
    for block in range(4):
        names += [(f"blocks.{block}.attn.qkv.weight", "BF16", [12, 4]), (f"blocks.{block}.mlp.0.weight", "F16", [8, 4]),
                  (f"blocks.{block}.norm.scale", "F8_E4M3", [4])]
    names.append(("final.weight", "F4", [2, 8]))
    for name, dtype, shape in names:
        nbytes = _element_count(shape) * {"F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F4": 0.5}[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + int(nbytes)]}
        offset += int(nbytes)
    return header


def _element_count(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def random_json(rng: random.Random, depth: int = 0):
    """A hostile JSON value: wrong types, extreme numbers, long strings and lists, deep nesting."""
    kind = rng.randrange(12)
    if kind == 0:
        return rng.choice((0, 1, -1, 2**31, 2**63, 2**64, 10**30, -(10**30), 10**rng.randint(300, 4000),
                           _Raw("7" * 5000)))  # past Python's 4300-digit int conversion limit
    if kind == 1:
        return rng.choice((0.5, -0.0, 1e308, 1e-320, 3.0))
    if kind == 2:
        return rng.choice((True, False, None))
    if kind == 3:
        return rng.choice(("", "F32", "f32", "F8_E4M3", "F4", "C64", "Q4_0", "\u0000", "\ud7ff" * 3, "²", "١٢"))
    if kind == 4:
        return "x" * rng.choice((100, 10_000, 1_000_000))
    if kind == 5:
        return [rng.randrange(10)] * rng.choice((0, 1, 2, 3, 5, 1000, 200_000))
    if kind == 6:
        return [rng.choice((0, 1, 2**40, -5, 7)) for _ in range(rng.randint(0, 6))]
    if kind == 7:  # nesting up to past the JSON parser's recursion limit
        width = rng.choice((10, 500, 5000))
        return _Raw("[" * width + "]" * width)
    if kind == 8 and depth < 3:
        return {random_key(rng): random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    if kind == 9 and depth < 3:
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if kind == 10:
        return [rng.randrange(1000), rng.randrange(1000)]
    return rng.randrange(-3, 10_000)


def random_key(rng: random.Random) -> str:
    return rng.choice(("dtype", "shape", "data_offsets", "__metadata__", "blocks.1.x", "blocks.².x", "blocks.١.x",
                       "blocks.1.²", "a" * 300_000, "", ".", "blocks..x", "blocks.0.attn.qkv.weight",
                       "blocks.99.mlp.0.weight", "blocks.0", "blocks.00.x", "blocks." + "9" * 5000 + ".x"))


class _Raw:
    """JSON text spliced in verbatim: nesting json.dumps would recurse into, or an int it refuses to print."""

    def __init__(self, text: str):
        self.text = text


def _dumps(value) -> str:
    raw: list[str] = []

    def placeholder(item):
        if not isinstance(item, _Raw):
            raise TypeError(type(item))
        raw.append(item.text)
        return f"\x00raw{len(raw) - 1}\x00"

    text = json.dumps(value, default=placeholder)
    for index, piece in enumerate(raw):
        text = text.replace(f'"\\u0000raw{index}\\u0000"', piece, 1)
    return text


def mutate_safetensors(header: dict, data_size: int, rng: random.Random) -> tuple[bytes, int]:
    """A structural mutation of the header, sometimes byte-level damage; returns the header bytes (length field
    included) and the file size (the data section is zeros)."""
    seed = header
    header = json.loads(json.dumps(header))
    tensors = [name for name in header if name != "__metadata__"]
    for _ in range(rng.choice((1, 1, 2, 3))):
        name = rng.choice(tensors)
        entry = header.get(name)
        if not isinstance(entry, dict):  # an earlier mutation replaced it: start from the seed's entry again
            entry = header[name] = dict(seed[name])
        kind = rng.randrange(9)
        if kind == 0:
            entry[rng.choice(("dtype", "shape", "data_offsets"))] = random_json(rng)
        elif kind == 1:
            header[name] = random_json(rng)
        elif kind == 2:
            header[random_key(rng)] = random_json(rng)
        elif kind == 3:  # overlapping, reversed, shifted or shared spans
            begin, end = seed[name]["data_offsets"]
            other = seed[rng.choice(tensors)]["data_offsets"]
            entry["data_offsets"] = rng.choice(([end, begin], [begin + 1, end + 1], list(other),
                                                [begin, end + rng.randint(1, 64)], [0, data_size]))
        elif kind == 4:
            entry.pop("data_offsets" if rng.random() < 0.5 else "dtype", None)
        elif kind == 5:
            entry["shape"] = [rng.choice((0, 1, 2, 3, 4, 8, 2**33)) for _ in range(rng.randint(0, 9))]
        elif kind == 6:
            entry["dtype"] = rng.choice(("F32", "BF16", "F4", "F6_E2M3", "C64", "U64", "BOOL", "Q8"))
        elif kind == 7:
            del header[name]
        else:  # a valid tensor under a hostile name (block indices in other scripts, huge, empty)
            header[random_key(rng)] = header.pop(name)
    if rng.random() < 0.1:  # a large tensor (up to 8 GiB, sparse) beside tiny blocks: a long plan search
        size = rng.choice((2**20, 2**27, 2**33))
        header["big.weight"] = {"dtype": "U8", "shape": [size], "data_offsets": [data_size, data_size + size]}
        for block in range(2):
            header[f"tiny.{block}.a.w"] = {"dtype": "U8", "shape": [1], "data_offsets": [data_size + size + block,
                                                                                     data_size + size + block + 1]}
        data_size += size + 2
    text = _dumps(header).encode()
    if rng.random() < 0.3:
        text = mutate_bytes(text, rng, hot=len(text))
    length = len(text)
    if rng.random() < 0.1:
        length = rng.choice((0, 1, length - 1, length + 1, 2**64 - 1, 100 * 2**20 + 1, rng.randrange(2**40)))
    return struct.pack("<Q", length % 2**64) + text, 8 + len(text) + data_size


def _safetensors_plan(workdir: Path) -> Callable[[random.Random, int], Outcome]:
    header = seed_safetensors_header()
    data_size = max(end for name, info in header.items() if name != "__metadata__"
                    for end in info["data_offsets"][1:])
    files = _FileTarget(workdir, ".safetensors")

    def run(rng: random.Random, index: int) -> Outcome:
        hostile = files.hostile(rng, HOSTILE_SAFETENSORS)
        path = hostile.path if hostile else files.write(*mutate_safetensors(header, data_size, rng))
        return _expected(hostile, plan_in_process(["plan", str(path), *plan_args(rng)], path.name))

    return run


# -- expert allocation strings -------------------------------------------------------------------------------

_DEVICES = ("cpu", "cuda:0", "cuda:1", "cuda:2", "CUDA:0", " cuda:0 ", "cuda", "cuda:01", "cuda:-1", "gpu:0",
            "cuda:99999999999999999999", "cpu:0", "", "cuda:٣", "İ")
_VALUES = ("*", "2.5gb", "4GB", "25%", "75%", "0.5", "1", "0", ".5", "1.", "1.5t", "10mb", "512k", "3b", "-1gb",
           "nan", "inf", "1e3gb", "0x10", "%", "gb", "5gb*", "100%", "1" + "0" * 300 + "gb", "9" * 5000, "١gb",
           "2000000000gb", "0.0001", " 2 gb ")


_SANE_MODES = (("1gb", "0.5gb", "100mb", "2.5gb", "*"), ("25%", "50%", "75%", "100%", "*"), ("0.1", "0.5", "1", "*"))


def random_expert(rng: random.Random) -> str:
    if rng.random() < 0.4:  # well-formed strings of one mode, so the planner sees many valid specs
        values = rng.choice(_SANE_MODES)
        devices = rng.sample(("cpu", "cuda:0", "cuda:1"), rng.randint(1, 3))
        return ";".join(f"{device},{rng.choice(values)}" for device in devices)
    entries = [f"{rng.choice(_DEVICES)}{rng.choice((',', ',', ',', '', ', ', ',,'))}{rng.choice(_VALUES)}"
               for _ in range(rng.randint(1, 4))]
    text = rng.choice((";", ";", "; ", ";;", "#", "\n")).join(entries)
    if rng.random() < 0.3:
        text += rng.choice((";", "#", ";cpu,*", "*"))
    if rng.random() < 0.3:
        raw = bytearray(text.encode())
        text = mutate_bytes(bytes(raw), rng, hot=len(raw) or 1).decode("utf-8", "replace")
    if rng.random() < 0.05:
        text = text * rng.choice((2, 100, 3000))
    return text


def _expert_plan(workdir: Path) -> Callable[[random.Random, int], Outcome]:
    path = workdir / "model.safetensors"
    header = seed_safetensors_header()
    data_size = max(info["data_offsets"][1] for name, info in header.items() if name != "__metadata__")
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(data_size))

    def run(rng: random.Random, index: int) -> Outcome:
        return plan_in_process(["plan", str(path), *plan_args(rng), f"--expert={random_expert(rng)}"], None)

    return run


_MUTANTS = {"gguf": _gguf_reader, "gguf-plan": _gguf_plan, "safetensors-plan": _safetensors_plan,
            "expert": _expert_plan}


def scratch_dir(base: str | os.PathLike, target: str) -> Path:
    return Path(base) / target.replace("-", "_")
