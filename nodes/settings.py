"""The DisTorch inputs every loader node has (four placement inputs and `auto_placement`), validated once into a
frozen value.

Pure Python (no ComfyUI import), so the schema defaults, tooltips and the validation messages are
tested in CI; `nodes/inputs.py` turns the specs into ComfyUI widgets. The rules themselves are distorch's
(`distorch.PlacementRequest`); a loader adds this machine's devices and the slider's range.
"""

from collections.abc import Mapping
from dataclasses import dataclass

from ..distorch import PlacementRequest
from ..distorch.request import StreamFormat, check_device, check_stream_format

VIRTUAL_VRAM_MAX_GB = 128.0
VIRTUAL_VRAM_STEP_GB = 0.1


@dataclass(frozen=True)
class NumberSpec:
    name: str
    default: float
    minimum: float
    maximum: float
    step: float
    tooltip: str


@dataclass(frozen=True)
class ChoiceSpec:
    name: str
    options: tuple[str, ...]
    default: str
    tooltip: str


@dataclass(frozen=True)
class TextSpec:
    name: str
    default: str
    tooltip: str
    optional: bool = True


@dataclass(frozen=True)
class ToggleSpec:
    """A switch. Optional, so an API prompt without it (saved before it existed) gets the Python default,
    fixed placement: only the schema's default, which new nodes in the editor start with, is on."""

    name: str
    default: bool
    tooltip: str
    label_on: str
    label_off: str


TOOLTIPS = {
    "compute_device": "GPU that runs the model. Streamed blocks are copied to it just before they run.",
    "virtual_vram_gb": (
        "With auto_placement off: GB of this model to keep off the compute GPU. Those blocks live in pinned RAM (or "
        "the donor GPU) and are streamed in ahead of use, spread between resident blocks so copies overlap compute. "
        "0 keeps the whole model on the GPU. With auto_placement on it is not used, and shows the amount the last "
        "run chose."),
    "donor_device": (
        "Where moved blocks are stored: 'cpu' (pinned system RAM) or another GPU's VRAM. A donor GPU without "
        "room for all of them spills the rest into RAM."),
    "stream_format": (
        "How the streamed blocks are held in RAM and copied to the GPU on every step; they are decoded on the GPU "
        "just before they run (resident blocks and .gguf files stay as loaded). stored: as loaded, exact. q8_0: "
        "GGUF Q8_0, 0.53 x the bytes of bf16 (0.27 x fp32), near-lossless (~0.4 % per weight, outputs within 1 %). "
        "fp8_e4m3fn: 0.5 x bf16, ~2.5 % error per weight (outputs within ~3 %)."),
    "expert_mode_allocations": (
        "Optional, overrides the slider. ComfyUI-MultiGPU grammar, one mode per string: bytes "
        "'cuda:0,2.5gb;cpu,*' (without a '*' the rest goes to cpu), ratio 'cuda:0,8%;cuda:1,8%;cpu,4%' (an 8:8:4 "
        "split) or fraction of device memory 'cuda:0,0.1;cpu,0.5'. Amounts fill the devices in the order written "
        "and '*' takes the rest; the compute device's share stays resident, the others are streamed from there."),
    "auto_placement": (
        "On: each run keeps as much of the model on the compute GPU as ComfyUI's memory budget for that run allows "
        "(it depends on resolution, frames, batch and the other models loaded) and streams the rest; the next run "
        "moves only the blocks that change place. Off: virtual_vram_gb decides (workflows saved before this switch "
        "existed load with it off). Either way, what does not fit a run's budget is streamed, never cast layer by "
        "layer from RAM."),
}
AUTO_LABELS = ("auto", "fixed: virtual_vram_gb")


def distorch_specs(kind: str, devices: tuple[str, ...], donors: tuple[str, ...]) -> list:
    """The DisTorch input specs for a loader of `kind` ("unet", "clip" or "vae"), in widget order.

    `auto_placement` comes last: the frontend matches a saved workflow's widget values by position, so an input
    added anywhere else would shift every value after it.
    """
    return [
        ChoiceSpec("compute_device", devices, devices[0], TOOLTIPS["compute_device"]),
        NumberSpec("virtual_vram_gb", 4.0 if kind == "unet" else 0.0, 0.0, VIRTUAL_VRAM_MAX_GB,
                   VIRTUAL_VRAM_STEP_GB, TOOLTIPS["virtual_vram_gb"]),
        ChoiceSpec("donor_device", donors, donors[0], TOOLTIPS["donor_device"]),
        TextSpec("expert_mode_allocations", "", TOOLTIPS["expert_mode_allocations"]),
        ToggleSpec("auto_placement", True, TOOLTIPS["auto_placement"], *AUTO_LABELS),
    ]


