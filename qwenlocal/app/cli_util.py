"""What every command shares: consoles, the error wrapper (exit code 2), progress bars and model
loading for the CLI. Its own module so chat.py and server.py import it directly."""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

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

from qwenlocal.errors import UserError

if TYPE_CHECKING:
    import torch

    from qwenlocal.generation.tokenizer import Tokenizer
    from qwenlocal.planning.options import LoadOptions
    from qwenlocal.weights.sources import ModelSource

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
) -> Iterator[tuple[ModelSource, torch.nn.Module, Tokenizer]]:
    """The model for the length of a command: resolved (downloaded with a progress bar) and read
    once, planned once (`--quant auto` says on stderr what it chose), a 16-bit one quantized once
    into the cache, loaded (progress bar). A routing trace is closed, and so written, however the
    command ends, Ctrl-C and errors included. Yields the source, the model (`model.plan`) and the
    tokenizer."""
    from qwenlocal.generation.tokenizer import Tokenizer
    from qwenlocal.planning.plan import plan_load
    from qwenlocal.weights import quant_cache
    from qwenlocal.weights.loader import load_model
    from qwenlocal.weights.sources import ModelSource

    with byte_progress("download", enabled=not quiet) as cb:
        source = ModelSource.resolve(model, on_bytes=cb)
    tokenizer = Tokenizer.from_source(source)
    plan = plan_load(source, **load.flags)
    if plan.reason is not None and not quiet:
        err.print(f"--quant auto: {plan.reason}", highlight=False)
    if plan.quantize_once:
        with byte_progress("quantize", enabled=not quiet) as cb:
            source = quant_cache.quantized_once(source, progress=cb, note=None if quiet else _note)
        plan = plan.loaded_from(source)
    with byte_progress("load", enabled=not quiet) as cb:
        lm = load_model(source, plan=plan, progress=cb)
    _check_fast_paths(lm, load)
    if load.record_routing is not None:
        from qwenlocal.experts.store import RoutingRecorder

        lm.experts.recorder = RoutingRecorder(load.record_routing, lm.config)
    try:
        yield source, lm, tokenizer
    finally:
        if lm.experts.recorder is not None:
            lm.experts.recorder.close()


def _check_fast_paths(lm: torch.nn.Module, load: LoadOptions) -> None:
    """The self-check of the GPU's fast paths (qwenlocal.model.selfcheck), before the first reply; a
    line on stderr for each that failed here and what runs instead."""
    from qwenlocal.model.selfcheck import device_note, forced_paths, self_check, triton_note

    for note in (device_note(lm), triton_note(lm)):
        if note:
            err.print(note, style="yellow", highlight=False, markup=False)
    for verdict in self_check(lm, forced=forced_paths(load.moe)):
        if not verdict.ok:
            err.print(verdict.line, style="yellow", highlight=False, markup=False)


def _note(line: str) -> None:
    err.print(line, highlight=False)
