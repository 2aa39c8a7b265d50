"""Several QTensors (an expert's gate, up and down) packed into one aligned uint8 blob, so that one
`copy_()` moves an expert between host and GPU. The layout is computed from specs alone, so memory
planning can size a blob before anything is quantized.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .formats import QTensor
from .spec import QSpec, dtype_from_name, dtype_name, spec_from_meta

# Each piece of a packed blob starts at a multiple of this (fp32 views, cache lines, CUDA loads).
PACK_ALIGN = 64


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
        out = torch.empty(layout.nbytes, dtype=torch.uint8, device=device)
    elif out.dtype != torch.uint8 or out.dim() != 1 or out.numel() < layout.nbytes:
        raise ValueError(f"pack: out must be a 1-D uint8 tensor of at least {layout.nbytes} bytes")
    pos = 0
    for slot in layout.slots:
        out[pos : slot.offset].zero_()  # the alignment padding before it: the same bytes every time
        t = getattr(qs[slot.name], slot.part)
        dst = out[slot.offset : slot.offset + slot.nbytes]
        dst.copy_(t.contiguous().reshape(-1).view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8))
        pos = slot.offset + slot.nbytes
    out[pos : layout.nbytes].zero_()
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
