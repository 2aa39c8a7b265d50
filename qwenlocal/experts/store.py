"""How the model reaches expert weights: one call per MoE layer, whatever holds the weights.

`Experts` groups the routed tokens by expert and calls `expert_forward` for each expert that
was hit, in increasing id order ("loop"); subclasses decide where the weights live (stacked 16-bit
tensors here; quantized blobs and the GPU expert cache elsewhere). With `moe = "grouped"` a decode
token's k experts go through quant.moe_kernels in two launches instead, the ids never leaving the
device (`grouped_weights` says where a storage keeps them).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from quant.kernels import kernel_pack_layout, qlinear
from quant.pack import unpack
from qwenlocal.experts.cache_stats import CacheStats
from qwenlocal.experts.pinned import host_empty
from qwenlocal.model.config import Qwen3MoeConfig


def group_by_expert(
    ids: torch.Tensor, weights: torch.Tensor
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """ids, weights [N, k] -> (expert, token rows [n], their routing weights [n]) per expert hit,
    in increasing expert order. No loop over experts that no token picked."""
    n, k = ids.shape
    flat = ids.flatten()
    if n == 1:  # decode: k distinct experts, one token
        order = flat.argsort()
        for e, w in zip(flat[order].tolist(), weights.flatten()[order], strict=True):
            yield e, ids.new_zeros(1), w.view(1)
        return
    order = flat.argsort(stable=True)
    sorted_ids = flat[order].tolist()
    tokens, sorted_w = order // k, weights.flatten()[order]
    start = 0
    while start < len(sorted_ids):
        e = sorted_ids[start]
        end = start + 1
        while end < len(sorted_ids) and sorted_ids[end] == e:
            end += 1
        yield e, tokens[start:end], sorted_w[start:end]
        start = end


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) with gate and up stacked as gate_up [2I, H]."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


MOE_MODES = ("auto", "grouped", "loop")


class Experts(nn.Module):
    """All MoE layers' experts. Call: experts(layer, x [N, H], ids [N, k], weights [N, k]) -> [N, H].

    What the rest of the program asks of any storage: the attributes below, `prefetch` and `held`.
    A storage whose experts all sit on the compute device answers with these defaults; an expert
    cache (offload.py) overrides them."""

    slots_per_layer: int | None = None  # device slots per MoE layer; None: every expert is resident
    policy_name: str | None = None  # the cache's eviction policy
    stats: CacheStats | None = None  # the cache's counters since the load

    def __init__(self, config: Qwen3MoeConfig):
        super().__init__()
        self.config = config
        self.recorder: RoutingRecorder | None = None
        self.moe = "loop"  # or "grouped" (set by the loader from load_model(moe=...))

    def prefetch(self, layer: int, hidden: torch.Tensor) -> None:
        """Called before `layer` runs on one decode token, with its input: a cache may start copying
        the experts it guesses. Nothing to do when every expert is resident."""

    def held(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The tensors the storage holds besides its parameters and buffers, each with its component
        in the memory report ("experts", or "expert_store" for the host store behind a cache)."""
        return iter(())

    def record(self, layer: int, ids: torch.Tensor) -> None:
        if self.recorder is not None:
            self.recorder.add(layer, ids)

    def end_step(self) -> None:
        """Called by the model after each forward: flushes the routing of its tokens."""
        if self.recorder is not None:
            self.recorder.flush()

    def expert_forward(self, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError  # each storage defines it

    def grouped_weights(self, layer: int):  # -> (gate_up buffer, down buffer, GroupedSpec)
        raise NotImplementedError  # storages that support the grouped kernels define it

    def use_grouped(self, x: torch.Tensor) -> bool:
        from quant.moe_kernels import MAX_GROUPED_TOKENS

        return self.moe == "grouped" and x.shape[0] <= MAX_GROUPED_TOKENS

    def grouped(
        self,
        layer: int,
        x: torch.Tensor,
        ids: torch.Tensor,
        weights: torch.Tensor,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """All k picks of each token in two kernel launches; `rows` (default: the ids) index the buffers."""
        from quant.moe_kernels import grouped_swiglu

        ids, order = ids.sort(dim=-1)  # expert-id order: the loop path's order of summation
        rows = ids if rows is None else rows.gather(-1, order)
        return grouped_swiglu(x, rows, weights.gather(-1, order), *self.grouped_weights(layer))

    def forward(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        self.record(layer, ids)
        if self.use_grouped(x):
            return self.grouped(layer, x, ids, weights)
        if x.shape[0] == 1:
            return self.one_token(layer, x, ids[0], weights[0])
        out = torch.zeros_like(x)
        for expert, tokens, w in group_by_expert(ids, weights):
            y = self.expert_forward(layer, expert, x[tokens])
            out.index_add_(0, tokens, y * w[:, None])
        return out

    def one_token(
        self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """A decode token: its k experts' outputs, weighted and summed in expert-id order, as
        `forward` sums a batch (the same additions, without its gathers and scatters)."""
        order = ids.argsort()
        out = None
        for expert, w in zip(ids[order].tolist(), weights[order].unbind(), strict=True):
            y = self.expert_forward(layer, expert, x) * w
            out = y if out is None else out.add_(y)
        return out


class RoutingRecorder:
    """Writes the experts each token picked in every MoE layer (`--record-routing FILE`), one
    JSON line per token, for offline cache-policy studies (bench/cache_sim.py reads it)."""

    def __init__(self, path, config: Qwen3MoeConfig):
        from qwenlocal.planning.routing_trace import TraceWriter

        self.writer = TraceWriter(path)
        self.layers = config.moe_layers
        self.step: dict[int, list[list[int]]] = {}
        self.tokens = 0

    def add(self, layer: int, ids: torch.Tensor) -> None:
        self.step[layer] = ids.tolist()

    def flush(self) -> None:
        if not self.step:
            return
        n = len(next(iter(self.step.values())))
        for i in range(n):
            self.writer.add([self.step[layer][i] for layer in self.layers])
        self.tokens += n
        self.step = {}

    def close(self) -> None:
        self.writer.close()


class DenseExperts(Experts):
    """16/32-bit experts, stacked per layer: gate_up [E, 2I, H] and down [E, H, I]."""

    def __init__(self, config: Qwen3MoeConfig):
        super().__init__(config)
        e, h, i = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up = nn.ParameterDict()
        self.down = nn.ParameterDict()
        for layer in config.moe_layers:
            self.gate_up[str(layer)] = nn.Parameter(torch.empty(e, 2 * i, h), requires_grad=False)
            self.down[str(layer)] = nn.Parameter(torch.empty(e, h, i), requires_grad=False)

    def expert_forward(self, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        key = str(layer)
        return swiglu(x, self.gate_up[key][expert], self.down[key][expert])

    def grouped_weights(self, layer: int):
        from quant.moe_kernels import GroupedSpec

        c, key = self.config, str(layer)
        return self.gate_up[key], self.down[key], GroupedSpec.dense(c.hidden_size, c.moe_intermediate_size)

    def allocate(self, device: torch.device | str, dtype: torch.dtype) -> None:
        for d in (self.gate_up, self.down):
            for key, p in d.items():
                d[key] = nn.Parameter(torch.empty(p.shape, device=device, dtype=dtype), requires_grad=False)

    def set_expert(self, layer: int, expert: int, proj: str, weight: torch.Tensor) -> None:
        i = self.config.moe_intermediate_size
        key = str(layer)
        if proj == "gate_proj":
            self.gate_up[key][expert, :i].copy_(weight)
        elif proj == "up_proj":
            self.gate_up[key][expert, i:].copy_(weight)
        else:
            self.down[key][expert].copy_(weight)


class QuantExperts(Experts):
    """Quantized experts: per layer one uint8 tensor [E, blob bytes]; row e is expert e's packed
    gate, up and down projections with their statistics (quant.pack layout)."""

    def __init__(self, config: Qwen3MoeConfig, layout):
        super().__init__(config)
        self.layout = layout
        self.blobs: dict[int, torch.Tensor] = {
            layer: torch.empty(config.num_experts, layout.nbytes, dtype=torch.uint8)
            for layer in config.moe_layers
        }
        self._views: dict[tuple[int, int], dict] = {}

    def allocate(self, device: torch.device | str, pin: bool = False) -> None:
        """Every layer's blobs on `device`; pinned host blobs are slices of one page-locked
        region of exactly their size (torch's pinned allocator would round each to a power of 2)."""
        shapes = {layer: blob.shape for layer, blob in self.blobs.items()}
        if pin:
            region = host_empty((sum(math.prod(s) for s in shapes.values()),), pin=True)
            offset = 0
            for layer, shape in shapes.items():
                self.blobs[layer] = region[offset : offset + math.prod(shape)].view(shape)
                offset += math.prod(shape)
        else:
            for layer, shape in shapes.items():
                self.blobs[layer] = torch.empty(shape, dtype=torch.uint8, device=device)
        self._views.clear()

    def set_blob(self, layer: int, expert: int, blob: torch.Tensor) -> None:
        self.blobs[layer][expert].copy_(blob)

    def use_kernel_layout(self) -> None:
        """Once every blob is loaded: repack them in place for the kernels of their device (int4 on
        the CPU: quant/int4.py); the layout then says so. A no-op for other formats."""
        self.layout = kernel_pack_layout(self.layout, list(self.blobs.values()))
        self._views.clear()

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self.blobs.values())

    def held(self) -> Iterator[tuple[str, torch.Tensor]]:
        for blob in self.blobs.values():
            yield "experts", blob

    def qtensors(self, layer: int, expert: int) -> dict:
        key = (layer, expert)
        views = self._views.get(key)
        if views is None:
            views = self._views[key] = unpack(self.blobs[layer][expert], self.layout)
        return views

    def expert_forward(self, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        return quant_swiglu(x, self.qtensors(layer, expert))

    def grouped_weights(self, layer: int):
        from quant.moe_kernels import GroupedSpec

        blobs = self.blobs[layer]
        return blobs, blobs, GroupedSpec.from_layout(self.layout)

    def _apply(self, fn, recurse=True):  # .to(device) moves the blobs, which are not buffers
        for layer, blob in self.blobs.items():
            self.blobs[layer] = fn(blob)
        self._views.clear()
        return super()._apply(fn, recurse)


def quant_swiglu(x: torch.Tensor, q: dict) -> torch.Tensor:
    return qlinear(F.silu(qlinear(x, q["gate_proj"])) * qlinear(x, q["up_proj"]), q["down_proj"])
