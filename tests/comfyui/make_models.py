"""Writes tiny random-weight models that ComfyUI detects as real ones, for the integration tests.

Run with the ComfyUI interpreter:  python make_models.py --comfyui PATH --out MODELS_DIR

ComfyUI derives Wan 2.1 and SD3 configs from a handful of tensor shapes, so a seed dict with just
those shapes is detected, the real model class is built from the detected config, and its full
state dict (random values) is saved: a few MB that load through the same code as the real models.
Also written: LoRAs for the Wan model (one of rank 4, two of rank 32 to stack), and GGUF copies (BF16: same
values; Q8_0: quantized, with a safetensors file of the dequantized weights for the core-loader reference).
"""

import argparse
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
WAN_DIM, WAN_LAYERS, WAN_FFN = 128, 4, 256
# A Wan 2.1 of ~290 MB in RAM (float32 under --cpu), for the memory tests: large enough that a second copy of
# half its blocks stands out of the server's RSS noise, small enough for CI.
MEDIUM_WAN_DIM, MEDIUM_WAN_LAYERS, MEDIUM_WAN_FFN = 512, 16, 2048
SD3_DEPTH = 2
STACKED_LORAS = {"tiny_wan21_lora_r32_a.safetensors": 11, "tiny_wan21_lora_r32_b.safetensors": 12}


def wan_seed(dim: int = WAN_DIM, layers: int = WAN_LAYERS, ffn: int = WAN_FFN) -> dict:
    seed = {
        "head.modulation": torch.empty(1, 2, dim),
        "head.head.weight": torch.empty(16 * 4, dim),
        "patch_embedding.weight": torch.empty(dim, 16, 1, 2, 2),
    }
    for i in range(layers):
        seed[f"blocks.{i}.ffn.0.weight"] = torch.empty(ffn, dim)
    return seed


def sd3_seed() -> dict:
    hidden = 64 * SD3_DEPTH
    return {
        "joint_blocks.0.context_block.attn.qkv.weight": torch.empty(3 * hidden, hidden),
        "x_embedder.proj.weight": torch.empty(hidden, 16, 2, 2),
        "final_layer.linear.weight": torch.empty(2 * 2 * 16, hidden),
        "y_embedder.mlp.0.weight": torch.empty(hidden, 2048),
        "context_embedder.weight": torch.empty(hidden, 4096),
        "pos_embed": torch.empty(1, 16 * 16, hidden),
    }


def random_state_dict(seed_sd: dict, expected: str, seed: int) -> dict:
    import comfy.model_detection

    config = comfy.model_detection.model_config_from_unet(seed_sd, "")
    if type(config).__name__ != expected:
        raise SystemExit(f"seed detected as {type(config).__name__}, expected {expected}")
    model = config.get_model({}, "", device=torch.device("cpu"))
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in model.diffusion_model.state_dict().items():
        if key.endswith("bias"):
            out[key] = torch.randn(value.shape, generator=generator) * 0.01
        elif value.ndim == 1 and "norm" in key:
            out[key] = 1 + torch.randn(value.shape, generator=generator) * 0.01
        else:
            out[key] = torch.randn(value.shape, generator=generator) * 0.05
    return {k: v.to(torch.bfloat16).contiguous() for k, v in out.items()}


def tiny_vae(seed: int = 3, latent_channels: int = 4) -> dict:
    """A TAESD (ComfyUI builds its architecture from the `taesd_decoder.*` keys): a real VAE of ~2 MB."""
    import comfy.taesd.taesd

    generator = torch.Generator().manual_seed(seed)
    model = comfy.taesd.taesd.TAESD(latent_channels=latent_channels)
    state = {k: torch.randn(v.shape, generator=generator) * 0.05 for k, v in model.state_dict().items()}
    state["vae_scale"], state["vae_shift"] = torch.tensor(0.18215), torch.tensor(0.0)
    return {k: v.contiguous() for k, v in state.items()}


def clip_l() -> dict:
    """A CLIP-L text encoder with random weights (its size is fixed by ComfyUI's config: 123M parameters)."""
    import comfy.sd1_clip

    generator = torch.Generator().manual_seed(4)
    model = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
    state = {}
    for key, value in model.transformer.state_dict().items():
        scale = 1.0 if key.endswith("layer_norm1.weight") or key.endswith("layer_norm2.weight") else 0.02
        state[key] = (torch.randn(value.shape, generator=generator) * scale).to(torch.float16)
    return state


def sd3_checkpoint(diffusion_model: dict, clip: dict, vae: dict) -> dict:
    """An all-in-one SD3 checkpoint with core's key prefixes: the tiny SD3, CLIP-L as its only text encoder, and
    a 16-channel TAESD as its VAE (ComfyUI builds whichever VAE the keys describe)."""
    parts = (("model.diffusion_model.", diffusion_model), ("text_encoders.clip_l.transformer.", clip),
             ("first_stage_model.", vae))
    return {prefix + key: value for prefix, weights in parts for key, value in weights.items()}


