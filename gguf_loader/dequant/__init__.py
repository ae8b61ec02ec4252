"""Dequantization of every GGML type gguf-py can dequantize, in torch, on any device.

Importing this package registers the kernels (one module per family).
"""

from . import floats, fp4, iquants, kquants, legacy, ternary  # noqa: F401  (register kernels)
from .constants import CONSTANTS
from .driver import dequantize_blocks, dequantize_raw
from .registry import kernel_for, register, supported_qtypes

__all__ = ["CONSTANTS", "dequantize_blocks", "dequantize_raw", "kernel_for", "register", "supported_qtypes"]
