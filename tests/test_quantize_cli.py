"""`python -m distorch quantize`: the GGUF it writes (gguf-py reads it, Q8_0 bit-identical to gguf-py's quantizer,
unquantized tensors unchanged, our reader agrees), the rules for what stays unquantized, refusals (one line, exit
2), the atomic write, and peak memory of one tensor on a 256 MB input (child process)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from quantize_models import wan_state_dict, write_large_model, write_model

from distorch.cli import QUANTIZE_TYPES, main
from distorch.quantize import QUANT_TYPES, plan_quantization
from gguf_loader import dequantize, read_gguf

ROOT = Path(__file__).resolve().parents[1]
QT = gguf.GGMLQuantizationType


def quantize(capsys, *argv):
    code = main(["quantize", *map(str, argv), "--quiet"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def model(tmp_path):
    return write_model(tmp_path / "wan.safetensors", wan_state_dict())


def reader_tensors(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def test_gguf_py_reads_it_q8_0_is_gguf_py_bit_for_bit_and_within_the_bound(model, tmp_path, capsys):
    out = tmp_path / "wan-Q8_0.gguf"
    code, stdout, err = quantize(capsys, model, out)
    assert code == 0, err
    assert "wan (detected)" in stdout and "Q8_0" in stdout
    source = wan_state_dict()
    reader = gguf.GGUFReader(str(out))
    field = reader.get_field("general.architecture")
    assert bytes(field.parts[field.data[-1]]).decode() == "wan"
    assert int(reader.get_field("general.file_type").parts[-1][0]) == gguf.LlamaFileType.MOSTLY_Q8_0
    tensors = reader_tensors(out)
    assert set(tensors) == set(source)
    quantized = {n for n, t in tensors.items() if t.tensor_type == QT.Q8_0}
    assert quantized == {f"blocks.{i}.{p}" for i in range(2) for p in
                         ("self_attn.q.weight", "self_attn.k.weight", "self_attn.v.weight", "self_attn.o.weight",
                          "ffn.0.weight", "ffn.2.weight")}
    for name in quantized:
        values = source[name].float().numpy()
        assert np.array_equal(tensors[name].data.reshape(-1), gguf.quants.quantize(values, QT.Q8_0).reshape(-1)), name
        back = gguf.quants.dequantize(tensors[name].data, QT.Q8_0).reshape(values.shape)
        blocks, error = values.reshape(-1, 32), np.abs(back - values).reshape(-1, 32)
        # Q8_0: half a step of d = amax / 127, plus 127 codes times d's fp16 rounding (2^-11 relative).
        bound = np.abs(blocks).max(axis=1, keepdims=True) / 127 * (0.5 + 127 / 2048)
        assert (error <= bound).all(), name


def test_unquantized_tensors_are_unchanged_bit_for_bit(model, tmp_path, capsys):
    out = tmp_path / "wan.gguf"
    assert quantize(capsys, model, out)[0] == 0
    source, tensors = wan_state_dict(), reader_tensors(out)
    for name in ("blocks.0.self_attn.norm_q.weight", "blocks.1.ffn.2.bias", "blocks.0.odd.weight",
                 "blocks.0.tiny.weight", "text_embedding.2.weight", "head.head.weight", "blocks.1.norm3.weight"):
        assert tensors[name].tensor_type == QT.BF16, name
        assert tensors[name].data.tobytes() == source[name].view(torch.uint8).numpy().tobytes(), name
    for name in ("blocks.0.modulation", "head.modulation", "patch_embedding.weight",  # raw parameters, 5-D
                 "blocks.1.scale_shift_table"):
        assert tensors[name].tensor_type == QT.F32, name
        assert np.array_equal(tensors[name].data.reshape(-1), source[name].float().numpy().reshape(-1)), name
    field = gguf.GGUFReader(str(out)).get_field("comfy.gguf.orig_shape.patch_embedding.weight")
    assert [int(field.parts[i][0]) for i in field.data] == [64, 16, 1, 2, 2]


def test_our_reader_reads_it_and_agrees_with_gguf_py(model, tmp_path, capsys):
    out = tmp_path / "wan.gguf"
    assert quantize(capsys, model, out)[0] == 0
    tensors = reader_tensors(out)
    with read_gguf(out) as ours:
        assert ours.architecture == "wan"
        for name, tensor in ours.tensors.items():
            assert tensor.shape == wan_state_dict()[name].shape, name
            reference = tensors[name]
            expected = gguf.quants.dequantize(reference.data, reference.tensor_type) \
                if reference.tensor_type == QT.Q8_0 else dequantize(tensor, torch.float32).numpy()
            assert np.array_equal(dequantize(tensor, torch.float32).numpy().reshape(-1),
                                  np.asarray(expected, dtype=np.float32).reshape(-1)), name


def test_fp32_and_fp16_sources_and_a_checkpoint_prefix(tmp_path, capsys):
    for dtype, kept in ((torch.float32, QT.F32), (torch.float16, QT.F16)):
        tensors = {f"model.diffusion_model.{k}": v for k, v in wan_state_dict(dtype).items()}
        tensors["first_stage_model.decoder.conv_in.weight"] = torch.zeros(8, 4, 3, 3, dtype=dtype)
        path = write_model(tmp_path / f"ckpt-{dtype}.safetensors", tensors)
        code, stdout, err = quantize(capsys, path, tmp_path / f"{dtype}.gguf")
        assert code == 0, err
        assert "1 tensors outside the diffusion model left out" in stdout
        written = reader_tensors(tmp_path / f"{dtype}.gguf")
        assert set(written) == set(wan_state_dict())
        assert written["blocks.0.ffn.0.weight"].tensor_type == QT.Q8_0
        assert written["blocks.0.modulation"].tensor_type == kept  # F32/F16 are plain in ComfyUI-GGUF already


def test_rules_per_architecture_and_the_arch_override(tmp_path):
    flux = {"double_blocks.0.img_attn.proj.weight": torch.zeros(64, 64, dtype=torch.bfloat16),
            "img_in.weight": torch.zeros(64, 64, dtype=torch.bfloat16),
            "final_layer.linear.weight": torch.zeros(64, 64, dtype=torch.bfloat16)}
    path = write_model(tmp_path / "flux.safetensors", flux)
    from distorch.headers import read_safetensors_index

    plan = plan_quantization(str(path), read_safetensors_index(str(path)))
    types = {t.name: t.qtype for t in plan.tensors}
    assert plan.architecture == "flux" and plan.detected
    assert types == {"double_blocks.0.img_attn.proj.weight": QT.Q8_0, "img_in.weight": QT.BF16,
                     "final_layer.linear.weight": QT.BF16}
    plain = write_model(tmp_path / "plain.safetensors", {"layers.0.w.weight": torch.zeros(64, 64)})
    overridden = plan_quantization(str(plain), read_safetensors_index(str(plain)), architecture="sd3")
    assert overridden.architecture == "sd3" and not overridden.detected


def test_refusals_are_one_line_with_exit_2(model, tmp_path, capsys):
    def refused(*argv, expect):
        code, _, err = quantize(capsys, *argv)
        assert code == 2 and err.count("\n") == 1 and err.startswith("distorch: error: "), err
        assert expect in err, err
        return err

    refused(tmp_path / "missing.safetensors", tmp_path / "o.gguf", expect="missing.safetensors: no such file")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(model.read_bytes()[:-1000])
    refused(truncated, tmp_path / "o.gguf", expect=f"{truncated}: tensor")
    hostile = tmp_path / "hostile.safetensors"
    hostile.write_bytes((2**62).to_bytes(8, "little") + b"{}")
    refused(hostile, tmp_path / "o.gguf", expect=f"{hostile}: header length")
    fp8_weight = torch.zeros(64, 64).to(torch.float8_e4m3fn)
    fp8 = write_model(tmp_path / "fp8.safetensors", {**wan_state_dict(), "blocks.0.extra.weight": fp8_weight})
    refused(fp8, tmp_path / "o.gguf", expect="'blocks.0.extra.weight' (F8_E4M3)")
    unknown = write_model(tmp_path / "unknown.safetensors", {"layers.0.w.weight": torch.zeros(64, 64)})
    err = refused(unknown, tmp_path / "o.gguf", expect="no diffusion-model architecture recognised")
    assert "wan: blocks.0.self_attn.norm_q.weight + text_embedding.2.weight + head.modulation" in err
    assert "--arch" in err
    diffusers = write_model(tmp_path / "diffusers.safetensors",
                            {"transformer_blocks.0.attn.norm_added_k.weight": torch.zeros(64)})
    refused(diffusers, tmp_path / "o.gguf", expect="Flux model in diffusers format")
    gguf_input = tmp_path / "in.gguf"
    assert quantize(capsys, model, gguf_input)[0] == 0
    refused(gguf_input, tmp_path / "o2.gguf", expect="is a GGUF file")
    with pytest.raises(SystemExit) as exited:
        main(["quantize", str(model), str(tmp_path / "o.gguf"), "--type", "q4_k"])
    assert exited.value.code == 2 and "invalid choice: 'q4_k'" in capsys.readouterr().err


def test_never_overwrites_the_input_even_with_force(model, tmp_path, capsys):
    before = model.read_bytes()
    for argv in ((model, model), (model, model, "--force")):
        code, _, err = quantize(capsys, *argv)
        assert code == 2 and "is the input file" in err
    link = tmp_path / "hardlink.gguf"
    os.link(model, link)
    code, _, err = quantize(capsys, model, link, "--force")
    assert code == 2 and "is the input file" in err
    symlink = tmp_path / "symlink.gguf"
    symlink.symlink_to(model)
    assert quantize(capsys, model, symlink, "--force")[0] == 2
    assert model.read_bytes() == before


def test_existing_output_needs_force(model, tmp_path, capsys):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"keep me")
    code, _, err = quantize(capsys, model, out)
    assert code == 2 and "exists; pass --force" in err and out.read_bytes() == b"keep me"
    assert quantize(capsys, model, out, "--force")[0] == 0
    assert gguf.GGUFReader(str(out)).tensors


def test_interrupted_write_leaves_no_output_and_no_partial_file(model, tmp_path, capsys, monkeypatch):
    import distorch.quantize as command

    out = tmp_path / "out.gguf"
    out.write_bytes(b"previous")
    calls = []

    def interrupt_on_third(values, blocks, *args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return quantize_into(values, blocks, *args)

    quantize_into = command.quantize_q8_0_into
    monkeypatch.setattr(command, "quantize_q8_0_into", interrupt_on_third)
    code, _, err = quantize(capsys, model, out, "--force")
    assert code == 130 and "was not written" in err
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf", "wan.safetensors"]


def test_parser_choices_match_the_command():
    assert tuple(sorted(QUANT_TYPES)) == QUANTIZE_TYPES


_RSS_CHILD = textwrap.dedent("""
    import json, sys
    from distorch.quantize import quantize_file

    def status(field):
        with open("/proc/self/status") as handle:
            return next(int(line.split()[1]) * 1024 for line in handle if line.startswith(field))

    source, target = sys.argv[1:]
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets VmHWM (peak RSS) to the current RSS
    before = status("VmRSS:")
    quantize_file(source, target, force=True)
    print(json.dumps({"before": before, "peak": status("VmHWM:")}))
