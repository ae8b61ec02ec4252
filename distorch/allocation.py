"""The expert allocation grammar users know from ComfyUI-MultiGPU, with its documented meanings, parsed strictly.

    bytes     cuda:0,2.5gb;cpu,*        GB (GiB) of the model stored on each device, '*' takes the rest
              cuda:0,500mb;cpu,5gb*     '5gb*': the rest goes there (MultiGPU's "5 GB or the remainder")
              cuda:0,2.5gb;cuda:1,4gb   without a '*' the rest goes to cpu (MultiGPU's default wildcard)
    ratio     cuda:0,8%;cuda:1,8%;cpu,4%  shares of the model's bytes, normalised by their sum (8:8:4 is
                                        40/40/20 %, as llama.cpp's tensor split); with a '*' the shares are
                                        percent of the model and the '*' device takes what is left of 100 %
    fraction  cuda:0,0.1;cpu,0.5        share of each device's total memory the model may use

Amounts are given to the devices in the order written; what is left goes to the '*' device.
Trailing ';' and spaces are ignored. Unlike ComfyUI-MultiGPU, one string holds exactly one mode,
units are checked ('1.5t' is an error, not 1.5 bytes), device names never decide the mode, and
every error names the offending token.
"""

import enum
import math
import re
from dataclasses import dataclass
from decimal import Decimal

from .echo import echo
from .units import UNIT_BYTES

# Far above any real entry ("cuda:12,123.456gb"), yet room for every float written out in full (str(spec)
# round-trips), and above any device: no number or echo grows without bound.
_MAX_ENTRY_CHARS = 400
_MAX_BYTES = 2**60


class AllocationError(ValueError):
    """A malformed expert allocation string; the message names the bad token."""

    __module__ = "distorch"  # the import path users see in ComfyUI's error (not the custom_nodes file path)


class AllocationMode(str, enum.Enum):
    BYTES = "bytes"
    RATIO = "ratio"
    FRACTION = "fraction"


@dataclass(frozen=True)
class AllocationEntry:
    """One `device,value` pair; `amount` is None for the '*' (everything left) entry.

    `stated` is the number of bytes written before a '*' ('5gb*'): shown back to the user, but the
    device takes whatever remains, as in ComfyUI-MultiGPU.
    """

    device: str
    amount: float | int | None
    stated: int | None = None

    @property
    def is_rest(self) -> bool:
        return self.amount is None


@dataclass(frozen=True)
class AllocationSpec:
    """A parsed expert string: one mode and its entries in the order written."""

    mode: AllocationMode
    entries: tuple[AllocationEntry, ...]

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(e.device for e in self.entries)

    @property
    def rest_device(self) -> str | None:
        """The device written with '*', if any."""
        return next((e.device for e in self.entries if e.is_rest), None)

    @property
    def remainder_device(self) -> str | None:
        """Where the bytes the amounts do not cover go: the '*' device; in bytes mode 'cpu' without one."""
        if self.rest_device is not None:
            return self.rest_device
        return "cpu" if self.mode is AllocationMode.BYTES else None

    def ratio_shares(self) -> dict[str, float]:
        """Ratio mode: each device's share of the model (0-1, summing to 1), in the order written."""
        written = sum(e.amount for e in self.entries if not e.is_rest)
        if self.rest_device is None:
            return {e.device: e.amount / written for e in self.entries}
        return {e.device: (max(0.0, 1.0 - written / 100.0) if e.is_rest else e.amount / 100.0) for e in self.entries}

    def amount(self, device: str) -> float | int | None:
        """The amount written for `device`; 0 when the device is not mentioned."""
        for entry in self.entries:
            if entry.device == device:
                return entry.amount
        return 0

    def __str__(self) -> str:
        return ";".join(f"{e.device},{_format_entry(self.mode, e)}" for e in self.entries)


_DEVICE = re.compile(r"^(cpu|cuda:(0|[1-9][0-9]{0,5}))$")  # six digits: int() of the index stays cheap


