"""What every command shares: consoles, the error wrapper (exit code 2), size parsing, progress
bars and model loading for the CLI. Its own module so chat.py and server.py import it directly."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from .errors import UserError
from .options import MemoryOptions

err = Console(stderr=True, soft_wrap=True)
out = Console()
STATE = {"debug": False}


def run(fn: Callable[[], None]) -> None:
    """Run a command body: user errors become one sentence and exit code 2."""
    try:
        fn()
    except UserError as e:
        if STATE["debug"]:
            traceback.print_exc()
        err.print(f"[bold red]error:[/] {e}", highlight=False)
        raise typer.Exit(2) from None
    except OSError as e:
        if STATE["debug"]:
            traceback.print_exc()
        if e.errno == 28:
            err.print("[bold red]error:[/] the disk is full.", highlight=False)
        else:
            err.print(f"[bold red]error:[/] {e.strerror or e}: {e.filename or ''}", highlight=False)
        raise typer.Exit(2) from None


# -- shared parsing and rendering ------------------------------------------------------------
def parse_tokens(value: str | int) -> int:
    """'32768', '32k', '128K' -> tokens (k = 1024)."""
    s = str(value).strip().lower().replace("_", "").replace(",", "")
    m = re.fullmatch(r"(\d+)(k?)", s)
    if not m:
        raise UserError(f"Cannot read {value!r} as a token count; write e.g. 8192 or 32k.")
    return int(m.group(1)) * (1024 if m.group(2) else 1)


def parse_bytes(value: str | int) -> int:
    """'8GiB', '5GB', '500MB', '1.5G' or a plain number of bytes -> bytes (G = GiB-style 1024**3)."""
    s = str(value).strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)(b?)", s, flags=re.IGNORECASE)
    if not m:
        raise UserError(f"Cannot read {value!r} as a size; write e.g. 8GiB, 5GB or 500MB.")
    number, unit, binary, _ = m.groups()
    power = " kmgt".index(unit.lower() or " ")
    base = 1024 if (binary or not m.group(4)) and unit else 1000
    return int(float(number) * base**power)


@contextlib.contextmanager
def byte_progress(description: str, enabled: bool = True) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar on stderr fed by (done, total) byte callbacks."""
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=False),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
        disable=not enabled,
    )
    task = progress.add_task(description, total=None)

    def update(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total or None)

    with progress:
        yield update


@contextlib.contextmanager
def loaded(
    model: str,
    device: str,
    dtype: str,
    ctx_size: int | None,
    quiet: bool = False,
    memory: MemoryOptions | None = None,
) -> Iterator[tuple[Path, torch.nn.Module, object]]:
    """`load_for_cli` for the length of a command: a routing trace is closed (and so written)
    however the command ends, Ctrl-C and errors included."""
    folder, lm, tok = load_for_cli(model, device, dtype, ctx_size, quiet, memory=memory)
    try:
        yield folder, lm, tok
    finally:
        if lm.experts.recorder is not None:
            lm.experts.recorder.close()


def load_for_cli(
    model: str,
    device: str,
    dtype: str,
    ctx_size: int | None,
    quiet: bool = False,
    quant: str | None = None,
    memory: MemoryOptions | None = None,
):
    """Resolve (download with a progress bar), load (progress bar); returns folder, model, tokenizer."""
    from .checkpoint import resolve_model
    from .loader import load_model, parse_device
    from .tokenizer import Tokenizer

    m = memory or MemoryOptions(quant=quant)
    with byte_progress("download", enabled=not quiet) as cb:
        folder = resolve_model(model, on_bytes=cb)
    tokenizer = Tokenizer.from_dir(folder)
    quant, choice = m.quant or "auto", None
    if quant == "auto":
        folder, choice = auto_quantized(folder, device, dtype, ctx_size, m.budget_bytes(), quiet)
        quant = None  # load the folder as it is: 16-bit, or quantized (now or before)
    budget = m.budget_bytes()
    if budget is None and m.gpu_experts is None and parse_device(device).type == "cuda":
        budget = "auto"  # fit the free GPU memory, as llama.cpp's --fit does
    with byte_progress("load", enabled=not quiet) as cb:
        lm = load_model(
            folder,
            device=device,
            dtype=dtype,
            progress=cb,
            ctx_size=ctx_size,
            quant=quant,
            gpu_experts=m.gpu_experts,
            vram_budget=budget,
            policy=m.cache_policy,
            prefetch=m.prefetch,
            kv_dtype=m.kv_dtype,
        )
    lm.quant_choice = choice
    if m.record_routing is not None:
        from .experts import RoutingRecorder

        lm.experts.recorder = RoutingRecorder(m.record_routing, lm.config)
    return folder, lm, tokenizer


