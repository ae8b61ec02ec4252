"""What a user asks of one model's placement: the four loader inputs and the prefetch depth, checked once.

Every entry point builds one `PlacementRequest` and everything downstream trusts it: `distorch.plan` and
`plan_sizes` (the planner's arguments), the CLI, and the node pack's loaders and stand-in nodes (which add
the machine's device list and their widget's maximum). The rules, in one place:

- `compute_device` and `donor_device` are 'cpu' or 'cuda:N' ('cuda' reads as 'cuda:0'), and on this machine
  when the caller knows its devices;
- `virtual_vram_gb` is a number >= 0 (and at most the widget's maximum, for the nodes); `prefetch` >= 1;
- `auto`: the amount follows each run's budget (the planner's `budget`), `virtual_vram_gb` is not used;
- without an expert string: a GPU cannot donate to itself when something is moved off it (or may be, in auto
  mode), and compute on the CPU streams from RAM only;
- an expert string parses (ComfyUI-MultiGPU's grammar), names devices of this machine and needs a GPU compute
  device; it replaces `virtual_vram_gb` and `donor_device`;
- `stream_format` is one of `StreamFormat` (how streamed blocks travel: as stored, or smaller; stream_format.py).

Pure Python (no torch), so the CLI plans from a file header without importing torch.
"""

from dataclasses import dataclass
from enum import Enum

from .allocation import AllocationError, AllocationSpec, is_device_name, parse_allocation


class StreamFormat(str, Enum):
    """How a streamed block's weights travel between its host buffer and the compute device (stream_format.py)."""

    STORED = "stored"
    Q8_0 = "q8_0"
    FP8_E4M3FN = "fp8_e4m3fn"

    @classmethod
    def parse(cls, value: "StreamFormat | str") -> "StreamFormat":
        """The format named `value` ("q8_0", case-insensitive); ValueError naming the choices otherwise."""
        if isinstance(value, StreamFormat):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            choices = ", ".join(f.value for f in cls)
            raise ValueError(f"stream format {str(value)[:40]!r} is not one of {choices}") from None


class PlanError(ValueError):
    """The requested placement cannot be honoured; the message says why and what to change."""

    __module__ = "distorch"  # the import path users see in ComfyUI's error (not the custom_nodes file path)


@dataclass(frozen=True)
class PlacementRequest:
    """One model's placement request, validated (`validate`/`collect`); devices in their canonical spelling."""

    compute_device: str
    virtual_vram_gb: float = 0.0
    donor_device: str = "cpu"
    expert_mode_allocations: str = ""  # ComfyUI-MultiGPU grammar; when non-empty it replaces the two above
    prefetch: int = 2  # streaming slots on the compute device (blocks in flight)
    auto: bool = False  # the amount follows each run's budget; an expert string still places by itself
    stream_format: StreamFormat = StreamFormat.STORED  # how streamed blocks travel (resident ones stay as loaded)

    def __post_init__(self):
        object.__setattr__(self, "stream_format", StreamFormat.parse(self.stream_format))  # "q8_0" reads as the format

    @property
    def streams(self) -> bool:
        """Whether the request may move anything off the compute device."""
        return self.auto or self.virtual_vram_gb > 0 or bool(self.expert_mode_allocations)

    @property
    def allocation(self) -> AllocationSpec | None:
        """The parsed expert string, or None in normal mode."""
        return parse_allocation(self.expert_mode_allocations) if self.expert_mode_allocations else None

    @classmethod
    def validate(cls, compute_device: str, virtual_vram_gb: float = 0.0, donor_device: str = "cpu",
                 expert_mode_allocations: str | None = "", available: tuple[str, ...] | None = None, *,
                 prefetch: int = 2, max_virtual_vram_gb: float | None = None,
                 auto: bool = False, stream_format: StreamFormat | str = StreamFormat.STORED) -> "PlacementRequest":
        """The request, or the problem: one alone raises as itself (a `PlanError`, or an `AllocationError` for the
        expert string), several together as one `PlanError` naming each.

        Args:
            available: the devices of this machine; None leaves availability to the memory inventory.
            max_virtual_vram_gb: the largest `virtual_vram_gb` accepted (the node's widget maximum); None: no cap.
            auto: plan each run for its budget (the amount is then unused, but still checked: it is what a
                workflow falls back to with auto off).
            stream_format: how streamed blocks travel: "stored", "q8_0" or "fp8_e4m3fn".

        Example:
            >>> PlacementRequest.validate("CUDA:0", 6)
            PlacementRequest(compute_device='cuda:0', virtual_vram_gb=6.0, donor_device='cpu', ...)
        """
        problems: list[ValueError] = []
        request = cls.collect(compute_device, virtual_vram_gb, donor_device, expert_mode_allocations, available,
                              problems, prefetch=prefetch, max_virtual_vram_gb=max_virtual_vram_gb, auto=auto,
                              stream_format=stream_format)
        if len(problems) == 1:
            raise problems[0]
        if problems:
            raise PlanError("; ".join(str(p) for p in problems))
        return request

    @classmethod
    def collect(cls, compute_device: str, virtual_vram_gb: float, donor_device: str,
                expert_mode_allocations: str | None, available: tuple[str, ...] | None, problems: list,
                prefix: str = "", *, prefetch: int = 2, max_virtual_vram_gb: float | None = None,
                auto: bool = False,
                stream_format: StreamFormat | str = StreamFormat.STORED) -> "PlacementRequest | None":
        """`validate` for one of several models of a node: appends its problems (inputs named `prefix` + name)."""
        before = len(problems)
        expert = (expert_mode_allocations or "").strip()
        compute = check_device(compute_device, f"{prefix}compute_device", available, problems)
        donor = check_device(donor_device, f"{prefix}donor_device", available, problems)
        gb = _virtual_vram(virtual_vram_gb, f"{prefix}virtual_vram_gb", max_virtual_vram_gb, problems)
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 1:
            problems.append(PlanError(f"prefetch must be at least 1, got {prefetch!r}"))
        if not isinstance(auto, bool):
            problems.append(PlanError(f"{prefix}auto_placement must be true or false, got {auto!r}"))
        fmt = check_stream_format(stream_format, f"{prefix}stream_format", problems)
        if expert:
            _check_expert(expert, compute, available, problems, prefix)
        elif compute and donor:
            _check_donor(compute, donor, gb, problems, prefix, auto is True)
        if len(problems) > before:
            return None
        return cls(compute, gb, donor, expert, prefetch, auto, fmt)


