"""`qwenlocal serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn, SSE streaming).

One model, one worker thread: requests run one at a time in arrival order, up to `max_queue` wait
and the rest get 503. One Generator is kept across requests, so a prompt that extends the previous
conversation prefills only its new tokens. Qwen3's `<think>...</think>` text is returned apart, as
`reasoning_content`.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations, and fastapi is
# imported inside create_app (it would slow every other command's start).
import asyncio
import contextlib
import hmac
import json
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from . import cli_util as cli
from . import options as opt
from .errors import UserError
from .generate import Generator, SamplingParams, Summary, Totals
from .memory import live_report, measure

DEFAULT_MODEL = "Qwen/Qwen3-30B-A3B"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_MAX_QUEUE = 8
DEFAULT_CTX_SIZE = "8192"
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there
GRACEFUL_SHUTDOWN_S = 3
THINK_START, THINK_END = "<think>", "</think>"
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


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


# -- text: stop strings and the think block ------------------------------------------------------
def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


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
            end = len(self.text) - max((_partial_suffix(self.text, s) for s in self.stop), default=0)
        out, self.sent = self.text[self.sent : end], max(self.sent, end)
        return out

    def finish(self, final_text: str) -> str:
        """The rest of the final text (the Generator's, already cut at the first stop string)."""
        out, self.sent = final_text[self.sent :], len(final_text)
        return out


class ReasoningSplitter:
    """Streams generated text into (reasoning, content): what is inside `<think>...</think>` is
    reasoning. Qwen3 writes `<think>\\n...\\n</think>\\n\\n` then the answer; the whitespace around
    both parts is trimmed. `in_reasoning`: the prompt itself opened the think block."""

    def __init__(self, in_reasoning: bool = False):
        self.state = "reasoning" if in_reasoning else "start"
        self.saw_think = in_reasoning
        self._buf = ""
        self._strip_lead = in_reasoning

    def add(self, text: str) -> tuple[str, str]:
        self._buf += text
        reasoning, content = [], []
        while self._buf:
            if self._strip_lead:
                self._buf = self._buf.lstrip()
                if not self._buf:
                    break
                self._strip_lead = False
            if self.state == "start":
                head = self._buf.lstrip()
                if head.startswith(THINK_START):
                    self._buf, self.state, self._strip_lead = head[len(THINK_START) :], "reasoning", True
                    self.saw_think = True
                    continue
                if THINK_START.startswith(head):  # not decided yet
                    break
                self.state = "content"
            if self.state == "reasoning":
                i = self._buf.find(THINK_END)
                if i >= 0:
                    reasoning.append(self._buf[:i].rstrip())
                    self._buf, self.state, self._strip_lead = self._buf[i + len(THINK_END) :], "content", True
                    continue
                # keep back a possible start of `</think>` and the whitespace before it
                head = self._buf[: len(self._buf) - _partial_suffix(self._buf, THINK_END)]
                head = head.rstrip()
                reasoning.append(head)
                self._buf = self._buf[len(head) :]
                break
            content.append(self._buf)
            self._buf = ""
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        buf, self._buf = self._buf, ""
        if self.state == "reasoning":
            return buf.rstrip(), ""
        return "", "" if self._strip_lead else buf


def split_reasoning(text: str, in_reasoning: bool = False) -> tuple[str | None, str]:
    """Whole text -> (reasoning or None when there was no think block, content)."""
    splitter = ReasoningSplitter(in_reasoning)
    r1, c1 = splitter.add(text)
    r2, c2 = splitter.finish()
    return (r1 + r2 if splitter.saw_think else None), c1 + c2


# -- request parsing -----------------------------------------------------------------------------
@dataclass
class Defaults:
    """Server-wide defaults from the command line; a request's own values win."""

    think: bool = True
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    max_tokens: int | None = None
    seed: int | None = None


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


@dataclass(eq=False)
class Job:
    """One admitted request: what to generate, and the channel its events come back on."""

    prompt: list[int]
    params: SamplingParams
    max_tokens: int
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, kind: str, value: Any) -> None:
        """From the worker thread: ("token", TokenRecord), ("done", Summary) or ("error", exc)."""
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


