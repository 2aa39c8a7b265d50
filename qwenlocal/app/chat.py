"""`qwenlocal chat`: an interactive terminal chat that shows memory, speed and the expert cache.

The terminal side: reading lines (readline, blocks between triple quotes, pastes), commands,
Ctrl-C, and the Typer command that loads the model. The conversation and generation live in
session.py, the rendering in chat_view.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from qwenlocal.app import cli_util as cli
from qwenlocal.app.chat_view import (
    MUTED,
    ReplyView,
    count,
    info_panel,
    memory_now,
    memory_rows,
    reply_line,
    startup_rows,
    stats_panel,
)
from qwenlocal.app.session import DEFAULT_CHAT_MAX_TOKENS, ChatSession, ChatSettings, Conversation
from qwenlocal.errors import UserError
from qwenlocal.generation.generate import Summary
from qwenlocal.planning import options as opt

DEFAULT_CTX_SIZE = "8192"
HISTORY_LENGTH = 1000  # lines kept in the history file
FENCE = '"""'
PROMPT, CONTINUATION = ">>> ", "... "

# name -> (argument, what it does); the order is the order of /help.
COMMANDS: dict[str, tuple[str, str]] = {
    "help": ("", "this list"),
    "think": ("", "thinking mode for the next replies"),
    "no_think": ("", "no thinking for the next replies"),
    "system": ("TEXT", "set the system prompt (alone: show it; '-' removes it)"),
    "set": ("KEY VALUE", "temp top_k top_p min_p max_tokens seed; 'default' resets"),
    "clear": ("", "new conversation (the system prompt and settings stay)"),
    "retry": ("", "regenerate the last reply"),
    "stats": ("", "memory by device, session totals, speeds"),
    "save": ("FILE", "write the conversation as JSON: [{role, content}, ...]"),
    "load": ("FILE", "read a conversation written by /save"),
    "exit": ("", "leave (also /bye, Ctrl-D, Ctrl-C twice)"),
    "bye": ("", "leave"),
}
ARG_REQUIRED = {"save", "load"}
ARG_OPTIONAL = {"system", "set"}


@dataclass(frozen=True)
class Command:
    name: str
    arg: str = ""


def parse_line(line: str) -> Command | str:
    """One typed line -> a Command, or the message to send ('//text' sends '/text').
    Raises UserError with one line of help for an unknown command or a missing argument."""
    text = line.strip()
    if not text.startswith("/"):
        return line
    if text.startswith("//"):
        return text[1:]
    word, _, arg = text[1:].partition(" ")
    name = word.lower().replace("-", "_")
    arg = arg.strip()
    if name not in COMMANDS:
        raise UserError(
            f"Unknown command /{word}; /help lists the commands ('//' starts a message with '/')."
        )
    usage = f"/{name} {COMMANDS[name][0]}".rstrip()
    if name in ARG_REQUIRED and not arg:
        raise UserError(f"Usage: {usage}.")
    if arg and name not in ARG_REQUIRED | ARG_OPTIONAL:
        raise UserError(f"/{name} takes no argument.")
    return Command(name, arg)


def help_lines() -> list[str]:
    return [f"/{n} {a}".rstrip().ljust(20) + d for n, (a, d) in COMMANDS.items()] + [
        '"""'.ljust(20) + "opens and closes a multi-line message; a pasted block is one too",
        "Ctrl-C".ljust(20) + "stops a reply (its partial text is kept); twice at the prompt leaves",
    ]


class LineReader:
    """Reads one message or command: '\"\"\"' opens and closes a block of lines; a bracketed paste
    of several lines arrives from readline as one line with newlines. Returns (text, multiline)."""

    def __init__(self, read: Callable[[str], str] = input):
        self.read = read

    def __call__(self) -> tuple[str, bool]:
        line = self.read(PROMPT)
        if "\n" in line:
            return line, True
        stripped = line.strip()
        if not stripped.startswith(FENCE):
            return line, False
        body = stripped[len(FENCE) :]
        if body.endswith(FENCE):  # """one line"""
            return body[: -len(FENCE)], True
        lines = [body] if body else []
        while True:
            nxt = self.read(CONTINUATION)
            if nxt.rstrip().endswith(FENCE):
                last = nxt.rstrip()[: -len(FENCE)]
                if last:
                    lines.append(last)
                return "\n".join(lines), True
            lines.append(nxt)


class _ReplyInterrupt:
    """While a reply streams, the first Ctrl-C asks the generator to stop after its current step;
    a second stops it at once (KeyboardInterrupt), for a step that takes long. Later ones, and any
    during the bookkeeping after the reply, are ignored."""

    def __enter__(self) -> _ReplyInterrupt:
        self.presses, self.armed = 0, True
        self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame) -> None:
        if self.armed:
            self.presses += 1
            if self.presses == 2:
                self.armed = False
                raise KeyboardInterrupt

    def stopping(self) -> bool:
        return self.presses > 0

    def disarm(self) -> None:
        self.armed = False

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self.previous)


