"""`qwenlocal serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn, SSE streaming).

The HTTP side only: endpoints, authentication, streams, and the command. Jobs, the queue and the
counters live in engine.py; request bodies in api_models.py; chat prompts, constraints, tool calls
and reasoning in chat_api.py; answers in OpenAI's shapes in openai_api.py.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations, and fastapi is
# imported inside create_app (it would slow every other command's start).
import asyncio
import contextlib
import hmac
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import typer

from qwenlocal.app import cli_util as cli
from qwenlocal.app.api_models import ChatRequest, CompletionRequest, SamplingRequest, make_job, parse
from qwenlocal.app.chat_api import chat_message, chat_stream, plan_chat
from qwenlocal.app.openai_api import APIError, StopBuffer, as_api_error, sse, submit, usage
from qwenlocal.errors import UserError
from qwenlocal.generation.engine import DEFAULT_MAX_QUEUE, Engine, Job
from qwenlocal.generation.generate import Summary
from qwenlocal.planning import options as opt

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_CTX_SIZE = "8192"
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there
GRACEFUL_SHUTDOWN_S = 3


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
                        raise as_api_error(value)
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

    def include_usage(req: SamplingRequest) -> bool:
        return req.stream_options is not None and req.stream_options.include_usage

    def error_event(e: Exception) -> str:
        return sse(as_api_error(e).body())

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
        req = parse(ChatRequest, await read_body(request))
        plan = plan_chat(engine, req)
        job = make_job(engine, req, plan.prompt, plan.thinking, plan.grammar)
        submit(engine, job)
        head = header("chatcmpl", "chat.completion")

        if not req.stream:
            s = await finish(request, job)
            message, finish_reason = chat_message(plan, s)
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
            return {**head, "choices": [choice], "usage": usage(s)}

        with_usage = include_usage(req)
        head["object"] = "chat.completion.chunk"

        def chunk(delta: dict, finish_reason: str | None = None) -> str:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return sse({**head, "choices": [choice], **({"usage": None} if with_usage else {})})

        def usage_event(s: Summary) -> str | None:
            return sse({**head, "choices": [], "usage": usage(s)}) if with_usage else None

        return JobStream(chat_stream(plan, job.stop, _events(job), chunk, error_event, usage_event), job)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse(CompletionRequest, await read_body(request))
        prompt = req.prompt
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
        job = make_job(engine, req, ids, engine.defaults.think)
        submit(engine, job)
        head = header("cmpl", "text_completion")

        def choice(text: str, finish_reason: str | None) -> dict:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

        if not req.stream:
            s = await finish(request, job)
            return {**head, "choices": [choice(s.text, s.finish_reason)], "usage": usage(s)}

        with_usage = include_usage(req)

        async def stream() -> AsyncIterator[str]:
            stops = StopBuffer(job.stop)
            extra = {"usage": None} if with_usage else {}
            async for kind, value in _events(job):
                if kind == "token":
                    if text := stops.add(value.text):
                        yield sse({**head, "choices": [choice(text, None)], **extra})
                elif kind == "error":
                    yield error_event(value)
                else:
                    yield sse(
                        {**head, "choices": [choice(stops.finish(value.text), value.finish_reason)], **extra}
                    )
                    if with_usage:
                        yield sse({**head, "choices": [], "usage": usage(value)})
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


@opt.load_command(ctx_size=DEFAULT_CTX_SIZE)
def serve(
    model: opt.Model = None,
    load: opt.LoadOptions = opt.LoadOptions(),
    sampling: opt.SamplingOptions = opt.SamplingOptions(),
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = DEFAULT_HOST,
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to listen on.")] = DEFAULT_PORT,
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", envvar="QWENLOCAL_API_KEY", help="Require 'Authorization: Bearer KEY'."),
    ] = None,
    max_queue: Annotated[
        int, typer.Option("--max-queue", min=0, help="Requests that may wait; more get HTTP 503.")
    ] = DEFAULT_MAX_QUEUE,
):
    """Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions).
    The sampling flags are server-wide defaults: a request's own values win; with no --max-tokens,
    a reply may use the rest of the context."""

    def body():
        import uvicorn

        load.validate()  # bad values fail before a long load
        sampling.validate()
        _check_address(host, port)
        model_id = load.model_or_default(model)
        with cli.loaded(model_id, load) as (source, lm, tok):
            engine = Engine(lm, tok, source.generation, _model_id(model_id), load.ctx, max_queue, sampling)
            app = create_app(engine, api_key)
            shown = f"[{host}]" if ":" in host else host
            cli.err.print(
                f"[bold]qwenlocal serve[/]: {engine.model_id} on http://{shown}:{port}/v1 "
                f"(device {lm.device}, context {load.ctx:,} tokens, queue {max_queue}"
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
