"""Generation: chunked prefill, decode, sampling, and records for any front end: one per token,
then a last one, the Summary, with the totals and the expert cache's counters (as mlx-lm's
GenerationResponse carries its stats)."""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from qwenlocal.errors import UserError
from qwenlocal.experts.offload import CacheStats, LayerStats
from qwenlocal.generation.grammar import Constraint
from qwenlocal.model.config import DEFAULT_CTX_SIZE
from qwenlocal.model.graphs import decode_graph
from qwenlocal.model.qwen3_moe import Qwen3MoeForCausalLM

PREFILL_CHUNK = 512
DEFAULT_MAX_TOKENS = 4096
# Qwen's recommended sampling per mode (model card); thinking mode must never be greedy.
THINKING_SAMPLING = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0}
NON_THINKING_SAMPLING = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.0}


@dataclass
class SamplingParams:
    temperature: float = 0.6
    top_k: int = 20
    top_p: float = 0.95
    min_p: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None

    def validate(self) -> SamplingParams:
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0, got {self.temperature}.")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}.")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}.")
        if not 0 <= self.min_p <= 1:
            raise UserError(f"min_p must be in [0, 1], got {self.min_p}.")
        return self

    @classmethod
    def for_mode(cls, thinking: bool, generation: dict | None = None, **overrides) -> SamplingParams:
        """Qwen's values for the mode; in thinking mode the model's generation_config.json values
        (`generation`, as sources.ModelSource read them) win."""
        values = dict(THINKING_SAMPLING if thinking else NON_THINKING_SAMPLING)
        if thinking and generation:
            g = generation
            values.update({k: g[k] for k in ("temperature", "top_p", "top_k", "min_p") if k in g})
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values).validate()


def sample(
    logits: torch.Tensor,
    p: SamplingParams,
    generator: torch.Generator | None = None,
    seen: torch.Tensor | None = None,
    allowed: torch.Tensor | None = None,
) -> int:
    """logits [V] float32 -> token id. Order: grammar mask (`allowed`, bool [V]), presence penalty,
    temperature, top-k, top-p, min-p."""
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    if p.presence_penalty and seen is not None and seen.numel():
        logits = logits.clone()
        logits[seen.unique()] -= p.presence_penalty
    if p.temperature == 0:
        return int(logits.argmax())
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.numel():
        values, ids = torch.topk(logits, p.top_k)  # sorted, largest first
    else:
        values, ids = torch.sort(logits, descending=True)
    probs = torch.softmax(values, dim=-1)
    if p.top_p < 1.0:
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        keep = (probs.cumsum(-1) - probs) < p.top_p
        probs = probs * keep
    if p.min_p > 0:
        probs = probs * (probs >= p.min_p * probs[0])
    choice = torch.multinomial(probs / probs.sum(), 1, generator=generator)
    return int(ids[choice])


@dataclass
class TokenRecord:
    """One generated token, as any front end renders it."""

    token_id: int
    text: str  # newly completed text (may be empty while a UTF-8 character is incomplete)
    index: int  # 0 for the first generated token
    elapsed_s: float  # since the request started


class Speeds:
    """Prompt tok/s over prefilled tokens (not those reused from the KV cache), generation tok/s
    over decode steps (the first token comes out of the prefill)."""

    prompt_tokens: int
    cached_tokens: int
    decoded_tokens: int
    prompt_s: float
    gen_s: float

    @property
    def prompt_tps(self) -> float:
        prefilled = self.prompt_tokens - self.cached_tokens
        return prefilled / self.prompt_s if self.prompt_s > 0 else 0.0

    @property
    def gen_tps(self) -> float:
        return self.decoded_tokens / self.gen_s if self.gen_s > 0 else 0.0


