"""The offline cache simulator: replay a routing trace through a policy and count the hits.

Per-layer policies replay `LayerPolicy.access`, token by token, so the simulated hit rate of a
decode trace is the runtime's. Belady's optimum (evict the expert needed furthest in the future)
needs the whole trace and exists only here, as the yardstick. The expected hit-rate table that
`qwenlocal vram --gpu` reads (`data/hit_rates.json`) is built here too.
"""

from __future__ import annotations

import heapq
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from qwenlocal.experts.cache_policy import LFU_DECAY, LRU, LFUDecay
from qwenlocal.planning.routing_trace import Trace, as_trace
from qwenlocal.planning.synthetic_trace import synthetic_trace

POLICIES = ("lru", "lfu", "belady", "global-lru", "global-lfu", "global-belady")
HIT_RATE_TABLE = Path(__file__).parent.parent / "data" / "hit_rates.json"
# The synthetic trace behind data/hit_rates.json (Qwen3-30B-A3B: 128 experts, top-8).
HIT_TRACE = {"tokens": 4000, "layers": 8, "experts": 128, "k": 8, "seed": 0, "warmup": 256}
HIT_CAPACITIES = (8, 9, 10, 12, 14, 16, 20, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 104, 112, 120)


@dataclass
class SimResult:
    """Hits of one policy at one size over a trace; `capacity` is slots per layer."""

    policy: str
    capacity: int
    hits: int
    accesses: int
    layer_hits: list[int] = field(default_factory=list)
    layer_accesses: list[int] = field(default_factory=list)

    @property
    def misses(self) -> int:
        return self.accesses - self.hits

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0


class _Prepared:
    """A trace cut into access groups, with next-use indices, computed once for many runs."""

    def __init__(self, trace: Trace):
        self.trace = trace
        self.layers = len(trace[0]) if trace else 0
        self.experts = 1 + max((e for token in trace for ids in token for e in ids), default=0)
        self.accesses = [sum(len(token[layer]) for token in trace) for layer in range(self.layers)]
        self.distinct = [len({e for token in trace for e in token[layer]}) for layer in range(self.layers)]
        self._groups: dict[bool, list] = {}
        self._nexts: dict[bool, list] = {}

    def groups(self, glob: bool) -> list[list[list[int]]]:
        """Per layer, the groups in token order; or one list of all groups with global keys.

        A group's experts are in increasing id order, the order the runtime computes (and so
        touches and admits) them in."""
        if glob not in self._groups:
            if glob:
                n = self.experts
                g = [
                    [
                        [layer * n + e for e in sorted(ids)]
                        for token in self.trace
                        for layer, ids in enumerate(token)
                    ]
                ]
            else:
                g = [[sorted(token[layer]) for token in self.trace] for layer in range(self.layers)]
            self._groups[glob] = g
        return self._groups[glob]

    def nexts(self, glob: bool) -> list[list[list[int]]]:
        if glob not in self._nexts:
            self._nexts[glob] = [_next_uses(g) for g in self.groups(glob)]
        return self._nexts[glob]


def _next_uses(groups: list[list[int]]) -> list[list[int]]:
    """For each key of each group, the index of the next group that uses it (len(groups) if none)."""
    seen: dict[int, int] = {}
    out: list[list[int]] = [[]] * len(groups)
    for g in range(len(groups) - 1, -1, -1):
        ids = groups[g]
        out[g] = [seen.get(e, len(groups)) for e in ids]
        for e in ids:
            seen[e] = g
    return out


def _belady(groups: list[list[int]], nexts: list[list[int]], capacity: int) -> list[int]:
    """Hits per group under Belady's rule: evict the unprotected key needed furthest ahead.

    With capacity below the group size, the group's keys needed soonest are the ones kept.
    """
    resident: dict[int, int] = {}  # key -> index of its next use
    heap: list[tuple[int, int]] = []  # (-next use, key); stale when resident[key] differs
    push, pop = heapq.heappush, heapq.heappop
    out = []
    for ids, nxt in zip(groups, nexts, strict=True):
        hits = 0
        misses = []
        for e, n in zip(ids, nxt, strict=True):
            if e in resident:
                hits += 1
                resident[e] = n
                push(heap, (-n, e))
            else:
                misses.append((e, n))
        out.append(hits)
        for e, n in misses:
            held = []
            while len(resident) >= capacity and heap:
                entry = pop(heap)
                v = entry[1]
                if resident.get(v) != -entry[0]:
                    continue
                if v in ids:
                    held.append(entry)
                    continue
                del resident[v]
            if len(resident) >= capacity:  # all protected: keep whichever is needed sooner
                if held and -held[0][0] > n:
                    del resident[held.pop(0)[1]]
                else:
                    e = None
            if e is not None:
                resident[e] = n
                push(heap, (-n, e))
            for entry in held:
                push(heap, entry)
        if len(heap) > 4 * capacity + 1024:
            heap = [(-n, e) for e, n in resident.items()]
            heapq.heapify(heap)
    return out


