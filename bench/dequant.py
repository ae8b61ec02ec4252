"""Dequantization throughput per GGML type: ours vs gguf-py (numpy) vs ComfyUI-GGUF (torch).

    python bench/dequant.py                                   # CPU, every type, 4096 x 4096 elements
    python bench/dequant.py --types Q8_0 Q4_K IQ2_XS --repeat 9
    python bench/dequant.py --comfyui-gguf ~/ComfyUI/custom_nodes/ComfyUI-GGUF
    python bench/dequant.py --device cuda --bandwidth-gbs 3350

All contenders dequantize the same bytes (random blocks with sane fp16 scales) to float32 by default.
Each contender gets one warm-up call and --repeat timed calls, each allocating its own output as it
would in a model; the table shows the fastest call (--stat median for medians). On a shared VM the
minimum is the stable statistic: medians of every contender swing by up to 2x between runs. CUDA
times use events. "ours / best" is our Melem/s divided by the faster of
the other two. On CUDA the GB/s column is (bytes read + bytes written) / time, and "% peak" compares
it with --bandwidth-gbs (default: a table of known GPUs). ComfyUI-GGUF's dequant.py is imported from
the given checkout at run time; nothing of it is copied here.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
import warnings
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the packages, and the test helpers

from ggml_samples import random_blocks  # noqa: E402

from gguf_loader import dequantize_blocks, supported_qtypes  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
KNOWN_BANDWIDTH_GBS = {"H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H200": 4800, "A100-SXM4-80GB": 2039,
                       "A100-SXM4-40GB": 1555, "RTX 4090": 1008, "RTX 3090": 936, "L40S": 864}


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    comfy = load_comfyui_gguf(args.comfyui_gguf) if args.comfyui_gguf else None
    types = [GGMLQuantizationType[name] for name in args.types] if args.types else list(supported_qtypes())
    if args.dtype == "float32" and GGMLQuantizationType.F32 in types:
        types.remove(GGMLQuantizationType.F32)  # F32 to float32 is a zero-copy view for everyone; nothing to time
    print(describe(device, args))
    rows = [measure(qtype, device, args, comfy) for qtype in types]
    print_table(rows, device, args)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--elems", type=int, default=4096 * 4096, help="elements per tensor (multiple of 4096)")
    parser.add_argument("--types", nargs="+", help="GGML type names (default: all we support)")
    parser.add_argument("--repeat", type=int, default=7, help="timed calls per contender")
    parser.add_argument("--stat", choices=["min", "median"], default="min", help="statistic over the timed calls")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="target dtype for ours/ComfyUI-GGUF")
    parser.add_argument("--comfyui-gguf", type=Path, help="path to a ComfyUI-GGUF checkout to compare against")
    parser.add_argument("--no-numpy", action="store_true", help="skip gguf-py (slow for IQ types)")
    parser.add_argument("--bandwidth-gbs", type=float, help="device memory bandwidth for the %% peak column")
    args = parser.parse_args()
    if args.elems % 4096:
        parser.error("--elems must be a multiple of 4096")
    return args


def load_comfyui_gguf(checkout: Path):
    """ComfyUI-GGUF's dequant.py, imported by path (it needs only gguf, torch and tqdm)."""
    spec = importlib.util.spec_from_file_location("comfyui_gguf_dequant", checkout / "dequant.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def describe(device: torch.device, args) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return (f"device: {name}, torch {torch.__version__}, gguf {gguf_version()}, threads {torch.get_num_threads()}, "
            f"{args.elems:,} elements, target {args.dtype}, {args.stat} of {args.repeat} calls")


def gguf_version() -> str:
    from importlib.metadata import version

    return version("gguf")


def measure(qtype: GGMLQuantizationType, device: torch.device, args, comfy) -> dict:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    blocks = random_blocks(qtype, args.elems // block_size, seed=int(qtype))
    rows = blocks.reshape(-1, 4096 // block_size * type_size)  # 4096-element rows, as in a real weight
    on_device = torch.from_numpy(blocks).to(device)
    dtype = DTYPES[args.dtype]
    row = {"type": qtype.name, "bpw": 8 * type_size / block_size, "read": blocks.nbytes,
           "written": args.elems * dtype.itemsize}
    stat = min if args.stat == "min" else statistics.median
    row["ours"] = stat(timed(lambda: dequantize_blocks(on_device, qtype, dtype), device, args.repeat))
    if not args.no_numpy:
        row["numpy"] = stat(timed(lambda: numpy_dequantize(rows, qtype), torch.device("cpu"), args.repeat))
    if comfy is not None and qtype in comfy.dequantize_functions:
        device_rows = torch.from_numpy(rows).to(device)
        shape = (rows.shape[0], 4096)
        row["comfyui-gguf"] = stat(timed(lambda: comfy.dequantize(device_rows, qtype, shape, dtype=dtype), device,
                                         args.repeat))
    print(f"  {qtype.name}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in row.items() if isinstance(v, float)
                                          and k in ("ours", "numpy", "comfyui-gguf")), file=sys.stderr, flush=True)
    return row


def numpy_dequantize(rows: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return gguf.quants.dequantize(rows, qtype)


def timed(work, device: torch.device, repeat: int) -> list[float]:
    """Seconds of each of `repeat` calls after a warm-up call (CUDA: event timing)."""
    work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        times = []
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            work()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return times
    times = []
    for _ in range(repeat):
        begin = time.perf_counter()
        work()
        times.append(time.perf_counter() - begin)
    return times


def print_table(rows: list[dict], device: torch.device, args) -> None:
    bandwidth = args.bandwidth_gbs or known_bandwidth(device)
    header = "| type | bpw | ours ms | ours Melem/s | gguf-py Melem/s | ComfyUI-GGUF Melem/s | ours ÷ best other |"
    if device.type == "cuda":
        header += " ours GB/s | % peak |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for row in rows:
        rate = lambda key, row=row: args.elems / row[key] / 1e6 if key in row else None  # noqa: E731
        others = [r for r in (rate("numpy"), rate("comfyui-gguf")) if r is not None]
        ratio = f"{rate('ours') / max(others):.2f}×" if others else "–"
        line = (f"| {row['type']} | {row['bpw']:.2f} | {row['ours'] * 1e3:.1f} | {rate('ours'):.0f} | "
                f"{fmt(rate('numpy'))} | {fmt(rate('comfyui-gguf'))} | {ratio} |")
        if device.type == "cuda":
            gbs = (row["read"] + row["written"]) / row["ours"] / 1e9
            line += f" {gbs:.0f} | {fmt(100 * gbs / bandwidth if bandwidth else None)} |"
        print(line)


def fmt(value) -> str:
    return "–" if value is None else f"{value:.0f}"


def known_bandwidth(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((gbs for key, gbs in KNOWN_BANDWIDTH_GBS.items() if key in name), None)


if __name__ == "__main__":
    main()
