"""Rewrites a workflow's loader nodes (ComfyUI-MultiGPU, ComfyUI-GGUF, core) as the DisTorch nodes.

    python -m distorch convert workflow.json -o workflow_distorch.json

Both formats ComfyUI saves are handled: the UI format (nodes with `widgets_values`, `links`, subgraph
definitions) and the API format (id → `class_type`, `inputs`). Node ids, links, titles, positions,
modes and every other node stay as they are; a converted node keeps every value its user set (through
the mapping in legacy_loaders.py) and the report names the values that have no effect here. A node that cannot
be converted faithfully (a link into an input with no DisTorch counterpart, a built-in VAE name) is left
as it is and reported.
"""

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field

from .legacy_loaders import CORE, LEGACY_LOADERS, LegacyLoader, Machine


class ConvertError(ValueError):
    """The input is not a ComfyUI workflow this converter can read; the message names the problem."""


@dataclass(frozen=True)
class Change:
    node_id: str
    old_type: str
    new_type: str
    placement: tuple[str, ...] = ()  # "name=value" of the DisTorch node's device and virtual VRAM values
    without_effect: tuple[str, ...] = ()  # "name=value" of the original's values that do nothing here

    def __str__(self) -> str:
        text = f"node {self.node_id}: {self.old_type} -> {self.new_type} ({', '.join(self.placement)})"
        if self.without_effect:
            text += f"; no effect here: {', '.join(self.without_effect)}"
        return text


@dataclass(frozen=True)
class Skipped:
    node_id: str
    node_type: str
    reason: str

    def __str__(self) -> str:
        return f"node {self.node_id}: {self.node_type} left as it is: {self.reason}"


@dataclass
class Conversion:
    """The converted workflow and what changed in it."""

    workflow: dict
    changes: list[Change] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def report(self) -> str:
        lines = [str(c) for c in self.changes] + [str(s) for s in self.skipped]
        lines.append(f"{len(self.changes)} loader node(s) converted to DisTorch, {len(self.skipped)} left as they were")
        return "\n".join(lines)


def convert_workflow(workflow: dict, machine: Machine | None = None, include_core: bool = True) -> Conversion:
    """Converts a UI-format or API-format workflow; the input is not modified.

    Args:
        workflow: the parsed JSON of a workflow file.
        machine: the default compute device and the GPUs, for loaders that name no device.
        include_core: also convert core's loaders (UNETLoader, CLIPLoader, ..., CheckpointLoaderSimple).

    Raises:
        ConvertError: when `workflow` is neither format, or a loader node in it is malformed.
    """
    machine = machine or Machine()
    result = Conversion(copy.deepcopy(workflow))
    if is_ui_workflow(workflow):
        graphs = [result.workflow] + list(_subgraphs(result.workflow))
        for graph in graphs:
            for node in graph["nodes"]:
                _convert_ui_node(node, machine, include_core, result)
    elif is_api_workflow(workflow):
        for node_id, node in result.workflow.items():
            _convert_api_node(str(node_id), node, machine, include_core, result)
    else:
        raise ConvertError("not a ComfyUI workflow: expected the UI format (with 'nodes' and 'links') or the API "
                           "format (node ids mapping to 'class_type' and 'inputs')")
    return result


def is_ui_workflow(workflow) -> bool:
    return isinstance(workflow, dict) and isinstance(workflow.get("nodes"), list) and \
        all(isinstance(n, dict) and "type" in n and "id" in n for n in workflow["nodes"])


def is_api_workflow(workflow) -> bool:
    return isinstance(workflow, dict) and bool(workflow) and all(
        isinstance(n, dict) and isinstance(n.get("class_type"), str) and isinstance(n.get("inputs", {}), dict)
        for n in workflow.values())


def _subgraphs(workflow: dict):
    definitions = workflow.get("definitions")
    subgraphs = definitions.get("subgraphs") if isinstance(definitions, dict) else None
    for subgraph in subgraphs if isinstance(subgraphs, list) else []:
        if isinstance(subgraph, dict) and is_ui_workflow(subgraph):
            yield subgraph


def _entry(node_type, include_core: bool) -> LegacyLoader | None:
    entry = LEGACY_LOADERS.get(node_type) if isinstance(node_type, str) else None
    if entry is None or (entry.pack == CORE and not include_core):
        return None
    return entry


# -- UI format ----------------------------------------------------------------------------------------------------

def _convert_ui_node(node: dict, machine: Machine, include_core: bool, result: Conversion) -> None:
    entry = _entry(node["type"], include_core)
    if entry is None:
        return
    node_id = str(node["id"])
    values, problem = _ui_values(node, entry, node_id)
    linked = [i for i in node.get("inputs") or [] if isinstance(i, dict) and i.get("widget") and i.get("link")
              is not None]
    problem = problem or _unconvertible(entry, values, [_widget_name(i) for i in linked])
    if problem:
        result.skipped.append(Skipped(node_id, entry.node_id, problem))
        return
    native = entry.to_native(values, machine)
    carried = entry.carried()
    node["inputs"] = _ui_inputs(node.get("inputs") or [], carried, set(native))
    node["widgets_values"] = dict(native) if isinstance(node.get("widgets_values"), dict) else list(native.values())
    node["type"] = entry.target
    _retag_properties(node, entry)
    result.changes.append(_change(node_id, entry, values, native))


