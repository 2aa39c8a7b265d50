"""Checkpoints that others quantized, read as sources: Qwen's own FP8 and GPTQ releases.

`open_source(folder)` is the one place that looks at a folder's `quantization_config`:

    none / "qwenlocal"   a plain `Checkpoint` (16-bit, or our own quantized layout)
    "fp8"                `Fp8Checkpoint`: fine-grained FP8 (e4m3 weights, one fp32 `weight_scale_inv`
                         per [128, 128] block), dequantized tensor by tensor as it is read, so it
                         behaves as a 16-bit checkpoint: loading it as it is, quantize-while-loading
                         and `qwenlocal quantize` all work, and the folder is never held twice in RAM.
    "gptq"               `qwenlocal.gptq.GptqCheckpoint`: the same for GPTQ, plus its packed tensors for
                         a repack into the `int4` format without a float step.

The published FP8 layout (DeepSeek-V3, Qwen3-*-FP8, transformers' `FineGrainedFP8Config`):
`X.weight` float8_e4m3fn [rows, cols]; `X.weight_scale_inv` fp32 [ceil(rows / bm), ceil(cols / bn)];
w = float(weight) * weight_scale_inv[r // bm, c // bn]. Tensors without a scale (embeddings, norms,
the router, lm_head) are stored in 16 bits and read as they are.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import Checkpoint, DequantizingCheckpoint
from .errors import UserError

FP8_METHOD = "fp8"
GPTQ_METHOD = "gptq"
# Methods whose checkpoints are read by dequantizing: quantize-once treats them as 16-bit sources.
DEQUANTIZED_METHODS = (FP8_METHOD,)
SCALE_SUFFIX = "_scale_inv"


def quant_method(config) -> str | None:
    return (config.quantization_config or {}).get("quant_method")


def open_source(folder: str | Path, dtype: torch.dtype | None = None) -> Checkpoint:
    """The checkpoint in `folder`, read through the reader its quantization needs. `dtype`: what a
    dequantizing reader returns (default: the checkpoint's own `torch_dtype`)."""
    ckpt = Checkpoint(folder)
    method = quant_method(ckpt.config)
    if method == FP8_METHOD:
        return Fp8Checkpoint(ckpt, dtype)
    if method == GPTQ_METHOD:
        from .gptq import GptqCheckpoint

        return GptqCheckpoint(ckpt, dtype)
    return ckpt


class Fp8Checkpoint(DequantizingCheckpoint):
    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype | None = None):
        super().__init__(ckpt, dtype)
        qc = self.source_quantization
        where = self.folder / "config.json"
        if qc.get("fmt", "e4m3") != "e4m3":
            raise UserError(f"{where} asks for FP8 format {qc.get('fmt')!r}; qwenlocal reads e4m3.")
        block = qc.get("weight_block_size")
        if block is not None and (len(block) != 2 or min(block) <= 0):
            raise UserError(f"{where} has weight_block_size {block}; it must be two positive sizes.")
        self.block = tuple(block) if block is not None else None

    def dequantized(self, name: str) -> torch.Tensor:
        w = self.raw(name)
        if w.dtype != torch.float8_e4m3fn:
            return w
        scale_name = name + SCALE_SUFFIX
        if scale_name not in self:
            raise UserError(f"FP8 tensor {name} in {self.folder} has no {scale_name} beside it.")
        scale = self.raw(scale_name)
        block = self.block or tuple(w.shape)  # no block size: one scale for the whole tensor
        grid = tuple(-(-n // b) for n, b in zip(w.shape, block, strict=True))
        if w.dim() != 2 or tuple(scale.shape) not in (grid, ()):
            raise UserError(
                f"{scale_name} in {self.folder} has shape {list(scale.shape)}; blocks of {list(block)} "
                f"over {name} {list(w.shape)} need {list(grid)}."
            )
        return dequantize_fp8(w, scale.reshape(grid), block)


def dequantize_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """float32 w * scale of its block; the last blocks of a row or column may be partial."""
    rows, cols = w.shape
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)
    return w.float().mul_(scale[:, :cols])
