"""`python -m distorch demo`: stream a built-in DiT-like model and show it matches the resident run.

No downloads: the model is built in memory with seeded random weights. A short CFG sampling loop runs
once with every weight resident on the compute device and once with part of the blocks streamed by
the real planner and streamer; outputs must be bit-identical.
"""

import time
from dataclasses import dataclass

import torch

from .apply_plan import stream
from .blocks import discover
from .placement import plan
from .toy import make_toy_dit
from .units import GIB, format_gb

# (dim, depth, heads, tokens): small enough for a 2-core CI box on the CPU, a real workload on a GPU.
CPU_DEFAULT = (384, 12, 6, 256)
CUDA_DEFAULT = (2048, 24, 16, 2048)


@dataclass(frozen=True)
class RunResult:
    outputs: list
    seconds_per_step: float
    weights_on_device: int
    copied_per_step: int


def run_demo(args) -> int:
    device = args.device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    dim, depth, heads, tokens = CUDA_DEFAULT if device.startswith("cuda") else CPU_DEFAULT
    dim, depth, tokens = args.dim or dim, args.depth or depth, args.tokens or tokens
    heads = max(1, dim // 64)
    model = make_toy_dit(dim=dim, depth=depth, heads=heads, dtype=torch.bfloat16 if device != "cpu" else torch.float32)
    layout = discover(model)
    virtual_vram = args.virtual_vram_gb if args.virtual_vram_gb is not None else layout.block_bytes / 2 / GIB
    print(f"DisTorch demo: toy DiT, dim {dim}, {depth} blocks, {tokens} tokens, {args.steps} CFG steps on {device}")

    resident_plan = plan(model, compute_device=device, virtual_vram_gb=0, prefetch=args.prefetch)
    resident = _sample(model, resident_plan, device, tokens, args.steps, args.prefetch)
    streamed_plan = plan(model, compute_device=device, virtual_vram_gb=virtual_vram, prefetch=args.prefetch)
    print(streamed_plan.report())
    streamed = _sample(model, streamed_plan, device, tokens, args.steps, args.prefetch)

    print(f"  {'run':<10} {'s/step':>8} {'weights on ' + device:>22} {'copied/step':>12}")
    for name, result in (("resident", resident), ("streamed", streamed)):
        copied = format_gb(result.copied_per_step) if result.copied_per_step else "-"
        print(f"  {name:<10} {result.seconds_per_step:>8.3f} {format_gb(result.weights_on_device):>22} {copied:>12}")
    print(f"  streamed / resident step time: {streamed.seconds_per_step / resident.seconds_per_step:.2f}"
          + (" (on the CPU a copy is a memcpy competing with compute; see docs/benchmarks.md for GPU numbers)"
             if device == "cpu" else ""))
    identical = all(torch.equal(a, b) for a, b in zip(resident.outputs, streamed.outputs))
    verdict = "identical to" if identical else "DIFFERENT FROM"
    print(f"  streamed outputs are {verdict} the resident run ({len(resident.outputs)} tensors, bit-exact check)")
    return 0 if identical else 1


def _sample(model, model_plan, device: str, tokens: int, steps: int, prefetch: int) -> RunResult:
    generator = torch.Generator().manual_seed(0)
    dtype = next(model.parameters()).dtype
    x = torch.randn(1, tokens, model.head.out_features, generator=generator).to(device, dtype)
    with torch.inference_mode(), stream(model, model_plan, prefetch=prefetch) as handle:
        weights = torch.cuda.memory_allocated(device) if device.startswith("cuda") else model_plan.compute_bytes
        outputs = _cfg_steps(model, x, 1, device)  # warm-up: learns the block order, fills caches
        _synchronize(device)
        copied_before = handle.stats().bytes_copied
        start = time.perf_counter()
        outputs = _cfg_steps(model, x, steps, device)
        _synchronize(device)
        elapsed = time.perf_counter() - start
        copied = (handle.stats().bytes_copied - copied_before) // steps
    return RunResult([o.float().cpu() for o in outputs], elapsed / steps, weights, copied)


def _cfg_steps(model, x, steps: int, device: str) -> list:
    outputs = []
    for step in range(steps):
        t = torch.full((1,), 999.0 * (1 - step / max(steps, 1)), device=device)
        cond, uncond = model(x, t), model(x * 0.9, t)
        outputs += [cond, uncond]
        x = x - 0.05 * (uncond + 3.0 * (cond - uncond))
    return outputs


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
