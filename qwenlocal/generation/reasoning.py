"""Qwen3's reasoning, apart from the answer: the model writes `<think>\\n...\\n</think>\\n\\n` and
then the answer. One splitter serves the chat (thinking shown dimmed, never fed back) and the
server (`reasoning_content`)."""

from __future__ import annotations

from qwenlocal.generation.tokenizer import THINK_END, THINK_START


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


class ReasoningSplitter:
    """Streams generated text into (reasoning, answer): what is inside `<think>...</think>` is
    reasoning. The whitespace around both parts is trimmed; a `<think>` after the answer started
    is text. `in_reasoning`: the prompt itself opened the think block.

    `state` is "start" (nothing decided yet), "reasoning" or "answer"."""

    def __init__(self, in_reasoning: bool = False):
        self.state = "reasoning" if in_reasoning else "start"
        self.saw_think = in_reasoning
        self._buf = ""
        self._strip_lead = in_reasoning

    def add(self, text: str) -> tuple[str, str]:
        self._buf += text
        reasoning, answer = [], []
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
                self.state = "answer"
            if self.state == "reasoning":
                i = self._buf.find(THINK_END)
                if i >= 0:
                    reasoning.append(self._buf[:i].rstrip())
                    self._buf, self.state, self._strip_lead = self._buf[i + len(THINK_END) :], "answer", True
                    continue
                # keep back a possible start of `</think>` and the whitespace before it
                head = self._buf[: len(self._buf) - partial_suffix(self._buf, THINK_END)].rstrip()
                reasoning.append(head)
                self._buf = self._buf[len(head) :]
                break
            answer.append(self._buf)
            self._buf = ""
        return "".join(reasoning), "".join(answer)

    def finish(self) -> tuple[str, str]:
        """What was held back, once the text has ended."""
        buf, self._buf = self._buf, ""
        if self.state == "reasoning":
            return buf.rstrip(), ""
        return "", "" if self._strip_lead else buf


def split_reasoning(text: str, in_reasoning: bool = False) -> tuple[str | None, str]:
    """Whole text -> (reasoning, or None when there was no think block; answer)."""
    splitter = ReasoningSplitter(in_reasoning)
    r1, a1 = splitter.add(text)
    r2, a2 = splitter.finish()
    return (r1 + r2 if splitter.saw_think else None), a1 + a2


def strip_reasoning(text: str) -> str:
    """An assistant message without its think block, as Qwen's template keeps it in the history;
    an unclosed block leaves no answer."""
    return split_reasoning(text)[1].strip()
