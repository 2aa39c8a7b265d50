"""/v1/chat/completions without HTTP: a checked request made into a prompt and, where the reply
is constrained, a grammar; the finished reply, or its stream, in OpenAI's shape. Text runs
through three stages: stop strings held back, `<think>` split off into `reasoning_content`,
tool calls split off into `tool_calls`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from qwenlocal.app.api_models import ChatRequest, forced_tools, response_schema, template_messages, tool_specs
from qwenlocal.app.openai_api import APIError, StopBuffer
from qwenlocal.errors import UserError
from qwenlocal.generation.engine import Engine
from qwenlocal.generation.generate import Summary
from qwenlocal.generation.grammar import GrammarError, Tokens, check_grammar, json_body, lark, tool_calls_body
from qwenlocal.generation.reasoning import ReasoningSplitter, split_reasoning
from qwenlocal.generation.tool_calls import ToolCallParser, parse_tool_calls, template_style


@dataclass
class ChatPlan:
    """What a chat request asks the engine for, and how its text is to be read back."""

    prompt: list[int]  # token ids
    thinking: bool
    in_reasoning: bool  # the prompt itself opened a think block
    grammar: str | None = None
    style: str | None = None  # the tool-call format parsed out of the answer; None: no tools
    tools: dict[str, dict] = field(default_factory=dict)  # name -> parameters schema


def plan_chat(engine: Engine, req: ChatRequest) -> ChatPlan:
    """The prompt and the constraint of a request; a bad tool, tool_choice, tool message or
    schema is a 400."""
    tok = engine.tokenizer
    kwargs = req.chat_template_kwargs
    thinking = (
        engine.defaults.think if kwargs is None or kwargs.enable_thinking is None else kwargs.enable_thinking
    )
    specs = tool_specs(req)
    forced = forced_tools(req, specs) if req.tool_choice != "none" else None
    use_tools = bool(specs) and req.tool_choice != "none"
    schema = None if forced else response_schema(req)
    rendered_tools = None
    if use_tools:
        described = {t.function.name: t.function.description for t in req.tools or []}
        rendered_tools = [
            {"type": "function", "function": {"name": n, "description": described[n] or "", "parameters": p}}
            for n, p in specs.items()
        ]
    try:
        text = tok.apply_chat_template(
            template_messages(req), add_generation_prompt=True, enable_thinking=thinking, tools=rendered_tools
        )
    except UserError as e:
        raise APIError(400, str(e), "template_error") from None
    prompt = tok.encode(text)
    plan = ChatPlan(prompt, thinking, tok.opens_reasoning(prompt))
    if use_tools:
        plan.style, plan.tools = template_style(tok.chat_template), specs
    tokens = Tokens.of(tok)
    if forced:
        body = tool_calls_body(forced, plan.style, tokens, req.parallel_tool_calls)
    elif schema:
        body = json_body(*schema)
    else:
        return plan
    plan.grammar = lark(body, tokens, thinking, plan.in_reasoning)
    try:
        check_grammar(plan.grammar)
    except GrammarError as e:
        raise APIError(400, str(e), "invalid_value", "tools" if forced else "response_format") from None
    return plan


def _finish_reason(reason: str, calls: list) -> str:
    return "tool_calls" if calls and reason == "stop" else reason


def chat_message(plan: ChatPlan, s: Summary) -> tuple[dict, str]:
    """The finished reply -> (message, finish_reason)."""
    reasoning, content = split_reasoning(s.text, plan.in_reasoning)
    calls: list[dict] = []
    if plan.style is not None:
        content, calls = parse_tool_calls(content, plan.style, plan.tools)
    message: dict[str, Any] = {"role": "assistant", "content": content, "reasoning_content": reasoning}
    if calls:
        message["content"] = content or None
        message["tool_calls"] = calls
    return message, _finish_reason(s.finish_reason, calls)


async def chat_stream(
    plan: ChatPlan,
    stop: list[str],
    events: AsyncIterator[tuple[str, Any]],
    chunk: Callable[..., str],
    on_error: Callable[[Exception], str],
    on_usage: Callable[[Summary], str | None],
) -> AsyncIterator[str]:
    """A job's events as chat.completion.chunk events: role first, then reasoning, content and
    tool-call deltas, then the finish reason (and usage)."""
    stops, splitter = StopBuffer(stop), ReasoningSplitter(plan.in_reasoning)
    tools = ToolCallParser(plan.style, plan.tools) if plan.style is not None else None

    def delta(reasoning: str, content: str, final: bool = False) -> dict:
        calls: list[dict] = []
        if tools is not None:
            content, calls = tools.add(content)
            if final:
                more, more_calls = tools.finish()
                content, calls = content + more, calls + more_calls
        parts = (("reasoning_content", reasoning), ("content", content), ("tool_calls", calls))
        return {k: v for k, v in parts if v}

    yield chunk({"role": "assistant", "content": ""})
    async for kind, value in events:
        if kind == "token":
            if d := delta(*splitter.add(stops.add(value.text))):
                yield chunk(d)
        elif kind == "error":
            yield on_error(value)
        else:
            r1, c1 = splitter.add(stops.finish(value.text))
            r2, c2 = splitter.finish()
            if d := delta(r1 + r2, c1 + c2, final=True):
                yield chunk(d)
            yield chunk({}, _finish_reason(value.finish_reason, tools.calls if tools else []))
            if (u := on_usage(value)) is not None:
                yield u
    yield "data: [DONE]\n\n"