def wan_lora(state_dict: dict, rank: int = 4, seed: int = 7) -> dict:
    """A LoRA on every attention and FFN matrix of every block (up/down pairs plus alpha)."""
    generator = torch.Generator().manual_seed(seed)
    lora = {}
    for key, value in state_dict.items():
        if key.startswith("blocks.") and key.endswith(".weight") and value.ndim == 2 and "norm" not in key:
            base = "diffusion_model." + key[: -len(".weight")]
            lora[f"{base}.lora_down.weight"] = torch.randn(rank, value.shape[1], generator=generator) * 0.1
            lora[f"{base}.lora_up.weight"] = torch.randn(value.shape[0], rank, generator=generator) * 0.1
            lora[f"{base}.alpha"] = torch.tensor(float(rank))
    return {k: v.to(torch.float16) for k, v in lora.items()}


def write_gguf_copies(state_dict: dict, out: Path, name: str) -> None:
    sys.path.insert(0, str(REPO))
    from safetensors.torch import save_file

    from gguf_loader import dequantize, read_gguf, write_gguf

    write_gguf(out / f"{name}_BF16.gguf", state_dict, architecture="wan")
    quantized = {k: ("Q8_0" if v.ndim == 2 and v.shape[-1] % 32 == 0 else None) for k, v in state_dict.items()}
    write_gguf(out / f"{name}_Q8_0.gguf", {k: v.float() for k, v in state_dict.items()}, architecture="wan",
               qtypes=quantized)
    reader = read_gguf(out / f"{name}_Q8_0.gguf")
    dequantized = {k: dequantize(v).contiguous() for k, v in reader.tensors.items()}
    save_file(dequantized, str(out / f"{name}_Q8_0_dequant.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--comfyui", required=True)
    parser.add_argument("--out", required=True, help="a models/ directory")
    parser.add_argument("--no-gguf", action="store_true")
    args = parser.parse_args()
    sys.argv = sys.argv[:1] + ["--cpu"]  # comfy.cli_args parses the command line on import
    sys.path.insert(0, os.path.abspath(args.comfyui))
    import comfy.options

    comfy.options.enable_args_parsing()
    from safetensors.torch import save_file

    models = Path(args.out)
    (models / "diffusion_models").mkdir(parents=True, exist_ok=True)
    (models / "loras").mkdir(parents=True, exist_ok=True)
    (models / "vae").mkdir(parents=True, exist_ok=True)
    save_file(tiny_vae(), str(models / "vae" / "tiny_taesd.safetensors"))
    (models / "text_encoders").mkdir(parents=True, exist_ok=True)
    clip = clip_l()
    save_file(clip, str(models / "text_encoders" / "random_clip_l.safetensors"))
    wan = random_state_dict(wan_seed(), "WAN21_T2V", seed=1)
    save_file(wan, str(models / "diffusion_models" / "tiny_wan21.safetensors"))
    sd3 = random_state_dict(sd3_seed(), "SD3", seed=2)
    save_file(sd3, str(models / "diffusion_models" / "tiny_sd3.safetensors"))
    medium = random_state_dict(wan_seed(MEDIUM_WAN_DIM, MEDIUM_WAN_LAYERS, MEDIUM_WAN_FFN), "WAN21_T2V", seed=5)
    save_file(medium, str(models / "diffusion_models" / "medium_wan21.safetensors"))
    del medium
    # One transformer block in its list: a lone block, which DisTorch must still find and stream.
    save_file(random_state_dict(wan_seed(layers=1), "WAN21_T2V", seed=5),
              str(models / "diffusion_models" / "tiny_wan21_1block.safetensors"))
    taesd3 = tiny_vae(seed=5, latent_channels=16)
    save_file(taesd3, str(models / "vae" / "tiny_taesd3.safetensors"))
    (models / "checkpoints").mkdir(parents=True, exist_ok=True)
    save_file(sd3_checkpoint(sd3, clip, taesd3), str(models / "checkpoints" / "tiny_sd3_checkpoint.safetensors"))
    save_file(wan_lora(wan), str(models / "loras" / "tiny_wan21_lora.safetensors"))
    for name, seed in STACKED_LORAS.items():  # two rank-32 LoRAs to stack (issue #19's check, at the tiny size)
        save_file(wan_lora(wan, rank=32, seed=seed), str(models / "loras" / name))
    if not args.no_gguf:
        write_gguf_copies(wan, models / "diffusion_models", "tiny_wan21")
        from gguf_loader import write_gguf

        write_gguf(models / "text_encoders" / "random_clip_l_F16.gguf", clip)
    print("ok")


if __name__ == "__main__":
    main()
