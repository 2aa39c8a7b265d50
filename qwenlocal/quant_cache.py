"""The quantize-once cache: a 16-bit (or FP8) model that `generate`, `chat` or `serve` is pointed at is
quantized once with the default recipe, and later runs load that copy.

Copies live in $QWENLOCAL_CACHE_DIR, else the user's cache folder, named after the model (a hub
snapshot: repository and revision; a folder: its name and a hash of its path) and the preset.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from .checkpoint import ProgressFn
from .config import Qwen3MoeConfig


def cache_dir() -> Path:
    """Where quantized copies of models live: $QWENLOCAL_CACHE_DIR, else the user's cache folder."""
    env = os.environ.get("QWENLOCAL_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qwenlocal"


def loads_as_is(folder: Path) -> bool:
    """Quantized already, by us or as a GPTQ release; an FP8 release is quantized once like a
    16-bit one."""
    from .sources import DEQUANTIZED_METHODS, quant_method

    config = Qwen3MoeConfig.from_file(folder / "config.json")
    return bool(config.quantization_config) and quant_method(config) not in DEQUANTIZED_METHODS


def cached_copy(folder: Path) -> Path:
    """Where the quantized copy of a 16-bit `folder` lives (whether or not it exists yet)."""
    from quant.recipe import DEFAULT_PRESET

    resolved = folder.resolve()
    parts = resolved.parts
    if "snapshots" in parts:  # a hub snapshot: models--Org--Name/snapshots/<revision>
        i = parts.index("snapshots")
        name = f"{parts[i - 1].removeprefix('models--')}-{parts[i + 1][:10]}"
    else:
        name = f"{resolved.name}-{hashlib.sha1(str(resolved).encode()).hexdigest()[:10]}"
    return cache_dir() / f"{name}-{DEFAULT_PRESET}"


def quantize_into_cache(folder: Path, progress: ProgressFn | None = None) -> Path:
    """Quantize `folder` with the default recipe into `cached_copy(folder)`, on the GPU when
    there is one; returns the copy."""
    from quant.recipe import DEFAULT_PRESET, Recipe

    from .quantize import quantize_checkpoint

    target = cached_copy(folder)
    device = torch.device("cuda") if torch.cuda.is_available() else None
    quantize_checkpoint(folder, target, Recipe.from_preset(DEFAULT_PRESET), device=device, progress=progress)
    return target
