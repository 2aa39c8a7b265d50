"""What the chat shows: the panels (startup, /stats), the memory table, the line after each
reply, and a reply as it streams. Rendering only; the numbers come from the session's records."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psutil
import torch
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from qwenlocal.app.session import ChatSession, ReplyParts, ReplySorter
from qwenlocal.experts.offload import CacheStats
from qwenlocal.generation.generate import Summary, TokenRecord

MUTED = "bright_black"
_CONTROL = {c: "\ufffd" for c in [*range(0, 9), *range(11, 32), 127]}


def count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


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


def reply_line(s: Summary, memory: str) -> str:
    """The muted line after each reply."""
    parts = [
        f"{s.generated_tokens} tokens",
        f"prompt {s.prompt_tps:.1f} tok/s",
        f"gen {s.gen_tps:.1f} tok/s",
        memory,
    ]
    if s.expert_hit_rate is not None:
        parts.append(f"experts {100 * s.expert_hit_rate:.1f}% hit")
    if s.finish_reason != "stop":
        parts.append({"cancelled": "stopped", "length": "token limit"}.get(s.finish_reason, s.finish_reason))
    return " · ".join(parts)


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
    from qwenlocal.planning.memory import live_report

    where = {"gpu": str(session.model.device), "host": "host"}
    rows = [
        MemoryRow(f"{r.component.replace('_', ' ')} ({where[r.where]})", r.estimate, r.real)
        for r in live_report(session.model, session.gen.cache)
    ]
    rows.append(MemoryRow("process RSS", None, process_rss()))
    return rows


def quantization_row(model) -> str:
    what = model.recipe.describe() if model.recipe is not None else "none (16-bit weights)"
    reason = model.plan.reason if model.plan is not None else None
    return what + (f" (auto: {reason})" if reason else "")


def residency_row(model) -> tuple[str, str] | None:
    experts = model.experts
    total = model.config.num_experts * len(model.config.moe_layers)
    slots = experts.slots_per_layer
    on_device = total if slots is None else slots * len(model.config.moe_layers)
    if not total:
        return None
    policy = f", {experts.policy_name} cache" if slots is not None else ""
    return (
        "experts",
        f"{on_device:,} of {total:,} on {model.device} ({100 * on_device / total:.1f} %){policy}",
    )


def expert_layer_table(stats: CacheStats | None) -> Table | None:
    """Per-layer expert-cache counters, when the experts are offloaded."""
    if stats is None:
        return None
    from qwenlocal.experts.cold import overlap

    cold = any(st.cpu_computed for st in stats.layers.values())  # --cold-experts cpu/auto: their columns
    table = Table(box=None, pad_edge=False, header_style="bold")
    cols = ("layer", "hits", "misses", "hit rate", "copied", "waiting")
    for col in cols + (("on cpu", "cpu time", "overlap", "promoted") if cold else ()):
        table.add_column(col, justify="right")
    for layer, st in sorted(stats.layers.items()):
        n = st.hits + st.misses
        row = [
            str(layer),
            f"{st.hits:,}",
            f"{st.misses:,}",
            f"{100 * st.hits / n:.1f}%" if n else "—",
            fmt_bytes(st.bytes_copied),
            f"{st.wait_s * 1000:.1f} ms",
        ]
        if cold:
            ov = f"{100 * overlap(st):.0f}%" if st.cpu_wall_s else "—"
            row += [f"{st.cpu_computed:,}", f"{st.cpu_s * 1000:.1f} ms", ov, f"{st.promoted:,}"]
        table.add_row(*row)
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


def stats_panel(s: ChatSession, started: float) -> Panel:
    """/stats: memory by device, the session's totals and speeds, the expert cache per layer."""
    t, device = s.totals, s.model.device
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
        ("replies", f"{t.turns} ({t.stopped} stopped) in {time.perf_counter() - started:.0f} s"),
        (
            "prompt",
            f"{t.prompt_tokens:,} tokens: {t.cached_tokens:,} reused from the KV cache, "
            f"{t.prompt_tokens - t.cached_tokens:,} prefilled at {t.prompt_tps:.1f} tok/s",
        ),
        ("generated", f"{t.generated_tokens:,} tokens at {t.gen_tps:.1f} tok/s"),
    ]
    if t.expert_cache is not None:
        c, hit_rate = t.expert_cache.total(), t.expert_cache.hit_rate
        rate = "" if hit_rate is None else f" ({100 * hit_rate:.1f}%)"
        rows.append(("expert cache", f"{c.hits:,} hits, {c.misses:,} misses{rate}"))
        recall = t.expert_cache.prefetch_recall
        if recall is not None:
            rows.append(("prefetch recall", f"{100 * recall:.1f}% of picks guessed one layer ahead"))
    rows += [
        ("conversation", f"{len(s.conv.messages)} messages, {count(len(s.conv.turns()), 'turn')}"),
        ("settings", s.settings.describe()),
    ]
    panel = info_panel("stats", rows, memory_rows(s))
    layers = expert_layer_table(t.expert_cache)
    if layers is None:
        return panel
    return Panel(Group(panel.renderable, "", layers), title="stats", title_align="left", expand=False)


class ReplyView:
    """Renders one reply as it streams: thinking dimmed, the answer plain."""

    def __init__(self, console: Console, sorter: ReplySorter):
        self.console, self.sorter = console, sorter
        self.at_line_start = True
        self.tokens = 0

    def _out(self, text: str, style: str | None = None) -> None:
        if text:
            self.console.out(_printable(text), style=style, end="", highlight=False)
            self.at_line_start = text.endswith("\n")

    def _newline(self) -> None:
        if not self.at_line_start:
            self._out("\n")

    def add(self, record: TokenRecord) -> None:
        self.tokens += 1
        self._render(self.sorter.feed(record.text))

    def _render(self, events: list[tuple[str, str]]) -> None:
        for kind, text in events:
            if kind == "think_start":
                self._out("thinking…\n", MUTED)
            elif kind == "think":
                self._out(text, "dim italic")
            elif kind == "think_end":
                self._newline()
                self._out(f"(thought for {self.sorter.parts.think_tokens} tokens)\n\n", MUTED)
            else:
                self._out(text)

    def finish(self, cancelled: bool) -> ReplyParts:
        self._render(self.sorter.finish())
        p = self.sorter.parts
        self._newline()
        if p.think_open:
            self._out(f"(thinking not finished after {p.think_tokens} tokens: no answer)\n", MUTED)
        if cancelled:
            self._out("(stopped: the partial reply is kept; /retry regenerates it)\n", MUTED)
        return p
