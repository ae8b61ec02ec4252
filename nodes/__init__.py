"""ComfyUI adapters. `extension.py` registers the nodes; the other modules import ComfyUI lazily
or not at all, so the schema and the glue are testable without it."""