def cache_dir() -> Path:
    """Where quantized copies of models live: $QWENLOCAL_CACHE_DIR, else the user's cache folder."""
    env = os.environ.get("QWENLOCAL_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qwenlocal"


def auto_quantized(
    folder: Path, device: str, dtype: str, ctx_size: int | None, budget, quiet: bool
) -> tuple[Path, str | None]:
    """`--quant auto` (the default): the folder to load and why (None for a quantized folder).
    A 16-bit model that does not fit the device is quantized once into the cache; the choice is
    printed once on stderr (the chat panel shows it too)."""
    from .config import Qwen3MoeConfig
    from .loader import choose_quant, parse_device, parse_dtype
    from .sources import DEQUANTIZED_METHODS, quant_method

    config = Qwen3MoeConfig.from_file(folder / "config.json")
    if config.quantization_config:
        if quant_method(config) not in DEQUANTIZED_METHODS:
            return folder, None  # quantized already: loads with its own recipe
        config = dataclasses.replace(config, quantization_config=None)  # FP8: sized as 16-bit
    budget = budget if isinstance(budget, int) else None
    choice = choose_quant(config, parse_device(device), parse_dtype(dtype), ctx_size or 4096, budget)
    if not quiet:
        err.print(f"--quant auto: {choice.reason}", highlight=False)
    if choice.recipe is not None:
        folder = quantized_once(folder, quiet)
    return folder, choice.reason


def quantized_once(folder: Path, quiet: bool = False) -> Path:
    """A 16-bit folder is quantized once with the default recipe into the cache; later runs load
    the cached result. A folder that is already quantized is used as it is."""
    from quant.convert import quantize_checkpoint
    from quant.recipe import DEFAULT_PRESET, Recipe

    from .config import Qwen3MoeConfig
    from .sources import DEQUANTIZED_METHODS, quant_method

    config = Qwen3MoeConfig.from_file(folder / "config.json")
    if config.quantization_config and quant_method(config) not in DEQUANTIZED_METHODS:
        return folder  # quantized already, by us or as a GPTQ release that loads as it is
    resolved = folder.resolve()
    parts = resolved.parts
    if "snapshots" in parts:  # a hub snapshot: models--Org--Name/snapshots/<revision>
        i = parts.index("snapshots")
        name = f"{parts[i - 1].removeprefix('models--')}-{parts[i + 1][:10]}"
    else:
        name = f"{resolved.name}-{hashlib.sha1(str(resolved).encode()).hexdigest()[:10]}"
    target = cache_dir() / f"{name}-{DEFAULT_PRESET}"
    if (target / "config.json").is_file():
        return target
    if not quiet:
        err.print(
            f"quantizing {folder} once ({DEFAULT_PRESET}) into {target}; later runs load it", highlight=False
        )
    with byte_progress("quantize", enabled=not quiet) as cb:
        device = torch.device("cuda") if torch.cuda.is_available() else None  # the GPU when there is one
        quantize_checkpoint(folder, target, Recipe.from_preset(DEFAULT_PRESET), device=device, progress=cb)
    return target
