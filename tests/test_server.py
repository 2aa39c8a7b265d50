"""`qwenlocal serve` driven as a client would: real server processes on loopback, the official
openai client, raw HTTP for requests a client library would not send."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import openai
import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from qwenlocal.app.openai_api import StopBuffer
from qwenlocal.cli import app
from qwenlocal.generation.reasoning import ReasoningSplitter, split_reasoning
from qwenlocal.generation.tokenizer import Tokenizer

HOST = "127.0.0.1"
KEY = "sk-test-key"
KEYED_MAX_QUEUE = 2  # requests the keyed server lets wait behind the running one
HI = [{"role": "user", "content": "Hi"}]
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}


# -- servers -------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Client:
    """Requests to a server on `port`, with `key` sent as a bearer token."""

    port: int
    key: str | None = None
    headers: dict = {}  # of the last answer

    def client(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"http://{HOST}:{self.port}/v1",
            api_key=key or self.key or "none",
            max_retries=0,
            timeout=60,
        )

    def request(self, method: str, path: str, body=None, headers: dict | None = None, timeout: float = 30):
        """-> (status, the answer: parsed JSON, or text); body may be raw bytes."""
        conn = http.client.HTTPConnection(HOST, self.port, timeout=timeout)
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        auth = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        try:
            conn.request(method, path, data, {"Content-Type": "application/json", **auth, **(headers or {})})
            r = conn.getresponse()
            answer = r.read().decode()
            self.headers = {k.lower(): v for k, v in r.getheaders()}
            return r.status, json.loads(answer) if "json" in r.getheader("content-type", "") else answer
        finally:
            conn.close()

    def stats(self) -> dict:
        return self.request("GET", "/v1/stats")[1]

    def wait_idle(self, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while (s := self.stats())["queue"]["running"] or s["queue"]["waiting"]:
            assert time.monotonic() < deadline, s
            time.sleep(0.05)
        return s

    def wait_running(self, timeout: float = 30) -> dict:
        """Until a job runs: the event a test waits for before it leaves or piles up requests."""
        deadline = time.monotonic() + timeout
        while not (s := self.stats())["queue"]["running"]:
            assert time.monotonic() < deadline, s
            time.sleep(0.01)
        return s


class Server(Client):
    """`python -m qwenlocal.cli serve MODEL --port P --device cpu ARGS` until stopped."""

    def __init__(self, model: Path, log: Path, *args: str, key: str | None = None, env: dict | None = None):
        self.port = free_port()
        self.key, self.log, self._log_file = key, log, log.open("w")
        cmd = [sys.executable, "-m", "qwenlocal.cli", "serve", str(model), "--port", str(self.port)]
        self.proc = subprocess.Popen(
            [*cmd, "--host", HOST, "--device", "cpu", "--dtype", "fp32", *args],
            stdout=subprocess.DEVNULL,
            stderr=self._log_file,
            env={**os.environ, **(env or {})},
        )
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{log.read_text()}")
            try:
                if self.request("GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start:\n{log.read_text()}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log_file.close()


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    s = Server(tiny_ckpt, tmp_path_factory.mktemp("logs") / "server.log", "--ctx-size", "2k")
    s.model = tiny_ckpt
    yield s
    s.stop()


# A checkpoint whose greedy output follows a script: attention and experts write nothing, so the
# last position's logits depend on its own token only, and lm_head maps each token to the next.
THINK_SCRIPT = ["<think>", "Let", " me", " think", "</think>", "Hello", " world", "<|im_end|>"]
NO_THINK_SCRIPT = ["Hi", "<|im_end|>"]
LOOP = " loop"  # follows itself: a raw completion of " loop" runs until max_tokens


@pytest.fixture(scope="module")
def scripted_ckpt(tiny_ckpt, tmp_path_factory) -> Path:
    tok = Tokenizer.from_dir(tiny_ckpt)

    def tid(text: str) -> int:
        (i,) = tok.encode(text)
        return i

    think_last = tok.encode_chat(HI, enable_thinking=True)[-1]
    no_think_last = tok.encode_chat(HI, enable_thinking=False)[-1]
    pairs = [
        (think_last, tid(THINK_SCRIPT[0])),
        (no_think_last, tid(NO_THINK_SCRIPT[0])),
        (tid(LOOP), tid(LOOP)),
    ]
    for script in (THINK_SCRIPT, NO_THINK_SCRIPT):
        pairs += [(tid(a), tid(b)) for a, b in zip(script, script[1:], strict=False)]
    assert len({a for a, _ in pairs}) == len(pairs)

    out = tmp_path_factory.mktemp("ckpt") / "scripted"
    shutil.copytree(tiny_ckpt, out)
    for shard in out.glob("*.safetensors"):
        tensors = load_file(shard)
        for name, t in tensors.items():
            if name.endswith(("self_attn.o_proj.weight", "down_proj.weight")):
                t.zero_()
            elif name == "model.norm.weight":
                t.fill_(1.0)
            elif name == "model.embed_tokens.weight":
                for dim, (a, _) in enumerate(pairs):
                    t[a] = 0.0
                    t[a, dim] = 1.0
            elif name == "lm_head.weight":
                t.zero_()
                for dim, (_, b) in enumerate(pairs):
                    t[b, dim] += 4.0
        save_file(tensors, shard, metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def keyed(scripted_ckpt, tmp_path_factory):
    """The scripted model behind an API key ($QWENLOCAL_API_KEY), with room for KEYED_MAX_QUEUE waiting
    requests."""
    log = tmp_path_factory.mktemp("logs") / "keyed.log"
    # the key from the environment, as a deployment would give it
    s = Server(
        scripted_ckpt,
        log,
        "--ctx-size",
        "2k",
        "--max-queue",
        str(KEYED_MAX_QUEUE),
        key=KEY,
        env={"QWENLOCAL_API_KEY": KEY},
    )
    yield s
    s.stop()


def reasoning(obj) -> str | None:
    return getattr(obj, "reasoning_content", None)


def join_stream(stream) -> tuple[str, str, list]:
    """-> (reasoning, content, chunks) of a chat stream."""
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    return (
        "".join(reasoning(d) or "" for d in deltas),
        "".join(d.content or "" for d in deltas),
        chunks,
    )


# -- the happy paths -----------------------------------------------------------------------------
def test_health_and_models(server):
    assert server.request("GET", "/health") == (200, {"status": "ok"})
    models = server.client().models.list().data
    assert [m.id for m in models] == ["tiny"] and models[0].owned_by == "qwenlocal"


def test_chat_and_its_stream_agree(server):
    client = server.client()
    r = client.chat.completions.create(model="tiny", messages=HI, max_tokens=6, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "tiny"
    (choice,) = r.choices
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert r.usage.completion_tokens == 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + 6

    stream = client.chat.completions.create(
        model="anything",  # unknown model names are accepted
        messages=HI,
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    _, content, chunks = join_stream(stream)
    assert content == choice.message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


def test_completions_and_stream(server):
    client = server.client()
    r = client.completions.create(model="tiny", prompt="The sky is", max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5 and r.usage.prompt_tokens == 3
    chunks = list(
        client.completions.create(model="tiny", prompt="The sky is", max_tokens=5, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_greedy_equals_generate_command(server, tiny_ckpt):
    prompt = "Why is the sky blue?"
    args = ["generate", str(tiny_ckpt), prompt, "-n", "8", "--temp", "0", "--json", "--device", "cpu"]
    out = CliRunner().invoke(app, [*args, "--dtype", "fp32"])
    assert out.exit_code == 0, out.output
    expected = json.loads(out.stdout.strip().splitlines()[-1])
    r = server.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": prompt}], max_tokens=8, temperature=0
    )
    message = r.choices[0].message
    assert reasoning(message) is None and message.content == expected["text"]
    assert r.usage.completion_tokens == expected["generated_tokens"]


def test_stop_sequences(server):
    client = server.client()
    ask = {"model": "tiny", "messages": HI, "max_tokens": 12, "temperature": 0, "extra_body": NO_THINK}
    full = client.chat.completions.create(**ask).choices[0].message.content
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    expected = full[: full.find(stop)]
    r = client.chat.completions.create(**ask, stop=[stop, "never-seen"])
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    _, content, chunks = join_stream(client.chat.completions.create(**ask, stop=stop, stream=True))
    assert content == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_second_turn_prefills_only_new_tokens(server):
    client = server.client()
    ask = {"model": "tiny", "max_tokens": 6, "temperature": 0, "extra_body": NO_THINK}
    turn1 = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me a story."}]
    r1 = client.chat.completions.create(messages=turn1, **ask)
    turn2 = [*turn1, {"role": "assistant", "content": r1.choices[0].message.content}]
    turn2.append({"role": "user", "content": "Go on."})
    r2 = client.chat.completions.create(messages=turn2, **ask)
    cached = r2.usage.prompt_tokens_details.cached_tokens
    # everything up to turn 1's "<|im_start|>assistant\n" is reused (its empty think block is not)
    assert r1.usage.prompt_tokens - 4 <= cached < r2.usage.prompt_tokens
    assert server.stats()["last"]["cached_tokens"] == cached


def test_stats_and_metrics(server):
    server.client().chat.completions.create(model="tiny", messages=HI, max_tokens=3)
    s = server.wait_idle()  # the answer reaches the client just before the worker marks itself idle
    assert s["requests"]["served"] >= 1 and s["tokens"]["generated"] >= 3
    assert s["last"]["finish_reason"] == "length" and s["last"]["gen_tps"] > 0
    assert s["average"]["prompt_tps"] > 0 and s["peak_memory_bytes"] > 0
    memory = s["memory_bytes"]
    assert memory["experts"]["cpu"] > 0 and memory["attention"]["cpu"] > 0 and memory["kv_cache"]["cpu"] > 0
    assert s["memory_estimate_bytes"]["kv_cache"] == memory["kv_cache"]["cpu"]
    assert "expert_cache" in s and s["queue"] == {"running": False, "waiting": 0, "max_queue": 8}
    text = server.request("GET", "/metrics")[1]
    assert 'qwenlocal_requests_total{outcome="served"}' in text and "qwenlocal_peak_memory_bytes" in text


# -- bad requests --------------------------------------------------------------------------------
LONG = "hello " * 2100  # past the 2k context


@pytest.mark.parametrize(
    "path, body, status, code",
    [
        ("/v1/chat/completions", b'{"messages": [', 400, "invalid_json"),
        ("/v1/chat/completions", b"[1, 2]", 400, "invalid_json"),
        ("/v1/chat/completions", {"model": "tiny"}, 400, "missing_required_parameter"),
        ("/v1/chat/completions", {"messages": []}, 400, "invalid_value"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "invalid_value"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "invalid_type"),
        ("/v1/chat/completions", {"messages": HI, "max_tokens": 0}, 400, "invalid_value"),
        ("/v1/chat/completions", {"messages": HI, "max_completion_tokens": -3}, 400, "invalid_value"),
        ("/v1/chat/completions", {"messages": HI, "temperature": -1}, 400, "invalid_value"),
        ("/v1/chat/completions", {"messages": HI, "top_p": "high"}, 400, "invalid_type"),
        ("/v1/chat/completions", {"messages": HI, "stop": 3}, 400, "invalid_type"),
        ("/v1/chat/completions", {"messages": HI, "n": 2}, 400, "invalid_value"),
        ("/v1/chat/completions", {"messages": HI, "chat_template_kwargs": "think"}, 400, "invalid_type"),
        (
            "/v1/chat/completions",
            {"messages": HI, "chat_template_kwargs": {"enable_thinking": "yes"}},
            400,
            "invalid_type",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            400,
            "invalid_value",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": LONG}]},
            400,
            "context_length_exceeded",
        ),
        ("/v1/completions", {"prompt": LONG, "stream": True}, 400, "context_length_exceeded"),
        ("/v1/completions", {"max_tokens": 3}, 400, "missing_required_parameter"),
        ("/v1/completions", {"prompt": [10**9]}, 400, "invalid_value"),
        ("/v1/nowhere", {}, 404, None),
    ],
)
def test_bad_requests_get_openai_errors(server, path, body, status, code):
    got, answer = server.request("POST", path, body)
    assert got == status, answer
    error = answer["error"]
    assert error["code"] == code and error["message"] and error["type"] == "invalid_request_error"


def test_server_keeps_serving_after_bad_requests(server):
    server.request("POST", "/v1/chat/completions", b"{oops")
    r = server.client().chat.completions.create(model="tiny", messages=HI, max_tokens=2)
    assert r.choices[0].finish_reason == "length"


def test_disconnect_mid_stream_stops_generation(server):
    before = server.wait_idle()["requests"]["cancelled"]
    stream = server.client().completions.create(model="tiny", prompt="Once", max_tokens=1500, stream=True)
    for _, _ in zip(range(3), stream, strict=False):
        pass
    stream.close()
    s = server.wait_idle()
    assert s["requests"]["cancelled"] == before + 1 and s["last"]["finish_reason"] == "cancelled"

    # a non-streaming request whose client goes away once its job runs is cancelled too
    conn = socket.create_connection((HOST, server.port))
    body = json.dumps({"prompt": "Once", "max_tokens": 1500}).encode()
    head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    conn.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
    server.wait_running()
    conn.close()
    s = server.wait_idle()
    assert s["requests"]["cancelled"] == before + 2 and s["last"]["finish_reason"] == "cancelled"
    assert (
        server.client().completions.create(model="tiny", prompt="Once", max_tokens=2).usage.completion_tokens
        == 2
    )


def test_content_parts_developer_role_and_token_ids(server):
    client = server.client()
    ask = {"model": "tiny", "max_tokens": 5, "temperature": 0, "extra_body": NO_THINK}
    plain = client.chat.completions.create(
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}],
        **ask,
    )
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": " there"}]
    same = client.chat.completions.create(
        messages=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": parts}], **ask
    )
    assert same.choices[0].message.content == plain.choices[0].message.content
    assert same.usage.prompt_tokens == plain.usage.prompt_tokens
    # a prompt given as token ids is the prompt those ids spell
    ids = Tokenizer.from_dir(server.model).encode("The sky is")
    by_text = client.completions.create(model="tiny", prompt="The sky is", max_tokens=5, temperature=0)
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text and by_ids.usage.prompt_tokens == len(ids)


# -- the scripted model: reasoning, API key, queue -----------------------------------------------
def test_reasoning_is_returned_apart(keyed):
    client = keyed.client()
    r = client.chat.completions.create(model="m", messages=HI, max_tokens=20, temperature=0)
    message = r.choices[0].message
    assert reasoning(message) == "Let me think" and message.content == "Hello world"
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 7

    stream = client.chat.completions.create(model="m", messages=HI, max_tokens=20, temperature=0, stream=True)
    thought, content, chunks = join_stream(stream)
    assert (thought, content) == ("Let me think", "Hello world")
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    last_thought = max(i for i, d in enumerate(deltas) if reasoning(d))
    assert last_thought < min(i for i, d in enumerate(deltas) if d.content)  # reasoning comes first


def test_thinking_off(keyed):
    client = keyed.client()
    r = client.chat.completions.create(model="m", messages=HI, temperature=0, extra_body=NO_THINK)
    assert reasoning(r.choices[0].message) is None and r.choices[0].message.content == "Hi"
    thought, content, _ = join_stream(
        client.chat.completions.create(
            model="m", messages=HI, temperature=0, extra_body=NO_THINK, stream=True
        )
    )
    assert (thought, content) == ("", "Hi")


def test_api_key(keyed):
    assert keyed.request("GET", "/health", headers={"Authorization": ""})[0] == 200
    status, answer = keyed.request("GET", "/v1/models", headers={"Authorization": ""})
    assert status == 401 and answer["error"]["code"] == "invalid_api_key"
    assert keyed.headers["www-authenticate"] == "Bearer"
    assert keyed.request("GET", "/v1/models", headers={"Authorization": "", "x-api-key": KEY})[0] == 200
    assert keyed.request("GET", "/v1/models", headers={"Authorization": "", "x-api-key": "nope"})[0] == 401
    with pytest.raises(openai.AuthenticationError) as e:
        keyed.client(key="wrong").chat.completions.create(model="m", messages=HI, max_tokens=2)
    assert e.value.status_code == 401
    assert keyed.client().models.list().data[0].id == "scripted"


def test_full_queue_answers_503(keyed):
    client = keyed.client()
    before = keyed.wait_idle()
    loop = {"model": "m", "prompt": LOOP, "max_tokens": 1500, "temperature": 0, "stream": True}
    running = client.completions.create(**loop)
    next(iter(running))
    keyed.wait_running()  # running: the ones that follow wait
    waiting = [client.completions.create(**loop) for _ in range(KEYED_MAX_QUEUE)]
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(**loop)
    body = e.value.body.get("error", e.value.body)
    assert e.value.status_code == 503 and body["code"] == "queue_full"
    for stream in (running, *waiting):
        stream.close()
    s = keyed.wait_idle()
    assert s["requests"]["rejected"] == before["requests"]["rejected"] + 1
    assert s["requests"]["cancelled"] == before["requests"]["cancelled"] + KEYED_MAX_QUEUE + 1
    assert s["requests"]["served"] == before["requests"]["served"]  # none ran to its end


def test_load_each_request_answered_or_refused(keyed):
    before = keyed.wait_idle()["requests"]
    outcomes: list[str] = []
    lock = threading.Lock()

    def client_thread() -> None:
        client = keyed.client()
        for _ in range(5):
            try:
                r = client.completions.create(model="m", prompt=LOOP, max_tokens=12, temperature=0)
                outcome = "ok" if r.choices[0].text == LOOP * 12 else f"wrong text {r.choices[0].text!r}"
            except openai.APIStatusError as e:
                outcome = "busy" if e.status_code == 503 else f"status {e.status_code}"
            except Exception as e:  # noqa: BLE001 - anything else is a lost request
                outcome = f"lost: {e!r}"
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=client_thread) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    counts = Counter(outcomes)
    assert len(outcomes) == 40 and set(counts) <= {"ok", "busy"}, counts
    # the engine refuses only while max_queue + 1 admitted jobs are unfinished (engine.submit), so
    # none is refused before max_queue + 1 were admitted; every admitted job here runs to its end
    assert counts["ok"] >= min(40, KEYED_MAX_QUEUE + 1), counts
    after = keyed.wait_idle()["requests"]
    assert after["served"] - before["served"] == counts["ok"]
    assert after["rejected"] - before["rejected"] == counts["busy"]
    assert keyed.request("GET", "/health")[0] == 200


def test_bad_flags_exit_2_before_loading(tiny_ckpt):
    with socket.socket() as busy:
        busy.bind((HOST, 0))
        busy.listen()
        cases = [
            (["--port", str(busy.getsockname()[1])], "Cannot listen on"),
            (["--ctx-size", "lots"], "Cannot read 'lots' as a token count"),
            (["--top-p", "2"], "top_p must be in"),
            (["-n", "0"], "--max-tokens must be positive"),
        ]
        for args, message in cases:
            r = CliRunner().invoke(app, ["serve", str(tiny_ckpt), "--host", HOST, *args])
            assert r.exit_code == 2 and message in r.stderr, r.output
            assert "Traceback" not in r.output


# -- the text plumbing, directly -----------------------------------------------------------------
@pytest.mark.parametrize(
    "text, in_reasoning, expected",
    [
        ("<think>\nLet me think\n</think>\n\nHello", False, ("Let me think", "Hello")),
        ("\n<think>\n\n</think>\n\nHi there", False, ("", "Hi there")),
        ("Just an answer\n", False, (None, "Just an answer\n")),
        ("<thinking> is not a tag", False, (None, "<thinking> is not a tag")),
        ("<think>\nstill thinking", False, ("still thinking", "")),
        ("halfway</think>\n\nAnswer", True, ("halfway", "Answer")),
        ("<thi", False, (None, "<thi")),
    ],
)
def test_split_reasoning(text, in_reasoning, expected):
    assert split_reasoning(text, in_reasoning) == expected
    # fed one character at a time, the stream says the same
    splitter = ReasoningSplitter(in_reasoning)
    parts = [splitter.add(ch) for ch in text] + [splitter.finish()]
    thought, content = "".join(p[0] for p in parts), "".join(p[1] for p in parts)
    assert (thought if splitter.saw_think else None, content) == expected


def test_stop_buffer_never_sends_past_a_stop():
    buf = StopBuffer(["o w"])
    assert [buf.add(p) for p in ("Hel", "lo ", "wor", "ld")] == ["Hel", "l", "", ""]
    buf = StopBuffer(["END"])
    assert [buf.add(p) for p in ("abcE", "N", "x")] == ["abc", "", "ENx"]
    assert buf.finish("abcENxyz") == "yz"


# -- the app in this process: failures and defaults a real server is not told to have ----------
class LocalServer(Client):
    """create_app(engine) under uvicorn in a thread of this process."""

    def __init__(self, engine, api_key: str | None = None):
        import uvicorn

        from qwenlocal.app.server import create_app

        self.engine, self.port = engine, free_port()
        config = uvicorn.Config(create_app(engine, api_key), host=HOST, port=self.port, log_level="error")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the app did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def tiny_parts(tiny_ckpt):
    from qwenlocal import load_model

    generation = json.loads((tiny_ckpt / "generation_config.json").read_text())
    return load_model(tiny_ckpt, dtype="fp32"), Tokenizer.from_dir(tiny_ckpt), generation


@pytest.fixture
def local(tiny_parts):
    """make(tokenizer=..., defaults=...) -> a LocalServer on the tiny model; stopped after the test."""
    from qwenlocal.generation.engine import Engine

    made = []

    def make(tokenizer=None, defaults=None) -> LocalServer:
        model, tok, generation = tiny_parts
        engine = Engine(model, tokenizer or tok, generation, "tiny", 512, defaults=defaults)
        made.append(LocalServer(engine))
        return made[-1]

    yield make
    for s in made:
        s.stop()


def test_a_failure_inside_generation_is_answered_and_the_server_goes_on(local, monkeypatch):
    s = local()
    real = s.engine.gen.stream
    failures = iter([True, True])

    def stream(*args, **kwargs):
        if next(failures, False):
            raise RuntimeError("the device fell over")
        return real(*args, **kwargs)

    monkeypatch.setattr(s.engine.gen, "stream", stream)
    status, answer = s.request("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 3})
    assert status == 500 and answer["error"]["code"] == "generation_error"
    assert "the device fell over" in answer["error"]["message"]
    status, text = s.request("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 3, "stream": True})
    assert status == 200
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    assert events[-1]["error"]["code"] == "generation_error" and text.rstrip().endswith("data: [DONE]")
    status, answer = s.request("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 3})
    assert status == 200 and answer["usage"]["completion_tokens"] == 3
    assert s.stats()["requests"]["failed"] == 2


def test_a_template_error_is_a_400(local, tiny_parts):
    _, tok, _ = tiny_parts
    template = (
        "{% for m in messages %}{% if m.content == 'BOOM' %}{{ raise_exception('no bombs here') }}{% endif %}"
        "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
    )
    s = local(tokenizer=Tokenizer(tok._tok, template, tok.special_tokens))
    status, answer = s.request(
        "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "BOOM"}]}
    )
    assert status == 400 and answer["error"]["code"] == "template_error"
    assert "no bombs here" in answer["error"]["message"]
    status, answer = s.request("POST", "/v1/chat/completions", {"messages": HI, "max_tokens": 2})
    assert status == 200 and answer["usage"]["completion_tokens"] == 2


def test_shutting_down_answers_503_with_retry_after(local):
    s = local()
    s.engine.close()
    status, answer = s.request("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 3})
    assert status == 503 and answer["error"]["code"] == "shutting_down"
    assert s.headers["retry-after"] == "1"


def test_server_wide_sampling_defaults(local):
    from qwenlocal.planning.options import SamplingOptions

    # top_k 1 makes any temperature greedy; max_tokens 4 ends every reply that gives none
    s = local(defaults=SamplingOptions(temperature=5.0, top_k=1, max_tokens=4))
    ask = {"prompt": "The sky is"}
    _, default = s.request("POST", "/v1/completions", ask)
    _, greedy = s.request("POST", "/v1/completions", {**ask, "temperature": 0, "max_tokens": 4})
    assert default["usage"]["completion_tokens"] == 4
    assert default["choices"][0]["text"] == greedy["choices"][0]["text"]
    _, own = s.request("POST", "/v1/completions", {**ask, "max_tokens": 2})  # the request's own value wins
    assert own["usage"]["completion_tokens"] == 2