@dataclass
class Summary(Speeds):
    """The last record of a generation."""

    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens reused from the KV cache (not prefilled again)
    generated_tokens: int = 0
    prompt_s: float = 0.0
    gen_s: float = 0.0
    finish_reason: str = "length"  # "stop" (EOS or stop string), "length", "cancelled"
    peak_memory_bytes: int = 0
    peak_memory_scope: str = "process"  # whose peak: "request" (CUDA) or "process" (CPU): peak_memory
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    expert_cache: CacheStats | None = None  # offloaded experts: the counters of this generation

    @property
    def decoded_tokens(self) -> int:
        return max(self.generated_tokens - 1, 0)

    @property
    def expert_hit_rate(self) -> float | None:
        """Share of expert uses served from the cache; None without offload or without uses."""
        return None if self.expert_cache is None else self.expert_cache.hit_rate

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(prompt_tps=self.prompt_tps, gen_tps=self.gen_tps)
        return d


@dataclass
class Totals(Speeds):
    """Sums over many generations (a chat session, a server's life), with the same speeds as a
    Summary."""

    turns: int = 0
    stopped: int = 0  # cancelled before the end
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    decoded_tokens: int = 0
    prompt_s: float = 0.0
    gen_s: float = 0.0
    peak_memory_bytes: int = 0
    expert_cache: CacheStats | None = None

    def add(self, s: Summary) -> None:
        self.turns += 1
        self.stopped += s.finish_reason == "cancelled"
        self.prompt_tokens += s.prompt_tokens
        self.cached_tokens += s.cached_tokens
        self.generated_tokens += s.generated_tokens
        self.decoded_tokens += s.decoded_tokens
        self.prompt_s += s.prompt_s
        self.gen_s += s.gen_s
        self.peak_memory_bytes = max(self.peak_memory_bytes, s.peak_memory_bytes)
        if s.expert_cache is not None:
            self.expert_cache = self.expert_cache or CacheStats()
            for layer, counts in s.expert_cache.layers.items():
                self.expert_cache.layers.setdefault(layer, LayerStats()).add(counts)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, scope). On CUDA the allocator's peak since the request began ("request"); on the CPU
    the process's peak resident set ("process"): the OS keeps one per process and no request can
    reset it."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "request"
    try:
        import resource  # POSIX only
    except ImportError:  # Windows: psutil names the process's peak working set peak_wset
        import psutil

        info = psutil.Process().memory_info()
        return int(getattr(info, "peak_wset", info.rss)), "process"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak * (1 if sys.platform == "darwin" else 1024), "process"  # macOS: bytes; Linux: KiB


