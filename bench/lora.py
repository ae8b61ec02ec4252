"""LoRA step cost on streamed bf16 and GGUF Q8_0 blocks: DisTorch's side path vs core's per-forward merge.

    python bench/lora.py                     # CUDA when present (Wan 2.1 14B widths), else Wan 2.1 1.3B widths on CPU
    python bench/lora.py --device cuda:0 --dim 5120 --ffn 13824 --heads 40 --depth 4 --tokens 4096 \
        --weights bf16 q8_0 --ranks 16 32 64 --loras 0 1 2 4

The subject is a DiT (distorch.toy) built with the GGUF engine's layers, every block streamed by DisTorch,
its Linear weights bf16 or GGUF Q8_0. Per row, `n` LoRAs of one rank on every attention and MLP matrix of
every block, run two ways:

* side: DisTorch's low-rank side path (distorch/lowrank.py), all LoRAs of a layer stacked into one pair;
* merge: what ComfyUI does for a streamed or quantized layer, and DisTorch did before: a weight function per
  layer that rebuilds `W + ΔW` after the cast or dequantization on every forward, from LoRA tensors left in
  RAM as LoraLoader loads them. With `--comfyui PATH` (run with that ComfyUI's interpreter) these are core's
  own `LowVramPatch` and `LoRAAdapter`; otherwise the same arithmetic here (core's `calculate_weight` for a
  plain LoRA: `W += (strength·alpha/rank · up @ down)` in the compute dtype).

Columns: ms per forward and the ratio to the forward without LoRAs. Per row the three forwards (no LoRA,
side, merge) are timed in turns, `--repeats` rounds, and the fastest of each counts: on a shared machine
the minimum is stable where medians swing with the neighbours' load, and turns give every path the same
conditions. ComfyUI-GGUF and core's own loaders are measured in a real ComfyUI by
bench/lora_comfyui.py.
"""

import argparse
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import distorch  # noqa: E402
from distorch.lowrank import LowRankTerm, SidePaths, layer_geometry, stack_terms  # noqa: E402
from distorch.toy import ToyDiT  # noqa: E402
from distorch.units import GIB  # noqa: E402
from gguf_loader import make_ops, quantize_q8_0  # noqa: E402

PATCHED = ("qkv", "proj", "fc1", "fc2")  # every attention and MLP matrix of a block
ALPHA_PER_RANK = 1.0  # alpha = rank, as most trainers write it: scale = strength


@dataclass(frozen=True)
class Row:
    weights: str
    rank: int
    loras: int
    path: str
    ms: float
    base_ms: float

    @property
    def ratio(self) -> float:
        return self.ms / self.base_ms


def build_model(args, weights: str) -> ToyDiT:
    """The DiT with GGUF layers on the CPU (where streamed weights live), random weights drawn on the compute
    device (fast) and moved: Linear weights Q8_0 or bf16, everything else bf16."""
    device = torch.device(args.device)
    with torch.device("meta"):
        shapes = ToyDiT(args.dim, args.depth, args.heads, channels=64, ffn_dim=args.ffn).state_dict()
    model = ToyDiT(args.dim, args.depth, args.heads, channels=64, ffn_dim=args.ffn, ops=make_ops())
    generator = torch.Generator(device=device).manual_seed(0)
    state = {}
    for name, meta in shapes.items():
        if name.endswith("frequencies"):
            state[name] = torch.exp(-math.log(10000.0) * torch.arange(meta.shape[0]) / meta.shape[0])
            continue
        values = torch.randn(meta.shape, generator=generator, device=device).div_(math.sqrt(meta.shape[-1]))
        quantize = weights == "q8_0" and name.endswith(".weight") and meta.dim() == 2 and meta.shape[-1] % 32 == 0
        state[name] = (quantize_q8_0(values) if quantize else values.to(torch.bfloat16)).cpu()
    model.load_state_dict(state)
    return model


def patched_layers(model: ToyDiT) -> list[tuple[str, torch.nn.Module]]:
    return [(f"blocks.{i}.{name}", getattr(block, name)) for i, block in enumerate(model.blocks) for name in PATCHED]


def make_loras(layers, rank: int, count: int, seed: int) -> dict[str, list[LowRankTerm]]:
    """`count` LoRAs per layer as LoraLoader leaves them: float16 tensors in RAM, strength 1, alpha = rank."""
    generator = torch.Generator().manual_seed(seed)
    loras = {}
    for name, layer in layers:
        out_features, in_features = layer.weight.shape
        loras[name] = [LowRankTerm((torch.randn(out_features, rank, generator=generator) * 0.01).half(),
                                   (torch.randn(rank, in_features, generator=generator) * 0.01).half(),
                                   ALPHA_PER_RANK) for _ in range(count)]
    return loras


class CoreMerge:
    """Core's per-forward merge of plain LoRAs into one layer's weight (its LowVramPatch and LoRAAdapter when
    ComfyUI is importable, else the same arithmetic)."""

    def __init__(self, key: str, terms: list[LowRankTerm], core):
        self.key = key
        self.terms = terms
        self.core = core  # (comfy.model_patcher, comfy.weight_adapter) or None
        if core is not None:
            patcher_module, adapters = core
            patches = {key: [(1.0, adapters.LoRAAdapter(set(), (t.up, t.down, float(t.rank) * ALPHA_PER_RANK, None,
                                                                None, None)), 1.0, None, None) for t in terms]}
            self.function = patcher_module.LowVramPatch(key, patches)

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        if self.core is not None:
            return self.function(weight)
        dtype = weight.dtype  # LowVramPatch merges in the compute dtype the weight was cast to
        for term in self.terms:
            up = term.up.to(weight.device, dtype)  # core casts the LoRA's tensors to the device on every merge
            down = term.down.to(weight.device, dtype)
            weight += (term.scale * torch.mm(up, down)).to(dtype)
        return weight


