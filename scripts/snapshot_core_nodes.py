"""Records the input/output signatures of the core ComfyUI nodes the example workflows use.

    python scripts/snapshot_core_nodes.py --object-info http://127.0.0.1:8188/object_info [--object-info FILE ...]

Writes tests/data/core_nodes.json (names and types only, no ComfyUI code) from the first source. The
file records what the example workflows depend on; every further source (a newer ComfyUI) must be
compatible with it in the sense of `compatibility_problems`, so the workflows stay valid on every
listed version. The integration suite applies the same check to each ComfyUI it runs against.
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


def compatibility_problems(recorded: dict, live: dict) -> list[str]:
    """What breaks the example workflows if `live` (a signature from a running ComfyUI) replaces `recorded`.

    UI workflows store widget values by position and link outputs by slot index; API workflows name their
    inputs. So newer cores may append widgets, sockets and outputs, but may not reorder or retype what
    the workflows use, nor add a required input the workflows do not set.
    """
    problems = []
    live_inputs = {i["name"]: i for i in live["inputs"]}
    for spec in recorded["inputs"]:
        now = live_inputs.get(spec["name"])
        if now is None:
            problems.append(f"input {spec['name']!r} is gone")
        elif now["type"] != spec["type"] or now["widget"] != spec["widget"]:
            problems.append(f"input {spec['name']!r} changed from {spec['type']} to {now['type']}")
    recorded_widgets = [(i["name"], i["control_after_generate"]) for i in recorded["inputs"] if i["widget"]]
    live_widgets = [(i["name"], i["control_after_generate"]) for i in live["inputs"] if i["widget"]]
    if live_widgets[:len(recorded_widgets)] != recorded_widgets:
        problems.append(f"widgets {recorded_widgets} are no longer the first of {live_widgets}")
    known = {i["name"] for i in recorded["inputs"]}
    new_required = [i["name"] for i in live["inputs"] if not i["optional"] and i["name"] not in known]
    if new_required:
        problems.append(f"new required inputs {new_required}")
    if live["outputs"][:len(recorded["outputs"])] != recorded["outputs"]:
        problems.append(f"outputs {recorded['outputs']} are no longer the first of {live['outputs']}")
    return problems


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
        recorded, *newer = [signature(info[name]) for info in snapshots]
        for live in newer:
            if problems := compatibility_problems(recorded, live):
                raise SystemExit(f"{name}: {'; '.join(problems)}")
        result[name] = recorded
    OUT.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT} ({len(result)} nodes)")


if __name__ == "__main__":
    main()
