"""Model files under a loaded model: which file each weight lies in, and reading it through a descriptor.

A model loaded from a GGUF or safetensors file keeps its weights in a mapping of that file, and the file can
change under it: `cp other.gguf model.gguf` or `wget -O` rewrite it in place (same inode), a failed download or
a full disk truncates it, a rename puts another file in its place, `rm` deletes it. A mapped page the file no
longer has kills the process with SIGBUS when touched; a page of a rewritten file reads the new weights. So every
read the pack makes from a model file (staging a block into its buffer, loading a disk-tier block into its slot,
moving a resident weight to the compute device) goes through a descriptor of the file, never through the mapping:
the file is checked to be the one discovered (device, inode, size, modification time) after the bytes are read, a
short read is an error instead of a signal, and any change raises `ModelFileChanged`, naming the file.

A file that no name reaches any more (deleted, or another file renamed over it) cannot be changed by name: a
descriptor opened before keeps reading its bytes, and so does its mapping, so a model streaming from one keeps
its own weights. Its pages are counted as memory staging copies, like tmpfs ones (`Backing.SHARED`).

The Linux facts come from pages.py; elsewhere no weight is known to lie in a file and nothing is read here.
"""

import ctypes
import dataclasses
import enum
import mmap
import os
import stat
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from .hostbuf import FlatBuffer
from .pages import PAGE, FileMapping, MappingTable, holds_written_pages, memory_filesystem

_MAX_READ = 1 << 30  # bytes per preadv call (Linux returns at most 2 GiB - 4 KiB from one read)
_UPLOAD_CHUNK = 32 << 20  # page-locked host bytes per chunk when a file is read onto a GPU (two chunks alternate)


class ModelFileError(RuntimeError):
    """A model file can no longer be read as it was when the model was loaded; the message names the file."""

    __module__ = "distorch"  # the import path users see in ComfyUI's error (not the custom_nodes file path)


class ModelFileChanged(ModelFileError):
    """A model file was rewritten, truncated, replaced or deleted under the loaded model: reload the model."""

    __module__ = "distorch"


class Backing(str, enum.Enum):
    """What holds a weight's host bytes, for the planner: whether staging moves them and whether they may stay put."""

    RAM = "ram"  # anonymous memory (or device memory), freed with its last tensor: staging moves it
    FILE = "file"  # a file on a disk, read through a descriptor: staging copies it, the disk tier may leave it there
    SHARED = "shared"  # memory a mapping keeps (tmpfs, /dev/shm, memfd, written copy-on-write pages) or a file no
    # name reaches: staging copies it and the source stays; never the disk tier


@dataclass(frozen=True)
class FileIdentity:
    """One model file as it was when its weights were discovered (plain values; no descriptor)."""

    path: str
    device: int  # st_dev and st_ino of a descriptor opened on `path`
    inode: int
    size: int
    mtime_ns: int
    mapped_as: tuple[int, int]  # (device, inode) as /proc/self/maps shows the file (btrfs and overlayfs differ)

    def change(self, now: os.stat_result) -> str | None:
        """How the file `now` describes differs from this one, in words; None when it is the same, unchanged."""
        if (now.st_dev, now.st_ino) != (self.device, self.inode):
            return "was replaced by another file"
        if now.st_size < self.size:
            return f"was truncated to {now.st_size} bytes (it had {self.size})"
        if now.st_size != self.size or now.st_mtime_ns != self.mtime_ns:
            return "was rewritten"
        return None


@dataclass(frozen=True)
class FileSpan:
    """Where one weight cluster's bytes lie in its model file."""

    file: FileIdentity
    offset: int
    nbytes: int


def changed(file: FileIdentity, how: str) -> ModelFileChanged:
    return ModelFileChanged(f"distorch: the model file {file.path!r} {how} since the model was loaded; "
                            "reload the model")


class MappedFiles:
    """What the file mappings of one `MappingTable` hold; each mapped file is opened once, checked and closed.

    `planned`: identities taken earlier (when the model was planned). A file found again keeps its size and time
    from then, so reads from a file that changed in between fail instead of reading the new bytes.
    """

    def __init__(self, mappings: MappingTable, planned: Iterable[FileIdentity] = ()):
        self._mappings = mappings
        self._planned = {file.mapped_as: file for file in planned}
        self._seen: dict[tuple[str, int, int], tuple[Backing, FileIdentity | None]] = {}

    def locate(self, address: int, nbytes: int) -> tuple[Backing, FileSpan | None]:
        """What holds [address, address + nbytes) of host memory, and where it lies in a file it can be read from."""
        mapping = self._mappings.file_mapping(address, nbytes)
        if mapping is None:
            return Backing.RAM, None
        key = (mapping.path, mapping.device, mapping.inode)
        if key not in self._seen:
            self._seen[key] = self._as_planned(*_identify(mapping))
        backing, file = self._seen[key]
        return backing, None if file is None else FileSpan(file, mapping.file_offset(address), nbytes)

    def _as_planned(self, backing: Backing, file: FileIdentity | None) -> tuple[Backing, FileIdentity | None]:
        earlier = self._planned.get(file.mapped_as) if file is not None else None
        if earlier is None or (earlier.device, earlier.inode) != (file.device, file.inode):
            return backing, file
        return backing, dataclasses.replace(file, size=earlier.size, mtime_ns=earlier.mtime_ns)


