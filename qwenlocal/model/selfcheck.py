"""A self-check on first use of each fast path, with a fallback for that part only.

The fast paths a GPU user gets by default (the grouped expert kernels, the Triton GEMV of
quantized linears, the CUDA-graph decode) are exact under Triton's interpreter, but the first run
on a card, driver or Triton version nobody has tried is where they would fail. So before the
first reply, one short prompt is prefilled and one decode step taken through each fast path and
through the plain torch path on the same input; the logits must agree within what bf16 rounding
allows (CHECK_RTOL, relative L2) and name the same top token. On an exception or a mismatch that
path is turned off (loop experts, torch matmul, or eager decode), and a Verdict says so for the
CLI to print. Verdicts are kept per machine (GPU name, compute capability, driver, torch, Triton,
qwenlocal version) and model format in the cache folder, so a later start skips the check.

Forcing: `--moe grouped|loop`, QWENLOCAL_CUDA_GRAPHS=0|1 and QWENLOCAL_TRITON_GEMV=0|1 decide
their path without a check (the caller passes them as `forced`); QWENLOCAL_SELF_CHECK=0 skips the
check and trusts every fast path.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import json
import os
import platform
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from quant import moe_kernels
from qwenlocal import __version__
from qwenlocal.model.graphs import GraphDecoder, graphs_supported
from qwenlocal.model.qwen3_moe import Qwen3MoeForCausalLM
from qwenlocal.weights.quant_cache import cache_dir

CHECK_RTOL = 3e-2  # relative L2 error of a bf16 decode step against the plain path (fp32 meets 1e-4)
CHECK_PROMPT = (9, 2, 7, 3, 11, 5, 8, 4)  # a few token ids (taken modulo the vocabulary)
VERDICTS_FILE = "self_check.json"
FALLBACKS = {"grouped": "loop experts", "gemv": "torch matmul", "graph": "eager decode"}


@dataclass
class Verdict:
    """What the check found for one fast path on this machine."""

    path: str  # "grouped", "gemv" or "graph"
    ok: bool
    detail: str = ""  # what failed
    cached: bool = False  # read from the cache folder, not checked now
    seconds: float = 0.0  # what the check cost

    @property
    def line(self) -> str:
        """One sentence for the user: what failed and what runs instead."""
        return f"self-check: the {self.path} fast path failed here ({self.detail}); {FALLBACKS[self.path]} instead."


def active_paths(model: Qwen3MoeForCausalLM) -> list[str]:
    """The fast paths this model would take, in the order they are checked."""
    paths = []
    if model.experts.moe == "grouped":
        paths.append("grouped")
    probe = torch.empty(0, device=model.device)
    quantized = any(hasattr(m, "qtensor") for m in model.modules())
    if model.device.type == "cuda" and quantized and moe_kernels.use_triton(probe, "gemv"):
        paths.append("gemv")
    if graphs_supported(model):
        paths.append("graph")
    return paths


def turn_off(model: Qwen3MoeForCausalLM, path: str) -> None:
    if path == "grouped":
        model.experts.moe = "loop"
    elif path == "gemv":
        moe_kernels.TRITON_OFF.add("gemv")
    else:
        model.graph_decode = False


@contextlib.contextmanager
def _only(model: Qwen3MoeForCausalLM, on: set[str]) -> Iterator[None]:
    """The fast paths in `on` and none of the others, for the length of the block."""
    moe, off, graph = model.experts.moe, set(moe_kernels.TRITON_OFF), model.graph_decode
    model.experts.moe = "grouped" if "grouped" in on else "loop"
    if "gemv" in on:
        moe_kernels.TRITON_OFF.discard("gemv")
    else:
        moe_kernels.TRITON_OFF.add("gemv")
    try:
        yield
    finally:
        model.experts.moe, model.graph_decode = moe, graph
        moe_kernels.TRITON_OFF.clear()
        moe_kernels.TRITON_OFF.update(off)


@torch.inference_mode()
def decode_step(model: Qwen3MoeForCausalLM, graph: bool) -> torch.Tensor:
    """Logits [V] (fp32, host) of one decode step after CHECK_PROMPT's prefill, eager or replayed."""
    ids = [i % model.config.vocab_size for i in CHECK_PROMPT]
    cache = model.new_cache(len(ids))
    model(torch.tensor([ids[:-1]], device=model.input_device), cache=cache, last_only=True)
    if graph:
        logits = GraphDecoder(model, cache)(ids[-1])
    else:
        logits = model(torch.tensor([[ids[-1]]], device=model.input_device), cache=cache)[0, -1]
    return logits.float().cpu().clone()


