"""The serving engine, without HTTP: one model, one worker thread. Admitted jobs run one at a
time in arrival order, up to `max_queue` wait and more are refused. One Generator is kept across
jobs, so a prompt that extends the previous conversation prefills only its new tokens."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from qwenlocal.generation.generate import Generator, SamplingParams, Summary, Totals
from qwenlocal.generation.grammar import Constraint
from qwenlocal.planning.memory import live_report, measure
from qwenlocal.planning.options import SamplingOptions

DEFAULT_MAX_QUEUE = 8


class EngineError(Exception):
    """A job refused or ended by the engine; `code`: queue_full, shutting_down or client_closed."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(eq=False)
class Job:
    """One admitted request: what to generate, and the channel its events come back on."""

    prompt: list[int]
    params: SamplingParams
    max_tokens: int
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    grammar: str | None = None  # lark text (grammar.py): the reply is constrained to it
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


def expert_cache_stats(stats: Stats, model) -> dict | None:
    """Hits, misses, hit rate, bytes copied and prefetch recall of an offloaded model's experts,
    summed from the generations' records."""
    if stats.expert_cache is None:
        return None
    from qwenlocal.experts.cold import cold_report

    t = stats.expert_cache.total()
    return {
        "hits": t.hits,
        "misses": t.misses,
        "hit_rate": stats.expert_cache.hit_rate,
        "bytes_copied": t.bytes_copied,
        "wait_seconds": t.wait_s,
        "prefetch_recall": stats.expert_cache.prefetch_recall,
        "slots_per_layer": model.experts.slots_per_layer,
        "cold_experts": cold_report(stats.expert_cache, model.experts),
    }


class Engine:
    """Owns the model's Generator; runs admitted jobs one at a time, in arrival order."""

    def __init__(
        self,
        model,
        tokenizer,
        generation: dict | None,
        model_id: str,
        ctx_size: int,
        max_queue: int = DEFAULT_MAX_QUEUE,
        defaults: SamplingOptions | None = None,
    ):
        self.tokenizer, self.model_id = tokenizer, model_id
        self.generation = generation  # generation_config.json: the thinking mode's sampling
        self.ctx_size, self.max_queue = ctx_size, max_queue
        self.defaults = defaults or SamplingOptions()  # server-wide; a request's own values win
        self.gen = Generator(model, tokenizer, ctx_size=ctx_size)
        self.stats = Stats()
        self.started = int(time.time())
        self.pending = 0  # admitted and not finished: the running job and those waiting
        self.running = False
        self._lock = threading.Lock()
        self._jobs: set[Job] = set()
        device = model.device
        # a new thread starts on CUDA device 0: the worker makes the model's device current
        init = (lambda: torch.cuda.set_device(device)) if device.type == "cuda" else None
        self._pool = ThreadPoolExecutor(1, "qwenlocal-generate", initializer=init)

    def submit(self, job: Job) -> None:
        """Queue a job, or raise EngineError when `max_queue` jobs already wait or the engine closed."""
        with self._lock:
            if self.pending > self.max_queue:
                self.stats.rejected += 1
                raise EngineError(
                    "queue_full",
                    f"The server is busy: {self.waiting} requests are waiting (--max-queue {self.max_queue}). "
                    "Try again shortly.",
                )
            self.pending += 1
            self._jobs.add(job)
        try:
            self._pool.submit(self._work, job)
        except RuntimeError:  # shutting down
            with self._lock:
                self.pending -= 1
                self._jobs.discard(job)
            raise EngineError("shutting_down", "The server is shutting down.") from None

    def _work(self, job: Job) -> None:
        with self._lock:
            self.running = True
        try:
            if job.cancelled.is_set():  # the client left while waiting
                with self._lock:
                    self.stats.cancelled += 1
                job.emit("error", EngineError("client_closed", "The client closed the request."))
                return
            constraint = None
            if job.grammar is not None:
                vocab = self.gen.model.config.vocab_size
                constraint = Constraint(job.grammar, self.tokenizer, vocab, self.tokenizer.eos_token_ids)
            records = self.gen.stream(
                job.prompt,
                job.params,
                job.max_tokens,
                stop=job.stop or None,
                cancel=job.cancelled.is_set,
                constraint=constraint,
            )
            for record in records:
                if isinstance(record, Summary):
                    with self._lock:
                        self.stats.record(record)
                    job.emit("done", record)
                else:
                    job.emit("token", record)
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
                job.emit("error", EngineError("shutting_down", "The server is shutting down."))
        self._pool.shutdown(wait=False, cancel_futures=True)

    def snapshot(self) -> dict:
        with self._lock:
            d = self.stats.as_dict()
            d["queue"] = {"running": self.running, "waiting": self.waiting, "max_queue": self.max_queue}
            d["expert_cache"] = expert_cache_stats(self.stats, self.gen.model)
        d["model"] = self.model_id
        d["ctx_size"] = self.ctx_size
        d["kv_cache_tokens"] = len(self.gen.cached)
        d["memory_bytes"] = measure(self.gen.model, self.gen.cache)
        d["memory_estimate_bytes"] = {
            r.component: r.estimate for r in live_report(self.gen.model, self.gen.cache)
        }
        return d
