"""The node pack's module structure, read from the source (no import, no ComfyUI): no import circle among nodes/*.py,
imports inside functions included (a deferred import hides a circle, it does not remove it), and nodes/ reaches
distorch's streamer and ledger only through `distorch.Placement` (issue 21)."""

import ast
from pathlib import Path

NODES = Path(__file__).resolve().parents[1] / "nodes"
FORBIDDEN = ("distorch.ledger", "distorch.streamer")  # owned by distorch.Placement


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in the file, as a dotted name from the repo root ('nodes.state')."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.removeprefix("distorch_pack.") for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node.module, node.level)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from . import state`: a module too
    return found


def _absolute(module: str | None, level: int) -> str:
    """A module name of nodes/*.py's imports, from the repo root ('..distorch.ledger' -> 'distorch.ledger')."""
    if level == 0:
        return (module or "").removeprefix("distorch_pack.")
    package = ["nodes"][:max(0, 2 - level)]  # `.` is nodes, `..` the repo root
    return ".".join(package + ([module] if module else []))


def import_graph(directory: Path = NODES) -> dict[str, set[str]]:
    modules = {path.stem: path for path in directory.glob("*.py")}
    return {name: {m.split(".")[1] for m in imported_modules(path)
                   if m.startswith("nodes.") and m.split(".")[1] in modules and m.split(".")[1] != name}
            for name, path in modules.items()}


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle (its modules in order, the first repeated at the end), or None."""
    state: dict[str, str] = {}
    trail: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        trail.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return trail[trail.index(target):] + [target]
            if target not in state and (circle := visit(target)):
                return circle
        state[module] = "done"
        trail.pop()
        return None

    for module in sorted(graph):
        if module not in state and (circle := visit(module)):
            return circle
    return None


def test_no_import_circle_among_the_node_modules():
    assert find_circle(import_graph()) is None, " -> ".join(find_circle(import_graph()))


def test_nodes_reach_the_streamer_and_the_ledger_only_through_placement():
    offenders = {path.name: sorted(m for m in imported_modules(path) if m.startswith(FORBIDDEN))
                 for path in NODES.glob("*.py")}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_the_checks_see_a_deferred_circle_and_a_ledger_import(tmp_path):
    """The reader itself: an import inside a function closes a circle, `from ..distorch import ledger` is seen."""
    (tmp_path / "a.py").write_text("from .b import x\n")
    (tmp_path / "b.py").write_text("def f():\n    from . import a\n")
    (tmp_path / "c.py").write_text("from ..distorch import ledger\n")
    assert find_circle(import_graph(tmp_path)) == ["a", "b", "a"]
    assert "distorch.ledger" in imported_modules(tmp_path / "c.py")
