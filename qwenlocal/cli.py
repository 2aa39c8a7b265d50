"""The `qwenlocal` command line (Typer). Thin: parses flags, calls the library, renders records."""

from __future__ import annotations

import contextlib
import json
import re
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import Annotated

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

app = typer.Typer(
    name="qwenlocal",
    help="Run Qwen3-30B-A3B (and the Qwen3 MoE family) on one GPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, soft_wrap=True)
out = Console()
STATE = {"debug": False}


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False):
    STATE["debug"] = debug


def main() -> None:
    try:
        app(standalone_mode=True)
    except SystemExit:
        raise
    except UserError as e:
        if STATE["debug"]:
            traceback.print_exc()
        err.print(f"[bold red]error:[/] {e}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


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


def load_for_cli(model: str, device: str, dtype: str, ctx_size: int | None, quiet: bool = False):
    from .checkpoint import resolve_model
    from .loader import load_model
    from .tokenizer import Tokenizer

    with byte_progress("download", enabled=not quiet) as cb:
        folder = resolve_model(model, on_bytes=cb)
    tokenizer = Tokenizer.from_dir(folder)
    with byte_progress("load", enabled=not quiet) as cb:
        lm = load_model(folder, device=device, dtype=dtype, progress=cb, ctx_size=ctx_size)
    return folder, lm, tokenizer


# -- generate --------------------------------------------------------------------------------
@app.command()
def generate(
    model: Annotated[str, typer.Argument(help="Model folder or Hugging Face repo id.")],
    prompt: Annotated[str, typer.Argument(help="The prompt; '-' reads it from stdin.")],
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="Most tokens to generate.")] = 512,
    temp: Annotated[float | None, typer.Option("--temp", help="Temperature; 0 is greedy.")] = None,
    top_k: Annotated[int | None, typer.Option("--top-k")] = None,
    top_p: Annotated[float | None, typer.Option("--top-p")] = None,
    min_p: Annotated[float | None, typer.Option("--min-p")] = None,
    presence_penalty: Annotated[float, typer.Option("--presence-penalty")] = 0.0,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    ctx_size: Annotated[
        str, typer.Option("--ctx-size", "-c", help="Context size in tokens (4096, 32k).")
    ] = "4096",
    think: Annotated[bool, typer.Option("--think/--no-think", help="Thinking mode.")] = True,
    system: Annotated[str | None, typer.Option("--system", help="System prompt.")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Send the prompt as is, no chat template.")] = False,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="bf16, fp16 or fp32.")] = "bf16",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object at the end.")] = False,
):
    """Generate a reply to one prompt and print it as it streams."""

    def body():
        from .generate import Generator, SamplingParams
        from .loader import parse_device, parse_dtype

        text = sys.stdin.read() if prompt == "-" else prompt
        ctx = parse_tokens(ctx_size)
        parse_device(device), parse_dtype(dtype)  # bad values fail before a long load
        if max_tokens <= 0:
            raise UserError(f"--max-tokens must be positive, got {max_tokens}.")
        folder, lm, tok = load_for_cli(model, device, dtype, ctx, quiet=as_json)
        if raw:
            ids = tok.encode(text)
        else:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": text}
            ]
            ids = tok.encode(
                tok.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=think)
            )
        params = SamplingParams.for_mode(
            think,
            folder,
            temperature=temp,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            presence_penalty=presence_penalty,
            seed=seed,
        )
        gen = Generator(lm, tok, ctx_size=ctx)
        for record in gen.stream(ids, params, max_tokens=max_tokens):
            if not as_json:
                sys.stdout.write(record.text)
                sys.stdout.flush()
        s = gen.summary
        if as_json:
            print(
                json.dumps(
                    {
                        "text": s.text,
                        "token_ids": s.token_ids,
                        "prompt_tokens": s.prompt_tokens,
                        "generated_tokens": s.generated_tokens,
                        "finish_reason": s.finish_reason,
                        "prompt_tps": round(s.prompt_tps, 3),
                        "gen_tps": round(s.gen_tps, 3),
                        "peak_memory_bytes": s.peak_memory_bytes,
                    },
                    ensure_ascii=False,
                )
            )
        else:
            sys.stdout.write("\n")
            err.print(
                f"[dim]{s.prompt_tokens} prompt tokens, {s.prompt_tps:.1f} tok/s · "
                f"{s.generated_tokens} generated, {s.gen_tps:.1f} tok/s · "
                f"peak {s.peak_memory_bytes / 1024**3:.2f} GiB · {s.finish_reason}[/]",
                highlight=False,
            )

    run(body)


# -- commands that live in their own modules (one line each) -----------------------------------
# chat: registered here
# serve: registered here


if __name__ == "__main__":
    main()