def _ui_values(node: dict, entry: LegacyLoader, node_id: str) -> tuple[dict, str | None]:
    """The node's widget values by name, or why they cannot be read faithfully."""
    saved = node.get("widgets_values", [])
    if isinstance(saved, dict):
        unknown = sorted(set(saved) - set(entry.input_names))
        return saved, (f"unknown widget values {_names(unknown)}" if unknown else None)
    if not isinstance(saved, list):
        raise ConvertError(f"node {node_id} ({entry.node_id}): widgets_values is neither a list nor an object")
    if len(saved) > len(entry.inputs):
        return {}, (f"{len(saved)} widget values where {entry.node_id} has {len(entry.inputs)} widgets: saved by a "
                    "version this converter does not know")
    # Older versions of a node may have saved fewer widgets; the missing ones take their defaults.
    return dict(zip(entry.input_names, saved)), None


def _widget_name(socket: dict) -> str:
    widget = socket.get("widget")
    return widget.get("name", socket.get("name")) if isinstance(widget, dict) else socket.get("name")


def _ui_inputs(inputs: list, carried: Mapping[str, str], native: set[str]) -> list:
    """The input sockets of the converted node: widget inputs renamed, ones with no counterpart dropped.

    Links point at input slots by index, so an input is only dropped when no linked input follows it.
    """
    last_linked = max((i for i, s in enumerate(inputs) if isinstance(s, dict) and s.get("link") is not None),
                      default=-1)
    converted = []
    for index, socket in enumerate(inputs):
        if not isinstance(socket, dict) or not socket.get("widget"):
            converted.append(socket)
            continue
        name = carried.get(_widget_name(socket))
        if name is None and index > last_linked:
            continue
        socket = dict(socket)
        if name is not None and name in native:
            socket["name"] = name
            socket["widget"] = {**socket["widget"], "name": name} if isinstance(socket["widget"], dict) \
                else {"name": name}
            socket.pop("localized_name", None)
        converted.append(socket)
    return converted


def _retag_properties(node: dict, entry: LegacyLoader) -> None:
    properties = node.get("properties")
    if not isinstance(properties, dict):
        return
    if properties.get("Node name for S&R") in (None, entry.node_id):
        properties["Node name for S&R"] = entry.target
    # Which pack (and version) a node came from: the frontend records them again when it saves.
    for key in ("cnr_id", "ver", "aux_id"):
        properties.pop(key, None)


# -- API format ---------------------------------------------------------------------------------------------------

def _convert_api_node(node_id: str, node: dict, machine: Machine, include_core: bool, result: Conversion) -> None:
    entry = _entry(node.get("class_type"), include_core)
    if entry is None:
        return
    inputs = node.get("inputs", {})
    linked = [k for k, v in inputs.items() if _is_link(v)]
    values = {k: v for k, v in inputs.items() if not _is_link(v)}
    unknown = sorted(set(inputs) - set(entry.input_names))
    problem = f"unknown inputs {_names(unknown)}" if unknown else _unconvertible(entry, values, linked)
    if problem:
        result.skipped.append(Skipped(node_id, entry.node_id, problem))
        return
    native = entry.to_native(values, machine)
    carried = entry.carried()
    for name in linked:
        native[carried[name]] = inputs[name]
    node["class_type"] = entry.target
    node["inputs"] = native
    result.changes.append(_change(node_id, entry, values, native))


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


# -- shared -------------------------------------------------------------------------------------------------------

def _unconvertible(entry: LegacyLoader, values: Mapping, linked: list[str]) -> str | None:
    carried = entry.carried()
    for name in linked:
        if name not in carried:
            return f"input {_short(name)!r} is driven by a link and has no DisTorch counterpart"
    vae_name = values.get("vae_name")
    if isinstance(vae_name, str) and "." not in vae_name:
        return f"vae_name {_short(vae_name)!r} is one of core's built-in VAEs, not a file DisTorch loads"
    return None


def _change(node_id: str, entry: LegacyLoader, values: Mapping, native: Mapping) -> Change:
    placement = tuple(f"{k}={_short(repr(v))}" for k, v in native.items()
                      if k.endswith(_PLACEMENT_INPUTS) and v != "")
    without_effect = tuple(f"{i.name}={_short(repr(values[i.name]))}" for i in entry.inputs
                           if i.ignored and i.name in values)
    return Change(node_id, entry.node_id, entry.target, placement, without_effect)


_PLACEMENT_INPUTS = ("device", "virtual_vram_gb", "expert_mode_allocations")


def _short(text, limit: int = 60) -> str:
    """Echoes a value from the file, bounded: a workflow is untrusted input."""
    text = str(text)
    return text if len(text) <= limit else text[:limit] + "..."


def _names(names: list) -> str:
    shown = ", ".join(repr(_short(n)) for n in names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")
