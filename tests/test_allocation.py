"""The expert allocation grammar: what it accepts, what it rejects and with which message."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from distorch import AllocationError, AllocationMode, parse_allocation
from distorch.units import GIB, MIB


@pytest.mark.parametrize(
    "text, mode, expected",
    [
        ("cuda:0,2.5gb;cpu,*", AllocationMode.BYTES, {"cuda:0": int(2.5 * GIB), "cpu": None}),
        ("cuda:0,2.5GB;cpu,*", AllocationMode.BYTES, {"cuda:0": int(2.5 * GIB), "cpu": None}),
        ("cuda:0,512m;cuda:1,1g;cpu,*", AllocationMode.BYTES, {"cuda:0": 512 * MIB, "cuda:1": GIB, "cpu": None}),
        ("cuda:0,100b;cpu,2kb", AllocationMode.BYTES, {"cuda:0": 100, "cpu": 2048}),
        ("cuda:0, 3 Mb ; cpu , *", AllocationMode.BYTES, {"cuda:0": 3 * MIB, "cpu": None}),
        ("cuda:0,25%;cpu,75%", AllocationMode.RATIO, {"cuda:0": 25.0, "cpu": 75.0}),
        ("cuda:0,50%;cpu,*", AllocationMode.RATIO, {"cuda:0": 50.0, "cpu": None}),
        ("cuda:0,0.1;cpu,0.5", AllocationMode.FRACTION, {"cuda:0": 0.1, "cpu": 0.5}),
        ("cuda:0,.25;cpu,1", AllocationMode.FRACTION, {"cuda:0": 0.25, "cpu": 1.0}),
        ("cpu,*", AllocationMode.BYTES, {"cpu": None}),
        ("CUDA:1,1gb;CPU,*", AllocationMode.BYTES, {"cuda:1": GIB, "cpu": None}),
    ],
)
def test_accepted(text, mode, expected):
    spec = parse_allocation(text)
    assert spec.mode is mode
    assert {e.device: e.amount for e in spec.entries} == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty allocation"),
        ("   ", "empty allocation"),
        ("cuda:0,1.5t;cpu,*", "unknown unit 't'"),
        ("cuda:0,1e3m;cpu,*", "cannot read amount '1e3m'"),
        ("cuda:0,2gib;cpu,*", "unknown unit 'gib'"),
        ("cuda:0,-1gb;cpu,*", "negative amount '-1gb'"),
        ("cuda:0,25%;cpu,1gb", "one mode per string"),
        ("cuda:0,0.5;cpu,50%", "one mode per string"),
        ("cuda:0,*;cpu,*", "at most one '\\*'"),
        ("cuda:0,1gb;cuda:0,2gb", "appears twice"),
        ("cuda:0,1gb;;cpu,*", "empty entry"),
        ("cuda:0 1gb", "needs the form 'device,value'"),
        ("gpu0,1gb;cpu,*", "unknown device 'gpu0'"),
        ("cuda,1gb;cpu,*", "needs an index"),
        ("mps,50%;cpu,50%", "unknown device 'mps'"),
        ("cuda:0,;cpu,*", "cannot read amount ''"),
        ("cuda:0,lots;cpu,*", "unknown unit 'lots'|cannot read amount"),
        ("cuda:0,1.5;cpu,*", "above 1"),
        ("cuda:0,60%;cpu,60%", "more than 100%"),
        ("cuda:0,20%;cpu,30%", "add up to 50%"),
        ("cuda:0,nan;cpu,*", "cannot read amount 'nan'|unknown unit"),
        ("cuda:0,2.5gb;cpu,*#cuda:0", "compute device is set by compute_device"),
    ],
)
def test_rejected_with_message(text, message):
    with pytest.raises(AllocationError, match=message):
        parse_allocation(text)


def test_error_is_a_value_error():
    assert issubclass(AllocationError, ValueError)


def test_rest_device_and_amount_lookup():
    spec = parse_allocation("cuda:0,1gb;cuda:1,2gb;cpu,*")
    assert spec.rest_device == "cpu"
    assert spec.amount("cuda:1") == 2 * GIB
    assert spec.amount("cuda:5") == 0


_devices = st.sampled_from(["cpu"] + [f"cuda:{i}" for i in range(4)])


@st.composite
def specs(draw):
    mode = draw(st.sampled_from(list(AllocationMode)))
    devices = draw(st.lists(_devices, min_size=1, max_size=5, unique=True))
    rest = draw(st.one_of(st.none(), st.sampled_from(devices)))
    parts, amounts = [], {}
    for device in devices:
        if device == rest:
            parts.append(f"{device},*")
            continue
        if mode is AllocationMode.BYTES:
            amount = draw(st.integers(0, 2**45))
            parts.append(f"{device},{amount}b")
        elif mode is AllocationMode.FRACTION:
            amount = draw(st.floats(0, 1, allow_nan=False))
            parts.append(f"{device},{amount:.6f}")
        else:
            amount = 100.0 / len(devices)
            parts.append(f"{device},{amount!r}%")
        amounts[device] = amount
    return ";".join(parts), rest


@given(specs())
def test_round_trip(case):
    text, rest = case
    try:
        spec = parse_allocation(text)
    except AllocationError as error:
        # Ratio strings whose shares do not reach 100% without a '*' are correctly refused.
        assert "add up to" in str(error)
        return
    assert spec.rest_device == rest
    assert parse_allocation(str(spec)) == spec


@given(st.text(max_size=60))
def test_garbage_never_crashes(text):
    try:
        parse_allocation(text)
    except AllocationError as error:
        assert str(error)


@given(st.text(alphabet="cpua:0123456789,;*%.gbmkGBMK -t", max_size=40))
def test_near_miss_strings_never_crash(text):
    try:
        spec = parse_allocation(text)
    except AllocationError:
        return
    assert parse_allocation(str(spec)) == spec


def test_tiny_shares_format_without_exponent():
    """Regression: repr() of tiny floats uses an exponent, which the grammar rightly refuses."""
    from distorch.allocation import AllocationEntry, AllocationSpec

    spec = AllocationSpec(AllocationMode.FRACTION, (AllocationEntry("cpu", 2.9387196167267216e-306),))
    assert "e" not in str(spec).split(",")[1]
    assert parse_allocation(str(spec)) == spec