def canonical_device(name) -> str | None:
    """'cpu' or 'cuda:N' for a name DisTorch accepts ('CUDA' and 'cuda' read as 'cuda:0'), else None."""
    device = str(name).strip().lower()
    device = "cuda:0" if device == "cuda" else device
    return device if is_device_name(device) else None


def check_device(name, what: str, available: tuple[str, ...] | None, problems: list) -> str | None:
    """The canonical device, or None with the problem appended (input `what`, checked against `available`)."""
    device = canonical_device(name)
    if device is None:
        problems.append(PlanError(f"{what} {name!r} is not a device DisTorch can use: write 'cpu' or 'cuda:N'"))
        return None
    if available is not None and device not in available:
        problems.append(PlanError(f"{what} {device!r} is not available on this machine "
                                  f"(devices: {', '.join(available)})"))
        return None
    return device


def _virtual_vram(value, what: str, maximum: float | None, problems: list) -> float:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if maximum is not None and (not number or not 0 <= value <= maximum):
        problems.append(PlanError(f"{what} must be between 0 and {maximum:g}, got {value!r}"))
    elif maximum is None and (not number or value < 0):
        problems.append(PlanError(f"{what} must not be negative, got {value!r}"))
    else:
        return float(value)
    return 0.0


def check_stream_format(value, what: str, problems: list) -> StreamFormat:
    """The format named `value`, or STORED with the problem appended (input `what`)."""
    try:
        return StreamFormat.parse(value)
    except ValueError:
        choices = ", ".join(f.value for f in StreamFormat)
        problems.append(PlanError(f"{what} {str(value)[:40]!r} is not one of {choices}"))
        return StreamFormat.STORED


def _check_donor(compute: str, donor: str, gb: float, problems: list, prefix: str, auto: bool) -> None:
    if compute == "cpu" and donor != "cpu":
        problems.append(PlanError(f"{prefix}compute_device 'cpu' streams from RAM only; set {prefix}donor_device to "
                                  f"'cpu', not {donor!r}"))
    elif donor == compute and compute != "cpu" and (gb > 0 or auto):
        problems.append(PlanError(f"{prefix}donor_device {donor!r} is the compute device: choose 'cpu' or another "
                                  "GPU"))


def _check_expert(expert: str, compute: str | None, available: tuple[str, ...] | None, problems: list,
                  prefix: str) -> None:
    try:
        spec = parse_allocation(expert)
    except AllocationError as error:
        problems.append(AllocationError(f"{prefix}expert_mode_allocations: {error}"))
        return
    missing = [d for d in spec.devices if available is not None and d not in available]
    if missing:
        problems.append(PlanError(f"{prefix}expert_mode_allocations names {', '.join(missing)}, not available on "
                                  f"this machine (devices: {', '.join(available)})"))
    if compute == "cpu":
        problems.append(PlanError(f"{prefix}expert_mode_allocations needs a GPU {prefix}compute_device: it places "
                                  f"blocks across devices; with 'cpu' use {prefix}virtual_vram_gb instead"))
