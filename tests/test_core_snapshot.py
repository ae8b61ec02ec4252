"""The rule that decides whether a ComfyUI's core nodes still take the example workflows (the integration suite
applies it to each live server): newer cores may append to a node, not reorder, retype or require more."""

import copy
import json
from pathlib import Path

import pytest

from scripts.snapshot_core_nodes import compatibility_problems, signature, version_key

RECORDED = json.loads((Path(__file__).resolve().parents[1] / "tests" / "data" / "core_nodes.json").read_text())


def widget(name, kind="INT", optional=False):
    return {"name": name, "type": kind, "widget": True, "control_after_generate": False, "optional": optional}


def changed(node: str, change) -> list[str]:
    live = copy.deepcopy(RECORDED[node])
    change(live)
    return compatibility_problems(RECORDED[node], live)


def test_the_recording_is_compatible_with_itself():
    assert all(compatibility_problems(spec, spec) == [] for spec in RECORDED.values())


@pytest.mark.parametrize("change", [
    lambda n: n["outputs"].append("IMAGE"),  # ComfyUI 0.33: SaveAnimatedWEBP gained an output
    lambda n: n["inputs"].append(widget("num_frames", optional=True)),
], ids=["appended output", "appended optional widget"])
def test_additions_at_the_end_are_compatible(change):
    assert changed("SaveAnimatedWEBP", change) == []


@pytest.mark.parametrize("change, problem", [
    (lambda n: n["inputs"].insert(1, n["inputs"].pop(2)), "no longer the first"),
    (lambda n: n["inputs"].pop(), "is gone"),
    (lambda n: n["inputs"][2].update(type="INT"), "changed from FLOAT to INT"),
    (lambda n: n["inputs"].append(widget("frames")), "new required inputs ['frames']"),
], ids=["reordered widgets", "removed input", "retyped input", "new required input"])
def test_what_breaks_a_workflow_is_reported(change, problem):
    problems = changed("SaveAnimatedWEBP", change)
    assert problems and problem in " ".join(problems)


def test_an_output_inserted_before_a_linked_one_is_reported():
    assert "are no longer the first of ['IMAGE', 'LATENT']" in changed("KSampler", lambda n: n["outputs"].insert(
        0, "IMAGE"))[0]


def test_v3_inputs_that_show_one_widget_are_recorded_as_widgets():
    """ComfyUI 0.33: SaveVideo's format is a dynamic combo, LTXVEmptyLatentAudio's frame_rate a "FLOAT,INT" socket
    with a FLOAT widget; both still hold one widget value in a UI workflow. LoadImage's upload button is noted."""
    node = {"input_order": {"required": ["format", "frame_rate", "image", "vae"]}, "output": [],
            "input": {"required": {"format": ["COMFY_DYNAMICCOMBO_V3", {"options": [{"key": "auto"}]}],
                                   "frame_rate": ["FLOAT,INT", {"widgetType": "FLOAT"}],
                                   "image": [["a.png"], {"image_upload": True}], "vae": ["VAE", {}]}}}
    inputs = {i["name"]: i for i in signature(node)["inputs"]}
    assert [(i["type"], i["widget"]) for i in inputs.values()] == [("COMBO", True), ("FLOAT", True),
                                                                   ("COMBO", True), ("VAE", False)]
    assert inputs["image"].get("upload") and not inputs["format"].get("upload")


def test_an_int_widget_may_become_a_float_one():
    """0.8.0 → 0.33.0: LTXVEmptyLatentAudio.frame_rate; a saved integer is a valid float, not the other way round."""
    recorded = RECORDED["LTXVEmptyLatentAudio"]
    assert changed("LTXVEmptyLatentAudio", lambda n: n["inputs"][1].update(type="FLOAT")) == []
    assert recorded["inputs"][1]["type"] == "INT"


def test_nodes_newer_than_the_oldest_comfyui_say_since_when():
    since = {name: spec["since"] for name, spec in RECORDED.items() if "since" in spec}
    assert since.get("Flux2Scheduler") == "0.8.0" and since.get("LTXVEmptyLatentAudio") == "0.8.0"
    assert "KSampler" not in since and "TextEncodeQwenImageEdit" not in since
    assert all(version_key(v) > version_key("0.3.64") for v in since.values())
