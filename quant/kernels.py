"""y = x @ W.T for a quantized W: the kernels, and the one function that picks among them.

`qlinear` chooses by device, format, layout and the number of rows of x:

    device  format        rows <= crossover                          more rows (prefill)
    cpu     int8          torch's _weight_int8pack_mm (bf16/fp16 x)  the codes as the GEMM's dtype, GEMM,
                                                                     then the row scales (int8_gemm_cpu)
    cpu     int4 (cpu)    torch's _weight_int4pack_mm_for_cpu        dequantize (C++ once built:
                                                                     quant.cpu_dequant) + GEMM
    cpu     nf4 / fp4     the faster, measured once on this CPU, of bitsandbytes' matmul_4bit
                          (its C++ dequantize on AVX512-BF16 CPUs) and dequantize + GEMM
    cuda    nf4 / fp4     bitsandbytes' matmul_4bit (its gemv at one row, dequantize + GEMM above)
    cuda    int8 / int4   dequantize + GEMM

`plain` (dequantize, then F.linear) is the reference every other path equals within bf16 rounding;
the tests hold each kernel to it. An fp32 x takes the plain path (exact up to fp32 summation);
a float32 model's decode token goes through the kernels in bf16 instead (`decode_in_bf16`: its
callers, the quantized linear layers and the experts, know when a row is a decode token). The crossover is timed once per process on this
CPU (`kernel_max_rows`): the kernels' time grows with the rows and the GEMM's barely, and where
they cross depends on the CPU (16 rows on an AVX2 EPYC, 32-64 on AVX512-BF16 ones: BENCHMARKS.md).
On the CPU the GEMM runs in bf16 where the CPU has native bf16 (AVX512-BF16 / AMX) and in fp32
elsewhere, where fp32 GEMM is several times faster than bf16.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cpu_dequant
from .formats import QTensor, dequantize
from .int4 import cpu_packable, cpu_packing, dequantize_int4_t, int4_mm_cpu, repack_for_cpu
from .pack import PackLayout, unpack
from .scratch import scratch
from .spec import INT8_SCALE

# The row counts at which `kernel_max_rows` times torch's int8 / int4 CPU kernels against the GEMM
# path, in order: the crossover is the last count where the kernel is faster (1 when it is not at 4).
KERNEL_ROWS_LADDER = (4, 8, 16, 32, 64)
_KERNEL_DTYPES = (torch.bfloat16, torch.float16)
# The plain path dequantizes a large int8 weight (the lm_head) this many elements at a time.
PLAIN_CHUNK_ELEMS = 1 << 22
# torch's int8 / int4 CPU kernels read the weight with aligned vector loads: on an AVX512 CPU a
# weight that is not 16-byte aligned (one memory-mapped from a safetensors file, whose tensors are
# only 8-byte aligned) crashes the process. Weights are moved to this alignment at load, and a
# weight that is not gets the plain path.
KERNEL_ALIGN = 64


def qlinear(x: Tensor, q: QTensor, bias: Tensor | None = None) -> Tensor:
    """x [..., in] @ W.T (+ bias) -> [..., out] in x's dtype, W = dequantize(q) of shape [out, in]."""
    if len(q.shape) != 2 or x.shape[-1] != q.shape[1]:
        raise ValueError(f"qlinear: x [..., {x.shape[-1]}] does not match weight {list(q.shape)}")
    kernel = pick_kernel(q, x)
    lead = x.shape[:-1]
    y = kernel(x.reshape(-1, x.shape[-1]), q)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.view(*lead, q.shape[0])


def pick_kernel(q: QTensor, x: Tensor):
    """The kernel for this weight and input: the single place that decides."""
    rows = x.numel() // x.shape[-1]
    if x.is_cuda:
        return bnb_matmul_4bit if q.fmt in ("nf4", "fp4") else plain
    if x.dtype in _KERNEL_DTYPES and is_aligned(q.weight):
        if q.fmt == "int8":
            return int8_kernel_cpu if rows <= kernel_max_rows("int8") else int8_gemm_cpu
        if q.fmt == "int4" and q.packing != "plain" and rows <= kernel_max_rows("int4"):
            return int4_kernel_cpu
        # bitsandbytes' CPU kernels assume each block lies within a row (they misread a
        # 32-wide weight in blocks of 64)
        if q.fmt in ("nf4", "fp4") and q.shape[1] % q.blocksize == 0 and bnb_4bit_faster_on_cpu():
            return bnb_matmul_4bit
    return plain


