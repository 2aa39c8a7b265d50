"""Tool calls in the model's own words, out of the reply and into OpenAI's `tool_calls`.

Two formats, told apart by the chat template: Qwen3 writes
`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` (JSON), Qwen3-Coder writes
`<tool_call>\\n<function=NAME>\\n<parameter=KEY>\\nVALUE\\n</parameter>\\n</function>\\n</tool_call>` (XML).
One streaming parser serves both answers: the whole reply is the stream fed at once, so a streamed
call always assembles into the call a plain request returns.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from qwenlocal.generation.reasoning import partial_suffix

JSON_STYLE, XML_STYLE = "json", "xml"
CALL_START, CALL_END = "<tool_call>", "</tool_call>"
_JSON_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')
_XML_HEAD = re.compile(r"\s*<function=([^>\n]+)>")
_XML_PARAM = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.DOTALL)
_XML_END = "</function>"


def template_style(template: str | dict[str, str]) -> str:
    """The tool-call format a chat template teaches: XML when it shows `<function=`, else JSON."""
    source = template if isinstance(template, str) else " ".join(v for v in template.values() if v)
    return XML_STYLE if "<function=" in source else JSON_STYLE


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def xml_is_text(schema: dict | None) -> bool:
    """Whether a Coder-style parameter is written as bare text (a string) rather than as JSON."""
    schema = schema or {}
    if "type" in schema:
        return schema["type"] == "string"
    values = schema.get("enum", [schema["const"]] if "const" in schema else None)
    return values is None or all(isinstance(v, str) for v in values)


def xml_value(text: str, schema: dict | None) -> Any:
    """A Coder-style parameter's text as the JSON value its schema asks for: text stays text,
    anything else is read as JSON (kept as text when it is not)."""
    if xml_is_text(schema):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


class ToolCallParser:
    """Splits streamed answer text into content and OpenAI tool-call deltas: the first delta of a
    call carries its index, id, type and name; the ones after it carry `arguments` in pieces. The
    tags never reach the content; whitespace around the calls is dropped."""

    def __init__(self, style: str, tools: dict[str, dict] | None = None):
        self.style, self.tools = style, tools or {}
        self.calls: list[dict] = []  # assembled as the deltas go out
        self._buf = ""
        self._in_call = False
        self._space = ""  # content whitespace held back: it is dropped if a call follows
        self._reset_call()

    def _reset_call(self) -> None:
        self._named, self._sent, self._params = False, 0, 0

    # -- deltas ------------------------------------------------------------------------------------
    def _head(self, name: str) -> dict:
        call = {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": ""}}
        self.calls.append(call)
        self._named = True
        return {"index": len(self.calls) - 1, **call, "function": dict(call["function"])}

    def _args(self, piece: str) -> list[dict]:
        if not piece:
            return []
        self.calls[-1]["function"]["arguments"] += piece
        return [{"index": len(self.calls) - 1, "function": {"arguments": piece}}]

    def _content(self, text: str) -> str:
        text, self._space = self._space + text, ""
        body = text.rstrip()
        self._space = text[len(body) :]
        return body if not self.calls or body.strip() else ""

    # -- one call block, as far as it has come ------------------------------------------------------
    def _progress(self, block: str, closed: bool) -> tuple[str, list[dict]]:
        if self.style == XML_STYLE:
            return self._progress_xml(block, closed)
        deltas: list[dict] = []
        if not self._named:
            m = _JSON_HEAD.match(block)
            if m is None:
                return self._whole_json(block) if closed else ("", [])
            deltas.append(self._head(json.loads(f'"{m.group(1)}"')))
            self._start = m.end()
        args = block[self._start :].strip()
        if args.endswith("}"):  # the object's closing brace, at least for now: held back
            args = args[:-1]
        deltas += self._args(args[self._sent :])
        self._sent = max(self._sent, len(args))
        return "", deltas

    def _whole_json(self, block: str) -> tuple[str, list[dict]]:
        """A closed block that did not start as Qwen writes it: a call if it parses as one, else text."""
        try:
            obj = json.loads(block)
        except json.JSONDecodeError:
            obj = None
        if not (isinstance(obj, dict) and isinstance(obj.get("name"), str)):
            return self._content(CALL_START + block + CALL_END), []
        head = self._head(obj["name"])
        args = obj.get("arguments", {})
        return "", [
            head,
            *self._args(args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)),
        ]

    def _progress_xml(self, block: str, closed: bool) -> tuple[str, list[dict]]:
        deltas: list[dict] = []
        if not self._named:
            m = _XML_HEAD.match(block)
            if m is None:
                return (self._content(CALL_START + block + CALL_END), []) if closed else ("", [])
            deltas.append(self._head(m.group(1).strip()))
            self._start = m.end()
        name = self.calls[-1]["function"]["name"]
        props = (self.tools.get(name) or {}).get("properties") or {}
        params = _XML_PARAM.findall(block, self._start)
        for key, text in params[self._params :]:
            value = json.dumps(xml_value(text, props.get(key)), ensure_ascii=False)
            deltas += self._args(("{" if self._params == 0 else ", ") + f"{json.dumps(key)}: {value}")
            self._params += 1
        if (closed or _XML_END in block[self._start :]) and self._sent == 0:
            deltas += self._args("}" if self._params else "{}")
            self._sent = 1  # the arguments are complete
        return "", deltas

    # -- the stream ---------------------------------------------------------------------------------
    def add(self, text: str) -> tuple[str, list[dict]]:
        """More answer text -> (content, tool-call deltas) that are now certain."""
        self._buf += text
        content, deltas = [], []
        while True:
            if not self._in_call:
                i = self._buf.find(CALL_START)
                if i < 0:
                    keep = partial_suffix(self._buf, CALL_START)
                    content.append(self._content(self._buf[: len(self._buf) - keep]))
                    self._buf = self._buf[len(self._buf) - keep :]
                    break
                content.append(self._content(self._buf[:i]))
                self._space = ""
                self._buf, self._in_call = self._buf[i + len(CALL_START) :], True
                self._reset_call()
                continue
            j = self._buf.find(CALL_END)
            if j < 0:
                keep = partial_suffix(self._buf, CALL_END)
                c, d = self._progress(self._buf[: len(self._buf) - keep], closed=False)
                content.append(c)
                deltas += d
                break
            c, d = self._progress(self._buf[:j], closed=True)
            content.append(c)
            deltas += d
            self._buf, self._in_call = self._buf[j + len(CALL_END) :], False
        return "".join(content), deltas

    def finish(self) -> tuple[str, list[dict]]:
        """What was held back, once the reply has ended (a call cut short keeps what it has)."""
        if self._in_call:
            c, d = self._progress(self._buf, closed=False)
            if not self._named:  # not even a name: the text was never a call
                c = self._content(CALL_START + self._buf)
            self._buf = ""
            return c, d
        buf, self._buf = self._buf, ""
        text = self._content(buf)
        if not self.calls:
            text, self._space = text + self._space, ""
        return text, []


def parse_tool_calls(text: str, style: str, tools: dict[str, dict] | None = None) -> tuple[str, list[dict]]:
    """Whole answer -> (content, tool_calls in OpenAI's shape)."""
    parser = ToolCallParser(style, tools)
    c1, _ = parser.add(text)
    c2, _ = parser.finish()
    return c1 + c2, parser.calls