def attach(model: ToyDiT, loras: dict, count: int, path: str, args) -> SidePaths | None:
    layers = dict(patched_layers(model))
    if path == "side":
        side_paths = SidePaths(signature=(path, count))
        for name, terms in loras.items():
            layer = layers[name]
            side_paths.add(name, layer, stack_terms(terms[:count], layer_geometry(layer), args.device,
                                                    torch.bfloat16))
        return side_paths
    for name, terms in loras.items():
        layers[name].weight_function = [CoreMerge(f"{name}.weight", terms[:count], args.core)]
    return None


def detach(model: ToyDiT, side_paths: SidePaths | None) -> None:
    if side_paths is not None:
        side_paths.remove()
    for _, layer in patched_layers(model):
        layer.weight_function = []


def time_forward(model: ToyDiT, x: torch.Tensor, t: torch.Tensor, device: torch.device) -> float:
    """ms of one forward; on CUDA timed with events around it."""
    if device.type != "cuda":
        start = time.perf_counter()
        model(x, t)
        return (time.perf_counter() - start) * 1e3
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    model(x, t)
    end.record()
    end.synchronize()
    return begin.elapsed_time(end)


def time_in_turns(model: ToyDiT, loras: dict, count: int, x, t, args) -> dict[str, float]:
    """Fastest ms per path over `args.repeats` rounds of (none, side, merge), each after one warm-up forward."""
    device = torch.device(args.device)
    samples = {path: [] for path in ("none", "side", "merge")}
    for _ in range(args.repeats):
        for path in samples:
            side_paths = attach(model, loras, count, path, args) if path != "none" else None
            model(x, t)
            samples[path].append(time_forward(model, x, t, device))
            detach(model, side_paths)
    return {path: min(values) for path, values in samples.items()}


def run(args, weights: str) -> list[Row]:
    device = torch.device(args.device)
    model = build_model(args, weights)
    layout = distorch.discover(model)
    plan = distorch.plan(model, compute_device=str(device), virtual_vram_gb=layout.block_bytes / GIB,
                         prefetch=args.prefetch)
    x = torch.randn(1, args.tokens, 64, device=device, dtype=torch.bfloat16)
    t = torch.full((1,), 500.0, device=device)
    rows = []
    with torch.inference_mode(), distorch.stream(model, plan, prefetch=args.prefetch):
        for rank in args.ranks:
            loras = make_loras(patched_layers(model), rank, max(args.loras), seed=rank)
            for count in (n for n in args.loras if n):
                fastest = time_in_turns(model, loras, count, x, t, args)
                for path in ("side", "merge"):
                    rows.append(Row(weights, rank, count, path, fastest[path], fastest["none"]))
                    print(format_rows(rows[-1:]).splitlines()[-1], flush=True)
    return rows


def format_rows(rows: list[Row]) -> str:
    lines = ["| weights | rank | LoRAs | path | ms / forward | no-LoRA ms | × no LoRA |", "|---" * 7 + "|"]
    for r in rows:
        lines.append(f"| {r.weights} | {r.rank} | {r.loras} | {r.path} | {r.ms:.1f} | {r.base_ms:.1f} "
                     f"| {r.ratio:.3f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda:0" if cuda else "cpu")
    parser.add_argument("--dim", type=int, default=5120 if cuda else 1536)
    parser.add_argument("--ffn", type=int, default=13824 if cuda else 8960)
    parser.add_argument("--heads", type=int, default=40 if cuda else 12)
    parser.add_argument("--depth", type=int, default=4 if cuda else 2)
    parser.add_argument("--tokens", type=int, default=4096 if cuda else 256)
    parser.add_argument("--weights", nargs="+", default=["bf16", "q8_0"], choices=["bf16", "q8_0"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[16, 32, 64])
    parser.add_argument("--loras", nargs="+", type=int, default=[0, 1, 2, 4])
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="rounds of (no LoRA, side, merge) per row")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--comfyui", help="a ComfyUI checkout: the merge runs core's own LowVramPatch")
    return parser.parse_args(argv)


def core_modules(path: str | None, device: str):
    """core's model_patcher and weight_adapter from the ComfyUI at `path` (None without one)."""
    if path is None:
        return None
    sys.argv = sys.argv[:1] + (["--cpu"] if device == "cpu" else [])
    sys.path.insert(0, str(Path(path).resolve()))
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.model_patcher
    import comfy.weight_adapter

    return comfy.model_patcher, comfy.weight_adapter


def main(argv=None) -> list[Row]:
    args = parse_args(argv)
    args.core = core_modules(args.comfyui, args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    merge = "core's LowVramPatch" if args.core else "core's arithmetic"
    print(f"# {platform.node()} {name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}: dim {args.dim}, "
          f"ffn {args.ffn}, {args.depth} blocks all streamed, {args.tokens} tokens, bf16 compute, merge = {merge}, "
          f"{torch.get_num_threads()} threads, fastest of {args.repeats} rounds")
    rows = []
    for weights in args.weights:
        rows += run(args, weights)
    print(format_rows(rows))
    return rows


if __name__ == "__main__":
    main()