def decode_in_bf16(x: Tensor, q: QTensor) -> bool:
    """Whether x, a float32 model's decode token [1, in] on the CPU, should go through q's int8 /
    int4 kernel in bf16: the plain path would dequantize the whole matrix for that one row (a
    float32 model decoded ~7x slower than a bf16 one), and torch's kernels are slow in fp32."""
    return (
        x.dtype == torch.float32
        and not x.is_cuda
        and x.numel() == x.shape[-1]
        and (q.fmt == "int8" or (q.fmt == "int4" and q.packing != "plain"))
        and is_aligned(q.weight)
    )


def row_kernel(q: QTensor, dtype: torch.dtype) -> Callable[[Tensor], Tensor] | None:
    """x [1, in] (contiguous, `dtype`, on the CPU) -> x @ W.T through the kernel `pick_kernel` picks
    for one such row, bound once: a decode step calls it for each of its experts' matrices without
    the dispatch's checks. None where that pick is not one of torch's int8 / int4 kernels."""
    if q.device.type != "cpu" or dtype not in _KERNEL_DTYPES or not is_aligned(q.weight):
        return None
    w = q.weight
    if q.fmt == "int4" and q.packing != "plain" and dtype == torch.bfloat16:
        assert q.scale_zero is not None
        scale_zero, group = q.scale_zero, q.blocksize
        return lambda x: torch._weight_int4pack_mm_for_cpu(x, w, group, scale_zero)
    if q.fmt == "int8":
        scales = int8_scales(q, dtype)
        return lambda x: torch._weight_int8pack_mm(x, w, scales)
    return None


def is_aligned(t: Tensor) -> bool:
    return t.data_ptr() % KERNEL_ALIGN == 0


@torch.no_grad()
def plain(x: Tensor, q: QTensor) -> Tensor:
    """Dequantize (into a reused scratch on the CPU), then one GEMM; the reference path."""
    n, k = q.shape
    if q.fmt == "int8" and q.numel > PLAIN_CHUNK_ELEMS:  # e.g. the lm_head: rows in slices
        # (on a GPU too: dequantizing the lm_head whole would hold ~1.7 GiB for a many-row call)
        assert q.absmax is not None
        out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
        step = PLAIN_CHUNK_ELEMS // k
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            part = QTensor("int8", (r1 - r0, k), q.dtype, k, q.weight[r0:r1], q.absmax[r0:r1])
            out[:, r0:r1] = plain(x, part)
        return out
    if x.is_cuda:
        return F.linear(x, dequantize(q, x.dtype))
    dt = gemm_dtype_cpu(x.dtype)
    if q.fmt == "int4":  # unpacked as W.T, which the GEMM reads as well as W
        assert q.scale_zero is not None
        wt = scratch("qlinear_w" if dt == torch.float32 else "qlinear_wg", q.numel, dt).view(k, n)
        if (
            cpu_dequant.reads(q.packing) and cpu_dequant.OPERATOR.ready()
        ):  # C++, straight into the GEMM's dtype
            cpu_dequant.dequantize_int4_t(q.weight, q.scale_zero, (n, k), q.blocksize, q.packing, wt)
        else:  # the same values through fp32 scratch
            w32 = scratch("qlinear_w", q.numel, torch.float32)
            w32 = dequantize_int4_t(q.weight, q.scale_zero, (n, k), q.blocksize, q.packing, w32)
            wt = w32 if dt == torch.float32 else wt.copy_(w32)
        return torch.matmul(x.to(dt), wt).to(x.dtype)
    w = dequantize(q, out=scratch("qlinear_w", q.numel, dt))
    return F.linear(x.to(dt), w.view(q.shape)).to(x.dtype)


