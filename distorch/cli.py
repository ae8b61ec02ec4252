"""`python -m distorch plan|demo|convert|quantize`: will it fit, the pack working in one command, old workflows moved
over, and a safetensors model written as a Q8_0 GGUF.

    python -m distorch plan flux1-dev-Q8_0.gguf --vram-gb 12
    python -m distorch plan wan2.2_t2v_14B_fp16.safetensors --vram-gb 16 --virtual-vram-gb 14 --json
    python -m distorch plan wan2.2_t2v_14B_fp16.safetensors --vram-gb 24 --width 1280 --height 720 --frames 81
    python -m distorch demo
    python -m distorch convert multigpu_workflow.json -o distorch_workflow.json
    python -m distorch quantize wan2.1_t2v_14B_bf16.safetensors wan2.1_t2v_14B-Q8_0.gguf --type q8_0
"""

import argparse
import json
import os
import sys

from .allocation import is_device_name
from .budget import ComputeBudget
from .convert import ConvertError, convert_workflow
from .gguf_engine import gguf_module
from .headers import read_tensor_entries, sizes_from_entries
from .ledger import LEDGER
from .legacy_loaders import Machine
from .memory import DeviceMemory, MemoryInventory, safe_pinned_bytes
from .planner import Plan, PlanError, plan_request, plan_sizes
from .report import dtype_note, plan_totals, tier_rows
from .request import PlacementRequest, StreamFormat
from .units import GIB, format_gb
from .workload import (
    CORE_INFERENCE_MIN,
    CORE_RESERVED_VRAM,
    ActivationEstimate,
    Workload,
    WorkloadError,
    core_weight_budget,
    detect_family,
    estimate,
    known_families,
)

IMAGE_ARCHITECTURES = gguf_module("arch").IMAGE_ARCHITECTURES

# Practical pinned host-to-device rates (research/prefetch.md §3.2: ~22-26 GB/s Gen4, ~45-55 GB/s Gen5).
PCIE_RATES_GBPS = {"PCIe 4.0 x16": 24.0, "PCIe 5.0 x16": 50.0}
DEFAULT_ACTIVATION_RESERVE_GB = 2.0
MAX_WORKFLOW_BYTES = 64 * 2**20  # far above any real workflow; refuses to parse a model file by mistake
PROPOSAL_STEP_GB = 0.1
QUANTIZE_TYPES = ("q8_0",)  # distorch.quantize.QUANT_TYPES, named here so that parsing imports no torch
MAX_PROPOSALS = 2000


