"""Steady-state streaming checks: per step no host synchronisation and no allocation by the streamer, and
peak VRAM within 5 % of the plan.

    python bench/steady_state.py                                  # CUDA: a Wan-width toy DiT, half streamed
    python bench/steady_state.py --device cpu --dim 64 --depth 6  # what a CPU can check (allocations only)

Allocations are counted twice on CUDA: by the caching allocator (allocation requests and cudaMalloc'd
segments over the steady passes) and, on any device, by a dispatch mode that counts every op output
with a storage of its own; the streamed model must need exactly as many as the resident one. Host
syncs: the steady passes run under `torch.cuda.set_sync_debug_mode("error")`. Peak VRAM: the streamed
forward's peak against the plan's weight bytes plus the activations the resident forward needed.
Prints a markdown table; exits 1 when a check fails.
"""

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import distorch  # noqa: E402
from distorch.toy import ToyDiT  # noqa: E402
from distorch.units import GIB  # noqa: E402

TOLERANCE = 0.05


@dataclass(frozen=True)
class Check:
    name: str
    measured: str
    expected: str
    ok: bool | None  # None: not measurable on this device


class NewStorages(TorchDispatchMode):
    """Counts op outputs whose storage is new (not a view of an input): the allocations a forward makes."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
        self.count += sum(1 for t in _tensors(out) if t.untyped_storage().data_ptr() not in inputs)
        return out


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            yield from _tensors(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from _tensors(item)


def build(args, device: torch.device) -> ToyDiT:
    with torch.device("meta"):
        model = ToyDiT(args.dim, args.depth, args.heads, channels=64, ffn_dim=args.ffn)
    model = model.to(args.dtype).to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    for param in model.parameters():
        param.data.normal_(0.0, 1.0 / math.sqrt(param.shape[-1]), generator=generator)
    model.frequencies.copy_(torch.exp(-math.log(10000.0) * torch.arange(128, device=device) / 128))
    return model


def passes(model, x, t, count: int) -> None:
    with torch.inference_mode():
        for _ in range(count):
            model(x, t)


def allocations(model, x, t, count: int) -> int:
    counter = NewStorages()
    with counter:
        passes(model, x, t, count)
    return counter.count


def run(args) -> list[Check]:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    model = build(args, device)
    x = torch.randn(1, args.tokens, 64, device=device, generator=torch.Generator(device=device).manual_seed(1),
                    dtype=args.dtype)
    t = torch.full((1,), 500.0, device=device)

    # Resident reference: activations and allocations per pass with every weight on the compute device.
    passes(model, x, t, 1)
    resident_allocations = allocations(model, x, t, args.passes)
    activations = 0
    if cuda:
        torch.cuda.synchronize()
        weights = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        passes(model, x, t, 1)
        activations = torch.cuda.max_memory_allocated() - weights
        model = model.to("cpu")
        torch.cuda.empty_cache()

    layout = distorch.discover(model)
    plan = distorch.plan(model, compute_device=str(device), virtual_vram_gb=args.share * layout.block_bytes / GIB,
                         prefetch=args.prefetch)
    checks = []
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    with distorch.stream(model, plan, prefetch=args.prefetch) as handle:
        placed = (torch.cuda.memory_allocated() - base) if cuda else 0
        passes(model, x, t, 2)  # learn the order, fill the slots
        warm = handle.stats().sync_loads
        streamed_allocations = allocations(model, x, t, args.passes)
        checks.append(Check("allocations per pass, streamed vs resident", str(streamed_allocations / args.passes),
                            str(resident_allocations / args.passes), streamed_allocations == resident_allocations))
        if cuda:
            checks += cuda_checks(model, x, t, args, plan, placed, activations, base)
        sync_loads = handle.stats().sync_loads - warm
    checks.append(Check("copies a forward waited for in steady passes", str(sync_loads), "0", sync_loads == 0))
    return checks


def cuda_checks(model, x, t, args, plan, placed: int, activations: int, base: int) -> list[Check]:
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()
    torch.cuda.set_sync_debug_mode("error")
    try:
        passes(model, x, t, args.passes)
        synced = "none"
    except RuntimeError as error:
        synced = str(error).splitlines()[0][:80]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    after = torch.cuda.memory_stats()
    peak = torch.cuda.max_memory_allocated() - base
    planned_peak = plan.compute_bytes + activations
    new_segments = after["segment.all.allocated"] - before["segment.all.allocated"]
    return [
        Check("host syncs in steady passes", synced, "none", synced == "none"),
        Check("cudaMalloc segments added in steady passes", str(new_segments), "0", new_segments == 0),
        Check("weights on GPU vs plan (GB)", f"{placed / GIB:.3f}", f"{plan.compute_bytes / GIB:.3f}",
              abs(placed - plan.compute_bytes) <= TOLERANCE * plan.compute_bytes),
        Check("peak VRAM vs plan + activations (GB)", f"{peak / GIB:.3f}", f"{planned_peak / GIB:.3f}",
              abs(peak - planned_peak) <= TOLERANCE * planned_peak),
    ]


def table(checks: list[Check], args) -> str:
    return check_table(f"steady state: {args.device}, dim {args.dim}, depth {args.depth}, tokens {args.tokens}, "
                       f"{args.share:.0%} streamed, prefetch {args.prefetch}", checks)


def check_table(title: str, checks: list[Check]) -> str:
    """`checks` as the markdown table gpu_check.sh collects, under `# {title}, {date}`."""
    head = (f"# {title}, {time.strftime('%Y-%m-%d')}\n\n"
            "| check | measured | expected | result |\n|---|---|---|---|")
    rows = [f"| {c.name} | {c.measured} | {c.expected} | {'n/a' if c.ok is None else 'PASS' if c.ok else 'FAIL'} |"
            for c in checks]
    return "\n".join([head, *rows])


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda:0" if cuda else "cpu")
    parser.add_argument("--dim", type=int, default=5120 if cuda else 64)
    parser.add_argument("--heads", type=int, default=40 if cuda else 2)
    parser.add_argument("--ffn", type=int, default=13824 if cuda else 128)
    parser.add_argument("--depth", type=int, default=16 if cuda else 6)
    parser.add_argument("--tokens", type=int, default=4096 if cuda else 32)
    parser.add_argument("--share", type=float, default=0.5, help="fraction of the block bytes to stream")
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--dtype", default="bf16" if cuda else "fp32", choices=["bf16", "fp16", "fp32"])
    args = parser.parse_args(argv)
    args.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    checks = run(args)
    print(table(checks, args))
    return 1 if any(c.ok is False for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
