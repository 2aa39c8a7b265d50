"""CUDA-graph decode: the decode step (embedded token -> logits) captured once per KV cache and
replayed for every token; the prefill stays eager, sampling stays outside.

A decode step of the full model is ~48 × (attention + two grouped expert launches + norms) small
kernels: at batch 1 their launch overhead, not memory, bounds the speed. A graph replays them with
one launch from the host. `torch.cuda.CUDAGraph` is used rather than `torch.compile(mode=
"reduce-overhead")`: the step is already a few large kernels (nothing left for compile to fuse that
pays for minutes of compile at start-up), and capture takes about two eager steps.

What makes the step capturable: positions are a device tensor (RoPE, the KV write and the mask are
computed from it on the device), attention reads the whole preallocated cache through a mask (fixed
shapes), expert ids stay on the device (quant.moe_kernels), and nothing reads back to the host. The
token embedding lives in host RAM beside a GPU, so the looked-up row is copied into the graph's
input buffer before each replay.
"""

from __future__ import annotations

import os

import torch

from .kv_cache import KVCache
from .model import Qwen3MoeForCausalLM

WARMUP_STEPS = 2  # eager steps on a side stream before capture: allocator and Triton compile settle


def graphs_supported(model: Qwen3MoeForCausalLM) -> bool:
    """Resident grouped experts on CUDA (the offload cache keeps host bookkeeping per layer)."""
    if os.environ.get("QWENLOCAL_CUDA_GRAPHS", "1") == "0":
        return False
    experts = model.experts
    return (
        model.device.type == "cuda"
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
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    @torch.inference_mode()
    def __call__(self, token: int) -> torch.Tensor:
        m, cache = self.model, self.cache
        if cache.length >= cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} tokens; it is full.")
        self.x.copy_(m.embed(torch.tensor([[token]], device=m.input_device)), non_blocking=True)
        self.pos.fill_(cache.length)
        if self.graph is None:
            self._capture()
        self.graph.replay()
        cache.length += 1
        return self.logits[0, -1]

    def eager(self) -> torch.Tensor:
        """The captured step run eagerly on the current inputs (for tests)."""
        return self.model.step(self.x, self.pos, self.cache, None)

    def _capture(self) -> None:
        m = self.model
        m.rope_tables(self.cache.max_len)  # built before capture: the graph reads it in place
        side = torch.cuda.Stream(m.device)
        side.wait_stream(torch.cuda.current_stream(m.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):  # each rewrites the same cache position with the same values
                self.eager()
        torch.cuda.current_stream(m.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self.eager()
        self.graph = graph


def decode_graph(model: Qwen3MoeForCausalLM, cache: KVCache) -> GraphDecoder | None:
    return GraphDecoder(model, cache) if graphs_supported(model) else None
