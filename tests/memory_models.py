"""Models of a few hundred MB loaded from a file the way users load them, and RSS read the way the OS sees it.

Sources (`load_model(kind, path, ...)`):
- "safetensors": read with safetensors and copied into the model's own tensors, as ComfyUI loads a
  checkpoint: ordinary RAM, one storage per weight.
- "safetensors_mmap": the tensors `safetensors.torch.load_file` returns, assigned to the model: views of a
  private mapping of the file (file-backed).
- "gguf": a GGUF read by gguf_loader (read-only shared mapping), run by the GGUF layers: file-backed, as
  the DisTorch GGUF loader leaves it. QKV weights are Q8_0 (GGMLTensors), other Linear weights F16 (cheap to
  run on a CPU), the rest F32.
"""

import gc
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file, save_file

from distorch.pages import trim_heap
from distorch.toy import ToyDiT
from gguf_loader import make_ops, read_gguf, write_gguf

SOURCES = ("safetensors", "gguf")
MIB = 1 << 20


def rss() -> int:
    """Resident bytes of this process after a full collection and giving the C heap's free pages back."""
    gc.collect()
    trim_heap()
    return psutil.Process().memory_info().rss


def write_model(kind: str, path: Path, dim: int, depth: int, seed: int = 0) -> Path:
    """A seeded ToyDiT written as `kind`; returns the file."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ToyDiT(dim, depth, heads=max(1, dim // 64))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    del model
    if kind == "gguf":
        qtypes = {k: ("Q8_0" if k.endswith("qkv.weight") else "F16") for k, v in state.items()
                  if k.endswith(".weight") and v.ndim == 2 and v.shape[-1] % 32 == 0}
        write_gguf(path, state, qtypes=qtypes)
    else:
        save_file(state, str(path))
    return path


def load_model(kind: str, path: Path, dim: int, depth: int) -> ToyDiT:
    """The model of `path` as `kind` describes it (see the module docstring)."""
    heads = max(1, dim // 64)
    if kind == "safetensors":
        model = ToyDiT(dim, depth, heads)
        state = load_file(str(path))
        model.load_state_dict(state)
        del state
        return model
    with torch.device("meta"):
        model = ToyDiT(dim, depth, heads, ops=make_ops()) if kind == "gguf" else ToyDiT(dim, depth, heads)
    state = read_gguf(path).tensors if kind == "gguf" else load_file(str(path))
    model.load_state_dict(state, assign=True)
    return model


def touch(model: ToyDiT) -> None:
    """Reads every weight, so every page of a file-backed model is in RSS before a baseline is taken."""
    with torch.inference_mode():
        for tensor in list(model.parameters()) + list(model.buffers()):
            tensor.as_subclass(torch.Tensor).view(-1)[::1024].sum()


def forward(model: ToyDiT) -> torch.Tensor:
    with torch.inference_mode():
        return model(inputs(model), torch.tensor([500.0]))


def inputs(model: ToyDiT) -> torch.Tensor:
    return torch.randn(1, 4, model.patch_in.in_features, generator=torch.Generator().manual_seed(0))


def model_bytes(model: ToyDiT) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
