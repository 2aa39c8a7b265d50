"""`qwenlocal chat`: an interactive terminal chat that shows memory, speed and the expert cache.

Two layers. The chat logic (conversation, context fitting, settings, commands, sorting a reply
into thinking and answer, session totals) is plain Python without terminal I/O. `ChatApp` reads
lines with readline and renders with rich; `chat` is the Typer command that loads the model.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Protocol

import psutil
import torch
import typer
from rich.console import Console, Group
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from . import cli_util as cli
from . import options as opt
from .config import DEFAULT_MODEL_ID
from .errors import UserError
from .generate import DEFAULT_MAX_TOKENS, Generator, SamplingParams, Summary, TokenRecord, Totals
from .tokenizer import THINK_END, THINK_START

DEFAULT_CTX_SIZE = "8192"
DEFAULT_CHAT_MAX_TOKENS = DEFAULT_MAX_TOKENS
HISTORY_LENGTH = 1000  # lines kept in the history file
# When the context is full, free this share of the prompt's room beyond the minimum, so the next
# few turns reuse the KV cache instead of re-prefilling the whole conversation after each trim.
TRIM_SLACK = 0.25
FENCE = '"""'
PROMPT, CONTINUATION = ">>> ", "... "
MUTED = "bright_black"

SETTING_NAMES = ("temp", "top_k", "top_p", "min_p", "max_tokens", "seed")
SETTING_ALIASES = {"temperature": "temp", "topk": "top_k", "topp": "top_p", "minp": "min_p"}
RESET_WORDS = ("default", "none", "off")

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


# -- conversation ------------------------------------------------------------------------------
def strip_thinking(text: str) -> str:
    """An assistant message without its <think> block (as Qwen's template drops it from history);
    an unclosed block takes everything after <think>."""
    if THINK_END in text:
        text = text.split(THINK_END)[-1]
    elif THINK_START in text:
        text = text.split(THINK_START)[0]
    return text.strip()


@dataclass
class Conversation:
    """The system prompt plus user/assistant messages, oldest first. Assistant messages hold the
    answer only: earlier turns' thinking is never fed back."""

    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)

    def to_messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [dict(m) for m in self.messages]

    @classmethod
    def from_messages(cls, data: Any) -> Conversation:
        """Read a JSON list of {role, content}; a system message may only come first."""
        if not isinstance(data, list):
            raise UserError("A conversation file holds a JSON list of {role, content} messages.")
        conv = cls()
        for i, m in enumerate(data):
            if not (isinstance(m, Mapping) and isinstance(m.get("content"), str)):
                raise UserError(f"Message {i} is not a {{role, content}} object with text content.")
            role = m.get("role")
            if role == "system" and i == 0:
                conv.system = m["content"]
            elif role in ("user", "assistant"):
                content = strip_thinking(m["content"]) if role == "assistant" else m["content"]
                conv.messages.append({"role": role, "content": content})
            else:
                raise UserError(
                    f"Message {i} has role {role!r}; roles are user and assistant (and system, first)."
                )
        return conv

    def add(self, role: str, content: str) -> None:
        self.messages.append({"role": role, "content": content})

    def turns(self) -> list[list[dict[str, str]]]:
        """Messages grouped in turns: a user message and the replies after it."""
        turns: list[list[dict[str, str]]] = []
        for m in self.messages:
            if m["role"] == "user" or not turns:
                turns.append([])
            turns[-1].append(m)
        return turns

    def drop_oldest_turn(self) -> None:
        self.messages = [m for turn in self.turns()[1:] for m in turn]

    def pop_reply(self) -> dict[str, str] | None:
        """Remove and return the last message if it is the assistant's."""
        if self.messages and self.messages[-1]["role"] == "assistant":
            return self.messages.pop()
        return None

    @property
    def ends_with_user(self) -> bool:
        return bool(self.messages) and self.messages[-1]["role"] == "user"


@dataclass
class Fit:
    """The prompt for the next reply after fitting the conversation into the context."""

    ids: list[int]
    max_tokens: int  # this reply's budget: less than asked only when even one turn nearly fills it
    dropped_turns: int = 0
    dropped_tokens: int = 0


