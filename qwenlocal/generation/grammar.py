"""Constrained decoding: grammars for JSON schemas and tool calls, compiled by llguidance, and a
token mask that the sampler applies before it samples.

llguidance, not xgrammar, by measurement (bench/grammar_libs.py; README, "Tools and structured
output"): it compiles a schema in 2 to 18 ms where xgrammar takes 120 to 200 ms (every request
with a new schema would wait), has no dependencies (xgrammar needs torch, transformers, triton
and tvm-ffi), and refuses JSON-schema keywords it cannot enforce instead of ignoring them. Its
mask costs 0.1 to 0.2 ms a token (median; 0.4 to 0.8 mean) and is computed on a worker thread
while the model runs the step.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from qwenlocal.errors import UserError
from qwenlocal.generation.tokenizer import THINK_END, THINK_START
from qwenlocal.generation.tool_calls import CALL_END, CALL_START, xml_is_text

# JSON as the model writes it: no free whitespace (a random or weak model could pad forever), and
# the separators of the chat templates' tojson, which the model saw in training.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Whitespace the model may write after </think> before a constrained answer (Qwen3 writes "\n\n").
AFTER_THINK = r"/[ \n]{0,3}/"
# A character of a Coder-style (XML) text parameter: anything that does not start "</" (the end tag).
XML_CHAR = r"([^<]|<[^\/])"
_BITS = torch.tensor([1 << i for i in range(32)], dtype=torch.int64).to(torch.int32)


class GrammarError(UserError):
    """A schema or grammar the library cannot compile; `where` names the part of the request."""

    def __init__(self, message: str, where: str | None = None):
        super().__init__(message)
        self.where = where


def _llg():
    import llguidance

    return llguidance


def check_schema(schema: Any, where: str, lenient: bool = False) -> dict:
    """The schema, if llguidance can enforce it; else GrammarError naming `where`."""
    if not isinstance(schema, dict):
        raise GrammarError(f"{where} must be a JSON schema object.", where)
    llg = _llg()
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(
            schema, overrides={**JSON_LAYOUT, "lenient": lenient}
        )
    except ValueError as e:
        raise GrammarError(f"{where} is not a usable JSON schema ({e}).", where) from None
    failed, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        reason = messages[0].strip().rstrip(".") if messages else "it does not compile"
        raise GrammarError(f"{where} cannot be enforced: {reason}.", where)
    return schema


def _json(schema: dict, lenient: bool = False) -> str:
    return "%json " + json.dumps({**schema, "x-guidance": {**JSON_LAYOUT, "lenient": lenient}})


def _lit(text: str) -> str:
    return json.dumps(text)


@dataclass(frozen=True)
class Tokens:
    """The special tokens a grammar refers to by id (one token each, as the model writes them)."""

    think_start: int | None
    think_end: int | None
    tool_call_start: int | None
    tool_call_end: int | None

    @classmethod
    def of(cls, tokenizer) -> Tokens:
        ids = [tokenizer.token_to_id(t) for t in (THINK_START, THINK_END, CALL_START, CALL_END)]
        return cls(*ids)


def _tok(token_id: int | None, text: str) -> str:
    return f"<[{token_id}]>" if token_id is not None else _lit(text)


def lark(body: str, tokens: Tokens, thinking: bool, in_reasoning: bool) -> str:
    """A grammar whose answer is `body` (lark rules with `body` as the start of the answer); in
    thinking mode a think block may come first, free, so the model reasons as it would unconstrained."""
    end = _tok(tokens.think_end, THINK_END)
    if in_reasoning:
        head = f"THINK {end} {AFTER_THINK} "
    elif thinking:
        head = f"({_tok(tokens.think_start, THINK_START)} THINK {end} {AFTER_THINK})? "
    else:
        head = ""
    rules = f"start: {head}answer\n{body}\n"
    return rules + ("THINK: /(.|\\n)*/\n" if head else "")


def json_body(schema: dict, lenient: bool = False) -> str:
    return f"answer: {_json(schema, lenient)}"


def tool_calls_body(tools: list[dict], style: str, tokens: Tokens, parallel: bool) -> str:
    """Rules for one call (or several, `parallel`) to one of `tools` ({"name", "parameters"}),
    written as the model's template writes them: Qwen3's JSON or Qwen3-Coder's XML."""
    rules = ["answer: call" + (' ("\\n" call)*' if parallel else "")]
    rules.append("call: " + " | ".join(f"call_{i}" for i in range(len(tools))))
    start, end = _tok(tokens.tool_call_start, CALL_START), _tok(tokens.tool_call_end, CALL_END)
    for i, tool in enumerate(tools):
        name, params = tool["name"], tool.get("parameters") or {"type": "object"}
        if style == "json":
            head = _lit('\n{"name": ' + json.dumps(name) + ', "arguments": ')
            rules.append(f'call_{i}: {start} {head} args_{i} "}}\\n" {end}')
            rules.append(f"args_{i}: {_json(params)}")
            continue
        props = params.get("properties") or {}
        required = set(params.get("required") or ())
        parts = []
        for j, (key, sub) in enumerate(props.items()):
            value = _xml_text(sub) if xml_is_text(sub) else _json(sub or {})
            rules.append(
                f"p_{i}_{j}: {_lit(f'<parameter={key}>' + chr(10))} v_{i}_{j} {_lit(chr(10) + '</parameter>' + chr(10))}"
            )
            rules.append(f"v_{i}_{j}: {value}")
            parts.append(f"p_{i}_{j}" + ("" if key in required else "?"))
        head = _lit(f"\n<function={name}>\n")
        rules.append(f'call_{i}: {start} {head} {" ".join(parts)} "</function>\\n" {end}')
    return "\n".join(rules)