def int8_kernel_cpu(x: Tensor, q: QTensor) -> Tensor:
    """torch's int8 weight-only kernel on the bnb int8 bytes as stored: x @ (w * scale).T (an fp32 x
    in bf16: torch's kernel is slow in fp32)."""
    if x.dtype in _KERNEL_DTYPES:
        return torch.ops.aten._weight_int8pack_mm(x.contiguous(), q.weight, int8_scales(q, x.dtype))
    xb = x.to(torch.bfloat16).contiguous()
    return torch.ops.aten._weight_int8pack_mm(xb, q.weight, int8_scales(q, torch.bfloat16)).to(x.dtype)


def int8_gemm_cpu(x: Tensor, q: QTensor) -> Tensor:
    """Many rows of x through an int8 weight: x @ (w * s).T computed as (x @ w.T) * s, which is what
    torch's int8 kernel computes, but with a GEMM. The int8 codes convert exactly into the GEMM's
    dtype (bf16 holds every integer up to 256), and each output column then takes its row's scale.
    That is one pass over the weight where dequantize makes three (3x faster for a 4096 x 2048
    projection at 127 rows on a Xeon). A large weight (the lm_head) goes in row slices."""
    n, k = q.shape
    dt = gemm_dtype_cpu(x.dtype)
    xg, scale = x.to(dt), int8_scales(q, torch.float32)
    out = torch.empty(x.shape[0], n, dtype=x.dtype)
    step = max(1, min(n, PLAIN_CHUNK_ELEMS // k))
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        w = scratch("qlinear_w", (r1 - r0) * k, dt).view(r1 - r0, k).copy_(q.weight[r0:r1])
        torch.mul(F.linear(xg, w), scale[r0:r1], out=out[:, r0:r1])
    return out


def int8_scales(q: QTensor, dtype: torch.dtype) -> Tensor:
    """bnb's row scale absmax / 127 in x's dtype, made once per QTensor and dtype."""
    cached = q.kernel_cache.get(("int8_scales", dtype))
    if cached is None:
        assert q.absmax is not None
        cached = q.kernel_cache[("int8_scales", dtype)] = (q.absmax * INT8_SCALE).to(dtype)
    return cached


def int4_kernel_cpu(x: Tensor, q: QTensor) -> Tensor:
    """torch's int4 group-wise kernel on the weight repacked at load (quant/int4.py)."""
    assert q.scale_zero is not None
    if x.dtype == torch.bfloat16:  # the decode case: no conversions to pay for
        return int4_mm_cpu(x.contiguous(), q.weight, q.scale_zero, q.blocksize)
    return int4_mm_cpu(x.to(torch.bfloat16).contiguous(), q.weight, q.scale_zero, q.blocksize).to(x.dtype)


def bnb_matmul_4bit(x: Tensor, q: QTensor) -> Tensor:
    return quiet_bitsandbytes().matmul_4bit(x, q.weight, q.bnb_quant_state())


def quiet_bitsandbytes():
    """bitsandbytes, imported without its CPU backend's start-up warning (about a hub kernel it
    looks for on AVX512-BF16 CPUs) reaching the user."""
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    finally:
        logger.setLevel(level)
    return bitsandbytes


def measured_once(fn):
    """A cache for a timing probe that several threads may ask at once (the cold-expert workers on
    their first token): one of them times it under a lock and the others wait for its answer, so
    no probe is timed against another. Once known, an answer is read without the lock (every
    quantized matmul on the CPU asks)."""
    answers: dict[tuple, object] = {}
    lock = threading.Lock()

    @functools.wraps(fn)
    def once(*args):
        if args in answers:
            return answers[args]
        with lock:
            if args not in answers:
                answers[args] = fn(*args)
            return answers[args]

    once.cache_clear = answers.clear  # type: ignore[attr-defined]
    return once


@measured_once
def bnb_4bit_faster_on_cpu() -> bool:
    """Whether bitsandbytes' CPU matmul_4bit beats our dequantize + GEMM on this CPU, timed once on
    one expert-sized NF4 matrix and one row. Its C++ dequantize is about 3.5x faster on a Zen 4
    (AVX512-BF16); on a CPU without AVX512 its fallback was 2x slower (BENCHMARKS.md)."""
    try:
        quiet_bitsandbytes()
    except ImportError:
        return False
    from .formats import quantize

    w = torch.randn(768, 2048, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    q = quantize(w * 0.02, "nf4", 64, True)
    x = torch.randn(1, 2048, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    with torch.inference_mode():
        return best_seconds(lambda: bnb_matmul_4bit(x, q)) < best_seconds(lambda: plain(x, q))


def kernel_max_rows(fmt: str) -> int:
    """The most rows of x for which torch's `fmt` ("int8" or "int4") CPU kernel is faster than the
    GEMM path on this CPU. It is timed once per process on one expert-sized matrix (768 x 2048, as
    loaded) at each count of KERNEL_ROWS_LADDER, stopping at the first count where the kernel loses.
    That takes about 0.1 s, on the first quantized call with a few rows. int4 is timed again once
    the C++ dequantize (quant.cpu_dequant) is ready: it moves the crossover down (BENCHMARKS.md)."""
    return _kernel_max_rows(fmt, fmt == "int4" and cpu_dequant.OPERATOR.ready())


@measured_once
def _kernel_max_rows(fmt: str, fast_dequant: bool) -> int:
    from .formats import quantize

    w = torch.randn(768, 2048, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    q = to_kernel_layout(quantize(w * 0.02, fmt, 64))
    kernel, gemm = (int8_kernel_cpu, int8_gemm_cpu) if fmt == "int8" else (int4_kernel_cpu, plain)
    if fmt == "int4" and q.packing == "plain":
        return 0  # this CPU's int4 layout is not one we pack: no kernel to time
    best = 1
    with torch.inference_mode():
        for rows in KERNEL_ROWS_LADDER:
            x = torch.randn(rows, 2048, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
            if best_seconds(lambda x=x: kernel(x, q), 3) >= best_seconds(lambda x=x: gemm(x, q), 3):
                break
            best = rows
    return best


kernel_max_rows.cache_clear = _kernel_max_rows.cache_clear  # type: ignore[attr-defined]


def best_seconds(fn, repeat: int = 5) -> float:
    """The fastest of `repeat` timed calls, after three untimed ones (first calls set things up)."""
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


@cache
def _native_bf16() -> bool:
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def gemm_dtype_cpu(dtype: torch.dtype) -> torch.dtype:
    """bf16 GEMM on CPUs with native bf16, fp32 elsewhere (and always for fp32 inputs)."""
    return torch.bfloat16 if dtype == torch.bfloat16 and _native_bf16() else torch.float32


# --------------------------------------------------------------------------------------------
# Kernel layouts, made once at load


def to_kernel_layout(q: QTensor) -> QTensor:
    """q as its device's kernels read it. On the CPU a weight that is not aligned for the kernels
    (KERNEL_ALIGN) moves into an aligned copy, and an int4 weight is repacked in
    place (its bytes are then only valid with packing set, as the returned QTensor and its spec say)."""
    if q.device.type != "cpu":
        return q
    if not is_aligned(q.weight):  # the copy replaces the weight: the mapped pages are let go
        q = dataclasses.replace(q, weight=q.weight.clone(memory_format=torch.contiguous_format))
        assert is_aligned(q.weight), "torch's CPU allocator aligns to 64 bytes"
    if q.fmt != "int4" or q.packing != "plain":
        return q
    packing = cpu_packing()
    if not cpu_packable(q.shape, packing):
        return q
    assert packing is not None
    repack_for_cpu(q.weight, (q.shape[0], q.shape[1]), packing)
    return dataclasses.replace(q, packing=packing)


def kernel_pack_layout(layout: PackLayout, blobs: list[Tensor]) -> PackLayout:
    """Repack every int4 tensor of these expert blobs (uint8 [E, nbytes] each, on the CPU) in place;
    returns the layout that now describes them."""
    specs = dict(layout.specs)
    for blob in blobs:
        for e in range(blob.shape[0]):
            for name, q in unpack(blob[e], layout).items():
                kq = to_kernel_layout(q)
                assert kq.weight.data_ptr() == q.weight.data_ptr(), "blob rows are aligned: in place"
                specs[name] = kq.spec
    return dataclasses.replace(layout, specs=specs)
