"""Byte units shared by the allocation grammar, the planner and the reports.

"GB" means GiB (1024³ bytes) everywhere, as in ComfyUI-MultiGPU, so a `virtual_vram_gb` or an
expert string that users carry over from there keeps its meaning.
"""

GIB = 1024**3
MIB = 1024**2

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
