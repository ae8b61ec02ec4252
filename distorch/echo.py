"""Bounded echoes of untrusted values (file headers, user strings) for one-line error messages.

One helper serves both packages: it lives in the GGUF engine (gguf_loader.errors), which imports nothing
from distorch; importing it loads no torch (gguf_loader imports its modules on first use).
"""

# The GGUF engine is a sibling package: relative inside the ComfyUI pack, top-level when run from the repo.
if __package__ and "." in __package__:
    from ..gguf_loader.errors import ECHO_CHARS, echo
else:
    from gguf_loader.errors import ECHO_CHARS, echo

__all__ = ["ECHO_CHARS", "echo"]
