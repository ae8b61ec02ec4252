"""Host RAM of streamed models: peak and steady RSS ÷ model bytes, by share streamed, source and model count.

    python bench/memory.py                      # Wan-like blocks, ~600 MB per model
    python bench/memory.py --depth 40 --dim 640 --ffn 1728 --gguf-dim 1280 --gguf-ffn 3456 --models 1 2

Each case runs in a fresh process: load the model(s) from a file, read every page, then stream them on the CPU
(`distorch.plan` + `distorch.stream`, compute "cpu", so the slots are RAM too) and run one forward. Columns:
- steady: RSS after the forward (gc + malloc_trim), minus the process's RSS before any model was loaded;
- peak: the process's high-water mark while `distorch.stream` staged the blocks (reset just before), minus the
  same baseline;
- loaded: the same after loading the model(s) and reading every page, before streaming (the loader's own
  overhead is in it, not ours).
Sources: "safetensors" (float32, read with safetensors and copied into the model, as ComfyUI loads a checkpoint
under --cpu) and "gguf" (Q8_0 Linear weights viewed in place in the file's mapping, as the DisTorch GGUF loader
leaves them). The blocks have Wan 2.1's proportions (MLP 2.7 x the width, 40 blocks), scaled down in width; the
GGUF model is twice as wide, so its Q8_0 blocks are as large as the float32 ones (~15 MB).
Goals (issue #8): steady <= 1.05 x model bytes + slots; peak during staging <= model bytes + one block, where
"model bytes" for the peak is the loaded RSS (the file reader's own overhead is not staging's), with 1 % of the
model for allocator noise.
"""

import argparse
import ctypes
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import distorch  # noqa: E402
from distorch.toy import ToyDiT  # noqa: E402
from distorch.units import GIB, MIB  # noqa: E402

SOURCES = ("safetensors", "gguf")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=640)
    parser.add_argument("--ffn", type=int, default=1728, help="MLP width (Wan 2.1 14B: 13824 for dim 5120)")
    parser.add_argument("--gguf-dim", type=int, default=1280)
    parser.add_argument("--gguf-ffn", type=int, default=3456)
    parser.add_argument("--depth", type=int, default=40)
    parser.add_argument("--shares", type=int, nargs="+", default=[0, 25, 50, 75, 100])
    parser.add_argument("--models", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(run_case(json.loads(args.worker))))
        return 0
    with tempfile.TemporaryDirectory(prefix="distorch-bench-memory-") as directory:
        files = {kind: write_model(kind, Path(directory) / f"model.{kind}", args) for kind in args.sources}
        rows = [measure(kind, str(files[kind]), models, share, args) for kind in args.sources
                for models in args.models for share in args.shares]
    print_table(rows, args)
    return 0 if all(r["steady_ok"] and r["peak_ok"] for r in rows) else 1


def measure(kind: str, path: str, models: int, share: int, args) -> dict:
    dim, ffn = (args.gguf_dim, args.gguf_ffn) if kind == "gguf" else (args.dim, args.ffn)
    case = {"kind": kind, "path": path, "models": models, "share": share, "dim": dim, "ffn": ffn, "depth": args.depth}
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(case)], capture_output=True, text=True,
                          timeout=1800)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"case {case} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(line[len("RESULT "):])


# -- one case, in its own process ---------------------------------------------------------------------------

def run_case(case: dict) -> dict:
    warm_up()
    empty = rss()
    models = [load_model(case) for _ in range(case["models"])]
    for model in models:
        touch(model)
    loaded = rss() - empty
    model_bytes = sum(weight_bytes(m) for m in models)
    plans = [plan_share(m, case["share"]) for m in models]
    reset_peak()
    handles = [distorch.stream(m, p) for m, p in zip(models, plans)]
    peak = peak_rss() - empty
    for model in models:
        forward(model)
    steady = rss() - empty
    for handle in handles:
        handle.close()
    slots = sum(p.prefetch * p.slot_bytes for p in plans)
    block = max((b.nbytes for p in plans for b in p.blocks), default=0)
    return {"kind": case["kind"], "models": case["models"], "share": case["share"], "model_bytes": model_bytes,
            "loaded": loaded, "streamed": sum(p.streamed_bytes for p in plans), "slots": slots, "block": block,
            "steady": steady, "peak": peak,
            "steady_ok": steady <= 1.05 * model_bytes + slots, "peak_ok": peak <= loaded + block + 0.01 * model_bytes}


def warm_up() -> None:
    """Imports what loading and the first stream would (the file readers, torch._dynamo for the hooks) before
    the baseline is read, so the table counts memory, not code."""
    import safetensors.torch  # noqa: F401

    import gguf_loader  # noqa: F401

    model = ToyDiT(32, 2, 2)
    plan = distorch.plan(model, compute_device="cpu", virtual_vram_gb=1e-6, memory={"cpu": 64 * GIB})
    with distorch.stream(model, plan), torch.inference_mode():
        model(torch.randn(1, 4, 16), torch.tensor([1.0]))


