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

Storage can be sized without quantizing anything (`storage_nbytes`, `QSpec`), and several QTensors
(an expert's gate, up and down) pack into one aligned uint8 blob (`pack` / `unpack`), so one
`copy_()` moves an expert between host and GPU.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Mapping
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
from .errors import UserError
from .int4 import GROUP_SIZES, dequantize_int4, quantize_int4
from .scratch import scratch

FORMATS = ("nf4", "fp4", "int8", "int4")
FOUR_BIT_FORMATS = ("nf4", "fp4", "int4")
BNB_4BIT_FORMATS = ("nf4", "fp4")
DEFAULT_BLOCKSIZE = 64
# The block sizes bitsandbytes' quantize_4bit accepts.
VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# Double quantization: the absmax is itself quantized in blocks of 256 with the dynamic 8-bit map.
NESTED_BLOCKSIZE = 256
INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Each piece of a packed blob starts at a multiple of this (fp32 views, cache lines, CUDA loads).
PACK_ALIGN = 64

# Part names, in storage order. `to_tensors(prefix)` writes f"{prefix}.{part}".
PARTS = ("weight", "absmax", "quant_map", "nested_absmax", "nested_quant_map", "offset", "scale_zero")

_DTYPE_NAMES = {
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float32: "float32",
    torch.uint8: "uint8",
    torch.int8: "int8",
}
_DTYPES_BY_NAME = {v: k for k, v in _DTYPE_NAMES.items()}


# Per-thread caches: reusable scratch buffers and derived tables.
_local = threading.local()


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
    if fmt in BNB_4BIT_FORMATS and blocksize not in VALID_BLOCKSIZES:
        raise QuantFormatError(
            f"Block size {blocksize!r} is not supported for {fmt}; use one of {', '.join(map(str, VALID_BLOCKSIZES))}."
        )
    if fmt == "int4" and blocksize not in GROUP_SIZES:
        raise QuantFormatError(
            f"Group size {blocksize!r} is not supported for int4; use one of {', '.join(map(str, GROUP_SIZES))}."
        )
    if fmt in ("int8", "int4") and double_quant:
        raise QuantFormatError(
            f"Double quantization applies to nf4/fp4 only, not to {fmt} (its scales stay 16-bit)."
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
    packing: str = "plain"  # int4 only: "plain" as stored, or a CPU kernel layout (quant/int4.py)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        check_format(self.fmt, self.blocksize, self.double_quant)
        if self.fmt == "int4" and (len(self.shape) != 2 or self.shape[1] % self.blocksize):
            raise QuantFormatError(
                f"int4 needs a 2-D weight whose width divides into groups of {self.blocksize}, "
                f"not {list(self.shape)}; choose a smaller --group-size or another format."
            )
        if self.fmt == "int8":
            if len(self.shape) == 0:
                raise QuantFormatError(
                    "int8 row-wise quantization needs a tensor with at least one dimension."
                )
            object.__setattr__(self, "blocksize", self.shape[-1])

    def meta(self) -> dict[str, Any]:
        """The JSON-able form (spec_from_meta reads it back)."""
        out = {
            "format": self.fmt,
            "shape": list(self.shape),
            "dtype": dtype_name(self.dtype),
            "blocksize": self.blocksize,
            "double_quant": self.double_quant,
        }
        return out if self.packing == "plain" else {**out, "packing": self.packing}

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def parts(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """(part name, dtype, shape) of every stored tensor, in storage order."""
        n = self.numel
        if self.fmt == "int8":
            rows = n // self.shape[-1] if self.shape[-1] else 0
            return [("weight", torch.int8, self.shape), ("absmax", torch.float32, (rows,))]
        if self.fmt == "int4":
            out_f, in_f = self.shape
            return [
                ("weight", torch.uint8, (out_f, in_f // 2)),
                ("scale_zero", torch.bfloat16, (in_f // self.blocksize, out_f, 2)),
            ]
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


def spec_from_meta(meta: Mapping[str, Any]) -> QSpec:
    return QSpec(
        tuple(meta["shape"]),
        meta["format"],
        int(meta.get("blocksize", DEFAULT_BLOCKSIZE)),
        bool(meta.get("double_quant", False)),
        dtype_from_name(meta.get("dtype", "bfloat16")),
        meta.get("packing", "plain"),
    )


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
        # bnb: A * stats.view(-1, 1) * 7.874015718698502e-3, in fp32
        w = q.weight.reshape(-1, q.shape[-1])
        tmp = res if dtype == torch.float32 else scratch("dq_int8", q.numel, torch.float32, q.device)
        tmp = tmp.view(w.shape).copy_(w)  # int8 -> fp32 first: the mixed-dtype multiply is 3x slower
        tmp.mul_(q.absmax.view(-1, 1))
        torch.mul(tmp, 7.874015718698502e-3, out=res.view(w.shape))
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
        name: QTensor(spec.fmt, spec.shape, spec.dtype, spec.blocksize, **parts[name], packing=spec.packing)
        for name, spec in layout.specs.items()
    }
