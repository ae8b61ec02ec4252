"""Stream formats end to end (issue 20): bytes, host RSS and output error per format.

    python bench/stream_formats.py                        # a bf16 ToyDiT in RAM, each format in a process of its own
    python bench/stream_formats.py --comfyui [VERSION...] # also real headless ComfyUI servers (--cpu), per install

The toy part builds a seeded bf16 `ToyDiT` (1024 wide, 8 blocks, ~200 MB) in RAM, plans `--share` of its blocks
streamed on the CPU in each format, streams it and runs a forward: the plan's bytes, the process's RSS growth
over its RSS before the model existed (after a collection and malloc_trim), the output against the resident
stored model's, and each encoded weight's error after close() (the format's values; a model built in memory).

The ComfyUI part runs, in one server per install, core's `UNETLoader` and the DisTorch UNet loader in each format
(every block streamed) on the tiny and the medium Wan 2.1 of tests/comfyui/make_models.py: a 3-step KSampler's
latent against core's, and the server's RSS once the run is done, after a `/free` of everything before it.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FORMATS = ("stored", "q8_0", "fp8_e4m3fn")
MIB = 1 << 20


def child(fmt: str, share: float, dim: int, depth: int) -> dict:
    """One format, measured in a fresh process (so RSS is this model's alone)."""
    sys.path[:0] = [str(REPO), str(REPO / "tests")]
    import torch
    from memory_models import rss, touch

    import distorch
    from distorch.ledger import Ledger
    from distorch.toy import make_toy_dit
    from distorch.units import GIB

    torch.set_num_threads(min(4, os.cpu_count() or 1))
    x = torch.randn(1, 64, 16, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    t = torch.tensor([500.0])
    warm = make_toy_dit(dim=64, depth=2, heads=1, dtype=torch.bfloat16)  # torch._dynamo's import (~70 MB), kernels
    with distorch.stream(warm, distorch.plan(warm, compute_device="cpu", virtual_vram_gb=1e-6, ledger=Ledger(),
                                             memory={"cpu": 64 * GIB}, stream_format=fmt), ledger=Ledger()):
        with torch.inference_mode():
            warm(x[..., :16], t)
    del warm
    before = rss()
    model = make_toy_dit(dim=dim, depth=depth, heads=dim // 64, dtype=torch.bfloat16)
    touch(model)
    loaded = rss() - before
    with torch.inference_mode():
        stored_output = model(x, t)
    plan = distorch.plan(model, compute_device="cpu", memory={"cpu": 64 * GIB}, ledger=Ledger(), stream_format=fmt,
                         virtual_vram_gb=share * distorch.discover(model).block_bytes / GIB)
    began = time.perf_counter()
    with distorch.stream(model, plan, ledger=Ledger()) as handle:
        staging = time.perf_counter() - began
        with torch.inference_mode():
            output = model(x, t)
        growth = rss() - before
        names = [c.name for b in handle.streamer._blocks if b.codec is not None for c in b.codec.encoded]
    original = make_toy_dit(dim=dim, depth=depth, heads=dim // 64, dtype=torch.bfloat16)
    errors = sorted(((model.get_parameter(n).double() - original.get_parameter(n).double()).norm()
                     / original.get_parameter(n).double().norm()).item() for n in names)
    diff = (output.double() - stored_output.double())
    return {"format": fmt, "loaded": loaded, "resident": plan.resident_bytes,
            "streamed_stored": plan.streamed_stored_bytes, "streamed": plan.streamed_bytes,
            "slots": plan.prefetch * plan.slot_bytes, "decode": plan.decode_bytes, "growth": growth,
            "staging_s": staging, "output_rel": (diff.norm() / stored_output.double().norm()).item(),
            "output_max_abs": diff.abs().max().item(), "tensors": len(errors),
            "median": errors[len(errors) // 2] if errors else 0.0, "worst": errors[-1] if errors else 0.0}


def toy_table(args) -> str:
    rows = []
    for fmt in FORMATS:
        out = subprocess.run([sys.executable, __file__, "--child", fmt, "--share", str(args.share), "--dim",
                              str(args.dim), "--depth", str(args.depth)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    lines = [f"ToyDiT {args.dim}x{args.depth} bf16 in RAM ({rows[0]['loaded'] / MIB:.0f} MiB RSS loaded), "
             f"{args.share:.0%} of its blocks streamed, compute on the CPU:", "",
             "| format | streamed MiB as stored | held and copied MiB | ratio | slots + decode MiB | RSS growth MiB "
             "| growth / (resident + streamed as stored) | staging s | output rel. error | output max abs "
             "| weight rel. error median / worst |", "|" + "---|" * 11]
    for r in rows:
        whole = r["resident"] + r["streamed_stored"]
        lines.append(f"| {r['format']} | {r['streamed_stored'] / MIB:.1f} | {r['streamed'] / MIB:.1f} "
                     f"| {r['streamed'] / r['streamed_stored']:.4f} | {(r['slots'] + r['decode']) / MIB:.1f} "
                     f"| {r['growth'] / MIB:.1f} | {r['growth'] / whole:.3f} | {r['staging_s']:.2f} "
                     f"| {r['output_rel']:.2e} | {r['output_max_abs']:.3g} "
                     f"| {r['median']:.2e} / {r['worst']:.2e} ({r['tensors']} tensors) |")
    return "\n".join(lines)


def comfyui_table(versions: list[str]) -> str:
    sys.path.insert(0, str(REPO / "tests"))
    from comfyui_harness import ComfyServer, core_unet, distorch_unet, installs, sampling_prompt

    lines = ["| ComfyUI | model | format | latent rel. error vs core | server RSS after the run MiB |",
             "|---|---|---|---|---|"]
    for install in installs():
        if versions and install.version not in versions:
            continue
        with tempfile.TemporaryDirectory() as base:
            server = ComfyServer(Path(base) / "server", install)
            server.base.mkdir(parents=True)
            server.prepare()
            server.start()
            try:
                for model in ("tiny_wan21.safetensors", "medium_wan21.safetensors"):
                    for fmt in ("core", *FORMATS):
                        free(server)
                        loader = core_unet(model) if fmt == "core" else distorch_unet(model, 64.0, stream_format=fmt)
                        result = server.run(sampling_prompt(loader, "wan", f"b_{fmt}"), timeout=1800)
                        if not result.ok:
                            raise RuntimeError(f"{model} {fmt}: {result.error_text()[:2000]}\n{server.log()[-2000:]}")
                        latent = server.latent(result)
                        if fmt == "core":
                            core = latent
                        error = ((latent.double() - core.double()).norm() / core.double().norm()).item()
                        lines.append(f"| {install.version} | {model.split('.')[0]} | {fmt} | "
                                     f"{'-' if fmt == 'core' else f'{error:.2e}'} | {vm_rss(server) / MIB:.0f} |")
                        print(lines[-1], flush=True)
            finally:
                server.stop()
    return "\n".join(lines)


def free(server) -> None:
    """ComfyUI's /free (it answers with an empty body): every model unloaded and the node cache dropped."""
    request = urllib.request.Request(server.url + "/free", data=json.dumps({"unload_models": True,
                                                                           "free_memory": True}).encode(),
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=60).close()
    time.sleep(2.0)  # the server frees on its next loop


def vm_rss(server) -> int:
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--share", type=float, default=0.75)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--comfyui", nargs="*", default=None, help="ComfyUI versions to run (none named: every one)")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.share, args.dim, args.depth)))
        return
    print(f"# {platform.node()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{time.strftime('%Y-%m-%d')}")
    print(toy_table(args))
    if args.comfyui is not None:
        print()
        print(comfyui_table(args.comfyui))


if __name__ == "__main__":
    main()
