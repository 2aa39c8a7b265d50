"""`qwenlocal chat`: the chat logic as plain functions, the KV cache kept across turns, and the
real command driven through a pseudo-terminal on the tiny random checkpoint."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import pytest
import torch
from rich.console import Console

from qwenlocal import UserError, load_model
from qwenlocal.app.chat import ChatApp, Command, History, LineReader, parse_line
from qwenlocal.app.chat_view import ReplyView, device_row, memory_now, reply_line
from qwenlocal.app.session import ChatSession, ChatSettings, Conversation, ReplySorter, fit_context
from qwenlocal.experts.offload import CacheStats, LayerStats
from qwenlocal.generation.generate import Summary, TokenRecord, Totals
from qwenlocal.generation.reasoning import strip_reasoning
from qwenlocal.generation.tokenizer import Tokenizer


def read_generation(folder: Path) -> dict:
    return json.loads((folder / "generation_config.json").read_text())


# "8 tokens · prompt 538.4 tok/s · gen 97.9 tok/s · RSS 422.61 MiB · token limit"
REPLY_LINE = re.compile(
    r"(\d+) tokens · prompt ([\d.]+) tok/s · gen ([\d.]+) tok/s · RSS ([\d.]+) (KiB|MiB|GiB)([^\r\n]*)"
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: tiny matrices gain nothing from more, and lose a lot on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# -- plain logic -------------------------------------------------------------------------------
def test_parse_line_commands_and_messages():
    assert parse_line("hello /there") == "hello /there"
    assert parse_line("//etc/hosts is a file") == "/etc/hosts is a file"
    assert parse_line("/help") == Command("help")
    assert parse_line("  /No-Think ") == Command("no_think")
    assert parse_line("/set temp 0.2") == Command("set", "temp 0.2")
    assert parse_line("/set") == Command("set")
    assert parse_line("/system You are terse.") == Command("system", "You are terse.")
    assert parse_line("/save  out.json") == Command("save", "out.json")
    assert parse_line("/bye") == Command("bye") and parse_line("/exit") == Command("exit")
    with pytest.raises(UserError, match=r"Unknown command /frob; /help lists"):
        parse_line("/frob")
    with pytest.raises(UserError, match=r"Usage: /load FILE"):
        parse_line("/load")
    with pytest.raises(UserError, match=r"/clear takes no argument"):
        parse_line("/clear everything")


def test_line_reader_blocks_and_pastes():
    def reader(*lines):
        it = iter(lines)
        prompts = []

        def read(prompt):
            prompts.append(prompt)
            return next(it)

        return LineReader(read), prompts

    r, prompts = reader('"""', "first", "", 'last"""')
    assert r() == ("first\n\nlast", True) and prompts == [">>> ", "... ", "... ", "... "]
    r, _ = reader('"""opening line', '"""')
    assert r() == ("opening line", True)
    r, _ = reader('"""all on one line"""')
    assert r() == ("all on one line", True)
    r, _ = reader("pasted one\npasted two")  # readline hands a bracketed paste over as one line
    assert r() == ("pasted one\npasted two", True)
    r, _ = reader("/stats")
    assert r() == ("/stats", False)


def test_conversation_turns_load_and_thinking_dropped():
    conv = Conversation.from_messages(
        [
            {"role": "system", "content": "Be brief."},
            user("a"),
            assistant("<think>\nhidden\n</think>\n\nA"),
            user("b"),
            assistant("<think>never closed"),
            user("c"),
        ]
    )
    assert conv.system == "Be brief."
    assert [m["content"] for m in conv.messages] == ["a", "A", "b", "", "c"]
    assert [len(t) for t in conv.turns()] == [2, 2, 1] and conv.ends_with_user
    conv.drop_oldest_turn()
    assert conv.to_messages()[:2] == [{"role": "system", "content": "Be brief."}, user("b")]
    assert conv.pop_reply() is None and conv.messages[-1] == user("c")
    assert strip_reasoning("<think>\nx\n</think>\n\nanswer ") == "answer"
    for bad, message in [
        ({"role": "user"}, "holds a JSON list"),
        ([user("a"), {"role": "system", "content": "late"}], "Message 1 has role 'system'"),
        ([{"role": "tool", "content": "x"}], "Message 0 has role 'tool'"),
        ([{"role": "user", "content": 3}], "Message 0 is not"),
    ]:
        with pytest.raises(UserError, match=message):
            Conversation.from_messages(bad)


def _words(messages):
    """A stand-in tokenizer: 2 tokens per message plus one per word."""
    return [0] * sum(2 + len(m["content"].split()) for m in messages)


def test_fit_context_drops_oldest_turns_keeps_system_and_last():
    def conv():  # 4 (system) + 4 x 6 + 4 (last) = 32 tokens
        w = "w w w w"
        return Conversation("sys tem", [user(w), assistant(w), user(w), assistant(w), user("last one")])

    c = conv()
    fit = fit_context(c, _words, ctx_size=100, max_tokens=40)
    assert (len(fit.ids), fit.max_tokens, fit.dropped_turns, len(c.messages)) == (32, 40, 0, 5)
    # 32 + 30 > 54: one turn would do (20 <= 24), the slack drops a second so later turns fit too
    fit = fit_context(c, _words, ctx_size=54, max_tokens=30)
    assert (len(fit.ids), fit.max_tokens, fit.dropped_turns, fit.dropped_tokens) == (8, 30, 2, 24)
    assert c.to_messages() == [{"role": "system", "content": "sys tem"}, user("last one")]
    assert fit_context(conv(), _words, ctx_size=54, max_tokens=30, slack=0).dropped_turns == 1
    # the last turn alone nearly fills the context: the reply gets what is left
    fit = fit_context(Conversation(None, [user("w " * 20)]), _words, ctx_size=30, max_tokens=40)
    assert (fit.max_tokens, fit.dropped_turns) == (8, 0)
    # it does not fit at all: an error, and nothing is dropped
    c = Conversation("s", [user("a"), assistant("b"), user("w " * 40)])
    with pytest.raises(UserError, match="needs 45 tokens with the system prompt; the context holds 30"):
        fit_context(c, _words, ctx_size=30, max_tokens=4)
    assert len(c.messages) == 3


def test_settings_set_validate_and_seed_per_reply(tiny_ckpt):
    s = ChatSettings(
        thinking=True, max_tokens=64, overrides={"seed": 5}, generation=read_generation(tiny_ckpt)
    )
    assert (s.sampling().temperature, s.sampling().top_p) == (0.6, 0.95)
    assert s.set("temp", "0.2") == "temp = 0.2" and s.sampling().temperature == 0.2
    assert s.set("Top-K", "7") == "top_k = 7" and s.sampling().top_k == 7
    assert s.set("max_tokens", "12") == "max_tokens = 12" and s.max_tokens == 12
    assert s.set("temperature", "default") == "temp = the mode default"
    s.thinking = False
    assert s.sampling().temperature == 0.7 and s.sampling().top_k == 7  # mode default, override kept
    assert [s.sampling(i).seed for i in range(3)] == [5, 6, 7]
    for key, value, message in [
        ("top_p", "2", "top_p must be in"),
        ("temp", "warm", "temp takes a number"),
        ("top_k", "1.5", "top_k takes a whole number"),
        ("max_tokens", "0", "max_tokens must be positive"),
        ("beam", "4", "Unknown setting 'beam'"),
    ]:
        with pytest.raises(UserError, match=message):
            s.set(key, value)
    assert s.sampling().top_k == 7 and s.max_tokens == 12  # a bad value changes nothing
    assert "no thinking · temp 0.7 · top_k 7" in s.describe()


@pytest.fixture(scope="module")
def tok(tiny_ckpt):
    return Tokenizer.from_dir(tiny_ckpt)


def _records(tok, text):
    ids = tok.encode(text)
    return [TokenRecord(t, tok.decode([t]), i, 0.0) for i, t in enumerate(ids)]


def test_think_splitter_and_view(tok):
    console = Console(file=io.StringIO(), width=80, color_system=None)
    view = ReplyView(console, ReplySorter())
    for r in _records(tok, "<think>\nSome reasoning here.\n</think>\n\nThe answer\x1b[2J."):
        view.add(r)
    parts = view.finish(cancelled=False)
    assert parts.thinking == "Some reasoning here." and parts.answer == "The answer\x1b[2J."
    assert parts.answer_tokens == len(tok.encode("\n\nThe answer\x1b[2J."))
    thought = len(tok.encode("\nSome reasoning here.\n"))
    assert parts.think_tokens == thought and not parts.think_open
    shown = console.file.getvalue()
    # control characters from the model never reach the terminal raw
    assert (
        shown == f"thinking…\nSome reasoning here.\n(thought for {thought} tokens)\n\nThe answer\ufffd[2J.\n"
    )

    console = Console(file=io.StringIO(), width=80, color_system=None)
    view = ReplyView(console, ReplySorter())
    for r in _records(tok, "<think>\nstill going"):
        view.add(r)
    parts = view.finish(cancelled=True)
    assert parts.think_open and parts.answer == ""
    unfinished = len(tok.encode("\nstill going"))
    assert (
        f"(thinking not finished after {unfinished} tokens: no answer)\n(stopped" in console.file.getvalue()
    )

    # a <think> after the answer started is text, not a block
    sorter = ReplySorter()
    for r in _records(tok, "Hi <think> there"):
        sorter.feed(r.text)
    assert sorter.parts.answer == "Hi <think> there" and sorter.parts.think_tokens == 0
    assert sorter.parts.answer_tokens == len(tok.encode("Hi <think> there"))


def test_reply_line_and_totals_read_the_records():
    s = Summary(
        prompt_tokens=10, cached_tokens=4, generated_tokens=5, prompt_s=0.5, gen_s=2.0, finish_reason="stop"
    )
    # (10 - 4) prefilled in 0.5 s; 4 decode steps in 2 s
    assert reply_line(s, "RSS 1.00 GiB") == "5 tokens · prompt 12.0 tok/s · gen 2.0 tok/s · RSS 1.00 GiB"
    s.finish_reason = "cancelled"
    s.expert_cache = CacheStats({0: LayerStats(hits=2, misses=1), 1: LayerStats(hits=4, misses=1)})
    assert reply_line(s, "GPU 1.00 of 24.0 GiB").endswith(
        "GPU 1.00 of 24.0 GiB · experts 75.0% hit · stopped"  # 6 of 8
    )
    assert Summary(expert_cache=CacheStats({0: LayerStats()})).expert_hit_rate is None  # no uses yet
    t = Totals()
    t.add(s)
    t.add(
        Summary(
            prompt_tokens=20,
            cached_tokens=14,
            generated_tokens=3,
            prompt_s=0.5,
            gen_s=2.0,
            expert_cache=CacheStats({1: LayerStats(hits=1, misses=3)}),
        )
    )
    assert (t.turns, t.stopped, t.prompt_tps, t.gen_tps) == (2, 1, 12.0, 1.5)
    assert {k: (v.hits, v.misses) for k, v in t.expert_cache.layers.items()} == {0: (2, 1), 1: (5, 4)}


def test_cuda_figures(monkeypatch):
    """The CUDA lines, checked here with torch.cuda's memory calls stubbed (CI has no GPU)."""
    gib = 1024**3
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (5 * gib, 24 * gib))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 17 * gib)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 18 * gib)
    device = torch.device("cuda", 0)
    assert memory_now(device) == "GPU 17.00 of 24.0 GiB"
    assert device_row(device) == "cuda:0 Test GPU · 24.00 GiB total, 5.00 GiB free"


