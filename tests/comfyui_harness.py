"""A headless ComfyUI server for the integration tests.

Which ComfyUI: `COMFYUI_PATH` (a ComfyUI checkout) with `COMFYUI_PYTHON` (an interpreter with ComfyUI's
requirements and this pack's requirements.txt; default: the test interpreter) when set; otherwise every
install that scripts/setup_comfyui.sh built under `DISTORCH_COMFYUI_HOME` (default
~/.cache/distorch/comfyui: `comfyui-<version>/` beside `venv-<version>/`), one server per version.
The server runs with `--cpu` on a throwaway base directory whose custom_nodes folder holds a copy of
this repository (as `git clone` gives it: ComfyUI's static routes do not follow symlinks) and a small
test node pack.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
TEST_NODES = Path(__file__).resolve().parent / "comfyui" / "distorch_test_nodes"
PACK_DIR_NAME = "ComfyUI-DisTorch"
# What a user's clone would not have, or what only slows the copy down.
_NOT_COPIED = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", ".hypothesis", "*.pyc",
                                     ".ruff_cache", "build", "dist", "*.egg-info", "test-artifacts")


@dataclass(frozen=True)
class ComfyInstall:
    """One ComfyUI source tree and the interpreter that runs it."""

    version: str
    path: Path
    python: str


def installs() -> list[ComfyInstall]:
    """The ComfyUI installs the integration tests run against, oldest first."""
    explicit = os.environ.get("COMFYUI_PATH")
    if explicit:
        path = Path(explicit)
        return [ComfyInstall(_version_of(path), path, os.environ.get("COMFYUI_PYTHON", sys.executable))]
    home = Path(os.environ.get("DISTORCH_COMFYUI_HOME", Path.home() / ".cache" / "distorch" / "comfyui"))
    found = []
    for tree in home.glob("comfyui-*"):
        version = tree.name.removeprefix("comfyui-")
        python = home / f"venv-{version}" / "bin" / "python"
        if (tree / "main.py").is_file() and python.is_file():
            found.append(ComfyInstall(_version_of(tree), tree, str(python)))
    return sorted(found, key=lambda i: _version_key(i.version))


def _version_of(path: Path) -> str:
    match = re.search(r"__version__\s*=\s*[\"']([^\"']+)", (path / "comfyui_version.py").read_text()) \
        if (path / "comfyui_version.py").is_file() else None
    return match.group(1) if match else path.name


def _version_key(version: str) -> tuple:
    return tuple(int(p) if p.isdigit() else 0 for p in re.split(r"[.-]", version))


def install_pack_copy(custom_nodes: Path) -> Path:
    """Copies this repository into `custom_nodes` as a user's clone would sit there; returns the copy."""
    target = custom_nodes / PACK_DIR_NAME
    shutil.copytree(REPO, target, ignore=_NOT_COPIED)
    return target


@dataclass
class Result:
    status: int
    body: dict

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.body.get("status", {}).get("status_str") == "success"

    def error_text(self) -> str:
        return json.dumps(self.body)


