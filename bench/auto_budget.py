"""Auto placement on a GPU: a streamed forward's peak VRAM against the card it was planned for, at two workloads.

    python bench/auto_budget.py                          # CUDA: a Wan-width toy DiT, 480p and 720p token counts
    python bench/auto_budget.py --device cpu --dim 64 --depth 6 --tokens 16 32   # what a CPU can check

Per workload (Wan 2.1 14B's token counts for 832x480 and 1280x720 at 81 frames): a resident forward measures the
activations A; the card is V = A + the weights outside the blocks + `--resident` blocks + 2 slots; the auto plan
fits the weight budget V - A (the planner with a ComputeBudget, as a loader in auto mode fits ComfyUI's budget); the
streamed forward's peak must be within 5 % of V. On the 720p card the 480p workload must stream fewer blocks (the
same card with smaller activations leaves room for more weights). Prints a markdown table; exits 1 when a check fails.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from steady_state import Check, build, check_table, passes  # noqa: E402

import distorch  # noqa: E402
from distorch.budget import ComputeBudget  # noqa: E402
from distorch.placement import model_sizes  # noqa: E402
from distorch.planner import plan_request  # noqa: E402
from distorch.units import GIB  # noqa: E402

TOLERANCE = 0.05
WAN_TOKENS = {"480p": 21 * 30 * 52, "720p": 21 * 45 * 80}  # latent 21 x 60 x 104 and 21 x 90 x 160, patches 1x2x2


def activations(model, tokens: int, args, device) -> int:
    """Peak bytes a resident forward allocates beyond the weights (0 where it cannot be measured)."""
    x = torch.randn(1, tokens, 64, device=device, dtype=args.dtype)
    t = torch.full((1,), 500.0, device=device)
    passes(model, x, t, 1)
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize()
    weights = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    passes(model, x, t, 1)
    return torch.cuda.max_memory_allocated() - weights


def card(sizes, activation: int, resident_blocks: int, prefetch: int) -> int:
    block = max(n for _, n in sizes.blocks)
    return activation + sizes.rest_bytes + (resident_blocks + prefetch) * block


def auto_plan(model, device, budget: int, activation: int):
    request = distorch.PlacementRequest.validate(str(device), auto=True)
    return plan_request(model_sizes(model), request, budget=ComputeBudget(budget, activation_bytes=activation,
                                                                          source="bench card"))


def streamed_peak(model, plan, tokens: int, args, device) -> int:
    x = torch.randn(1, tokens, 64, device=device, dtype=args.dtype)
    t = torch.full((1,), 500.0, device=device)
    if device.type != "cuda":
        with distorch.stream(model, plan):
            passes(model, x, t, 2)
        return 0
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with distorch.stream(model, plan):
        passes(model, x, t, 2)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    return peak


def run(args) -> list[Check]:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    model = build(args, device)
    measured = {name: activations(model, tokens, args, device) for name, tokens in zip(WAN_TOKENS, args.tokens)}
    if cuda:
        model = model.to("cpu")
        torch.cuda.empty_cache()
    sizes = model_sizes(model)
    checks = []
    cards = {name: card(sizes, activation, args.resident, 2) for name, activation in measured.items()}
    for (name, activation), tokens in zip(measured.items(), args.tokens):
        plan = auto_plan(model, device, cards[name] - activation, activation)
        peak = streamed_peak(model, plan, tokens, args, device)
        ok = abs(peak - cards[name]) <= TOLERANCE * cards[name] if cuda else None
        checks.append(Check(f"{name} ({tokens} tokens): peak VRAM / card, {len(plan.streamed)} of "
                            f"{len(plan.blocks)} blocks streamed", f"{peak / GIB:.3f} GB" if cuda else "n/a",
                            f"{cards[name] / GIB:.3f} GB +-5 %", ok))
    small, large = list(measured)
    on_large_card = {name: auto_plan(model, device, cards[large] - measured[name], measured[name]) for name in measured}
    fewer = len(on_large_card[small].streamed), len(on_large_card[large].streamed)
    checks.append(Check(f"streamed blocks on the {large} card, {small} vs {large}", f"{fewer[0]} vs {fewer[1]}",
                        f"{small} fewer", fewer[0] < fewer[1] if cuda else None))
    return checks


def table(checks: list[Check], args) -> str:
    return check_table(f"auto placement: {args.device}, dim {args.dim}, depth {args.depth}, {args.resident} blocks "
                       "resident on each card", checks)


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda:0" if cuda else "cpu")
    parser.add_argument("--dim", type=int, default=5120 if cuda else 64)
    parser.add_argument("--heads", type=int, default=40 if cuda else 2)
    parser.add_argument("--ffn", type=int, default=13824 if cuda else 128)
    parser.add_argument("--depth", type=int, default=12 if cuda else 6)
    parser.add_argument("--tokens", type=int, nargs=2, default=list(WAN_TOKENS.values()) if cuda else [16, 32],
                        help="token counts of the two workloads (default: Wan 14B at 480p and 720p, 81 frames)")
    parser.add_argument("--resident", type=int, default=5, help="blocks each card keeps resident beside the slots")
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
