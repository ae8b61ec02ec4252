"""GGMLTensor: the raw bytes of a quantized tensor, with its GGML type and logical shape.

Contract (what the DisTorch streamer and ComfyUI rely on):

* The tensor *is* its uint8 bytes: `size()`, `stride()`, `numel()`, `element_size()`, `nbytes`,
  `untyped_storage()`, `storage_offset()`, `dtype` (uint8) and `dim()` describe the raw bytes, so
  byte-level code (copies into flat buffers, `param.data = view`) works unchanged.
* `shape` is the *logical* shape (what the layer expects), because ComfyUI's model detection reads
  `state_dict[key].shape`. `qtype`, `qtype_name` and `logical_shape` carry the rest.
* Moves keep the metadata: `.to(device, non_blocking=...)`, `.cpu()`, `.cuda()`, `.detach()`,
  `.clone()`, `.pin_memory()`, `.contiguous()`, `.data`, `copy.deepcopy`, `nn.Parameter(t)`,
  `Module.to()`; `param.data = other_uint8` re-points the bytes and keeps the Python object.
* Casting to another dtype (`.to(torch.float16)`, `.float()`, `.half()`, ...) raises TypeError: the
  bytes are not numbers. Use `dequantize()`.
* Every other torch op runs on the raw bytes and returns plain tensors, so no result ever carries
  metadata that no longer describes it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from gguf import GGMLQuantizationType

from .errors import GGUFError
from .qtypes import as_qtype, nbytes_of_elements

_NoTorchFunction = torch._C.DisableTorchFunctionSubclass


@dataclass(frozen=True, slots=True)
class GGMLMeta:
    """Per-tensor metadata: immutable, shared by every view that describes the same bytes."""

    qtype: GGMLQuantizationType
    shape: torch.Size
    source: str = field(default="", compare=False)  # "model.gguf: tensor 'w'" for messages; "" if built in memory

    def describe(self) -> str:
        """Where the tensor came from and what it is, the prefix of its error messages."""
        what = f"{self.qtype.name} tensor of shape {tuple(self.shape)}"
        return f"{self.source} ({what})" if self.source else what


class GGMLTensor(torch.Tensor):
    """Raw GGML blocks (uint8) that know their type and logical shape.

    Args:
        data: uint8 tensor holding exactly the tensor's blocks, in any shape (usually the byte
            shape `(*shape[:-1], row_bytes)`). It is aliased, not copied.
        qtype: GGMLQuantizationType, or its name ("Q8_0").
        shape: the logical shape.

    Example:
        >>> raw = torch.zeros(4, 34, dtype=torch.uint8)            # 4 rows of one Q8_0 block
        >>> t = GGMLTensor(raw, "Q8_0", (4, 32))
        >>> t.shape, t.size(), t.qtype_name
        (torch.Size([4, 32]), torch.Size([4, 34]), 'Q8_0')
    """

    _ggml: GGMLMeta

    @staticmethod
    def __new__(cls, data: torch.Tensor, qtype, shape, requires_grad: bool = False) -> GGMLTensor:
        meta = GGMLMeta(as_qtype(qtype), torch.Size(int(d) for d in shape))
        raw = _plain(data)
        _check_bytes(raw, meta)
        tensor = torch.Tensor._make_subclass(cls, raw, requires_grad)
        tensor._ggml = meta
        return tensor

    def __init__(self, *args, **kwargs) -> None:  # everything happens in __new__
        super().__init__()

    @classmethod
    def from_validated(cls, raw: torch.Tensor, meta: GGMLMeta) -> GGMLTensor:
        """Wraps a plain uint8 tensor whose size the caller has already checked (the reader's fast path)."""
        tensor = torch.Tensor._make_subclass(cls, raw, False)
        tensor._ggml = meta
        return tensor

    # -- metadata -------------------------------------------------------------------------------

    @property
    def shape(self) -> torch.Size:  # type: ignore[override]
        """The logical shape (not the byte shape; `size()` gives that)."""
        return self._ggml.shape

    @property
    def logical_shape(self) -> torch.Size:
        return self._ggml.shape

    @property
    def qtype(self) -> GGMLQuantizationType:
        return self._ggml.qtype

    @property
    def qtype_name(self) -> str:
        return self._ggml.qtype.name

    # Names ComfyUI-GGUF uses, so code written against it keeps working.
    tensor_type = qtype
    tensor_shape = logical_shape

    @property
    def ggml_meta(self) -> GGMLMeta:
        return self._ggml

    def as_plain(self) -> torch.Tensor:
        """The raw bytes as a plain uint8 tensor (an alias, no copy)."""
        return _plain(self)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:  # type: ignore[override]
        """The values as a plain tensor of `dtype` in the logical shape, on this tensor's device."""
        from .dequant import dequantize_raw

        try:
            return dequantize_raw(_plain(self), self._ggml.qtype, self._ggml.shape, dtype)
        except GGUFError as error:
            raise GGUFError(f"{self._ggml.describe()}: {error}") from None

    def __repr__(self, *, tensor_contents=None) -> str:
        with _NoTorchFunction():
            nbytes, device = self.numel(), self.device
        return (f"GGMLTensor({self.qtype_name}, shape={tuple(self._ggml.shape)}, bytes={nbytes}, "
                f"device={device})")

    def __deepcopy__(self, memo):
        if id(self) in memo:
            return memo[id(self)]
        with _NoTorchFunction():
            raw = _plain(self).clone()
        result = GGMLTensor.from_validated(raw, self._ggml)
        memo[id(self)] = result
        extra = {k: v for k, v in self.__dict__.items() if k != "_ggml"}
        result.__dict__.update(copy.deepcopy(extra, memo))
        return result

    # -- torch function protocol ----------------------------------------------------------------

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is not None:
            return handler(func, args, kwargs)
        with _NoTorchFunction():
            return func(*args, **kwargs)


def is_quantized(tensor) -> bool:
    """True for GGMLTensor weights (raw blocks that must be dequantized before use)."""
    return isinstance(tensor, GGMLTensor)


def dequantize(tensor: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A plain tensor of `dtype` in the logical shape, on the tensor's own device: the one call that turns any
    weight (GGMLTensor or plain) into a usable tensor.

    GGMLTensors are dequantized (float32: bit-identical to gguf-py; float16/bfloat16: the float32
    result rounded once). Plain tensors are converted with `.to(dtype)`, which returns the same
    tensor when it already has that dtype: F16/BF16 weights read from a file stay zero-copy views.

    Example:
        >>> w = dequantize(f.tensors["blk.0.attn_q.weight"], torch.bfloat16)  # doctest: +SKIP
    """
    if isinstance(tensor, GGMLTensor):
        return tensor.dequantize(dtype)
    return tensor.to(dtype)


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    if type(tensor) is torch.Tensor:
        return tensor
    with _NoTorchFunction():
        return tensor.as_subclass(torch.Tensor)


def _check_bytes(raw: torch.Tensor, meta: GGMLMeta) -> None:
    if raw.dtype != torch.uint8:
        raise TypeError(f"GGMLTensor data must be uint8 bytes, got {raw.dtype}")
    expected = nbytes_of_elements(meta.shape.numel(), meta.qtype)
    if raw.numel() != expected:
        raise ValueError(f"{meta.qtype.name} tensor of shape {tuple(meta.shape)} needs {expected} bytes, "
                         f"got {raw.numel()}")


# -- handlers -----------------------------------------------------------------------------------

def _keep_meta(func, args, kwargs):
    """Moves and copies of the bytes (same size, still uint8) keep the source's metadata."""
    source = args[0]
    with _NoTorchFunction():
        result = func(*args, **kwargs)
        if not isinstance(source, GGMLTensor) or not isinstance(result, torch.Tensor) or isinstance(result, GGMLTensor):
            return result
        if result.dtype != torch.uint8 or result.size() != source.size():
            return result
        wrapped = result.as_subclass(GGMLTensor)
    wrapped._ggml = source._ggml
    return wrapped


def _cast_error(tensor, dtype) -> TypeError:
    meta = tensor._ggml
    return TypeError(f"cannot cast a GGMLTensor ({meta.qtype.name} blocks, shape {tuple(meta.shape)}) to {dtype}: "
                     f"its bytes are quantized; use gguf_loader.dequantize(tensor, {dtype}) instead")


def _to(func, args, kwargs):
    _, dtype, _, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
    if dtype is not None and dtype != torch.uint8 and isinstance(args[0], GGMLTensor):
        raise _cast_error(args[0], dtype)
    return _keep_meta(func, args, kwargs)


def _type(func, args, kwargs):
    target = args[1] if len(args) > 1 else kwargs.get("dtype")
    if target is not None and isinstance(args[0], GGMLTensor) and target not in (torch.uint8, "torch.ByteTensor"):
        raise _cast_error(args[0], target)
    return _keep_meta(func, args, kwargs)


def _refuse_cast(dtype):
    def handler(func, args, kwargs):
        if isinstance(args[0], GGMLTensor):
            raise _cast_error(args[0], dtype)
        with _NoTorchFunction():
            return func(*args, **kwargs)

    return handler


def _type_as(func, args, kwargs):
    other = args[1] if len(args) > 1 else kwargs["other"]
    if isinstance(args[0], GGMLTensor) and other.dtype != torch.uint8:
        raise _cast_error(args[0], other.dtype)
    return _keep_meta(func, args, kwargs)


def _copy_into(func, args, kwargs):
    target, source = args[0], args[1] if len(args) > 1 else kwargs["src"]
    if isinstance(target, GGMLTensor):
        if source.dtype != torch.uint8:
            raise TypeError(f"cannot copy {source.dtype} values into {target!r}; it holds raw "
                            f"{target.qtype_name} bytes")
        if isinstance(source, GGMLTensor) and source._ggml != target._ggml:
            raise ValueError(f"cannot copy {source!r} into {target!r}: different type or shape")
    with _NoTorchFunction():
        return func(*args, **kwargs)


def _dequantize(func, args, kwargs):
    if isinstance(args[0], GGMLTensor):
        return args[0].dequantize()
    with _NoTorchFunction():
        return func(*args, **kwargs)


def _build_handlers() -> dict:
    T = torch.Tensor
    handlers = {T.to: _to, T.type: _type, T.type_as: _type_as, T.copy_: _copy_into,
                T.dequantize: _dequantize, torch.dequantize: _dequantize}
    for name in ("cpu", "cuda", "xpu", "mps", "detach", "clone", "pin_memory", "contiguous"):
        if hasattr(T, name):
            handlers[getattr(T, name)] = _keep_meta
    handlers[T.data.__get__] = _keep_meta
    casts = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16, "double": torch.float64,
             "int": torch.int32, "long": torch.int64, "short": torch.int16, "char": torch.int8, "bool": torch.bool,
             "cfloat": torch.complex64, "cdouble": torch.complex128}
    for name, dtype in casts.items():
        handlers[getattr(T, name)] = _refuse_cast(dtype)
    return handlers


_HANDLERS = _build_handlers()
