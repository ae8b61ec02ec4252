"""What the operating system does with our pages: which weights lie in a file mapping, and giving pages back.

Three facts the one-copy staging relies on (Linux; elsewhere nothing is known to be file-backed and
nothing is given back early, which costs RAM but never correctness):

* A weight whose bytes lie in a mapping of a regular file is *file-backed*: its pages belong to the page
  cache, the kernel can reclaim them and read them again on demand. A GGUF opened by `gguf_loader.read_gguf`
  and the tensors of `safetensors.torch.load_file` are such views. The disk tier streams these blocks in place.
* Copying a file-backed block into a staging buffer leaves the mapping's pages in the process's RSS until
  they are dropped (`release_file_pages`), even though nothing reads them any more.
* glibc keeps freed heap chunks below its adaptive mmap threshold (up to 32 MB); staging frees one source
  tensor per weight, so without `trim_heap` those sources stay in RSS and the peak is two copies.
"""

import bisect
import ctypes
import logging
import mmap
import sys
from dataclasses import dataclass

logger = logging.getLogger("distorch.pages")

PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4
_MADV_PAGEOUT = 21  # Linux 5.4+; reclaims clean pages, swaps or keeps written ones (never loses data)
# Paths that name memory, not a file on disk: their pages cannot be dropped and re-read.
_NOT_FILES = ("/dev/", "/memfd:", "/SYSV", "/proc/")


@dataclass(frozen=True)
class FileMapping:
    """One mapping of a regular file in this process (address range and access, from /proc/self/maps)."""

    start: int
    end: int
    shared: bool
    writable: bool
    path: str

    @property
    def clean(self) -> bool:
        """Every page equals the file's bytes: writes reach the file (shared) or are impossible (read-only)."""
        return self.shared or not self.writable


class MappingTable:
    """The file mappings of this process at one moment, searchable by address."""

    def __init__(self, mappings: list[FileMapping]):
        self._mappings = sorted(mappings, key=lambda m: m.start)
        self._starts = [m.start for m in self._mappings]

    @classmethod
    def read(cls) -> "MappingTable":
        """Reads /proc/self/maps; an empty table where there is none (not Linux)."""
        if not sys.platform.startswith("linux"):
            return cls([])
        try:
            with open("/proc/self/maps") as handle:
                lines = handle.readlines()
        except OSError:
            return cls([])
        return cls(_merge_adjacent([m for m in map(_parse_line, lines) if m is not None]))

    def file_mapping(self, address: int, nbytes: int) -> FileMapping | None:
        """The file mapping holding all of [address, address + nbytes), or None (anonymous memory, a GPU)."""
        index = bisect.bisect_right(self._starts, address) - 1
        if index < 0 or nbytes <= 0:
            return None
        mapping = self._mappings[index]
        return mapping if address + nbytes <= mapping.end else None


def _parse_line(line: str) -> FileMapping | None:
    fields = line.split(maxsplit=5)
    if len(fields) < 6:
        return None
    path = fields[5].strip()
    if not path.startswith("/") or path.startswith(_NOT_FILES) or path.endswith("(deleted)"):
        return None
    low, high = (int(x, 16) for x in fields[0].split("-"))
    perms = fields[1]
    return FileMapping(low, high, shared=perms[3] == "s", writable=perms[1] == "w", path=path)


def _merge_adjacent(mappings: list[FileMapping]) -> list[FileMapping]:
    """One entry per contiguous run of one file: the kernel splits a mapping where page flags differ."""
    merged: list[FileMapping] = []
    for mapping in sorted(mappings, key=lambda m: m.start):
        last = merged[-1] if merged else None
        if last is not None and (last.end, last.path, last.shared, last.writable) == (
                mapping.start, mapping.path, mapping.shared, mapping.writable):
            merged[-1] = FileMapping(last.start, mapping.end, last.shared, last.writable, last.path)
        else:
            merged.append(mapping)
    return merged


def release_file_pages(address: int, nbytes: int, mapping: FileMapping) -> bool:
    """Drops the pages holding [address, address + nbytes) from this process's RSS; they stay in the file.

    Safe for every page a clean mapping holds, even one shared with bytes outside the range: dropping only
    forgets the page, and the next read faults the file's bytes back in (MADV_DONTNEED). So the range is rounded
    out to whole pages, which matters for GGUF, whose tensors sit 32 bytes apart. A private writable mapping may
    hold pages written in memory, which DONTNEED would discard; those get MADV_PAGEOUT, which reclaims clean
    pages and keeps written ones. Returns False when the kernel refused (the pages then stay until the mapping
    goes).
    """
    low = max(mapping.start, address // PAGE * PAGE)
    high = min(mapping.end, -(-(address + nbytes) // PAGE) * PAGE)
    madvise = _libc_function("madvise", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int])
    if high <= low or madvise is None:
        return False
    advice = _MADV_DONTNEED if mapping.clean else _MADV_PAGEOUT
    return madvise(low, high - low, advice) == 0


def trim_heap() -> None:
    """Returns the C heap's free pages to the OS (glibc `malloc_trim`; a no-op where there is none)."""
    malloc_trim = _libc_function("malloc_trim", [ctypes.c_size_t])
    if malloc_trim is not None:
        malloc_trim(0)


_functions: dict[str, object] = {}  # libc functions by name, once looked up (None where libc lacks them)


def _libc_function(name: str, argtypes: list):
    if name not in _functions:
        function = None
        if sys.platform.startswith("linux"):
            try:
                function = getattr(ctypes.CDLL(None, use_errno=True), name)
                function.argtypes = argtypes
                function.restype = ctypes.c_int
            except (OSError, AttributeError):
                function = None
        _functions[name] = function
    return _functions[name]