# -- stats ---------------------------------------------------------------------------------------
@dataclass
class Stats(Totals):
    """What the server has done so far (updated by the worker, read by /v1/stats)."""

    served: int = 0  # finished with "stop" or "length"
    cancelled: int = 0  # client went away (running or still waiting)
    rejected: int = 0  # 503: the queue was full
    failed: int = 0  # an error during generation
    last: dict | None = None

    def record(self, s: Summary) -> None:
        self.add(s)
        if s.finish_reason == "cancelled":
            self.cancelled += 1
        else:
            self.served += 1
        self.last = {
            "prompt_tokens": s.prompt_tokens,
            "cached_tokens": s.cached_tokens,
            "generated_tokens": s.generated_tokens,
            "prompt_tps": round(s.prompt_tps, 3),
            "gen_tps": round(s.gen_tps, 3),
            "finish_reason": s.finish_reason,
            "peak_memory_bytes": s.peak_memory_bytes,
        }

    def as_dict(self) -> dict:
        return {
            "requests": {
                "served": self.served,
                "cancelled": self.cancelled,
                "rejected": self.rejected,
                "failed": self.failed,
            },
            "tokens": {
                "prompt": self.prompt_tokens,
                "cached": self.cached_tokens,
                "generated": self.generated_tokens,
            },
            "last": self.last,
            "average": {
                "prompt_tps": round(self.prompt_tps, 3),
                "gen_tps": round(self.gen_tps, 3),
            },
            "peak_memory_bytes": self.peak_memory_bytes,
        }


def expert_cache_stats(model) -> dict | None:
    """Hits, misses, hit rate, bytes copied and prefetch recall of an offloaded model's experts."""
    stats = getattr(model.experts, "stats", None)
    if stats is None:
        return None
    t = stats.total()
    return {
        "hits": t.hits,
        "misses": t.misses,
        "hit_rate": stats.hit_rate,
        "bytes_copied": t.bytes_copied,
        "wait_seconds": t.wait_s,
        "prefetch_recall": stats.prefetch_recall,
        "slots_per_layer": model.experts.slots_per_layer,
    }


