"""Runs city96/ComfyUI-GGUF's text-encoder loading on GGUF files and records what it produces.

    python run_reference.py --comfyui PATH --reference PACK_DIR --plan plan.json --out DIR

Run with a ComfyUI interpreter: the reference imports comfy.*. The plan is a list of cases:

    {"name", "kind": "state_dict", "path"}
        gguf_clip_loader(path) -> DIR/<name>.safetensors: every tensor dequantized to float32 with float32
        math (its default Q8_0 path computes in float16), tokenizer entries as their uint8 bytes.
    {"name", "kind": "unet_state_dict", "path"}
        gguf_sd_loader(path, return_arch=True) (the UNet loader's reader) -> DIR/<name>.safetensors as above; the
        report holds the architecture and each tensor's GGML type.
    {"name", "kind": "umt5_tokenizer", "path", "prompts"}
        gguf_tokenizer_loader(path, UMT5 embedding shape) -> token ids of each prompt through SentencePiece with
        ComfyUI's UMT5 options (add_eos).
    {"name", "kind": "tekken", "payloads": {label: path or "reference:<gguf path>"}, "prompts"}
        token ids of each prompt through this ComfyUI's Mistral tokenizer (Flux.2) for each tekken.json; a
        "reference:" payload is first rebuilt by gguf_tekken_tokenizer_loader(path, Mistral embedding shape).

A failing step records "Type: message" instead of a result. Writes DIR/report.json.
"""

import argparse
import importlib.machinery
import importlib.util
import json
import os
import sys
import traceback
from pathlib import Path

UMT5_EMBEDDING = (256384, 4096)
MISTRAL_EMBEDDING = (131072, 5120)


def import_reference_loader(pack: Path):
    """The reference's loader module, imported as a submodule of an un-run package (its __init__ would import
    ComfyUI's node registry, which the loader does not need)."""
    name = "comfyui_gguf_reference"
    package = importlib.util.module_from_spec(importlib.machinery.ModuleSpec(name, None, is_package=True))
    package.__path__ = [str(pack)]
    sys.modules[name] = package
    return importlib.import_module(f"{name}.loader"), importlib.import_module(f"{name}.dequant")


def state_dict_case(case: dict, loader, dequant, out: Path) -> dict:
    import torch
    from safetensors.torch import save_file

    state_dict = loader.gguf_clip_loader(case["path"])
    tensors = {}
    for key, value in state_dict.items():
        if key in ("spiece_model", "tekken_model"):
            tensors[key] = torch.as_tensor(value).to(torch.uint8).contiguous()
        elif getattr(value, "tensor_type", None) is not None:
            tensors[key] = torch.Tensor(dequant.dequantize_tensor(value, torch.float32, "target")).contiguous()
        else:
            tensors[key] = torch.Tensor(value).to(torch.float32).contiguous()
    save_file(tensors, str(out / f"{case['name']}.safetensors"))
    return {"keys": len(tensors)}


def unet_state_dict_case(case: dict, loader, dequant, out: Path) -> dict:
    import torch
    from safetensors.torch import save_file

    state_dict, arch = loader.gguf_sd_loader(case["path"], return_arch=True)
    tensors = {key: torch.Tensor(dequant.dequantize_tensor(value, torch.float32, "target")).contiguous()
               for key, value in state_dict.items()}
    save_file(tensors, str(out / f"{case['name']}.safetensors"))
    qtypes = {key: getattr(getattr(value, "tensor_type", None), "name", None) for key, value in state_dict.items()}
    return {"arch": arch, "qtypes": qtypes}


def umt5_tokenizer_case(case: dict, loader) -> dict:
    import sentencepiece

    proto = loader.gguf_tokenizer_loader(case["path"], UMT5_EMBEDDING)
    processor = sentencepiece.SentencePieceProcessor(model_proto=proto.numpy().tobytes(), add_eos=True)
    return {"ids": [processor.encode(text) for text in case["prompts"]]}


def tekken_case(case: dict, loader) -> dict:
    try:
        from comfy.text_encoders.flux import Mistral3Tokenizer
    except ImportError:
        return {"error": "ImportError: this ComfyUI has no Mistral (Flux.2) tokenizer"}
    results = {}
    for label, source in case["payloads"].items():
        try:
            if source.startswith("reference:"):
                data = loader.gguf_tekken_tokenizer_loader(source.removeprefix("reference:"), MISTRAL_EMBEDDING)
            else:
                data = Path(source).read_bytes()
            tokenizer = Mistral3Tokenizer(tokenizer_data={"tekken_model": data}).tokenizer
            results[label] = {"ids": [list(tokenizer(text)["input_ids"]) for text in case["prompts"]]}
        except Exception as error:  # the report records why a payload cannot be used
            results[label] = {"error": describe(error)}
    return {"payloads": results}


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--comfyui", required=True)
    parser.add_argument("--reference", required=True, type=Path)
    parser.add_argument("--plan", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    sys.argv = sys.argv[:1] + ["--cpu"]  # comfy.cli_args parses the command line on import
    sys.path.insert(0, os.path.abspath(args.comfyui))
    import comfy.options

    comfy.options.enable_args_parsing()
    loader, dequant = import_reference_loader(args.reference)
    report = {}
    for case in json.loads(args.plan.read_text()):
        try:
            if case["kind"] == "state_dict":
                report[case["name"]] = state_dict_case(case, loader, dequant, args.out)
            elif case["kind"] == "unet_state_dict":
                report[case["name"]] = unet_state_dict_case(case, loader, dequant, args.out)
            elif case["kind"] == "umt5_tokenizer":
                report[case["name"]] = umt5_tokenizer_case(case, loader)
            else:
                report[case["name"]] = tekken_case(case, loader)
        except Exception as error:  # recorded: which cases the reference cannot load is part of the comparison
            report[case["name"]] = {"error": describe(error), "trace": traceback.format_exc()[-2000:]}
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    print("ok")


if __name__ == "__main__":
    main()
