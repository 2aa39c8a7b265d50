"""bitsandbytes' CPU quantizers, reproduced op for op in float32 but several times faster, without
importing bitsandbytes: its 4-bit code books and nested-absmax map, the 4-bit quantizer (a table
lookup on the float's top 12 bits plus one comparison instead of a binary search), the 8-bit
blockwise quantizer of double quantization, and int8 row-wise. quant.formats builds QTensors
from them; tests/test_quant_formats.py holds every byte to the installed bitsandbytes.
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import torch
from torch import Tensor

from .scratch import scratch
from .threads import thread_count

# Elements quantized per step on the CPU: bounds temporary memory, keeps the working set in cache.
CPU_CHUNK_ELEMS = 1 << 18
# Elements quantized per step on a GPU: bounds the fp32 temporaries to 64 MiB.
DEVICE_CHUNK_ELEMS = 1 << 24
_LITTLE_ENDIAN = sys.byteorder == "little"
# Per-thread caches of the chunk buffers.
_local = threading.local()
# The 4-bit key is the top 12 bits of a float32: sign, 8 exponent bits, 3 mantissa bits.
_KEY_SHIFT = 20
_NUM_KEYS = 1 << (32 - _KEY_SHIFT)


# --------------------------------------------------------------------------------------------
# Code books and the tables that reproduce bitsandbytes' rounding


# bitsandbytes' 16-entry code books (its get_4bit_type, as fp32). FP4 lists +0.0 twice (0 and 8).
_CODES_4BIT = {
    "nf4": [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    "fp4": [
        0.0, 0.0052083334885537624, 0.6666666865348816, 1.0,
        0.3333333432674408, 0.5, 0.1666666716337204, 0.25,
        0.0, -0.0052083334885537624, -0.6666666865348816, -1.0,
        -0.3333333432674408, -0.5, -0.1666666716337204, -0.25,
    ],
}  # fmt: skip


@cache
def code_4bit(fmt: str) -> Tensor:
    """bitsandbytes' code book for fmt (fp32 [16], CPU), without importing bitsandbytes."""
    return torch.tensor(_CODES_4BIT[fmt], dtype=torch.float32)


