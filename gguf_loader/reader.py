"""GGUF reader: the validated header (gguf_header.py) plus zero-copy tensor views of the mapped file."""

from __future__ import annotations

import logging
import mmap
import os

import torch
from gguf import GGML_QUANT_SIZES

from .dequant.memory import frombuffer_readonly
from .errors import echo
from .gguf_header import GGUFHeader, TensorInfo, _close_quietly, _map, _Parser, read_gguf_header
from .tensor import GGMLMeta, GGMLTensor
from .torch_dtypes import PLAIN_TORCH_DTYPES

logger = logging.getLogger("distorch.gguf")


class GGUFFile:
    """An open GGUF file: its header plus tensors viewing the memory-mapped data.

    Float tensors (F32, F16, BF16, and the integer/F64 types) are plain typed views in their
    logical shape; everything else is a GGMLTensor over the raw blocks. Views are read-only unless
    the file was opened with `writable=True` (copy-on-write). Each tensor keeps the mapping alive,
    so tensors stay valid after `close()`, which only drops this object's references.
    """

    def __init__(self, header: GGUFHeader, tensors: dict[str, torch.Tensor], mapping: mmap.mmap | None) -> None:
        self.header = header  # metadata and tensor table
        self.tensors = tensors  # name -> tensor (empty when opened header-only)
        self._mapping = mapping  # the file mapping; the tensors hold it too

    path = property(lambda self: self.header.path)
    version = property(lambda self: self.header.version)
    alignment = property(lambda self: self.header.alignment)
    metadata = property(lambda self: self.header.metadata)
    metadata_types = property(lambda self: self.header.metadata_types)
    architecture = property(lambda self: self.header.architecture)
    arch = property(lambda self: self.header.arch)
    tensor_infos = property(lambda self: self.header.tensor_infos)
    data_offset = property(lambda self: self.header.data_offset)
    file_size = property(lambda self: self.header.file_size)
    qtype_counts = property(lambda self: self.header.qtype_counts)

    def qtype_summary(self) -> str:
        return self.header.qtype_summary()

    def tensor_info(self, name: str) -> TensorInfo:
        return self.header.tensor_info(name)

    def close(self) -> None:
        """Drops this object's tensors and mapping. The file stays mapped while any tensor taken
        from it is alive (each holds the mapping) and is unmapped when the last one is freed."""
        self.tensors = {}
        self._mapping = None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"GGUFFile({self.path!r}, v{self.version}, arch={self.architecture!r}, "
                f"{len(self.tensor_infos)} tensors: {self.qtype_summary()})")


def read_gguf(path: str | os.PathLike, tensors: bool = True, writable: bool = False) -> GGUFFile:
    """Opens a GGUF file: metadata, architecture and zero-copy tensors.

    Args:
        path: a .gguf file (v2 or v3, little-endian).
        tensors: False reads only the header (no mapping is kept, `.tensors` is empty).
        writable: map copy-on-write so tensors can be modified in memory (the file never changes).
            Read-only views (the default) crash the process if written to.

    Raises:
        FileNotFoundError: no such file.
        GGUFError: the file is malformed, truncated or unsupported.

    Example:
        >>> with read_gguf("flux1-dev-Q4_K_S.gguf") as f:  # doctest: +SKIP
        ...     w = f.tensors["double_blocks.0.img_attn.qkv.weight"]
        ...     w.qtype_name, w.shape, dequantize(w, torch.bfloat16).shape
        ('Q4_K', torch.Size([9216, 3072]), torch.Size([9216, 3072]))
    """
    path = os.fspath(path)
    if not tensors:
        return GGUFFile(read_gguf_header(path), {}, None)
    mapping = _map(path, writable)
    try:
        header = _Parser(path, mapping).header()
    except BaseException:
        _close_quietly(mapping)
        raise
    views = _tensor_views(header, mapping, writable)
    logger.info("distorch.gguf: %s: %d tensors, architecture %s; gguf qtypes: %s", os.path.basename(path),
                len(header.tensor_infos), header.architecture, header.qtype_summary())
    return GGUFFile(header, views, mapping)


def _tensor_views(header: GGUFHeader, mapping: mmap.mmap, writable: bool) -> dict[str, torch.Tensor]:
    if not header.tensor_infos:
        return {}
    base = torch.frombuffer(mapping, dtype=torch.uint8) if writable else frombuffer_readonly(mapping)
    return {info.name: _tensor_view(base, info, header.path) for info in header.tensor_infos}


def _tensor_view(base: torch.Tensor, info: TensorInfo, path: str) -> torch.Tensor:
    raw = base[info.offset:info.offset + info.nbytes]
    dtype = PLAIN_TORCH_DTYPES.get(info.qtype)
    if dtype is None:
        meta = GGMLMeta(info.qtype, torch.Size(info.shape), f"{path}: tensor {echo(info.name)}")
        return GGMLTensor.from_validated(raw.view(info.byte_shape), meta)
    itemsize = GGML_QUANT_SIZES[info.qtype][1]
    if info.offset % itemsize:
        raw = raw.clone()  # legal with general.alignment < itemsize; typed views need aligned storage
    return raw.view(dtype).view(info.shape)
