"""Node inputs and the allocation-to-ModelPatcher glue that runs without ComfyUI.

The node modules are imported as ComfyUI imports them: as part of the pack package
(`distorch_pack.nodes.*`, registered by conftest.py).
"""

import pytest
import torch
from distorch_pack.nodes.settings import (
    TOOLTIPS,
    ChoiceSpec,
    DisTorchSettings,
    NumberSpec,
    TextSpec,
    ToggleSpec,
    device_choices,
    distorch_specs,
    donor_choices,
    stream_format_spec,
)
from distorch_pack.nodes.state import DisTorchState

from distorch import MemoryInventory
from distorch.toy import make_toy_dit
from distorch.units import GIB

DEVICES = ("cuda:0", "cuda:1", "cpu")


@pytest.mark.parametrize("kind, default", [("unet", 4.0), ("clip", 0.0), ("vae", 0.0)])
def test_distorch_inputs_match_multigpu_names_and_defaults(kind, default):
    specs = distorch_specs(kind, device_choices(2), donor_choices(2))
    assert [s.name for s in specs] == ["compute_device", "virtual_vram_gb", "donor_device", "expert_mode_allocations",
                                       "auto_placement"]
    compute, vram, donor, expert, auto = specs
    assert isinstance(compute, ChoiceSpec) and compute.options == DEVICES and compute.default == "cuda:0"
    assert isinstance(vram, NumberSpec)
    assert (vram.default, vram.minimum, vram.maximum, vram.step) == (default, 0.0, 128.0, 0.1)
    assert isinstance(donor, ChoiceSpec) and donor.options == ("cpu", "cuda:0", "cuda:1") and donor.default == "cpu"
    assert isinstance(expert, TextSpec) and expert.optional and expert.default == ""
    assert isinstance(auto, ToggleSpec) and auto.default is True, "new nodes start in auto mode"
    assert all(s.tooltip for s in specs) and set(TOOLTIPS) == {s.name for s in specs} | {"stream_format"}


def test_the_stream_format_input_offers_the_formats_and_says_what_each_costs():
    spec = stream_format_spec()
    assert spec.name == "stream_format" and spec.options == ("stored", "q8_0", "fp8_e4m3fn")
    assert spec.default == "stored"
    assert all(cost in spec.tooltip for cost in ("exact", "0.53 x", "near-lossless", "2.5 %"))
    assert DisTorchSettings.validate("cuda:0", 6, "cpu", "", DEVICES, stream_format="q8_0").stream_format == "q8_0"
    with pytest.raises(ValueError, match="^DisTorch: stream_format 'q4' is not one of stored, q8_0, fp8_e4m3fn$"):
        DisTorchSettings.validate("cuda:0", 6, "cpu", "", DEVICES, stream_format="q4")


def test_devices_without_gpu_or_in_cpu_mode():
    assert device_choices(0) == ("cpu",) and donor_choices(0) == ("cpu",)
    assert device_choices(2, cpu_only=True) == ("cpu",) and donor_choices(2, cpu_only=True) == ("cpu",)


def test_valid_settings():
    settings = DisTorchSettings.validate("CUDA:0", 6, "cpu", "  ", DEVICES)
    assert settings == DisTorchSettings("cuda:0", 6.0, "cpu", "")
    assert settings.streams
    assert not DisTorchSettings.validate("cuda:0", 0, "cpu", "", DEVICES).streams


@pytest.mark.parametrize(
    "args, message",
    [
        (("cuda:3", 4, "cpu", ""), "compute_device 'cuda:3' is not available on this machine"),
        (("cuda:0", 4, "cuda:2", ""), "donor_device 'cuda:2' is not available"),
        (("cuda:0", 4, "cuda:0", ""), "is the compute device"),
        (("cuda:0", 200, "cpu", ""), "virtual_vram_gb must be between 0 and 128"),
        (("cuda:0", -1, "cpu", ""), "virtual_vram_gb must be between 0 and 128"),
        (("cpu", 4, "cuda:1", ""), "streams from RAM only"),
        (("cuda:0", 4, "cpu", "cuda:0,1.5t;cpu,*"), "expert_mode_allocations: unknown unit 't'"),
        (("cuda:0", 4, "cpu", "cuda:0,1gb;cuda:7,*"), "names cuda:7, not available"),
        (("cpu", 0, "cpu", "cpu,*"), "needs a GPU compute_device"),
        (("tpu", 4, "cpu", ""), "not a device DisTorch can use"),
    ],
)
def test_invalid_settings_name_the_problem(args, message):
    with pytest.raises(ValueError, match=message):
        DisTorchSettings.validate(*args, DEVICES)