def is_device_name(name: str) -> bool:
    """True for the device spellings DisTorch uses everywhere: 'cpu' and 'cuda:N' (lowercase)."""
    return bool(_DEVICE.match(name))

_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_BYTES = re.compile(rf"^({_NUMBER})\s*([a-z]+)$")
_RATIO = re.compile(rf"^({_NUMBER})\s*%$")
_FRACTION = re.compile(rf"^({_NUMBER})$")


def parse_allocation(text: str) -> AllocationSpec:
    """Parses an expert allocation string.

    Args:
        text: entries `device,value` separated by ';', e.g. "cuda:0,2.5gb;cpu,*"; trailing ';' and spaces are ignored.

    Returns:
        The spec; amounts are bytes (int) in bytes mode, percent (0-100) in ratio mode and a share of the
        device's total memory (0-1) in fraction mode.

    Raises:
        AllocationError: on any malformed token, mixed modes, duplicate devices, more than one '*', or
            ratios that cannot be split (all zero, or over 100 % beside a '*').

    Example:
        >>> str(parse_allocation("cuda:0, 25% ; cpu,75%"))
        'cuda:0,25%;cpu,75%'
    """
    if not isinstance(text, str) or not text.strip():
        raise AllocationError("empty allocation string: write entries like 'cuda:0,2.5gb;cpu,*'")
    if "#" in text:
        raise AllocationError(
            f"'#' is not part of the grammar ({echo(text.strip())}): the compute device is set by compute_device")
    body = text.strip().rstrip("; \t\r\n")
    if not body:
        raise AllocationError("empty allocation string: write entries like 'cuda:0,2.5gb;cpu,*'")
    parsed = [_parse_entry(raw) for raw in body.split(";")]
    mode = _single_mode(parsed)
    entries = tuple(AllocationEntry(device, amount, stated) for device, _, amount, stated in parsed)
    _check_devices(entries)
    if mode is AllocationMode.RATIO:
        _check_ratio_total(entries)
    return AllocationSpec(mode, entries)


def _parse_entry(raw: str) -> tuple[str, AllocationMode | None, float | int | None, int | None]:
    entry = raw.strip()
    if not entry:
        raise AllocationError("empty entry between ';' separators")
    if len(entry) > _MAX_ENTRY_CHARS:
        raise AllocationError(f"entry {echo(entry)} is {len(entry)} characters long; entries read like "
                              f"'cuda:0,2.5gb'")
    device, sep, value = (part.strip() for part in entry.partition(","))
    if not sep:
        raise AllocationError(f"entry {echo(entry)} needs the form 'device,value', e.g. 'cpu,*'")
    if not is_device_name(device.lower()):
        raise AllocationError(_device_problem(device, entry))
    value = value.lower()
    if value.endswith("*") and value != "*":
        return device.lower(), AllocationMode.BYTES, None, _stated_rest(value[:-1].rstrip(), entry)
    mode, amount = _parse_value(value, entry)
    return device.lower(), mode, amount, None


def _stated_rest(value: str, entry: str) -> int:
    """The bytes written before a '*' ('cpu,5gb*'); MultiGPU documents that form for bytes only."""
    if value.endswith("*"):
        raise AllocationError(f"cannot read amount {echo(value + '*')} in {echo(entry)}: "
                              "write e.g. 'cpu,5gb*' or 'cpu,*'")
    mode, amount = _parse_value(value, entry)
    if mode is not AllocationMode.BYTES:
        raise AllocationError(f"'*' after an amount is for bytes only ({echo(entry)}): "
                              "write e.g. 'cpu,5gb*' or 'cpu,*'")
    return amount


def _device_problem(device: str, entry: str) -> str:
    if device.lower() == "cuda":
        return f"device 'cuda' in {echo(entry)} needs an index, e.g. 'cuda:0'"
    return f"unknown device {echo(device)} in {echo(entry)}: use 'cpu' or 'cuda:N'"


