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

from quant import cpu_moe
from quant.kernels import KERNEL_ALIGN, is_aligned, kernel_pack_layout, qlinear, row_kernel
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
        self._row_kernels: dict[tuple[int, int, torch.dtype], tuple | None] = {}
        self._fused: tuple | None = None

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
        self.forget_views()

    def set_blob(self, layer: int, expert: int, blob: torch.Tensor) -> None:
        self.blobs[layer][expert].copy_(blob)

    def use_kernel_layout(self) -> None:
        """Once every blob is loaded: repack them in place for the kernels of their device (int4 on
        the CPU: quant/int4.py); the layout then says so. A no-op for other formats."""
        self.layout = kernel_pack_layout(self.layout, list(self.blobs.values()))
        self.forget_views()

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

    def forget_views(self) -> None:
        self._views.clear()
        self._row_kernels.clear()
        self._fused = None

    def one_token(
        self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """On the CPU, int4 experts in one call to quant.cpu_moe's operator once it is built (the
        same ops, in the same order, as the loop it replaces); a float32 token through it in bf16."""
        if x.dtype == torch.float32 and not x.is_cuda and self.fused_args() is not None:
            # a float32 model's decode token: the int4 kernels in bf16 (kernels.decode_in_bf16)
            bf16 = torch.bfloat16
            return self.one_token(layer, x.to(bf16), ids, weights.to(bf16)).to(x.dtype)
        if not x.is_cuda and x.dtype == torch.bfloat16 and ids.dtype == torch.int64:
            args = self.fused_args()
            if args is not None and cpu_moe.OPERATOR.ready():
                return cpu_moe.moe_int4_row(x.contiguous(), ids, weights, self.blobs[layer], *args)
        return super().one_token(layer, x, ids, weights)

    def fused_args(self) -> tuple | None:
        """(byte offsets, hidden, intermediate, group, kernel block) for quant.cpu_moe, or None where the experts
        are not int4 in the CPU kernel layout, one group size, every piece aligned for the kernel."""
        if self._fused is None:
            specs = [self.layout.specs.get(name) for name in ("gate_proj", "up_proj", "down_proj")]
            offsets = {(sl.name, sl.part): sl.offset for sl in self.layout}
            ok = (
                all(s is not None and s.fmt == "int4" and s.packing.startswith("cpu-") for s in specs)
                and len({s.blocksize for s in specs}) == 1
                and self.layout.nbytes % KERNEL_ALIGN == 0
                and self.config.num_experts_per_tok <= cpu_moe.MAX_PICKS
                and all(b.is_contiguous() for b in self.blobs.values())
                and all(is_aligned(b) and b.device.type == "cpu" for b in self.blobs.values())
                and all(o % KERNEL_ALIGN == 0 for o in offsets.values())
            )
            self._fused = (False,)
            if ok:
                parts = [
                    offsets[(name, part)]
                    for name in ("gate_proj", "up_proj", "down_proj")
                    for part in ("weight", "scale_zero")
                ]
                inter, hidden = specs[0].shape
                block = cpu_moe.kernel_block(specs[0].packing, hidden, inter)
                self._fused = (parts, hidden, inter, specs[0].blocksize, block)
        return None if self._fused == (False,) else self._fused

    def expert_forward(self, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1 and not x.is_cuda:  # a decode token: its kernels bound once per expert
            kernels = self.row_kernels(layer, expert, x.dtype)
            if kernels is not None:
                gate, up, down = kernels
                x = x.contiguous()
                return down(F.silu(gate(x)).mul_(up(x)))
        return quant_swiglu(x, self.qtensors(layer, expert))

    def row_kernels(self, layer: int, expert: int, dtype: torch.dtype) -> tuple | None:
        """gate, up and down of one expert as `row_kernel` calls, or None where one is not."""
        key = (layer, expert, dtype)
        if key not in self._row_kernels:
            q = self.qtensors(layer, expert)
            fns = tuple(row_kernel(q[name], dtype) for name in ("gate_proj", "up_proj", "down_proj"))
            self._row_kernels[key] = None if None in fns else fns
        return self._row_kernels[key]

    def grouped_weights(self, layer: int):
        from quant.moe_kernels import GroupedSpec

        blobs = self.blobs[layer]
        return blobs, blobs, GroupedSpec.from_layout(self.layout)

    def _apply(self, fn, recurse=True):  # .to(device) moves the blobs, which are not buffers
        for layer, blob in self.blobs.items():
            self.blobs[layer] = fn(blob)
        self.forget_views()
        return super()._apply(fn, recurse)


def quant_swiglu(x: torch.Tensor, q: dict) -> torch.Tensor:
    return qlinear(F.silu(qlinear(x, q["gate_proj"])) * qlinear(x, q["up_proj"]), q["down_proj"])