def stream_format_spec() -> ChoiceSpec:
    """The stream-format input: the last widget of every DisTorch loader (stand-ins for other packs have none)."""
    return ChoiceSpec("stream_format", tuple(f.value for f in StreamFormat), StreamFormat.STORED.value,
                      TOOLTIPS["stream_format"])


def device_choices(cuda_count: int, cpu_only: bool = False) -> tuple[str, ...]:
    """Compute devices, main GPU first; just 'cpu' when there is no usable GPU."""
    if cpu_only or cuda_count == 0:
        return ("cpu",)
    return tuple(f"cuda:{i}" for i in range(cuda_count)) + ("cpu",)


def donor_choices(cuda_count: int, cpu_only: bool = False) -> tuple[str, ...]:
    """'cpu' first, then every GPU (the one that equals the compute device is refused at validation)."""
    if cpu_only:
        return ("cpu",)
    return ("cpu",) + tuple(f"cuda:{i}" for i in range(cuda_count))


@dataclass(frozen=True)
class DisTorchSettings(PlacementRequest):
    """One loader's DisTorch inputs after validation: a `PlacementRequest` checked against this machine's devices
    and the slider's range (the rules are distorch/request.py's); stored on the model it loads."""

    @classmethod
    def validate(cls, compute_device: str, virtual_vram_gb: float, donor_device: str,
                 expert_mode_allocations: str | None, available: tuple[str, ...],
                 auto_placement: bool = False, stream_format: str = "stored") -> "DisTorchSettings":
        """Checks the inputs against the devices of this machine; raises ValueError naming every bad input.

        `auto_placement` defaults to off: a prompt saved before the input existed keeps its fixed amount."""
        problems = []
        settings = cls.collect(compute_device, virtual_vram_gb, donor_device, expert_mode_allocations, available,
                               problems, auto_placement=auto_placement, stream_format=stream_format)
        _raise_problems(problems)
        return settings

    @classmethod
    def collect(cls, compute_device: str, virtual_vram_gb: float, donor_device: str,
                expert_mode_allocations: str | None, available: tuple[str, ...], problems: list,
                prefix: str = "", *, auto_placement: bool = False,
                stream_format: str = "stored") -> "DisTorchSettings | None":
        """`validate` for one of several models of a node: appends its problems, naming inputs `prefix` + name."""
        return super().collect(compute_device, virtual_vram_gb, donor_device, expert_mode_allocations, available,
                               problems, prefix, max_virtual_vram_gb=VIRTUAL_VRAM_MAX_GB,
                               auto=False if auto_placement is None else auto_placement, stream_format=stream_format)


def _raise_problems(problems: list) -> None:
    if problems:
        raise ValueError("DisTorch: " + "; ".join(str(p) for p in problems))


@dataclass(frozen=True)
class CheckpointSettings:
    """The checkpoint loader's inputs after validation: DisTorch settings for the diffusion model and for the
    text encoders, and the VAE's device."""

    unet: DisTorchSettings
    clip: DisTorchSettings
    vae_device: str

    @classmethod
    def validate(cls, values: Mapping, available: tuple[str, ...]) -> "CheckpointSettings":
        """`values`: the checkpoint loader's inputs by name (`unet_compute_device`, ..., `vae_device`, and one
        `stream_format` for the streamed blocks of the diffusion model and of the text encoders)."""
        problems = []
        stream_format = check_stream_format(values.get("stream_format") or "stored", "stream_format", problems)
        unet, clip = (DisTorchSettings.collect(
            values[f"{p}_compute_device"], values[f"{p}_virtual_vram_gb"], values[f"{p}_donor_device"],
            values.get(f"{p}_expert_mode_allocations"), available, problems, prefix=f"{p}_",
            auto_placement=values.get(f"{p}_auto_placement", False), stream_format=stream_format)
        for p in ("unet", "clip"))
        vae = check_device(values["vae_device"], "vae_device", available, problems)
        _raise_problems(problems)
        return cls(unet, clip, vae)
