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
        # The forms ComfyUI-MultiGPU's README documents.
        ("cuda:0,500mb;cuda:1,3.0g;cpu,5gb*", AllocationMode.BYTES, {"cuda:0": 500 * MIB, "cuda:1": 3 * GIB,
                                                                     "cpu": None}),
        ("cuda:0,8%;cuda:1,8%;cpu,4%", AllocationMode.RATIO, {"cuda:0": 8.0, "cuda:1": 8.0, "cpu": 4.0}),
        ("cuda:0,0.0207;cuda:1,0.1273;cpu,0.0808", AllocationMode.FRACTION,
         {"cuda:0": 0.0207, "cuda:1": 0.1273, "cpu": 0.0808}),
        ("cuda:0,2.5gb;cpu,*;", AllocationMode.BYTES, {"cuda:0": int(2.5 * GIB), "cpu": None}),
        (" cuda:0,25%; cpu,75% ; ; ", AllocationMode.RATIO, {"cuda:0": 25.0, "cpu": 75.0}),
        ("cuda:0,60%;cpu,60%", AllocationMode.RATIO, {"cuda:0": 60.0, "cpu": 60.0}),
        ("cuda:0,1gb;cpu,2gb", AllocationMode.BYTES, {"cuda:0": GIB, "cpu": 2 * GIB}),
        ("cuda:0,1gb;cpu, 5 gb *", AllocationMode.BYTES, {"cuda:0": GIB, "cpu": None}),
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
        ("cuda:0,60%;cuda:1,60%;cpu,*", "more than 100% beside a '\\*'"),
        ("cuda:0,0%;cpu,0%", "add up to 0%"),
        (f"cuda:0,1{'0' * 308}%;cuda:1,1{'0' * 308}%", "too large to add up"),
        ("cuda:0,20%;cpu,30%*", "'\\*' after an amount is for bytes only"),
        ("cuda:0,0.2;cpu,0.3*", "'\\*' after an amount is for bytes only"),
        ("cuda:0,1gb;cpu,5t*", "unknown unit 't'"),
        ("cuda:0,1gb;cpu,**", "cannot read amount '\\*\\*'"),
        ("cuda:0,1gb;cpu,*5gb", "cannot read amount|unknown unit"),
        ("cuda:0,1gb;cpu,5gb*;cuda:1,*", "at most one '\\*'"),
        (";cuda:0,1gb", "empty entry"),
        (";", "empty allocation"),
        ("cuda:0,1gb;cpu,*,", "cannot read amount|unknown unit"),
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
    assert spec.rest_device == spec.remainder_device == "cpu"
    assert spec.amount("cuda:1") == 2 * GIB
    assert spec.amount("cuda:5") == 0


def test_starred_amount_is_the_rest_and_kept_for_display():
    """MultiGPU: 'cpu,5gb*' puts "5.00GB (or the remainder)" on cpu; its code gives cpu the remainder."""
    spec = parse_allocation("cuda:0,500mb;cuda:1,3.0g;cpu,5gb*")
    assert spec.rest_device == "cpu" and spec.entries[-1].stated == 5 * GIB
    assert str(spec) == f"cuda:0,{500 * MIB}b;cuda:1,{3 * GIB}b;cpu,{5 * GIB}b*"
    assert parse_allocation(str(spec)) == spec


def test_cpu_is_the_default_remainder_in_bytes_mode_only():
    """MultiGPU's README: "The CPU acts as the default wildcard if none are specified" (bytes mode)."""
    assert parse_allocation("cuda:0,2gb;cuda:1,2gb").remainder_device == "cpu"
    assert parse_allocation("cuda:0,2gb;cuda:1,2gb").rest_device is None
    assert parse_allocation("cuda:0,25%;cuda:1,75%").remainder_device is None
    assert parse_allocation("cuda:0,0.2;cuda:1,*").remainder_device == "cuda:1"


@pytest.mark.parametrize(
    "text, shares",
    [
        ("cuda:0,8%;cuda:1,8%;cpu,4%", {"cuda:0": 0.4, "cuda:1": 0.4, "cpu": 0.2}),
        ("cuda:0,25%;cpu,75%", {"cuda:0": 0.25, "cpu": 0.75}),
        ("cuda:0,1%;cpu,3%", {"cuda:0": 0.25, "cpu": 0.75}),
        ("cuda:0,60%;cpu,60%", {"cuda:0": 0.5, "cpu": 0.5}),
        ("cuda:0,30%;cpu,*", {"cuda:0": 0.3, "cpu": 0.7}),
        ("cuda:0,30%;cuda:1,*;cpu,20%", {"cuda:0": 0.3, "cuda:1": 0.5, "cpu": 0.2}),
        ("cuda:0,100%;cpu,*", {"cuda:0": 1.0, "cpu": 0.0}),
    ],
)
def test_ratios_are_normalised_like_a_tensor_split(text, shares):
    result = parse_allocation(text).ratio_shares()
    assert list(result) == list(shares)
    assert result == pytest.approx(shares)
    assert sum(result.values()) == pytest.approx(1.0)


_devices = st.sampled_from(["cpu"] + [f"cuda:{i}" for i in range(4)])


@st.composite
def specs(draw):
    mode = draw(st.sampled_from(list(AllocationMode)))
    devices = draw(st.lists(_devices, min_size=1, max_size=5, unique=True))
    rest = draw(st.one_of(st.none(), st.sampled_from(devices)))
    parts, amounts = [], {}
    for device in devices:
        if device == rest:
            stated = draw(st.one_of(st.none(), st.integers(0, 2**45))) if mode is AllocationMode.BYTES else None
            parts.append(f"{device},*" if stated is None else f"{device},{stated}b*")
            continue
        if mode is AllocationMode.BYTES:
            amount = draw(st.integers(0, 2**45))
            parts.append(f"{device},{amount}b")
        elif mode is AllocationMode.FRACTION:
            amount = draw(st.floats(0, 1, allow_nan=False))
            parts.append(f"{device},{amount:.6f}")
        else:
            written = f"{draw(st.floats(0, 100.0 / len(devices) if rest else 1e6, allow_nan=False)):.4f}"
            amount = float(written)
            parts.append(f"{device},{written}%")
        amounts[device] = amount
    separator = draw(st.sampled_from([";", " ; ", ";  "]))
    trailing = draw(st.sampled_from(["", ";", " ;", "; ;  "]))
    return separator.join(parts) + trailing, mode, rest, amounts


@given(specs())
def test_round_trip(case):
    text, mode, rest, amounts = case
    try:
        spec = parse_allocation(text)
    except AllocationError as error:
        # Ratios that are all zero cannot be split, and are correctly refused.
        assert "add up to 0%" in str(error) and mode is AllocationMode.RATIO and not any(amounts.values())
        return
    assert spec.mode is mode or not amounts
    assert spec.rest_device == rest
    assert parse_allocation(str(spec)) == spec
    if mode is AllocationMode.RATIO:
        shares = spec.ratio_shares()
        assert sum(shares.values()) == pytest.approx(1.0)
        assert all(share >= 0 for share in shares.values())


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