def test_several_problems_are_reported_together():
    with pytest.raises(ValueError) as error:
        DisTorchSettings.validate("cuda:9", 999, "cuda:8", "", DEVICES)
    text = str(error.value)
    assert "cuda:9" in text and "cuda:8" in text and "between 0 and 128" in text


def _state_for(model, share=0.5, device="cpu"):
    from distorch import discover

    gb = share * discover(model).block_bytes / GIB
    settings = DisTorchSettings(device, gb, "cpu", "")
    inventory = MemoryInventory.from_free_bytes({"cpu": 64 * GIB, "cuda:0": 64 * GIB})
    return DisTorchState.attach(model, settings, inventory)


def test_state_lives_on_the_model_and_hides_streamed_layers_from_core_load_lists():
    model = make_toy_dit(dim=32, depth=4, heads=2)
    state = _state_for(model)
    assert DisTorchState.of(model) is state
    streamed = sorted(state.plan.streamed)
    assert streamed
    block = streamed[0]
    old_layout = [(100, f"{block}.qkv", None, ["weight"]), (50, "patch_in", None, ["weight", "bias"])]
    new_layout = [(120, 100, f"{block}.fc1", None, ["weight"]), (60, 50, "head", None, ["weight"])]
    assert [e[1] for e in state.without_streamed(old_layout)] == ["patch_in"]
    assert [e[2] for e in state.without_streamed(new_layout)] == ["head"]
    assert state.is_streamed(block) and state.is_streamed(f"{block}.qkv")
    assert not state.is_streamed(f"{block}0.qkv") and not state.is_streamed("blocks")
    assert state.slot_bytes == 2 * state.plan.slot_bytes


def test_state_opens_streaming_and_keeps_it_staged_across_unloads():
    model = make_toy_dit(dim=32, depth=4, heads=2)
    x, t = torch.randn(1, 8, 16), torch.tensor([3.0])
    expected = model(x, t)
    state = _state_for(model, share=1.0)
    assert state.open(model) is True
    assert state.open(model) is False, "a second load on the same model must not restage"
    assert torch.equal(model(x, t), expected)
    state.close()
    assert state.streamer is not None and not state.streamer.is_open
    assert torch.equal(model(x, t), expected)
    assert state.open(model) is True
    assert torch.equal(model(x, t), expected)
    state.close(unstage=True)


def test_state_refuses_a_model_whose_blocks_changed():
    model = make_toy_dit(dim=32, depth=4, heads=2)
    state = _state_for(model, share=1.0)
    model.blocks[0].fc1.weight.data = torch.zeros(64, 32)
    with pytest.raises(RuntimeError, match="changed size since the loader planned them"):
        state.open(model)


def test_no_streaming_when_virtual_vram_is_zero():
    model = make_toy_dit(dim=32, depth=4, heads=2)
    state = DisTorchState.attach(model, DisTorchSettings("cpu", 0.0, "cpu", ""),
                                 MemoryInventory.from_free_bytes({"cpu": 64 * GIB}))
    assert not state.streams and state.slot_bytes == 0
    assert state.open(model) is False
    entries = [(1, "blocks.0.qkv", None, [])]
    assert state.without_streamed(entries) == entries


def test_resident_layer_bytes_count_leaf_layers_outside_streamed_blocks():
    model = make_toy_dit(dim=32, depth=4, heads=2)
    state = _state_for(model, share=0.5)
    expected = 0
    for name, module in model.named_modules():
        params = list(module.parameters(recurse=False))
        leaf = params and not any(True for child in module.children() if any(True for _ in child.parameters()))
        if leaf and not state.is_streamed(name):
            expected += sum(p.numel() * 4 for p in params)
    modulation = sum(b.modulation.numel() * 4 for b in model.blocks)
    assert state.resident_layer_bytes(model) == expected
    assert state.resident_layer_bytes(model) < state.plan.resident_bytes - modulation / 2
