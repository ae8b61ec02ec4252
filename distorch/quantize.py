"""`python -m distorch quantize IN.safetensors OUT.gguf`: a diffusion model as a Q8_0 GGUF, one tensor at a time.

The output is what ComfyUI-GGUF's tools make (its convert.py, then llama-quantize with its patch): the state-dict
names (a `model.diffusion_model.`/`model.` prefix stripped, `net.` when every name has it), its
`general.architecture`, `comfy.gguf.orig_shape.*` for tensors of more than 4 dims. ComfyUI-GGUF's loader, gguf-py's
GGUFReader and `gguf_loader.read_gguf` read it.

A tensor is quantized to Q8_0 when all of these hold (ComfyUI-GGUF's rules, where they are sound):
  - its name ends in `.weight`: llama.cpp quantizes only weights; raw parameters (`modulation`,
    `scale_shift_table`, `pos_embed`) are used as plain tensors, which a quantized tensor is not in ComfyUI-GGUF;
  - it has exactly 2 dims (the patch quantizes only 2-D tensors of image models: conv kernels stay);
  - it has more than 1024 elements (convert.py's threshold: small tensors save nothing);
  - its last dim is a multiple of 32 (Q8_0 rows are whole blocks; ComfyUI-GGUF reshapes other shapes only for
    SD1/SDXL convolutions, which its README says not to quantize, so nothing is reshaped here);
  - its name is not on the architecture's keep list (the patch's embedders, input and final layers).
Every other tensor keeps its stored type bit for bit (F32, F16, BF16), except BF16 tensors that ComfyUI-GGUF
would hand to a model as raw BF16 blocks where a plain tensor is needed (raw parameters, the architecture's
high-precision keys, tensors of more than 4 dims): those are widened to F32, which is exact.

Memory: the header is read once; then each tensor's bytes are read from the file (readinto, no mapping),
converted (Q8_0 in 1 M-element chunks) and written, so peak memory is one tensor plus its converted bytes.
The output is written under a temporary name beside OUT and renamed at the end: an error or Ctrl+C leaves no
half-written OUT, and the input is never opened for writing.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

import gguf
import torch
from gguf import GGMLQuantizationType, GGUFValueType, Keys, LlamaFileType

from .echo import echo
from .gguf_engine import gguf_module
from .headers import HeaderError, SafetensorsTensor, read_safetensors_index

_arch, _q8_0 = gguf_module("arch"), gguf_module("quantize")
IMAGE_ARCHITECTURES, guess_from_names, image_signatures = (
    _arch.IMAGE_ARCHITECTURES, _arch.guess_from_names, _arch.image_signatures)
Q8_0_BLOCK, Q8_0_BLOCK_BYTES, quantize_q8_0_into = _q8_0.Q8_0_BLOCK, _q8_0.Q8_0_BLOCK_BYTES, _q8_0.quantize_q8_0_into
GGUFFileWriter = gguf_module("writer").GGUFFileWriter

logger = logging.getLogger("distorch.quantize")

# Output types this command makes: only those with a torch quantizer bit-identical to gguf-py's.
# gguf-py has no quantizer for the K-quants (Q4_K, Q5_K, Q6_K), so none is offered.
QUANT_TYPES = {"q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0)}
QUANTIZATION_THRESHOLD = 1024  # ComfyUI-GGUF convert.py: tensors this small stay unquantized
MAX_NAME_BYTES = 127  # ComfyUI-GGUF's limit (its llama.cpp patch raises GGML_MAX_NAME to 128)
MAX_DIMS = 4  # GGUF tensor dims; more are stored flat with comfy.gguf.orig_shape
_SAFETENSORS_TYPES = {"F32": (torch.float32, GGMLQuantizationType.F32),
                      "F16": (torch.float16, GGMLQuantizationType.F16),
                      "BF16": (torch.bfloat16, GGMLQuantizationType.BF16)}
_PREFIXES = ("model.diffusion_model.", "model.")  # checkpoints: keep only the diffusion model's tensors
_UNIFORM_PREFIX = "net."  # stripped only when every name has it (ComfyUI-GGUF's rule)
_MAX_LISTED = 3  # problems named in one error line


@dataclass(frozen=True)
class _Rules:
    """Per-architecture names from ComfyUI-GGUF's llama.cpp patch (keep) and convert.py (high precision, ignore).

    A pattern starting with "." matches anywhere in a name; others match at its start or after a ".".
    """

    keep: tuple[str, ...] = ()  # never quantized
    exact: tuple[str, ...] = ()  # never quantized (whole names)
    high_precision: tuple[str, ...] = ()  # BF16 widened to F32 (used as plain tensors)
    ignore: tuple[str, ...] = ()  # not written at all


_FLUX_KEEP = ("txt_in.", "img_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")
_UNET_KEEP = ("class_embedding.", "time_embedding.", "add_embedding.", "time_embed.", "label_emb.", "conv_in.",
              "conv_out.")
_RULES = {
    "flux": _Rules(keep=_FLUX_KEEP),
    "hyvid": _Rules(keep=_FLUX_KEEP),
    "sd1": _Rules(keep=_UNET_KEEP, exact=("input_blocks.0.0.weight", "out.2.weight")),
    "sdxl": _Rules(keep=_UNET_KEEP, exact=("input_blocks.0.0.weight", "out.2.weight")),
    "sd3": _Rules(keep=("final_layer.", "time_text_embed.", "context_embedder.", "t_embedder.", "y_embedder.",
                        "x_embedder."), exact=("proj_out.weight", "pos_embed")),
    "aura": _Rules(keep=("t_embedder.", "init_x_linear."),
                   exact=("modF.1.weight", "cond_seq_linear.weight", "final_linear.weight")),
    "ltxv": _Rules(keep=("adaln_single.", "caption_projection.", "patchify_proj.", "proj_out."),
                   high_precision=("scale_shift_table",)),
    "wan": _Rules(keep=("patch_embedding.", "text_embedding.", "time_projection.", "time_embedding.", "img_emb.",
                        "head."), high_precision=(".modulation", "img_emb.emb_pos")),
    "hidream": _Rules(keep=("p_embedder.", "t_embedder.", "x_embedder.", "final_layer.", "caption_projection.",
                            ".ff_i.gate.weight"), high_precision=(".ff_i.gate.weight",)),
    "cosmos": _Rules(keep=("p_embedder.", "t_embedder.", "t_embedding_norm.", "x_embedder.", "pos_embedder.",
                           "final_layer."), high_precision=("pos_embedder",), ignore=("_extra_state", "accum_")),
    "lumina2": _Rules(keep=("t_embedder.", "x_embedder.", "final_layer.", "cap_embedder.", "context_refiner.",
                            "noise_refiner."), high_precision=("x_pad_token", "cap_pad_token")),
    # Not in ComfyUI-GGUF's patch: its input and output layers and embedders, as for Flux.
    "qwen_image": _Rules(keep=("img_in.", "txt_in.", "txt_norm.", "time_text_embed.", "norm_out.", "proj_out.")),
}
# ComfyUI-GGUF refuses these diffusers-format models: its loader needs the original key names.
_DIFFUSERS_KEYS = {"transformer_blocks.0.attn.norm_added_k.weight": "Flux",
                   "transformer_blocks.0.attn.add_q_proj.weight": "SD3",
                   "joint_transformer_blocks.3.ff_context.out_projection.weight": "AuraFlow"}


class QuantizeError(ValueError):
    """Input the quantize command refuses; the message is one line naming the file and the problem."""

    __module__ = "distorch.quantize"


@dataclass(frozen=True)
class TensorPlan:
    """One tensor of the output: its source bytes, its name there and its type."""

    name: str  # in the GGUF (prefix stripped)
    source: SafetensorsTensor
    qtype: GGMLQuantizationType
    reason: str  # why it is not quantized ("" when it is)

    @property
    def nbytes(self) -> int:
        if self.qtype == GGMLQuantizationType.Q8_0:
            return math.prod(self.source.shape) // Q8_0_BLOCK * Q8_0_BLOCK_BYTES
        return math.prod(self.source.shape) * (4 if self.qtype == GGMLQuantizationType.F32 else 2)


@dataclass(frozen=True)
class QuantizePlan:
    architecture: str
    detected: bool  # False: given with --arch
    tensors: tuple[TensorPlan, ...]
    dropped: int  # tensors outside the diffusion model (a checkpoint's VAE and text encoders) or ignored

    @property
    def output_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for tensor in self.tensors:
            counts[tensor.qtype.name] = counts.get(tensor.qtype.name, 0) + 1
        return counts


@dataclass(frozen=True)
class QuantizeResult:
    plan: QuantizePlan
    input_bytes: int
    output_bytes: int
    seconds: float


def quantize_file(source: str, target: str, qtype: str = "q8_0", architecture: str | None = None,
                  force: bool = False, progress: bool = False) -> QuantizeResult:
    """Writes `target` (GGUF) from the safetensors diffusion model `source`, one tensor at a time.

    Args:
        source: a .safetensors file (a bare diffusion model, or a checkpoint with a `model.diffusion_model.` part).
        target: the GGUF to write; never the input, replaced only with `force`.
        qtype: "q8_0".
        architecture: `general.architecture` to write; default: detected from the names as ComfyUI-GGUF does.
        force: replace an existing `target`.
        progress: show a progress bar (bytes read) on stderr.

    Raises:
        FileNotFoundError, HeaderError, QuantizeError: bad input, named in one line; nothing is written.
        OSError: reading or writing failed; the temporary file is removed.

    Example:
        >>> quantize_file("wan2.1_t2v_1.3B_bf16.safetensors", "wan2.1_t2v_1.3B-Q8_0.gguf")  # doctest: +SKIP
    """
    started = time.monotonic()
    if qtype not in QUANT_TYPES:
        raise QuantizeError(f"--type {echo(qtype)} is not offered; choose from {', '.join(QUANT_TYPES)}")
    _check_paths(source, target, force)
    plan = plan_quantization(source, read_safetensors_index(source), qtype, architecture)
    _check_space(target, plan.output_bytes)
    _write_atomically(source, target, plan, QUANT_TYPES[qtype][1], progress)
    result = QuantizeResult(plan, sum(t.source.nbytes for t in plan.tensors), os.path.getsize(target),
                            time.monotonic() - started)
    logger.info("distorch: quantized %s -> %s (%s): %s", source, target, plan.architecture,
                ", ".join(f"{name} {count}" for name, count in plan.type_counts().items()))
    return result


# -- checks ---------------------------------------------------------------------------------------

def _check_paths(source: str, target: str, force: bool) -> None:
    if not os.path.isfile(source):
        raise FileNotFoundError(f"{source}: no such file")
    with open(source, "rb") as handle:
        if handle.read(4) == b"GGUF":
            raise QuantizeError(f"{source}: is a GGUF file; quantize reads a .safetensors model")
    if os.path.isdir(target):
        raise QuantizeError(f"{target}: is a directory; name the .gguf file to write")
    folder = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(folder):
        raise QuantizeError(f"{target}: folder {folder} does not exist")
    if os.path.exists(target):
        if os.path.samefile(source, target):  # also a hard link or a symlink to the input
            raise QuantizeError(f"{target}: is the input file {source} (the same file); name another output")
        if not force:
            raise QuantizeError(f"{target}: exists; pass --force to replace it")


def _check_space(target: str, nbytes: int) -> None:
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(target))).free
    if nbytes > free:
        raise QuantizeError(f"{target}: needs {nbytes / 2**30:.2f} GB, the disk has {free / 2**30:.2f} GB free")


# -- which tensors, as what -----------------------------------------------------------------------

def plan_quantization(path: str, index: tuple[SafetensorsTensor, ...], qtype: str = "q8_0",
                      architecture: str | None = None) -> QuantizePlan:
    """Names, types and the architecture of the output, from the header alone."""
    named, dropped = _strip_prefix(index)
    if architecture is None:
        architecture, detected = _detect(path, [name for name, _ in named]), True
    elif architecture not in IMAGE_ARCHITECTURES:
        raise QuantizeError(f"--arch {echo(architecture)} is not one ComfyUI-GGUF loads; choose from "
                            f"{', '.join(sorted(IMAGE_ARCHITECTURES))}")
    else:
        detected = False
    rules = _RULES.get(architecture, _Rules())
    kept = [(name, t) for name, t in named if not any(pattern in name for pattern in rules.ignore)]
    _check_tensors(path, kept)
    target = QUANT_TYPES[qtype][0]
    tensors = tuple(_plan_tensor(name, tensor, target, rules) for name, tensor in kept)
    return QuantizePlan(architecture, detected, tensors, dropped + len(named) - len(kept))


def _strip_prefix(index) -> tuple[list[tuple[str, SafetensorsTensor]], int]:
    names = [t.name for t in index]
    for prefix in _PREFIXES:
        if any(name.startswith(prefix) for name in names):
            kept = [(t.name[len(prefix):], t) for t in index if t.name.startswith(prefix)]
            return kept, len(index) - len(kept)
    if names and all(name.startswith(_UNIFORM_PREFIX) for name in names):
        return [(t.name[len(_UNIFORM_PREFIX):], t) for t in index], 0
    return [(t.name, t) for t in index], 0


def _detect(path: str, names: list[str]) -> str:
    found = guess_from_names(names)
    if found in IMAGE_ARCHITECTURES:
        return found
    present = set(names)
    for key, family in _DIFFUSERS_KEYS.items():
        if key in present:
            raise QuantizeError(f"{path}: a {family} model in diffusers format (tensor {key!r}); ComfyUI-GGUF loads "
                                f"the original key format: save it with ComfyUI's ModelSave node first")
    looked_for = "; ".join(f"{arch}: {' + '.join(keys)}" for arch, keys in image_signatures())
    raise QuantizeError(f"{path}: no diffusion-model architecture recognised from its {len(names)} tensor names "
                        f"(looked for {looked_for}); pass --arch if it is one of them")


def _check_tensors(path: str, named: list[tuple[str, SafetensorsTensor]]) -> None:
    """Every tensor this command cannot write, in one line."""
    if not named:
        raise QuantizeError(f"{path}: holds no tensors to write")
    dtypes = [f"{echo(n)} ({t.dtype})" for n, t in named if t.dtype not in _SAFETENSORS_TYPES]  # a checked name
    if dtypes:
        raise QuantizeError(f"{path}: {len(dtypes)} of its tensors are not F32, F16 or BF16: "
                            f"{_listed(dtypes)}; quantize a bf16, fp16 or fp32 file (fp8 files carry scales)")
    long_names = [f"{echo(n)} ({len(n.encode())} bytes)" for n, _ in named if len(n.encode()) > MAX_NAME_BYTES]
    if long_names:
        raise QuantizeError(f"{path}: {len(long_names)} of its tensor names are longer than the {MAX_NAME_BYTES} bytes "
                            f"GGUF tools accept: {_listed(long_names)}")
    scalars = [echo(n) for n, t in named if not t.shape]
    if scalars:
        raise QuantizeError(f"{path}: {len(scalars)} of its tensors are 0-dimensional, which GGUF cannot store: "
                            f"{_listed(scalars)}")


def _listed(items: list[str]) -> str:
    more = f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return ", ".join(items[:_MAX_LISTED]) + more


def _plan_tensor(name: str, tensor: SafetensorsTensor, target: GGMLQuantizationType, rules: _Rules) -> TensorPlan:
    reason = _keep_reason(name, tensor.shape, rules)
    if not reason:
        return TensorPlan(name, tensor, target, "")
    stored = _SAFETENSORS_TYPES[tensor.dtype][1]
    if stored == GGMLQuantizationType.BF16 and _needs_plain(name, tensor.shape, rules):
        return TensorPlan(name, tensor, GGMLQuantizationType.F32, reason + "; BF16 widened to F32 (a plain tensor)")
    return TensorPlan(name, tensor, stored, reason)


def _keep_reason(name: str, shape: tuple[int, ...], rules: _Rules) -> str:
    """Why a tensor stays unquantized ("" when it is quantized)."""
    if not name.endswith(".weight"):
        return "not a weight"
    if len(shape) != 2:
        return f"{len(shape)}-D"
    if math.prod(shape) <= QUANTIZATION_THRESHOLD:
        return f"{math.prod(shape)} elements"
    if shape[-1] % Q8_0_BLOCK:
        return f"last dim {shape[-1]} not a multiple of {Q8_0_BLOCK}"
    if name in rules.exact or any(_matches(name, pattern) for pattern in rules.keep + rules.high_precision):
        return "kept by the architecture's rules"
    return ""


def _needs_plain(name: str, shape: tuple[int, ...], rules: _Rules) -> bool:
    """ComfyUI-GGUF turns only F32/F16 into plain tensors (and 1-D BF16); other BF16 stay raw blocks that only its
    layers' weights can use."""
    if len(shape) <= 1:
        return False
    raw_parameter = not (name.endswith(".weight") or name.endswith(".bias"))
    return raw_parameter or len(shape) > MAX_DIMS or any(_matches(name, p) for p in rules.high_precision)


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("."):
        return pattern in name
    return name.startswith(pattern) or f".{pattern}" in name


