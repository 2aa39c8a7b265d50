"""Cold experts computed on the CPU (`--cold-experts cpu|auto`): an expert without a device slot
runs from the host store in a worker pool while the device computes the hits. At batch 1 shipping
a token's hidden state (4 KB) beats copying a 2.4 MB expert over PCIe (Fiddler, ICLR 2025).

`cpu` computes every miss on the CPU. `auto` splits each layer's misses between the CPU pool and
copies, fewest tokens first, from times measured at start-up and kept current (an EMA): decode
shares its misses between both channels, and a long prefill copies its busy experts in waves while
the CPU takes the rare ones. The cache keeps learning either way: an expert the CPU keeps
computing is promoted into a slot, its copy on the side stream, and no token waits for it. Outputs
are summed in expert-id order, as in offload.py, so they equal the resident model's wherever the
CPU and the device run the same kernels (in the tests the device is the CPU).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial

import torch

from quant.threads import set_thread_count
from qwenlocal.errors import UserError
from qwenlocal.experts.offload import CopyMisses, OffloadedExperts
from qwenlocal.experts.store import quant_swiglu

COLD_MODES = ("copy", "cpu", "auto")
DEFAULT_COLD_EXPERTS = "copy"  # today's cache, until the GPU benchmark shows `auto` ahead on every card
PROMOTE_AFTER = 2.0  # decayed CPU computations that earn an expert a slot
PROMOTE_DECAY = 0.9  # per forward of the layer: an expert seen twice within ~10 tokens is hot
PROMOTE_PER_STEP = 2  # evicting promotions per layer and forward, so copies never queue up behind decode
EMA = 0.2  # weight of a new timing in the running estimate
MAX_WORKERS = 8  # at most top-k misses per token and layer: more workers only split the cores thinner
CALIBRATE_TOKENS = 16


def parse_cold_experts(mode: str) -> str:
    if mode not in COLD_MODES:
        raise UserError(f"Unknown --cold-experts {mode!r}; choose copy, cpu or auto.")
    return mode


@dataclass
class Timing:
    """Measured seconds: one expert copied into a slot; one expert on one CPU worker for a
    single token, and for each further token."""

    copy_s: float
    cpu_s: float
    cpu_token_s: float

    def cpu_cost(self, tokens: int) -> float:
        return self.cpu_s + self.cpu_token_s * (tokens - 1)


def split_misses(tokens: Sequence[int], timing: Timing, workers: int) -> int:
    """How many of a layer's misses (their token counts) to compute on the CPU, taking those with
    fewest tokens first; the rest are copied. The pool and the copies run side by side, so the
    layer waits for the later of the two: take the split that makes it earliest (ties: fewer copies).
    """
    order = sorted(tokens)
    n = len(order)
    best_k, best = 0, n * timing.copy_s
    total = 0.0
    for k, tok in enumerate(order, 1):
        cost = timing.cpu_cost(tok)
        total += cost
        cpu = max(total / workers, cost)  # the pool's makespan: sorted, so `cost` is the longest job
        t = max(cpu, (n - k) * timing.copy_s)
        if t <= best:
            best_k, best = k, t
    return best_k


def should_promote(count: float, free_slot: bool) -> bool:
    """A CPU-computed expert takes a free slot at once, and evicts another once it is hot."""
    return free_slot or count >= PROMOTE_AFTER


def default_workers(device: torch.device) -> int:
    # on a CPU device the "GPU" side is the same cores: one worker keeps torch's own threads
    if device.type != "cuda":
        return 1
    return max(1, min(MAX_WORKERS, (os.cpu_count() or 2) // 2))


class CpuMisses(CopyMisses):
    """`cpu`: every miss is computed on the CPU from the host store, fewest tokens first; the
    experts the CPU keeps computing are promoted into slots."""

    copies_only = False

    def __init__(self, experts: ColdExperts):
        self.experts = experts

    def split(
        self, layer: int, x: torch.Tensor, misses: list[int], by_expert: dict
    ) -> tuple[list[int], list[int]]:
        order = sorted(misses, key=lambda e: by_expert[e][0].numel())
        k = self.on_cpu(layer, x, [by_expert[e][0].numel() for e in order])
        return order[:k], order[k:]

    def on_cpu(self, layer: int, x: torch.Tensor, tokens: list[int]) -> int:
        """How many of the misses (their token counts, ascending) the CPU computes."""
        return len(tokens)

    def start(self, layer: int, x: torch.Tensor, elsewhere: list[int], by_expert: dict) -> object:
        self.experts.stats.layers[layer].cpu_computed += len(elsewhere)
        return self.experts.start_cpu(layer, x, elsewhere, by_expert)

    def finish(self, layer: int, x: torch.Tensor, started: object, by_expert: dict, outputs: dict) -> None:
        self.experts.finish_cpu(layer, started, by_expert, outputs, x.device)
        _, jobs = started
        self.experts.promote(layer, [e for e, _ in jobs], set(by_expert))


class SplitMisses(CpuMisses):
    """`auto`: the misses split between the CPU and copies by the measured times (`split_misses`)."""

    def on_cpu(self, layer: int, x: torch.Tensor, tokens: list[int]) -> int:
        ex = self.experts
        if ex.timing is None:
            ex.timing = ex.calibrate(layer, x)
        return split_misses(tokens, ex.timing, ex.workers) if tokens else 0


MISS_STRATEGIES = {"copy": lambda experts: CopyMisses(), "cpu": CpuMisses, "auto": SplitMisses}


class ColdExperts(OffloadedExperts):
    """OffloadedExperts whose misses run on the CPU (`cpu`) or are split between the CPU and
    copies by measured times (`auto`)."""

    def __init__(self, *args, mode: str = "cpu", workers: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.mode = parse_cold_experts(mode)
        self.miss_strategy = MISS_STRATEGIES[self.mode](self)
        self.timing: Timing | None = None
        self._pool: ThreadPoolExecutor | None = None
        self.workers = workers or default_workers(self.compute_device)

    def reset_cache(self) -> None:
        super().reset_cache()
        self._heat: dict[int, dict[int, tuple[float, int]]] = {layer: {} for layer in self.config.moe_layers}
        self._clock = dict.fromkeys(self.config.moe_layers, 0)

    # -- the CPU pool -------------------------------------------------------------------------------
    def set_workers(self, workers: int) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        self.workers = workers

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            threads = max(1, (os.cpu_count() or 1) // self.workers)
            # split the cores between the workers (where the count is per thread), but leave them
            # alone when the device is the CPU (the tests, and one worker)
            init = partial(set_thread_count, threads) if self.compute_device.type == "cuda" else None
            self._pool = ThreadPoolExecutor(self.workers, "cold-expert", initializer=init)
        return self._pool

    def _cpu_expert(self, layer: int, expert: int, x: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        t = time.perf_counter()
        with torch.no_grad():  # grad mode is per thread
            y = quant_swiglu(x, self.qtensors(layer, expert))
        end = time.perf_counter()
        return y, end - t, end

    def start_cpu(self, layer: int, x: torch.Tensor, cold: list[int], by_expert: dict):
        host = x.to("cpu")  # decode: one row, 4 KB at the real shape
        if x.shape[0] == 1:
            rows = [host] * len(cold)
        else:  # each expert's token rows, read back in one transfer
            index = torch.cat([by_expert[e][0] for e in cold]).to("cpu")
            rows = [host[t] for t in index.split([by_expert[e][0].numel() for e in cold])]
        pool, start = self._executor(), time.perf_counter()
        jobs = [(e, pool.submit(self._cpu_expert, layer, e, r)) for e, r in zip(cold, rows, strict=True)]
        return start, jobs

    def finish_cpu(self, layer: int, started, by_expert: dict, outputs: dict, device) -> None:
        start, jobs = started
        stats = self.stats.layers[layer]
        busy, last, waited = 0.0, start, 0.0
        for e, job in jobs:
            t = time.perf_counter()
            y, dt, end = job.result()
            waited += time.perf_counter() - t
            busy, last = busy + dt, max(last, end)
            outputs[e] = y.to(device, non_blocking=True) * by_expert[e][1][:, None]
        stats.cpu_s += busy
        stats.cpu_wall_s += last - start
        stats.cpu_wait_s += waited
        if self.timing is not None and all(by_expert[e][0].numel() == 1 for e, _ in jobs):
            rounds = -(-len(jobs) // self.workers)
            self.timing.cpu_s += EMA * ((last - start) / rounds - self.timing.cpu_s)

    # -- copies -------------------------------------------------------------------------------------
    def _load(self, layer: int, expert: int, protect: set[int]) -> tuple[int, object]:
        t = time.perf_counter()
        slot, event = super()._load(layer, expert, protect)
        if event is None and self.timing is not None:  # a synchronous copy: its time is known now
            self.timing.copy_s += EMA * (time.perf_counter() - t - self.timing.copy_s)
        return slot, event

    def promote(self, layer: int, cold: list[int], needed: set[int]) -> None:
        """Count the layer's CPU computations (fading); hot ones are copied into a slot."""
        clock = self._clock[layer] = self._clock[layer] + 1
        heat, policy, stats = self._heat[layer], self.policies[layer], self.stats.layers[layer]
        evicting = 0
        for e in cold:
            count, seen = heat.get(e, (0.0, clock))
            count = count * PROMOTE_DECAY ** (clock - seen) + 1.0
            heat[e] = (count, clock)
            free = len(policy) < self.slots_per_layer
            if not should_promote(count, free) or (not free and evicting >= PROMOTE_PER_STEP):
                continue
            try:
                self._load(layer, e, needed)
            except LookupError:  # every slot holds an expert this step uses
                continue
            evicting += not free
            stats.promoted += 1
            del heat[e]

    # -- start-up measurement -----------------------------------------------------------------------
    def calibrate(self, layer: int, x: torch.Tensor) -> Timing:
        """Time a copy into a scratch slot and the pool's work per expert at 1 and 16 tokens."""
        cuda = self.compute_device.type == "cuda"
        sync = (lambda: torch.cuda.synchronize(self.compute_device)) if cuda else (lambda: None)
        src = self.blobs[layer][: min(4, self.config.num_experts)]
        dst = torch.empty_like(src, device=self.compute_device)
        dst.copy_(src, non_blocking=True)
        sync()
        t = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        sync()
        copy_s = (time.perf_counter() - t) / src.shape[0]
        del dst
        host = x[:1].to("cpu")

        def pool_round(rows: torch.Tensor) -> float:
            jobs = [
                self._executor().submit(self._cpu_expert, layer, e % self.config.num_experts, rows)
                for e in range(self.workers)
            ]
            t = time.perf_counter()
            for j in jobs:
                j.result()
            return time.perf_counter() - t

        pool_round(host)  # warm-up: threads, views, kernels
        one = pool_round(host)
        many = pool_round(host.expand(CALIBRATE_TOKENS, -1).contiguous())
        return Timing(copy_s, one, max(0.0, (many - one) / (CALIBRATE_TOKENS - 1)))


