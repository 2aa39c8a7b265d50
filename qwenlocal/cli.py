"""The `qwenlocal` command line (Typer). Thin: parses flags, calls the library, renders records."""

from __future__ import annotations

import dataclasses
import json
import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer

from . import options as opt
from .cli_util import STATE, byte_progress, err, loaded, parse_bytes, parse_tokens, run
from .errors import UserError
from .options import MemoryOptions

app = typer.Typer(
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
    quant: opt.Quant = None,
    gpu_experts: opt.GpuExperts = None,
    vram_budget: opt.VramBudget = None,
    prefetch: opt.Prefetch = opt.DEFAULT_PREFETCH,
    cache_policy: opt.CachePolicy = opt.DEFAULT_CACHE_POLICY,
    record_routing: opt.RecordRouting = None,
    kv_dtype: opt.KvDtype = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object at the end.")] = False,
):
    """Generate a reply to one prompt and print it as it streams."""

    def body():
        from .loader import parse_device, parse_dtype

        text = sys.stdin.read() if prompt == "-" else prompt
        ctx = parse_tokens(ctx_size)
        parse_device(device), parse_dtype(dtype)  # bad values fail before a long load
        memory = MemoryOptions(
            quant, gpu_experts, vram_budget, prefetch, cache_policy, record_routing, kv_dtype
        ).validate()
        if max_tokens <= 0:
            raise UserError(f"--max-tokens must be positive, got {max_tokens}.")
        with loaded(model, device, dtype, ctx, quiet=as_json, memory=memory) as (folder, lm, tok):
            run_generate(folder, lm, tok, text)

    def run_generate(folder, lm, tok, text):
        from .generate import Generator, SamplingParams

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
        gen = Generator(lm, tok, ctx_size=parse_tokens(ctx_size))
        for record in gen.stream(ids, params, max_tokens=max_tokens):
            if not as_json:
                sys.stdout.write(record.text)
                sys.stdout.flush()
        s = gen.summary
        cache = getattr(lm.experts, "stats", None)
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
                        **({"expert_hit_rate": round(cache.hit_rate, 4)} if cache is not None else {}),
                    },
                    ensure_ascii=False,
                )
            )
        else:
            sys.stdout.write("\n")
            err.print(
                f"[dim]{s.prompt_tokens} prompt tokens, {s.prompt_tps:.1f} tok/s · "
                f"{s.generated_tokens} generated, {s.gen_tps:.1f} tok/s · "
                f"peak {s.peak_memory_bytes / 1024**3:.2f} GiB · {s.finish_reason}"
                + (f" · expert cache {100 * cache.hit_rate:.1f} % hits" if cache is not None else "")
                + "[/]",
                highlight=False,
            )

    run(body)


# -- quantize -------------------------------------------------------------------------------
@app.command()
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
        from quant.convert import quantize_checkpoint
        from quant.recipe import Recipe

        from .loader import parse_device

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
        dev = parse_device(device)
        shard = parse_bytes(shard_size)
        err.print(f"recipe {recipe.describe()}", highlight=False)
        with byte_progress("download") as cb_download, byte_progress("quantize") as cb:
            path, stats = quantize_checkpoint(
                src, out, recipe, shard_size=shard, force=force, device=dev, progress=cb, on_bytes=cb_download
            )
        render_quant_stats(stats.as_dict())
        if report:
            from quant.report import quality_report

            from .checkpoint import resolve_model

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


# -- commands that live in their own modules (one line each) -----------------------------------
from .chat import chat as _chat  # noqa: E402

app.command("chat")(_chat)
from .server import serve as _serve  # noqa: E402

app.command("serve")(_serve)
from .vram import vram as _vram  # noqa: E402

app.command("vram")(_vram)


if __name__ == "__main__":
    main()
