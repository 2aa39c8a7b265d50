"""Quantized tensor formats: NF4 / FP4 (bitsandbytes 4-bit, optional double quant), int8 row-wise,
and int4 group-wise affine (torch's int4pack convention; layout in quant/int4.py).

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
    int4        weight            uint8 [N, K / 2]          see quant/int4.py
                scale_zero        bf16 [K / G, N, 2]        G: the group size, kept in `blocksize`

`quantize` is bit-for-bit identical to `bitsandbytes.functional.quantize_4bit` (quant_storage uint8)
and `int8_vectorwise_quant`. On CUDA it calls those kernels; on the CPU it reproduces, op for op, the
float32 arithmetic bitsandbytes 0.50 does there (its torch `quantize_4bit` and its C++ 8-bit
blockwise quantizer for the nested absmax), but several times faster: the nearest-code search is a
table lookup on the float's top 12 bits plus one comparison instead of a binary search, over
cache-sized chunks, on one thread. The CPU path never imports bitsandbytes (its 0.50 import prints
a warning on CPU-only machines); tests/test_quant_formats.py holds it to the installed bnb's bytes.

Storage is sized without quantizing anything in quant/spec.py; several QTensors pack into one blob
in quant/pack.py.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .bnb_cpu import (
    code_4bit,
    dynamic_map,
    one_thread,
    quantize_4bit_cpu,
    quantize_dynamic_cpu,
    quantize_int8,
)
from .int4 import dequantize_int4, quantize_int4
from .scratch import scratch
from .spec import (
    BNB_4BIT_FORMATS,
    DEFAULT_BLOCKSIZE,
    INT8_SCALE,
    NESTED_BLOCKSIZE,
    PARTS,
    QSpec,
    QuantFormatError,
    check_format,
    spec_from_meta,
)

INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# Per-thread cache of the 4-bit decode tables (_code_pairs).
_local = threading.local()


# --------------------------------------------------------------------------------------------
# The tensor


@dataclass(eq=False)
class QTensor:
    """A quantized tensor: bitsandbytes' own storage plus the facts needed to read it."""

    fmt: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    blocksize: int  # nf4/fp4: elements per absmax; int4: the group size; int8: the row length
    weight: Tensor
    absmax: Tensor | None = None
    quant_map: Tensor | None = None
    nested_absmax: Tensor | None = None
    nested_quant_map: Tensor | None = None
    offset: Tensor | None = None
    scale_zero: Tensor | None = None
    packing: str = "plain"
    _bnb_state: Any = field(default=None, init=False, repr=False, compare=False)
    # what a kernel derives from the tensors once (quant/kernels.py), e.g. int8 scales in bf16
    kernel_cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def spec(self) -> QSpec:
        return QSpec(self.shape, self.fmt, self.blocksize, self.double_quant, self.dtype, self.packing)

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
        if self.packing != "plain" and torch.device(device).type != "cpu":
            raise ValueError(f"An int4 tensor in the {self.packing} kernel layout cannot leave the CPU.")
        moved = {k: t.to(device, non_blocking=non_blocking) for k, t in self.parts().items()}
        return QTensor(self.fmt, self.shape, self.dtype, self.blocksize, **moved, packing=self.packing)

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
        return cls(spec.fmt, spec.shape, spec.dtype, spec.blocksize, **found, packing=spec.packing)


# --------------------------------------------------------------------------------------------
# Quantize


@torch.no_grad()
def quantize(
    weight: Tensor, fmt: str, blocksize: int = DEFAULT_BLOCKSIZE, double_quant: bool = False
) -> QTensor:
    """Quantize `weight` (bf16/fp16/fp32) to nf4, fp4 or int8 (identical to bitsandbytes' output),
    or int4 (groups of `blocksize`, quant/int4.py).

    int8 is row-wise over the last dimension and ignores `blocksize`.
    """
    check_format(fmt, blocksize, double_quant)
    if weight.dtype not in INPUT_DTYPES:
        raise QuantFormatError(f"Can only quantize bfloat16, float16 or float32 tensors, not {weight.dtype}.")
    if weight.numel() == 0:
        raise QuantFormatError("Cannot quantize an empty tensor.")
    shape = tuple(weight.shape)
    if fmt == "int4":
        QSpec(shape, fmt, blocksize)  # checks the shape
        packed, scale_zero = quantize_int4(weight, blocksize)
        return QTensor(fmt, shape, weight.dtype, blocksize, packed, scale_zero=scale_zero)
    if fmt == "int8":
        if weight.dim() == 0:
            raise QuantFormatError("int8 row-wise quantization needs a tensor with at least one dimension.")
        if weight.is_cuda:
            data, row_absmax = quantize_int8(weight)
        else:
            with one_thread():
                data, row_absmax = quantize_int8(weight)
        return QTensor("int8", shape, weight.dtype, shape[-1], data.reshape(shape), row_absmax)

    if weight.is_cuda:
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
    with one_thread():
        packed, absmax = quantize_4bit_cpu(weight.contiguous().reshape(-1), fmt, blocksize)
    code = code_4bit(fmt).clone()
    if not double_quant:
        return QTensor(fmt, shape, weight.dtype, blocksize, packed, absmax, code)
    offset = absmax.mean()
    qabsmax, nested_absmax = quantize_dynamic_cpu(absmax - offset, NESTED_BLOCKSIZE)
    return QTensor(
        fmt,
        shape,
        weight.dtype,
        blocksize,
        packed,
        qabsmax,
        code,
        nested_absmax,
        dynamic_map().clone(),
        offset,
    )


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
    if q.fmt == "int4":
        assert q.scale_zero is not None
        return dequantize_int4(q.weight, q.scale_zero, q.shape, q.blocksize, q.packing, res)
    if q.fmt == "int8":
        # bnb: A * stats.view(-1, 1) * INT8_SCALE, in fp32
        w = q.weight.reshape(-1, q.shape[-1])
        tmp = res if dtype == torch.float32 else scratch("dq_int8", q.numel, torch.float32, q.device)
        tmp = tmp.view(w.shape).copy_(w)  # int8 -> fp32 first: the mixed-dtype multiply is 3x slower
        tmp.mul_(q.absmax.view(-1, 1))
        torch.mul(tmp, INT8_SCALE, out=res.view(w.shape))
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

    if q.fmt not in BNB_4BIT_FORMATS:
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
