"""Request bodies of the OpenAI API as pydantic models (strict types: "1" is not a number), their
checks that need more than a type (tools, tool_choice, tool messages, response_format), and the
Job a checked request becomes. Every failure is an APIError 400 in OpenAI's shape, its `param`
naming the field."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from qwenlocal.app.openai_api import APIError
from qwenlocal.errors import UserError
from qwenlocal.generation.engine import Engine, Job
from qwenlocal.generation.generate import SamplingParams
from qwenlocal.generation.grammar import GrammarError, check_schema

TOOL_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")
TOOL_NAME_MAX = 64
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # clients send fields we have no use for


class FunctionCall(_Strict):
    name: str
    arguments: str


class ToolCallIn(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None

    @field_validator("role", mode="before")
    @classmethod
    def _role(cls, v: Any) -> Any:
        if v not in ROLES:
            raise PydanticCustomError(
                "invalid_value",
                "{role!r} is not a role; use system, developer, user, assistant or tool",
                {"role": v},
            )
        return v

    @field_validator("content", mode="before")
    @classmethod
    def _text(cls, v: Any) -> Any:
        if v is None or isinstance(v, str):
            return v
        if not isinstance(v, list):
            raise PydanticCustomError("invalid_type", "must be a string or a list of text parts")
        parts = []
        for part in v:  # [{"type": "text", "text": ...}, ...]
            if not (
                isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            ):
                raise PydanticCustomError("invalid_value", "only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class FunctionDef(_Strict):
    name: str
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str


class NamedChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Strict):
    name: str = "response"
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class TemplateKwargs(_Strict):
    enable_thinking: bool | None = None


class SamplingRequest(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(None, gt=0)
    max_completion_tokens: int | None = Field(None, gt=0)
    n: Literal[1] | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    seed: int | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v: Any) -> Any:
        if v is None or isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v)):
            return v
        raise PydanticCustomError("invalid_type", "must be a string or a list of strings")

    def stops(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return [s for s in stop if s]

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class ChatRequest(SamplingRequest):
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    chat_template_kwargs: TemplateKwargs | None = None


class CompletionRequest(SamplingRequest):
    prompt: Any


def _param(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse(model: type[BaseModel], body: dict) -> Any:
    """The body as `model`, or the first problem as an APIError 400."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = _param(err["loc"])
        kind = err["type"]
        if kind == "missing":
            raise APIError(400, f"'{param}' is required.", "missing_required_parameter", param) from None
        if kind in ("invalid_type", "invalid_value"):
            code = kind
        else:
            code = "invalid_type" if kind.endswith(("_type", "_parsing")) else "invalid_value"
        raise APIError(400, f"'{param}': {err['msg'].rstrip('.')}.", code, param) from None


# -- checks beyond types -------------------------------------------------------------------------
def tool_specs(req: ChatRequest) -> dict[str, dict]:
    """name -> parameters schema of each tool; a nameless tool or one whose parameters are not an
    object schema is a 400."""
    specs: dict[str, dict] = {}
    for i, tool in enumerate(req.tools or []):
        where, f = f"tools[{i}].function", tool.function
        if not f.name or len(f.name) > TOOL_NAME_MAX or not set(f.name) <= TOOL_NAME_CHARS:
            raise APIError(
                400,
                f"'{where}.name' must be 1 to {TOOL_NAME_MAX} letters, digits, '_', '-' or '.', got {f.name!r}.",
                "invalid_value",
                f"{where}.name",
            )
        params = f.parameters if f.parameters is not None else {"type": "object", "properties": {}}
        if params.get("type", "object") != "object" or not isinstance(params.get("properties", {}), dict):
            raise APIError(
                400,
                f"'{where}.parameters' must be a JSON schema of type object.",
                "invalid_value",
                f"{where}.parameters",
            )
        specs[f.name] = {"type": "object", **params}
    return specs