# -- writing --------------------------------------------------------------------------------------

def _write_atomically(source: str, target: str, plan: QuantizePlan, file_type: LlamaFileType, progress: bool) -> None:
    folder, base = os.path.split(os.path.abspath(target))
    handle, partial = tempfile.mkstemp(prefix=f".{base}.", suffix=".partial", dir=folder)
    os.close(handle)
    try:
        _write(source, partial, plan, file_type, progress)
        os.replace(partial, target)
    except BaseException:  # also Ctrl+C: no half-written file stays behind
        if os.path.exists(partial):
            os.remove(partial)
        raise


def _write(source: str, path: str, plan: QuantizePlan, file_type: LlamaFileType, progress: bool) -> None:
    from tqdm import tqdm

    writer = GGUFFileWriter(path, architecture=plan.architecture)
    writer.add_metadata(Keys.General.QUANTIZATION_VERSION, gguf.GGML_QUANT_VERSION, GGUFValueType.UINT32)
    writer.add_metadata(Keys.General.FILE_TYPE, int(file_type), GGUFValueType.UINT32)
    total = sum(t.source.nbytes for t in plan.tensors)
    with open(source, "rb", buffering=0) as handle, \
            tqdm(total=total, unit="B", unit_scale=True, desc="distorch quantize", disable=not progress) as bar:
        for tensor in plan.tensors:
            writer.add_tensor(tensor.name, _TensorSource(source, handle, tensor, bar), qtype=tensor.qtype,
                              shape=tensor.source.shape)
        writer.write()


