"""What fixes a quantized tensor's storage, known before anything is quantized: the formats and
their block sizes, `QSpec` (the dtype and shape of every stored part, hence its bytes) and its
JSON form. Recipes and memory planning size weights from here without any tensor code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .errors import UserError
from .int4 import GROUP_SIZES

FORMATS = ("nf4", "fp4", "int8", "int4")
FOUR_BIT_FORMATS = ("nf4", "fp4", "int4")
BNB_4BIT_FORMATS = ("nf4", "fp4")
DEFAULT_BLOCKSIZE = 64
# The block sizes bitsandbytes' quantize_4bit accepts.
VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# Double quantization: the absmax is itself quantized in blocks of 256 with the dynamic 8-bit map.
NESTED_BLOCKSIZE = 256
# int8 rows are scaled by absmax / 127; bitsandbytes multiplies by 1/127 rounded to float32, and
# equality with it needs that same constant.
INT8_SCALE = 7.874015718698502e-3

# Part names, in storage order. `QTensor.to_tensors(prefix)` writes f"{prefix}.{part}".
PARTS = ("weight", "absmax", "quant_map", "nested_absmax", "nested_quant_map", "offset", "scale_zero")

_DTYPE_NAMES = {
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float32: "float32",
    torch.uint8: "uint8",
    torch.int8: "int8",
}
_DTYPES_BY_NAME = {v: k for k, v in _DTYPE_NAMES.items()}


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


def spec_from_meta(meta: Mapping[str, Any]) -> QSpec:
    return QSpec(
        tuple(meta["shape"]),
        meta["format"],
        int(meta.get("blocksize", DEFAULT_BLOCKSIZE)),
        bool(meta.get("double_quant", False)),
        dtype_from_name(meta.get("dtype", "bfloat16")),
        meta.get("packing", "plain"),
    )
