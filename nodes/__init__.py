"""ComfyUI adapters; `extension.py` registers the nodes. The modules, each importing only modules listed above it
(tests/test_nodes_layout.py checks there is no circle):

    settings.py        the DisTorch inputs (auto_placement last): widget specs and validated values (pure; rules:
                       distorch/request.py)
    catalog.py         the nodes' table (pure data from distorch/catalog.py)
    installed_packs.py which of ComfyUI-MultiGPU / ComfyUI-GGUF this ComfyUI loads (pure)
    state.py           the attachment on a model: its `distorch.Placement`, the loader node's id, a run's timings
    folders.py, progress.py, gguf_support.py   model file lists, the staging progress bar, GGUF in ComfyUI
    memory_policy.py   ComfyUI's memory policy (pinned-RAM budget, compute GPU room), read in this one place
    devices.py         the devices ComfyUI lets DisTorch use
    runs.py            each run's budget from core, the re-placement that fits it, the plan sent to the node
    patcher.py         DisTorchModelPatcher: core places the rest, the placement streams the blocks
    loading.py, checkpoint.py   the loaders (core's own, then adopted and planned)
    inputs.py          the widgets and the one validation every loader node shares
    stand_ins.py       stand-ins for the other packs' loader ids (table: distorch/legacy_loaders.py)
    convert_route.py   the workflow converter's HTTP route
    extension.py       the DisTorch nodes and their registration
"""