# -- the engine: one model, one worker thread ----------------------------------------------------
class Engine:
    """Owns the model's Generator; runs admitted jobs one at a time, in arrival order."""

    def __init__(
        self,
        model,
        tokenizer,
        model_dir: Path | None,
        model_id: str,
        ctx_size: int,
        max_queue: int = DEFAULT_MAX_QUEUE,
        defaults: Defaults | None = None,
    ):
        self.tokenizer, self.model_dir, self.model_id = tokenizer, model_dir, model_id
        self.ctx_size, self.max_queue = ctx_size, max_queue
        self.defaults = defaults or Defaults()
        self.gen = Generator(model, tokenizer, ctx_size=ctx_size)
        self.stats = Stats()
        self.started = int(time.time())
        self.pending = 0  # admitted and not finished: the running job and those waiting
        self.running = False
        self._lock = threading.Lock()
        self._jobs: set[Job] = set()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qwenlocal-generate")

    def submit(self, job: Job) -> None:
        """Queue a job, or raise a 503 APIError when `max_queue` jobs already wait."""
        with self._lock:
            if self.pending > self.max_queue:
                self.stats.rejected += 1
                raise APIError(
                    503,
                    f"The server is busy: {self.waiting} requests are waiting (--max-queue {self.max_queue}). "
                    "Try again shortly.",
                    "queue_full",
                    type="server_error",
                    headers={"Retry-After": "1"},
                )
            self.pending += 1
            self._jobs.add(job)
        try:
            self._pool.submit(self._work, job)
        except RuntimeError:  # shutting down
            with self._lock:
                self.pending -= 1
                self._jobs.discard(job)
            raise APIError(
                503, "The server is shutting down.", "shutting_down", type="server_error"
            ) from None

    def _work(self, job: Job) -> None:
        with self._lock:
            self.running = True
        try:
            if job.cancelled.is_set():  # the client left while waiting
                with self._lock:
                    self.stats.cancelled += 1
                job.emit("error", APIError(499, "The client closed the request.", "client_closed"))
                return
            stream = self.gen.stream(job.prompt, job.params, job.max_tokens, stop=job.stop or None)
            try:
                for record in stream:
                    if job.cancelled.is_set():
                        break
                    job.emit("token", record)
            finally:
                stream.close()  # stops generation at once when we broke out early
            with self._lock:
                self.stats.record(self.gen.summary)
            job.emit("done", self.gen.summary)
        except Exception as e:
            self.gen.reset()  # the cache may hold half a step
            with self._lock:
                self.stats.failed += 1
            job.emit("error", e)
        finally:
            with self._lock:
                self.running = False
                self.pending -= 1
                self._jobs.discard(job)

    @property
    def waiting(self) -> int:
        return self.pending - self.running

    def close(self) -> None:
        """Stop the running job, drop the waiting ones and tell their clients."""
        with self._lock:
            for job in self._jobs:
                job.cancelled.set()
                job.emit(
                    "error",
                    APIError(503, "The server is shutting down.", "shutting_down", type="server_error"),
                )
        self._pool.shutdown(wait=False, cancel_futures=True)

    def snapshot(self) -> dict:
        with self._lock:
            d = self.stats.as_dict()
            d["queue"] = {"running": self.running, "waiting": self.waiting, "max_queue": self.max_queue}
        d["model"] = self.model_id
        d["ctx_size"] = self.ctx_size
        d["kv_cache_tokens"] = len(self.gen.cached)
        d["memory_bytes"] = measure(self.gen.model, self.gen.cache)
        d["memory_estimate_bytes"] = {
            r.component: r.estimate for r in live_report(self.gen.model, self.gen.cache)
        }
        d["expert_cache"] = expert_cache_stats(self.gen.model)
        return d

    # -- building jobs from request bodies --
    def sampling(self, body: dict, thinking: bool) -> SamplingParams:
        d = self.defaults
        pick = {
            "temperature": (_get_number(body, "temperature"), d.temperature),
            "top_k": (_get_number(body, "top_k", integer=True), d.top_k),
            "top_p": (_get_number(body, "top_p"), d.top_p),
            "min_p": (_get_number(body, "min_p"), d.min_p),
            "presence_penalty": (_get_number(body, "presence_penalty"), None),
            "seed": (_get_number(body, "seed", integer=True), d.seed),
        }
        values = {k: req if req is not None else default for k, (req, default) in pick.items()}
        try:
            return SamplingParams.for_mode(thinking, self.model_dir, **values)
        except UserError as e:
            raise APIError(400, str(e), "invalid_value") from None

    def job(self, body: dict, prompt: list[int], thinking: bool) -> Job:
        if not prompt:
            raise APIError(400, "The prompt is empty.", "invalid_value", "prompt")
        if len(prompt) >= self.ctx_size:
            raise APIError(
                400,
                f"The prompt has {len(prompt):,} tokens; the context holds {self.ctx_size:,} "
                "(the server's --ctx-size).",
                "context_length_exceeded",
                "messages",
            )
        n = body.get("max_completion_tokens", body.get("max_tokens"))
        key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n <= 0):
            raise APIError(400, f"'{key}' must be a positive integer, got {n!r}.", "invalid_value", key)
        if n is None:
            n = self.defaults.max_tokens or self.ctx_size - len(prompt)
        nchoices = body.get("n")
        if nchoices not in (None, 1):
            raise APIError(400, "Only n=1 is supported.", "invalid_value", "n")
        params = self.sampling(body, thinking)
        return Job(prompt, params, n, _get_stop(body), asyncio.get_running_loop())


# -- HTTP ----------------------------------------------------------------------------------------
def _usage(s: Summary) -> dict:
    return {
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.generated_tokens,
        "total_tokens": s.prompt_tokens + s.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": s.cached_tokens},
    }


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _events(job: Job) -> AsyncIterator[tuple[str, Any]]:
    """The job's events until it ends; leaving early (disconnect, error) cancels the job."""
    try:
        while True:
            kind, value = await job.events.get()
            yield kind, value
            if kind != "token":
                return
    finally:
        job.cancelled.set()