class ComfyServer:
    def __init__(self, base: Path, install: ComfyInstall, extra_custom_nodes: tuple[Path, ...] = (),
                 extra_args: tuple[str, ...] = ()):
        self.base = base
        self.install = install
        self.extra_custom_nodes = extra_custom_nodes  # other packs to install beside ours (reference packs)
        self.extra_args = extra_args  # more ComfyUI command-line flags
        self.comfyui = install.path
        self.python = install.python
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "server.log"
        self.process = None
        # the entries of custom_nodes ComfyUI loads
        self.custom_nodes = [PACK_DIR_NAME, "distorch_test_nodes", *(pack.name for pack in extra_custom_nodes)]

    def prepare(self) -> None:
        custom = self.base / "custom_nodes"
        custom.mkdir(parents=True, exist_ok=True)
        install_pack_copy(custom)
        shutil.copytree(TEST_NODES, custom / "distorch_test_nodes")
        for pack in self.extra_custom_nodes:
            shutil.copytree(pack, custom / pack.name)
        (self.base / "user").mkdir(exist_ok=True)
        self._link_frontend()
        made = subprocess.run([self.python, str(REPO / "tests" / "comfyui" / "make_models.py"), "--comfyui",
                               str(self.comfyui), "--out", str(self.base / "models")],
                              capture_output=True, text=True, timeout=600)
        if made.returncode != 0:
            raise RuntimeError(f"could not build the tiny models:\n{made.stdout}\n{made.stderr}")

    def _link_frontend(self) -> None:
        """Serves the frontend this ComfyUI version ships (the `comfyui_frontend_package` in its venv) for the
        browser tests; an empty folder where that package is missing."""
        found = subprocess.run([self.python, "-c", "import comfyui_frontend_package as f, os; "
                                "print(os.path.join(os.path.dirname(f.__file__), 'static'))"],
                               capture_output=True, text=True, timeout=120)
        static = Path(found.stdout.strip()) if found.returncode == 0 else None
        if static is not None and (static / "index.html").is_file():
            (self.base / "frontend").symlink_to(static, target_is_directory=True)
        else:
            (self.base / "frontend").mkdir(exist_ok=True)

    @property
    def serves_frontend(self) -> bool:
        return (self.base / "frontend" / "index.html").is_file()

    def start(self) -> None:
        command = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                   "--base-directory", str(self.base), "--front-end-root", str(self.base / "frontend"),
                   "--database-url", f"sqlite:///{self.base / 'user' / 'comfyui.db'}",
                   "--disable-all-custom-nodes", "--whitelist-custom-nodes", *self.custom_nodes, *self.extra_args]
        log = open(self.log_path, "w")
        self.process = subprocess.Popen(command, cwd=self.comfyui, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 240
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited:\n{self.log()[-4000:]}")
            try:
                self.get("/object_info/DisTorchUNetLoader")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        raise RuntimeError(f"ComfyUI did not start:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=60) as response:
            return json.loads(response.read())

    def post(self, path: str, data: dict) -> tuple[int, dict]:
        request = urllib.request.Request(self.url + path, data=json.dumps(data).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def run(self, prompt: dict, timeout: float = 300) -> Result:
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": str(uuid.uuid4())})
        if status != 200:
            return Result(status, body)
        prompt_id = body["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("status_str") in ("success", "error"):
                return Result(200, entry)
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s")

    def latent(self, result: Result, node: str = "9") -> torch.Tensor:
        saved = result.body["outputs"][node]["latents"][0]
        path = self.base / "output" / saved["subfolder"] / saved["filename"]
        return load_file(str(path))["latent_tensor"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sampling_prompt(loader: dict, family: str, prefix: str, seed: int = 42, lora: float | None = None) -> dict:
    """Loader → (LoRA) → KSampler with zero conditioning → SaveLatent (node "9")."""
    pooled = 2048 if family == "sd3" else 0
    latent = ({"class_type": "EmptySD3LatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}}
              if family == "sd3" else
              {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 64, "height": 64, "length": 5,
                                                                    "batch_size": 1}})
    model = ["1", 0]
    prompt = {
        "1": loader,
        "2": {"class_type": "DisTorchTestZeroConditioning", "inputs": {"tokens": 8, "context_dim": 4096,
                                                                         "pooled_dim": pooled}},
        "3": latent,
    }
    if lora is not None:
        prompt["4"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name":
                                                                       "tiny_wan21_lora.safetensors",
                                                                       "strength_model": lora}}
        model = ["4", 0]
    prompt["5"] = {"class_type": "KSampler", "inputs": {"model": model, "positive": ["2", 0], "negative": ["2", 0],
                                                       "latent_image": ["3", 0], "seed": seed, "steps": 3, "cfg": 2.5,
                                                       "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}}
    prompt["9"] = {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": prefix}}
    return prompt


def core_unet(name: str) -> dict:
    return {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}}


def distorch_unet(name: str, virtual_vram_gb: float, expert: str = "", donor: str = "cpu",
                  compute: str = "cpu", stream_format: str | None = None) -> dict:
    """The DisTorch UNet loader's node; without `stream_format` the prompt leaves it out (it loads as stored)."""
    loader = {"class_type": "DisTorchUNetLoader", "inputs": {
        "unet_name": name, "weight_dtype": "default", "compute_device": compute, "virtual_vram_gb": virtual_vram_gb,
        "donor_device": donor, "expert_mode_allocations": expert}}
    if stream_format is not None:
        loader["inputs"]["stream_format"] = stream_format
    return loader