def compare(got: torch.Tensor, want: torch.Tensor) -> str:
    """'' when `got` passes for `want`; otherwise what differs."""
    if not torch.isfinite(got).all():
        return "non-finite logits"
    err = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
    if err > CHECK_RTOL:
        return f"logits off by {err:.1%}"
    if int(got.argmax()) != int(want.argmax()):
        return "a different top token"
    return ""


def machine_key(device: torch.device) -> str:
    """The machine a verdict holds for: GPU name, compute capability, driver, torch, Triton, us."""
    try:  # the installed version, without importing Triton (seconds on a cold start)
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = "none"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        cap = "sm_{}{}".format(*torch.cuda.get_device_capability(device))
    else:
        name, cap = platform.processor() or platform.machine(), device.type
    parts = (name, cap, f"driver {_driver_version()}", f"torch {torch.__version__}")
    return " | ".join((*parts, f"triton {triton_version}", f"qwenlocal {__version__}"))


def _driver_version() -> str:
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "none"
    v = ctypes.c_int()
    return str(v.value) if lib.cuDriverGetVersion(ctypes.byref(v)) == 0 else "unknown"


def _model_key(model: Qwen3MoeForCausalLM, path: str) -> str:
    recipe = model.recipe
    return f"{path} {recipe.describe() if recipe is not None else '16-bit'} {str(model.dtype).removeprefix('torch.')}"


def _read(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(file: Path, data: dict) -> None:
    with contextlib.suppress(OSError):  # a read-only cache folder only costs the next start a check
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(file)


def self_check(
    model: Qwen3MoeForCausalLM, forced: Iterable[str] = (), folder: Path | None = None
) -> list[Verdict]:
    """Check each fast path `model` would take that is not `forced` and has no verdict for this
    machine yet; turn off those that fail. Returns a Verdict per path checked or read back."""
    if os.environ.get("QWENLOCAL_SELF_CHECK") == "0":
        return []
    forced, paths = set(forced), active_paths(model)
    if not paths:  # nothing to check: no verdict file read, no machine described
        return []
    file = (folder or cache_dir()) / VERDICTS_FILE
    data = _read(file)
    known = data.setdefault(machine_key(model.device), {})
    verdicts: list[Verdict] = []
    want: torch.Tensor | None = None
    passed: set[str] = set()
    for path in paths:
        if path == "graph" and not graphs_supported(model):
            continue  # no graph without the grouped experts, which failed
        if path in forced:  # the user's choice: on, unchecked
            passed.add(path)
            continue
        key = _model_key(model, path)
        if key in known:
            v = Verdict(path, bool(known[key].get("ok")), str(known[key].get("detail", "")), cached=True)
        else:
            t0 = time.perf_counter()
            if want is None:
                with _only(model, set()):
                    want = decode_step(model, graph=False)
            on = {path} | passed  # with the paths that passed, as the replies will run
            try:
                with _only(model, on):
                    detail = compare(decode_step(model, graph=path == "graph"), want)
            except Exception as e:  # any failure of the fast path means: not on this machine
                detail = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}".rstrip(": ")
            v = Verdict(path, not detail, detail, seconds=time.perf_counter() - t0)
            known[key] = {"ok": v.ok, "detail": v.detail}
            _write(file, data)
        if v.ok:
            passed.add(path)
        else:
            turn_off(model, path)
        verdicts.append(v)
    return verdicts


def forced_paths(moe: str) -> set[str]:
    """The fast paths the user decided (`--moe` other than auto, the variables): never checked."""
    forced = {"grouped"} if moe != "auto" else set()
    if "QWENLOCAL_CUDA_GRAPHS" in os.environ:
        forced.add("graph")
    if "QWENLOCAL_TRITON_GEMV" in os.environ:
        forced.add("gemv")
    return forced


def triton_note(model: Qwen3MoeForCausalLM) -> str | None:
    """One line when a GPU run cannot use Triton here, and why (quant.triton_env)."""
    from quant.triton_env import triton_missing

    missing = triton_missing() if model.device.type == "cuda" else ()
    if not missing:
        return None
    return f"note: Triton's kernels are not used here (missing {', '.join(missing)}); the torch path runs instead."


def device_note(model: Qwen3MoeForCausalLM) -> str | None:
    """One line for cards without native bf16 (before sm_80: T4, V100, RTX 20xx) running bf16."""
    if model.device.type != "cuda" or model.dtype != torch.bfloat16:
        return None
    major, minor = torch.cuda.get_device_capability(model.device)
    if major >= 8:
        return None
    name = torch.cuda.get_device_name(model.device)
    return (
        f"note: {name} (sm_{major}{minor}) has no native bf16: attention takes the math kernel and "
        "matmuls get no tensor cores; --dtype fp16 is likely faster (not measured here)."
    )
