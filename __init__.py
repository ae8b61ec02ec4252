"""DisTorch virtual VRAM for ComfyUI: loaders that keep part of a model in pinned RAM (or a donor GPU)
and stream it to the compute GPU block by block, plus a built-in GGUF engine.

ComfyUI imports this folder as a package from custom_nodes/. Outside ComfyUI (tests, the CLI) the
`distorch` and `gguf_loader` packages are used on their own and nothing here registers.
"""

try:
    import comfy_api.latest  # noqa: F401  (only importable inside ComfyUI)
except ImportError:
    pass
else:
    from .nodes.extension import WEB_DIRECTORY, comfy_entrypoint  # noqa: F401
