"""A chat session without terminal I/O: the conversation, fitting it into the context, the
settings of the next replies, and generation on one Generator whose KV cache is kept across turns
(a prompt that extends the cached tokens prefills only what is new)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from qwenlocal.errors import UserError
from qwenlocal.generation.generate import (
    DEFAULT_MAX_TOKENS,
    Generator,
    SamplingParams,
    Summary,
    TokenRecord,
    Totals,
)
from qwenlocal.generation.reasoning import ReasoningSplitter, strip_reasoning

DEFAULT_CHAT_MAX_TOKENS = DEFAULT_MAX_TOKENS
# When the context is full, free this share of the prompt's room beyond the minimum, so the next
# few turns reuse the KV cache instead of re-prefilling the whole conversation after each trim.
TRIM_SLACK = 0.25
SETTING_NAMES = ("temp", "top_k", "top_p", "min_p", "max_tokens", "seed")
SETTING_ALIASES = {"temperature": "temp", "topk": "top_k", "topp": "top_p", "minp": "min_p"}
RESET_WORDS = ("default", "none", "off")


# -- conversation ------------------------------------------------------------------------------
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
                content = strip_reasoning(m["content"]) if role == "assistant" else m["content"]
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


# -- settings ----------------------------------------------------------------------------------
@dataclass
class ChatSettings:
    """Mode and sampling for the next replies; None in `overrides` means the mode's default."""

    thinking: bool = True
    max_tokens: int = DEFAULT_CHAT_MAX_TOKENS
    overrides: dict[str, float | int | None] = field(default_factory=dict)  # SamplingParams names
    generation: dict | None = None  # generation_config.json, read once (sources.ModelSource)

    def sampling(self, reply_index: int = 0) -> SamplingParams:
        """The n-th reply of a session samples with seed + n: a session replays exactly, and
        /retry still gives a new reply."""
        values = dict(self.overrides)
        if values.get("seed") is not None:
            values["seed"] = int(values["seed"]) + reply_index
        return SamplingParams.for_mode(self.thinking, self.generation, **values)

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
        SamplingParams.for_mode(self.thinking, self.generation, **trial)  # validates
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


# -- a reply, sorted into thinking and answer --------------------------------------------------
@dataclass
class ReplyParts:
    thinking: str = ""
    answer: str = ""
    think_tokens: int = 0
    answer_tokens: int = 0
    think_open: bool = False  # a <think> block was opened and not (yet) closed


class ReplySorter:
    """Sorts a reply's tokens into thinking and answer (through the one ReasoningSplitter) and
    counts them. feed() returns events: ("think_start", ""), ("think", text), ("think_end", ""),
    ("answer", text)."""

    def __init__(self, in_reasoning: bool = False):
        self.splitter = ReasoningSplitter(in_reasoning)
        self.parts = ReplyParts()
        self._opened = self._closed = False

    def feed(self, text: str) -> list[tuple[str, str]]:
        before = self.splitter.state
        events = self._events(*self.splitter.add(text))
        after = self.splitter.state
        if before == after == "reasoning":
            self.parts.think_tokens += 1
        elif "reasoning" not in (before, after):  # not one of the two markers
            self.parts.answer_tokens += 1
        return events

    def finish(self) -> list[tuple[str, str]]:
        """The events of the text held back until the end."""
        return self._events(*self.splitter.finish())

    def _events(self, thinking: str, answer: str) -> list[tuple[str, str]]:
        p, events = self.parts, []
        if self.splitter.saw_think and not self._opened:
            self._opened = p.think_open = True
            events.append(("think_start", ""))
        if thinking:
            p.thinking += thinking
            events.append(("think", thinking))
        if self._opened and not self._closed and self.splitter.state == "answer":
            self._closed, p.think_open = True, False
            events.append(("think_end", ""))
        if answer:
            p.answer += answer
            events.append(("answer", answer))
        return events


# -- the session -------------------------------------------------------------------------------
class ChatSession:
    """A conversation on one Generator, whose KV cache is kept across turns: a prompt that extends
    the cached tokens prefills only what is new."""

    def __init__(self, model, tokenizer, ctx_size: int, settings: ChatSettings, system: str | None = None):
        self.model, self.tokenizer, self.ctx_size = model, tokenizer, ctx_size
        self.settings = settings
        self.gen = Generator(model, tokenizer, ctx_size)
        self.conv = Conversation(system or None)
        self.totals = Totals()
        self.replies = 0  # replies started this session (seeds the sampler)

    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        return self.tokenizer.encode_chat(messages, enable_thinking=self.settings.thinking)

    def prepare(self) -> Fit:
        return fit_context(self.conv, self.encode, self.ctx_size, self.settings.max_tokens)

    def stream(self, fit: Fit, cancel: Callable[[], bool] | None = None) -> Iterator[TokenRecord | Summary]:
        params = self.settings.sampling(self.replies)
        self.replies += 1
        return self.gen.stream(fit.ids, params, max_tokens=fit.max_tokens, cancel=cancel)

    def sorter(self, fit: Fit) -> ReplySorter:
        return ReplySorter(in_reasoning=self.tokenizer.opens_reasoning(fit.ids))

    def finish(self, parts: ReplyParts, summary: Summary) -> Summary:
        """Record the reply (answer only; a stopped reply keeps what was written) and the totals."""
        self.conv.add("assistant", parts.answer.strip())
        self.totals.add(summary)
        return summary

    def reply(self, user_text: str | None = None) -> tuple[Fit, ReplyParts, Summary]:
        """Non-interactive: add a user message (if given), generate the whole reply."""
        if user_text is not None:
            self.conv.add("user", user_text)
        fit = self.prepare()
        sorter = self.sorter(fit)
        for r in self.stream(fit):
            if isinstance(r, Summary):
                summary = r
            else:
                sorter.feed(r.text)
        sorter.finish()
        return fit, sorter.parts, self.finish(sorter.parts, summary)