def fit_context(
    conv: Conversation,
    encode: Callable[[list[dict[str, str]]], list[int]],
    ctx_size: int,
    max_tokens: int,
    slack: float = TRIM_SLACK,
) -> Fit:
    """Encode the conversation; when prompt + max_tokens would not fit, drop the oldest turns
    (the system prompt and the last turn stay). Raises UserError, leaving `conv` unchanged, when
    the last turn alone leaves no room for a reply."""
    ids = encode(conv.to_messages())
    if len(ids) + max_tokens <= ctx_size:
        return Fit(ids, max_tokens)
    trial = Conversation(conv.system, list(conv.messages))
    room = ctx_size - max_tokens
    target = room - int(max(room, 0) * slack)
    first, dropped = len(ids), 0
    while len(ids) > target and len(trial.turns()) > 1:
        trial.drop_oldest_turn()
        dropped += 1
        ids = encode(trial.to_messages())
    if len(ids) >= ctx_size:
        raise UserError(
            f"The last message needs {len(ids):,} tokens with the system prompt; the context holds "
            f"{ctx_size:,}. Shorten it or raise --ctx-size."
        )
    conv.messages = trial.messages
    return Fit(ids, min(max_tokens, ctx_size - len(ids)), dropped, first - len(ids))


# -- settings and commands ---------------------------------------------------------------------
@dataclass
class ChatSettings:
    """Mode and sampling for the next replies; None in `overrides` means the mode's default."""

    thinking: bool = True
    max_tokens: int = DEFAULT_CHAT_MAX_TOKENS
    overrides: dict[str, float | int | None] = field(default_factory=dict)  # SamplingParams names
    model_dir: Path | None = None

    def sampling(self, reply_index: int = 0) -> SamplingParams:
        """The n-th reply of a session samples with seed + n: a session replays exactly, and
        /retry still gives a new reply."""
        values = dict(self.overrides)
        if values.get("seed") is not None:
            values["seed"] = int(values["seed"]) + reply_index
        return SamplingParams.for_mode(self.thinking, self.model_dir, **values)

    def set(self, key: str, value: str) -> str:
        """/set KEY VALUE -> a description of the new value; UserError on a bad key or value."""
        key = key.lower().replace("-", "_")
        key = SETTING_ALIASES.get(key, key)
        if key not in SETTING_NAMES:
            raise UserError(f"Unknown setting {key!r}; /set takes {', '.join(SETTING_NAMES)}.")
        reset = value.strip().lower() in RESET_WORDS
        kind = float if key in ("temp", "top_p", "min_p") else int
        try:
            parsed = None if reset else kind(value)
        except ValueError:
            raise UserError(
                f"{key} takes {'a number' if kind is float else 'a whole number'}, not {value!r}."
            ) from None
        if key == "max_tokens":
            if parsed is not None and parsed <= 0:
                raise UserError(f"max_tokens must be positive, got {parsed}.")
            self.max_tokens = DEFAULT_CHAT_MAX_TOKENS if parsed is None else int(parsed)
            return f"max_tokens = {self.max_tokens}"
        name = "temperature" if key == "temp" else key
        trial = {**self.overrides, name: parsed}
        SamplingParams.for_mode(self.thinking, self.model_dir, **trial)  # validates
        self.overrides = trial
        return f"{key} = {'the mode default' if parsed is None else parsed}"

    def describe(self) -> str:
        p = self.sampling()
        seed = self.overrides.get("seed")
        return (
            f"{'thinking' if self.thinking else 'no thinking'} · temp {p.temperature:g} · top_k {p.top_k} · "
            f"top_p {p.top_p:g} · min_p {p.min_p:g} · max_tokens {self.max_tokens} · "
            f"seed {'none' if seed is None else seed}"
        )


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


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


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


# -- a reply, sorted into thinking and answer --------------------------------------------------
@dataclass
class ReplyParts:
    thinking: str = ""
    answer: str = ""
    think_tokens: int = 0
    answer_tokens: int = 0
    think_open: bool = False  # a <think> block was opened and not (yet) closed


class ThinkSplitter:
    """Sorts a reply's tokens by Qwen's <think>/</think> token ids. feed() returns events:
    ("think_start", ""), ("think", text), ("think_end", ""), ("answer", text)."""

    def __init__(self, think_start_id: int | None, think_end_id: int | None):
        self.start_id, self.end_id = think_start_id, think_end_id
        self.parts = ReplyParts()
        self.thinking = False

    def feed(self, token_id: int, text: str) -> list[tuple[str, str]]:
        p = self.parts
        if token_id == self.start_id and not self.thinking and not p.answer:
            self.thinking = p.think_open = True
            return [("think_start", "")]
        if token_id == self.end_id and self.thinking:
            self.thinking = p.think_open = False
            return [("think_end", "")]
        if self.thinking:
            p.think_tokens += 1
            text = text if p.thinking else text.lstrip("\n")
            p.thinking += text
            return [("think", text)] if text else []
        p.answer_tokens += 1
        text = text if p.answer else text.lstrip("\n")
        p.answer += text
        return [("answer", text)] if text else []