""")


def peak_growth(source: Path, target: Path) -> int:
    """How far the peak RSS of a child process rose above its RSS before `quantize_file` ran."""
    run = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(source), str(target)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    return result["peak"] - result["before"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc (Linux)")
def test_peak_memory_is_one_tensor_not_the_file(tmp_path):
    """A 256 MB bf16 input of 16 MB tensors: the peak RSS rises by about one tensor (its bytes, its Q8_0 bytes,
    1 M-element chunk temporaries, freed heap not yet returned), far below the file (a whole-file load fails)."""
    source, largest = write_large_model(tmp_path / "large.safetensors")
    bound = 4 * largest + 32 * 2**20  # + what glibc keeps of freed 16 MB buffers (its mmap threshold adapts)
    assert source.stat().st_size > 2 * bound
    growth = peak_growth(source, tmp_path / "large.gguf")
    assert growth < bound, f"peak RSS rose {growth / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB"


def test_a_file_that_shrinks_while_it_is_read_is_named(model, tmp_path):
    from distorch.headers import SafetensorsTensor
    from distorch.quantize import QuantizeError, read_tensor

    size = model.stat().st_size
    beyond = SafetensorsTensor("blocks.0.ffn.0.weight", "BF16", (64, 64), size - 100, 64 * 64 * 2)
    with open(model, "rb", buffering=0) as handle, \
            pytest.raises(QuantizeError, match=f"ended at byte {size} inside tensor 'blocks.0.ffn.0.weight'"):
        read_tensor(str(model), handle, beyond)
