"""`serve` for agents: tools in, tool calls out (Qwen3's JSON and Qwen3-Coder's XML), and replies
constrained to a JSON schema, driven with the official openai client on a random-weight model."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from typer.testing import CliRunner

from qwenlocal.cli import app
from qwenlocal.generation.tokenizer import Tokenizer
from qwenlocal.generation.tool_calls import (
    JSON_STYLE,
    XML_STYLE,
    ToolCallParser,
    parse_tool_calls,
    template_style,
)
from tests.test_server import LocalServer

DATA = Path(__file__).parent / "data"
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
# Bounded schemas: a random model finishes them within a few dozen tokens.
ANSWER = {
    "type": "object",
    "properties": {
        "mood": {"enum": ["sunny", "rainy", "windy"]},
        "degrees": {"type": "integer", "minimum": -30, "maximum": 45},
        "warm": {"type": "boolean"},
        "note": {"type": "string", "maxLength": 6},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["mood", "degrees", "warm", "note", "tags"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "unit": {"enum": ["C", "F"]},
    },
    "required": ["city", "days", "unit"],
    "additionalProperties": False,
}
CLOCK = {
    "type": "object",
    "properties": {"zone": {"enum": ["UTC", "CET"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather.", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "get_time", "description": "The time.", "parameters": CLOCK}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": CLOCK}


@pytest.fixture(scope="module")
def parts(tiny_ckpt):
    from qwenlocal import load_model

    return load_model(tiny_ckpt, dtype="fp32"), Tokenizer.from_dir(tiny_ckpt), tiny_ckpt


def _serve(parts, template: str | None = None):
    from qwenlocal.generation.engine import Engine

    model, tok, folder = parts
    if template is not None:
        tok = Tokenizer(tok.backend, template, tok.special_tokens)
    generation = json.loads((folder / "generation_config.json").read_text())
    return LocalServer(Engine(model, tok, generation, "tiny", 1024))


@pytest.fixture(scope="module")
def qwen(parts):
    s = _serve(parts)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def coder(parts):
    s = _serve(parts, (DATA / "coder_style_template.jinja").read_text())
    yield s
    s.stop()


def assemble(chunks) -> tuple[str, list[dict], str | None]:
    """Streamed chunks -> (content, tool calls as {"id", "name", "arguments"}, finish_reason)."""
    content, calls, finish = "", {}, None
    for c in chunks:
        if not c.choices:
            continue
        d = c.choices[0].delta
        content += d.content or ""
        for t in d.tool_calls or []:
            call = calls.setdefault(t.index, {"id": None, "name": None, "arguments": ""})
            if t.id:
                assert call["id"] is None and t.function.name  # id and name come first, once
                call["id"], call["name"] = t.id, t.function.name
            call["arguments"] += t.function.arguments or ""
        finish = c.choices[0].finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


# -- structured output ---------------------------------------------------------------------------
@pytest.mark.parametrize("strict", [True, False])
def test_json_schema_replies_validate(qwen, strict):
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": ANSWER, "strict": strict}}
    for seed in range(3):
        r = qwen.client().chat.completions.create(
            model="m",
            messages=ASK,
            response_format=fmt,
            temperature=1,
            seed=seed,
            max_tokens=80,
            extra_body=NO_THINK,
        )
        choice = r.choices[0]
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), ANSWER)


def test_json_object_and_a_reply_cut_by_max_tokens(qwen):
    for seed in range(2):
        r = qwen.client().chat.completions.create(
            model="m",
            messages=ASK,
            response_format={"type": "json_object"},
            temperature=1,
            seed=seed,
            max_tokens=60,
            extra_body=NO_THINK,
        )
        c = r.choices[0]
        assert c.message.content.startswith("{")
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.message.content), dict)
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": ANSWER}}
    r = qwen.client().chat.completions.create(
        model="m", messages=ASK, response_format=fmt, temperature=1, seed=1, max_tokens=4, extra_body=NO_THINK
    )
    c = r.choices[0]  # never a broken object presented as complete
    assert c.finish_reason == "length" and c.message.content.startswith('{"mood"')
    with pytest.raises(json.JSONDecodeError):
        json.loads(c.message.content)


# -- tool calls, Qwen3's JSON format ---------------------------------------------------------------
def check_calls(calls, names) -> None:
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("server", ["qwen", "coder"])
def test_forced_tool_calls_name_a_given_tool_and_validate(server, request):
    s = request.getfixturevalue(server)
    named = {"type": "function", "function": {"name": "get_weather"}}
    for seed, choice in [(0, named), (1, named), (2, "required"), (3, "required")]:
        r = s.client().chat.completions.create(
            model="m",
            messages=ASK,
            tools=TOOLS,
            tool_choice=choice,
            temperature=1,
            seed=seed,
            max_tokens=120,
            parallel_tool_calls=False,
            extra_body=NO_THINK,
        )
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1, c
        assert not c.message.content  # the tags never reach the content
        check_calls(c.message.tool_calls, ["get_weather"] if choice is named else SCHEMAS)


@pytest.mark.parametrize("server", ["qwen", "coder"])
def test_streamed_tool_call_assembles_into_the_same_call(server, request):
    s = request.getfixturevalue(server)
    ask = {
        "model": "m",
        "messages": ASK,
        "tools": TOOLS,
        "tool_choice": "required",
        "temperature": 0,
        "max_tokens": 120,
        "parallel_tool_calls": False,
        "extra_body": NO_THINK,
    }
    whole = s.client().chat.completions.create(**ask).choices[0]
    content, calls, finish = assemble(s.client().chat.completions.create(**ask, stream=True))
    assert finish == whole.finish_reason == "tool_calls" and "<" not in content
    expected = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert [(c["name"], c["arguments"]) for c in calls] == expected
    assert all(c["id"].startswith("call_") for c in calls)


@pytest.mark.parametrize("server", ["qwen", "coder"])
def test_tool_round_trip_answers(server, request):
    s = request.getfixturevalue(server)
    client, ask = s.client(), {"model": "m", "tools": TOOLS, "temperature": 0, "extra_body": NO_THINK}
    named = {"type": "function", "function": {"name": "get_time"}}
    first = client.chat.completions.create(
        messages=ASK, tool_choice=named, parallel_tool_calls=False, max_tokens=40, **ask
    )
    message = first.choices[0].message
    (call,) = message.tool_calls
    # the client's own message object goes back, then the tool's answer
    messages = [*ASK, message, {"role": "tool", "tool_call_id": call.id, "content": "12:00 UTC"}]
    for choice in ("auto", "none"):
        r = client.chat.completions.create(messages=messages, tool_choice=choice, max_tokens=4, **ask)
        assert r.choices[0].finish_reason in ("length", "stop", "tool_calls")
    template_calls = [
        {"id": call.id, "type": "function", "function": {"name": "get_time", "arguments": {"zone": "UTC"}}}
    ]
    rendered = s.engine.tokenizer.apply_chat_template(
        [
            *ASK,
            {"role": "assistant", "content": "", "tool_calls": template_calls},
            {"role": "tool", "content": "12:00"},
        ],
        tools=TOOLS,
    )
    assert ("<function=get_time>" in rendered) == (server == "coder") and "12:00" in rendered


def test_thinking_comes_before_a_constrained_answer(qwen):
    """In thinking mode the think block is free and the schema holds after it."""
    fmt = {"type": "json_schema", "json_schema": {"name": "t", "schema": CLOCK}}
    r = qwen.client().chat.completions.create(
        model="m",
        messages=ASK,
        response_format=fmt,
        temperature=0,
        max_tokens=200,
        extra_body={"chat_template_kwargs": {"enable_thinking": True}},
    )
    c = r.choices[0]
    if c.finish_reason == "stop":
        jsonschema.validate(json.loads(c.message.content), CLOCK)
    else:  # a random model may think to the end of its budget: never presented as complete
        assert c.finish_reason == "length"


# -- the parsers, on text ---------------------------------------------------------------------------
def test_template_style_and_parsing(tiny_ckpt):
    assert template_style(Tokenizer.from_dir(tiny_ckpt).chat_template) == JSON_STYLE
    assert template_style((DATA / "coder_style_template.jinja").read_text()) == XML_STYLE
    text = 'Sure.\n\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
    assert parse_tool_calls(text, JSON_STYLE)[0] == "Sure."
    (call,) = parse_tool_calls(text, JSON_STYLE)[1]
    assert call["function"] == {"name": "get_time", "arguments": '{"zone": "UTC"}'}
    xml = "<tool_call>\n<function=get_weather>\n<parameter=city>\nNew\nYork\n</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"
    content, (call,) = parse_tool_calls(xml, XML_STYLE, SCHEMAS)
    assert content == "" and json.loads(call["function"]["arguments"]) == {"city": "New\nYork", "days": 3}
    assert parse_tool_calls("a <tool_call>\nnot a call\n</tool_call>", JSON_STYLE)[1] == []


def test_the_sampler_takes_only_allowed_tokens():
    import torch

    from qwenlocal.generation.generate import SamplingParams, sample

    logits = torch.randn(1000)
    allowed = torch.zeros(1000, dtype=torch.bool)
    ids = [3, 500, 999]
    allowed[ids] = True
    assert sample(logits, SamplingParams(temperature=0), allowed=allowed) == ids[int(logits[ids].argmax())]
    gen = torch.Generator().manual_seed(0)
    free = SamplingParams(temperature=1.5, top_k=0, top_p=1.0)
    assert {sample(logits, free, gen, allowed=allowed) for _ in range(200)} <= set(ids)
    assert sample(logits, SamplingParams(temperature=0)) == int(logits.argmax())  # no mask: as before


def stream_pieces(parser, text: str) -> tuple[str, list[dict]]:
    """Text fed one character at a time -> (content, calls assembled from the deltas)."""
    content, calls = "", {}
    for piece in [*text, None]:
        c, deltas = parser.add(piece) if piece is not None else parser.finish()
        content += c
        for d in deltas:
            call = calls.setdefault(d["index"], {"name": None, "arguments": ""})
            if "id" in d:
                call["name"] = d["function"]["name"]
            call["arguments"] += d["function"]["arguments"]
    return content, [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize(
    "style, text",
    [
        (
            JSON_STYLE,
            'Let me look.\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2, "unit": "C"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>',
        ),
        (
            XML_STYLE,
            "<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n<parameter=days>\n2\n</parameter>\n<parameter=unit>\nC\n</parameter>\n</function>\n</tool_call>",
        ),
        (JSON_STYLE, "No call here, only <tool text."),
    ],
)
def test_streamed_parse_equals_the_whole_parse(style, text):
    content, calls = parse_tool_calls(text, style, SCHEMAS)
    expected = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in calls]
    assert stream_pieces(ToolCallParser(style, SCHEMAS), text) == (content, expected)
    assert "<tool_call>" not in content and all(json.loads(c["arguments"]) for c in expected)


def test_reasoning_and_tool_calls_come_apart(tiny_ckpt):
    from qwenlocal.app.chat_api import ChatPlan, chat_message
    from qwenlocal.generation.generate import Summary

    plan = ChatPlan("", thinking=True, in_reasoning=False, style=JSON_STYLE, tools=SCHEMAS)
    text = '<think>\nThe user wants the time.\n</think>\n\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
    message, finish = chat_message(plan, Summary(text=text, finish_reason="stop"))
    assert finish == "tool_calls" and message["content"] is None
    assert message["reasoning_content"] == "The user wants the time."
    assert message["tool_calls"][0]["function"] == {"name": "get_time", "arguments": '{"zone": "CET"}'}
    message, finish = chat_message(plan, Summary(text=text[: text.index("CET")], finish_reason="length"))
    assert finish == "length"  # a call cut short is never presented as complete


# -- bad requests ------------------------------------------------------------------------------------
BAD = [
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "strnig"}},
            }
        },
        "response_format.json_schema.schema",
    ),
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"not": {"type": "string"}}, "strict": True},
            }
        },
        "response_format.json_schema.schema",
    ),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"parameters": WEATHER}}]}, "tools[0].function.name"),
    (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
        "tools[0].function.parameters",
    ),
    ({"tool_choice": "required"}, "tool_choice"),
    (
        {"messages": [*ASK, {"role": "tool", "tool_call_id": "call_9", "content": "x"}]},
        "messages[1].tool_call_id",
    ),
    ({"messages": [*ASK, {"role": "tool", "content": "x"}]}, "messages[1].tool_call_id"),
]


@pytest.mark.parametrize("extra, param", BAD)
def test_bad_agent_requests_are_400s_and_the_server_goes_on(qwen, extra, param):
    status, answer = qwen.request("POST", "/v1/chat/completions", {"messages": ASK, "max_tokens": 2, **extra})
    assert status == 400, answer
    error = answer["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
    r = qwen.client().chat.completions.create(model="m", messages=ASK, max_tokens=2)
    assert r.choices[0].finish_reason == "length"


# -- generate --json-schema --------------------------------------------------------------------------
def test_generate_json_schema(tiny_ckpt, tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(ANSWER))
    args = ["generate", str(tiny_ckpt), "Weather?", "--device", "cpu", "--dtype", "fp32", "--no-think"]
    r = CliRunner().invoke(
        app, [*args, "--json-schema", str(schema), "--temp", "1", "--seed", "3", "-n", "80", "--json"]
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["finish_reason"] == "stop"
    jsonschema.validate(json.loads(out["text"]), ANSWER)
    r = CliRunner().invoke(app, [*args, "--json-schema", "-", "-n", "2"], input='{"type": "strnig"}')
    assert (
        r.exit_code == 2 and "The schema stdin cannot be enforced" in r.stderr and "Traceback" not in r.output
    )
    for bad, message in [("{oops", "is not valid JSON"), ("[1]", "must be a JSON schema object")]:
        schema.write_text(bad)
        r = CliRunner().invoke(app, [*args, "--json-schema", str(schema)])
        assert r.exit_code == 2 and message in r.stderr, r.output
    r = CliRunner().invoke(app, [*args, "--json-schema", str(tmp_path / "missing.json")])
    assert r.exit_code == 2 and "Cannot read the schema" in r.stderr
