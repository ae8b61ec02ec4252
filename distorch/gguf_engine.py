"""The one way distorch reaches its sibling package, the GGUF engine `gguf_loader`.

The repository root holds both packages. From the root (`python -m distorch`, `import distorch`, the tests) both
are top-level; inside ComfyUI the root folder is itself a package (ComfyUI names it after the folder's path), so the
sibling is `<pack>.gguf_loader`. `gguf_module` imports the sibling under the name that matches how this package was
imported, so a process holds one copy of each module (one class per error type, one set of bounds). Imports nothing
itself: planning from a file header must not load torch.

Example:
    MAX_TENSORS = gguf_module("bounds").MAX_TENSORS
"""

import importlib
from types import ModuleType

# The package that holds distorch: "" when distorch is top-level, the ComfyUI pack's module name inside ComfyUI.
_HOLDER = __name__.rpartition(".")[0].rpartition(".")[0]
GGUF_PACKAGE = f"{_HOLDER}.gguf_loader" if _HOLDER else "gguf_loader"


def gguf_module(name: str) -> ModuleType:
    """The GGUF engine's submodule `name` ("bounds", "dequant", ...), imported on first use."""
    return importlib.import_module(f"{GGUF_PACKAGE}.{name}")
