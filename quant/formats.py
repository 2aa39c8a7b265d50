"""Quantized tensor formats: NF4 / FP4 (bitsandbytes 4-bit, optional double quant) and int8 row-wise.

A `QTensor` holds exactly the tensors bitsandbytes' own functions produce, so either side can
read the other's output:

    nf4 / fp4   weight            uint8 [(n + 1) // 2, 1]   two 4-bit codes per byte, high nibble first
                absmax            fp32 [blocks]             (double quant: uint8 [blocks])
                quant_map         fp32 [16]                 the 4-bit code book
                nested_absmax     fp32 [ceil(blocks / 256)] double quant only
                nested_quant_map  fp32 [256]                double quant only: bnb's dynamic 8-bit map
                offset            fp32 []                   double quant only: mean of the absmax
    int8        weight            int8, the weight's shape  round(w * 127 / row absmax)
                absmax            fp32 [rows]               row absmax (bnb calls it SCB / row_stats)

`quantize` is bit-for-bit identical to `bitsandbytes.functional.quantize_4bit` (quant_storage uint8)
and `int8_vectorwise_quant`. On CUDA it calls those kernels; on the CPU it reproduces, op for op, the
float32 arithmetic bitsandbytes 0.50 does there (its torch `quantize_4bit` and its C++ 8-bit
blockwise quantizer for the nested absmax), but several times faster: the nearest-code search is a
table lookup on the float's top 12 bits plus one comparison instead of a binary search, over
cache-sized chunks, on one thread. A self-check against the installed bitsandbytes (once per format)
falls back to bnb's own code if a future bnb rounds differently.

Storage can be sized without quantizing anything (`storage_nbytes`, `QSpec`), and several QTensors
(an expert's gate, up and down) pack into one aligned uint8 blob (`pack` / `unpack`), so one
`copy_()` moves an expert between host and GPU.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import torch
from torch import Tensor

from .errors import UserError

logger = logging.getLogger(__name__)

FORMATS = ("nf4", "fp4", "int8")
FOUR_BIT_FORMATS = ("nf4", "fp4")
DEFAULT_BLOCKSIZE = 64
# The block sizes bitsandbytes' quantize_4bit accepts.
VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# Double quantization: the absmax is itself quantized in blocks of 256 with the dynamic 8-bit map.
NESTED_BLOCKSIZE = 256
INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Each piece of a packed blob starts at a multiple of this (fp32 views, cache lines, CUDA loads).
PACK_ALIGN = 64
# Elements quantized per step on the CPU: bounds temporary memory, keeps the working set in cache.
CPU_CHUNK_ELEMS = 1 << 18

# Part names, in storage order. `to_tensors(prefix)` writes f"{prefix}.{part}".
PARTS = ("weight", "absmax", "quant_map", "nested_absmax", "nested_quant_map", "offset")

_DTYPE_NAMES = {
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float32: "float32",
    torch.uint8: "uint8",
    torch.int8: "int8",
}
_DTYPES_BY_NAME = {v: k for k, v in _DTYPE_NAMES.items()}

_LITTLE_ENDIAN = sys.byteorder == "little"

# Per-thread caches: reusable scratch buffers and derived tables.
_local = threading.local()

# The 4-bit key is the top 12 bits of a float32: sign, 8 exponent bits, 3 mantissa bits.
_KEY_SHIFT = 20
_NUM_KEYS = 1 << (32 - _KEY_SHIFT)


class QuantFormatError(UserError, ValueError):
    """A bad format name, block size or input for quantization."""


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES[dtype]


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES_BY_NAME[name]
    except KeyError:
        raise QuantFormatError(f"Unknown dtype {name!r} in quantized tensor metadata.") from None


def check_format(fmt: str, blocksize: int = DEFAULT_BLOCKSIZE, double_quant: bool = False) -> None:
    """Raise `QuantFormatError` (a UserError and a ValueError) unless the recipe is valid."""
    if fmt not in FORMATS:
        raise QuantFormatError(f"Unknown quantization format {fmt!r}; expected one of {', '.join(FORMATS)}.")
    if fmt in FOUR_BIT_FORMATS and blocksize not in VALID_BLOCKSIZES:
        raise QuantFormatError(
            f"Block size {blocksize!r} is not supported for {fmt}; use one of {', '.join(map(str, VALID_BLOCKSIZES))}."
        )
    if fmt == "int8" and double_quant:
        raise QuantFormatError(
            "Double quantization applies to nf4/fp4 only, not to int8 (one scale per row)."
        )


# --------------------------------------------------------------------------------------------
# Sizes, without quantizing anything


@dataclass(frozen=True)
class QSpec:
    """Everything that fixes a QTensor's storage: usable by a memory estimator before quantizing."""

    shape: tuple[int, ...]
    fmt: str
    blocksize: int = DEFAULT_BLOCKSIZE
    double_quant: bool = False
    dtype: torch.dtype = torch.bfloat16  # the original (dequantized) dtype

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        check_format(self.fmt, self.blocksize, self.double_quant)
        if self.fmt == "int8":
            if len(self.shape) == 0:
                raise QuantFormatError(
                    "int8 row-wise quantization needs a tensor with at least one dimension."
                )
            object.__setattr__(self, "blocksize", self.shape[-1])

    def meta(self) -> dict[str, Any]:
        """The JSON-able form (spec_from_meta reads it back)."""
        return {
            "format": self.fmt,
            "shape": list(self.shape),
            "dtype": dtype_name(self.dtype),
            "blocksize": self.blocksize,
            "double_quant": self.double_quant,
        }

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def parts(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """(part name, dtype, shape) of every stored tensor, in storage order."""
        n = self.numel
        if self.fmt == "int8":
            rows = n // self.shape[-1] if self.shape[-1] else 0
            return [("weight", torch.int8, self.shape), ("absmax", torch.float32, (rows,))]
        blocks = -(-n // self.blocksize)
        out = [("weight", torch.uint8, ((n + 1) // 2, 1))]
        if self.double_quant:
            out += [
                ("absmax", torch.uint8, (blocks,)),
                ("quant_map", torch.float32, (16,)),
                ("nested_absmax", torch.float32, (-(-blocks // NESTED_BLOCKSIZE),)),
                ("nested_quant_map", torch.float32, (256,)),
                ("offset", torch.float32, ()),
            ]
        else:
            out += [("absmax", torch.float32, (blocks,)), ("quant_map", torch.float32, (16,))]
        return out

    @property
    def nbytes(self) -> int:
        return sum(math.prod(shape) * dt.itemsize for _, dt, shape in self.parts())

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.numel


def storage_nbytes(
    shape: tuple[int, ...] | torch.Size,
    fmt: str,
    blocksize: int = DEFAULT_BLOCKSIZE,
    double_quant: bool = False,
) -> int:
    """Exact bytes of every tensor a QTensor of this recipe holds (packed codes, scales, code books)."""
    return QSpec(tuple(shape), fmt, blocksize, double_quant).nbytes


# --------------------------------------------------------------------------------------------
# The tensor


@dataclass(eq=False)
class QTensor:
    """A quantized tensor: bitsandbytes' own storage plus the facts needed to read it."""

    fmt: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    blocksize: int  # 4-bit: elements per absmax; int8: the row length
    weight: Tensor
    absmax: Tensor
    quant_map: Tensor | None = None
    nested_absmax: Tensor | None = None
    nested_quant_map: Tensor | None = None
    offset: Tensor | None = None
    _bnb_state: Any = field(default=None, init=False, repr=False, compare=False)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def spec(self) -> QSpec:
        return QSpec(self.shape, self.fmt, self.blocksize, self.double_quant, self.dtype)

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def parts(self) -> dict[str, Tensor]:
        """The stored tensors by part name (absent parts left out), in storage order."""
        return {name: t for name in PARTS if (t := getattr(self, name)) is not None}

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.parts().values())

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.numel

    def to(self, device: torch.device | str, non_blocking: bool = False) -> QTensor:
        moved = {k: t.to(device, non_blocking=non_blocking) for k, t in self.parts().items()}
        return QTensor(self.fmt, self.shape, self.dtype, self.blocksize, **moved)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        return dequantize(self, dtype)

    def bnb_quant_state(self):  # -> bitsandbytes.functional.QuantState
        """`to_bnb_quant_state(self)`, built once and kept (the CUDA kernels take it on every call)."""
        if self._bnb_state is None:
            self._bnb_state = to_bnb_quant_state(self)
        return self._bnb_state

    # ---- serialization: tensors plus a small JSON-able dict

    def meta(self) -> dict[str, Any]:
        """JSON-able facts that the tensors alone do not carry."""
        return self.spec.meta()

    def to_tensors(self, prefix: str) -> dict[str, Tensor]:
        """{f"{prefix}.{part}": tensor}, e.g. "...q_proj.weight", "...q_proj.absmax" (safetensors-ready)."""
        return {f"{prefix}.{name}": t.contiguous() for name, t in self.parts().items()}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], prefix: str, meta: Mapping[str, Any]) -> QTensor:
        """Inverse of `to_tensors`: the tensors are used as they are (no copy)."""
        spec = spec_from_meta(meta)
        found = {}
        for name, dt, shape in spec.parts():
            key = f"{prefix}.{name}"
            if key not in tensors:
                raise QuantFormatError(f"Quantized tensor {prefix!r} is missing {key!r}.")
            t = tensors[key]
            if t.dtype != dt or tuple(t.shape) != shape:
                raise QuantFormatError(
                    f"{key!r} is {t.dtype} {list(t.shape)}, expected {dt} {list(shape)} for {spec.fmt} {list(spec.shape)}."
                )
            found[name] = t
        return cls(spec.fmt, spec.shape, spec.dtype, spec.blocksize, **found)


def spec_from_meta(meta: Mapping[str, Any]) -> QSpec:
    return QSpec(
        tuple(meta["shape"]),
        meta["format"],
        int(meta.get("blocksize", DEFAULT_BLOCKSIZE)),
        bool(meta.get("double_quant", False)),
        dtype_from_name(meta.get("dtype", "bfloat16")),
    )


# --------------------------------------------------------------------------------------------
# Code books and the tables that reproduce bitsandbytes' rounding


@cache
def _code_4bit(fmt: str) -> Tensor:
    """bitsandbytes' 16-entry code book (fp32, CPU). FP4 lists +0.0 twice (indices 0 and 8)."""
    from bitsandbytes.functional import get_4bit_type

    return get_4bit_type(fmt, device="cpu").float().contiguous()


@cache
def _dynamic_map() -> Tensor:
    """bitsandbytes' signed dynamic 8-bit map used for the nested absmax (fp32 [256], CPU)."""
    from bitsandbytes.functional import create_dynamic_map

    return create_dynamic_map().float().contiguous()


@cache
def _bounds_4bit(fmt: str) -> tuple[Tensor, Tensor]:
    """Midpoints between sorted codes and the sort order, computed exactly as bitsandbytes does.

    bnb's torch quantizer: q = order[bucketize(clamp(x * (1/absmax), -1, 1), midpoints)].
    `argsort` is not stable: for FP4's two zeros its tie order decides which nibble small values get.
    """
    code = _code_4bit(fmt)
    order = torch.argsort(code)
    bounds = (code[order[:-1]] + code[order[1:]]) / 2
    return bounds, order


@cache
def _lut_4bit(fmt: str) -> tuple[Tensor, Tensor, Tensor]:
    """Tables giving bnb's bucketize from a float32's top 12 bits plus one comparison.

    Each 12-bit key k (sign, 8 exponent bits, 3 mantissa bits) covers an interval of float32
    values that holds at most one bound, bound_at[k] (+inf if none). With g = (s > bound_at[k]),
    the 4-bit code is codes[k + 4096 * g]; `codes_hi` holds the same codes shifted into the high
    nibble, for the even elements of each byte.
    """
    bounds, order = _bounds_4bit(fmt)
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
def _lut_dynamic() -> Tensor:
    """bnb's C++ 8-bit quantizer table: 65536 grid points of [-1, 1] -> nearest dynamic-map index.

    lut[i] = #{midpoints < v_i}, v_i = fp32(fp32(2 i) / 65535) - 1, midpoint_j = (c_j + c_{j+1}) * 0.5.
    """
    code = _dynamic_map()
    mids = (code[:-1] + code[1:]) * 0.5
    i2 = torch.arange(65536, dtype=torch.float32) * 2
    v = torch.div(i2, torch.full_like(i2, 65535.0)) - 1.0
    return torch.searchsorted(mids, v, side="left").to(torch.uint8)


# --------------------------------------------------------------------------------------------
# Quantize


@cache
def _fast_path_matches_bnb(fmt: str, double_quant: bool) -> bool:
    """The CPU fast path reproduces bitsandbytes 0.50's arithmetic; check the installed bnb once.

    On a mismatch (a bnb that rounds differently) quantize falls back to bnb's own CPU code, so
    the output stays identical to bnb's, only slower.
    """
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300 * 64 + 37, generator=g)
    w[:64] = 0  # a zero block
    w[64:128] *= 1e-39  # a block below bnb's 1e-38 absmax clamp
    if fmt != "int8":
        w[128:192] = _bounds_4bit(fmt)[0].repeat(5)[:64]  # values on the rounding midpoints
        w[128] = 1.0
    ok = True
    for dtype in INPUT_DTYPES:
        x = w.to(dtype)
        if fmt == "int8":
            from bitsandbytes.functional import int8_vectorwise_quant

            x = x[: 300 * 64].view(300, 64)
            ours, ref = _quantize_int8(x), int8_vectorwise_quant(x.clone())[:2]
        else:
            q, r = _quantize_4bit_fast(x, fmt, 64, double_quant), _quantize_4bit_bnb(x, fmt, 64, double_quant)
            ours, ref = tuple(q.parts().values()), tuple(r.parts().values())
        ok &= len(ours) == len(ref) and all(_same_bits(a, b) for a, b in zip(ours, ref, strict=True))
    if not ok:
        import bitsandbytes

        logger.warning(
            "bitsandbytes %s quantizes %s differently from the version quant.formats mirrors; "
            "using its own (slower) CPU quantizer.",
            bitsandbytes.__version__,
            fmt + (" with double quant" if double_quant else ""),
        )
    return ok


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run the CPU quantizer's many short ops on this thread alone.

    Its hot op (index_select) is serial anyway, so a second thread adds little when the machine
    is idle, and when another process holds a core the per-op thread barriers cost several times
    the work (measured on 2 cores: 500 MB/s on one thread vs 30-160 MB/s on two, contended).
    With OpenMP the setting is per calling thread; MKL's is process-wide while this runs.
    """
    n = torch.get_num_threads()
    if n == 1 or not _openmp_backend():
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@cache
def _openmp_backend() -> bool:
    """With OpenMP the thread count is per calling thread; other backends only warn on changes."""
    return "OpenMP" in torch.__config__.parallel_info()


def _same_bits(a: Tensor, b: Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(
            a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8)
        )
    )


@torch.no_grad()
def quantize(
    weight: Tensor, fmt: str, blocksize: int = DEFAULT_BLOCKSIZE, double_quant: bool = False
) -> QTensor:
    """Quantize `weight` (bf16/fp16/fp32) to nf4, fp4 or int8; identical to bitsandbytes' output.

    int8 is row-wise over the last dimension and ignores `blocksize`.
    """
    check_format(fmt, blocksize, double_quant)
    if weight.dtype not in INPUT_DTYPES:
        raise QuantFormatError(f"Can only quantize bfloat16, float16 or float32 tensors, not {weight.dtype}.")
    if weight.numel() == 0:
        raise QuantFormatError("Cannot quantize an empty tensor.")
    shape = tuple(weight.shape)
    if fmt == "int8":
        if weight.dim() == 0:
            raise QuantFormatError("int8 row-wise quantization needs a tensor with at least one dimension.")
        if weight.is_cuda:
            data, row_absmax = _quantize_int8(weight)
        elif _fast_path_matches_bnb("int8", False):
            with _one_thread():
                data, row_absmax = _quantize_int8(weight)
        else:
            from bitsandbytes.functional import int8_vectorwise_quant

            data, row_absmax, _ = int8_vectorwise_quant(weight.reshape(-1, shape[-1]).contiguous())
        return QTensor("int8", shape, weight.dtype, shape[-1], data.reshape(shape), row_absmax)

    if weight.is_cuda or not _fast_path_matches_bnb(fmt, double_quant):
        return _quantize_4bit_bnb(weight, fmt, blocksize, double_quant)
    return _quantize_4bit_fast(weight, fmt, blocksize, double_quant)


def _quantize_4bit_bnb(weight: Tensor, fmt: str, blocksize: int, double_quant: bool) -> QTensor:
    from bitsandbytes.functional import quantize_4bit

    packed, state = quantize_4bit(
        weight,
        blocksize=blocksize,
        compress_statistics=double_quant,
        quant_type=fmt,
        quant_storage=torch.uint8,
    )
    return from_bnb(packed, state)


def _quantize_4bit_fast(weight: Tensor, fmt: str, blocksize: int, double_quant: bool) -> QTensor:
    shape = tuple(weight.shape)
    with _one_thread():
        packed, absmax = _quantize_4bit_cpu(weight.contiguous().reshape(-1), fmt, blocksize)
    code = _code_4bit(fmt).clone()
    if not double_quant:
        return QTensor(fmt, shape, weight.dtype, blocksize, packed, absmax, code)
    offset = absmax.mean()
    qabsmax, nested_absmax = _quantize_dynamic_cpu(absmax - offset, NESTED_BLOCKSIZE)
    return QTensor(
        fmt,
        shape,
        weight.dtype,
        blocksize,
        packed,
        qabsmax,
        code,
        nested_absmax,
        _dynamic_map().clone(),
        offset,
    )


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


def _quantize_4bit_cpu(flat: Tensor, fmt: str, blocksize: int) -> tuple[Tensor, Tensor]:
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
    bound_at, codes, codes_hi = _lut_4bit(fmt)
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
        bounds, order = _bounds_4bit(fmt)
        tail = flat[full:].float()
        am = tail.abs().max().clamp(min=1e-38)
        absmax[-1] = am
        st = torch.clamp(tail / am, -1, 1)
        if st.numel() % 2:
            st = torch.nn.functional.pad(st, (0, 1))
        qt = order[torch.bucketize(st, bounds)].to(torch.uint8).view(-1, 2)
        packed[full // 2 :] = (qt[:, 0] << 4) | qt[:, 1]
    return packed.unsqueeze(1), absmax


def _quantize_dynamic_cpu(a: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
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
    out = torch.index_select(_lut_dynamic(), 0, idx.view(-1)).view(blocks, blocksize)
    out.masked_fill_((absmax == 0).unsqueeze(1), 0)
    return out.view(-1)[:n].clone(), absmax


def _quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """bnb's int8_vectorwise_quant (threshold 0), row by row over the last dimension."""
    a = weight.reshape(-1, weight.shape[-1])
    if weight.is_cuda:
        from bitsandbytes.functional import int8_vectorwise_quant

        data, row_absmax, _ = int8_vectorwise_quant(a.contiguous())
        return data.reshape(weight.shape), row_absmax
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


# --------------------------------------------------------------------------------------------
# Dequantize


@torch.no_grad()
def dequantize(q: QTensor, dtype: torch.dtype | None = None, out: Tensor | None = None) -> Tensor:
    """The weight the QTensor stands for, in `dtype` (default: the original dtype), shaped as before.

    Equal to bitsandbytes' `dequantize_4bit` and to `int8_vectorwise_dequant(...).to(dtype)`.
    `out`: an optional contiguous tensor of q's numel and of `dtype` to write into (a reusable scratch).
    """
    dtype = out.dtype if out is not None else (dtype or q.dtype)
    if out is None:
        out = torch.empty(q.shape, dtype=dtype, device=q.device)
    elif out.numel() != q.numel or not out.is_contiguous():
        raise ValueError(f"dequantize: out must be contiguous with {q.numel} elements")
    res = out.view(q.shape)
    if q.fmt == "int8":
        # bnb: A * stats.view(-1, 1) * 7.874015718698502e-3, in fp32
        w = q.weight.reshape(-1, q.shape[-1])
        tmp = res if dtype == torch.float32 else scratch("dq_int8", q.numel, torch.float32, q.device)
        torch.mul(w, q.absmax.view(-1, 1), out=tmp.view(w.shape))
        torch.mul(tmp.view(w.shape), 7.874015718698502e-3, out=res.view(w.shape))
        return res
    if q.device.type == "cuda":
        from bitsandbytes.functional import dequantize_4bit

        if dtype == q.dtype:
            dequantize_4bit(q.weight, q.bnb_quant_state(), out=res)
        else:
            res.copy_(dequantize_4bit(q.weight, q.bnb_quant_state()).reshape(q.shape))
        return res
    n, bs = q.numel, q.blocksize
    absmax = block_absmax(q)
    # byte -> its two fp32 codes, as one int64, so that a single 1-D gather expands a byte
    pairs = _code_pairs(q.quant_map, q.fmt)
    idx = scratch("dq_idx", q.weight.numel(), torch.int32).copy_(q.weight.view(-1))
    vals = torch.index_select(pairs, 0, idx, out=scratch("dq_vals", idx.numel(), torch.int64))
    vals = vals.view(torch.float32)[:n]
    full = (n // bs) * bs
    flat = res.view(-1)
    torch.mul(vals[:full].view(-1, bs), absmax[: full // bs].unsqueeze(1), out=flat[:full].view(-1, bs))
    if full < n:
        torch.mul(vals[full:], absmax[-1], out=flat[full:])
    return res


def _code_pairs(code: Tensor | None, fmt: str) -> Tensor:
    """[256] int64: byte b -> (code[b >> 4], code[b & 15]) as two fp32 in one int64.

    FP4's nibble 8 (sign bit, zero magnitude) decodes to -0.0 in bnb's C++ and CUDA kernels,
    though its code table says +0.0; we follow the kernels.
    """
    assert code is not None
    cached = _local.__dict__.setdefault("code_pairs", {})
    key = (fmt, *code.tolist())
    if key not in cached:
        byte = torch.arange(256)
        c = code.cpu().float().clone()
        if fmt == "fp4" and c[8] == 0:
            c[8] = -0.0
        cached[key] = torch.stack([c[byte >> 4], c[byte & 15]], dim=1).contiguous().view(torch.int64).view(-1)
    return cached[key]


# Scratch tensors up to this size are kept per thread and reused (fresh pages are slow to fault in).
SCRATCH_KEEP_BYTES = 64 << 20


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


def block_absmax(q: QTensor) -> Tensor:
    """The fp32 absmax per 4-bit block, undoing double quantization as bnb does:
    code[qabsmax[i]] * nested_absmax[i // 256], then + offset."""
    if not q.double_quant:
        return q.absmax
    assert q.nested_quant_map is not None and q.nested_absmax is not None and q.offset is not None
    nb = q.absmax.numel()
    vals = torch.index_select(q.nested_quant_map, 0, q.absmax.to(torch.int32))
    out = torch.empty(nb, dtype=torch.float32, device=vals.device)
    full = (nb // NESTED_BLOCKSIZE) * NESTED_BLOCKSIZE
    torch.mul(
        vals[:full].view(-1, NESTED_BLOCKSIZE),
        q.nested_absmax[: full // NESTED_BLOCKSIZE].unsqueeze(1),
        out=out[:full].view(-1, NESTED_BLOCKSIZE),
    )
    if full < nb:
        torch.mul(vals[full:], q.nested_absmax[-1], out=out[full:])
    return out.add_(q.offset)


# --------------------------------------------------------------------------------------------
# bitsandbytes interop


def to_bnb_quant_state(q: QTensor):  # -> bitsandbytes.functional.QuantState
    """A bitsandbytes QuantState over this QTensor's tensors (no copies), for 4-bit formats."""
    from bitsandbytes.functional import QuantState

    if q.fmt not in FOUR_BIT_FORMATS:
        raise QuantFormatError(f"Only nf4/fp4 have a bitsandbytes QuantState, not {q.fmt}.")
    state2 = None
    if q.double_quant:
        state2 = QuantState(
            absmax=q.nested_absmax, code=q.nested_quant_map, blocksize=NESTED_BLOCKSIZE, dtype=torch.float32
        )
    return QuantState(
        absmax=q.absmax,
        shape=torch.Size(q.shape),
        code=q.quant_map,
        blocksize=q.blocksize,
        quant_type=q.fmt,
        dtype=q.dtype,
        offset=q.offset,
        state2=state2,
    )


def from_bnb(
    data: Tensor, state: Any, shape: tuple[int, ...] | None = None, dtype: torch.dtype | None = None
) -> QTensor:
    """Wrap bitsandbytes output: (packed, QuantState) from quantize_4bit, or (int8 data, row stats).

    For int8, `shape` defaults to data's shape and `dtype` (the original dtype) to bfloat16.
    """
    if isinstance(state, Tensor):
        shape = tuple(shape or data.shape)
        return QTensor("int8", shape, dtype or torch.bfloat16, shape[-1], data.reshape(shape), state)
    if data.dtype != torch.uint8:
        data = data.view(torch.uint8)
    nested = state.state2 if state.nested else None
    return QTensor(
        state.quant_type,
        tuple(state.shape),
        state.dtype,
        state.blocksize,
        data.reshape(-1, 1),
        state.absmax,
        state.code,
        nested.absmax if nested else None,
        nested.code if nested else None,
        state.offset if nested else None,
    )


# --------------------------------------------------------------------------------------------
# Packing several QTensors into one blob


@dataclass(frozen=True)
class Slot:
    """One stored tensor inside a blob: bytes [offset, offset + nbytes)."""

    name: str  # the QTensor's name in the pack, e.g. "gate_proj"
    part: str  # "weight", "absmax", ...
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class PackLayout:
    """Where each QTensor's parts live in a packed blob; JSON-able through to_dict / from_dict."""

    specs: dict[str, QSpec]
    slots: tuple[Slot, ...]
    nbytes: int
    align: int = PACK_ALIGN

    def __iter__(self) -> Iterator[Slot]:
        return iter(self.slots)

    def to_dict(self) -> dict[str, Any]:
        return {
            "nbytes": self.nbytes,
            "align": self.align,
            "tensors": {name: s.meta() for name, s in self.specs.items()},
            "slots": [
                [sl.name, sl.part, sl.offset, dtype_name(sl.dtype), list(sl.shape)] for sl in self.slots
            ],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PackLayout:
        specs = {name: spec_from_meta(m) for name, m in d["tensors"].items()}
        slots = tuple(Slot(n, p, int(o), dtype_from_name(dt), tuple(sh)) for n, p, o, dt, sh in d["slots"])
        return cls(specs, slots, int(d["nbytes"]), int(d.get("align", PACK_ALIGN)))


def pack_layout(specs: Mapping[str, QSpec], align: int = PACK_ALIGN) -> PackLayout:
    """The blob layout for these QTensor specs, computed without any tensor (for memory planning)."""
    slots = []
    pos = 0
    for name, spec in specs.items():
        for part, dt, shape in spec.parts():
            pos = -(-pos // align) * align
            slots.append(Slot(name, part, pos, dt, shape))
            pos += math.prod(shape) * dt.itemsize
    total = -(-pos // align) * align
    return PackLayout(dict(specs), tuple(slots), total, align)


def pack(
    qs: Mapping[str, QTensor], align: int = PACK_ALIGN, out: Tensor | None = None
) -> tuple[Tensor, PackLayout]:
    """Copy several QTensors into one contiguous uint8 blob (e.g. a pinned host buffer given as `out`)."""
    layout = pack_layout({name: q.spec for name, q in qs.items()}, align)
    if out is None:
        device = next(iter(qs.values())).device if qs else torch.device("cpu")
        out = torch.zeros(layout.nbytes, dtype=torch.uint8, device=device)
    elif out.dtype != torch.uint8 or out.dim() != 1 or out.numel() < layout.nbytes:
        raise ValueError(f"pack: out must be a 1-D uint8 tensor of at least {layout.nbytes} bytes")
    for slot in layout.slots:
        t = getattr(qs[slot.name], slot.part)
        dst = out[slot.offset : slot.offset + slot.nbytes]
        dst.copy_(t.contiguous().reshape(-1).view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8))
    return out, layout


def unpack(blob: Tensor, layout: PackLayout) -> dict[str, QTensor]:
    """QTensors whose tensors are views into `blob` (no copy): valid while the blob is."""
    if blob.dtype != torch.uint8 or blob.dim() != 1 or blob.numel() < layout.nbytes:
        raise ValueError(f"unpack: blob must be a 1-D uint8 tensor of at least {layout.nbytes} bytes")
    parts: dict[str, dict[str, Tensor]] = {name: {} for name in layout.specs}
    for slot in layout.slots:
        raw = blob[slot.offset : slot.offset + slot.nbytes]
        parts[slot.name][slot.part] = raw.view(slot.dtype).view(slot.shape)
    return {
        name: QTensor(spec.fmt, spec.shape, spec.dtype, spec.blocksize, **parts[name])
        for name, spec in layout.specs.items()
    }
