"""Bounded echoes of untrusted values (file headers, user strings) for one-line error messages.

One helper serves both packages: it lives in the GGUF engine (gguf_loader.errors), which imports nothing
from distorch; importing it loads no torch (gguf_loader imports its modules on first use).
"""

from .gguf_engine import gguf_module

_errors = gguf_module("errors")
ECHO_CHARS, echo = _errors.ECHO_CHARS, _errors.echo

__all__ = ["ECHO_CHARS", "echo"]