# -- the model side: KV cache kept across turns ------------------------------------------------
@pytest.fixture(scope="module")
def model32(tiny_ckpt):
    return load_model(tiny_ckpt, dtype=torch.float32)


def test_kv_cache_across_turns_equals_full_prefill(model32, tok):
    settings = ChatSettings(thinking=False, max_tokens=6, overrides={"temperature": 0.0})
    s = ChatSession(model32, tok, 1024, settings, system="Be brief.")
    s.reply("Hello")
    _, _, second = s.reply("And then?")
    assert second.cached_tokens > 10 and second.finish_reason == "length"  # only the new turn prefilled
    gen = s.gen
    # the next step of turn 2, from the cache kept since turn 1
    reused = gen.prefill([second.token_ids[-1]])
    fresh = model32(torch.tensor([gen.cached]))[0, -1]
    torch.testing.assert_close(reused, fresh, atol=1e-4, rtol=0)
    # turn 3's prompt on top of the kept cache, as Generator.stream does it
    s.conv.add("user", "Why?")
    ids = s.prepare().ids
    kept = gen._reuse_prefix(ids)
    assert kept > second.cached_tokens
    reused = gen.prefill(ids[kept:])
    fresh = model32(torch.tensor([ids]))[0, -1]
    torch.testing.assert_close(reused, fresh, atol=1e-4, rtol=0)