def forced_tools(req: ChatRequest, specs: dict[str, dict]) -> list[dict] | None:
    """The tools a call must be made to ({"name", "parameters"}), or None when the model is free."""
    choice = req.tool_choice
    if isinstance(choice, NamedChoice):
        if choice.function.name not in specs:
            raise APIError(
                400,
                f"tool_choice names {choice.function.name!r}, which is not among the given tools.",
                "invalid_value",
                "tool_choice",
            )
        names = [choice.function.name]
    elif choice == "required":
        if not specs:
            raise APIError(400, "tool_choice 'required' needs 'tools'.", "invalid_value", "tool_choice")
        names = list(specs)
    else:
        return None
    for i, name in enumerate(names):
        try:
            check_schema(specs[name], f"tools[{i}].function.parameters")
        except GrammarError as e:
            raise APIError(400, str(e), "invalid_value", e.where) from None
    return [{"name": n, "parameters": specs[n]} for n in names]


def response_schema(req: ChatRequest) -> tuple[dict, bool] | None:
    """(schema, lenient) of a JSON response_format, or None for free text."""
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}, False
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise APIError(
            400,
            "response_format json_schema needs 'json_schema.schema'.",
            "missing_required_parameter",
            "response_format.json_schema.schema",
        )
    lenient = fmt.json_schema.strict is not True  # OpenAI's default: keywords it cannot enforce are ignored
    try:
        return check_schema(fmt.json_schema.schema_, "response_format.json_schema.schema", lenient), lenient
    except GrammarError as e:
        raise APIError(400, str(e), "invalid_value", e.where) from None


def template_messages(req: ChatRequest) -> list[dict]:
    """The messages as the chat template reads them: roles mapped, a call's arguments as an object
    (Qwen3's template writes them back as JSON, Qwen3-Coder's walks their items); a tool message
    must answer a call made before it."""
    out, call_ids = [], set()
    for i, m in enumerate(req.messages):
        msg: dict = {"role": ROLES[m.role], "content": m.content if m.content is not None else ""}
        if m.role == "assistant" and m.reasoning_content is not None:
            msg["reasoning_content"] = m.reasoning_content
        if m.role == "assistant" and m.tool_calls:
            msg["tool_calls"] = [_template_call(c) for c in m.tool_calls]
            call_ids |= {c.id for c in m.tool_calls}
        if m.role == "tool":
            if m.tool_call_id is None or m.tool_call_id not in call_ids:
                raise APIError(
                    400,
                    f"messages[{i}] answers tool call {m.tool_call_id!r}, which no assistant message before it made.",
                    "invalid_value",
                    f"messages[{i}].tool_call_id",
                )
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


def _template_call(c: ToolCallIn) -> dict:
    try:
        arguments: Any = json.loads(c.function.arguments)
    except json.JSONDecodeError:
        arguments = c.function.arguments
    return {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": arguments}}


# -- jobs ----------------------------------------------------------------------------------------
def request_sampling(engine: Engine, req: SamplingRequest, thinking: bool) -> SamplingParams:
    """The request's sampling values, else the server's defaults, else the mode's."""
    d = engine.defaults
    keys = ("temperature", "top_k", "top_p", "min_p", "presence_penalty", "seed")
    values = {k: v if (v := getattr(req, k)) is not None else getattr(d, k) for k in keys}
    try:
        return SamplingParams.for_mode(thinking, engine.generation, **values)
    except UserError as e:
        raise APIError(400, str(e), "invalid_value") from None


def make_job(
    engine: Engine, req: SamplingRequest, prompt: list[int], thinking: bool, grammar: str | None = None
) -> Job:
    if not prompt:
        raise APIError(400, "The prompt is empty.", "invalid_value", "prompt")
    if len(prompt) >= engine.ctx_size:
        raise APIError(
            400,
            f"The prompt has {len(prompt):,} tokens; the context holds {engine.ctx_size:,} "
            "(the server's --ctx-size).",
            "context_length_exceeded",
            "messages",
        )
    n = req.token_limit or engine.defaults.max_tokens or engine.ctx_size - len(prompt)
    params = request_sampling(engine, req, thinking)
    return Job(prompt, params, n, req.stops(), asyncio.get_running_loop(), grammar=grammar)