def _xml_text(schema: dict | None) -> str:
    """A text parameter in XML style: its enum or const as literals, else text of its length bounds
    (other string keywords, such as pattern, are left to the model)."""
    schema = schema or {}
    values = schema.get("enum", [schema["const"]] if "const" in schema else None)
    if values:
        return " | ".join(_lit(v) for v in values)
    low, high = schema.get("minLength", 0), schema.get("maxLength")
    return f"/{XML_CHAR}{{{low},{'' if high is None else high}}}/"


def check_grammar(grammar: str) -> None:
    """GrammarError unless the lark text compiles."""
    llg = _llg()
    failed, messages = llg.LLMatcher.validate_grammar_with_warnings(llg.LLMatcher.grammar_from_lark(grammar))
    if failed:
        raise GrammarError(f"The constraint does not compile: {messages[0] if messages else grammar}.")


# -- the mask ------------------------------------------------------------------------------------
_tokenizers: dict[int, tuple[object, object]] = {}
_tokenizers_lock = threading.Lock()
_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qwenlocal-mask")


def grammar_tokenizer(tokenizer, vocab_size: int, eos_ids: tuple[int, ...]):
    """llguidance's view of the tokenizer (2 to 4 s to build), made once per vocabulary object
    (tokenizers that differ only in their chat template share it)."""
    with _tokenizers_lock:
        key = id(tokenizer.backend)
        if key not in _tokenizers:
            llg = _llg()
            built = llg.LLTokenizer(tokenizer.to_json(), n_vocab=vocab_size, eos_token=list(eos_ids))
            _tokenizers[key] = (tokenizer.backend, built)  # kept, so its id is not reused
        return _tokenizers[key][1]


class Constraint:
    """A grammar's matcher during one reply. `allowed()` is the mask of the next token; after
    `advance(token)` the next mask is computed on a worker thread while the model runs its step
    (llguidance releases the GIL), unless `overlap` is off."""

    def __init__(
        self, grammar: str, tokenizer, vocab_size: int, eos_ids: tuple[int, ...], overlap: bool = True
    ):
        llg = _llg()
        self.vocab_size, self.overlap = vocab_size, overlap
        self.matcher = llg.LLMatcher(
            grammar_tokenizer(tokenizer, vocab_size, eos_ids), llg.LLMatcher.grammar_from_lark(grammar)
        )
        if self.matcher.is_error():
            raise GrammarError(f"The constraint does not compile: {self.matcher.get_error()}.")
        self._words = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)
        self._next: Future | torch.Tensor | None = None

    def _mask(self) -> torch.Tensor:
        self.matcher.unsafe_compute_mask_ptr(self._words.data_ptr(), self._words.numel() * 4)
        return ((self._words.unsqueeze(1) & _BITS) != 0).reshape(-1)[: self.vocab_size]

    def begin(self) -> None:
        """Start on the first mask (it overlaps the prefill)."""
        self._next = _pool.submit(self._mask) if self.overlap else self._mask()

    def allowed(self) -> torch.Tensor:
        """bool [vocab]: the tokens the grammar lets come next."""
        if self._next is None:
            self.begin()
        nxt = self._next
        mask = nxt.result() if isinstance(nxt, Future) else nxt
        if self.matcher.is_error() or not bool(mask.any()):
            raise RuntimeError(
                f"the grammar allows no next token: {self.matcher.get_error() or 'empty mask'}"
            )
        return mask

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"token {token} broke the grammar: {self.matcher.get_error()}")
        self.begin()

    def close(self) -> None:
        if isinstance(self._next, Future):
            self._next.result()  # never leave the worker writing into a mask nobody reads
        self._next = None