def test_a_reply_stopped_mid_forward_leaves_the_cache_consistent(model32, tok, monkeypatch):
    s = ChatSession(
        model32, tok, 1024, ChatSettings(thinking=False, max_tokens=50, overrides={"temperature": 0.0})
    )
    s.conv.add("user", "Hello")
    fit = s.prepare()
    experts_cls, calls = type(model32.experts), []
    real_forward = experts_cls.forward

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 7:  # the 4th forward, after layer 0 stored its keys and before layer 1
            raise KeyboardInterrupt  # where Ctrl-C lands most often: inside the model
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(experts_cls, "forward", interrupted)
    sorter = s.sorter(fit)
    with pytest.raises(KeyboardInterrupt):
        for r in s.stream(fit):
            sorter.feed(r.text)
    monkeypatch.undo()
    s.finish(sorter.parts, Summary(len(fit.ids), generated_tokens=3, finish_reason="cancelled"))
    assert sorter.parts.answer_tokens == 3 and s.conv.messages[-1]["role"] == "assistant"
    s.conv.add("user", "Go on")
    ids = s.prepare().ids
    kept = s.gen._reuse_prefix(ids)
    assert kept > 0
    torch.testing.assert_close(
        s.gen.prefill(ids[kept:]), model32(torch.tensor([ids]))[0, -1], atol=1e-4, rtol=0
    )


