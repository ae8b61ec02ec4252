"""Shared pytest fixtures and markers."""

import importlib.abc
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from browser_harness import browser, comfy_page  # noqa: F401  (fixtures for the browser tests)
from comfyui_harness import ComfyServer, installs
from reference_pack import reference_tarball, unpack_reference

# Checks that import ComfyUI run in each ComfyUI's own interpreter (tests/test_comfyui_core.py starts them).
collect_ignore = ["comfyui/inside"]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device; none is available")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)


class _SameModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes `distorch_pack.distorch.x` the module `distorch.x` (and the same for gguf_loader): one copy of each.

    Without it the node modules' relative imports (`from ..distorch.placement import ...`) would load a second
    copy of distorch and gguf_loader beside the top-level one the tests import: two ledgers, two `Placement`
    classes, isinstance checks failing across them. Inside ComfyUI there is only the pack's copy.
    """

    def __init__(self, pack: str, packages: tuple[str, ...]):
        self._aliases = {f"{pack}.{name}": name for name in packages}

    def _target(self, fullname: str) -> str | None:
        for alias, name in self._aliases.items():
            if fullname == alias or fullname.startswith(alias + "."):
                return name + fullname[len(alias):]
        return None

    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if self._target(fullname) else None

    def create_module(self, spec):
        return None  # a placeholder, replaced by the real module below

    def exec_module(self, module):
        # The import system returns what sys.modules holds for the name once this returns: the top-level module.
        sys.modules[module.__name__] = importlib.import_module(self._target(module.__name__))


def _import_pack_as_comfyui_does():
    """Imports the repo root as a package (ComfyUI imports custom_nodes/<pack>/__init__.py the same way).

    Node modules use relative imports (`from ..distorch import ...`), so tests reach them as
    `distorch_pack.nodes.*`, exactly the import path they have inside ComfyUI; their `distorch` and `gguf_loader`
    are the top-level packages (`_SameModules`).
    """
    sys.meta_path.insert(0, _SameModules("distorch_pack", ("distorch", "gguf_loader")))
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("distorch_pack", root / "__init__.py",
                                                  submodule_search_locations=[str(root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["distorch_pack"] = module
    spec.loader.exec_module(module)


_import_pack_as_comfyui_does()


def pytest_generate_tests(metafunc):
    """Every test that uses a ComfyUI server runs once per install (oldest first)."""
    if "comfy_install" in metafunc.fixturenames:
        found = installs()
        metafunc.parametrize("comfy_install", found or [None], ids=[i.version for i in found] or ["no-comfyui"],
                             indirect=True, scope="session")


@pytest.fixture(scope="session")
def comfy_install(request):
    if request.param is None:
        pytest.skip("no ComfyUI install: run scripts/setup_comfyui.sh, or set COMFYUI_PATH (and COMFYUI_PYTHON)")
    return request.param


@pytest.fixture(scope="session")
def reference_gguf_pack(tmp_path_factory):
    """city96/ComfyUI-GGUF unpacked from the shared folder (None without one), for cross-checks."""
    return unpack_reference(tmp_path_factory.mktemp("reference")) if reference_tarball() else None


@pytest.fixture(scope="session")
def server(comfy_install, tmp_path_factory):
    """A headless `--cpu` ComfyUI with this pack copied into custom_nodes; one per install, shared by all tests.
    No other pack beside it: DisTorch registers ComfyUI-GGUF's and MultiGPU's loader ids only when those packs are
    absent, and the compat tests run those ids here (the reference cross-checks start their own server)."""
    instance = ComfyServer(tmp_path_factory.mktemp(f"comfyui-{comfy_install.version}"), comfy_install)
    instance.prepare()
    instance.start()
    yield instance
    instance.stop()