def _identify(mapping: FileMapping) -> tuple[Backing, FileIdentity | None]:
    if mapping.deleted:
        return Backing.SHARED, None
    try:
        fd = os.open(mapping.path, os.O_RDONLY)
    except OSError:
        return Backing.SHARED, None  # nothing can check or read it through a descriptor: staging copies it
    try:
        now = os.fstat(fd)
        if not stat.S_ISREG(now.st_mode) or not _maps_this_file(fd, now, mapping) or holds_written_pages(mapping):
            return Backing.SHARED, None
        file = FileIdentity(mapping.path, now.st_dev, now.st_ino, now.st_size, now.st_mtime_ns,
                            (mapping.device, mapping.inode))
        return (Backing.SHARED if memory_filesystem(fd) else Backing.FILE), file
    finally:
        os.close(fd)


def _maps_this_file(fd: int, now: os.stat_result, mapping: FileMapping) -> bool:
    """`fd` is the file `mapping` maps. stat and /proc/self/maps agree on most file systems; where they do not (btrfs
    subvolumes, overlayfs report other devices in stat), a one-page mapping of `fd` shows what maps calls it."""
    if (now.st_dev, now.st_ino) == (mapping.device, mapping.inode):
        return True
    if now.st_size == 0:
        return False
    # Private and writable only so that ctypes can take its address; nothing writes to it.
    probe = mmap.mmap(fd, min(now.st_size, PAGE), flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        anchor = ctypes.c_char.from_buffer(probe)
        address = ctypes.addressof(anchor)
        del anchor  # the buffer export must end before the probe closes
        shown = MappingTable.read().file_mapping(address, 1)
    finally:
        probe.close()
    return shown is not None and (shown.device, shown.inode) == (mapping.device, mapping.inode)


def readable_span(planned: FileSpan | None, address: int, mappings: MappingTable,
                  files: "FileReader") -> FileSpan | None:
    """The span to read a cluster's bytes through, or None to copy them from memory where they lie now.

    The bytes must still lie where they were discovered: the same offset of the same mapped file (staging or a
    re-placement may have moved them into a buffer since). A file no name reaches any more is read through a
    descriptor only when one is open already; its name would open another file, and nothing can change it.
    """
    if planned is None:
        return None
    mapping = mappings.file_mapping(address, planned.nbytes)
    if mapping is None or (mapping.device, mapping.inode) != planned.file.mapped_as \
            or mapping.file_offset(address) != planned.offset:
        return None
    if mapping.deleted and not files.holds(planned.file):
        return None
    return planned


def copy_to(source: torch.Tensor, planned: FileSpan | None, device: torch.device, mappings: MappingTable,
            files: "FileReader") -> torch.Tensor:
    """A copy on `device` of a cluster's bytes (`source`, where they lie now), read through the file's descriptor when
    they lie in their model file. The resident placement's one read of a weight."""
    span = readable_span(planned, source.data_ptr(), mappings, files) if source.device.type == "cpu" else None
    if span is None:
        return source.to(device)
    copy = torch.empty(span.nbytes, dtype=torch.uint8, device=device)
    files.read(span, copy)
    files.check(span.file)
    return copy


class FileReader:
    """Reads model files through descriptors, one per file, each opened on first use and checked to be the file
    its weights were discovered in.

    Owns the descriptors (and, while it reads onto a GPU, two page-locked chunks): `close()` closes them, and so
    does freeing the reader, so a streamer dropped without close() leaks none. The records (`FileSpan`) name files
    and never hold a descriptor.
    """

    def __init__(self):
        self._descriptors: dict[tuple[int, int], int] = {}  # (st_dev, st_ino) of a discovered file -> open descriptor
        self._chunks: list[tuple[FlatBuffer, object]] = []  # page-locked host chunks and the event of their last upload
        weakref.finalize(self, _close_all, self._descriptors)

    def holds(self, file: FileIdentity) -> bool:
        return (file.device, file.inode) in self._descriptors

    def check(self, file: FileIdentity) -> None:
        """Raises `ModelFileChanged` unless `file` is still as discovered (opening it if needed): one fstat."""
        how = file.change(os.fstat(self._descriptor(file)))
        if how is not None:
            raise changed(file, how)

    def read(self, span: FileSpan, into: torch.Tensor) -> None:
        """Reads `span` into `into` (a contiguous uint8 tensor of its size, in RAM or on a GPU). Call `check`
        after the reads: a rewrite updates the file's time before its bytes, so a check after sees every write that
        a read may have caught half-done."""
        if into.dtype != torch.uint8 or not into.is_contiguous() or into.numel() != span.nbytes:
            raise ValueError(f"distorch: a file read needs {span.nbytes} contiguous bytes, got {tuple(into.shape)} "
                             f"{into.dtype}")
        if into.device.type == "cpu":
            _read_exactly(self._descriptor(span.file), span, into.data_ptr())
        else:
            self._upload(span, into)

    def adopt(self, other: "FileReader") -> None:
        """Takes over `other`'s descriptors (a successor streamer keeps reading the files it was reading)."""
        for key, fd in list(other._descriptors.items()):
            if key in self._descriptors:
                os.close(fd)
            else:
                self._descriptors[key] = fd
        other._descriptors.clear()

    def finish(self) -> None:
        """Waits for the uploads in flight and frees the page-locked chunks; the descriptors stay open."""
        for chunk, uploaded in self._chunks:
            uploaded.synchronize()
            chunk.release()
        self._chunks.clear()

    def close(self) -> None:
        self.finish()
        _close_all(self._descriptors)

    def __enter__(self) -> "FileReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _descriptor(self, file: FileIdentity) -> int:
        key = (file.device, file.inode)
        if key not in self._descriptors:
            self._descriptors[key] = _open_as_discovered(file)
        return self._descriptors[key]

    def _upload(self, span: FileSpan, into: torch.Tensor) -> None:
        """Reads onto a GPU in chunks through two page-locked host buffers: while one chunk's copy runs on the current
        stream, the next chunk is read into the other buffer."""
        if not self._chunks:
            self._chunks = [(FlatBuffer(_UPLOAD_CHUNK, "cpu", pin=True), torch.cuda.Event()) for _ in range(2)]
        stream = torch.cuda.current_stream(into.device)
        fd = self._descriptor(span.file)
        for index, start in enumerate(range(0, span.nbytes, _UPLOAD_CHUNK)):
            chunk, uploaded = self._chunks[index % 2]
            # The host refills this chunk: the copy that last read it must have finished.
            uploaded.synchronize()
            size = min(_UPLOAD_CHUNK, span.nbytes - start)
            host = chunk.tensor[:size]
            _read_exactly(fd, FileSpan(span.file, span.offset + start, size), host.data_ptr())
            with torch.cuda.stream(stream):
                into[start:start + size].copy_(host, non_blocking=True)
                uploaded.record(stream)


class FileRead:
    """One block's clusters read from their model files into a flat host buffer at their offsets.

    What a copy engine gets instead of a source tensor for the disk tier: the engine decides where the host read
    lands (straight into a CPU slot, or a page-locked bounce buffer before a GPU copy) and calls `read_into`.
    """

    def __init__(self, files: FileReader, parts: Sequence[tuple[int, FileSpan]], nbytes: int):
        self.files = files
        self.parts = parts  # (offset in the flat buffer, span) per cluster
        self.nbytes = nbytes

    def read_into(self, flat: torch.Tensor) -> None:
        for offset, span in self.parts:
            self.files.read(span, flat[offset:offset + span.nbytes])
        for file in dict.fromkeys(span.file for _, span in self.parts):
            self.files.check(file)


def _open_as_discovered(file: FileIdentity) -> int:
    try:
        fd = os.open(file.path, os.O_RDONLY)
    except FileNotFoundError:
        raise changed(file, "was deleted") from None
    except OSError as error:
        raise ModelFileError(f"distorch: cannot open the model file {file.path!r} ({error.strerror}); "
                             "fix its permissions or reload the model") from None
    how = file.change(os.fstat(fd))
    if how is not None:
        os.close(fd)
        raise changed(file, how)
    return fd


def _read_exactly(fd: int, span: FileSpan, address: int) -> None:
    """Reads all of `span` into host memory at `address`; a file that ends early is a changed file, not a signal."""
    view = memoryview((ctypes.c_char * span.nbytes).from_address(address)).cast("B")
    done = 0
    while done < span.nbytes:
        try:
            got = os.preadv(fd, [view[done:done + _MAX_READ]], span.offset + done)
        except OSError as error:
            at = span.offset + done
            raise ModelFileError(f"distorch: cannot read the model file {span.file.path!r} at byte {at} "
                                 f"({error.strerror}); check the disk and reload the model") from None
        if got == 0:
            how = span.file.change(os.fstat(fd)) or f"was truncated (it ends before byte {span.offset + span.nbytes})"
            raise changed(span.file, how)
        done += got


def _close_all(descriptors: dict[tuple[int, int], int]) -> None:
    for fd in descriptors.values():
        os.close(fd)
    descriptors.clear()