def test_thinking_is_not_fed_back(model32, tok):
    s = ChatSession(model32, tok, 1024, ChatSettings(thinking=True, max_tokens=16), system=None)
    s.conv.add("user", "Question?")
    sorter = ReplySorter()
    for r in _records(tok, "<think>\nsecret reasoning\n</think>\n\nThe answer."):
        sorter.feed(r.text)
    s.finish(sorter.parts, Summary())
    assert s.conv.messages[-1] == assistant("The answer.")
    s.conv.add("user", "Next?")
    prompt = tok.decode(s.prepare().ids)
    assert "secret reasoning" not in prompt and "The answer.<|im_end|>" in prompt


def run_app(session, history: Path, *inputs) -> str:
    """ChatApp fed `inputs` (an exception is raised where input would come); returns the screen."""
    it = iter(inputs)

    def read(prompt):
        x = next(it)
        if isinstance(x, BaseException):
            raise x
        return x

    console = Console(file=io.StringIO(), width=200, color_system=None)
    ChatApp(console, session, History(history), "tiny", read=read).run()
    return console.file.getvalue()


def test_app_leaves_on_bye_ctrl_d_and_double_ctrl_c(model32, tok, tmp_path):
    def app(*inputs):
        session = ChatSession(model32, tok, 256, ChatSettings(max_tokens=4))
        return run_app(session, tmp_path / "h", *inputs)

    assert app("/bye").rstrip().endswith("bye")
    assert "error: Nothing to retry" in app("/retry", "/bye")
    assert app("/exit").rstrip().endswith("bye")
    assert app(EOFError()).rstrip().endswith("bye")
    out = app(KeyboardInterrupt(), "/stats", KeyboardInterrupt(), KeyboardInterrupt())
    assert out.count("(Ctrl-C again or Ctrl-D to leave)") == 2 and out.rstrip().endswith("bye")


