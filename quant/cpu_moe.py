"""A decode token's k int4 experts on the CPU in one call: a small C++ operator that loops over the
picked experts calling torch's own `_weight_int4pack_mm_for_cpu`, so a layer costs one Python call
instead of ~8 per expert.

It computes exactly what the Python loop does (`Experts.one_token` over `QuantExperts`' bound
kernels): per expert in increasing id order, down(silu(gate(x)) * up(x)) times its routing weight,
added into the sum in bf16. Same aten ops, same order, same roundings: the results are equal bit for
bit (tests/test_decode_fast.py), and the Python loop stays the reference and the fallback.

The operator is compiled on first use (torch.utils.cpp_extension, into torch's extension cache;
about a minute, once per machine and torch version) in a background thread; until it is ready, or
where no C++ compiler is found, the Python loop computes the token. It needs nothing beyond what
torch's own CPU kernels need (no AVX512 assumption: torch picks the kernel's vector width).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import torch
from torch import Tensor

NAME = "qwenlocal_cpu_moe"
MAX_PICKS = 64  # the most experts a token picks that the operator takes (its sort buffer)
_SOURCE = r"""
#include <torch/library.h>
#include <ATen/ATen.h>

// x [1, H] bf16; ids [k] int64; weights [k] bf16; blob uint8 [E, nbytes] (one row per expert);
// offs: byte offsets in a row of gate weight, gate scale_zero, up weight, up scale_zero, down
// weight, down scale_zero.
at::Tensor moe_int4_row(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights,
                        const at::Tensor& blob, at::IntArrayRef offs, int64_t hidden, int64_t inter,
                        int64_t group) {
  TORCH_CHECK(blob.is_contiguous() && ids.numel() <= 64, "moe_int4_row: a contiguous blob, k <= 64");
  const int64_t k = ids.numel(), nbytes = blob.size(1), base = blob.storage_offset();
  at::Tensor idc = ids.contiguous();
  const int64_t* idp = idc.data_ptr<int64_t>();
  int64_t order[64];  // the picks in increasing expert id (insertion sort: k is 8)
  for (int64_t j = 0; j < k; ++j) {
    int64_t i = j;
    for (; i > 0 && idp[order[i - 1]] > idp[j]; --i) order[i] = order[i - 1];
    order[i] = j;
  }
  at::Tensor b16 = blob.view(at::kBFloat16);
  at::Tensor out;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t row = base + idp[order[j]] * nbytes;
    auto w = [&](int64_t i, int64_t n, int64_t kk) {
      return blob.as_strided({n, kk / 2}, {kk / 2, 1}, row + offs[i]);
    };
    auto sz = [&](int64_t i, int64_t n, int64_t kk) {
      return b16.as_strided({kk / group, n, 2}, {n * 2, 2, 1}, (row + offs[i]) / 2);
    };
    at::Tensor g = at::_weight_int4pack_mm_for_cpu(x, w(0, inter, hidden), group, sz(1, inter, hidden));
    at::Tensor u = at::_weight_int4pack_mm_for_cpu(x, w(2, inter, hidden), group, sz(3, inter, hidden));
    at::Tensor h = at::silu(g).mul_(u);
    at::Tensor y = at::_weight_int4pack_mm_for_cpu(h, w(4, hidden, inter), group, sz(5, hidden, inter));
    y.mul_(weights.select(0, order[j]));
    out = j == 0 ? y : out.add_(y);
  }
  return out;
}

TORCH_LIBRARY(qwenlocal_cpu_moe, m) {
  m.def("moe_int4_row(Tensor x, Tensor ids, Tensor weights, Tensor blob, int[] offs, int hidden, "
        "int inter, int group) -> Tensor");
}
TORCH_LIBRARY_IMPL(qwenlocal_cpu_moe, CPU, m) { m.impl("moe_int4_row", &moe_int4_row); }
"""

_state: dict[str, object] = {"status": "new"}  # new -> building -> ready | failed
_lock = threading.Lock()
log = logging.getLogger(__name__)


def build_dir() -> Path:
    """$TORCH_EXTENSIONS_DIR, else the user's cache folder; one folder per torch version."""
    base = os.environ.get("TORCH_EXTENSIONS_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "torch_extensions"
    )
    return Path(base) / f"{NAME}-torch{torch.__version__}"


def build() -> bool:
    """Compile (or load the compiled) operator now, blocking; whether it is available."""
    from torch.utils.cpp_extension import load_inline

    try:
        folder = build_dir()
        folder.mkdir(parents=True, exist_ok=True)
        with _build_lock(folder):
            load_inline(
                NAME, _SOURCE, is_python_module=False, extra_cflags=["-O2"], build_directory=str(folder)
            )
    except Exception as err:  # no compiler, no headers: the Python loop computes the experts
        log.info("the CPU MoE operator did not build (%s); using the Python loop", err)
        _state["status"] = "failed"
        return False
    _state["status"] = "ready"
    return True


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


def ready() -> bool:
    """Whether the operator can be called; the first ask starts its build in the background."""
    status = _state["status"]
    if status == "ready":
        return True
    if status == "new":
        with _lock:
            if _state["status"] == "new":
                _state["status"] = "building"
                threading.Thread(target=build, name="cpu-moe-build", daemon=True).start()
    return False


def moe_int4_row(
    x: Tensor,
    ids: Tensor,
    weights: Tensor,
    blob: Tensor,
    offsets: list[int],
    hidden: int,
    inter: int,
    group: int,
) -> Tensor:
    """x [1, H] bf16 through the k experts `ids` [k] of this layer's blob, weighted by `weights` [k]."""
    return torch.ops.qwenlocal_cpu_moe.moe_int4_row(x, ids, weights, blob, offsets, hidden, inter, group)
