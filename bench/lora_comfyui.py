"""LoRA cost and output in a real headless ComfyUI (`--cpu`): DisTorch vs core's loader and ComfyUI-GGUF.

    python bench/lora_comfyui.py                                    # ComfyUI 0.3.64 from ~/.cache/distorch/comfyui
    python bench/lora_comfyui.py --comfyui PATH --python VENV_PYTHON --layers 4 --size 128 --steps 2
    python bench/lora_comfyui.py --pack /path/to/another/checkout   # the same measurement of another DisTorch

A Wan 2.1 1.3B-shaped diffusion model (dim 1536, FFN 8960, 12 heads; `--layers` blocks instead of 30, random
weights, bf16 safetensors and a GGUF Q8_0 copy) and two rank-32 LoRAs on every attention and FFN matrix
(`diffusion_model.<key>.lora_down/lora_up/alpha`, as tests/comfyui/make_models.py writes them). Each loader
runs a KSampler with and without two chained LoraLoaderModelOnly nodes, in one server:

* DisTorchUNetLoader, safetensors and Q8_0, with `--streamed` of the blocks' bytes streamed (most of them);
* core's UNETLoader (merges the LoRAs into its resident weights once);
* city96/ComfyUI-GGUF's UnetLoaderGGUF on the Q8_0 file (merges on every forward), when its snapshot is in
  the shared folder (tests/reference_pack.py).

A step's time is the server's execution time (its execution_start to execution_success messages) of a prompt
whose loaders are cached: each prompt runs first with one seed (loading, patching) and is timed with the
next seed, so only the sampler and SaveLatent execute. Rounds alternate without and with the LoRAs; the
fastest of `--rounds` counts for each. Beside it, the server process's CPU time for the same prompt (user +
system, /proc): on a shared machine, wall time swings with the neighbours' load, CPU time much less. Also
reported: each latent's relative difference (Frobenius) to core's with the same LoRAs and seed, and for the
Q8_0 loaders to ComfyUI-GGUF's (the same quantized weights).
"""

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

DIM, FFN = 1536, 8960  # Wan 2.1 1.3B (12 heads of 128: ComfyUI derives the head count from dim)
RANK = 32
LORAS = (("bench_wan13b_lora_a.safetensors", 1.0), ("bench_wan13b_lora_b.safetensors", 0.7))


def make_models(out: Path, layers: int, comfyui: Path) -> None:
    """Writes the model, its Q8_0 copy and the two LoRAs (run by a ComfyUI interpreter: detection needs comfy)."""
    sys.argv = sys.argv[:1] + ["--cpu"]  # comfy.cli_args parses the command line on import
    sys.path[:0] = [str(comfyui), str(REPO / "tests" / "comfyui"), str(REPO)]
    import comfy.options

    comfy.options.enable_args_parsing()
    from make_models import random_state_dict, wan_lora, wan_seed
    from safetensors.torch import save_file

    from gguf_loader import write_gguf

    state = random_state_dict(wan_seed(DIM, layers, FFN), "WAN21_T2V", seed=21)
    save_file(state, str(out / "diffusion_models" / "bench_wan13b.safetensors"))
    qtypes = {k: ("Q8_0" if v.ndim == 2 and v.shape[-1] % 32 == 0 else None) for k, v in state.items()}
    write_gguf(out / "diffusion_models" / "bench_wan13b_Q8_0.gguf", {k: v.float() for k, v in state.items()},
               architecture="wan", qtypes=qtypes)
    for (name, _), seed in zip(LORAS, (31, 32)):
        save_file(wan_lora(state, rank=RANK, seed=seed), str(out / "loras" / name))


