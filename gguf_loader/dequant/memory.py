"""Output allocation for dequantized tensors.

On the CPU the cost of a fresh multi-megabyte output is dominated by first-touch page faults: torch's
allocator maps 4 KiB pages that the kernel zeroes one fault at a time, which on a 2-vCPU VM costs
about as much as the whole dequantization (28 ms for a 64 MiB float32 output). Linux can instead
back an anonymous mapping with transparent huge pages and populate it with `madvise`
(MADV_POPULATE_WRITE, Linux 5.14+): 7 ms for the same 64 MiB from one thread, 4 ms when the range is
split over torch's threads (ctypes releases the GIL during the call). Everything else (other
platforms, small outputs, CUDA) uses `torch.empty`.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch

logger = logging.getLogger("distorch.gguf")

_HUGE_OUTPUT_BYTES = 8 << 20  # below this, torch's allocator (often recycling heap memory) wins
_MADV_POPULATE_WRITE = 23  # linux/mman.h; not exposed by the mmap module
_HUGE_PAGE = 2 << 20
_MAX_POPULATE_THREADS = 8


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor, pre-faulted with huge pages for large CPU outputs where possible."""
    numel = 1
    for dim in shape:
        numel *= dim
    nbytes = numel * _itemsize(dtype)
    if device.type != "cpu" or nbytes < _HUGE_OUTPUT_BYTES or not _huge_pages_available():
        return torch.empty(shape, dtype=dtype, device=device)
    flat = _populated_huge_mapping(nbytes)
    if flat is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return flat.view(dtype).view(shape)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# None until first checked; False after the kernel refused once (one failed syscall per call is waste).
_huge_pages_ok: bool | None = None


def _huge_pages_available() -> bool:
    global _huge_pages_ok
    if _huge_pages_ok is None:
        _huge_pages_ok = _transparent_huge_pages_enabled()
    return _huge_pages_ok


def _transparent_huge_pages_enabled() -> bool:
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as handle:
            mode = handle.read()
    except OSError:
        return False
    return "[always]" in mode or "[madvise]" in mode


def _populated_huge_mapping(nbytes: int) -> torch.Tensor | None:
    """A uint8 tensor over an anonymous THP-advised mapping, populated; None if the kernel refuses."""
    global _huge_pages_ok
    try:
        buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        buffer.madvise(mmap.MADV_HUGEPAGE)
        flat = torch.frombuffer(buffer, dtype=torch.uint8)  # holds the mapping alive
        if not _populate_in_parallel(flat):
            buffer.madvise(_MADV_POPULATE_WRITE)
    except (OSError, ValueError):
        _huge_pages_ok = False
        logger.debug("distorch.gguf: huge-page outputs unavailable; using torch.empty")
        return None
    return flat


def _populate_in_parallel(flat: torch.Tensor) -> bool:
    """MADV_POPULATE_WRITE over `flat`, one huge-page-aligned slice per torch thread; False on failure."""
    madvise = _libc_madvise()
    if madvise is None:
        return False
    nbytes = flat.numel()
    parts = max(1, min(torch.get_num_threads(), _MAX_POPULATE_THREADS, nbytes // _HUGE_PAGE))
    step = -(-nbytes // parts // _HUGE_PAGE) * _HUGE_PAGE
    ranges = [(flat.data_ptr() + start, min(step, nbytes - start)) for start in range(0, nbytes, step)]
    pending = [_populate_pool().submit(madvise, address, size, _MADV_POPULATE_WRITE) for address, size in ranges[1:]]
    results = [madvise(*ranges[0], _MADV_POPULATE_WRITE)] + [job.result() for job in pending]
    return all(result == 0 for result in results)


_madvise = None  # libc's madvise through ctypes, once loaded
_pool: ThreadPoolExecutor | None = None  # workers for the other slices; created on first large output


def _libc_madvise():
    global _madvise
    if _madvise is None:
        try:
            function = ctypes.CDLL(None, use_errno=True).madvise
        except (OSError, AttributeError):
            return None
        function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        function.restype = ctypes.c_int
        _madvise = function
    return _madvise


def _populate_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(_MAX_POPULATE_THREADS - 1, thread_name_prefix="distorch-gguf-populate")
    return _pool


def frombuffer_readonly(buffer, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """`torch.frombuffer` over a read-only buffer (a read-only mmap) without torch's warning.

    The tensor keeps `buffer` alive. Writing to it crashes the process (the pages are read-only),
    which is why callers only ever hand out views that nothing writes to.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(buffer, dtype=dtype)