def test_ctrl_c_stops_a_reply_after_the_token_it_is_on(model32, tok, tmp_path, monkeypatch):
    """Ctrl-C lands once the third token is on screen: the reply ends with those three."""
    real_add = ReplyView.add

    def add(self, record):
        real_add(self, record)
        if self.tokens == 3:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(ReplyView, "add", add)
    session = ChatSession(
        model32, tok, 256, ChatSettings(thinking=False, max_tokens=50, overrides={"temperature": 0})
    )
    out = run_app(session, tmp_path / "h", "Tell me a story", "/bye")
    assert "(stopped: the partial reply is kept; /retry regenerates it)" in out
    assert re.search(r"\n3 tokens · .* · stopped\n", out), out
    t = session.totals
    assert (t.turns, t.stopped, t.generated_tokens) == (1, 1, 3)
    assert session.conv.messages[-1]["role"] == "assistant"


def test_commands_on_their_edges(model32, tok, tmp_path):
    saved, junk = tmp_path / "conv.json", tmp_path / "junk.json"
    junk.write_text("this is not JSON\n")
    unwritable = tmp_path / "no-such-folder" / "c.json"
    session = ChatSession(model32, tok, 256, ChatSettings(max_tokens=4), system="Be brief.")
    out = run_app(
        session, tmp_path / "h",
        "/system -", "/system", "/set temp", "/set", f"/save {unwritable}", f"/load {junk}",
        f"/save {saved}", "/bye",
    )  # fmt: skip
    assert "system prompt removed" in out and "no system prompt" in out
    assert "error: Usage: /set temp VALUE (or /set alone to see the settings)." in out
    assert "thinking · temp 0.6 · top_k 20" in out  # /set alone shows the settings
    assert f"error: Cannot write {unwritable}: No such file or directory." in out
    assert not unwritable.parent.exists()
    assert f"error: {junk} is not JSON" in out
    assert json.loads(saved.read_text()) == []  # the removed system prompt is not saved


def test_nearly_full_context_notice(model32, tok, tmp_path):
    session = ChatSession(
        model32, tok, 48, ChatSettings(thinking=False, max_tokens=40, overrides={"temperature": 0})
    )
    prompt = tok.encode_chat([user("Hello there")], enable_thinking=False)
    out = run_app(session, tmp_path / "h", "Hello there", "/bye")
    room = 48 - len(prompt)
    assert 0 < room < 40
    assert f"context: nearly full, this reply may use {room} tokens" in out
    assert session.totals.generated_tokens <= room


def test_stats_with_offloaded_experts(tiny_ckpt, tok, tmp_path):
    model = load_model(tiny_ckpt, dtype=torch.float32, quant="nf4", gpu_experts=8)
    per_layer = model.experts.slots_per_layer
    session = ChatSession(
        model, tok, 256, ChatSettings(thinking=False, max_tokens=4, overrides={"temperature": 0})
    )
    out = run_app(session, tmp_path / "h", "Hello", "/stats", "/bye")
    counters = model.experts.stats.total()  # since the load: this session's only reply
    hits, misses = counters.hits, counters.misses
    assert misses >= per_layer * len(model.config.moe_layers)  # the cache starts empty
    rate = 100 * hits / (hits + misses)
    assert f"experts {rate:.1f}% hit" in out  # the line after the reply
    assert f"expert cache  {hits:,} hits, {misses:,} misses ({rate:.1f}%)" in out
    for layer in model.config.moe_layers:
        st = model.experts.stats.layers[layer]
        assert re.search(rf"│\s*{layer}\s+{st.hits}\s+{st.misses}\s", out), out