def prompt(loader: dict, loras: bool, seed: int, args, prefix: str) -> dict:
    nodes = {
        "1": loader,
        "2": {"class_type": "DisTorchTestZeroConditioning", "inputs": {"tokens": 8, "context_dim": 4096,
                                                                         "pooled_dim": 0}},
        "3": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": args.size, "height": args.size,
                                                                   "length": 1, "batch_size": 1}},
    }
    model = ["1", 0]
    for index, (name, strength) in enumerate(LORAS if loras else ()):
        nodes[f"l{index}"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": model, "lora_name": name,
                                                                              "strength_model": strength}}
        model = [f"l{index}", 0]
    nodes["5"] = {"class_type": "KSampler", "inputs": {"model": model, "positive": ["2", 0], "negative": ["2", 0],
                                                      "latent_image": ["3", 0], "seed": seed, "steps": args.steps,
                                                      "cfg": 2.5, "sampler_name": "euler", "scheduler": "simple",
                                                      "denoise": 1.0}}
    nodes["9"] = {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": prefix}}
    return nodes


def execution_seconds(result) -> float:
    stamps = {event: data["timestamp"] for event, data in result.body["status"]["messages"]}
    return (stamps["execution_success"] - stamps["execution_start"]) / 1000


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the server process so far (Linux): steadier than wall time on a shared machine."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loaders(args, reference: bool) -> dict[str, dict]:
    streamed_gb = args.streamed
    distorch = {"weight_dtype": "default", "compute_device": "cpu", "virtual_vram_gb": streamed_gb,
                "donor_device": "cpu", "expert_mode_allocations": ""}
    found = {
        "DisTorch safetensors, streamed": {"class_type": "DisTorchUNetLoader",
                                           "inputs": {"unet_name": "bench_wan13b.safetensors", **distorch}},
        "DisTorch Q8_0 GGUF, streamed": {"class_type": "DisTorchUNetLoader",
                                         "inputs": {"unet_name": "bench_wan13b_Q8_0.gguf", **distorch}},
        "core UNETLoader (resident)": {"class_type": "UNETLoader", "inputs": {"unet_name": "bench_wan13b.safetensors",
                                                                                "weight_dtype": "default"}},
    }
    if reference:
        found["ComfyUI-GGUF UnetLoaderGGUF Q8_0"] = {"class_type": "UnetLoaderGGUF",
                                                      "inputs": {"unet_name": "bench_wan13b_Q8_0.gguf"}}
    return found


def measure(server, name: str, loader: dict, args, seeds) -> dict:
    """Fastest step time without and with the LoRAs (alternating rounds), and the last latent of each."""
    times = {False: [], True: []}
    cpu = {False: [], True: []}
    latents = {}
    for _ in range(args.rounds):
        for loras in (False, True):
            warm = server.run(prompt(loader, loras, next(seeds), args, "warm"), timeout=3600)
            before = cpu_seconds(server.process.pid)
            timed = server.run(prompt(loader, loras, args.seed, args, f"t{int(loras)}"), timeout=3600)
            cpu[loras].append(cpu_seconds(server.process.pid) - before)
            for result in (warm, timed):
                if not result.ok:
                    raise RuntimeError(f"{name}: {result.error_text()[:2000]}\n{server.log()[-3000:]}")
            times[loras].append(execution_seconds(timed))
            latents[loras] = server.latent(timed)
    row = {"plain_s": min(times[False]), "lora_s": min(times[True]), "plain_cpu": min(cpu[False]),
           "lora_cpu": min(cpu[True]), "latents": latents}
    print(f"{name}: {row['plain_s']:.2f} s without, {row['lora_s']:.2f} s with the LoRAs: "
          f"{row['lora_s'] / row['plain_s']:.3f}x; CPU {row['lora_cpu'] / row['plain_cpu']:.3f}x  "
          f"(wall: {times}, cpu: {cpu})", flush=True)
    return row


def relative(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def parse_args(argv=None):
    home = Path.home() / ".cache" / "distorch" / "comfyui"
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", type=Path, default=home / "comfyui-0.3.64")
    parser.add_argument("--python", default=str(home / "venv-0.3.64" / "bin" / "python"))
    parser.add_argument("--pack", type=Path, default=REPO, help="the DisTorch checkout to install (default: this)")
    parser.add_argument("--layers", type=int, default=4, help="Wan blocks (the real 1.3B model has 30)")
    parser.add_argument("--size", type=int, default=128, help="latent width and height in pixels (one frame)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--streamed", type=float, default=0.6, help="virtual_vram_gb: GB of blocks to stream")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7, help="the timed prompts' seed (latents compared with it)")
    parser.add_argument("--no-reference", action="store_true", help="skip ComfyUI-GGUF")
    parser.add_argument("--make-models", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.make_models:
        make_models(args.make_models, args.layers, args.comfyui)
        return
    from comfyui_harness import PACK_DIR_NAME, ComfyInstall, ComfyServer, _version_of
    from reference_pack import reference_tarball, unpack_reference

    base = Path(tempfile.mkdtemp(prefix="distorch-lora-bench-"))
    try:
        reference = None if args.no_reference or reference_tarball() is None else unpack_reference(base / "ref")
        install = ComfyInstall(_version_of(args.comfyui), args.comfyui, args.python)
        server = ComfyServer(base / "server", install, extra_custom_nodes=(reference,) if reference else ())
        server.base.mkdir(parents=True)
        server.prepare()
        if args.pack.resolve() != REPO:
            shutil.rmtree(server.base / "custom_nodes" / PACK_DIR_NAME)
            shutil.copytree(args.pack, server.base / "custom_nodes" / PACK_DIR_NAME,
                            ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__"))
        subprocess.run([args.python, __file__, "--make-models", str(server.base / "models"), "--layers",
                        str(args.layers), "--comfyui", str(args.comfyui)], check=True)
        server.start()
        run(server, args, reference is not None)
    finally:
        if "server" in locals():
            server.stop()
        shutil.rmtree(base, ignore_errors=True)


def run(server, args, reference: bool) -> None:
    commit = subprocess.run(["git", "-C", str(args.pack), "log", "-1", "--format=%h %s"], capture_output=True,
                            text=True).stdout.strip()[:80]
    print(f"# {platform.node()}, ComfyUI {server.install.version} --cpu, {time.strftime('%Y-%m-%d')}, DisTorch "
          f"{commit}: Wan 2.1 1.3B shape x {args.layers} blocks, {args.size}x{args.size} x 1 frame, "
          f"{args.steps} steps cfg 2.5, two rank-{RANK} LoRAs, fastest of {args.rounds} rounds", flush=True)
    seeds = iter(range(1000, 10**6))
    rows = {name: measure(server, name, loader, args, seeds) for name, loader in loaders(args, reference).items()}
    core = rows["core UNETLoader (resident)"]["latents"]
    same_weights = rows.get("ComfyUI-GGUF UnetLoaderGGUF Q8_0", {}).get("latents")
    print("\n| loader | step s, no LoRA | step s, 2 LoRAs | × no LoRA | server CPU s × no LoRA "
          "| latent vs core's (bf16 weights) | latent vs ComfyUI-GGUF's (Q8_0 weights) |")
    print("|---" * 7 + "|")
    for name, row in rows.items():
        versus_gguf = f"{relative(row['latents'][True], same_weights[True]):.2e}" if same_weights and "Q8_0" in name \
            else "–"
        print(f"| {name} | {row['plain_s']:.2f} | {row['lora_s']:.2f} | {row['lora_s'] / row['plain_s']:.3f} | "
              f"{row['lora_cpu'] / row['plain_cpu']:.3f} | {relative(row['latents'][True], core[True]):.2e} | "
              f"{versus_gguf} |")
    plans = [line for line in server.log().splitlines() if "distorch: streaming" in line]
    print("\n" + "\n".join(dict.fromkeys(plans)))  # one line per DisTorch model


if __name__ == "__main__":
    main()
