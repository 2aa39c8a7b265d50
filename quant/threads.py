"""torch's intra-op thread count, changed only where the change stays in the calling thread.

With OpenMP torch keeps one count per thread, so a worker or a short serial section may set its
own. Its native and TBB pools keep one count for the whole process: there a set from a worker
would change every thread's, so nothing is set."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import torch


@cache
def per_thread() -> bool:
    """Whether this build keeps the intra-op thread count per thread (OpenMP)."""
    return "OpenMP" in torch.__config__.parallel_info()


def set_thread_count(n: int) -> bool:
    """The calling thread's intra-op threads to `n` where that stays in this thread; whether set."""
    if not per_thread():
        return False
    torch.set_num_threads(n)
    return True


@contextmanager
def thread_count(n: int) -> Iterator[None]:
    """The calling thread computes with `n` intra-op threads inside the block, where that stays in
    this thread; the count before is put back after."""
    before = torch.get_num_threads()
    if before == n or not set_thread_count(n):
        yield
        return
    try:
        yield
    finally:
        torch.set_num_threads(before)
