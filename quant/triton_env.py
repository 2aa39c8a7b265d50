"""What Triton needs on this machine before its first launch on a GPU.

Importing Triton is not enough: its first launch compiles a small C helper for the driver, with a
C compiler, Python's headers and libcuda, and writes it to a cache folder. On a slim image one of
them is often missing, and the first decode would raise instead of taking the torch path.
"""

from __future__ import annotations

import ctypes.util
import functools
import importlib.util
import os
import shutil
import sysconfig
from pathlib import Path


def _cache_dir() -> Path:
    # Triton's own default: $TRITON_CACHE_DIR, else $TRITON_HOME (or ~) / .triton / cache
    if os.environ.get("TRITON_CACHE_DIR"):
        return Path(os.environ["TRITON_CACHE_DIR"])
    return Path(os.environ.get("TRITON_HOME", Path.home())) / ".triton" / "cache"


def _writable(folder: Path) -> bool:
    """The folder, or its nearest existing parent (Triton creates the rest), is writable."""
    for p in (folder, *folder.parents):
        if p.exists():
            return p.is_dir() and os.access(p, os.W_OK | os.X_OK)
    return False


def _libcuda() -> bool:
    if os.environ.get("TRITON_LIBCUDA_PATH"):
        return Path(os.environ["TRITON_LIBCUDA_PATH"]).is_dir()
    return ctypes.util.find_library("cuda") is not None


def _compiler() -> bool:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc) is not None
    return shutil.which("gcc") is not None or shutil.which("clang") is not None


@functools.cache
def triton_missing() -> tuple[str, ...]:
    """What Triton lacks here to compile and launch on a GPU; empty when nothing is missing."""
    if importlib.util.find_spec("triton") is None:
        return ("the triton package",)
    missing = []
    if not _compiler():
        missing.append("a C compiler (gcc, clang or $CC)")
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
        missing.append("Python's headers (Python.h)")
    if not _libcuda():
        missing.append("libcuda.so")
    if not _writable(_cache_dir()):
        missing.append(f"a writable cache folder ({_cache_dir()})")
    return tuple(missing)