def create_app(engine: Engine, api_key: str | None = None):
    """The FastAPI app: /v1/chat/completions, /v1/completions, /v1/models, /v1/stats, /metrics, /health."""
    from fastapi import Depends, FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    class JobStream(StreamingResponse):
        """An SSE response that cancels its job however the response ends (disconnect included)."""

        def __init__(self, content: AsyncIterator[str], job: Job):
            super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            self.job = job

        async def __call__(self, scope, receive, send) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.job.cancelled.set()

    async def check_key(request: Request) -> None:
        if api_key is None or request.url.path == "/health":
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise APIError(
                401,
                "Invalid API key." if given else "Missing API key: send 'Authorization: Bearer <key>'.",
                "invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        engine.close()

    app = FastAPI(
        title="qwenlocal",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
        dependencies=[Depends(check_key)],
    )

    @app.exception_handler(APIError)
    async def _api_error(_request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(UserError)
    async def _user_error(_request, e: UserError):
        return JSONResponse(APIError(400, str(e), "invalid_value").body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, e: StarletteHTTPException):
        return JSONResponse(APIError(e.status_code, str(e.detail), None).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _crash(_request, e: Exception):
        body = APIError(500, f"Internal error: {e}", "internal_error", type="server_error").body()
        return JSONResponse(body, status_code=500)

    async def read_body(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"The request body is not valid JSON ({e}).", "invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "The request body must be a JSON object.", "invalid_json")
        return body

    async def finish(request: Request, job: Job) -> Summary:
        """Wait for a non-streaming job; a client that goes away cancels it."""
        waiter = asyncio.ensure_future(_last_event(job))
        try:
            while True:
                done, _ = await asyncio.wait({waiter}, timeout=DISCONNECT_POLL_S)
                if done:
                    kind, value = waiter.result()
                    if kind == "error":
                        raise value
                    return value
                if await request.is_disconnected():
                    raise APIError(499, "The client closed the request.", "client_closed")
        finally:
            job.cancelled.set()
            waiter.cancel()

    def header(prefix: str, obj: str) -> dict:
        return {
            "id": f"{prefix}-{uuid.uuid4().hex[:24]}",
            "object": obj,
            "created": int(time.time()),
            "model": engine.model_id,
        }

    def include_usage(body: dict) -> bool:
        opts = body.get("stream_options")
        return isinstance(opts, dict) and bool(opts.get("include_usage"))

    def error_event(e: Exception) -> str:
        if not isinstance(e, APIError):
            e = APIError(500, f"Generation failed: {e}", "generation_error", type="server_error")
        return _sse(e.body())

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        card = {"id": engine.model_id, "object": "model", "created": engine.started, "owned_by": "qwenlocal"}
        return {"object": "list", "data": [{**card, "max_model_len": engine.ctx_size}]}

    @app.get("/v1/stats")
    async def stats():
        return engine.snapshot()

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus_text(engine.snapshot()))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request)
        messages = parse_messages(body)
        kwargs = body.get("chat_template_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise APIError(
                400, "'chat_template_kwargs' must be an object.", "invalid_type", "chat_template_kwargs"
            )
        thinking = kwargs.get("enable_thinking", engine.defaults.think)
        if not isinstance(thinking, bool):
            raise APIError(400, "'enable_thinking' must be true or false.", "invalid_type", "enable_thinking")
        try:
            text = engine.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, enable_thinking=thinking
            )
        except UserError as e:
            raise APIError(400, str(e), "template_error") from None
        job = engine.job(body, engine.tokenizer.encode(text), thinking)
        in_reasoning = text.rstrip().endswith(THINK_START)
        engine.submit(job)
        head = header("chatcmpl", "chat.completion")

        if not body.get("stream"):
            s = await finish(request, job)
            reasoning, content = split_reasoning(s.text, in_reasoning)
            message = {"role": "assistant", "content": content, "reasoning_content": reasoning}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": s.finish_reason}
            return {**head, "choices": [choice], "usage": _usage(s)}

        usage = include_usage(body)
        head["object"] = "chat.completion.chunk"

        def chunk(delta: dict, finish_reason: str | None = None) -> str:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return _sse({**head, "choices": [choice], **({"usage": None} if usage else {})})

        def delta(reasoning: str, content: str) -> dict:
            return {k: v for k, v in (("reasoning_content", reasoning), ("content", content)) if v}

        async def stream() -> AsyncIterator[str]:
            stops, splitter = StopBuffer(job.stop), ReasoningSplitter(in_reasoning)
            yield chunk({"role": "assistant", "content": ""})
            async for kind, value in _events(job):
                if kind == "token":
                    if d := delta(*splitter.add(stops.add(value.text))):
                        yield chunk(d)
                elif kind == "error":
                    yield error_event(value)
                else:
                    r1, c1 = splitter.add(stops.finish(value.text))
                    r2, c2 = splitter.finish()
                    if d := delta(r1 + r2, c1 + c2):
                        yield chunk(d)
                    yield chunk({}, value.finish_reason)
                    if usage:
                        yield _sse({**head, "choices": [], "usage": _usage(value)})
            yield "data: [DONE]\n\n"

        return JobStream(stream(), job)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = engine.tokenizer.encode(prompt)
        elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            vocab = engine.gen.model.config.vocab_size
            if not all(0 <= t < vocab for t in prompt):
                raise APIError(400, f"Token ids must be in [0, {vocab}).", "invalid_value", "prompt")
            ids = list(prompt)
        elif prompt is None:
            raise APIError(400, "'prompt' is required.", "missing_required_parameter", "prompt")
        else:
            raise APIError(
                400,
                "'prompt' must be a string, one string in a list, or token ids.",
                "invalid_type",
                "prompt",
            )
        job = engine.job(body, ids, engine.defaults.think)
        engine.submit(job)
        head = header("cmpl", "text_completion")

        def choice(text: str, finish_reason: str | None) -> dict:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

        if not body.get("stream"):
            s = await finish(request, job)
            return {**head, "choices": [choice(s.text, s.finish_reason)], "usage": _usage(s)}

        usage = include_usage(body)

        async def stream() -> AsyncIterator[str]:
            stops = StopBuffer(job.stop)
            extra = {"usage": None} if usage else {}
            async for kind, value in _events(job):
                if kind == "token":
                    if text := stops.add(value.text):
                        yield _sse({**head, "choices": [choice(text, None)], **extra})
                elif kind == "error":
                    yield error_event(value)
                else:
                    yield _sse(
                        {**head, "choices": [choice(stops.finish(value.text), value.finish_reason)], **extra}
                    )
                    if usage:
                        yield _sse({**head, "choices": [], "usage": _usage(value)})
            yield "data: [DONE]\n\n"

        return JobStream(stream(), job)

    return app


async def _last_event(job: Job) -> tuple[str, Any]:
    async for kind, value in _events(job):
        if kind != "token":
            return kind, value
    raise RuntimeError("the job ended without a result")


def prometheus_text(snapshot: dict) -> str:
    """/v1/stats as Prometheus text."""
    lines = []

    def put(name: str, value: Any, **labels: str) -> None:
        if value is None:
            return
        tags = ",".join(f'{k}="{v}"' for k, v in labels.items())
        lines.append(f"qwenlocal_{name}{{{tags}}} {value}" if tags else f"qwenlocal_{name} {value}")

    for outcome, n in snapshot["requests"].items():
        put("requests_total", n, outcome=outcome)
    for kind, n in snapshot["tokens"].items():
        put("tokens_total", n, kind=kind)
    for kind in ("prompt_tps", "gen_tps"):
        put(kind, snapshot["average"][kind], window="average")
        put(kind, (snapshot["last"] or {}).get(kind), window="last")
    put("peak_memory_bytes", snapshot["peak_memory_bytes"])
    for component, devices in snapshot["memory_bytes"].items():
        for device, n in devices.items():
            put("memory_bytes", n, component=component, device=device)
    put("queue_waiting", snapshot["queue"]["waiting"])
    put("queue_running", int(snapshot["queue"]["running"]))
    put("kv_cache_tokens", snapshot["kv_cache_tokens"])
    return "\n".join(lines) + "\n"


# -- the command ---------------------------------------------------------------------------------
def _check_address(host: str, port: int) -> None:
    """Fail before a long model load when the address cannot be listened on."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise UserError(f"Cannot resolve --host {host!r}.") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            raise UserError(f"Cannot listen on {host}:{port}: {e.strerror or e}.") from None


def _model_id(model: str) -> str:
    path = Path(model).expanduser()
    return path.resolve().name if path.exists() else model


def serve(
    model: Annotated[str, typer.Argument(help="Model folder or Hugging Face repo id.")] = DEFAULT_MODEL,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = DEFAULT_HOST,
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to listen on.")] = DEFAULT_PORT,
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", envvar="QWENLOCAL_API_KEY", help="Require 'Authorization: Bearer KEY'."),
    ] = None,
    max_queue: Annotated[
        int, typer.Option("--max-queue", min=0, help="Requests that may wait; more get HTTP 503.")
    ] = DEFAULT_MAX_QUEUE,
    ctx_size: Annotated[
        str, typer.Option("--ctx-size", "-c", help="Context size in tokens (8192, 32k).")
    ] = DEFAULT_CTX_SIZE,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="bf16, fp16 or fp32.")] = "bf16",
    think: Annotated[
        bool, typer.Option("--think/--no-think", help="Thinking mode unless a request says otherwise.")
    ] = True,
    temp: Annotated[float | None, typer.Option("--temp", help="Default temperature; 0 is greedy.")] = None,
    top_k: Annotated[int | None, typer.Option("--top-k")] = None,
    top_p: Annotated[float | None, typer.Option("--top-p")] = None,
    min_p: Annotated[float | None, typer.Option("--min-p")] = None,
    max_tokens: Annotated[
        int | None,
        typer.Option("--max-tokens", "-n", help="Default most tokens per reply (default: the context)."),
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    quant: opt.Quant = None,
    gpu_experts: opt.GpuExperts = None,
    vram_budget: opt.VramBudget = None,
    prefetch: opt.Prefetch = opt.DEFAULT_PREFETCH,
    cache_policy: opt.CachePolicy = opt.DEFAULT_CACHE_POLICY,
    kv_dtype: opt.KvDtype = None,
    moe: opt.Moe = "auto",
):
    """Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions)."""

    def body():
        import uvicorn

        from .loader import parse_device, parse_dtype

        ctx = cli.parse_tokens(ctx_size)
        parse_device(device), parse_dtype(dtype)  # bad values fail before a long load
        memory = opt.MemoryOptions(
            quant, gpu_experts, vram_budget, prefetch, cache_policy, kv_dtype=kv_dtype, moe=moe
        ).validate()
        if max_tokens is not None and max_tokens <= 0:
            raise UserError(f"--max-tokens must be positive, got {max_tokens}.")
        defaults = Defaults(think, temp, top_k, top_p, min_p, max_tokens, seed)
        SamplingParams.for_mode(think, None, temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p)
        _check_address(host, port)
        folder, lm, tok = cli.load_for_cli(model, device, dtype, ctx, memory=memory)
        engine = Engine(lm, tok, folder, _model_id(model), ctx, max_queue, defaults)
        app = create_app(engine, api_key)
        shown = f"[{host}]" if ":" in host else host
        cli.err.print(
            f"[bold]qwenlocal serve[/]: {engine.model_id} on http://{shown}:{port}/v1 "
            f"(device {lm.device}, context {ctx:,} tokens, queue {max_queue}"
            f"{', API key required' if api_key else ''})",
            highlight=False,
        )

        class _Server(uvicorn.Server):
            async def shutdown(self, sockets=None) -> None:
                engine.close()  # open streams end at once, rather than being cut after a timeout
                await super().shutdown(sockets)

        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )
        _Server(config).run()

    cli.run(body)
