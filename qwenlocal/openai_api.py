"""OpenAI's API shapes, without a server: errors, request bodies read and checked into jobs, stop
strings held back from a stream, usage and server-sent events."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from .engine import Engine, EngineError, Job
from .errors import UserError
from .generate import SamplingParams, Summary
from .reasoning import partial_suffix

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
RETRY_AFTER_S = 1
ENGINE_STATUS = {"queue_full": 503, "shutting_down": 503, "client_closed": 499}


# -- errors in OpenAI's shape --------------------------------------------------------------------
class APIError(Exception):
    """An HTTP error answered as {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def from_engine(cls, e: EngineError) -> APIError:
        status = ENGINE_STATUS[e.code]
        if status == 499:
            return cls(status, str(e), e.code)
        return cls(status, str(e), e.code, type="server_error", headers={"Retry-After": str(RETRY_AFTER_S)})


# -- stop strings ---------------------------------------------------------------------------------
class StopBuffer:
    """Holds back streamed text that may be the start of a stop string, so a stream never sends
    text at or past one (the Generator checks stops only after yielding the token)."""

    def __init__(self, stop: list[str]):
        self.stop, self.text, self.sent, self.stopped = stop, "", 0, False

    def add(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.text += piece
        hits = [i for s in self.stop if (i := self.text.find(s, self.sent)) >= 0]
        if hits:
            self.stopped, end = True, min(hits)
        else:
            end = len(self.text) - max((partial_suffix(self.text, s) for s in self.stop), default=0)
        out, self.sent = self.text[self.sent : end], max(self.sent, end)
        return out

    def finish(self, final_text: str) -> str:
        """The rest of the final text (the Generator's, already cut at the first stop string)."""
        out, self.sent = final_text[self.sent :], len(final_text)
        return out


# -- request parsing -----------------------------------------------------------------------------
def _get_number(body: dict, key: str, integer: bool = False) -> Any:
    value = body.get(key)
    if value is None:
        return None
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok:
        kind = "an integer" if integer else "a number"
        raise APIError(400, f"'{key}' must be {kind}, got {value!r}.", "invalid_type", key)
    return value


def _get_stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise APIError(400, "'stop' must be a string or a list of strings.", "invalid_type", "stop")
    return [s for s in stop if s]


def _text_content(content: Any, where: str, role: str) -> str:
    if content is None and role == "assistant":
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if not (
                isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            ):
                raise APIError(
                    400, f"{where}: only text content parts are supported.", "invalid_value", where
                )
            parts.append(part["text"])
        return "".join(parts)
    raise APIError(400, f"{where} must be a string or a list of text parts.", "invalid_type", where)


def parse_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if messages is None:
        raise APIError(400, "'messages' is required.", "missing_required_parameter", "messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list.", "invalid_value", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"{where} must be an object.", "invalid_type", where)
        role = m.get("role")
        if role not in ROLES:
            raise APIError(
                400,
                f"{where}.role is {role!r}; supported roles are system, user and assistant.",
                "invalid_value",
                f"{where}.role",
            )
        msg = {"role": ROLES[role], "content": _text_content(m.get("content"), f"{where}.content", role)}
        if role == "assistant" and isinstance(m.get("reasoning_content"), str):
            msg["reasoning_content"] = m["reasoning_content"]
        out.append(msg)
    return out


def request_sampling(engine: Engine, body: dict, thinking: bool) -> SamplingParams:
    """The request's sampling values, else the server's defaults, else the mode's."""
    d = engine.defaults
    pick = {
        "temperature": (_get_number(body, "temperature"), d.temperature),
        "top_k": (_get_number(body, "top_k", integer=True), d.top_k),
        "top_p": (_get_number(body, "top_p"), d.top_p),
        "min_p": (_get_number(body, "min_p"), d.min_p),
        "presence_penalty": (_get_number(body, "presence_penalty"), d.presence_penalty),
        "seed": (_get_number(body, "seed", integer=True), d.seed),
    }
    values = {k: req if req is not None else default for k, (req, default) in pick.items()}
    try:
        return SamplingParams.for_mode(thinking, engine.generation, **values)
    except UserError as e:
        raise APIError(400, str(e), "invalid_value") from None


def make_job(engine: Engine, body: dict, prompt: list[int], thinking: bool) -> Job:
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
    n = body.get("max_completion_tokens", body.get("max_tokens"))
    key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n <= 0):
        raise APIError(400, f"'{key}' must be a positive integer, got {n!r}.", "invalid_value", key)
    if n is None:
        n = engine.defaults.max_tokens or engine.ctx_size - len(prompt)
    nchoices = body.get("n")
    if nchoices not in (None, 1):
        raise APIError(400, "Only n=1 is supported.", "invalid_value", "n")
    params = request_sampling(engine, body, thinking)
    return Job(prompt, params, n, _get_stop(body), asyncio.get_running_loop())


def submit(engine: Engine, job: Job) -> None:
    try:
        engine.submit(job)
    except EngineError as e:
        raise APIError.from_engine(e) from None


# -- answers --------------------------------------------------------------------------------------
def usage(s: Summary) -> dict:
    return {
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.generated_tokens,
        "total_tokens": s.prompt_tokens + s.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": s.cached_tokens},
    }


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def as_api_error(e: Exception) -> APIError:
    """An error met while a job ran, as the client gets it."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, EngineError):
        return APIError.from_engine(e)
    return APIError(500, f"Generation failed: {e}", "generation_error", type="server_error")
