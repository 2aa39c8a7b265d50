"""llguidance against xgrammar, as the server would use them: Qwen3's real vocabulary, batch 1,
on the CPU. Per library: time to build its view of the tokenizer, time to compile a schema, the
per-token mask cost along a random walk through the grammar (the first mask apart: it warms
caches), and which JSON-schema keywords compile. xgrammar is only needed for this bench:

    pip install --no-deps xgrammar apache-tvm-ffi   # its own requirements would pull a CUDA torch
    python bench/grammar_libs.py
"""

from __future__ import annotations

import json
import random
import time

import torch
from common import machine, markdown_table

from qwenlocal.generation.tokenizer import Tokenizer
from qwenlocal.model.config import BUILTIN_DIR

VOCAB = 151936  # the model's logits (the tokenizer's ids stop earlier)
STEPS = 150
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "format": "email"},
        "tags": {"type": "array", "items": {"enum": ["a", "bb", "ccc"]}, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "kind": {"anyOf": [{"type": "number"}, {"type": "null"}, {"type": "boolean"}]},
    },
    "required": ["name", "age", "tags", "address", "kind"],
    "additionalProperties": False,
}
KEYWORDS = {
    "oneOf": {"oneOf": [{"type": "string"}, {"type": "integer"}]},
    "allOf": {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}}, {"required": ["a"]}]},
    "recursive $ref": {
        "$defs": {
            "n": {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/n"}}}}
        },
        "$ref": "#/$defs/n",
    },
    "patternProperties": {"type": "object", "patternProperties": {"^x_": {"type": "integer"}}},
    "minItems/maxItems": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 5},
    "format date-time": {"type": "string", "format": "date-time"},
    "const": {"const": {"a": 1}},
    "exclusiveMinimum": {"type": "number", "exclusiveMinimum": 0.5, "maximum": 10},
    "minProperties": {"type": "object", "minProperties": 1},
    "multipleOf": {"type": "integer", "multipleOf": 3},
    "prefixItems": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}]},
    "uniqueItems": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
    "not": {"not": {"type": "string"}},
    "if/then": {"if": {"properties": {"a": {"const": 1}}}, "then": {"required": ["b"]}},
    "dependentRequired": {"type": "object", "dependentRequired": {"a": ["b"]}},
}
_BITS = torch.tensor([1 << i for i in range(32)], dtype=torch.int64).to(torch.int32)


def allowed_ids(words: torch.Tensor) -> list[int]:
    return ((words.reshape(-1, 1) & _BITS) != 0).reshape(-1)[:VOCAB].nonzero().flatten().tolist()


def walk(fill, accept, words, eos) -> list[float]:
    """Masks along a random walk of allowed tokens (EOS only when nothing else is allowed)."""
    rng, times = random.Random(0), []
    for _ in range(STEPS):
        t = time.perf_counter()
        fill()
        times.append(time.perf_counter() - t)
        ids = allowed_ids(words)
        choices = [i for i in ids if i not in eos] or ids
        token = rng.choice(choices)
        if token in eos:
            break
        assert accept(token)
    return times


def llguidance_row(tok: Tokenizer) -> tuple[list, dict]:
    import llguidance as llg
    import llguidance.torch as lt

    t = time.perf_counter()
    lltok = llg.LLTokenizer(tok.to_json(), n_vocab=VOCAB, eos_token=list(tok.eos_token_ids))
    t_tok = time.perf_counter() - t
    options = {"whitespace_flexible": False}
    t = time.perf_counter()
    m = llg.LLMatcher(lltok, llg.LLMatcher.grammar_from_json_schema(SCHEMA, overrides=options))
    t_compile = time.perf_counter() - t
    words = lt.allocate_token_bitmask(1, VOCAB)
    times = walk(lambda: lt.fill_next_token_bitmask(m, words), m.consume_token, words, tok.eos_token_ids)
    covered = {}
    for key, schema in KEYWORDS.items():
        g = llg.LLMatcher.grammar_from_json_schema(schema, overrides=options)
        covered[key] = "yes" if not llg.LLMatcher.validate_grammar_with_warnings(g, lltok)[0] else "refused"
    return ["llguidance", t_tok, t_compile, times], covered


def xgrammar_row(tok: Tokenizer) -> tuple[list, dict]:
    import transformers
    import xgrammar as xgr

    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend, eos_token="<|im_end|>")
    t = time.perf_counter()
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(fast, vocab_size=VOCAB))
    t_tok = time.perf_counter() - t
    t = time.perf_counter()
    m = xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False))
    t_compile = time.perf_counter() - t
    words = xgr.allocate_token_bitmask(1, VOCAB)
    times = walk(lambda: m.fill_next_token_bitmask(words), m.accept_token, words, tok.eos_token_ids)
    covered = {}
    for key, schema in KEYWORDS.items():
        try:
            compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
            covered[key] = "yes"
        except Exception:  # noqa: BLE001 - any refusal counts
            covered[key] = "refused"
    return ["xgrammar", t_tok, t_compile, times], covered


def main() -> None:
    tok = Tokenizer.from_dir(BUILTIN_DIR)
    rows, coverage = [], {}
    for make in (llguidance_row, xgrammar_row):
        try:
            (name, t_tok, t_compile, times), covered = make(tok)
        except ImportError as e:
            print(f"skipped: {e}")
            continue
        ms = sorted(x * 1e3 for x in times[1:])
        rows.append(
            [
                name,
                f"{t_tok:.2f}",
                f"{t_compile * 1e3:.1f}",
                f"{sum(ms) / len(ms):.3f}",
                f"{ms[len(ms) // 2]:.3f}",
                f"{ms[-1]:.2f}",
                len(times),
            ]
        )
        coverage[name] = covered
    print(f"machine: {machine()}")
    print(
        markdown_table(
            ["library", "tokenizer s", "compile ms", "mask mean ms", "median ms", "max ms", "steps"], rows
        )
    )
    names = list(coverage)
    print(markdown_table(["keyword", *names], [[k, *(coverage[n][k] for n in names)] for k in KEYWORDS]))


if __name__ == "__main__":
    main()
