"""Records the input/output signatures of the core ComfyUI nodes the example workflows use.

    python scripts/snapshot_core_nodes.py --object-info 0.3.64=http://127.0.0.1:8188/object_info \
        --object-info 0.8.0=FILE [--object-info 0.33.0=FILE ...]

Sources are `VERSION=URL_OR_FILE`, oldest ComfyUI first. Writes tests/data/core_nodes.json (names and types
only, no ComfyUI code): each node as the oldest source that has it lists it, and a node the first source lacks
gets `"since": VERSION` (the oldest recorded ComfyUI that has it; workflows using it declare at least that
version, see scripts/make_workflows.py MIN_COMFYUI). Every later source must be compatible with the recording
in the sense of `compatibility_problems`, so the workflows stay valid on every listed version. The
integration suite applies the same check to each ComfyUI it runs against.
"""

import argparse
import json
import urllib.request
from pathlib import Path

CORE_NODES = ["CLIPTextEncode", "ConditioningZeroOut", "EmptyHunyuanLatentVideo", "EmptySD3LatentImage",
              "FluxGuidance", "KSampler", "KSamplerAdvanced", "ModelSamplingSD3", "SaveAnimatedWEBP", "SaveImage",
              "VAEDecode", "VAEDecodeTiled", "LoraLoaderModelOnly",
              # Flux.2, LTX-2 and Qwen-Image-Edit (workflows that need a newer ComfyUI than 0.3.64)
              "BasicGuider", "CFGGuider", "CFGNorm", "CreateVideo", "EmptyFlux2LatentImage", "EmptyLTXVLatentVideo",
              "Flux2Scheduler", "FluxKontextImageScale", "KSamplerSelect", "LTXVAudioVAEDecode", "LTXVAudioVAELoader",
              "LTXVConcatAVLatent", "LTXVConditioning", "LTXVEmptyLatentAudio", "LTXVScheduler", "LTXVSeparateAVLatent",
              "LoadImage", "ModelSamplingAuraFlow", "RandomNoise", "SamplerCustomAdvanced", "SaveVideo",
              "TextEncodeQwenImageEdit", "VAEEncode"]
WIDGET_KINDS = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "core_nodes.json"


def signature(node: dict) -> dict:
    inputs = []
    for section in ("required", "optional"):
        for name in node.get("input_order", {}).get(section, []):
            spec = node["input"][section][name]
            kind = spec[0] if isinstance(spec[0], str) else "COMBO"
            options = spec[1] if len(spec) > 1 else {}
            # V3 inputs that still show one widget: a dynamic combo (its value is the chosen option) and a
            # multi-type socket with a widget (e.g. "FLOAT,INT" with widgetType FLOAT).
            kind = "COMBO" if kind == "COMFY_DYNAMICCOMBO_V3" else options.get("widgetType", kind)
            widget = kind in WIDGET_KINDS and not options.get("forceInput")
            control = bool(options.get("control_after_generate")) or (kind == "INT" and name in ("seed", "noise_seed"))
            entry = {"name": name, "type": kind, "widget": widget, "control_after_generate": control,
                     "optional": section == "optional"}
            if options.get("image_upload"):
                entry["upload"] = True  # the frontend adds an upload button after it and saves its value, "image"
            inputs.append(entry)
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
        elif (now["type"] != spec["type"] and (spec["type"], now["type"]) != ("INT", "FLOAT")) \
                or now["widget"] != spec["widget"]:  # an INT widget becoming FLOAT keeps the stored value valid
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


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def load(source: str) -> dict:
    if source.startswith("http"):
        with urllib.request.urlopen(source, timeout=60) as response:
            return json.loads(response.read())
    return json.loads(Path(source).read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--object-info", action="append", required=True, metavar="VERSION=SOURCE")
    args = parser.parse_args()
    sources = [arg.split("=", 1) for arg in args.object_info]
    if any(len(source) != 2 for source in sources):
        raise SystemExit("--object-info takes VERSION=URL_OR_FILE (the ComfyUI version that served it)")
    if [v for v, _ in sources] != sorted((v for v, _ in sources), key=version_key):
        raise SystemExit("--object-info sources must be given oldest ComfyUI first")
    snapshots = [(version, load(source)) for version, source in sources]
    result = {}
    for name in CORE_NODES:
        found = [(version, signature(info[name])) for version, info in snapshots if name in info]
        if not found:
            raise SystemExit(f"{name}: no source has this node")
        (since, recorded), *newer = found
        absent_later = [v for v, info in snapshots if name not in info and version_key(v) > version_key(since)]
        if absent_later:
            raise SystemExit(f"{name}: first seen in {since} but gone again in {absent_later}")
        for version, live in newer:
            if problems := compatibility_problems(recorded, live):
                raise SystemExit(f"{name} (recorded from {since}, changed in {version}): {'; '.join(problems)}")
        result[name] = recorded if since == snapshots[0][0] else {"since": since, **recorded}
    OUT.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT} ({len(result)} nodes)")


if __name__ == "__main__":
    main()
