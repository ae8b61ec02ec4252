"""`python -m distorch plan|demo` on files written here (safetensors and GGUF)."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import distorch.memory as memory
from distorch.cli import main, proposal_step_gb
from distorch.headers import read_model_sizes
from distorch.units import GIB, MIB

ROOT = Path(__file__).resolve().parents[1]


def write_dit(path: Path, depth: int = 8, dim: int = 64, dtype=torch.bfloat16) -> Path:
    tensors = {
        "patch_embedding.weight": torch.zeros(dim, 16, dtype=dtype),
        "time_in.0.weight": torch.zeros(dim, 256, dtype=dtype),  # a Sequential of leaves: not a block list
        "time_in.2.weight": torch.zeros(dim, dim, dtype=dtype),
        "head.head.weight": torch.zeros(16, dim, dtype=dtype),
    }
    for i in range(depth):
        tensors[f"blocks.{i}.modulation"] = torch.zeros(1, 6, dim, dtype=dtype)
        tensors[f"blocks.{i}.self_attn.qkv.weight"] = torch.zeros(3 * dim, dim, dtype=dtype)
        tensors[f"blocks.{i}.ffn.0.weight"] = torch.zeros(4 * dim, dim, dtype=dtype)
        tensors[f"blocks.{i}.ffn.2.weight"] = torch.zeros(dim, 4 * dim, dtype=dtype)
    save_file(tensors, str(path))
    return path


def block_bytes(dim: int = 64) -> int:
    return (6 * dim + 3 * dim * dim + 8 * dim * dim) * 2


def header(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_header_sizes_from_safetensors(tmp_path):
    sizes = read_model_sizes(str(write_dit(tmp_path / "m.safetensors")))
    assert [name for name, _ in sizes.blocks] == [f"blocks.{i}" for i in range(8)]
    assert all(n == block_bytes() for _, n in sizes.blocks)
    assert sizes.rest_bytes == (64 * 16 + 64 * 256 + 64 * 64 + 16 * 64) * 2


def test_plan_table(tmp_path, capsys):
    path = write_dit(tmp_path / "m.safetensors")
    code, out, err = run(capsys, "plan", str(path), "--vram-gb", "80", "--ram-gb", "64",
                         "--virtual-vram-gb", str(4 * block_bytes() / GIB))
    assert code == 0, err
    assert "DisTorch plan for m.safetensors" in out
    assert "pinned RAM, streamed" in out and "VRAM freed" in out
    assert "PCIe 4.0 x16" in out and "PCIe 5.0 x16" in out


def test_plan_json_schema(tmp_path, capsys):
    path = write_dit(tmp_path / "m.safetensors")
    code, out, _ = run(capsys, "plan", str(path), "--vram-gb", "80", "--ram-gb", "64", "--json",
                       "--virtual-vram-gb", str(2 * block_bytes() / GIB))
    assert code == 0
    data = json.loads(out)
    assert set(data) >= {"file", "model", "total_gb", "blocks", "compute_device", "virtual_vram_gb", "proposed",
                         "tiers", "vram_gb", "vram_freed_gb", "pinned_ram_gb", "transfer", "streamed", "warnings"}
    assert data["blocks"] == 8 and data["proposed"] is False
    assert len(data["streamed"]) == 2 and data["streamed"][0].startswith("blocks.")
    assert {t["device"] for t in data["tiers"]} == {"cuda:0", "cpu"}
    assert set(data["transfer"]["seconds_per_forward"]) == {"PCIe 4.0 x16", "PCIe 5.0 x16"}


def test_proposal_is_the_smallest_fitting_value(tmp_path, capsys):
    big = 16 * MIB  # one block, so a small --vram-gb forces streaming
    path = tmp_path / "big.safetensors"
    tensors = {f"blocks.{i}.attn.weight": torch.zeros(big // 2, dtype=torch.bfloat16) for i in range(10)}
    save_file(tensors, str(path))
    # usable = free - activation reserve - safety reserve (256 MiB + 5% of total): leave room for ~3.5 blocks
    room = 3.5 * big / GIB
    vram = (2.0 + memory.GPU_RESERVE_FIXED / GIB + room) / (1 - memory.GPU_RESERVE_SHARE)
    code, out, err = run(capsys, "plan", str(path), "--vram-gb", f"{vram:.3f}", "--ram-gb", "64", "--json",
                         "--activation-reserve-gb", "2.0")
    assert code == 0, err
    data = json.loads(out)
    assert data["proposed"] is True
    assert data["vram_gb"]["total"] <= data["vram_gb"]["usable"]
    assert 0 < data["virtual_vram_gb"] < 10 * big / GIB
    smaller = data["virtual_vram_gb"] - proposal_step_gb(read_model_sizes(str(path)))
    if smaller >= 0:
        code, _, err = run(capsys, "plan", str(path), "--vram-gb", f"{vram:.3f}", "--ram-gb", "64",
                           "--virtual-vram-gb", str(smaller))
        assert code == 2 and "raise virtual_vram_gb" in err


def test_proposal_zero_when_it_fits(tmp_path, capsys):
    path = write_dit(tmp_path / "m.safetensors")
    code, out, _ = run(capsys, "plan", str(path), "--vram-gb", "24", "--ram-gb", "64", "--json")
    assert code == 0 and json.loads(out)["virtual_vram_gb"] == 0.0


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "too short for a safetensors header"),
        (struct.pack("<Q", 10**12) + b"{}", "does not fit the file"),
        (struct.pack("<Q", 4) + b"nope", "not valid JSON"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
        (header(b'{"a":{"dtype":"F32","shape":[1]}}'), "lacks dtype, shape or data_offsets"),
        (header(b'{"a":{"dtype":"Q9","shape":[1],"data_offsets":[0,4]}}') + bytes(4), "unknown dtype"),
        (header(b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,400]}}') + bytes(4), "outside the"),
        (header(b'{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}') + bytes(4), "invalid shape"),
    ],
)
def test_malformed_files_exit_2_with_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    code, out, err = run(capsys, "plan", str(path), "--vram-gb", "8", "--ram-gb", "8")
    assert code == 2
    assert message in err and "bad.safetensors" in err
    assert err.count("\n") == 1 and not out


def test_missing_file(tmp_path, capsys):
    code, _, err = run(capsys, "plan", str(tmp_path / "nope.gguf"), "--vram-gb", "8")
    assert code == 2 and "no such file" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["plan"], "the following arguments are required: model_file"),
        (["plan", "x", "--vram-gb", "lots"], "expected a number"),
        (["plan", "x", "--vram-gb", "-3"], "expected a number >= 0"),
        (["plan", "x", "--bogus"], "unrecognized arguments: --bogus"),
        (["fly"], "invalid choice: 'fly'"),
    ],
)
def test_bad_options_exit_2_with_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--expert", "cuda:0,1.5t;cpu,*"], "unknown unit 't'"),
        (["--donor", "cuda:0", "--virtual-vram-gb", "1"], "is the compute device"),
        (["--prefetch", "0"], "--prefetch must be at least 1"),
        (["--compute-device", "tpu:0"], "not a device DisTorch can use"),
    ],
)
def test_bad_plan_options(tmp_path, capsys, extra, message):
    path = write_dit(tmp_path / "m.safetensors")
    code, _, err = run(capsys, "plan", str(path), "--vram-gb", "8", "--ram-gb", "8", *extra)
    assert code == 2 and message in err and err.count("\n") == 1


def test_no_gpu_without_vram_flag(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    code, _, err = run(capsys, "plan", str(write_dit(tmp_path / "m.safetensors")))
    assert code == 2 and "pass --vram-gb" in err


def test_demo_runs_as_a_module():
    """The README's main command: streams the built-in model on the CPU and checks it bit-exactly."""
    result = subprocess.run([sys.executable, "-m", "distorch", "demo", "--dim", "128", "--depth", "6", "--tokens",
                             "64", "--steps", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "identical to the resident run" in result.stdout
    assert "RAM, streamed" in result.stdout


def test_plan_reads_gguf_headers_with_quantized_sizes(tmp_path, capsys):
    from gguf_loader import quantize_q8_0, write_gguf

    tensors = {"img_in.weight": torch.zeros(64, 64)}
    for i in range(6):
        tensors[f"double_blocks.{i}.img_attn.qkv.weight"] = quantize_q8_0(torch.randn(192, 64))
        tensors[f"double_blocks.{i}.img_mlp.0.weight"] = quantize_q8_0(torch.randn(256, 64))
        tensors[f"double_blocks.{i}.img_attn.norm.key_norm.scale"] = torch.ones(64)
    path = tmp_path / "flux-like-Q8_0.gguf"
    write_gguf(path, tensors, architecture="flux")
    sizes = read_model_sizes(str(path))
    q8_block = (192 + 256) * 64 // 32 * 34 + 64 * 4
    assert [n for n, _ in sizes.blocks] == [f"double_blocks.{i}" for i in range(6)]
    assert all(n == q8_block for _, n in sizes.blocks)
    assert sizes.rest_bytes == 64 * 64 * 4
    code, out, err = run(capsys, "plan", str(path), "--vram-gb", "8", "--ram-gb", "8", "--json",
                         "--virtual-vram-gb", str(3 * q8_block / GIB))
    assert code == 0, err
    assert len(json.loads(out)["streamed"]) == 3


def test_malformed_gguf_is_a_one_line_error(tmp_path, capsys):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + bytes([3, 0, 0, 0]) + (2**62).to_bytes(8, "little") + bytes(8))
    code, out, err = run(capsys, "plan", str(path), "--vram-gb", "8", "--ram-gb", "8")
    assert code == 2 and "broken.gguf" in err and err.count("\n") == 1 and not out


@pytest.mark.parametrize("kind", ["safetensors", "gguf"])
def test_plan_never_imports_torch(tmp_path, kind):
    """Planning reads only a header; importing torch alone takes seconds, so the CLI must not."""
    if kind == "gguf":
        from gguf_loader import quantize_q8_0, write_gguf

        path = tmp_path / "m.gguf"
        write_gguf(path, {f"blocks.{i}.attn.weight": quantize_q8_0(torch.randn(64, 64)) for i in range(4)})
    else:
        path = write_dit(tmp_path / "m.safetensors")
    code = ("import sys; from distorch.cli import main; "
            f"rc = main(['plan', {str(path)!r}, '--vram-gb', '8', '--ram-gb', '8', '--stream-format', 'q8_0', "
            "'--json']); "
            "sys.exit(3 if 'torch' in sys.modules else rc)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (result.returncode, result.stderr)
    assert json.loads(result.stdout)["blocks"] == (4 if kind == "gguf" else 8)


# -- hostile headers (issue #13, escapes 3 and 5) --------------------------------------------------------

MAX_ERROR_CHARS = 400  # one line; no echo of a file's contents may grow it past this


def plan_error(capsys, path: Path, *extra, names_file: bool = True) -> str:
    code, out, err = run(capsys, "plan", str(path), "--vram-gb", "8", "--ram-gb", "8", *extra)
    assert code == 2 and not out, (code, out, err[:500])
    assert err.startswith("distorch: error: ") and err.count("\n") == 1 and len(err) < MAX_ERROR_CHARS, err[:1000]
    assert path.name in err or not names_file
    return err


def tensor_header(**tensors) -> bytes:
    return header(json.dumps(tensors).encode())


@pytest.mark.parametrize(
    "content, message",
    [
        (header(b'{"a":' + b"[" * 5000 + b"]" * 5000 + b"}"), "header nests JSON too deeply"),
        (tensor_header(a={"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}) + bytes(4),
         "tensor 'a' has unknown dtype ['F32']"),
        (tensor_header(a={"dtype": {"F": 32}, "shape": [1], "data_offsets": [0, 4]}) + bytes(4),
         "tensor 'a' has unknown dtype {'F': 32}"),
        (tensor_header(a={"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                       b={"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}) + bytes(8),
         "tensors 'a' (bytes 0-4) and 'b' (bytes 2-6) overlap"),
        (tensor_header(a={"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}) + bytes(8),
         "tensor 'a': data_offsets [0, 4] span 4 bytes, but shape [2] of F32 needs 8 bytes"),
        (tensor_header(a={"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}) + bytes(2),
         "shape [3] of F4 needs 12 bits"),
        (tensor_header(a={"dtype": "F32", "shape": [1] * 2_000_000, "data_offsets": [0, 8]}) + bytes(8),
         "tensor 'a': data_offsets [0, 8] span 8 bytes, but shape [1, 1, 1, 1, 1, 1, 1, 1, ...] of F32 needs 4 bytes"),
        (tensor_header(a={"dtype": "F32", "shape": [10**18] * 1000, "data_offsets": [0, 8]}) + bytes(8),
         "needs more than the data section holds"),
        (tensor_header(a={"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}) + bytes(4), "invalid shape [-1]"),
        (tensor_header(a={"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}) + bytes(4), "invalid shape"),
        (tensor_header(**{"x" * 1_000_000: {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}) + bytes(4),
         "tensor 'xxxxxxxxxx"),
        (tensor_header(a={"dtype": "F32", "shape": [1], "data_offsets": [0, "4" * 100_000]}) + bytes(4),
         "data_offsets [0, '4444"),
        (header(b'{"a":{"dtype":"F32","shape":[' + b"7" * 5000 + b'],"data_offsets":[0,4]}}') + bytes(4),
         "header is not valid JSON (Exceeds the limit (4300 digits)"),
        (tensor_header(a="F32") + bytes(4), "tensor 'a' lacks dtype, shape or data_offsets"),
    ],
    ids=["deep-nesting", "dtype-list", "dtype-object", "overlap", "span-vs-shape", "f4-bits", "2M-entry-shape",
         "huge-shape", "negative-dim", "bool-dim", "1MB-name", "100k-char-offset", "5000-digit-int", "info-not-object"],
)
def test_hostile_safetensors_headers_exit_2_with_one_bounded_line(tmp_path, capsys, content, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    err = plan_error(capsys, path)
    assert message in err


def test_header_over_the_cap_names_the_cap(tmp_path, capsys):
    path = tmp_path / "big.safetensors"
    length = 100 * MIB + 1
    with open(path, "wb") as handle:  # sparse: nothing past the length field is written
        handle.write(struct.pack("<Q", length))
        handle.truncate(8 + length + 16)
    err = plan_error(capsys, path)
    assert f"header length {length} is over the 104857600 bytes (100 MiB) this reader accepts" in err
    assert "does not fit" not in err


def test_sub_byte_and_complex_dtypes_are_sized_in_bits(tmp_path):
    content = tensor_header(a={"dtype": "F4", "shape": [4, 6], "data_offsets": [0, 12]},
                            b={"dtype": "F6_E2M3", "shape": [8], "data_offsets": [12, 18]},
                            c={"dtype": "C64", "shape": [2], "data_offsets": [18, 34]}) + bytes(34)
    path = tmp_path / "fp4.safetensors"
    path.write_bytes(content)
    assert read_model_sizes(str(path)).rest_bytes == 34


def test_gguf_named_file_with_a_corrupted_magic_is_not_a_gguf_file(tmp_path, capsys):
    from gguf_loader import write_gguf

    path = tmp_path / "model.gguf"
    write_gguf(path, {"blocks.0.w": torch.zeros(4, 4), "blocks.1.w": torch.zeros(4, 4)})
    path.write_bytes(b"GGUX" + path.read_bytes()[4:])
    err = plan_error(capsys, path)
    assert "not a GGUF file (starts with b'GGUX', expected b'GGUF')" in err and "safetensors" not in err


def test_unknown_extension_says_it_was_read_as_safetensors(tmp_path, capsys):
    path = tmp_path / "model.bin"
    path.write_bytes(b"PK\x03\x04" + bytes(60))
    err = plan_error(capsys, path)
    assert "read as safetensors: the file does not start with the GGUF magic b'GGUF'" in err


def test_gguf_magic_wins_over_the_extension(tmp_path):
    from gguf_loader import write_gguf

    path = tmp_path / "renamed.safetensors"
    write_gguf(path, {"blocks.0.a.w": torch.zeros(4, 4), "blocks.1.a.w": torch.zeros(4, 4)})
    assert [name for name, _ in read_model_sizes(str(path)).blocks] == ["blocks.0", "blocks.1"]


def test_hostile_gguf_names_and_values_are_echoed_bounded(tmp_path, capsys):
    from gguf_helpers import QT, VT, gguf_bytes, kv, kv_array, tensor_info

    long_name = "blk." + "x" * 100_000
    path = tmp_path / "long.gguf"
    path.write_bytes(gguf_bytes([], [tensor_info(long_name, (32,), 99, 0)], bytes(128)))
    assert "tensor 'blk.xxxx" in plan_error(capsys, path)
    shape = kv_array("comfy.gguf.orig_shape.w", VT.INT32, [struct.pack("<i", -1)] * 100_000)
    path.write_bytes(gguf_bytes([shape], [tensor_info("w", (32,), QT.F32, 0)], bytes(128)))
    assert "got [-1, -1, -1, -1, -1, -1, -1, -1, ...]" in plan_error(capsys, path)
    path.write_bytes(gguf_bytes([kv("general.alignment", VT.STRING, struct.pack("<Q", 50_000) + b"7" * 50_000)]))
    assert "general.alignment must be a positive power of two, got '7777" in plan_error(capsys, path)


@pytest.mark.parametrize(
    "expert, message",
    [
        ("cuda:0,1" + "0" * 300 + "gb;cpu,*", "gb' is more than any device holds"),
        ("cuda:0," + "9" * 5000 + "gb;cpu,*", "entry 'cuda:0,999999999999999999"),
        ("cuda:0,1" + "0" * 300 + "%;cpu,*", "percentages add up to 1e+300%, more than 100%"),
        ("cuda:0,1" + "0" * 300 + ";cpu,*", "000000' is above 1: write a share"),
        ("cuda:0,1" + "0" * 400 + ";cpu,*", "is 408 characters long"),
        ("cuda:" + "7" * 5000 + ",1gb;cpu,*", "entry 'cuda:7777"),
        ("cuda:1234567,1gb;cpu,*", "unknown device 'cuda:1234567'"),
        ("#" * 10_000, "'#' is not part of the grammar"),
        ("cuda:0,1gb;" * 4999 + "cuda:0,1gb", "device 'cuda:0' appears twice"),
        ("cuda:0,2000000000gb;cpu,*", "amount '2000000000gb' in 'cuda:0,2000000000gb' is more than any device holds"),
    ],
    ids=["1e300gb", "5000-digit-gb", "1e300%", "1e300-fraction", "1e400-fraction", "5000-digit-device",
         "7-digit-device", "10k-hash", "5000-entries", "2e9gb"],
)
def test_hostile_expert_strings_exit_2_with_one_bounded_line(tmp_path, capsys, expert, message):
    """`plan --expert` with a 300-digit amount printed an OverflowError traceback (issue #13, escape 4)."""
    err = plan_error(capsys, write_dit(tmp_path / "m.safetensors"), "--expert", expert, names_file=False)
    assert message in err


@pytest.mark.parametrize("index", ["²", "١", "9" * 5000])
def test_odd_digits_in_tensor_names_are_not_block_indices(tmp_path, index):
    """Found by tests/fuzzing.py: str.isdigit() accepts '²' (int() does not) and int() refuses 5000 digits."""
    entry = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    content = tensor_header(**{"blocks.0.a.w": entry, "blocks.1.a.w": {**entry, "data_offsets": [4, 8]},
                               f"blocks.{index}.a.w": {**entry, "data_offsets": [8, 12]}}) + bytes(12)
    path = tmp_path / "odd.safetensors"
    path.write_bytes(content)
    sizes = read_model_sizes(str(path))
    assert [name for name, _ in sizes.blocks] == ["blocks.0", "blocks.1"] and sizes.rest_bytes == 4


def test_proposal_search_is_bounded_for_tiny_blocks(tmp_path, capsys, monkeypatch):
    """Found by tests/fuzzing.py: 1-byte blocks made the proposal step 1 byte, so a file whose other weights do not
    fit tried one plan per byte (hours for gigabytes). The search now stops after MAX_PROPOSALS plans."""
    import distorch.cli as cli

    rest = 1 << 30
    content = tensor_header(**{"blocks.0.a.w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
                               "blocks.1.a.w": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]},
                               "big.w": {"dtype": "U8", "shape": [rest], "data_offsets": [2, 2 + rest]}})
    path = tmp_path / "tiny_blocks.safetensors"
    with open(path, "wb") as handle:  # sparse: the gigabyte of zeros costs no disk
        handle.write(content)
        handle.truncate(len(content) + 2 + rest)
    plans = []
    original = cli.plan_sizes

    def counted(*args, **kwargs):
        plans.append(1)
        assert len(plans) <= 2002, "the proposal search is not bounded"
        return original(*args, **kwargs)

    monkeypatch.setattr(cli, "plan_sizes", counted)
    code, _, err = run(capsys, "plan", str(path), "--vram-gb", "2.5", "--ram-gb", "64")
    assert code == 2 and "does not fit even with every block streamed" in err


# -- a workload: the plan a DisTorch loader makes in auto mode (issue #18) ------------------------------------------

@pytest.fixture(scope="module")
def wan14b(tmp_path_factory) -> Path:
    from model_headers import wan14b_shapes, write_header_only

    return write_header_only(tmp_path_factory.mktemp("wan") / "wan2.1_t2v_14B_bf16.safetensors", wan14b_shapes())


def workload_plan(capsys, path: Path, vram_gb: float, width: int, height: int, frames: int = 81, *extra) -> dict:
    code, out, err = run(capsys, "plan", str(path), "--vram-gb", str(vram_gb), "--ram-gb", "256", "--width",
                         str(width), "--height", str(height), "--frames", str(frames), "--json", *extra)
    assert code == 0, err
    return json.loads(out)


def test_workload_plan_is_automatic_and_gives_comfyuis_activation_estimate(wan14b, capsys):
    data = workload_plan(capsys, wan14b, 24, 832, 480)
    assert data["mode"] == "automatic" and data["blocks"] == 40
    assert data["activation"]["latent_shape"] == [1, 16, 21, 60, 104]
    assert data["activation"]["gb"] == pytest.approx(5.9, abs=0.05)  # ComfyUI's memory_required, batch 1
    assert data["activation"]["cfg_gb"] == pytest.approx(2 * data["activation"]["gb"], abs=0.002)
    # Weights on the card fit ComfyUI's budget: 24 GB free - (activations + 400 MB reserved).
    assert data["budget_gb"] == pytest.approx(24 - data["activation"]["gb"] - 400 / 1024, abs=0.002)
    assert data["vram_gb"]["total"] <= data["budget_gb"]
    assert 0 < data["streamed_gb"] == data["moved_off_gb"] and data["virtual_vram_gb"] == data["streamed_gb"]


def test_a_larger_workload_streams_strictly_more(wan14b, capsys):
    at_480p = workload_plan(capsys, wan14b, 24, 832, 480)
    at_720p = workload_plan(capsys, wan14b, 24, 1280, 720)
    assert at_720p["streamed_gb"] > at_480p["streamed_gb"]
    short = workload_plan(capsys, wan14b, 24, 1280, 720, 33)
    assert at_720p["streamed_gb"] > short["streamed_gb"]
    doubled = workload_plan(capsys, wan14b, 24, 832, 480, 81, "--batch", "2")
    assert doubled["streamed_gb"] > at_480p["streamed_gb"]


def test_nothing_streams_when_the_card_is_large_enough(wan14b, capsys):
    data = workload_plan(capsys, wan14b, 80, 832, 480)
    assert data["streamed"] == [] and data["streamed_gb"] == 0 and data["mode"] == "automatic"


def test_a_fixed_amount_under_a_workload_streams_more_when_it_does_not_fit(wan14b, capsys):
    data = workload_plan(capsys, wan14b, 24, 1280, 720, 81, "--virtual-vram-gb", "4")
    assert data["mode"] == "fixed" and data["streamed_gb"] > 4.7
    assert any("does not fit the budget for this run" in w for w in data["warnings"])


def test_workload_table_says_why(wan14b, capsys):
    code, out, err = run(capsys, "plan", str(wan14b), "--vram-gb", "16", "--ram-gb", "256", "--width", "832",
                         "--height", "480", "--frames", "81")
    assert code == 0, err
    assert "placement: automatic, fitted to the run's budget of" in out
    assert "latent 1x16x21x60x104 (Wan 2.1/2.2 (dim 5120)); ComfyUI's activation estimate 5.90 GB" in out
    assert "resident: " in out and "prefetch: 2 slots, the default" in out


def test_without_a_workload_the_output_is_unchanged(wan14b, capsys):
    code, out, err = run(capsys, "plan", str(wan14b), "--vram-gb", "24", "--ram-gb", "256", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert "mode" not in data and "activation" not in data and data["proposed"] is True
    assert data["activation_reserve_gb"] == 2.0


@pytest.mark.parametrize("extra, message", [
    (["--width", "832"], "--width needs --height too"),
    (["--frames", "81"], "--frames and --batch describe a workload: give --width and --height too"),
    (["--width", "0", "--height", "480"], "width must be a whole number >= 1, got 0"),
    (["--width", "832", "--height", "480", "--compute-device", "cpu"], "compute on the CPU has none"),
])
def test_bad_workloads_exit_2_with_one_line(wan14b, capsys, extra, message):
    code, out, err = run(capsys, "plan", str(wan14b), "--vram-gb", "24", "--ram-gb", "64", *extra)
    assert code == 2 and not out and err.count("\n") == 1 and message in err, err


def test_a_workload_for_an_unknown_family_names_it(tmp_path, capsys):
    path = write_dit(tmp_path / "mystery.safetensors")
    code, out, err = run(capsys, "plan", str(path), "--vram-gb", "24", "--ram-gb", "64", "--width", "832",
                         "--height", "480")
    assert code == 2 and not out and err.count("\n") == 1
    assert "mystery.safetensors: no activation estimate for this model: its family is not one of Wan" in err


def test_workload_plan_never_imports_torch(wan14b):
    code = ("import sys; from distorch.cli import main; "
            f"rc = main(['plan', {str(wan14b)!r}, '--vram-gb', '16', '--ram-gb', '64', '--width', '1280', "
            "'--height', '720', '--frames', '81', '--json']); sys.exit(3 if 'torch' in sys.modules else rc)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (result.returncode, result.stderr)
    assert json.loads(result.stdout)["mode"] == "automatic"


# -- stream formats (issue #20): a header plan counts the blocks as the loader will stage them --------------------

def test_a_header_counts_the_stream_formats_as_the_loaded_model_does(tmp_path):
    """The sizes a stream format gives a file's blocks, read from its header, equal the loaded model's (one set of
    rules, distorch/stream_rules.py): what `plan --stream-format` counts is what the loader stages."""
    from distorch.placement import model_sizes
    from distorch.toy import make_toy_dit

    model = make_toy_dit(dim=96, depth=3, heads=2, dtype=torch.bfloat16)
    path = tmp_path / "toy.safetensors"
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()}, str(path))
    header, live = read_model_sizes(str(path)), model_sizes(model)
    assert header.blocks == live.blocks and set(header.encoded) == {"q8_0", "fp8_e4m3fn"}
    assert header.encoded == live.encoded and all(len(blocks) == 3 for blocks in header.encoded.values())


def test_a_stream_format_plan_holds_and_copies_the_smaller_blocks(wan14b, capsys):
    """Wan 14B bf16 at 480p on 16 GB: as many blocks leave the GPU in every format; Q8_0 holds and copies 0.53 x
    their bytes, fp8 0.50 x, and the decode buffer is counted within the run's budget."""
    stored = workload_plan(capsys, wan14b, 16, 832, 480)
    formats = {fmt: workload_plan(capsys, wan14b, 16, 832, 480, 81, "--stream-format", fmt)
               for fmt in ("q8_0", "fp8_e4m3fn")}
    assert stored["stream_format"] == "stored" and stored["saved_gb"] == 0 and stored["vram_gb"]["decode"] == 0
    moved = stored["transfer"]["per_forward_gb"]
    for fmt, ratio in (("q8_0", 0.532), ("fp8_e4m3fn", 0.501)):
        data = formats[fmt]
        assert data["stream_format"] == fmt and data["streamed_gb"] == stored["streamed_gb"]
        assert data["transfer"]["per_forward_gb"] == pytest.approx(ratio * moved, rel=0.002)
        assert data["saved_gb"] == pytest.approx(moved - data["transfer"]["per_forward_gb"], abs=0.002)
        assert data["pinned_ram_gb"] + data["pageable_ram_gb"] == pytest.approx(data["transfer"]["per_forward_gb"],
                                                                                abs=0.002)
        assert 0 < data["vram_gb"]["decode"] and data["vram_gb"]["total"] <= data["budget_gb"]


def test_a_gguf_files_quantized_blocks_stream_as_stored_in_any_format(tmp_path, capsys):
    from gguf_loader import quantize_q8_0, write_gguf

    path = tmp_path / "m.gguf"
    write_gguf(path, {f"blocks.{i}.attn.weight": quantize_q8_0(torch.randn(64, 64)) for i in range(4)})
    assert read_model_sizes(str(path)).encoded == {"q8_0": {}, "fp8_e4m3fn": {}}
    code, out, err = run(capsys, "plan", str(path), "--vram-gb", "8", "--ram-gb", "8", "--virtual-vram-gb", "1",
                         "--stream-format", "fp8_e4m3fn", "--json")
    assert code == 0 and json.loads(out)["saved_gb"] == 0, err