# -- the real command in a pseudo-terminal -----------------------------------------------------
def spawn(cwd: Path, *args, sigint=signal.SIG_DFL) -> pexpect.spawn:
    """`qwenlocal chat` in a pseudo-terminal. SIGINT starts at `sigint`: at its default, as in a
    user's terminal, however the suite was started (a background job of a script inherits it
    ignored, and Python keeps it ignored)."""
    env = dict(os.environ, TERM="dumb", COLUMNS="100", PYTHONIOENCODING="utf-8", NO_COLOR="1")
    env["OMP_NUM_THREADS"] = "1"  # as one_thread above
    child = pexpect.spawn(
        sys.executable,
        ["-m", "qwenlocal.cli", "chat", *map(str, args)],
        env=env,
        cwd=str(cwd),  # typed file names stay short: readline scrolls long lines on a dumb terminal
        encoding="utf-8",
        timeout=60,
        dimensions=(50, 100),
        preexec_fn=lambda: signal.signal(signal.SIGINT, sigint),
    )
    child.logfile_read = io.StringIO()  # the whole session, for failure messages
    return child


def ctrl_c_at_the_prompt(child) -> None:
    """Ctrl-C once the chat waits for a key. Readline shows the prompt before it waits: a SIGINT
    in between is only seen at the next key (CPython's readline), so wait for the child to sleep
    in select() on the terminal, which Linux shows in /proc."""
    wchan = Path(f"/proc/{child.pid}/wchan")
    for _ in range(6000):
        if not wchan.exists() or "poll" in wchan.read_text() or "select" in wchan.read_text():
            break
        time.sleep(0.01)
    child.sendcontrol("c")


def say(child, line, expect=r">>> "):
    child.sendline(line)
    child.expect(expect)
    return child.before


