"""Per-thread reusable work buffers: on the CPU, fresh pages cost more than the arithmetic on them."""

from __future__ import annotations

import threading

import torch
from torch import Tensor

# Scratch tensors up to this size are kept per thread and reused.
SCRATCH_KEEP_BYTES = 64 << 20

_local = threading.local()


def scratch(name: str, numel: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> Tensor:
    """A per-thread reusable buffer of at least `numel` elements (its first `numel` are returned)."""
    cache: dict[tuple, Tensor] = _local.__dict__.setdefault("scratch", {})
    # a buffer made inside inference mode cannot be written outside it (and the other way round)
    key = (name, dtype, str(device), torch.is_inference_mode_enabled())
    buf = cache.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype, device=device)
        if numel * dtype.itemsize <= SCRATCH_KEEP_BYTES:
            cache[key] = buf
    return buf[:numel]


def release_scratch() -> None:
    """Drop this thread's buffers: their memory goes back, and the next call allocates afresh."""
    _local.__dict__.pop("scratch", None)
