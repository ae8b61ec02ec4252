"""What every loader node shares, DisTorch's own and the stand-ins for other packs' ids: the four DisTorch widgets,
core's choice lists, and one validation of the settings inputs.

`LoaderNode.validate_inputs` rejects bad DisTorch inputs before the queue runs, with the rules of
`distorch.PlacementRequest` (via settings.py) and this machine's devices; `execute` gets the same settings from
`LoaderNode.settings`. A stand-in maps its original's inputs onto the DisTorch loader first (`native_values`).
"""

from collections.abc import Mapping

from comfy_api.latest import io

import nodes as core_nodes

from .devices import compute_devices, donor_devices
from .settings import (
    CheckpointSettings,
    ChoiceSpec,
    DisTorchSettings,
    NumberSpec,
    ToggleSpec,
    distorch_specs,
    stream_format_spec,
)

CHECKPOINT_LOADER = "DisTorchCheckpointLoader"
_ABSENT = object()  # a validate_inputs parameter the node does not have (None means: driven by a link)
# Every input that carries DisTorch settings, under DisTorch's names and under the stand-ins' original names.
SETTINGS_INPUTS = ("compute_device", "device", "virtual_vram_gb", "donor_device", "expert_mode_allocations",
                   "stream_format", "use_other_vram", "unet_device", "clip_device", "vae_device", "unet_compute_device",
                   "unet_virtual_vram_gb", "unet_donor_device", "clip_compute_device", "clip_virtual_vram_gb",
                   "clip_donor_device", "unet_expert_mode_allocations", "clip_expert_mode_allocations",
                   "auto_placement", "unet_auto_placement", "clip_auto_placement")


def distorch_inputs(kind: str, prefix: str = "") -> list:
    """The DisTorch widgets, built from the pure specs in settings.py (names `prefix` + name)."""
    widgets = []
    for spec in distorch_specs(kind, compute_devices(), donor_devices()):
        name = prefix + spec.name
        if isinstance(spec, ChoiceSpec):
            widgets.append(io.Combo.Input(name, options=list(spec.options), default=spec.default,
                                          tooltip=spec.tooltip))
        elif isinstance(spec, ToggleSpec):
            widgets.append(io.Boolean.Input(name, default=spec.default, optional=True, label_on=spec.label_on,
                                            label_off=spec.label_off, tooltip=spec.tooltip))
        elif isinstance(spec, NumberSpec):
            widgets.append(io.Float.Input(name, default=spec.default, min=spec.minimum, max=spec.maximum,
                                          step=spec.step, round=0.01, display_mode=io.NumberDisplay.slider,
                                          tooltip=spec.tooltip))
        else:
            widgets.append(io.String.Input(name, default=spec.default, optional=spec.optional,
                                           tooltip=spec.tooltip))
    return widgets


def stream_format_input():
    """The stream-format combo, optional (an API prompt without it loads as stored), appended last by each loader."""
    spec = stream_format_spec()
    return io.Combo.Input(spec.name, options=list(spec.options), default=spec.default, optional=True,
                          tooltip=spec.tooltip)


def core_choices(node_id: str, input_name: str, fallback: list[str]) -> list[str]:
    """A core loader's combo options (CLIP types), so new model families appear with the core that knows them."""
    node = core_nodes.NODE_CLASS_MAPPINGS.get(node_id)
    try:
        return list(node.INPUT_TYPES()["required"][input_name][0])
    except (AttributeError, KeyError, TypeError, IndexError):
        return fallback


def settings_for(target: str, native: Mapping) -> DisTorchSettings | CheckpointSettings:
    """The validated settings of DisTorch loader `target` from its input values; ValueError names every bad one."""
    available = compute_devices()
    if target == CHECKPOINT_LOADER:
        return CheckpointSettings.validate(native, available)
    return DisTorchSettings.validate(native.get("compute_device"), native.get("virtual_vram_gb"),
                                     native.get("donor_device"), native.get("expert_mode_allocations"), available,
                                     auto_placement=native.get("auto_placement", False),
                                     stream_format=native.get("stream_format") or "stored")


class LoaderNode(io.ComfyNode):
    """Base of every loader node: the one `validate_inputs`, and `settings` for `execute`."""

    TARGET = ""  # the DisTorch loader whose inputs carry the settings (its node id)

    @classmethod
    def native_values(cls, values: dict) -> dict:
        """The values as the DisTorch loader `TARGET` names them (a stand-in maps its original's inputs)."""
        return values

    @classmethod
    def settings(cls, values: dict) -> DisTorchSettings | CheckpointSettings:
        return settings_for(cls.TARGET, cls.native_values(values))

    @classmethod
    def validate_inputs(cls, compute_device=_ABSENT, device=_ABSENT, virtual_vram_gb=_ABSENT, donor_device=_ABSENT,
                        expert_mode_allocations=_ABSENT, use_other_vram=_ABSENT, unet_device=_ABSENT,
                        clip_device=_ABSENT, vae_device=_ABSENT, unet_compute_device=_ABSENT,
                        unet_virtual_vram_gb=_ABSENT, unet_donor_device=_ABSENT, clip_compute_device=_ABSENT,
                        clip_virtual_vram_gb=_ABSENT, clip_donor_device=_ABSENT,
                        unet_expert_mode_allocations=_ABSENT, clip_expert_mode_allocations=_ABSENT,
                        auto_placement=_ABSENT, unet_auto_placement=_ABSENT, clip_auto_placement=_ABSENT,
                        stream_format=_ABSENT):
        # Core passes the inputs named here that the node has (and checks the others, e.g. file lists, itself).
        given = {k: v for k, v in locals().items() if k in SETTINGS_INPUTS and v is not _ABSENT}
        if any(v is None for v in given.values()):
            return True  # driven by a link; checked again when the node runs
        try:
            cls.settings(given)
        except ValueError as error:
            return str(error)
        return True