def reply(child, line):
    """Send a message; return the numbers of the line printed after the reply (RSS in bytes)."""
    out = say(child, line)
    m = REPLY_LINE.search(out)
    assert m, out
    rss = float(m.group(4)) * {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[m.group(5)]
    return int(m.group(1)), float(m.group(2)), float(m.group(3)), rss, m.group(6)


def test_chat_session_in_a_terminal(tiny_ckpt, tmp_path):
    history = tmp_path / "history"
    saved, again = tmp_path / "conv.json", tmp_path / "again.json"
    child = spawn(tmp_path, tiny_ckpt, "--device", "cpu", "--max-tokens", "8", "--seed", "1", "--verbose",
                  "--system", "Be brief.", "--history-file", history)  # fmt: skip
    try:
        child.expect(">>> ")
        panel = child.before
        for label in ("qwenlocal chat", "device", "dtype", "bfloat16", "context", "8,192 tokens"):
            assert label in panel
        params = re.search(r"lm head \(cpu\)\s+([\d.]+) MiB", panel)
        assert params and float(params.group(1)) > 1
        assert "quantization" in panel and re.search(r"experts\s+16 of 16 on cpu", panel)
        # 2 layers x (k, v) x 2 kv heads x 8192 positions x 16 dims x 2 bytes
        # the memory model's estimate, then the bytes really allocated
        assert re.search(r"kv cache \(cpu\)\s+2\.00 MiB\s+2\.00 MiB", panel)

        tokens, prompt_tps, gen_tps, rss, _ = reply(child, "Hello there")
        # the process holds at least torch and the model: tens of MiB, whichever unit is printed
        assert 1 < tokens <= 8 and prompt_tps > 0 and gen_tps > 0 and rss > 10 * 2**20
        out = say(child, "How are you?")
        cached = re.search(r"([\d,]+) reused from the KV cache", out)
        assert cached and int(cached.group(1).replace(",", "")) > 10  # only the new turn was prefilled

        assert "no thinking for the next replies" in say(child, "/no_think")
        assert "thinking for the next replies: thinking ·" in say(child, "/think")
        assert "system prompt set" in say(child, "/system Answer briefly.")
        assert "'Answer briefly.'" in say(child, "/system")
        assert "temp = 0.5" in say(child, "/set temp 0.5")
        assert "error: top_p must be in (0, 1], got 2.0." in say(child, "/set top_p 2")
        assert "temp 0.5" in say(child, "/set")
        assert "Unknown command /frobnicate; /help lists the commands" in say(child, "/frobnicate")
        assert "Usage: /load FILE" in say(child, "/load")
        helped = say(child, "/help")
        assert all(f"/{c}" in helped for c in ("retry", "save", "load", "stats", "bye"))
        assert reply(child, "/retry")[0] > 0

        # Ctrl-C while a long reply streams stops it; the chat goes on
        say(child, "/set max_tokens 4000")
        child.sendline("Tell me a long story")
        child.expect("Tell me a long story\r\n")
        child.expect(r"\S")  # the reply has begun to stream
        child.sendcontrol("c")
        child.expect(r"\(stopped: the partial reply is kept")
        child.expect(">>> ")
        m = REPLY_LINE.search(child.before)
        assert m and 0 < int(m.group(1)) < 4000 and m.group(6).endswith("stopped")
        say(child, "/set max_tokens 8")
        tokens, _, gen_tps, _, _ = reply(child, "Still there?")
        assert tokens > 1 and gen_tps > 0

        # a block between triple quotes, and a bracketed paste
        child.sendline('"""')
        child.expect(r"\.\.\. ")
        child.sendline("first line")
        child.expect(r"\.\.\. ")
        assert reply(child, 'second line"""')[0] > 0
        assert reply(child, "\x1b[200~pasted one\npasted two\x1b[201~")[0] > 0

        stats = say(child, "/stats")
        assert re.search(r"replies\s+7 \(1 stopped\)", stats) and "tokens in use" in stats
        assert re.search(r"generated\s+[\d,]+ tokens at [\d.]+ tok/s", stats)

        assert "saved 13 messages" in say(child, "/save conv.json")
        conv = json.loads(saved.read_text())
        assert conv[0] == {"role": "system", "content": "Answer briefly."}
        assert [m["content"] for m in conv if m["role"] == "user"] == [
            "Hello there",
            "How are you?",
            "Tell me a long story",
            "Still there?",
            "first line\nsecond line",
            "pasted one\npasted two",
        ]
        assert [m["role"] for m in conv[1:]] == ["user", "assistant"] * 6
        assert "new conversation" in say(child, "/clear")
        assert "0 messages, 0 turns" in say(child, "/stats")
        assert "loaded 12 messages (6 turns, a system prompt)" in say(child, "/load conv.json")
        say(child, "/save again.json")
        assert json.loads(again.read_text()) == conv
        assert "error: Cannot read" in say(child, "/load missing.json")
        assert reply(child, "One more after loading")[0] > 0

        ctrl_c_at_the_prompt(child)
        child.expect(r"Ctrl-C again or Ctrl-D to leave")
        ctrl_c_at_the_prompt(child)
        child.expect(pexpect.EOF)
    finally:
        child.close()
        log = child.logfile_read.getvalue()
    assert child.exitstatus == 0, log
    assert "Traceback" not in log
    lines = history.read_text().splitlines()
    assert "Hello there" in lines and "/retry" in lines


def test_ctrl_c_at_the_prompt_when_started_with_sigint_ignored(tiny_ckpt, tmp_path):
    """A chat started with SIGINT ignored (a background job of a script) still answers Ctrl-C at
    the prompt as it does during a reply."""
    child = spawn(tmp_path, tiny_ckpt, "--device", "cpu", "--max-tokens", "2",
                  "--history-file", tmp_path / "h", sigint=signal.SIG_IGN)  # fmt: skip
    try:
        child.expect(">>> ")
        ctrl_c_at_the_prompt(child)
        child.expect(r"Ctrl-C again or Ctrl-D to leave")
        ctrl_c_at_the_prompt(child)
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.logfile_read.getvalue()


def test_chat_context_full_and_history_across_sessions(tiny_ckpt, tmp_path):
    history = tmp_path / "history"
    history.write_text("/stats\n")  # as a previous session left it
    child = spawn(tmp_path, tiny_ckpt, "--device", "cpu", "--ctx-size", "96", "--max-tokens", "8",
                  "--no-think", "--system", "Be brief.", "--history-file", history)  # fmt: skip
    try:
        child.expect(">>> ")
        child.sendcontrol("p")  # previous-history: the last session's line
        child.sendline("")
        child.expect(r"replies\s+0 \(0 stopped\)")
        child.expect(">>> ")
        trimmed = False
        for i in range(10):
            out = say(child, f"turn number {i} with a few words")
            assert REPLY_LINE.search(out), out
            if "context: " in out:
                assert re.search(
                    r"context: dropped the \d+ oldest turns? \(\d+ tokens\) to fit 96 tokens; "
                    r"the system prompt is kept",
                    out,
                )
                trimmed = True
                break
        assert trimmed
        child.sendline("word " * 120)
        child.expect(
            r"error: The last message needs [\d,]+ tokens with the system prompt; the context holds 96"
        )
        child.expect(">>> ")
        assert reply(child, "short again")[0] > 0
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
        log = child.logfile_read.getvalue()
    assert child.exitstatus == 0, log
    assert "Traceback" not in log


def test_chat_record_routing_writes_one_line_per_token(tiny_ckpt, tmp_path):
    """As a user would pipe it: the trace holds one line per token the model ran."""
    trace = tmp_path / "t.jsonl"
    args = ["chat", str(tiny_ckpt), "--quant", "nf4", "--record-routing", str(trace), "--max-tokens", "3",
            "--temp", "0", "--no-think", "--verbose", "--history-file", str(tmp_path / "h")]  # fmt: skip
    r = subprocess.run(
        [sys.executable, "-m", "qwenlocal.cli", *args],
        input="Hello\n/bye\n",
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, OMP_NUM_THREADS="1", NO_COLOR="1", COLUMNS="200"),
    )
    assert r.returncode == 0, r.stderr
    prompt = int(re.search(r"prompt ([\d,]+) tokens: 0 reused", r.stdout).group(1))
    tokens = int(REPLY_LINE.search(r.stdout).group(1))
    # every prompt token and every generated token but a last one cut by the limit runs the model
    ran = prompt + tokens - ("token limit" in r.stdout)
    lines = trace.read_text().splitlines()
    assert len(lines) == ran
    assert all(len(json.loads(line)["experts"]) == 2 for line in lines)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--top-p", "2"], "top_p must be in (0, 1], got 2.0."),
        (["-n", "0"], "--max-tokens must be positive, got 0."),
        (["--ctx-size", "lots"], "Cannot read 'lots' as a token count"),
        (["--device", "tpu"], "Unknown device 'tpu'"),
        (["--dtype", "fp7"], "Unknown dtype 'fp7'"),
        (["--cache-policy", "fifo"], "Unknown --cache-policy 'fifo'"),
        (["--kv-dtype", "int3"], "Unknown --kv-dtype 'int3'"),
        (["--gpu-experts", "4", "--vram-budget", "8GiB"], "Give --gpu-experts or --vram-budget, not both."),
        (["--quant", "nf3"], "nf3"),
    ],
)
def test_chat_flag_checks_exit_2_before_loading(tmp_path, args, message):
    from typer.testing import CliRunner

    from qwenlocal.cli import app

    # a model folder that does not exist: a check that passed would fail on it instead
    r = CliRunner().invoke(app, ["chat", str(tmp_path / "no-model"), *args])
    assert r.exit_code == 2 and message in r.stderr, r.output
    assert "does not exist" not in r.stderr and "Traceback" not in r.output
