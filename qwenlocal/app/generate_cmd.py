"""`qwenlocal generate`: one prompt, the reply streamed to stdout, a summary at the end."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from qwenlocal.app.cli_util import err, loaded, run
from qwenlocal.errors import UserError
from qwenlocal.planning import options as opt
from qwenlocal.planning.options import LoadOptions, SamplingOptions

DEFAULT_GENERATE_TOKENS = 512


@opt.load_command(max_tokens=DEFAULT_GENERATE_TOKENS)
def generate(
    model: opt.Model,
    prompt: Annotated[
        str | None, typer.Argument(help="The prompt; '-' reads it from stdin.", show_default=False)
    ] = None,
    load: LoadOptions = LoadOptions(),
    sampling: SamplingOptions = SamplingOptions(),
    system: Annotated[str | None, typer.Option("--system", help="System prompt.")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Send the prompt as is, no chat template.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object at the end.")] = False,
    json_schema: Annotated[
        str | None,
        typer.Option("--json-schema", help="Answer with JSON valid for this schema file ('-': stdin)."),
    ] = None,
):
    """Generate a reply to one prompt and print it as it streams."""

    def body():
        load.validate()  # bad values fail before a long load
        sampling.validate()
        if prompt is None:  # `generate PROMPT`: the default model
            if model is None:
                raise UserError("Give a prompt: qwenlocal generate [MODEL] PROMPT.")
            model_arg, text = None, model
        else:
            model_arg, text = model, prompt
        if text == "-" and json_schema == "-":
            raise UserError("Only one of the prompt and --json-schema can be read from stdin.")
        text = sys.stdin.read() if text == "-" else text
        schema = read_schema(json_schema) if json_schema is not None else None
        with loaded(load.model_or_default(model_arg), load, quiet=as_json) as (source, lm, tok):
            run_generate(source, lm, tok, text, schema)

    def run_generate(source, lm, tok, text, schema):
        from qwenlocal.generation.generate import Generator, Summary
        from qwenlocal.generation.grammar import Constraint, Tokens, json_body, lark

        if raw:
            ids = tok.encode(text)
        else:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": text}
            ]
            ids = tok.encode(
                tok.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=sampling.think)
            )
        constraint = None
        if schema is not None:
            thinking = sampling.think and not raw
            grammar = lark(json_body(schema), Tokens.of(tok), thinking, tok.opens_reasoning(ids))
            constraint = Constraint(grammar, tok, lm.config.vocab_size, tok.eos_token_ids)
        params = sampling.params(source.generation)
        for record in Generator(lm, tok, ctx_size=load.ctx).stream(
            ids, params, max_tokens=sampling.max_tokens, constraint=constraint
        ):
            if isinstance(record, Summary):
                render_summary(record, as_json)
            elif not as_json:
                sys.stdout.write(record.text)
                sys.stdout.flush()

    run(body)


def read_schema(source: str) -> dict:
    """A JSON schema from a file or stdin ('-') that the grammar library can enforce."""
    from qwenlocal.generation.grammar import check_schema

    where = "stdin" if source == "-" else source
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"Cannot read the schema {where}: {getattr(e, 'strerror', None) or e}.") from None
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"The schema {where} is not valid JSON ({e}).") from None
    return check_schema(schema, f"The schema {where}")


def render_summary(s, as_json: bool) -> None:
    """The end of `generate`: one JSON object on stdout, or a plain line on stderr."""
    rate = s.expert_hit_rate
    if as_json:
        d = {
            "text": s.text,
            "token_ids": s.token_ids,
            "prompt_tokens": s.prompt_tokens,
            "generated_tokens": s.generated_tokens,
            "finish_reason": s.finish_reason,
            "prompt_tps": round(s.prompt_tps, 3),
            "gen_tps": round(s.gen_tps, 3),
            "peak_memory_bytes": s.peak_memory_bytes,
            "peak_memory_scope": s.peak_memory_scope,
        }
        if s.expert_cache is not None:
            from qwenlocal.experts.cold import cold_report

            d["expert_hit_rate"] = None if rate is None else round(rate, 4)
            cold = cold_report(s.expert_cache)
            if cold is not None:
                d["cold_experts"] = cold
        print(json.dumps(d, ensure_ascii=False))
        return
    sys.stdout.write("\n")
    err.print(
        f"[dim]{s.prompt_tokens} prompt tokens, {s.prompt_tps:.1f} tok/s · "
        f"{s.generated_tokens} generated, {s.gen_tps:.1f} tok/s · "
        f"peak {s.peak_memory_bytes / 1024**3:.2f} GiB ({s.peak_memory_scope}) · {s.finish_reason}"
        + (f" · expert cache {100 * rate:.1f} % hits" if rate is not None else "")
        + "[/]",
        highlight=False,
    )
