"""CUDA-graph decode: the decode step (embedded token -> logits) captured per KV span and replayed
for every token; the prefill stays eager, sampling stays outside.

A decode step of the full model is ~48 × (attention + two grouped expert launches + norms) small
kernels: at batch 1 their launch overhead, not memory, bounds the speed. A graph replays them with
one launch from the host. `torch.cuda.CUDAGraph` is used rather than `torch.compile(mode=
"reduce-overhead")`: the step is already a few large kernels (nothing left for compile to fuse that
pays for minutes of compile at start-up), and capture takes about two eager steps.

What makes the step capturable: positions are a device tensor (RoPE, the KV write and the mask are
computed from it on the device), attention reads a fixed span of the preallocated cache through a
mask (fixed shapes), expert ids stay on the device (quant.moe_kernels), and nothing reads back to
the host. The token embedding lives in host RAM beside a GPU, so the looked-up row is copied into
the graph's input buffer before each replay.

Attention costs what the conversation holds, not the context: reading a 32K cache for every token
would move 3.2 GB a token, more than the 4-bit weights. So there is one graph per KV span (256, 512,
1024, ... keys, up to the context: `kv_bucket`), captured the first time a token needs it, and the
smallest span that holds the token's keys replays: a token reads fewer than twice its keys (at
least 256). A context of C tokens has at most log2(C / 256) + 1 graphs (8 at 32K, 10 at 128K), each
captured once for WARMUP_STEPS + 1 eager steps. The graphs share one memory pool (they never run
at once); each keeps its own logits output (`graph_bytes`, which the memory model counts).
"""

from __future__ import annotations

import os

import torch

from qwenlocal.model.config import Qwen3MoeConfig
from qwenlocal.model.kv_cache import KVCache
from qwenlocal.model.qwen3_moe import Qwen3MoeForCausalLM

WARMUP_STEPS = 2  # eager steps on a side stream before capture: allocator and Triton compile settle
KV_SPAN_MIN = 256  # the smallest span of keys a replayed step reads (llama.cpp pads its KV view to 256)


def kv_bucket(keys: int, max_len: int) -> int:
    """The span of stored keys a replayed step reads when `keys` are stored after it: the smallest
    of 256, 512, 1024, ... that holds them, and never past the cache (`max_len`)."""
    if not 0 < keys <= max_len:
        raise ValueError(f"a step with {keys} keys does not fit a cache of {max_len}")
    span = KV_SPAN_MIN
    while span < keys:
        span *= 2
    return min(span, max_len)


def kv_spans(max_len: int) -> list[int]:
    """Every span `kv_bucket` can give for a cache of `max_len` keys (one graph each, at most)."""
    spans = {kv_bucket(keys, max_len) for keys in (1, max_len)}
    span = KV_SPAN_MIN
    while span < max_len:
        spans.add(span)
        span *= 2
    return sorted(spans)


def graph_bytes(config: Qwen3MoeConfig, max_len: int) -> int:
    """Device memory the captured steps keep beside the model: each graph's logits output (fp32
    [vocab]) and, in their shared pool, one step's largest temporaries: the lm_head's 16-bit
    output and the attention scores (fp32, every head) over the widest span."""
    logits = config.vocab_size * 4
    pool = config.vocab_size * 2 + config.num_attention_heads * max_len * 4
    return len(kv_spans(max_len)) * logits + pool


def graphs_supported(model: Qwen3MoeForCausalLM) -> bool:
    """Resident grouped experts on CUDA (the offload cache keeps host bookkeeping per layer)."""
    if os.environ.get("QWENLOCAL_CUDA_GRAPHS", "1") == "0":
        return False
    experts = model.experts
    return (
        model.graph_decode
        and model.device.type == "cuda"
        and experts.moe == "grouped"
        and experts.slots_per_layer is None
        and experts.recorder is None
    )


class GraphDecoder:
    """decoder(token) -> logits [V] float32 for the token after what `cache` holds; advances it."""

    def __init__(self, model: Qwen3MoeForCausalLM, cache: KVCache):
        self.model, self.cache = model, cache
        device = model.device
        self.x = torch.zeros(1, 1, model.config.hidden_size, dtype=model.dtype, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}  # span -> its captured step
        self.logits: dict[int, torch.Tensor] = {}  # span -> that graph's output
        self.span = KV_SPAN_MIN  # the span of the last step
        self.pool = None  # the graphs' shared memory pool
        self.rope = None  # the tables the graphs read in place (kept even if the model makes new ones)

    @torch.inference_mode()
    def __call__(self, token: int) -> torch.Tensor:
        m, cache = self.model, self.cache
        if cache.length >= cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} tokens; it is full.")
        with torch.cuda.device(m.device):  # graphs, streams and pools on the model's card
            self.x.copy_(m.embed(torch.tensor([[token]], device=m.input_device)), non_blocking=True)
            self.pos.fill_(cache.length)
            self.span = kv_bucket(cache.length + 1, cache.max_len)
            if self.span not in self.graphs:
                self._capture(self.span)
            self.graphs[self.span].replay()
        cache.length += 1
        return self.logits[self.span][0, -1]

    def eager(self, span: int | None = None) -> torch.Tensor:
        """The step captured for `span` (default: the last one) run eagerly on the current inputs."""
        return self.model.step(self.x, self.pos, self.cache, None, span=span or self.span)

    def _capture(self, span: int) -> None:
        m = self.model
        self.rope = m.rope_tables(self.cache.max_len)  # built before capture: the graph reads it in place
        side = torch.cuda.Stream(m.device)
        side.wait_stream(torch.cuda.current_stream(m.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):  # each rewrites the same cache position with the same values
                self.eager(span)
        torch.cuda.current_stream(m.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.logits[span] = self.eager(span)
        self.pool = graph.pool()
        self.graphs[span] = graph


def decode_graph(model: Qwen3MoeForCausalLM, cache: KVCache) -> GraphDecoder | None:
    return GraphDecoder(model, cache) if graphs_supported(model) else None
