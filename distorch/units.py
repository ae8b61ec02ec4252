"""Byte units shared by the allocation grammar, the planner and the reports.

"GB" means GiB (1024³ bytes) everywhere, as in ComfyUI-MultiGPU, so a `virtual_vram_gb` or an
expert string that users carry over from there keeps its meaning.
"""

GIB = 1024**3
MIB = 1024**2
ALIGNMENT = 256  # where each cluster of a block starts in host buffers and slots


def align_up(offset: int, alignment: int = ALIGNMENT) -> int:
    return (offset + alignment - 1) // alignment * alignment

# Accepted unit suffixes of the expert grammar; both spellings of each unit on purpose.
UNIT_BYTES = {"b": 1, "k": 1024, "kb": 1024, "m": MIB, "mb": MIB, "g": GIB, "gb": GIB}


def gb_to_bytes(gb: float) -> int:
    """Converts a (GiB) slider value to whole bytes."""
    return int(round(gb * GIB))


def format_gb(nbytes: int | float) -> str:
    """'12.34 GB' with two decimals; tiny models still show a nonzero value in MB."""
    if 0 < nbytes < 0.01 * GIB:
        return f"{nbytes / MIB:.2f} MB"
    return f"{nbytes / GIB:.2f} GB"


# One spelling for a weight format, whichever source names it: a torch dtype ("torch.bfloat16"), a
# safetensors header ("BF16", "F8_E4M3") or a GGUF tensor type ("BF16", "Q8_0").
_DTYPE_LABELS = {
    "float32": "fp32", "f32": "fp32", "float16": "fp16", "f16": "fp16", "half": "fp16", "bfloat16": "bf16",
    "bf16": "bf16", "float64": "fp64", "f64": "fp64", "float8_e4m3fn": "fp8_e4m3fn", "f8_e4m3": "fp8_e4m3fn",
    "float8_e5m2": "fp8_e5m2", "f8_e5m2": "fp8_e5m2",
}


def dtype_label(name: str) -> str:
    """'bf16', 'fp8_e4m3fn', 'Q8_0': the name the plan reports give a weight format."""
    plain = str(name).removeprefix("torch.")
    return _DTYPE_LABELS.get(plain.lower(), plain)


def describe_dtypes(bytes_by_dtype: dict[str, int], limit: int = 3) -> str:
    """'bf16', or the largest formats with their share of the bytes: 'Q8_0 92%, fp32 8%'."""
    total = sum(bytes_by_dtype.values())
    ranked = sorted(((n, d) for d, n in bytes_by_dtype.items() if n > 0), reverse=True)
    if not ranked:
        return "unknown"
    if len(ranked) == 1:
        return ranked[0][1]
    shown = ", ".join(f"{d} {_share(n, total)}" for n, d in ranked[:limit])
    return shown + (", ..." if len(ranked) > limit else "")


def _share(part: int, total: int) -> str:
    percent = 100 * part / total
    return f"{min(percent, 99):.0f}%" if percent >= 1 else "<1%"