def default_history_file() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "qwenlocal" / "chat_history"


class History:
    """readline history persisted in a file; a no-op where readline is missing."""

    def __init__(self, path: Path):
        self.path = path
        try:
            import readline
        except ImportError:  # Windows without pyreadline
            self.rl = None
            return
        self.rl = readline
        readline.set_history_length(HISTORY_LENGTH)
        if path.is_file():
            with contextlib.suppress(OSError):  # an unreadable history only costs the history
                readline.read_history_file(str(path))

    def mark(self) -> int:
        return self.rl.get_current_history_length() if self.rl else 0

    def replace_since(self, mark: int, text: str) -> None:
        """Store a multi-line message as one entry instead of its separate lines."""
        if not self.rl:
            return
        for i in range(self.rl.get_current_history_length() - 1, mark - 1, -1):
            self.rl.remove_history_item(i)
        self.rl.add_history(text)

    def save(self) -> str | None:
        """Write the history file; returns a warning on failure."""
        if not self.rl:
            return None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.rl.write_history_file(str(self.path))
        except OSError as e:
            return f"Could not write the history file {self.path}: {e.strerror or e}."
        return None


class ChatApp:
    """The terminal loop: reads lines, runs commands, streams replies, prints the numbers."""

    def __init__(
        self,
        console: Console,
        session: ChatSession,
        history: History,
        model_label: str,
        verbose: bool = False,
        read: Callable[[str], str] = input,
    ):
        self.console, self.session, self.history = console, session, history
        self.model_label, self.verbose = model_label, verbose
        self.reader = LineReader(read)
        self.started = time.perf_counter()

    # -- output helpers
    def muted(self, text: str) -> None:
        self.console.print(text, style=MUTED, markup=False, highlight=False, soft_wrap=True)

    def notice(self, text: str) -> None:
        self.console.print(text, style="yellow", markup=False, highlight=False, soft_wrap=True)

    def problem(self, text: str) -> None:
        self.console.print(f"[bold red]error:[/] {escape(text)}", highlight=False, soft_wrap=True)

    # -- the loop
    def run(self) -> None:
        s = self.session
        self.console.print(info_panel("qwenlocal chat", startup_rows(s, self.model_label), memory_rows(s)))
        self.muted("/help lists the commands. Ctrl-C stops a reply; Ctrl-D leaves.")
        exit_armed = False
        # Ctrl-C at the prompt as during a reply, even when started with SIGINT ignored (a
        # background job of a script), which Python would otherwise keep
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            while True:
                mark = self.history.mark()
                try:
                    text, multiline = self.reader()
                except KeyboardInterrupt:
                    self.console.print()
                    if exit_armed:
                        break
                    exit_armed = True
                    self.muted("(Ctrl-C again or Ctrl-D to leave)")
                    continue
                except EOFError:
                    self.console.print()
                    break
                exit_armed = False
                if multiline:
                    self.history.replace_since(mark, text)
                if not self.handle(text, multiline):
                    break
        finally:
            signal.signal(signal.SIGINT, previous)
            warning = self.history.save()
            if warning:
                self.muted(warning)
        self.muted("bye")

    def handle(self, text: str, multiline: bool) -> bool:
        """One input; False ends the chat."""
        try:
            parsed = text if multiline else parse_line(text)
            if isinstance(parsed, Command):
                return self.command(parsed)
            if parsed.strip():
                self.reply_to(parsed)
        except UserError as e:
            self.problem(str(e))
        return True

    def reply_to(self, text: str) -> None:
        conv = self.session.conv
        conv.add("user", text)
        try:
            self.reply()
        except UserError:
            conv.messages.pop()  # the message that could not be answered; nothing else is lost
            raise

    def reply(self) -> None:
        """Generate a reply to the conversation, which ends with a user message. A UserError
        (the conversation cannot fit) comes before anything changes."""
        s = self.session
        fit = s.prepare()
        if fit.dropped_turns:
            kept = "; the system prompt is kept" if s.conv.system else ""
            self.notice(
                f"context: dropped the {count(fit.dropped_turns, 'oldest turn')} "
                f"({fit.dropped_tokens:,} tokens) to fit {s.ctx_size:,} tokens{kept}"
            )
        if fit.max_tokens < s.settings.max_tokens:
            self.notice(f"context: nearly full, this reply may use {fit.max_tokens:,} tokens")
        view = ReplyView(self.console, s.sorter(fit))
        summary: Summary | None = None
        with _ReplyInterrupt() as guard:
            records = s.stream(fit, cancel=guard.stopping)
            try:
                for record in records:
                    if isinstance(record, Summary):
                        summary = record
                    else:
                        view.add(record)
            except KeyboardInterrupt:  # the second Ctrl-C; the generator's cache stays consistent
                records.close()
            guard.disarm()
            if summary is None:  # stopped at once: what the view saw is the reply
                summary = Summary(len(fit.ids), generated_tokens=view.tokens, finish_reason="cancelled")
            parts = view.finish(summary.finish_reason == "cancelled")
            s.finish(parts, summary)
        self.muted(reply_line(summary, memory_now(s.model.device)))
        if self.verbose:
            self.muted(
                f"prompt {summary.prompt_tokens:,} tokens: {summary.cached_tokens:,} reused from the KV cache, "
                f"{summary.prompt_tokens - summary.cached_tokens:,} prefilled in {summary.prompt_s:.2f} s · "
                f"thinking {parts.think_tokens} / answer {parts.answer_tokens} tokens · "
                f"context {len(s.gen.cached):,}/{s.ctx_size:,}"
            )

    # -- commands
    def command(self, cmd: Command) -> bool:
        s, settings = self.session, self.session.settings
        name, arg = cmd.name, cmd.arg
        if name in ("exit", "bye"):
            return False
        if name == "help":
            for line in help_lines():
                self.console.print(line, markup=False, highlight=False, soft_wrap=True)
        elif name in ("think", "no_think"):
            settings.thinking = name == "think"
            self.muted(
                f"{'thinking' if settings.thinking else 'no thinking'} for the next replies: {settings.describe()}"
            )
        elif name == "system":
            if not arg:
                self.muted(f"system prompt: {s.conv.system!r}" if s.conv.system else "no system prompt")
            else:
                s.conv.system = None if arg == "-" else arg
                self.muted("system prompt removed" if arg == "-" else "system prompt set")
        elif name == "set":
            key, _, value = arg.partition(" ")
            if not value.strip():
                if key:
                    raise UserError(f"Usage: /set {key} VALUE (or /set alone to see the settings).")
                self.muted(settings.describe())
            else:
                self.muted(settings.set(key, value.strip()))
        elif name == "clear":
            s.conv.messages.clear()
            self.muted("new conversation")
        elif name == "retry":
            last = s.conv.pop_reply()
            try:
                if not s.conv.ends_with_user:
                    raise UserError(
                        "Nothing to retry: the conversation does not end with a reply to a message."
                    )
                self.reply()
            except UserError:
                if last is not None:
                    s.conv.messages.append(last)
                raise
        elif name == "stats":
            self.console.print(stats_panel(s, self.started))
        elif name == "save":
            path = Path(arg).expanduser()
            messages = s.conv.to_messages()
            try:
                path.write_text(json.dumps(messages, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            except OSError as e:
                raise UserError(f"Cannot write {path}: {e.strerror or e}.") from None
            self.muted(f"saved {len(messages)} messages to {path}")
        elif name == "load":
            path = Path(arg).expanduser()
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except OSError as e:
                raise UserError(f"Cannot read {path}: {e.strerror or e}.") from None
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise UserError(f"{path} is not JSON ({e}).") from None
            s.conv = Conversation.from_messages(data)
            self.muted(
                f"loaded {len(s.conv.messages)} messages ({count(len(s.conv.turns()), 'turn')}"
                f"{', a system prompt' if s.conv.system else ''}) from {path}"
            )
        return True


# -- the command -------------------------------------------------------------------------------
@opt.load_command(ctx_size=DEFAULT_CTX_SIZE, max_tokens=DEFAULT_CHAT_MAX_TOKENS)
def chat(
    model: opt.Model = None,
    load: opt.LoadOptions = opt.LoadOptions(),
    sampling: opt.SamplingOptions = opt.SamplingOptions(),
    system: Annotated[str | None, typer.Option("--system", help="System prompt.")] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Cache reuse and timings per reply.")
    ] = False,
    history_file: Annotated[
        Path | None, typer.Option("--history-file", help="Input history (default: the user's data folder).")
    ] = None,
):
    """Chat in the terminal: streamed replies, thinking shown apart, memory and speed after each reply."""

    def body():
        load.validate()  # bad values fail before a long load
        sampling.validate()
        console = Console(highlight=False)
        if load.device == "auto" and load.flags["device"].type == "cpu":
            console.print("No CUDA GPU found: running on the CPU.", style="yellow", highlight=False)
        model_id = load.model_or_default(model)
        with cli.loaded(model_id, load) as (source, lm, tok):
            settings = ChatSettings(
                sampling.think, sampling.max_tokens, sampling.overrides(), source.generation
            )
            session = ChatSession(lm, tok, load.ctx, settings, system)
            history = History(history_file or default_history_file())
            label = model_id if Path(model_id).exists() else f"{model_id} ({source.folder})"
            ChatApp(console, session, history, label, verbose).run()

    cli.run(body)