def _parse_value(value: str, entry: str) -> tuple[AllocationMode | None, float | int | None]:
    if value == "*":
        return None, None
    if value.startswith("-"):
        raise AllocationError(f"negative amount {echo(value)} in {echo(entry)}")
    if match := _RATIO.match(value):
        return AllocationMode.RATIO, _finite(match.group(1), entry)
    if match := _FRACTION.match(value):
        share = _finite(match.group(1), entry)
        if share > 1.0:
            raise AllocationError(
                f"fraction {echo(value)} in {echo(entry)} is above 1: write a share of the device's memory such as "
                "0.5, a percentage such as 50%, or bytes such as 4gb")
        return AllocationMode.FRACTION, share
    if match := _BYTES.match(value):
        unit = match.group(2)
        if unit not in UNIT_BYTES:
            raise AllocationError(f"unknown unit {echo(unit)} in {echo(entry)}: use b, k, kb, m, mb, g or gb")
        nbytes = _finite(match.group(1), entry) * UNIT_BYTES[unit]
        if nbytes > _MAX_BYTES:
            raise AllocationError(f"amount {echo(value)} in {echo(entry)} is more than any device holds")
        return AllocationMode.BYTES, int(round(nbytes))
    raise AllocationError(f"cannot read amount {echo(value)} in {echo(entry)}: expected e.g. 2.5gb, 25%, 0.1 or *")


def _finite(number: str, entry: str) -> float:
    value = float(number)
    if not math.isfinite(value):
        raise AllocationError(f"amount {echo(number)} in {echo(entry)} is not a finite number")
    return value


def _single_mode(parsed: list) -> AllocationMode:
    modes = {}
    for device, mode, _, _ in parsed:
        if mode is not None:
            modes.setdefault(mode, device)
    if len(modes) > 1:
        described = ", ".join(f"{mode.value} ({device})" for mode, device in modes.items())
        raise AllocationError(f"one mode per string, found {described}: use only bytes, only % or only fractions")
    # A string of '*' entries alone reads as bytes mode: everything goes to the '*' device.
    return next(iter(modes), AllocationMode.BYTES)


def _check_devices(entries: tuple[AllocationEntry, ...]) -> None:
    seen = set()
    for entry in entries:
        if entry.device in seen:
            raise AllocationError(f"device {entry.device!r} appears twice")
        seen.add(entry.device)
    rest = [e.device for e in entries if e.is_rest]
    if len(rest) > 1:
        raise AllocationError(f"at most one '*' is allowed, found it on {', '.join(rest)}")


def _check_ratio_total(entries: tuple[AllocationEntry, ...]) -> None:
    total = sum(e.amount for e in entries if not e.is_rest)
    has_rest = any(e.is_rest for e in entries)
    if not math.isfinite(total):
        raise AllocationError("percentages are too large to add up: write shares such as 8%;8%;4%")
    if has_rest and total > 100.0 + 1e-6:
        raise AllocationError(f"percentages add up to {total:g}%, more than 100% beside a '*': lower them, or drop "
                              "the '*' to split the model in that ratio")
    if not has_rest and total <= 0.0:
        raise AllocationError("percentages add up to 0%: give at least one device a share")


def _format_entry(mode: AllocationMode, entry: AllocationEntry) -> str:
    if entry.is_rest:
        return "*" if entry.stated is None else f"{entry.stated}b*"
    return _format_amount(mode, entry.amount)


def _format_amount(mode: AllocationMode, amount: float | int) -> str:
    if mode is AllocationMode.BYTES:
        return f"{amount}b"
    if mode is AllocationMode.RATIO:
        return f"{_positional(amount)}%"
    return _positional(amount)


def _positional(value: float) -> str:
    # The shortest digits that read back as the same float, without the exponent the grammar refuses.
    return f"{Decimal(repr(float(value))):f}"
