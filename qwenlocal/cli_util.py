"""What every command shares: consoles, the error wrapper (exit code 2), size parsing, progress
bars and model loading for the CLI. Its own module so chat.py and server.py import it directly."""

from __future__ import annotations

import contextlib
import re
import traceback
from collections.abc import Callable, Iterator

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
    from .loader import load_model
    from .tokenizer import Tokenizer

    with byte_progress("download", enabled=not quiet) as cb:
        folder = resolve_model(model, on_bytes=cb)
    tokenizer = Tokenizer.from_dir(folder)
    with byte_progress("load", enabled=not quiet) as cb:
        m = memory or MemoryOptions(quant=quant)
        lm = load_model(
            folder,
            device=device,
            dtype=dtype,
            progress=cb,
            ctx_size=ctx_size,
            quant=m.quant,
            gpu_experts=m.gpu_experts,
            vram_budget=m.budget_bytes(),
            policy=m.cache_policy,
            prefetch=m.prefetch,
        )
    if m.record_routing is not None:
        from .experts import RoutingRecorder

        lm.experts.recorder = RoutingRecorder(m.record_routing, lm.config)
    return folder, lm, tokenizer
