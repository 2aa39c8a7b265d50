"""C++ operators compiled on first use, with the Python path they replace as the fallback.

A `CppOperator` holds one torch.library source. `ready()` says whether its operators can be called:
the first ask loads a library compiled before at once (~0.2 s, so every run of a program sees the
operator alike), and otherwise starts the build in a background thread (torch.utils.cpp_extension,
under a minute, once per machine) and answers False until it is done, or forever where no C++
compiler is found. `build()` blocks (tests, benchmarks); `turned_off()` makes callers take the
Python path for a while (the tests' fallback, the benchmarks' "before").

The build folder, under torch's extension cache, is named by the operator, the torch version, the
source and flags, and for `native` code (-march=native) this CPU: a library found there is this
code compiled for this machine.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class CppOperator:
    def __init__(
        self,
        name: str,
        source: str,
        cflags: tuple[str, ...] = ("-O2",),
        openmp: bool = False,
        native: bool = False,
    ):
        """`openmp`: build with OpenMP where torch runs on it (`at::parallel_for` is an inline
        header, serial in code built without it); `native`: code for this CPU (-march=native)."""
        self.name, self.source = name, source
        self.cflags = [*cflags, *(native_flags() if native else [])]
        self.ldflags: list[str] = []
        if openmp and _torch_openmp():
            self.cflags.append("-fopenmp")
            self.ldflags.append("-fopenmp")  # libgomp.so.1 resolves to the copy torch has loaded
        self.native = native
        self.status = "new"  # new -> building -> ready | failed
        self.off = False
        self._lock = threading.Lock()

    def build_dir(self) -> Path:
        """$TORCH_EXTENSIONS_DIR, else the user's cache folder; one folder per torch version, source
        and flags (and CPU, for native code)."""
        base = os.environ.get("TORCH_EXTENSIONS_DIR") or Path(
            os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "torch_extensions"
        )
        code = hashlib.sha1((self.source + repr(self.cflags)).encode()).hexdigest()[:8]
        cpu = f"-{cpu_identity()}" if self.native else ""
        return Path(base) / f"{self.name}-torch{torch.__version__}{cpu}-{code}"

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
                    extra_cflags=list(self.cflags),  # copies: load_inline appends to its lists
                    extra_ldflags=list(self.ldflags),
                    build_directory=str(folder),
                )
        except Exception as err:  # no compiler, no headers: the caller's Python path computes it
            log.info("the C++ operator %s did not build (%s); using the Python path", self.name, err)
            self.status = "failed"
            return False
        self.status = "ready"
        return True

    def ready(self) -> bool:
        """Whether the operator can be called (see the module's docstring)."""
        if self.off:
            return False
        if self.status == "ready":
            return True
        if self.status == "new":
            with self._lock:
                if self.status == "new":
                    if self._load_compiled():
                        return True
                    self.status = "building"
                    threading.Thread(target=self.build, name=f"{self.name}-build", daemon=True).start()
        return False

    def _load_compiled(self) -> bool:
        """Load the library a build left in the folder, without load_inline's ninja run (0.1 s a
        library, paid by the first token otherwise): the folder's name holds the source and flags,
        so the library there is this code. False where there is none or it does not load."""
        library = self.build_dir() / f"{self.name}.so"
        if not library.is_file():
            return False
        try:
            torch.ops.load_library(str(library))
        except OSError:  # a build killed while linking: build it again
            return False
        self.status = "ready"
        return True

    @contextmanager
    def turned_off(self) -> Iterator[None]:
        """Inside, `ready()` answers False and callers take the Python path."""
        self.off = True
        try:
            yield
        finally:
            self.off = False


def _torch_openmp() -> bool:
    from .threads import per_thread

    return sys.platform.startswith("linux") and per_thread()


def native_flags() -> list[str]:
    """Code for this CPU; on x86 in 512-bit vectors where it has them (GCC's default for AVX512
    CPUs is 256: quant.cpu_dequant's loop is bound by vector ops, and 512 bits took a 768 x 2048
    matrix from 350 to 280 us on a Xeon)."""
    if platform.machine().lower() in ("x86_64", "amd64"):
        return ["-march=native", "-mprefer-vector-width=512"]
    return ["-mcpu=native"] if platform.machine().lower() in ("aarch64", "arm64") else []


@cache
def cpu_identity() -> str:
    """A short hash of what -march=native compiles for: the CPU's model and feature flags."""
    keys = (
        "vendor_id",
        "cpu family",
        "model",
        "model name",
        "flags",
        "Features",
        "CPU implementer",
        "CPU part",
    )
    seen: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in keys:
                seen.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    text = repr(sorted(seen.items())) if seen else platform.processor() + platform.machine()
    return hashlib.sha1(text.encode()).hexdigest()[:12]


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
