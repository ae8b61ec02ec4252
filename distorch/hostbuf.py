"""Flat per-block buffers: where streamed weights live between forwards.

Host buffers are anonymous memory mappings of their own, page-locked in place with cudaHostRegister
after they are filled. Their own mapping gives each buffer whole pages, so two registrations never share a
page, and its memory goes back to the OS the moment the last view of it is freed (no heap to trim).
`torch.empty(..., pin_memory=True)` would go through the caching host allocator, which rounds every
request up to a power of two (a 0.7 GB block would pin 1 GB; research/prefetch.md pitfall 5), and pinning
before filling would fault in the whole buffer while the source weights are still alive.
"""

import logging
import mmap
import weakref

import torch

logger = logging.getLogger("distorch.hostbuf")

_CUDA_HOST_REGISTER_PORTABLE = 1


class FlatBuffer:
    """One flat uint8 allocation on a device; host buffers can be page-locked once filled (`pin`).

    The buffer's memory is freed when the last tensor viewing it is freed; `release()` only unpins, so views
    handed to a model (after `close()`) stay valid.
    """

    def __init__(self, nbytes: int, device: torch.device | str, pin: bool = False):
        device = torch.device(device)
        self.tensor = _anonymous_mapping(nbytes) if device.type == "cpu" else \
            torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.pinned = False
        self._finalizer: weakref.finalize | None = None
        if pin:  # pinning now faults in every page; buffers filled later are pinned after filling (`pin()`)
            self.pin()

    @property
    def nbytes(self) -> int:
        return self.tensor.numel()

    def pin(self) -> bool:
        """Page-locks a host buffer (pages already filled stay where they are). Returns whether it is pinned."""
        if self.pinned or not self.nbytes or self.tensor.device.type != "cpu" or not _register(self.tensor):
            return self.pinned
        self.pinned = True
        # Unpin when the buffer is dropped without release() (e.g. ComfyUI deletes a staged model). The
        # finalizer holds the storage so it is unregistered before the memory can be unmapped.
        self._finalizer = weakref.finalize(self, _unregister_storage, self.tensor.untyped_storage())
        return True

    def release(self) -> None:
        """Unpins the memory; the bytes stay valid for views still pointing into them."""
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        self.pinned = False


def _anonymous_mapping(nbytes: int) -> torch.Tensor:
    """`nbytes` of zero-filled, page-aligned RAM that is faulted in only as it is written."""
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    mapping = mmap.mmap(-1, nbytes)
    # The tensor holds the mapping: it is unmapped when the last view of the tensor is freed.
    return torch.frombuffer(mapping, dtype=torch.uint8)


def _register(tensor: torch.Tensor) -> bool:
    try:
        status = torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), tensor.numel(), _CUDA_HOST_REGISTER_PORTABLE)
    except (AssertionError, RuntimeError, AttributeError) as error:
        logger.warning("distorch: cannot pin %.1f MB of RAM (%s); streaming from pageable memory",
                       tensor.numel() / 2**20, error)
        return False
    if int(status) != 0:
        _clear_cuda_error()
        logger.warning("distorch: cudaHostRegister failed (error %s) for %.1f MB; streaming from pageable memory",
                       int(status), tensor.numel() / 2**20)
        return False
    return True


def _unregister_storage(storage: torch.UntypedStorage) -> None:
    status = torch.cuda.cudart().cudaHostUnregister(storage.data_ptr())
    if int(status) != 0:
        _clear_cuda_error()
        logger.warning("distorch: cudaHostUnregister failed (error %s)", int(status))


def _clear_cuda_error() -> None:
    # A failed register also queues its error for the next kernel launch check, where it would surface
    # as an unrelated failure; launch a trivial kernel now and drop the error it reports.
    try:
        torch.ones(1, device="cuda").add_(1)
        torch.cuda.synchronize()
    except RuntimeError:
        pass
