"""The repository's layout, read from the source and from this process's modules (issue 21 parts 4-5): test and
bench scaffolding lives under tests/ or bench/, one copy of each runtime module per process, no runtime module that
branches on `__package__`, and no module named after the vague "compat"."""

import ast
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = ("distorch", "gguf_loader", "nodes")


def runtime_files() -> list[Path]:
    return [ROOT / "__init__.py"] + sorted(p for package in RUNTIME for p in (ROOT / package).rglob("*.py"))


def test_test_and_bench_scaffolding_lives_outside_the_runtime_packages():
    assert not (ROOT / "gguf_loader" / "samples.py").exists()
    assert not (ROOT / "gguf_loader" / "bench_support.py").exists()
    helpers = {path.stem for path in (ROOT / "tests").glob("*.py")} - {"conftest"}
    importers = {}
    for path in runtime_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if found := {name.split(".")[0] for name in names} & helpers:
                importers[str(path.relative_to(ROOT))] = sorted(found)
    assert importers == {}


def test_no_runtime_module_branches_on_its_package_name():
    """distorch reaches gguf_loader through distorch/gguf_engine.py, whichever way the pack was imported."""
    assert [str(p.relative_to(ROOT)) for p in runtime_files() if "__package__" in p.read_text()] == []


def test_no_module_is_named_compat():
    """"compat" named five different things (issue 21); each is now named by what it holds."""
    named = [p for p in [*ROOT.glob("distorch/**/*"), *ROOT.glob("gguf_loader/**/*"), *ROOT.glob("nodes/**/*.py"),
                         *ROOT.glob("docs/*")] if "compat" in p.name]
    assert named == []


def test_each_runtime_module_is_loaded_once_in_a_test_process():
    """The node modules' `..distorch` and `..gguf_loader` are the top-level packages the tests import
    (tests/conftest.py): one ledger, one `Placement` class, one `GGUFError`."""
    from distorch_pack.distorch.ledger import LEDGER
    from distorch_pack.gguf_loader import GGUFError
    from distorch_pack.nodes import settings, state  # noqa: F401  (node modules that import without ComfyUI)

    import distorch.ledger
    import distorch.placement
    import gguf_loader

    assert state.Placement is distorch.placement.Placement
    assert LEDGER is distorch.ledger.LEDGER
    assert GGUFError is gguf_loader.GGUFError
    # The root __init__.py is left out: pytest itself imports it once more, as the package of tests/ (it registers
    # nothing outside ComfyUI).
    ours = {str(path) for path in runtime_files()[1:]}
    loaded = Counter(getattr(m, "__file__", None) for m in {id(m): m for m in sys.modules.values()}.values())
    assert {file: copies for file, copies in loaded.items() if file in ours and copies > 1} == {}


def test_inside_a_pack_distorch_reaches_the_pack_s_own_gguf_loader(tmp_path):
    """Imported as ComfyUI imports a custom node (a package named after its folder's path, the repository root not on
    sys.path), distorch's GGUF engine is the pack's own gguf_loader and no top-level copy loads."""
    name = str(ROOT).replace(".", "_x_")  # ComfyUI's module name for custom_nodes/<folder>
    script = f"""
import importlib, importlib.util, sys
assert importlib.util.find_spec("gguf_loader") is None, "the repository root must not be on sys.path here"
spec = importlib.util.spec_from_file_location({name!r}, {str(ROOT / "__init__.py")!r},
                                              submodule_search_locations=[{str(ROOT)!r}])
sys.modules[{name!r}] = pack = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pack)
inside = lambda module: importlib.import_module({name!r} + "." + module)
assert inside("distorch.echo").echo is inside("gguf_loader.errors").echo
assert inside("distorch.headers")._gguf_header_reader() is inside("gguf_loader.gguf_header").read_gguf_header
assert inside("distorch.cli").IMAGE_ARCHITECTURES is inside("gguf_loader.arch").IMAGE_ARCHITECTURES
top_level = sorted(m for m in sys.modules if m.split(".")[0] in ("distorch", "gguf_loader"))
assert not top_level, top_level
"""
    result = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
