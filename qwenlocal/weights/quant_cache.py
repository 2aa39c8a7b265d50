"""The quantize-once cache: a 16-bit (or FP8) model that `generate`, `chat` or `serve` is pointed at is
quantized once with the default recipe, and later runs load that copy.

Copies live in $QWENLOCAL_CACHE_DIR, else the user's cache folder, named after the model (a hub
snapshot: repository and revision; a folder: its name and a hash of its path), the preset and the
format version.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from quant import recipe
from qwenlocal.weights.checkpoint import ProgressFn
from qwenlocal.weights.sources import ModelSource


def cache_dir() -> Path:
    """Where quantized copies of models live: $QWENLOCAL_CACHE_DIR, else the user's cache folder."""
    env = os.environ.get("QWENLOCAL_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qwenlocal"


def cached_copy(folder: Path) -> Path:
    """Where the quantized copy of a 16-bit `folder` lives (whether or not it exists yet). The
    format version is part of the name: a copy an older qwenlocal wrote is never taken for one
    this one reads."""
    return cache_dir() / f"{_copy_stem(folder)}-v{recipe.FORMAT_VERSION}"


def _copy_stem(folder: Path) -> str:
    """The model (a hub snapshot: repository and revision; a folder: its name and a hash of its
    path) and the preset."""
    resolved = folder.resolve()
    parts = resolved.parts
    if "snapshots" in parts:  # a hub snapshot: models--Org--Name/snapshots/<revision>
        i = parts.index("snapshots")
        name = f"{parts[i - 1].removeprefix('models--')}-{parts[i + 1][:10]}"
    else:
        name = f"{resolved.name}-{hashlib.sha1(str(resolved).encode()).hexdigest()[:10]}"
    return f"{name}-{recipe.DEFAULT_PRESET}"


def older_copies(folder: Path) -> list[Path]:
    """Copies of `folder` in an older format (named without the version, or with another)."""
    stem, current = _copy_stem(folder), cached_copy(folder)
    if not cache_dir().is_dir():
        return []
    return sorted(
        p
        for p in cache_dir().iterdir()
        if p != current
        and p.is_dir()
        and (p.name == stem or re.fullmatch(re.escape(stem) + r"-v\d+", p.name))
    )


def quantized_once(
    source: ModelSource | Path,
    progress: ProgressFn | None = None,
    note: Callable[[str], None] | None = None,
) -> ModelSource:
    """A 16-bit (or FP8) source quantized once with the default recipe into the cache, on the GPU
    when there is one; later runs load that copy. An older format's copy is removed and made again.
    `note` hears one line for each thing done. A folder that loads as it is is used as it is."""
    from qwenlocal.weights.quantize import quantize_checkpoint

    source = source if isinstance(source, ModelSource) else ModelSource.read(source)
    if source.loads_as_is:
        return source
    target = cached_copy(source.folder)
    if not (target / "config.json").is_file():
        for old in older_copies(source.folder):
            if note:
                note(f"the cached copy {old} was written by an older format; quantizing again")
            shutil.rmtree(old, ignore_errors=True)
        if note:
            note(f"quantizing {source.folder} once into {target}; later runs load it")
        device = torch.device("cuda") if torch.cuda.is_available() else None
        preset = recipe.Recipe.from_preset(recipe.DEFAULT_PRESET)
        quantize_checkpoint(source, target, preset, device=device, progress=progress, force=True)
    return ModelSource.read(target)