def _run(prep: _Prepared, policy: str, capacity: int, decay: float) -> SimResult:
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}: use one of {', '.join(POLICIES)}")
    glob = policy.startswith("global-")
    base = policy.removeprefix("global-")
    layers = prep.layers
    slots = capacity * layers if glob else capacity
    if slots >= (sum(prep.distinct) if glob else max(prep.distinct, default=0)):
        # Everything fits: nothing is ever evicted, every policy misses only first uses.
        layer_hits = [a - d for a, d in zip(prep.accesses, prep.distinct, strict=True)]
        return SimResult(policy, capacity, sum(layer_hits), sum(prep.accesses), layer_hits, prep.accesses)
    per_group: list[list[int]] = []
    for i, seq in enumerate(prep.groups(glob)):
        if base == "belady":
            per_group.append(_belady(seq, prep.nexts(glob)[i], slots))
        else:
            cache = LFUDecay(slots, decay) if base == "lfu" else LRU(slots)
            per_group.append([len(cache.access(ids).hits) for ids in seq])
    if glob:  # groups run token by token, layer by layer
        flat = per_group[0]
        layer_hits = [sum(flat[layer::layers]) for layer in range(layers)]
    else:
        layer_hits = [sum(h) for h in per_group]
    return SimResult(policy, capacity, sum(layer_hits), sum(prep.accesses), layer_hits, prep.accesses)


def simulate(trace, policy: str, capacity: int, decay: float = LFU_DECAY) -> SimResult:
    """Replay a trace through a cache of `capacity` expert slots per layer.

    policy: "lru", "lfu", "belady" (one cache per layer), or "global-lru", "global-lfu",
    "global-belady" (one cache over (layer, expert) keys with capacity × layers slots, so the
    same total memory). `decay` is the LFU policies'.
    """
    return _run(_Prepared(as_trace(trace)), policy, capacity, decay)


def sweep(
    trace, policies: Iterable[str], capacities: Iterable[int], decay: float = LFU_DECAY
) -> list[SimResult]:
    """`simulate` for every policy and capacity, sharing the trace preparation (next uses)."""
    prep = _Prepared(as_trace(trace))
    capacities = list(capacities)
    return [_run(prep, p, c, decay) for p in policies for c in capacities]


# ---------------------------------------------------------------- the expected hit-rate table


def lru_hit_rate(
    capacity: int,
    tokens: int = HIT_TRACE["tokens"],
    layers: int = HIT_TRACE["layers"],
    experts: int = HIT_TRACE["experts"],
    k: int = HIT_TRACE["k"],
    seed: int = HIT_TRACE["seed"],
    warmup: int = HIT_TRACE["warmup"],
    trace=None,
) -> float:
    """Steady-state hit rate of a per-layer LRU of `capacity` slots on a synthetic trace: hits
    after the first `warmup` tokens (the cache starts full of experts, not empty)."""
    if trace is None:
        trace = synthetic_trace(tokens, layers, experts, k, seed)
    full = simulate(trace, "lru", capacity)
    head = simulate(trace[:warmup], "lru", capacity)
    return (full.hits - head.hits) / (full.accesses - head.accesses)


def hit_rate_table(capacities=HIT_CAPACITIES, **trace_args) -> dict:
    """What data/hit_rates.json holds: residency fraction -> per-layer LRU hit rate."""
    args = {**HIT_TRACE, **trace_args}
    trace = synthetic_trace(args["tokens"], args["layers"], args["experts"], args["k"], args["seed"])
    points = [
        [round(c / args["experts"], 6), round(lru_hit_rate(c, warmup=args["warmup"], trace=trace), 4)]
        for c in capacities
    ]
    return {
        "about": "Per-layer LRU hit rate by share of each layer's experts resident, on "
        "synthetic_trace.synthetic_trace (published Qwen3-30B-A3B routing locality), counted after "
        "a warm-up. All resident: no misses. Written by qwenlocal.planning.cache_sim.write_hit_rate_table().",
        "trace": args,
        "policy": "lru",
        "points": [*points, [1.0, 1.0]],
    }


def write_hit_rate_table(path: str | Path = HIT_RATE_TABLE) -> dict:
    table = hit_rate_table()
    text = json.dumps(table, indent=1)
    text = re.sub(r"\[\s+([0-9.]+),\s+([0-9.]+)\s+\]", r"[\1, \2]", text)  # a point per line
    Path(path).write_text(text + "\n", encoding="utf-8")
    return table