class Generator:
    """Owns the KV cache of one conversation; a new prompt that extends the cached tokens
    prefills only what is new."""

    def __init__(
        self,
        model: Qwen3MoeForCausalLM,
        tokenizer=None,
        ctx_size: int = DEFAULT_CTX_SIZE,
        prefill_chunk: int = PREFILL_CHUNK,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.ctx_size, self.prefill_chunk = ctx_size, prefill_chunk
        self.cache = model.new_cache(ctx_size)
        model.rope_tables(ctx_size)  # allocated once, before generation
        self.graph = decode_graph(model, self.cache)  # decode replayed as a CUDA graph, where it can be
        self._fed: list[int] = []  # tokens given to the model in order; the cache holds a prefix

    @property
    def cached(self) -> list[int]:
        """The tokens whose keys/values the cache holds. The cache's own length counts them: a step
        stopped before it stored its keys (Ctrl-C, a failed capture) does not count."""
        return self._fed[: self.cache.length]

    def reset(self) -> None:
        self.cache.reset()
        self._fed = []

    def _feed(self, tokens: list[int]) -> None:
        self._fed = self._fed[: self.cache.length] + tokens

    def _reuse_prefix(self, prompt: list[int]) -> int:
        n = 0
        for a, b in zip(self.cached, prompt, strict=False):
            if a != b:
                break
            n += 1
        n = min(n, len(prompt) - 1)  # the last prompt token is always run again for its logits
        self.cache.truncate(n)
        return n

    def prefill(self, tokens: list[int], cancel: Callable[[], bool] | None = None) -> torch.Tensor | None:
        """Run tokens after what the cache holds; return the last position's logits [V], or None
        when `cancel()` turned true between chunks."""
        if len(tokens) == 1 and self.graph is not None:
            self._feed(tokens)
            return self.graph(tokens[0])  # a view of the graph's output: read it before the next step
        device = self.model.input_device  # ids on the embedding's device: no copy back from the GPU
        logits = None
        for i in range(0, len(tokens), self.prefill_chunk):
            if cancel is not None and i and cancel():
                return None
            chunk = tokens[i : i + self.prefill_chunk]
            self._feed(chunk)
            logits = self.model(torch.tensor([chunk], device=device), cache=self.cache, last_only=True)
        return logits[0, -1]

    def run(self, prompt: list[int], params: SamplingParams, **kw) -> Summary:
        """Generate the whole reply; return its Summary."""
        *_, summary = self.stream(prompt, params, **kw)
        return summary

    def stream(
        self,
        prompt: list[int],
        params: SamplingParams,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        eos_ids: tuple[int, ...] | None = None,
        stop: list[str] | None = None,
        cancel: Callable[[], bool] | None = None,
        constraint: Constraint | None = None,
    ) -> Iterator[TokenRecord | Summary]:
        """Yield one TokenRecord per generated token, then the Summary. `cancel()` turning true
        ends the reply after the current step (or prefill chunk) with finish_reason "cancelled".
        Closing the iterator early also stops it, without a Summary. A `constraint` masks every
        token; its next mask is computed while the model runs."""
        if not prompt:
            raise UserError("The prompt is empty.")
        if len(prompt) >= self.ctx_size:
            raise UserError(
                f"The prompt has {len(prompt):,} tokens; the context holds {self.ctx_size:,}. "
                "Raise --ctx-size or shorten the prompt."
            )
        if max_tokens <= 0:
            raise UserError(f"max_tokens must be positive, got {max_tokens}.")
        if eos_ids is None:
            eos_ids = (
                tuple(self.tokenizer.eos_token_ids) if self.tokenizer else self.model.config.eos_token_id
            )
        device = self.model.device
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        s = Summary(prompt_tokens=len(prompt))
        counters: CacheStats | None = self.model.experts.stats
        before = counters.snapshot() if counters is not None else None
        decoder = self.tokenizer.stream_decoder() if self.tokenizer else None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)  # the peak of this request, not the process
        t0 = time.perf_counter()
        if constraint is not None:
            constraint.begin()
        s.cached_tokens = self._reuse_prefix(prompt)
        logits = self.prefill(prompt[s.cached_tokens :], cancel)
        _sync(device)
        t_prefill = time.perf_counter()
        s.prompt_s = t_prefill - t0
        generated: list[int] = []
        text = ""
        try:
            while True:
                if logits is None or (cancel is not None and cancel()):
                    s.finish_reason = "cancelled"
                    break
                seen = torch.tensor(generated, dtype=torch.long) if params.presence_penalty else None
                allowed = constraint.allowed() if constraint is not None else None
                token = sample(logits.cpu(), params, gen, seen, allowed)
                if token in eos_ids:
                    s.finish_reason = "stop"
                    break
                generated.append(token)
                piece = decoder.add(token) if decoder else ""
                text += piece
                yield TokenRecord(token, piece, len(generated) - 1, time.perf_counter() - t0)
                # a stop string can only end in the newest piece: look at the tail, not all text
                if stop and any(x in text[-(len(piece) + len(x)) :] for x in stop):
                    s.finish_reason = "stop"
                    break
                if len(generated) >= max_tokens or self.cache.length >= self.ctx_size:
                    s.finish_reason = "length"
                    break
                if constraint is not None:
                    constraint.advance(token)
                logits = self.prefill([token])
        finally:
            if constraint is not None:
                constraint.close()
            _sync(device)
            s.gen_s = time.perf_counter() - t_prefill
        s.generated_tokens = len(generated)
        s.token_ids = generated
        if decoder is not None:
            text += decoder.flush()
        s.text = _cut_at_stop(text, stop)
        s.peak_memory_bytes, s.peak_memory_scope = peak_memory(device)
        if counters is not None:
            s.expert_cache = counters.since(before)
        yield s


def _cut_at_stop(text: str, stop: list[str] | None) -> str:
    for x in stop or ():
        i = text.find(x)
        if i >= 0:
            text = text[:i]
    return text


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
