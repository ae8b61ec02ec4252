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
* Not every mapping with a name is a file on a disk: a file on tmpfs (/dev/shm) or ramfs, a memfd, a SysV
  segment or a file deleted (or replaced by a rename) since it was mapped. Their pages are memory the mapping
  keeps, or belong to a file no name reaches any more; staging copies them (`memory_filesystem`, files.py).
"""

import bisect
import ctypes
import dataclasses
import logging
import mmap
import os
import sys
from dataclasses import dataclass

logger = logging.getLogger("distorch.pages")

PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4
_MADV_PAGEOUT = 21  # Linux 5.4+; reclaims clean pages, swaps or keeps written ones (never loses data)
# Names of device memory and of anonymous shared memory ("/dev/zero (deleted)" is how a MAP_SHARED|MAP_ANONYMOUS
# mapping such as a staging buffer shows): freed with the last tensor viewing it, like any anonymous memory.
_NOT_FILES = ("/dev/", "/proc/", "/anon_hugepage", "/dmabuf:")
_MEMORY_FILES = ("/dev/shm/",)  # under /dev/ but files (tmpfs): what they map is memory the file keeps
_DELETED = " (deleted)"  # appended by the kernel to the name of a file unlinked (or renamed over) since it was mapped
# statfs f_type of file systems whose files are memory (linux/magic.h): tmpfs (and /dev/shm, memfd), ramfs, hugetlbfs.
_MEMORY_FILESYSTEMS = frozenset({0x01021994, 0x858458F6, 0x958458F6})


@dataclass(frozen=True)
class FileMapping:
    """One mapping of a file in this process (address range, access and what it maps, from /proc/self/maps)."""

    start: int
    end: int
    shared: bool
    writable: bool
    path: str  # as the kernel shows it: " (deleted)" appended when no name reaches the file any more
    offset: int = 0  # the file offset mapped at `start`
    device: int = 0  # the file's device and inode as the kernel reports them here (os.makedev(major, minor))
    inode: int = 0

    @property
    def clean(self) -> bool:
        """Every page equals the file's bytes: writes reach the file (shared) or are impossible (read-only)."""
        return self.shared or not self.writable

    @property
    def deleted(self) -> bool:
        """No name reaches the mapped file any more (deleted, or another file renamed over it), or it never had
        one (memfd, SysV shared memory)."""
        return self.path.endswith(_DELETED) or self.path.startswith(("/memfd:", "/SYSV"))

    def file_offset(self, address: int) -> int:
        """Where the byte at `address` (inside this mapping) lies in the file."""
        return self.offset + address - self.start


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
    path = fields[5].rstrip("\n")
    if not path.startswith("/") or (path.startswith(_NOT_FILES) and not path.startswith(_MEMORY_FILES)):
        return None
    low, high = (int(x, 16) for x in fields[0].split("-"))
    perms = fields[1]
    major, minor = (int(x, 16) for x in fields[3].split(":"))
    return FileMapping(low, high, shared=perms[3] == "s", writable=perms[1] == "w", path=path,
                       offset=int(fields[2], 16), device=os.makedev(major, minor), inode=int(fields[4]))


def _merge_adjacent(mappings: list[FileMapping]) -> list[FileMapping]:
    """One entry per contiguous run of one file: the kernel splits a mapping where page flags differ."""
    merged: list[FileMapping] = []
    for mapping in sorted(mappings, key=lambda m: m.start):
        last = merged[-1] if merged else None
        if last is not None and _continues(last, mapping):
            merged[-1] = dataclasses.replace(last, end=mapping.end)
        else:
            merged.append(mapping)
    return merged


def _continues(last: FileMapping, mapping: FileMapping) -> bool:
    """`mapping` maps the bytes of the same file that follow `last`'s, right after it, with the same access."""
    same = (last.path, last.device, last.inode, last.shared, last.writable) == (
        mapping.path, mapping.device, mapping.inode, mapping.shared, mapping.writable)
    return same and last.end == mapping.start and last.file_offset(last.end) == mapping.offset


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


def memory_filesystem(fd: int) -> bool:
    """The open file lies on a file system whose files are memory (tmpfs, ramfs, hugetlbfs): dropping its pages
    frees nothing, and it is no disk to stream from. False where statfs is unknown (not Linux)."""
    fstatfs = _libc_function("fstatfs", [ctypes.c_int, ctypes.c_void_p])
    if fstatfs is None:
        return False
    # struct statfs starts with f_type, a C long on every Linux ABI; the rest of the struct is not read.
    buffer = ctypes.create_string_buffer(256)
    if fstatfs(fd, buffer) != 0:
        return False
    return ctypes.c_long.from_buffer(buffer).value & 0xFFFFFFFF in _MEMORY_FILESYSTEMS


def holds_written_pages(mapping: FileMapping) -> bool:
    """A private writable file mapping holds pages written in memory (copy-on-write pages that now differ from the
    file), per /proc/self/smaps; True also when that cannot be read, since then nothing proves the bytes clean."""
    if mapping.clean:
        return False
    try:
        with open("/proc/self/smaps") as handle:
            return _anonymous_bytes(handle, mapping) > 0
    except (OSError, ValueError):
        return True


def _anonymous_bytes(lines, mapping: FileMapping) -> int:
    """The "Anonymous:" bytes smaps reports for the areas inside `mapping` (the kernel may split one mapping)."""
    anonymous, inside = 0, False
    for line in lines:
        head = line.split(maxsplit=1)[0]
        if not head.endswith(":"):  # an area's first line: "start-end perms offset dev inode path"
            low, high = (int(x, 16) for x in head.split("-"))
            if low >= mapping.end:
                break
            inside = mapping.start <= low and high <= mapping.end
        elif inside and head == "Anonymous:":
            anonymous += int(line.split()[1]) * 1024
    return anonymous


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
