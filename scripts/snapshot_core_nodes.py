"""Records the input/output signatures of the core ComfyUI nodes the example workflows use.

    python scripts/snapshot_core_nodes.py --object-info http://127.0.0.1:8188/object_info [--object-info FILE ...]

Writes tests/data/core_nodes.json (names and types only, no ComfyUI code). With several sources
(e.g. 0.3.64 and 0.8.0) it keeps the nodes whose signatures agree and fails on any difference, so
the workflows stay valid on every listed version.
"""

import argparse
import json
import urllib.request
from pathlib import Path

CORE_NODES = ["CLIPTextEncode", "ConditioningZeroOut", "EmptyHunyuanLatentVideo", "EmptySD3LatentImage",
              "FluxGuidance", "KSampler", "KSamplerAdvanced", "ModelSamplingSD3", "SaveAnimatedWEBP", "SaveImage",
              "VAEDecode", "VAEDecodeTiled", "LoraLoaderModelOnly"]
OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "core_nodes.json"


def signature(node: dict) -> dict:
    inputs = []
    for section in ("required", "optional"):
        for name in node.get("input_order", {}).get(section, []):
            spec = node["input"][section][name]
            kind = spec[0] if isinstance(spec[0], str) else "COMBO"
            options = spec[1] if len(spec) > 1 else {}
            widget = kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO") and not options.get("forceInput")
            control = bool(options.get("control_after_generate")) or (kind == "INT" and name in ("seed", "noise_seed"))
            inputs.append({"name": name, "type": kind, "widget": widget, "control_after_generate": control,
                           "optional": section == "optional"})
    return {"inputs": inputs, "outputs": node["output"]}


def load(source: str) -> dict:
    if source.startswith("http"):
        with urllib.request.urlopen(source, timeout=60) as response:
            return json.loads(response.read())
    return json.loads(Path(source).read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--object-info", action="append", required=True)
    args = parser.parse_args()
    snapshots = [load(source) for source in args.object_info]
    result = {}
    for name in CORE_NODES:
        signatures = [signature(info[name]) for info in snapshots]
        if any(s != signatures[0] for s in signatures[1:]):
            raise SystemExit(f"{name} differs between the given ComfyUI versions")
        result[name] = signatures[0]
    OUT.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT} ({len(result)} nodes)")


if __name__ == "__main__":
    main()
