"""Flat per-block buffers: where streamed weights live between forwards.

Host buffers are plain allocations page-locked in place with cudaHostRegister. `torch.empty(...,
pin_memory=True)` would go through the caching host allocator, which rounds every request up to a
power of two (a 0.7 GB block would pin 1 GB; research/prefetch.md pitfall 5).
"""

import logging
import weakref

import torch

logger = logging.getLogger("distorch.hostbuf")

# Every cluster starts on this boundary: vectorised kernels and DMA engines want aligned bases,
# and it matches the alignment a tensor would get from its own CUDA allocation closely enough.
ALIGNMENT = 256
_CUDA_HOST_REGISTER_PORTABLE = 1


def align_up(offset: int, alignment: int = ALIGNMENT) -> int:
    return (offset + alignment - 1) // alignment * alignment


class FlatBuffer:
    """One flat uint8 allocation on a device, optionally page-locked; `release()` unpins it."""

    def __init__(self, nbytes: int, device: torch.device | str, pin: bool = False):
        self.tensor = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.pinned = bool(pin and nbytes and self.tensor.device.type == "cpu" and _register(self.tensor))
        # Unpin when the buffer is dropped without release() (e.g. ComfyUI deletes a staged model). The
        # finalizer holds the storage so it is unregistered before the memory can be freed.
        self._finalizer = weakref.finalize(self, _unregister_storage, self.tensor.untyped_storage()) if self.pinned \
            else None

    @property
    def nbytes(self) -> int:
        return self.tensor.numel()

    def release(self) -> None:
        """Unpins the memory; the bytes stay valid for views still pointing into them."""
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        self.pinned = False


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
