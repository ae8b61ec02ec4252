"""Stream formats measured: block sizes, per-tensor error against the stored weights, and a forward with decoded
weights against the forward with stored weights.

    python bench/stream_format.py                      # sizes of Flux.1 / Wan 2.1 14B blocks, toy models
    C=~/.cache/distorch/comfyui
    $C/venv-0.33.0/bin/python bench/stream_format.py --comfyui $C/comfyui-0.33.0   # + tiny Wan 2.1 and SD3 from ComfyUI

Every block of each model is encoded and decoded as streaming would (BlockCodec), and the model's tensors are
pointed at the decode buffer. Per-tensor error: ||decoded - stored|| / ||stored|| (float64) over the encoded
tensors, median and worst. Forward: max |difference|, relative error ||difference|| / ||stored output||, and
PSNR = 20 log10(range of the stored output / RMS difference). Weights are random (seeded), not trained: trained
weights have outlier channels that favour Q8_0's per-block scales over fp8's per-tensor scale.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "comfyui")]

import torch  # noqa: E402

from distorch.blocks import cluster_tensors, discover, live_bytes  # noqa: E402
from distorch.stream_format import BlockCodec, StreamFormat, encoded_nbytes  # noqa: E402

FORMATS = (StreamFormat.Q8_0, StreamFormat.FP8_E4M3FN)


@dataclass(frozen=True)
class Quality:
    model: str
    fmt: str
    ratio: float  # encoded / stored bytes of all blocks
    encoded: int  # tensors encoded
    median: float  # per-tensor relative error
    worst: float
    worst_name: str
    max_abs: float
    relative: float
    psnr: float


def size_rows() -> list[str]:
    from stream_shapes import BLOCKS, metadata_clusters

    rows = []
    for name, shapes in BLOCKS.items():
        for dtype in (torch.bfloat16, torch.float32):
            clusters = metadata_clusters(shapes(), dtype)
            stored = encoded_nbytes(clusters, "stored")
            q8, fp8 = (encoded_nbytes(clusters, f) for f in ("q8_0", "fp8_e4m3fn"))
            rows.append(f"| {name} | {str(dtype).removeprefix('torch.')} | {stored / 2**20:.1f} | "
                        f"{q8 / 2**20:.1f} | {q8 / stored:.4f} | {fp8 / 2**20:.1f} | {fp8 / stored:.4f} |")
    return rows


def apply_format(model: torch.nn.Module, fmt: StreamFormat) -> tuple[float, list[tuple[str, float]]]:
    """Streams every block through encode + decode and points its tensors at the decoded bytes (as the pre-hook
    will). Returns encoded / stored bytes and (name, relative error) of each encoded tensor."""
    stored_total = encoded_total = 0
    errors = []
    for block in discover(model).blocks:
        codec = BlockCodec.build(block.clusters, fmt)
        tensors = [cluster_tensors(model, c) for c in block.clusters]
        host = torch.empty(codec.encoded_nbytes, dtype=torch.uint8)
        codec.encode_into(host, [live_bytes(c, t) for c, t in zip(block.clusters, tensors)])
        out = torch.empty(codec.stored_nbytes, dtype=torch.uint8)
        codec.decode_into(host, out)
        for cluster, coding, members in zip(block.clusters, codec.codings, tensors):
            for view, tensor in zip(cluster.views, members):
                decoded = view.rebuild_on(out, coding.stored_offset + view.offset)
                if coding.format != StreamFormat.STORED:
                    reference = tensor.detach().double()
                    errors.append((coding.name, float((decoded.double() - reference).norm() / reference.norm())))
                tensor.data = decoded
        stored_total += codec.stored_nbytes
        encoded_total += codec.encoded_nbytes
    return encoded_total / stored_total, errors


def output_difference(reference: torch.Tensor, output: torch.Tensor) -> tuple[float, float, float]:
    reference, output = reference.double(), output.double()
    difference = output - reference
    rms = float(difference.pow(2).mean().sqrt())
    span = float(reference.max() - reference.min())
    psnr = math.inf if rms == 0 else 20 * math.log10(span / rms)
    return float(difference.abs().max()), float(difference.norm() / reference.norm()), psnr


def measure(name: str, build, run) -> list[Quality]:
    """`build()` gives a fresh model with stored weights; `run(model)` its output for fixed inputs."""
    with torch.no_grad():
        reference = run(build())
        rows = []
        for fmt in FORMATS:
            model = build()
            ratio, errors = apply_format(model, fmt)
            values = [e for _, e in errors]
            worst_name, worst = max(errors, key=lambda item: item[1])
            rows.append(Quality(name, fmt.value, ratio, len(errors), statistics.median(values), worst, worst_name,
                                *output_difference(reference, run(model))))
    return rows


def toy_models() -> list[Quality]:
    from dit_models import make_quirky

    from distorch.toy import make_toy_dit

    generator = torch.Generator().manual_seed(11)
    x, t = torch.randn(2, 256, 16, generator=generator), torch.tensor([900.0, 250.0])
    def run_bf16(model):
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the toy's time embedding is float32 math
            return model(x.to(torch.bfloat16), t)

    rows = measure("ToyDiT 512x8 bf16", lambda: make_toy_dit(dim=512, depth=8, heads=8, dtype=torch.bfloat16),
                   run_bf16)
    quirky_x = torch.randn(2, 64, 8, generator=generator)
    rows += measure("QuirkyDiT 256x8 fp32 (ties, views)", lambda: make_quirky(dim=256, heads=4),
                    lambda m: m(quirky_x, t))
    return rows


def comfyui_models(comfyui: str) -> list[Quality]:
    sys.argv = sys.argv[:1] + ["--cpu"]  # comfy.cli_args parses the command line on import
    sys.path.insert(0, os.path.abspath(comfyui))
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.model_detection
    from make_models import random_state_dict, sd3_seed, wan_seed

    def builder(state_dict):
        def build():
            config = comfy.model_detection.model_config_from_unet(state_dict, "")
            config.set_inference_dtype(torch.bfloat16, torch.float32)  # bf16 weights, float32 math: core on a CPU
            model = config.get_model({}, "", device=torch.device("cpu")).diffusion_model
            model.load_state_dict(state_dict)
            return model.eval()
        return build

    generator = torch.Generator().manual_seed(12)
    wan = random_state_dict(wan_seed(), "WAN21_T2V", seed=1)
    latent = torch.randn(1, 16, 3, 16, 16, generator=generator)
    context = torch.randn(1, 32, 4096, generator=generator)
    rows = measure("ComfyUI Wan 2.1 (tiny, bf16)", builder(wan),
                   lambda m: m(latent, torch.tensor([500.0]), context))
    sd3 = random_state_dict(sd3_seed(), "SD3", seed=2)
    image = torch.randn(1, 16, 32, 32, generator=generator)
    pooled = torch.randn(1, 2048, generator=generator)
    rows += measure("ComfyUI SD3 (tiny, bf16)", builder(sd3),
                    lambda m: m(image, torch.tensor([500.0]), context=context, y=pooled))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", help="a ComfyUI checkout: adds its tiny Wan 2.1 and SD3 (run with its venv)")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{datetime.date.today()}, {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, Python {platform.python_version()}")
    print("\n| block | stored dtype | stored MiB | q8_0 MiB | q8_0 / stored | fp8 MiB | fp8 / stored |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(size_rows()))
    rows = toy_models() + (comfyui_models(args.comfyui) if args.comfyui else [])
    print("\n| model | format | blocks' bytes | tensors | median rel. error | worst rel. error (tensor) | "
          "output max abs | output rel. error | PSNR dB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for q in rows:
        print(f"| {q.model} | {q.fmt} | {q.ratio:.4f} | {q.encoded} | {q.median:.2e} | {q.worst:.2e} "
              f"(`{q.worst_name}`) | {q.max_abs:.3g} | {q.relative:.2e} | {q.psnr:.1f} |")


if __name__ == "__main__":
    main()
