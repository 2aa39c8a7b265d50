"""Page-locked host memory of exactly the size asked for.

`torch.empty(..., pin_memory=True)` goes through torch's caching host allocator, which rounds every
request up to a power of two: one nf4 layer of experts (297.6 MiB) takes 512 MiB, and the host store
of offloaded experts 1.7x its size. Here the memory is an anonymous mapping (page-aligned, of the
exact size) registered with the CUDA driver; it is unregistered when the last tensor viewing it is
freed.
"""

from __future__ import annotations

import mmap
import weakref

import torch

CUDA_HOST_REGISTER_DEFAULT = 0  # cudaHostRegisterDefault: page-locked, usable by every context


def _register(address: int, nbytes: int) -> None:
    err = torch.cuda.cudart().cudaHostRegister(address, nbytes, CUDA_HOST_REGISTER_DEFAULT)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister of {nbytes:,} bytes failed (CUDA error {int(err)})")


def _unregister(address: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(address)


def host_empty(shape: tuple[int, ...], pin: bool) -> torch.Tensor:
    """An uninitialized uint8 host tensor of `shape`; page-locked for fast copies when `pin`,
    taking exactly its bytes (plus the last page's rest), unlike torch's pinned allocator."""
    if not pin:
        return torch.empty(shape, dtype=torch.uint8)
    nbytes = 1
    for n in shape:
        nbytes *= n
    region = mmap.mmap(-1, max(nbytes, 1))
    flat = torch.frombuffer(region, dtype=torch.uint8)  # keeps `region` alive as long as any view
    address = flat.data_ptr()
    _register(address, len(region))
    weakref.finalize(region, _unregister, address)
    return flat[:nbytes].view(shape)