class _Parser(argparse.ArgumentParser):
    """Bad options end with one line on stderr and exit code 2, not a usage dump."""

    def error(self, message):
        self.exit(2, f"distorch: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m distorch", description="DisTorch virtual VRAM: plan, demo, convert and quantize.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    plan = commands.add_parser("plan", help="plan a model file for a card (reads only the file header)")
    plan.add_argument("model_file")
    plan.add_argument("--vram-gb", type=_non_negative, help="free VRAM of the compute GPU (default: probe it)")
    plan.add_argument("--compute-device", default="cuda:0", help="GPU that runs the model (default cuda:0)")
    plan.add_argument("--virtual-vram-gb", type=_non_negative,
                      help="GB of the model to move off the GPU (default: the smallest value that fits)")
    plan.add_argument("--donor", default="cpu", help="where moved blocks live: cpu or another GPU (cuda:1)")
    plan.add_argument("--donor-vram-gb", type=_non_negative, help="free VRAM of a donor GPU (default: probe it)")
    plan.add_argument("--expert", default="", help='expert allocation string, e.g. "cuda:0,8gb;cpu,*"')
    plan.add_argument("--ram-gb", type=_non_negative, help="free system RAM (default: probe it)")
    plan.add_argument("--activation-reserve-gb", type=_non_negative, default=DEFAULT_ACTIVATION_RESERVE_GB,
                      help=f"VRAM kept for activations (default {DEFAULT_ACTIVATION_RESERVE_GB})")
    plan.add_argument("--prefetch", type=int, default=2, help="streaming slots on the GPU (default 2)")
    plan.add_argument("--stream-format", default="stored", type=str.lower, choices=[f.value for f in StreamFormat],
                      help="how streamed blocks are held in RAM and copied: as stored (default), or q8_0 / "
                           "fp8_e4m3fn (the loaders' stream_format; a .gguf file's quantized blocks stay as stored)")
    plan.add_argument("--json", action="store_true", help="print a JSON object instead of the table")
    workload = plan.add_argument_group("workload", "plan one sampler run as a DisTorch loader in auto mode does: "
                                                   "ComfyUI's activation estimate for the model's family and this "
                                                   "size, and the weight budget it leaves (--vram-gb: free VRAM)")
    workload.add_argument("--width", type=int, help="output width in pixels")
    workload.add_argument("--height", type=int, help="output height in pixels")
    workload.add_argument("--frames", type=int, default=1, help="video frames (default 1: an image)")
    workload.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    demo = commands.add_parser("demo", help="stream a small built-in model and check it against the resident run")
    demo.add_argument("--device", default=None, help="compute device (default: cuda:0 when present, else cpu)")
    demo.add_argument("--virtual-vram-gb", type=_non_negative, default=None,
                      help="GB to stream (default: half of the model's blocks)")
    demo.add_argument("--prefetch", type=int, default=2)
    demo.add_argument("--steps", type=int, default=4)
    demo.add_argument("--tokens", type=int, default=None)
    demo.add_argument("--dim", type=int, default=None)
    demo.add_argument("--depth", type=int, default=None)
    convert = commands.add_parser("convert", help="rewrite a workflow's MultiGPU / GGUF / core loaders as DisTorch "
                                                  "nodes (UI or API format)")
    convert.add_argument("workflow", help="workflow JSON file")
    convert.add_argument("-o", "--output", help="where to write the converted workflow (default: stdout)")
    convert.add_argument("--compute-device", default="cuda:0",
                         help="compute device for loaders that name none (core, ComfyUI-GGUF; default cuda:0)")
    convert.add_argument("--gpus", type=int, default=1,
                         help="GPUs of the machine that runs it, for DisTorch v1's use_other_vram (default 1)")
    convert.add_argument("--keep-core", action="store_true", help="leave core's loader nodes as they are")
    _add_quantize(commands)
    return parser


def _add_quantize(commands) -> None:
    quantize = commands.add_parser(
        "quantize", help="write a safetensors diffusion model as a GGUF for ComfyUI-GGUF and DisTorch (tensor by "
                         "tensor, peak memory about one tensor)",
        description="Writes IN.safetensors as a llama.cpp-style GGUF with ComfyUI-GGUF's names and architecture key. "
                    "Only Q8_0 is offered: gguf-py has no quantizer for the K-quants (Q4_K, Q5_K, Q6_K), so no "
                    "bit-exact reference exists for them (ComfyUI-GGUF's patched llama-quantize makes them from a "
                    "BF16 GGUF). 1-D tensors, norms, biases, raw parameters, small tensors and the architecture's "
                    "embedders and final layers keep their stored type.")
    quantize.add_argument("input", help="the .safetensors model (a diffusion model, or a checkpoint holding one)")
    quantize.add_argument("output", help="the .gguf file to write (never the input)")
    quantize.add_argument("--type", default="q8_0", type=str.lower, choices=QUANTIZE_TYPES,
                          help="quantization type (default q8_0; K-quants: see above)")
    quantize.add_argument("--arch", choices=sorted(IMAGE_ARCHITECTURES),
                          help="general.architecture to write (default: detected from the tensor names as "
                               "ComfyUI-GGUF does)")
    quantize.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    quantize.add_argument("--quiet", action="store_true", help="no progress bar")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(args)
    if args.command == "convert":
        return run_convert(args)
    if args.command == "quantize":
        return run_quantize(args)
    try:
        return run_plan(args)
    except (OSError, ValueError) as error:
        # Missing files, malformed headers (HeaderError, GGUFError), unusable plans and allocation strings.
        return _fail(str(error))


def run_plan(args) -> int:
    if args.prefetch < 1:
        return _fail(f"--prefetch must be at least 1, got {args.prefetch}")
    workload = _workload(args)
    entries = read_tensor_entries(args.model_file)
    sizes = sizes_from_entries(os.path.basename(args.model_file), entries)
    inventory = _inventory(args)
    if workload is not None:
        return run_workload_plan(args, workload, entries, sizes, inventory)
    virtual_vram, proposed = args.virtual_vram_gb, False
    if virtual_vram is None and not args.expert:
        virtual_vram, proposed = propose_virtual_vram(sizes, args, inventory), True
    result = plan_sizes(sizes, compute_device=args.compute_device, virtual_vram_gb=virtual_vram or 0.0,
                        donor_device=args.donor, expert_mode_allocations=args.expert, memory=inventory,
                        prefetch=args.prefetch, stream_format=args.stream_format)
    summary = summarize(args.model_file, result, inventory, virtual_vram, proposed, args.activation_reserve_gb)
    print(json.dumps(summary, indent=2) if args.json else format_summary(result, summary))
    return 0


def run_workload_plan(args, workload: Workload, entries, sizes, inventory: MemoryInventory) -> int:
    """The plan a DisTorch loader makes for one run: automatic unless --virtual-vram-gb or --expert fix the amount
    (then the amount is checked against the same budget, and streams more where it does not fit)."""
    family = detect_family({e.name: e.shape for e in entries})
    if family is None:
        raise WorkloadError(f"{args.model_file}: no activation estimate for this model: its family is not one of "
                            f"{known_families()}; plan it without --width/--height")
    activation = estimate(family, workload)
    free = _compute_free(args)
    floor = format_gb(CORE_INFERENCE_MIN + CORE_RESERVED_VRAM)
    source = (f"ComfyUI's formula: {format_gb(free)} free minus max({floor}, "
              f"activations + {format_gb(CORE_RESERVED_VRAM)})")
    budget = ComputeBudget(core_weight_budget(free, activation.minimum_bytes),
                           activation_bytes=activation.minimum_bytes, source=source)
    auto = args.virtual_vram_gb is None and not args.expert
    request = PlacementRequest.validate(args.compute_device, args.virtual_vram_gb or 0.0, args.donor, args.expert,
                                        prefetch=args.prefetch, auto=auto, stream_format=args.stream_format)
    result = plan_request(sizes, request, memory=inventory, others=LEDGER.holdings(), budget=budget)
    summary = summarize(args.model_file, result, inventory, _gb(result.streamed_stored_bytes) if auto else
                        args.virtual_vram_gb, False, None)
    summary.update(workload_summary(result, workload, activation, free))
    print(json.dumps(summary, indent=2) if args.json else format_workload_summary(result, summary))
    return 0


def workload_summary(plan: Plan, workload: Workload, activation: ActivationEstimate, free: int) -> dict:
    return {
        "mode": "automatic" if plan.mode == "auto" else "fixed",
        "workload": {"width": workload.width, "height": workload.height, "frames": workload.frames,
                     "batch": workload.batch},
        "activation": {**activation.as_dict(), "gb": _gb(activation.minimum_bytes),
                       "cfg_gb": _gb(activation.cfg_bytes)},
        "budget_gb": _gb(plan.budget.weight_bytes),
        "free_vram_gb": _gb(free),
        "streamed_gb": _gb(plan.streamed_stored_bytes),
        "prefetch_reason": plan.prefetch_reason,
        "predicted_copy_s_per_pass": round(plan.schedule.copy_s, 4) if plan.schedule else 0.0,
    }


def format_workload_summary(plan: Plan, summary: dict) -> str:
    activation = summary["activation"]
    shape = "x".join(str(n) for n in activation["latent_shape"])
    lines = [plan.report(),
             f"  workload: {Workload(**summary['workload']).describe()}, latent {shape} ({activation['family']}); "
             f"ComfyUI's activation estimate {activation['gb']:.2f} GB ({activation['cfg_gb']:.2f} GB with cond and "
             "uncond batched)"]
    pageable = f" (+ {summary['pageable_ram_gb']:.2f} GB pageable)" if summary["pageable_ram_gb"] else ""
    lines.append(f"  pinned RAM needed: {summary['pinned_ram_gb']:.2f} GB{pageable}")
    return "\n".join(lines)


def _workload(args) -> Workload | None:
    given = [name for name in ("width", "height") if getattr(args, name) is not None]
    if not given:
        if args.frames != 1 or args.batch != 1:
            raise WorkloadError("--frames and --batch describe a workload: give --width and --height too")
        return None
    if len(given) == 1:
        raise WorkloadError(f"--{given[0]} needs --{'height' if given[0] == 'width' else 'width'} too")
    if args.compute_device.strip().lower() == "cpu":
        raise WorkloadError("--width/--height plan for a GPU's budget; compute on the CPU has none")
    return Workload(args.width, args.height, args.frames, args.batch)


def _compute_free(args) -> int:
    """The compute GPU's free memory as ComfyUI sees it before loading the model (--vram-gb, or probed)."""
    if args.vram_gb is not None:
        return int(args.vram_gb * GIB)
    return MemoryInventory.probe().get(args.compute_device.strip().lower()).free


def run_convert(args) -> int:
    compute = args.compute_device.strip().lower()
    if not is_device_name(compute):
        return _fail(f"--compute-device {args.compute_device!r} is not 'cpu' or 'cuda:N'")
    if not 0 <= args.gpus <= 64:
        return _fail(f"--gpus must be between 0 and 64, got {args.gpus}")
    try:
        workflow = _read_workflow(args.workflow)
        machine = Machine(default_device=compute, gpus=tuple(f"cuda:{i}" for i in range(args.gpus)))
        result = convert_workflow(workflow, machine, include_core=not args.keep_core)
        text = json.dumps(result.workflow, indent=2, ensure_ascii=False) + "\n"
        if args.output:
            with open(args.output, "w", encoding="utf-8") as handle:
                handle.write(text)
        else:
            sys.stdout.write(text)
    except (OSError, ConvertError) as error:
        return _fail(str(error))
    print(result.report(), file=sys.stdout if args.output else sys.stderr)
    return 0


def run_quantize(args) -> int:
    from .quantize import quantize_file

    try:
        result = quantize_file(args.input, args.output, args.type, args.arch, force=args.force,
                               progress=not args.quiet)
    except (OSError, ValueError) as error:  # missing files, bad headers (HeaderError), QuantizeError, disk full
        return _fail(str(error))
    except KeyboardInterrupt:
        return _fail(f"interrupted; {args.output} was not written", code=130)
    plan = result.plan
    types = ", ".join(f"{name} {count}" for name, count in plan.type_counts().items())
    how = "detected" if plan.detected else "from --arch"
    dropped = f", {plan.dropped} tensors outside the diffusion model left out" if plan.dropped else ""
    print(f"distorch: wrote {args.output}: {plan.architecture} ({how}), {len(plan.tensors)} tensors ({types})"
          f"{dropped}; {_gb(result.input_bytes):.3f} GB -> {_gb(result.output_bytes):.3f} GB in {result.seconds:.1f} s")
    return 0


def _read_workflow(path: str):
    with open(path, "rb") as handle:
        data = handle.read(MAX_WORKFLOW_BYTES + 1)
    if len(data) > MAX_WORKFLOW_BYTES:
        raise ConvertError(f"{path}: larger than {MAX_WORKFLOW_BYTES} bytes, not a workflow")
    try:
        return json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise ConvertError(f"{path}: not JSON ({str(error)[:80]})") from None


def propose_virtual_vram(sizes, args, inventory) -> float:
    """The smallest virtual VRAM whose plan fits the compute device, in 0.1 GB steps (finer for tiny blocks)."""
    step = proposal_step_gb(sizes)
    last_error = None
    for index in range(int(sizes.total_bytes / GIB / step) + 2):
        candidate = round(index * step, 4)
        try:
            plan_sizes(sizes, compute_device=args.compute_device, virtual_vram_gb=candidate, donor_device=args.donor,
                       memory=inventory, prefetch=args.prefetch, stream_format=args.stream_format)
            return candidate
        except PlanError as error:
            last_error = error
    raise PlanError(f"{sizes.name} does not fit even with every block streamed: {last_error}")


def proposal_step_gb(sizes) -> float:
    smallest_block = min((n for _, n in sizes.blocks if n), default=GIB)
    # At most MAX_PROPOSALS plans: 1-byte blocks beside gigabytes of other weights made this run for hours.
    return max(min(PROPOSAL_STEP_GB, smallest_block / GIB), sizes.total_bytes / GIB / MAX_PROPOSALS)


def summarize(path: str, plan: Plan, inventory: MemoryInventory, virtual_vram, proposed: bool,
              reserve_gb: float | None) -> dict:
    compute = inventory.get(plan.compute_device)
    totals = plan_totals(plan)
    per_forward = totals.per_pass_bytes
    return {
        "file": path,
        "model": plan.model_name,
        "total_gb": _gb(plan.resident_bytes + plan.streamed_stored_bytes),
        "blocks": len(plan.blocks),
        "rest_gb": _gb(plan.rest_bytes),
        "compute_device": plan.compute_device,
        "virtual_vram_gb": virtual_vram,
        "proposed": proposed,
        "activation_reserve_gb": reserve_gb,
        "dtype": {"source": plan.dtype_source, "note": dtype_note(plan),
                  "gb": {name: _gb(n) for name, n in plan.dtype_bytes.items()}},
        "tiers": [
            {"device": r.device, "tier": r.tier, "role": r.role, "blocks": r.blocks, "gb": _gb(r.nbytes),
             "moved_off_gb": _gb(r.moved_off)}
            for r in tier_rows(plan)
        ],
        "vram_gb": {"weights": _gb(plan.resident_bytes), "slots": _gb(totals.slots_bytes),
                    "decode": _gb(totals.decode_bytes), "total": _gb(totals.compute_bytes),
                    "usable": _gb(compute.usable)},
        "stream_format": plan.stream_format,
        "saved_gb": _gb(totals.saved_bytes),
        "moved_off_gb": _gb(totals.moved_off_bytes),
        "vram_freed_gb": _gb(totals.vram_freed_bytes),
        "pinned_ram_gb": _gb(totals.pinned_bytes),
        "pageable_ram_gb": _gb(totals.pageable_bytes),
        "transfer": {
            "per_forward_gb": _gb(per_forward),
            "per_step_with_cfg_gb": _gb(2 * per_forward),
            "seconds_per_forward": {name: round(per_forward / (rate * 1e9), 3)
                                    for name, rate in PCIE_RATES_GBPS.items()},
        },
        "streamed": sorted(plan.streamed, key=lambda n: [b.name for b in plan.blocks].index(n)),
        "warnings": list(plan.warnings),
    }


def format_summary(plan: Plan, summary: dict) -> str:
    lines = [plan.report()]
    if summary["proposed"]:
        lines.append(f"  proposed virtual_vram_gb = {summary['virtual_vram_gb']:.2f}: the smallest value that fits "
                     f"{plan.compute_device} with {summary['activation_reserve_gb']:.1f} GB kept for activations")
    pageable = f" (+ {summary['pageable_ram_gb']:.2f} GB pageable)" if summary["pageable_ram_gb"] else ""
    lines.append(f"  pinned RAM needed: {summary['pinned_ram_gb']:.2f} GB{pageable}")
    transfer = summary["transfer"]
    estimates = ", ".join(f"{t:.2f} s on {name}" for name, t in transfer["seconds_per_forward"].items())
    lines.append(f"  transfer per forward: {transfer['per_forward_gb']:.2f} GB ({estimates}); "
                 f"x2 per step when cond and uncond run as separate forwards")
    return "\n".join(lines)


def _inventory(args) -> MemoryInventory:
    probed = None
    devices = {}
    reserve = int(args.activation_reserve_gb * GIB)
    compute = args.compute_device.strip().lower()
    if compute != "cpu":
        if args.vram_gb is not None:
            free = int(args.vram_gb * GIB)
            devices[compute] = DeviceMemory(compute, max(0, free - reserve), free)
        else:
            probed = MemoryInventory.probe()
            if compute not in probed.devices:
                raise PlanError(f"no GPU {compute} found on this machine: pass --vram-gb to plan for a card")
            found = probed.devices[compute]
            devices[compute] = DeviceMemory(compute, max(0, found.free - reserve), found.total)
    donor = args.donor.strip().lower()
    if donor not in ("cpu", compute):
        if args.donor_vram_gb is not None:
            devices[donor] = DeviceMemory(donor, int(args.donor_vram_gb * GIB), int(args.donor_vram_gb * GIB))
        else:
            probed = probed or MemoryInventory.probe()
            if donor not in probed.devices:
                raise PlanError(f"no donor GPU {donor} found on this machine: pass --donor-vram-gb")
            devices[donor] = probed.devices[donor]
    if args.ram_gb is not None:
        ram = int(args.ram_gb * GIB)
        devices["cpu"] = DeviceMemory("cpu", ram, ram)
        pinned = safe_pinned_bytes(ram, 0)
    else:
        probed = probed or MemoryInventory.probe()
        devices["cpu"] = probed.devices["cpu"]
        pinned = probed.pinned_budget
    return MemoryInventory(devices, pinned)


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _gb(nbytes: int) -> float:
    return round(nbytes / GIB, 3)


def _fail(message: str, code: int = 2) -> int:
    print(f"distorch: error: {message}", file=sys.stderr)
    return code