# -- numbers: memory, expert cache, session totals ---------------------------------------------
class ExpertCacheStats(Protocol):
    """What an expert cache may expose as `model.experts.stats` (an object, a mapping with these
    keys, a callable returning either, or an object whose `total()` returns one, as per-layer
    counters do): cumulative lookups served from and missing the cache."""

    hits: int
    misses: int


def expert_stats(model: torch.nn.Module) -> tuple[int, int] | None:
    """(hits, misses) so far when the model's experts expose cache stats, else None."""
    stats = getattr(getattr(model, "experts", None), "stats", None)
    if callable(stats):
        stats = stats()
    if stats is None:
        return None
    if callable(getattr(stats, "total", None)):
        stats = stats.total()
    get = stats.get if isinstance(stats, Mapping) else lambda k: getattr(stats, k, None)
    hits, misses = get("hits"), get("misses")
    if not (isinstance(hits, int) and isinstance(misses, int)):
        return None
    return hits, misses


def hit_rate(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    if before is None or after is None:
        return None
    hits, misses = after[0] - before[0], after[1] - before[1]
    return hits / (hits + misses) if hits + misses > 0 else None


def process_rss() -> int:
    return psutil.Process().memory_info().rss


def cuda_memory(device: torch.device) -> dict[str, Any]:
    free, total = torch.cuda.mem_get_info(device)
    return {
        "name": torch.cuda.get_device_name(device),
        "total": total,
        "free": free,
        "allocated": torch.cuda.memory_allocated(device),
        "reserved": torch.cuda.memory_reserved(device),
    }


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def memory_now(device: torch.device) -> str:
    """The per-reply memory figure: CUDA allocated of total, or the process RSS on the CPU."""
    if device.type == "cuda":
        m = cuda_memory(device)
        return f"GPU {m['allocated'] / 1024**3:.2f} of {m['total'] / 1024**3:.1f} GiB"
    return f"RSS {fmt_bytes(process_rss())}"


SessionTotals = Totals  # a chat session's sums


def reply_line(s: Summary, memory: str, experts: float | None) -> str:
    """The muted line after each reply."""
    parts = [
        f"{s.generated_tokens} tokens",
        f"prompt {s.prompt_tps:.1f} tok/s",
        f"gen {s.gen_tps:.1f} tok/s",
        memory,
    ]
    if experts is not None:
        parts.append(f"experts {100 * experts:.1f}% hit")
    if s.finish_reason != "stop":
        parts.append({"cancelled": "stopped", "length": "token limit"}.get(s.finish_reason, s.finish_reason))
    return " · ".join(parts)


# -- the session: model side, no terminal I/O --------------------------------------------------
class ChatSession:
    """A conversation on one Generator, whose KV cache is kept across turns: a prompt that extends
    the cached tokens prefills only what is new."""

    def __init__(self, model, tokenizer, ctx_size: int, settings: ChatSettings, system: str | None = None):
        self.model, self.tokenizer, self.ctx_size = model, tokenizer, ctx_size
        self.settings = settings
        self.gen = Generator(model, tokenizer, ctx_size)
        self.conv = Conversation(system or None)
        self.totals = SessionTotals()
        self.replies = 0  # replies started this session (seeds the sampler)

    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        return self.tokenizer.encode_chat(messages, enable_thinking=self.settings.thinking)

    def prepare(self) -> Fit:
        return fit_context(self.conv, self.encode, self.ctx_size, self.settings.max_tokens)

    def stream(self, fit: Fit) -> Iterator[TokenRecord]:
        params = self.settings.sampling(self.replies)
        self.replies += 1
        return self.gen.stream(fit.ids, params, max_tokens=fit.max_tokens)

    def splitter(self) -> ThinkSplitter:
        return ThinkSplitter(self.tokenizer.think_start_id, self.tokenizer.think_end_id)

    def finish(self, parts: ReplyParts, cancelled: bool) -> Summary:
        """Record the reply (answer only; a stopped reply keeps what was written) and the totals."""
        s = self.gen.summary
        if cancelled:
            s.finish_reason = "cancelled"
        self.conv.add("assistant", parts.answer.strip())
        self.totals.add(s)
        return s

    def reply(self, user_text: str | None = None) -> tuple[Fit, ReplyParts, Summary]:
        """Non-interactive: add a user message (if given), generate the whole reply."""
        if user_text is not None:
            self.conv.add("user", user_text)
        fit = self.prepare()
        splitter = self.splitter()
        for r in self.stream(fit):
            splitter.feed(r.token_id, r.text)
        return fit, splitter.parts, self.finish(splitter.parts, cancelled=False)


# -- terminal ----------------------------------------------------------------------------------
_CONTROL = {c: "\ufffd" for c in [*range(0, 9), *range(11, 32), 127]}


def _printable(text: str) -> str:
    """Generated text with control characters (escape sequences, carriage returns) made visible."""
    return text.translate(_CONTROL)


@dataclass
class MemoryRow:
    """One line of the memory table; `estimate` comes from a memory model when one is wired in."""

    component: str
    estimate: int | None
    real: int | None


def memory_table(rows: Sequence[MemoryRow]) -> Table:
    with_estimates = any(r.estimate is not None for r in rows)
    table = Table(box=None, pad_edge=False, show_header=True, header_style="bold")
    table.add_column("component")
    if with_estimates:
        table.add_column("estimate", justify="right")
    table.add_column("real", justify="right")
    for r in rows:
        real = "—" if r.real is None else fmt_bytes(r.real)
        cells = [
            Text(r.component),
            *(["—" if r.estimate is None else fmt_bytes(r.estimate)] if with_estimates else []),
        ]
        table.add_row(*cells, real)
    return table


def info_panel(title: str, rows: Sequence[tuple[str, str]], memory: Sequence[MemoryRow] = ()) -> Panel:
    """A panel of `label  value` rows, then a memory table (component, [estimate,] real)."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for label, value in rows:
        grid.add_row(label, Text(value))  # Text: a path or prompt with [brackets] is not markup
    body = Group(grid, "", memory_table(memory)) if memory else grid
    return Panel(body, title=title, title_align="left", expand=False)


def device_row(device: torch.device) -> str:
    if device.type == "cuda":
        m = cuda_memory(device)
        return f"{device} {m['name']} · {fmt_bytes(m['total'])} total, {fmt_bytes(m['free'])} free"
    return f"cpu · {fmt_bytes(psutil.virtual_memory().total)} RAM, process RSS {fmt_bytes(process_rss())}"


def memory_rows(session: ChatSession) -> list[MemoryRow]:
    """The memory model's estimate beside the bytes of the tensors really allocated."""
    from .memory import live_report

    where = {"gpu": str(session.model.device), "host": "host"}
    rows = [
        MemoryRow(f"{r.component.replace('_', ' ')} ({where[r.where]})", r.estimate, r.real)
        for r in live_report(session.model, session.gen.cache)
    ]
    rows.append(MemoryRow("process RSS", None, process_rss()))
    return rows


def quantization_row(model) -> str:
    what = model.recipe.describe() if model.recipe is not None else "none (16-bit weights)"
    return what + (f" (auto: {model.quant_choice})" if model.quant_choice else "")


def residency_row(model) -> tuple[str, str] | None:
    experts = model.experts
    total = model.config.num_experts * len(model.config.moe_layers)
    slots = getattr(experts, "slots_per_layer", None)
    on_device = total if slots is None else slots * len(model.config.moe_layers)
    if not total:
        return None
    policy = f", {experts.policy_name} cache" if slots is not None else ""
    return (
        "experts",
        f"{on_device:,} of {total:,} on {model.device} ({100 * on_device / total:.1f} %){policy}",
    )


def expert_layer_table(model) -> Table | None:
    """Per-layer expert-cache counters, when the experts are offloaded."""
    stats = getattr(model.experts, "stats", None)
    if stats is None or not hasattr(stats, "layers"):
        return None
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("layer", "hits", "misses", "hit rate", "copied", "waiting"):
        table.add_column(col, justify="right")
    for layer, st in sorted(stats.layers.items()):
        n = st.hits + st.misses
        table.add_row(
            str(layer),
            f"{st.hits:,}",
            f"{st.misses:,}",
            f"{100 * st.hits / n:.1f}%" if n else "—",
            fmt_bytes(st.bytes_copied),
            f"{st.wait_s * 1000:.1f} ms",
        )
    return table


def startup_rows(session: ChatSession, model_label: str) -> list[tuple[str, str]]:
    c, model = session.model.config, session.model
    dtype = str(model.dtype).removeprefix("torch.")
    return [
        ("model", model_label),
        (
            "architecture",
            f"{c.model_type} · {c.num_hidden_layers} layers · {c.num_experts} experts, "
            f"{c.num_experts_per_tok} active",
        ),
        ("device", device_row(model.device)),
        ("dtype", dtype),
        ("context", f"{session.ctx_size:,} tokens"),
        ("quantization", quantization_row(model)),
        *([row] if (row := residency_row(model)) else []),
        ("settings", session.settings.describe()),
        *([("system", _clip(session.conv.system))] if session.conv.system else []),
    ]


def _clip(text: str, width: int = 60) -> str:
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


class _ReplyInterrupt:
    """While a reply streams, the first Ctrl-C raises KeyboardInterrupt and any later one is
    ignored, so the bookkeeping after a stopped reply cannot itself be interrupted."""

    def __enter__(self) -> _ReplyInterrupt:
        self.armed = True
        self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame) -> None:
        if self.armed:
            self.armed = False
            raise KeyboardInterrupt

    def disarm(self) -> None:
        self.armed = False

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self.previous)


