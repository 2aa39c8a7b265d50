"""Quantized weights: bitsandbytes-compatible NF4 / FP4 / int8, int4 group-wise, and the kernels and layers that use them."""

from .formats import QTensor, dequantize, from_bnb, quantize, to_bnb_quant_state
from .kernels import qlinear, to_kernel_layout
from .linear import QuantLinear
from .pack import PACK_ALIGN, PackLayout, Slot, pack, pack_layout, unpack
from .spec import (
    DEFAULT_BLOCKSIZE,
    FORMATS,
    VALID_BLOCKSIZES,
    QSpec,
    QuantFormatError,
    check_format,
    storage_nbytes,
)

__all__ = [
    "DEFAULT_BLOCKSIZE",
    "FORMATS",
    "PACK_ALIGN",
    "VALID_BLOCKSIZES",
    "PackLayout",
    "QSpec",
    "QTensor",
    "QuantFormatError",
    "QuantLinear",
    "Slot",
    "check_format",
    "dequantize",
    "from_bnb",
    "pack",
    "pack_layout",
    "qlinear",
    "quantize",
    "storage_nbytes",
    "to_kernel_layout",
    "to_bnb_quant_state",
    "unpack",
]
