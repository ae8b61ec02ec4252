"""Which of the packs whose loader ids DisTorch can stand in for (ComfyUI-MultiGPU, ComfyUI-GGUF) this ComfyUI loads.

ComfyUI imports custom node folders in directory order, and a later pack's node ids replace an earlier
one's, so "is it already registered?" depends on luck. This looks at what ComfyUI *will* load instead:
every custom_nodes entry it imports (a folder or a .py file, not `*.disabled`, allowed by
--disable-all-custom-nodes/--whitelist-custom-nodes), recognised by its folder name (compared without
case and punctuation, as `git clone` and the registry name them) or by the `name` in its pyproject.toml.
Pure Python, so it is tested without ComfyUI.
"""

import os
import re
from collections.abc import Iterable

# Pack → the normalised folder / project names it is installed under.
KNOWN_PACKS = {
    "ComfyUI-MultiGPU": {"comfyuimultigpu"},
    "ComfyUI-GGUF": {"comfyuigguf"},
}

_PROJECT_NAME = re.compile(r'^\s*name\s*=\s*["\']([^"\']+)["\']', re.MULTILINE)


def normalise(name: str) -> str:
    return "".join(c for c in name.lower() if c.isalnum())


def installed_packs(custom_node_dirs: Iterable[str], whitelist: Iterable[str] | None = None) -> dict[str, str]:
    """Pack name → the path ComfyUI loads it from, for the known packs present.

    Args:
        custom_node_dirs: ComfyUI's custom_nodes folders.
        whitelist: with --disable-all-custom-nodes, the entries ComfyUI still loads; None when all load.
    """
    found = {}
    allowed = None if whitelist is None else set(whitelist)
    for directory in custom_node_dirs:
        for entry in _loaded_entries(directory, allowed):
            pack = _identify(os.path.join(directory, entry), entry)
            if pack is not None:
                found.setdefault(pack, os.path.join(directory, entry))
    return found


def _loaded_entries(directory: str, allowed: set[str] | None) -> list[str]:
    """The entries of one custom_nodes folder that ComfyUI imports (its own skip rules)."""
    try:
        names = sorted(os.listdir(os.path.realpath(directory)))
    except OSError:
        return []
    loaded = []
    for name in names:
        path = os.path.join(directory, name)
        if name == "__pycache__" or name.endswith(".disabled"):
            continue
        if os.path.isfile(path) and not name.endswith(".py"):
            continue
        if allowed is not None and name not in allowed:
            continue
        loaded.append(name)
    return loaded


def _identify(path: str, entry: str) -> str | None:
    names = {normalise(os.path.splitext(entry)[0])}
    project = _project_name(path)
    if project:
        names.add(normalise(project))
    return next((pack for pack, known in KNOWN_PACKS.items() if names & known), None)


def _project_name(path: str) -> str | None:
    try:
        with open(os.path.join(path, "pyproject.toml"), encoding="utf-8", errors="replace") as handle:
            text = handle.read(64 * 1024)
    except OSError:
        return None
    project = text.split("[project]", 1)
    if len(project) < 2:
        return None
    match = _PROJECT_NAME.search(project[1].split("\n[", 1)[0])
    return match.group(1) if match else None
