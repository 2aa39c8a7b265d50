"""What every command shares: consoles, the error wrapper (exit code 2), progress bars and model
loading for the CLI. Its own module so chat.py and server.py import it directly."""

from __future__ import annotations

import contextlib
import dataclasses
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

from . import quant_cache
from .errors import UserError
from .options import LoadOptions, parse_bytes, parse_device, parse_dtype, parse_tokens  # noqa: F401 - the commands' parsers
from .tokenizer import Tokenizer

err = Console(stderr=True, soft_wrap=True)
out = Console()
STATE = {"debug": False}


def run(fn: Callable[[], None]) -> None:
    """Run a command body: user errors become one sentence and exit code 2, Ctrl-C exit code 130
    (caught here: Click would turn it into "Aborted!" and exit code 1)."""
    try:
        fn()
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None
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


# -- shared rendering -----------------------------------------------------------------------
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
        disable=not enabled or not err.is_terminal,  # a bar into a pipe or file only adds blank lines
    )
    task = progress.add_task(description, total=None)

    def update(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total or None)

    with progress:
        yield update


@contextlib.contextmanager
def loaded(
    model: str, load: LoadOptions, quiet: bool = False
) -> Iterator[tuple[Path, torch.nn.Module, Tokenizer]]:
    """The model for the length of a command: resolved (downloaded with a progress bar), a 16-bit
    one quantized once into the cache, loaded (progress bar). A routing trace is closed, and so
    written, however the command ends, Ctrl-C and errors included. Yields folder, model, tokenizer."""
    from .checkpoint import resolve_model
    from .loader import load_model

    with byte_progress("download", enabled=not quiet) as cb:
        folder = resolve_model(model, on_bytes=cb)
    tokenizer = Tokenizer.from_dir(folder)
    quant, choice = load.quant or "auto", None
    if quant == "auto":
        folder, choice = auto_quantized(folder, load, quiet)
        quant = None  # load the folder as it is: 16-bit, or quantized (now or before)
    with byte_progress("load", enabled=not quiet) as cb:
        lm = load_model(
            folder,
            device=load.device,
            dtype=load.dtype,
            progress=cb,
            ctx_size=load.ctx,
            quant=quant,
            gpu_experts=load.gpu_experts,
            vram_budget=load.budget(),
            policy=load.cache_policy,
            prefetch=load.prefetch,
            kv_dtype=load.kv_dtype,
            moe=load.moe,
            cold_experts=load.cold_experts,
        )
    lm.quant_choice = choice
    _check_fast_paths(lm, load)
    if load.record_routing is not None:
        from .experts import RoutingRecorder

        lm.experts.recorder = RoutingRecorder(load.record_routing, lm.config)
    try:
        yield folder, lm, tokenizer
    finally:
        if lm.experts.recorder is not None:
            lm.experts.recorder.close()


def _check_fast_paths(lm: torch.nn.Module, load: LoadOptions) -> None:
    """The self-check of the GPU's fast paths (qwenlocal.selfcheck), before the first reply; a
    line on stderr for each that failed here and what runs instead."""
    from .selfcheck import device_note, forced_paths, self_check, triton_note

    for note in (device_note(lm), triton_note(lm)):
        if note:
            err.print(note, style="yellow", highlight=False, markup=False)
    for verdict in self_check(lm, forced=forced_paths(load.moe)):
        if not verdict.ok:
            err.print(verdict.line, style="yellow", highlight=False, markup=False)


def auto_quantized(folder: Path, load: LoadOptions, quiet: bool) -> tuple[Path, str | None]:
    """`--quant auto` (the default): the folder to load and why (None for a folder that loads as
    it is). A 16-bit (or FP8) model that does not fit the device is quantized once into the cache;
    the choice is printed once on stderr (the chat panel shows it too)."""
    from .config import Qwen3MoeConfig
    from .loader import choose_quant

    if quant_cache.loads_as_is(folder):
        return folder, None
    # an FP8 release is sized as the 16-bit model it dequantizes to
    config = dataclasses.replace(Qwen3MoeConfig.from_file(folder / "config.json"), quantization_config=None)
    budget = load.budget()
    budget = budget if isinstance(budget, int) else None
    choice = choose_quant(config, parse_device(load.device), parse_dtype(load.dtype), load.ctx, budget)
    if not quiet:
        err.print(f"--quant auto: {choice.reason}", highlight=False)
    if choice.recipe is not None:
        folder = quantized_once(folder, quiet)
    return folder, choice.reason


def quantized_once(folder: Path, quiet: bool = False) -> Path:
    """A 16-bit (or FP8) folder is quantized once with the default recipe into the cache (saying
    so); later runs load the cached copy. A folder that loads as it is is used as it is."""
    if quant_cache.loads_as_is(folder):
        return folder
    target = quant_cache.cached_copy(folder)
    if (target / "config.json").is_file():
        return target
    if not quiet:
        err.print(f"quantizing {folder} once into {target}; later runs load it", highlight=False)
    with byte_progress("quantize", enabled=not quiet) as cb:
        return quant_cache.quantize_into_cache(folder, progress=cb)
