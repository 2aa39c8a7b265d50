"""Quantized weights: bitsandbytes-compatible NF4 / FP4 / int8, int4 group-wise, and the kernels and layers that use them.

Names are imported from their modules when first used, so that `quant.errors`, which every module
of the application reaches, costs no torch import (`qwenlocal --help` runs without one). The
packing function is `quant.pack.pack`: the name `quant.pack` is its module.
"""

from __future__ import annotations

import importlib

# name -> the module that defines it
_EXPORTS = {
    "QTensor": "formats",
    "dequantize": "formats",
    "from_bnb": "formats",
    "quantize": "formats",
    "to_bnb_quant_state": "formats",
    "qlinear": "kernels",
    "to_kernel_layout": "kernels",
    "QuantLinear": "linear",
    "PACK_ALIGN": "pack",
    "PackLayout": "pack",
    "Slot": "pack",
    "pack_layout": "pack",
    "unpack": "pack",
    "DEFAULT_BLOCKSIZE": "spec",
    "FORMATS": "spec",
    "VALID_BLOCKSIZES": "spec",
    "QSpec": "spec",
    "QuantFormatError": "spec",
    "check_format": "spec",
    "storage_nbytes": "spec",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