@cache
def dynamic_map() -> Tensor:
    """bitsandbytes' signed dynamic 8-bit map (its createdynamic_map(), same fp32 arithmetic):
    the code of the nested absmax. Per decade 10**-6 .. 10**0, 2**i midpoints of a linspace, +-."""
    data = []
    for i in range(7):
        b = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (b[:-1] + b[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist() + (-(10 ** (-6 + i)) * means).tolist()
    return torch.tensor(sorted([*data, 0, 1.0]), dtype=torch.float32)


@cache
def bounds_4bit(fmt: str) -> tuple[Tensor, Tensor]:
    """Midpoints between sorted codes and the sort order, computed exactly as bitsandbytes does.

    bnb's torch quantizer: q = order[bucketize(clamp(x * (1/absmax), -1, 1), midpoints)].
    `argsort` is not stable: for FP4's two zeros its tie order decides which nibble small values get.
    """
    code = code_4bit(fmt)
    order = torch.argsort(code)
    bounds = (code[order[:-1]] + code[order[1:]]) / 2
    return bounds, order


@cache
def lut_4bit(fmt: str) -> tuple[Tensor, Tensor, Tensor]:
    """Tables giving bnb's bucketize from a float32's top 12 bits plus one comparison.

    Each 12-bit key k (sign, 8 exponent bits, 3 mantissa bits) covers an interval of float32
    values that holds at most one bound, bound_at[k] (+inf if none). With g = (s > bound_at[k]),
    the 4-bit code is codes[k + 4096 * g]; `codes_hi` holds the same codes shifted into the high
    nibble, for the even elements of each byte.
    """
    bounds, order = bounds_4bit(fmt)
    b = bounds.double().tolist()
    nb = len(b)
    keys = torch.arange(_NUM_KEYS, dtype=torch.int64)
    first = (keys << _KEY_SHIFT).to(torch.int32).view(torch.float32).double().tolist()
    last = (
        ((keys << _KEY_SHIFT) | ((1 << _KEY_SHIFT) - 1)).to(torch.int32).view(torch.float32).double().tolist()
    )
    bound_at = torch.full((_NUM_KEYS,), math.inf, dtype=torch.float32)
    sorted_idx = torch.zeros(2 * _NUM_KEYS, dtype=torch.int64)
    for k in range(_NUM_KEYS):
        lo, hi = min(first[k], last[k]), max(first[k], last[k])
        if not (math.isfinite(lo) and math.isfinite(hi)):
            # inf / NaN keys: torch.bucketize puts NaN past the last bound (s is never +-inf here)
            sorted_idx[k] = sorted_idx[_NUM_KEYS + k] = nb
            continue
        below = sum(x < lo for x in b)
        inside = [x for x in b if lo <= x < hi]
        assert len(inside) <= 1, "a 12-bit key interval holds two bounds"
        sorted_idx[k] = below
        sorted_idx[_NUM_KEYS + k] = min(below + 1, nb)
        if inside:
            bound_at[k] = inside[0]
    codes = order[sorted_idx].to(torch.uint8)
    return bound_at, codes, codes << 4


@cache
def lut_dynamic() -> Tensor:
    """bnb's C++ 8-bit quantizer table: 65536 grid points of [-1, 1] -> nearest dynamic-map index.

    lut[i] = #{midpoints < v_i}, v_i = fp32(fp32(2 i) / 65535) - 1, midpoint_j = (c_j + c_{j+1}) * 0.5.
    """
    code = dynamic_map()
    mids = (code[:-1] + code[1:]) * 0.5
    i2 = torch.arange(65536, dtype=torch.float32) * 2
    v = torch.div(i2, torch.full_like(i2, 65535.0)) - 1.0
    return torch.searchsorted(mids, v, side="left").to(torch.uint8)


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the CPU quantizer's many short ops on this thread alone.

    Its hot op (index_select) is serial anyway, so a second thread adds little when the machine
    is idle, and when another process holds a core the per-op thread barriers cost several times
    the work (measured on 2 cores: 500 MB/s on one thread vs 30-160 MB/s on two, contended).
    Only where the count is per thread (quant.threads).
    """
    with thread_count(1):
        yield


class _Scratch4bit:
    """Work buffers for one chunk of m elements; the chunk is de-interleaved so that even elements
    (high nibbles) fill the first half and odd elements the second, which keeps every op contiguous."""

    def __init__(self, m: int, blocksize: int, in_dtype: torch.dtype) -> None:
        h = m // 2
        int_dtype = torch.int32 if in_dtype == torch.float32 else torch.int16
        self.abs_bits = torch.empty((m // blocksize, blocksize), dtype=int_dtype)
        self.absmax_bits = torch.empty(m // blocksize, dtype=int_dtype)
        self.abs_mask = 0x7FFFFFFF if int_dtype == torch.int32 else 0x7FFF
        xf = torch.empty(m, dtype=torch.float32)
        self.x_pairs = xf.view(2, h).t()  # [h, 2]: writing pairs here de-interleaves them
        # bf16 -> fp32 is a 16-bit shift: an int32 holding a bf16 pair gives both halves exactly
        self.even_bits, self.odd_bits = xf[:h].view(torch.int32), xf[h:].view(torch.int32)
        self.x3 = xf.view(2, m // blocksize, blocksize // 2)  # [even/odd, block, blocksize / 2]
        self.s = torch.empty(m, dtype=torch.float32)
        self.s3 = self.s.view(2, m // blocksize, blocksize // 2)
        self.key = torch.empty(m, dtype=torch.int32)
        self.key_even, self.key_odd = self.key[:h], self.key[h:]
        self.diff = torch.empty(m, dtype=torch.float32)
        self.sign = torch.empty(m, dtype=torch.int32)
        self.q = torch.empty(m, dtype=torch.uint8)
        self.q_even, self.q_odd = self.q[:h], self.q[h:]


def _scratch_4bit(m: int, blocksize: int, in_dtype: torch.dtype) -> _Scratch4bit:
    """Per-thread reuse of the chunk buffers: fresh pages cost more here than the arithmetic."""
    cache: dict[tuple, _Scratch4bit] = _local.__dict__.setdefault("scratch_4bit", {})
    key = (m, blocksize, in_dtype)
    if key not in cache:
        if len(cache) >= 4:
            cache.pop(next(iter(cache)))
        cache[key] = _Scratch4bit(m, blocksize, in_dtype)
    return cache[key]


def quantize_4bit_cpu(flat: Tensor, fmt: str, blocksize: int) -> tuple[Tensor, Tensor]:
    """bnb's torch quantize_4bit, bit for bit, as table lookups over cache-sized chunks.

    flat: [n] -> packed uint8 [(n + 1) // 2, 1], absmax fp32 [ceil(n / blocksize)].
    Per element bnb computes s = x * (1 / absmax) in fp32 and code = order[bucketize(s, midpoints)];
    here the bucket comes from s's top 12 bits (a table) corrected by one comparison with the single
    midpoint that can lie in that range: bound - s < 0 exactly when s > bound.
    """
    if flat.storage_offset() % 2:
        flat = flat.clone()  # bf16 pairs are read as int32 and need an even start
    n = flat.numel()
    full_blocks, rem = divmod(n, blocksize)
    full = full_blocks * blocksize
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
    absmax = torch.empty(full_blocks + (1 if rem else 0), dtype=torch.float32)
    bound_at, codes, codes_hi = lut_4bit(fmt)
    step = max(1, CPU_CHUNK_ELEMS // blocksize) * blocksize
    for start in range(0, full, step):
        stop = min(start + step, full)
        m = stop - start
        c = _scratch_4bit(m, blocksize, flat.dtype)
        x = flat[start:stop]
        am = absmax[start // blocksize : stop // blocksize]
        # |x| by clearing the sign bit, max over each block in the integer domain (same order)
        bits = x.view(c.abs_bits.dtype).view(-1, blocksize)
        torch.amax(torch.bitwise_and(bits, c.abs_mask, out=c.abs_bits), dim=1, out=c.absmax_bits)
        am.copy_(c.absmax_bits.view(flat.dtype))
        if flat.dtype == torch.bfloat16 and _LITTLE_ENDIAN:
            pairs = x.view(torch.int32)  # little-endian: even element in the low half
            torch.bitwise_left_shift(pairs, 16, out=c.even_bits)
            torch.bitwise_and(pairs, -0x10000, out=c.odd_bits)
        else:
            c.x_pairs.copy_(x.view(-1, 2))
        recip = 1.0 / am.clamp(min=1e-38)  # exactly bnb's expression
        torch.mul(c.x3, recip.view(1, -1, 1), out=c.s3)
        # bnb clamps s to [-1, 1]; values past +-1 fall in the same end bucket, so that is skipped.
        torch.bitwise_right_shift(c.s.view(torch.int32), _KEY_SHIFT, out=c.key)
        c.key.bitwise_and_(_NUM_KEYS - 1)
        torch.index_select(bound_at, 0, c.key, out=c.diff).sub_(c.s)
        torch.bitwise_right_shift(c.diff.view(torch.int32), 31, out=c.sign)  # -1 where s > bound
        c.key.sub_(c.sign, alpha=_NUM_KEYS)
        torch.index_select(codes_hi, 0, c.key_even, out=c.q_even)
        torch.index_select(codes, 0, c.key_odd, out=c.q_odd)
        torch.bitwise_or(c.q_even, c.q_odd, out=packed[start // 2 : stop // 2])
    if rem:
        # bnb's tail block: its absmax is clamped and it divides instead of multiplying
        bounds, order = bounds_4bit(fmt)
        tail = flat[full:].float()
        am = tail.abs().max().clamp(min=1e-38)
        absmax[-1] = am
        st = torch.clamp(tail / am, -1, 1)
        if st.numel() % 2:
            st = torch.nn.functional.pad(st, (0, 1))
        qt = order[torch.bucketize(st, bounds)].to(torch.uint8).view(-1, 2)
        packed[full // 2 :] = (qt[:, 0] << 4) | qt[:, 1]
    return packed.unsqueeze(1), absmax


def quantize_dynamic_cpu(a: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """bnb's C++ 8-bit blockwise quantizer (cquantize_blockwise_cpu_fp32, 0.50) with the dynamic map.

    Per block: absmax = max |a| (NaN ignored, at least 0); idx16 = trunc(fp32(t * 65535 + 0.5)) with
    t = (clamp(a * (1 / absmax), -1, 1) + 1) * 0.5 (the C code fuses that multiply-add); the code is
    a 65536-entry table at idx16. All-zero blocks store code 0. a: fp32 [n] -> uint8 [n], fp32 [blocks].
    """
    n = a.numel()
    blocks = -(-n // blocksize)
    padded = torch.zeros(blocks * blocksize, dtype=torch.float32)
    padded[:n] = a
    ab = padded.view(blocks, blocksize)
    absmax = torch.nan_to_num(ab.abs(), nan=0.0).amax(dim=1).clamp(min=0.0)
    inv = 1.0 / absmax
    c = torch.clamp(ab * inv.unsqueeze(1), -1.0, 1.0)
    t = (c + 1.0) * 0.5
    # fp32 t is a multiple of 2**-25 below 1, so t * 65535 + 0.5 is exact in fp64; one rounding to
    # fp32 then reproduces the fused multiply-add.
    y = (t.double() * 65535.0 + 0.5).float()
    idx = torch.nan_to_num(y, nan=0.0).to(torch.int32) & 0xFFFF
    out = torch.index_select(lut_dynamic(), 0, idx.view(-1)).view(blocks, blocksize)
    out.masked_fill_((absmax == 0).unsqueeze(1), 0)
    return out.view(-1)[:n].clone(), absmax


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """bnb's int8_vectorwise_quant (threshold 0), row by row over the last dimension."""
    a = weight.reshape(-1, weight.shape[-1])
    if weight.is_cuda:
        # bnb's CUDA int8_vectorwise_quant takes fp16 only: bf16/fp32 rows would be refused, and
        # going through fp16 would round them. The same fp32 arithmetic in torch gives this
        # function's CPU bytes for every dtype.
        return _quantize_int8_device(a)
    a = a.contiguous()
    rows, cols = a.shape
    data = torch.empty((rows, cols), dtype=torch.int8)
    row_absmax = torch.empty(rows, dtype=torch.float32)
    int_dtype, mask = (torch.int32, 0x7FFFFFFF) if a.dtype == torch.float32 else (torch.int16, 0x7FFF)
    step = max(1, CPU_CHUNK_ELEMS // cols)
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        x = a[r0:r1]
        # bnb: row_stats = max(|A|, dim=1).float(); round(A * (127.0 / row_stats)).to(int8)
        bits = scratch("int8_bits", x.numel(), int_dtype).view(x.shape)
        am_bits = scratch("int8_absmax", r1 - r0, int_dtype)
        torch.amax(torch.bitwise_and(x.view(int_dtype), mask, out=bits), dim=1, out=am_bits)
        stats = row_absmax[r0:r1]
        stats.copy_(am_bits.view(a.dtype))
        s = torch.mul(
            x, (127.0 / stats).unsqueeze(-1), out=scratch("int8_s", x.numel(), torch.float32).view(x.shape)
        )
        data[r0:r1].copy_(torch.round(s, out=s))
    return data.reshape(weight.shape), row_absmax


def _quantize_int8_device(a: Tensor) -> tuple[Tensor, Tensor]:
    """quantize_int8 on a GPU: a [rows, cols] -> int8 [rows, cols], row absmax fp32 [rows]."""
    rows, cols = a.shape
    data = torch.empty((rows, cols), dtype=torch.int8, device=a.device)
    row_absmax = torch.empty(rows, dtype=torch.float32, device=a.device)
    step = max(1, DEVICE_CHUNK_ELEMS // cols)
    for r0 in range(0, rows, step):
        x = a[r0 : r0 + step]
        stats = x.abs().amax(dim=1).float()
        row_absmax[r0 : r0 + step] = stats
        data[r0 : r0 + step] = torch.round(x.float() * (127.0 / stats).unsqueeze(-1))
    return data, row_absmax
