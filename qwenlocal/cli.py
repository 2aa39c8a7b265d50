"""The `qwenlocal` command line (Typer). Thin: parses flags, calls the library, renders records."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import sys
import traceback
from pathlib import Path
from typing import Annotated

import click
import typer
from typer.core import TyperGroup

from qwenlocal.app.cli_util import STATE, byte_progress, err, run

from .errors import UserError


# -- the commands, each imported when it runs ------------------------------------------------------
class LazyCommands(TyperGroup):
    """`app`'s group: a command of COMMANDS is imported when it is asked for; the command list
    of `--help` shows its docstring, read from the source without importing it (so `--help`
    imports no torch, and `generate` not what the server and the chat need)."""

    listing = False  # true while the group's own help is written

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in COMMANDS and name not in self.commands:
            module_name, function = COMMANDS[name]
            if self.listing:
                return click.Command(name, help=_docstring(module_name, function))
            one = typer.Typer()
            one.command(name)(getattr(importlib.import_module(f"{__package__}.{module_name}"), function))
            self.add_command(typer.main.get_command(one), name)
        return super().get_command(ctx, name)

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self.listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self.listing = False


def _docstring(module_name: str, function: str) -> str:
    tree = ast.parse(
        (Path(__file__).parent / f"{module_name.replace('.', '/')}.py").read_text(encoding="utf-8")
    )
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function)
    return ast.get_docstring(node) or ""


# command -> (module, function), imported when the command runs (LazyCommands)
COMMANDS = {
    "generate": ("app.generate_cmd", "generate"),
    "quantize": ("cli", "quantize"),
    "chat": ("app.chat", "chat"),
    "serve": ("app.server", "serve"),
    "vram": ("planning.vram", "vram"),
}
app = typer.Typer(
    cls=LazyCommands,
    name="qwenlocal",
    help="Run Qwen3-30B-A3B (and the Qwen3 MoE family) on one GPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


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


# -- quantize -------------------------------------------------------------------------------
def quantize(
    src: Annotated[str, typer.Argument(help="A 16-bit model folder or Hugging Face repo id.")],
    out: Annotated[Path, typer.Argument(help="The folder to write (must not exist unless --force).")],
    preset: Annotated[
        str, typer.Option("--preset", "-q", help="mixed (default), int4, nf4 or int8.")
    ] = "mixed",
    attn_bits: Annotated[int | None, typer.Option("--attn-bits", help="4, 8 or 16.")] = None,
    expert_bits: Annotated[int | None, typer.Option("--expert-bits", help="4 or 8.")] = None,
    lm_head_bits: Annotated[int | None, typer.Option("--lm-head-bits", help="8 or 16.")] = None,
    fmt4: Annotated[str | None, typer.Option("--format4", help="The 4-bit format: int4, nf4 or fp4.")] = None,
    group_size: Annotated[
        int | None, typer.Option("--group-size", help="int4 group size: 32, 64, 128.")
    ] = None,
    double_quant: Annotated[
        bool | None, typer.Option("--double-quant/--no-double-quant", help="Quantize the block scales too.")
    ] = None,
    blocksize: Annotated[int | None, typer.Option("--blocksize", help="4-bit block size (64).")] = None,
    shard_size: Annotated[str, typer.Option("--shard-size", help="Largest shard, e.g. 5GB.")] = "5GB",
    force: Annotated[bool, typer.Option("--force", help="Overwrite OUT if it exists.")] = False,
    device: Annotated[str, typer.Option("--device", help="Where to quantize: auto, cpu, cuda.")] = "auto",
    report: Annotated[
        bool, typer.Option("--report/--no-report", help="Compare with the original after.")
    ] = True,
    probe_tokens: Annotated[int, typer.Option("--probe-tokens", help="Positions the report compares.")] = 256,
):
    """Quantize a checkpoint: experts and attention to 4/8 bits, the recipe written into config.json."""

    def body():
        from quant.recipe import Recipe
        from qwenlocal.weights.quantize import quantize_checkpoint

        recipe = Recipe.from_preset(
            preset,
            attn_bits=attn_bits,
            expert_bits=expert_bits,
            lm_head_bits=lm_head_bits,
        )
        extra = {
            k: v
            for k, v in (
                ("fmt4", fmt4),
                ("double_quant", double_quant),
                ("blocksize", blocksize),
                ("group_size", group_size),
            )
            if v is not None
        }
        if extra:
            recipe = dataclasses.replace(recipe, **extra)
        if recipe.expert_bits == 16:
            raise UserError(
                "--expert-bits must be 4 or 8: quantizing the experts is what this command is for."
            )
        from qwenlocal.planning.options import parse_bytes, parse_device

        dev = parse_device(device)
        shard = parse_bytes(shard_size)
        err.print(f"recipe {recipe.describe()}", highlight=False)
        with byte_progress("download") as cb_download, byte_progress("quantize") as cb:
            path, stats = quantize_checkpoint(
                src, out, recipe, shard_size=shard, force=force, device=dev, progress=cb, on_bytes=cb_download
            )
        render_quant_stats(stats.as_dict())
        if report:
            from qwenlocal.generation.quality import quality_report
            from qwenlocal.weights.checkpoint import resolve_model

            with err.status("comparing with the original on the probe text"):
                rep = quality_report(resolve_model(src), path, stats.as_dict(), probe_tokens, dev)
            lg = rep["logits"]
            out_console_line = (
                f"quality: KL {lg['kl_mean']:.4g} (max {lg['kl_max']:.3g}), top-1 agreement "
                f"{100 * lg['top1_agreement']:.1f} % over {lg['positions']} positions"
            )
            err.print(out_console_line, highlight=False)
        err.print(f"[green]wrote {path}[/]", highlight=False)

    run(body)


def render_quant_stats(d: dict) -> None:
    from rich.table import Table

    t = Table(title="quantized", title_justify="left")
    for col in ("class", "tensors", "params", "before", "after", "bits/weight", "rel. error"):
        t.add_column(col, justify="left" if col == "class" else "right")
    for cls, c in d["classes"].items():
        err_ = c["rel_weight_error"]
        t.add_row(
            cls,
            str(c["tensors"]),
            f"{c['params'] / 1e6:,.1f} M",
            _gb(c["bytes_in"]),
            _gb(c["bytes_out"]),
            f"{c['bits_per_weight']:.2f}",
            "" if err_ is None else f"{err_:.4f}",
        )
    mbps = d["bytes_in"] / d["seconds"] / 1e6 if d["seconds"] else 0.0
    t.add_row(
        "total",
        str(sum(c["tensors"] for c in d["classes"].values())),
        "",
        _gb(d["bytes_in"]),
        _gb(d["bytes_out"]),
        f"{d['bits_per_weight']:.2f}",
        "",
        style="bold",
    )
    err.print(t)
    fmts = ", ".join(f"{k}: {v}" for k, v in d["tensors_per_format"].items())
    err.print(f"tensors per format: {fmts}; {d['seconds']:.1f} s, {mbps:,.0f} MB/s of input", highlight=False)


def _gb(n: int) -> str:
    return f"{n / 1e9:,.3f} GB" if n >= 1e8 else f"{n / 1e6:,.2f} MB"


if __name__ == "__main__":
    main()
