"""Expert offload: every expert in host RAM (pinned beside a GPU), a fixed set of expert slots on
the compute device, a per-layer cache policy, copies on a side stream, and counters.

A layer computes the experts already resident while the missing ones are copied; copies that
do not fit the layer's slots at once (a long prefill touches nearly every expert) stream through
them in waves. Outputs are summed in expert-id order, so offloaded results equal resident ones
bit for bit.

With moe="grouped" a decode token's layer reads its k expert ids back once, copies the misses as
one batch, and computes all k (hits and misses) with the grouped kernels through a per-layer slot
table (expert -> slot) held on the device.

int4 experts in the host store are kept in this CPU's int4 kernel layout (quant/int4.py), whatever
the device: a cold expert computed on the CPU (cold.py) runs torch's int4 kernel on them as they
are, and a slot gets the same bytes, which the device's kernels read too (quant/moe_kernels.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from quant.pack import unpack
from qwenlocal.experts.cache_policy import DEFAULT_CACHE_POLICY, make_policy
from qwenlocal.experts.cache_stats import CacheStats, LayerStats
from qwenlocal.experts.pinned import host_empty
from qwenlocal.experts.store import QuantExperts, group_by_expert, quant_swiglu
from qwenlocal.model.config import Qwen3MoeConfig

# Off until it is shown to help: on the benchmark model the guess (the next layer's router on this
# layer's output) found 29 % of the picks, and its copies evicted useful experts (BENCHMARKS.md).
DEFAULT_PREFETCH = False


class CopyMisses:
    """How a layer serves the experts without a slot: this one copies every miss into a slot (in
    waves when they outnumber the layer's slots). cold.py's strategies compute some or all of them
    on the CPU from the host store instead, started before the copies and finished after them."""

    copies_only = True  # every expert gets a slot: the grouped kernels may read them through the slot table

    def split(
        self, layer: int, x: torch.Tensor, misses: list[int], by_expert: dict
    ) -> tuple[list[int], list[int]]:
        """(computed elsewhere, copied) among the layer's misses, each in the order to run them."""
        return [], misses

    def start(self, layer: int, x: torch.Tensor, elsewhere: list[int], by_expert: dict) -> object:
        """Start computing `elsewhere`, while the device computes the hits and copies."""
        return None

    def finish(self, layer: int, x: torch.Tensor, started: object, by_expert: dict, outputs: dict) -> None:
        """Put the outputs of what `start` began into `outputs` (weighted, on x's device)."""


class OffloadedExperts(QuantExperts):
    """QuantExperts whose blobs live in host RAM; `slots_per_layer` of each layer's experts sit in
    a preallocated device buffer, chosen by a per-layer policy (`DEFAULT_CACHE_POLICY`, LFU with
    decay)."""

    def __init__(
        self,
        config: Qwen3MoeConfig,
        layout,
        slots_per_layer: int,
        device: torch.device | str,
        policy: str = DEFAULT_CACHE_POLICY,
        prefetch: bool = DEFAULT_PREFETCH,
    ):
        super().__init__(config, layout)  # self.blobs: the host store, allocated by allocate()
        if slots_per_layer < config.num_experts_per_tok:
            raise ValueError(f"each layer needs at least {config.num_experts_per_tok} slots")
        self.slots_per_layer = min(slots_per_layer, config.num_experts)
        self.compute_device = torch.device(device)
        self.policy_name = policy
        self.prefetch_enabled = prefetch
        self.layer_index = {layer: i for i, layer in enumerate(config.moe_layers)}
        self.stats = CacheStats({layer: LayerStats() for layer in config.moe_layers})
        self.slot_buf: torch.Tensor | None = None
        self.slot_table: torch.Tensor | None = None  # [MoE layer, expert] -> slot, on the device
        self.miss_strategy: CopyMisses = CopyMisses()
        self.reset_cache()
        self.copy_stream = None
        self._router: Callable[[int, torch.Tensor], torch.Tensor] | None = None
        self._guess: dict[int, set[int]] = {}
        self._prefetched: dict[int, set[int]] = {}  # layer -> experts the prefetcher copied
        self._waits: list[tuple[int, object, object]] = []  # (layer, start, end) CUDA events

    # -- memory ----------------------------------------------------------------------------------
    def allocate(self, device=None, pin: bool | None = None) -> None:
        """The host store (pinned when CUDA is present) and the device slots, once, up front."""
        cuda = self.compute_device.type == "cuda"
        super().allocate("cpu", pin=cuda if pin is None else pin)
        n = self.slots_per_layer * len(self.config.moe_layers)
        self.slot_buf = torch.empty(n, self.layout.nbytes, dtype=torch.uint8, device=self.compute_device)
        if cuda:
            self.copy_stream = torch.cuda.Stream(self.compute_device)
        # the grouped path's batch copy: misses gathered on the host, moved in one transfer
        k, nbytes = self.config.num_experts_per_tok, self.layout.nbytes
        self.staging = host_empty((k, nbytes), pin=cuda if pin is None else pin)
        self.staging_dev = torch.empty(k, nbytes, dtype=torch.uint8, device=self.compute_device)
        shape = (len(self.config.moe_layers), self.config.num_experts)
        self.slot_table = torch.zeros(shape, dtype=torch.int64, device=self.compute_device)
        self._slot_views: dict[int, dict] = {}

    def reset_cache(self) -> None:
        self.policies = {
            layer: make_policy(self.policy_name, self.slots_per_layer) for layer in self.config.moe_layers
        }
        # (layer, expert) -> slot index in slot_buf; each layer owns a contiguous range of slots
        self.slot_of: dict[tuple[int, int], int] = {}
        self.free = {
            layer: list(range(i * self.slots_per_layer, (i + 1) * self.slots_per_layer))[::-1]
            for layer, i in ((layer, self.layer_index[layer]) for layer in self.config.moe_layers)
        }
        self._pending: dict[tuple[int, int], object] = {}  # (layer, expert) -> its copy's CUDA event

    @property
    def device_nbytes(self) -> int:
        return 0 if self.slot_buf is None else self.slot_buf.numel()

    def held(self) -> Iterator[tuple[str, torch.Tensor]]:
        if self.slot_buf is not None:
            yield "experts", self.slot_buf
        for blob in self.blobs.values():
            yield "expert_store", blob

    def _apply(self, fn, recurse=True):  # the store stays on the host; slots are placed at allocate()
        return torch.nn.Module._apply(self, fn, recurse)

    def use_kernel_layout(self) -> None:
        """Once every blob is loaded: the host store's int4 in the CPU's kernel layout (see the
        module docstring); slots filled before are let go, since they hold the old layout."""
        super().use_kernel_layout()
        self._slot_views.clear()
        self.reset_cache()

    def slot_qtensors(self, slot: int) -> dict:
        views = self._slot_views.get(slot)
        if views is None:
            views = self._slot_views[slot] = unpack(self.slot_buf[slot], self.layout)
        return views

    # -- moving experts ----------------------------------------------------------------------------
    def _take_slot(self, layer: int, expert: int, protect: set[int]) -> int:
        """A slot for `expert` in its layer: a free one, or the one the policy evicts."""
        evicted = self.policies[layer].admit(expert, protect=protect)
        if evicted is not None:
            slot = self.slot_of.pop((layer, evicted))
            self.stats.layers[layer].evictions += 1
        else:
            slot = self.free[layer].pop()
        self.slot_of[(layer, expert)] = slot
        return slot

    def _load(self, layer: int, expert: int, protect: set[int]) -> tuple[int, object]:
        """Give `expert` a slot in its layer (evicting by policy) and start its copy."""
        stats = self.stats.layers[layer]
        slot = self._take_slot(layer, expert, protect)
        if self.slot_table is not None:
            self.slot_table[self.layer_index[layer], expert] = slot
        src, dst = self.blobs[layer][expert], self.slot_buf[slot]
        stats.bytes_copied += self.layout.nbytes
        if self.copy_stream is None:  # the computation waits for the whole copy
            t = time.perf_counter()
            dst.copy_(src)
            stats.wait_s += time.perf_counter() - t
            return slot, None
        # the copy must not overwrite a slot the compute stream still reads
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.compute_device))
        with torch.cuda.stream(self.copy_stream):
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        self._pending[(layer, expert)] = event
        return slot, event

    def _slot_of(self, layer: int, expert: int) -> int:
        """The expert's slot, once the compute stream may read it: a copy still in flight (this
        layer's, a prefetch's or a promotion's) is waited for on the device."""
        self._wait(layer, self._pending.pop((layer, expert), None))
        return self.slot_of[(layer, expert)]

    def _wait(self, layer: int, event) -> None:
        """Make the compute stream wait for a copy; time the stall on the device."""
        if event is None:
            return  # the copy ran synchronously in _load, which timed it
        stream = torch.cuda.current_stream(self.compute_device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        stream.wait_event(event)
        end.record(stream)
        self._waits.append((layer, start, end))

    def settle_waits(self) -> None:
        """Add the stalls whose end the device has reached to `wait_s`, without synchronising
        (a stall still in flight is added by a later call)."""
        pending = []
        for layer, start, end in self._waits:
            if end.query():
                self.stats.layers[layer].wait_s += start.elapsed_time(end) / 1e3
            else:
                pending.append((layer, start, end))
        self._waits = pending

    # -- forward -------------------------------------------------------------------------------------
    def grouped_weights(self, layer: int):
        return self.slot_buf, self.slot_buf, super().grouped_weights(layer)[2]

    def forward(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.miss_strategy.copies_only and self.use_grouped(x):
            needed = ids.unique().tolist()  # the layer's one host read
            if len(needed) <= self.slots_per_layer:
                self.record(layer, ids)
                self._load_batch(layer, needed)
                rows = self.slot_table[self.layer_index[layer]][ids]
                return self.grouped(layer, x, ids, weights, rows=rows)
        return self._forward_loop(layer, x, ids, weights)

    def _load_batch(self, layer: int, needed: list[int]) -> None:
        """Give every needed expert a slot; copy the misses host -> staging -> slots as one batch."""
        _, misses = self._lookup(layer, needed, decode=True)
        if not misses:
            return
        protect = set(needed)
        slots = [self._take_slot(layer, e, protect) for e in misses]
        self.stats.layers[layer].bytes_copied += len(misses) * self.layout.nbytes
        dev, table = self.compute_device, self.slot_table[self.layer_index[layer]]
        k = self.staging.shape[0]
        for i in range(0, len(misses), k):  # a decode token's misses fit one batch
            chunk, to = misses[i : i + k], slots[i : i + k]
            n = len(chunk)
            # the staging buffer is free again: this layer's host read waited for the stream, which
            # had finished the previous transfer
            torch.index_select(self.blobs[layer], 0, torch.tensor(chunk), out=self.staging[:n])
            self.staging_dev[:n].copy_(self.staging[:n], non_blocking=True)
            self.slot_buf.index_copy_(0, torch.tensor(to, device=dev), self.staging_dev[:n])
            table.index_copy_(0, torch.tensor(chunk, device=dev), torch.tensor(to, device=dev))
            if i + k < len(misses) and dev.type == "cuda":
                torch.cuda.current_stream(dev).synchronize()  # before the staging buffer is refilled

    def _lookup(self, layer: int, needed: list[int], decode: bool) -> tuple[list[int], list[int]]:
        """The layer's hits (touched) and misses among `needed`, counted with the prefetch figures."""
        if self._waits:
            self.settle_waits()
        policy, stats = self.policies[layer], self.stats.layers[layer]
        prefetched = self._prefetched.pop(layer, set())
        stats.prefetch_useful += len(prefetched.intersection(needed))
        for e in prefetched:  # a prefetched slot may be read once its copy has landed (a wait on the device)
            self._wait(layer, self._pending.pop((layer, e), None))
        guess = self._guess.pop(layer, None)
        if guess is not None and decode:
            stats.predicted += len(guess & set(needed))
            stats.actual += len(needed)
        hits = [e for e in needed if e in policy]
        for e in hits:
            policy.touch(e)
        misses = [e for e in needed if e not in policy]
        stats.hits += len(hits)
        stats.misses += len(misses)
        return hits, misses

    def _forward_loop(
        self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """Hits from their slots; misses as `self.miss_strategy` decides: copied into slots (in waves
        when they outnumber them) or computed elsewhere at the same time."""
        self.record(layer, ids)
        groups = list(group_by_expert(ids, weights))
        by_expert = {e: (t, w) for e, t, w in groups}
        hits, misses = self._lookup(layer, list(by_expert), x.shape[0] == 1)
        elsewhere, copied = self.miss_strategy.split(layer, x, misses, by_expert)
        started = self.miss_strategy.start(layer, x, elsewhere, by_expert) if elsewhere else None
        # a prefill: keep the experts of the last tokens resident at the end (loaded last)
        if len(copied) > 1 and x.shape[0] > 1:
            copied.sort(key=lambda e: int(by_expert[e][0].max()))
        outputs: dict[int, torch.Tensor] = {}

        def compute(e: int) -> None:
            t, w = by_expert[e]
            outputs[e] = quant_swiglu(x[t], self.slot_qtensors(self._slot_of(layer, e))) * w[:, None]

        # copies into slots that no hit holds start first; the device computes the hits meanwhile;
        # the rest stream through the layer's slots in waves
        n, room = self.slots_per_layer, self.slots_per_layer - len(hits)
        waves = [copied[:room]] + [copied[i : i + n] for i in range(room, len(copied), n)]
        protect = set(hits) | set(waves[0])
        for e in waves[0]:
            self._load(layer, e, protect)
        for e in hits:
            compute(e)
        for i, wave in enumerate(waves):
            if i:
                for e in wave:
                    self._load(layer, e, set(wave))
            for e in wave:
                compute(e)
        if elsewhere:
            self.miss_strategy.finish(layer, x, started, by_expert, outputs)
        out = torch.zeros_like(x)
        for e, t, _ in groups:  # expert-id order: the same sums as the resident model
            out.index_add_(0, t, outputs[e])
        return out

    # -- prefetch ------------------------------------------------------------------------------------
    def attach_router(self, router: Callable[[int, torch.Tensor], torch.Tensor]) -> None:
        """router(layer, hidden [N, H]) -> expert ids [N, k] of that layer's router."""
        self._router = router

    def prefetch(self, layer: int, hidden: torch.Tensor) -> None:
        """Guess `layer`'s experts from the previous layer's output and start their copies."""
        # off: no guess at all, since reading it back costs a device synchronisation per layer
        if not self.prefetch_enabled or self._router is None or layer not in self.policies:
            return
        if hidden.shape[0] * hidden.shape[1] != 1:
            return
        guess = set(self._router(layer, hidden.reshape(-1, hidden.shape[-1]))[0].tolist())
        self._guess[layer] = guess
        policy = self.policies[layer]
        copied = self._prefetched[layer] = set()
        for e in guess:
            if e not in policy:
                self._load(layer, e, guess)
                copied.add(e)
        self.stats.layers[layer].prefetched += len(copied)


def expert_router(model) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """The prefetch guess: layer L's router applied to layer L-1's output, after L's norm."""

    def route(layer: int, hidden: torch.Tensor) -> torch.Tensor:
        block = model.model.layers[layer]
        normed = block.post_attention_layernorm(hidden)
        return torch.topk(F.linear(normed, block.mlp.gate.weight), model.config.num_experts_per_tok, dim=-1)[
            1
        ]

    return route
