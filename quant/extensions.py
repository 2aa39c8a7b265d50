"""C++ operators compiled on first use, with the Python path they replace as the fallback.

A `CppOperator` holds one torch.library source. `ready()` says whether its operators can be called;
the first ask starts the build in a background thread (torch.utils.cpp_extension, into torch's
extension cache: about a minute, once per machine and torch version) and answers False until it is
done, or forever where no C++ compiler is found. `build()` blocks (tests, benchmarks).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class CppOperator:
    def __init__(self, name: str, source: str):
        self.name, self.source = name, source
        self.status = "new"  # new -> building -> ready | failed
        self._lock = threading.Lock()

    def build_dir(self) -> Path:
        """$TORCH_EXTENSIONS_DIR, else the user's cache folder; one folder per torch version."""
        base = os.environ.get("TORCH_EXTENSIONS_DIR") or Path(
            os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "torch_extensions"
        )
        return Path(base) / f"{self.name}-torch{torch.__version__}"

    def build(self) -> bool:
        """Compile (or load the compiled) operator now, blocking; whether it is available."""
        from torch.utils.cpp_extension import load_inline

        try:
            folder = self.build_dir()
            folder.mkdir(parents=True, exist_ok=True)
            with _build_lock(folder):
                load_inline(
                    self.name,
                    self.source,
                    is_python_module=False,
                    extra_cflags=["-O2"],
                    build_directory=str(folder),
                )
        except Exception as err:  # no compiler, no headers: the caller's Python path computes it
            log.info("the C++ operator %s did not build (%s); using the Python path", self.name, err)
            self.status = "failed"
            return False
        self.status = "ready"
        return True

    def ready(self) -> bool:
        """Whether the operator can be called; the first ask starts its build in the background."""
        if self.status == "ready":
            return True
        if self.status == "new":
            with self._lock:
                if self.status == "new":
                    self.status = "building"
                    threading.Thread(target=self.build, name=f"{self.name}-build", daemon=True).start()
        return False


class _build_lock:
    """An exclusive lock on the build folder that the OS releases if the process dies. torch's own
    lock is a file that a killed build leaves behind (every later build would wait on it forever):
    holding this lock, no live build is running, so such a file is stale and goes."""

    def __init__(self, folder: Path):
        self.folder = folder

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # Windows: torch's own lock only
            self.file = None
            return self
        self.file = open(self.folder / "qwenlocal.lock", "w")  # noqa: SIM115 (closed in __exit__)
        fcntl.flock(self.file, fcntl.LOCK_EX)
        (self.folder / "lock").unlink(missing_ok=True)
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()
