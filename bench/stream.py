"""Streamed vs resident step time for synthetic DiT models, against the transfer bound.

    python bench/stream.py                          # CUDA when present, else a small CPU run
    python bench/stream.py --models wan flux --tokens 4096 32768 --dtypes bf16 q8_0 \
        --shares 0 25 50 75 100 --prefetch 2 4 --placements interleave tail
    python bench/stream.py --models flux --tokens 4096 --dtypes bf16 --shares 0 100 \
        --stream-formats stored q8_0 fp8_e4m3fn    # blocks streamed smaller, decoded on the GPU

Per row: resident step time, streamed step time, measured pinned H2D GB/s, bound = max(resident
step, streamed bytes / H2D GB/s), streamed / bound, weight VRAM and peak VRAM vs the plan, and peak
host RAM vs model bytes. Goals: ratio <= 1.05, VRAM within 5% of plan, host RAM <= 1.1x model bytes.
With a stream format the streamed bytes (and the bound) are the encoded ones; a ratio above the stored row's
shows what the decode costs, the streamed ms against the stored row's what the format gains.
"""

import argparse
import dataclasses
import math
import platform
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the packages, and the test helpers

import distorch  # noqa: E402
from distorch.hostbuf import FlatBuffer  # noqa: E402
from distorch.toy import ToyDiT  # noqa: E402
from distorch.units import GIB, MIB  # noqa: E402