class ReplyView:
    """Renders one reply as it streams: thinking dimmed, the answer plain."""

    def __init__(self, console: Console, splitter: ThinkSplitter):
        self.console, self.splitter = console, splitter
        self.at_line_start = True

    def _out(self, text: str, style: str | None = None) -> None:
        if text:
            self.console.out(_printable(text), style=style, end="", highlight=False)
            self.at_line_start = text.endswith("\n")

    def _newline(self) -> None:
        if not self.at_line_start:
            self._out("\n")

    def add(self, record: TokenRecord) -> None:
        for kind, text in self.splitter.feed(record.token_id, record.text):
            if kind == "think_start":
                self._out("thinking…\n", MUTED)
            elif kind == "think":
                self._out(text, "dim italic")
            elif kind == "think_end":
                self._newline()
                self._out(f"(thought for {self.splitter.parts.think_tokens} tokens)\n\n", MUTED)
            else:
                self._out(text)

    def finish(self, cancelled: bool) -> ReplyParts:
        p = self.splitter.parts
        self._newline()
        if p.think_open:
            self._out(f"(thinking not finished after {p.think_tokens} tokens: no answer)\n", MUTED)
        if cancelled:
            self._out("(stopped: the partial reply is kept; /retry regenerates it)\n", MUTED)
        return p


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
                f"context: dropped the {_count(fit.dropped_turns, 'oldest turn')} "
                f"({fit.dropped_tokens:,} tokens) to fit {s.ctx_size:,} tokens{kept}"
            )
        if fit.max_tokens < s.settings.max_tokens:
            self.notice(f"context: nearly full, this reply may use {fit.max_tokens:,} tokens")
        view = ReplyView(self.console, s.splitter())
        before = expert_stats(s.model)
        records = s.stream(fit)
        cancelled = False
        with _ReplyInterrupt() as guard:
            try:
                try:
                    for record in records:
                        view.add(record)
                finally:
                    guard.disarm()
            except KeyboardInterrupt:  # the generator's cache stays consistent wherever it stopped
                cancelled = True
            records.close()
            parts = view.finish(cancelled)
            summary = s.finish(parts, cancelled)
        rate = hit_rate(before, expert_stats(s.model))
        self.muted(reply_line(summary, memory_now(s.model.device), rate))
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
            self.console.print(self.stats_panel())
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
                f"loaded {len(s.conv.messages)} messages ({_count(len(s.conv.turns()), 'turn')}"
                f"{', a system prompt' if s.conv.system else ''}) from {path}"
            )
        return True

    def stats_panel(self) -> Panel:
        s, t = self.session, self.session.totals
        device = s.model.device
        rows: list[tuple[str, str]] = []
        if device.type == "cuda":
            m = cuda_memory(device)
            rows.append(
                (
                    "CUDA",
                    f"{m['name']}: allocated {fmt_bytes(m['allocated'])} · reserved {fmt_bytes(m['reserved'])} · "
                    f"free {fmt_bytes(m['free'])} of {fmt_bytes(m['total'])}",
                )
            )
        rows += [
            ("KV cache", f"{len(s.gen.cached):,} of {s.ctx_size:,} tokens in use"),
            ("replies", f"{t.turns} ({t.stopped} stopped) in {time.perf_counter() - self.started:.0f} s"),
            (
                "prompt",
                f"{t.prompt_tokens:,} tokens: {t.cached_tokens:,} reused from the KV cache, "
                f"{t.prompt_tokens - t.cached_tokens:,} prefilled at {t.prompt_tps:.1f} tok/s",
            ),
            ("generated", f"{t.generated_tokens:,} tokens at {t.gen_tps:.1f} tok/s"),
        ]
        ex = expert_stats(s.model)
        if ex is not None:
            rate = hit_rate((0, 0), ex)
            rows.append(
                (
                    "expert cache",
                    f"{ex[0]:,} hits, {ex[1]:,} misses"
                    + (f" ({100 * rate:.1f}%)" if rate is not None else ""),
                )
            )
        recall = getattr(getattr(s.model.experts, "stats", None), "prefetch_recall", None)
        if recall is not None:
            rows.append(("prefetch recall", f"{100 * recall:.1f}% of picks guessed one layer ahead"))
        rows += [
            ("conversation", f"{len(s.conv.messages)} messages, {_count(len(s.conv.turns()), 'turn')}"),
            ("settings", s.settings.describe()),
        ]
        panel = info_panel("stats", rows, memory_rows(s))
        layers = expert_layer_table(s.model)
        return (
            panel
            if layers is None
            else Panel(Group(panel.renderable, "", layers), title="stats", title_align="left", expand=False)
        )


