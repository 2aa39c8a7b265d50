"""Checkpoints that others quantized, read as sources: Qwen's own FP8 and GPTQ releases.

`open_source(folder)` is the one place that looks at a folder's `quantization_config`:

    none / "qwenlocal"   a plain `Checkpoint` (16-bit, or our own quantized layout)
    "fp8"                `Fp8Checkpoint`: fine-grained FP8 (e4m3 weights, one fp32 `weight_scale_inv`
                         per [128, 128] block), dequantized tensor by tensor as it is read, so it
                         behaves as a 16-bit checkpoint: loading it as it is, quantize-while-loading
                         and `qwenlocal quantize` all work, and the folder is never held twice in RAM.
    "gptq"               `qwenlocal.weights.gptq.GptqCheckpoint`: the same for GPTQ, plus its packed tensors for
                         a repack into the `int4` format without a float step.

The published FP8 layout (DeepSeek-V3, Qwen3-*-FP8, transformers' `FineGrainedFP8Config`):
`X.weight` float8_e4m3fn [rows, cols]; `X.weight_scale_inv` fp32 [ceil(rows / bm), ceil(cols / bn)];
w = float(weight) * weight_scale_inv[r // bm, c // bn]. Tensors without a scale (embeddings, norms,
the router, lm_head) are stored in 16 bits and read as they are.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from qwenlocal.errors import UserError
from qwenlocal.model.config import Qwen3MoeConfig
from qwenlocal.weights.checkpoint import Checkpoint, DequantizingCheckpoint, ProgressFn, resolve_model

GENERATION_CONFIG = "generation_config.json"

FP8_METHOD = "fp8"
GPTQ_METHOD = "gptq"
# Methods whose checkpoints are read by dequantizing: quantize-once treats them as 16-bit sources.
DEQUANTIZED_METHODS = (FP8_METHOD,)
SCALE_SUFFIX = "_scale_inv"


# Qwen's official checkpoints of Qwen3-30B-A3B and what each costs to download.
GPTQ_INT4_ID = "Qwen/Qwen3-30B-A3B-GPTQ-Int4"
FP8_ID = "Qwen/Qwen3-30B-A3B-FP8"
BF16_ID = "Qwen/Qwen3-30B-A3B"
DOWNLOAD_GB = {GPTQ_INT4_ID: 17, FP8_ID: 31, BF16_ID: 61}
# GPTQ-Int4's quantization_config as published (what `vram` plans with before anything is downloaded).
GPTQ_INT4_CONFIG = {
    "quant_method": "gptq",
    "bits": 4,
    "group_size": 128,
    "sym": True,
    "desc_act": False,
    "checkpoint_format": "gptq",
}


def default_model(quant: str | None) -> str:
    """The smallest official checkpoint that serves the recipe: GPTQ-Int4 when experts are 4-bit
    (the default), FP8 for int8 or 16-bit experts (quantized once, or dequantized, from it)."""
    from quant.recipe import DEFAULT_PRESET, Recipe

    if quant in ("bf16", "none"):
        return FP8_ID
    preset = DEFAULT_PRESET if quant in (None, "auto") else quant
    return GPTQ_INT4_ID if Recipe.from_preset(preset).expert_bits == 4 else FP8_ID


def download_note(model: str) -> str:
    """What downloading `model` and the other official checkpoints costs, in one line."""
    sizes = ", ".join(f"{m} ~{gb} GB" for m, gb in DOWNLOAD_GB.items() if m != model)
    return f"download: {model} ~{DOWNLOAD_GB[model]} GB (others: {sizes})"


def quant_method(config) -> str | None:
    return (config.quantization_config or {}).get("quant_method")


def own_recipe(config, where: object = "config.json"):
    """The recipe a quantized folder loads with when --quant asks for none: ours from its record,
    GPTQ's from its bits; None for 16-bit and FP8 folders (16-bit sources). `where`: the file
    named in errors."""
    from quant.recipe import Recipe

    method = quant_method(config)
    if method == GPTQ_METHOD:
        from qwenlocal.weights.gptq import gptq_recipe

        return gptq_recipe(config, config.quantization_config, where)
    if method is None or method in DEQUANTIZED_METHODS:
        return None
    return Recipe.from_config(config.quantization_config, str(where))


@dataclass(frozen=True)
class ModelSource:
    """A model folder whose metadata is read once: config.json and generation_config.json, kept
    for the checkpoint reader, the tokenizer and the sampling defaults, which then open neither."""

    folder: Path
    config: Qwen3MoeConfig  # as config.json says, its quantization_config included
    metadata: dict[str, dict]  # file name -> its JSON: config.json, generation_config.json (if any)

    @classmethod
    def read(cls, folder: str | Path) -> ModelSource:
        folder = Path(folder)
        if not folder.is_dir():
            raise UserError(f"Model folder {folder} does not exist.")
        raw: dict = {}
        config = Qwen3MoeConfig.from_file(folder / "config.json", into=raw)
        metadata = {"config.json": raw}
        gen = folder / GENERATION_CONFIG
        if gen.is_file():
            try:
                loaded = json.loads(gen.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise UserError(f"{gen} is not valid JSON ({e}).") from None
            if isinstance(loaded, dict):
                metadata[GENERATION_CONFIG] = loaded
        return cls(folder, config, metadata)

    @classmethod
    def resolve(cls, model: str | Path, on_bytes: ProgressFn | None = None) -> ModelSource:
        """A local folder or hub id (downloaded if needed), read."""
        return cls.read(resolve_model(model, on_bytes))

    @property
    def generation(self) -> dict:
        """generation_config.json's values ({} without one)."""
        return self.metadata.get(GENERATION_CONFIG, {})

    @property
    def method(self) -> str | None:
        return quant_method(self.config)

    @property
    def loads_as_is(self) -> bool:
        """Quantized already, by us or as a GPTQ release; an FP8 release, like a 16-bit folder,
        is a 16-bit source that quantize-once may quantize."""
        return bool(self.config.quantization_config) and self.method not in DEQUANTIZED_METHODS

    @functools.cached_property
    def own_recipe(self):
        return own_recipe(self.config, self.folder / "config.json")

    def open(self, dtype: torch.dtype | None = None) -> Checkpoint:
        return open_source(self, dtype)


def open_source(folder: str | Path | ModelSource, dtype: torch.dtype | None = None) -> Checkpoint:
    """The checkpoint in `folder`, read through the reader its quantization needs. `dtype`: what a
    dequantizing reader returns (default: the checkpoint's own `torch_dtype`)."""
    ckpt = Checkpoint(folder.folder, folder.config) if isinstance(folder, ModelSource) else Checkpoint(folder)
    method = quant_method(ckpt.config)
    if method == FP8_METHOD:
        return Fp8Checkpoint(ckpt, dtype)
    if method == GPTQ_METHOD:
        from qwenlocal.weights.gptq import GptqCheckpoint

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