MODELS = {
    # name: (dim, heads, ffn_dim, depth); widths of Wan 2.1 14B and Flux.1 (depth trimmed to fit one GPU)
    "wan": (5120, 40, 13824, 40),
    "flux": (3072, 24, 12288, 38),
    "tiny": (256, 4, 1024, 12),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Case:
    model: str
    tokens: int
    dtype: str
    share: int
    prefetch: int
    placement: str
    stream_format: str = "stored"


@dataclass(frozen=True)
class Row:
    case: Case
    streamed_gb: float
    resident_ms: float
    streamed_ms: float
    h2d_gbps: float
    bound_ms: float
    weights_vram_gb: float
    planned_vram_gb: float
    peak_vram_gb: float
    planned_peak_gb: float
    host_peak_ratio: float
    sync_loads: int

    @property
    def ratio(self) -> float:
        return self.streamed_ms / self.bound_ms


def build_model(name: str, dtype: str, device: str, depth: int | None) -> ToyDiT:
    dim, heads, ffn, default_depth = MODELS[name]
    with torch.device("meta"):
        model = ToyDiT(dim, depth or default_depth, heads, channels=64, ffn_dim=ffn)
    if dtype == "q8_0":
        return _quantized(model, device)
    model = model.to(DTYPES[dtype]).to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    for param in model.parameters():
        param.data.normal_(0.0, 1.0 / math.sqrt(param.shape[-1]), generator=generator)
    model.frequencies.copy_(torch.exp(-math.log(10000.0) * torch.arange(128, device=device) / 128))
    return model


def _quantized(model: ToyDiT, device: str) -> ToyDiT:
    from quantized_toy import quantize_toy_dit  # the GGUF engine's Q8_0 path

    return quantize_toy_dit(model, device)


def measure_h2d(device: torch.device, nbytes: int = 512 * MIB, repeats: int = 5) -> float:
    """GB/s of one flat pinned-host to device copy, as the streamer issues them."""
    source = FlatBuffer(nbytes, "cpu", pin=device.type == "cuda")
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    target.copy_(source.tensor)
    seconds = _time(device, lambda: target.copy_(source.tensor, non_blocking=True), repeats)
    source.release()
    return nbytes / seconds / 1e9


def _time(device: torch.device, work, repeats: int) -> float:
    """Mean seconds per call after one warm-up call; CUDA timed with events, no host sync inside."""
    work()
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(repeats):
            work()
        return (time.perf_counter() - start) / repeats
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    begin.record()
    for _ in range(repeats):
        work()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1000 / repeats


def tail_plan(plan: distorch.Plan) -> distorch.Plan:
    """The same number of streamed blocks taken as a contiguous tail, for the placement comparison."""
    count = len(plan.streamed)
    blocks = [
        dataclasses.replace(b, streamed=i >= len(plan.blocks) - count,
                            device="cpu" if i >= len(plan.blocks) - count else plan.compute_device,
                            pinned=i >= len(plan.blocks) - count and plan.compute_device != "cpu")
        for i, b in enumerate(plan.blocks)
    ]
    return dataclasses.replace(plan, blocks=tuple(blocks))


def run_case(case: Case, model: ToyDiT, device: torch.device, h2d_gbps: float, resident: dict, args) -> Row:
    layout = distorch.discover(model)
    target = case.share / 100 * layout.block_bytes
    plan = distorch.plan(model, compute_device=str(device), virtual_vram_gb=target / GIB, prefetch=case.prefetch,
                         stream_format=case.stream_format)
    if case.placement == "tail":
        plan = tail_plan(plan)
    x = torch.randn(1, case.tokens, 64, device=device, dtype=model.head.weight.dtype
                    if model.head.weight.is_floating_point() else torch.bfloat16)
    t = torch.full((1,), 500.0, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with torch.inference_mode(), distorch.stream(model, plan, prefetch=case.prefetch) as handle:
        weights = (torch.cuda.memory_allocated() - base) if device.type == "cuda" else 0
        model(x, t)
        seconds = _time(device, lambda: model(x, t), args.repeats)
        peak = (torch.cuda.max_memory_allocated() - base) if device.type == "cuda" else 0
        sync_loads = handle.stats().sync_loads
    key = (case.model, case.tokens, case.dtype)
    if case.share == 0:
        resident[key] = (seconds, peak - weights)
    resident_s, activations = resident[key]
    transfer_s = plan.streamed_bytes / (h2d_gbps * 1e9)
    return Row(case, plan.streamed_bytes / GIB, resident_s * 1e3, seconds * 1e3, h2d_gbps,
               max(resident_s, transfer_s) * 1e3, weights / GIB, plan.compute_bytes / GIB, peak / GIB,
               (plan.compute_bytes + activations) / GIB, (_host_peak() - args.host_baseline) / layout.total_bytes,
               sync_loads)


def reset_host_peak() -> int:
    """Resets the kernel's peak-RSS mark (Linux) and returns the current RSS, the baseline for `_host_peak`."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status_bytes("VmRSS")


def _host_peak() -> int:
    peak = _status_bytes("VmHWM")
    return peak if peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status_bytes(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def format_rows(rows: list[Row]) -> str:
    header = ("| model | tokens | dtype | streamed % | placement | format | prefetch | streamed GB | resident ms "
              "| streamed ms "
              "| H2D GB/s | bound ms | ratio | weights VRAM / plan GB | peak VRAM / plan GB | host peak / model |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        c = r.case
        vram = (f"{r.weights_vram_gb:.2f} / {r.planned_vram_gb:.2f} | {r.peak_vram_gb:.2f} / {r.planned_peak_gb:.2f}"
                if r.peak_vram_gb else "- | -")
        lines.append(
            f"| {c.model} | {c.tokens} | {c.dtype} | {c.share} | {c.placement} | {c.stream_format} | {c.prefetch} "
            f"| {r.streamed_gb:.2f} "
            f"| {r.resident_ms:.1f} | {r.streamed_ms:.1f} | {r.h2d_gbps:.1f} | {r.bound_ms:.1f} | {r.ratio:.3f} "
            f"| {vram} | {r.host_peak_ratio:.2f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda:0" if cuda else "cpu")
    parser.add_argument("--models", nargs="+", default=["wan", "flux"] if cuda else ["tiny"], choices=MODELS)
    parser.add_argument("--depth", type=int, default=None, help="override the number of blocks")
    parser.add_argument("--tokens", nargs="+", type=int, default=[4096, 32768] if cuda else [256])
    parser.add_argument("--dtypes", nargs="+", default=["bf16"] if cuda else ["fp32"],
                        choices=list(DTYPES) + ["q8_0"])
    parser.add_argument("--shares", nargs="+", type=int, default=[0, 25, 50, 75, 100])
    parser.add_argument("--prefetch", nargs="+", type=int, default=[2])
    parser.add_argument("--placements", nargs="+", default=["interleave"], choices=["interleave", "tail"])
    parser.add_argument("--stream-formats", nargs="+", default=["stored"], choices=["stored", "q8_0", "fp8_e4m3fn"],
                        help="how streamed blocks travel (each streamed case once per format)")
    parser.add_argument("--repeats", type=int, default=5 if cuda else 3)
    parser.add_argument("--h2d-mib", type=int, default=512, help="size of the copy that measures H2D bandwidth")
    return parser.parse_args(argv)


def main(argv=None) -> list[Row]:
    args = parse_args(argv)
    device = torch.device(args.device)
    h2d = measure_h2d(device, args.h2d_mib * MIB)
    print(f"# {platform.node()} {torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor()}"
          f", torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, H2D {h2d:.1f} GB/s")
    rows, resident = [], {}
    for name in args.models:
        for dtype in args.dtypes:
            args.host_baseline = reset_host_peak()
            model = build_model(name, dtype, "cpu", args.depth)
            for tokens in args.tokens:
                for share in sorted(set(args.shares) | {0}):
                    for prefetch in args.prefetch:
                        for placement in args.placements if share else ["interleave"]:
                            for fmt in args.stream_formats if share else ["stored"]:
                                case = Case(name, tokens, dtype, share, prefetch, placement, fmt)
                                rows.append(run_case(case, model, device, h2d, resident, args))
                                print(format_rows(rows[-1:]).splitlines()[-1], flush=True)
            del model
    print(format_rows(rows))
    return rows


if __name__ == "__main__":
    main()