class _TensorSource:
    """Called by the writer when it is this tensor's turn: reads its bytes and converts them."""

    def __init__(self, path: str, handle, tensor: TensorPlan, bar) -> None:
        self.path = path
        self.handle = handle  # the input file, open for reading; the caller closes it
        self.tensor = tensor
        self.bar = bar

    def __call__(self) -> torch.Tensor:
        tensor = self.tensor
        values = read_tensor(self.path, self.handle, tensor.source)
        if tensor.qtype == GGMLQuantizationType.Q8_0:
            blocks = torch.empty(values.numel() // Q8_0_BLOCK, Q8_0_BLOCK_BYTES, dtype=torch.uint8)
            quantize_q8_0_into(values, blocks)
            values = blocks  # the source bytes go here: one tensor at a time
        self.bar.update(tensor.source.nbytes)
        return values


def read_tensor(path: str, handle, tensor: SafetensorsTensor) -> torch.Tensor:
    """One tensor of a safetensors file, read from its byte range into fresh memory (no mapping of the file)."""
    raw = torch.empty(tensor.nbytes, dtype=torch.uint8)
    view = memoryview(raw.numpy())
    handle.seek(tensor.offset)
    done = 0
    while done < tensor.nbytes:
        count = handle.readinto(view[done:])
        if not count:
            raise QuantizeError(f"{path}: ended at byte {tensor.offset + done} inside tensor {echo(tensor.name)} "
                                f"(the file changed while it was read)")
        done += count
    return raw.view(_SAFETENSORS_TYPES[tensor.dtype][0]).view(tensor.shape)


__all__ = ["QUANT_TYPES", "HeaderError", "QuantizeError", "QuantizePlan", "QuantizeResult", "TensorPlan",
           "plan_quantization", "quantize_file", "read_tensor"]