def cold_report(stats, experts=None) -> dict | None:
    """The CPU side of cold experts in `stats` (a CacheStats), in total and per layer, for
    /v1/stats, --json and /stats; with the experts, their mode, pool and measured times too.
    None when nothing ran on the CPU and the experts are not ColdExperts."""
    cold = isinstance(experts, ColdExperts)
    if stats is None or not (cold or any(s.cpu_computed for s in stats.layers.values())):
        return None

    def one(s) -> dict:
        return {
            "cpu_computed": s.cpu_computed,
            "copied": s.misses - s.cpu_computed,
            "promoted": s.promoted,
            "cpu_seconds": round(s.cpu_s, 6),
            "cpu_wall_seconds": round(s.cpu_wall_s, 6),
            "cpu_wait_seconds": round(s.cpu_wait_s, 6),
            "overlap": round(overlap(s), 4) if s.cpu_wall_s else None,
        }

    d = {
        "total": one(stats.total()),
        "layers": {str(layer): one(s) for layer, s in sorted(stats.layers.items())},
    }
    if cold:
        timing = None if experts.timing is None else asdict(experts.timing)
        d = {"mode": experts.mode, "workers": experts.workers, "timing": timing, **d}
    return d


def overlap(s) -> float:
    """The share of the CPU's wall time during which the layer was busy on the device, not waiting."""
    return max(0.0, 1.0 - s.cpu_wait_s / s.cpu_wall_s) if s.cpu_wall_s else 0.0