# -- the command -------------------------------------------------------------------------------
def chat(
    model: Annotated[str, typer.Argument(help="Model folder or Hugging Face repo id.")] = DEFAULT_MODEL_ID,
    ctx_size: Annotated[
        str, typer.Option("--ctx-size", "-c", help="Context size in tokens (8192, 32k).")
    ] = DEFAULT_CTX_SIZE,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="bf16, fp16 or fp32.")] = "bf16",
    system: Annotated[str | None, typer.Option("--system", help="System prompt.")] = None,
    think: Annotated[bool, typer.Option("--think/--no-think", help="Thinking mode.")] = True,
    temp: Annotated[float | None, typer.Option("--temp", help="Temperature; 0 is greedy.")] = None,
    top_k: Annotated[int | None, typer.Option("--top-k")] = None,
    top_p: Annotated[float | None, typer.Option("--top-p")] = None,
    min_p: Annotated[float | None, typer.Option("--min-p")] = None,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", "-n", help="Most tokens per reply.")
    ] = DEFAULT_CHAT_MAX_TOKENS,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Reproducible session: reply n samples with seed + n.")
    ] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Cache reuse and timings per reply.")
    ] = False,
    history_file: Annotated[
        Path | None, typer.Option("--history-file", help="Input history (default: the user's data folder).")
    ] = None,
    quant: opt.Quant = None,
    gpu_experts: opt.GpuExperts = None,
    vram_budget: opt.VramBudget = None,
    prefetch: opt.Prefetch = opt.DEFAULT_PREFETCH,
    cache_policy: opt.CachePolicy = opt.DEFAULT_CACHE_POLICY,
    record_routing: opt.RecordRouting = None,
    kv_dtype: opt.KvDtype = None,
):
    """Chat in the terminal: streamed replies, thinking shown apart, memory and speed after each reply."""

    def body():
        from .loader import parse_device, parse_dtype

        ctx = cli.parse_tokens(ctx_size)
        memory = opt.MemoryOptions(
            quant, gpu_experts, vram_budget, prefetch, cache_policy, record_routing, kv_dtype
        ).validate()
        dev = parse_device(device)
        parse_dtype(dtype)  # bad values fail before a long load
        if max_tokens <= 0:
            raise UserError(f"--max-tokens must be positive, got {max_tokens}.")
        overrides = {"temperature": temp, "top_k": top_k, "top_p": top_p, "min_p": min_p, "seed": seed}
        overrides = {k: v for k, v in overrides.items() if v is not None}
        SamplingParams.for_mode(think, None, **overrides)  # validates
        console = Console(highlight=False)
        if device == "auto" and dev.type == "cpu":
            console.print("No CUDA GPU found: running on the CPU.", style="yellow", highlight=False)
        with cli.loaded(model, device, dtype, ctx, memory=memory) as (folder, lm, tok):
            settings = ChatSettings(think, max_tokens, overrides, Path(folder))
            session = ChatSession(lm, tok, ctx, settings, system)
            history = History(history_file or default_history_file())
            label = model if Path(model).exists() else f"{model} ({folder})"
            ChatApp(console, session, history, label, verbose).run()

    cli.run(body)