def load_model(case: dict) -> ToyDiT:
    from safetensors.torch import load_file

    from gguf_loader import make_ops, read_gguf

    dim, ffn, depth = case["dim"], case["ffn"], case["depth"]
    heads = max(1, dim // 64)
    if case["kind"] == "gguf":
        with torch.device("meta"):
            model = ToyDiT(dim, depth, heads, ffn_dim=ffn, ops=make_ops())
        model.load_state_dict(read_gguf(case["path"]).tensors, assign=True)
        return model
    with torch.device("meta"):
        model = ToyDiT(dim, depth, heads, ffn_dim=ffn)
    model = model.to_empty(device="cpu")
    state = load_file(case["path"])
    model.load_state_dict(state)
    del state
    return model


def plan_share(model: ToyDiT, share: int):
    target = share / 100 * distorch.discover(model).block_bytes
    return distorch.plan(model, compute_device="cpu", virtual_vram_gb=target / GIB, memory={"cpu": 64 * GIB})


def touch(model: ToyDiT) -> None:
    with torch.inference_mode():
        for tensor in list(model.parameters()) + list(model.buffers()):
            tensor.as_subclass(torch.Tensor).view(-1)[::1024].sum()


def forward(model: ToyDiT) -> None:
    with torch.inference_mode():
        x = torch.randn(1, 4, model.patch_in.in_features)
        model(x, torch.tensor([500.0]))


def weight_bytes(model: ToyDiT) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def trim_heap() -> None:
    """glibc's malloc_trim, so freed heap memory is not counted (local: the script also measures older trees)."""
    ctypes.CDLL(None).malloc_trim(0)


def rss() -> int:
    gc.collect()
    trim_heap()
    return psutil.Process().memory_info().rss


def reset_peak() -> None:
    """Resets the process's RSS high-water mark (VmHWM) to its current RSS (Linux 4.0+)."""
    gc.collect()
    trim_heap()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def peak_rss() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


# -- files and the table ------------------------------------------------------------------------------------

def write_model(kind: str, path: Path, args) -> Path:
    """A seeded Wan-like model: float32 safetensors, or GGUF with Q8_0 Linear weights and F32 for the rest."""
    from safetensors.torch import save_file

    from gguf_loader import write_gguf

    dim, ffn = (args.gguf_dim, args.gguf_ffn) if kind == "gguf" else (args.dim, args.ffn)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ToyDiT(dim, args.depth, max(1, dim // 64), ffn_dim=ffn)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    del model
    if kind == "gguf":
        qtypes = {k: "Q8_0" for k, v in state.items()
                  if k.endswith(".weight") and v.ndim == 2 and v.shape[-1] % 32 == 0}
        write_gguf(path, state, qtypes=qtypes)
    else:
        save_file(state, str(path))
    return path


def print_table(rows: list[dict], args) -> None:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"distorch memory benchmark, {datetime.date.today()}: {platform.node()}, {cpu}, {os.cpu_count()} CPUs, "
          f"{psutil.virtual_memory().total / GIB:.0f} GiB RAM, {platform.platform()}, torch {torch.__version__}")
    print(f"command: python bench/memory.py --dim {args.dim} --ffn {args.ffn} --gguf-dim {args.gguf_dim} "
          f"--gguf-ffn {args.gguf_ffn} --depth {args.depth} "
          f"--shares {' '.join(map(str, args.shares))} --models {' '.join(map(str, args.models))} "
          f"--sources {' '.join(args.sources)}")
    print("| source | models | share | streamed MiB | model MiB | block MiB | slots MiB | loaded ÷ model "
          "| steady ÷ model | (steady − slots) ÷ model | peak ÷ model | (peak − loaded) ÷ block | goals |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        model = r["model_bytes"]
        staging_peak = (r["peak"] - r["loaded"]) / r["block"] if r["block"] else 0.0
        goals = "ok" if r["steady_ok"] and r["peak_ok"] else \
            " ".join(x for x, ok in (("steady over", r["steady_ok"]), ("peak over", r["peak_ok"])) if not ok)
        print(f"| {r['kind']} | {r['models']} | {r['share']} % | {r['streamed'] / MIB:.0f} | {model / MIB:.0f} "
              f"| {r['block'] / MIB:.1f} | {r['slots'] / MIB:.0f} | {r['loaded'] / model:.3f} "
              f"| {r['steady'] / model:.3f} | {(r['steady'] - r['slots']) / model:.3f} | {r['peak'] / model:.3f} "
              f"| {staging_peak:+.2f} | {goals} |")


if __name__ == "__main__":
    sys.exit(main())
