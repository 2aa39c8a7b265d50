"""Which experts stay on the GPU: eviction policies for the runtime cache and a trace simulator.

The runtime keeps one `LayerPolicy` per MoE layer and asks it, for every token, which of the
layer's k experts are resident and which resident expert to drop for each one that is not. The
same classes drive `simulate`, so a hit rate measured offline on a recorded routing trace is the
hit rate the runtime would get. Belady's optimum (evict the expert needed furthest in the
future) needs the whole trace and exists only in the simulator, as the yardstick.

A trace is a list over tokens of a list over MoE layers of the expert ids picked:
`trace[t][layer] == [e0, ..., e_{k-1}]`. A token's k experts in one layer are needed at once, so
hits are counted against the cache as it was before any of them is inserted, and none of them is
evicted to make room for another (the `protect` set).

Traces are stored as JSON lines, one token per line: `{"experts": [[layer 0 ids], ...]}`.
"""

from __future__ import annotations

import bisect
import heapq
import json
import math
import os
import random
import statistics
import tempfile
import weakref
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import NamedTuple

Trace = list[list[list[int]]]

# LFU with decay: equal to LRU from 20 % residency up and up to 3.8 points better below, on the
# synthetic trace and on a trace recorded from the model (BENCHMARKS.md, bench/cache_sim.py).
DEFAULT_CACHE_POLICY = "lfu"
POLICIES = ("lru", "lfu", "belady", "global-lru", "global-lfu", "global-belady")
LFU_DECAY = 0.95  # per access of the layer: a count halves in 13.5 accesses, ~1.7 tokens at top-8
WITHIN = 8  # "reused within 8 tokens", the window of the published Qwen3-30B-A3B figures


class Access(NamedTuple):
    """What one token needed from one layer's cache."""

    hits: list[int]
    admitted: list[tuple[int, int | None]]  # (missing expert, expert evicted for it or None)
    streamed: list[int]  # missing experts not cached: every resident one is needed by this token


class LayerPolicy(ABC):
    """One layer's set of resident experts and the order in which they leave.

    `victim` and `admit` take `protect`: experts that may not be evicted right now, the ones the
    current token uses. When every resident expert is protected (capacity below top-k) they raise
    LookupError and change nothing; the caller then streams the expert without caching it.
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"cache capacity must be at least 1, not {capacity}")
        self.capacity = capacity

    @abstractmethod
    def __contains__(self, expert: int) -> bool: ...

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def touch(self, expert: int) -> None:
        """Record a hit on a resident expert."""

    @abstractmethod
    def victim(self, protect: Collection[int] = ()) -> int:
        """The resident expert the next admission would evict (it stays resident)."""

    @abstractmethod
    def _insert(self, expert: int) -> None:
        """Add a missing expert; there is room."""

    @abstractmethod
    def remove(self, expert: int) -> None:
        """Drop a resident expert (KeyError if it is not resident)."""

    @abstractmethod
    def resident(self) -> list[int]:
        """Resident experts in eviction order, the next victim first."""

    def admit(self, expert: int, protect: Collection[int] = ()) -> int | None:
        """Insert a missing expert; if the cache is full, evict and return the evicted expert.

        Admitting a resident expert counts as a hit and evicts nothing.
        """
        if expert in self:
            self.touch(expert)
            return None
        evicted = None
        if len(self) >= self.capacity:
            evicted = self.victim(protect)
            self.remove(evicted)
        self._insert(expert)
        return evicted

    def access(self, experts: Sequence[int]) -> Access:
        """One token's experts for this layer: touch the hits, then admit the misses.

        The runtime and the simulator both go through here, so they order hits and
        admissions the same way.
        """
        hits = [e for e in experts if e in self]
        for e in hits:
            self.touch(e)
        return Access(hits, *self._admit_misses(experts))

    def _admit_misses(self, experts: Sequence[int]) -> tuple[list, list[int]]:
        admitted: list[tuple[int, int | None]] = []
        streamed: list[int] = []
        protect = None
        for e in experts:
            if e not in self:
                if protect is None:
                    protect = set(experts)
                try:
                    admitted.append((e, self.admit(e, protect)))
                except LookupError:
                    streamed.append(e)
        return admitted, streamed


class LRU(LayerPolicy):
    """Least recently used: routing is local in time (45 % of picks repeat at the next token)."""

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self._order: OrderedDict[int, None] = OrderedDict()  # oldest first

    def __contains__(self, expert: int) -> bool:
        return expert in self._order

    def __len__(self) -> int:
        return len(self._order)

    def touch(self, expert: int) -> None:
        self._order.move_to_end(expert)

    def victim(self, protect: Collection[int] = ()) -> int:
        for e in self._order:  # protected experts were just touched, so this stops early
            if e not in protect:
                return e
        raise LookupError("every resident expert is protected")

    def _insert(self, expert: int) -> None:
        self._order[expert] = None

    def remove(self, expert: int) -> None:
        del self._order[expert]

    def resident(self) -> list[int]:
        return list(self._order)

    def access(self, experts: Sequence[int]) -> Access:
        # The generic version inlined: the runtime calls this once per layer per token.
        order = self._order
        hits = [e for e in experts if e in order]
        for e in hits:
            order.move_to_end(e)
        admitted: list[tuple[int, int | None]] = []
        streamed: list[int] = []
        if len(hits) < len(experts):
            protect = set(experts)
            for e in experts:
                if e in order:
                    continue
                evicted = None
                if len(order) >= self.capacity:
                    evicted = next((v for v in order if v not in protect), None)
                    if evicted is None:
                        streamed.append(e)
                        continue
                    del order[evicted]
                order[e] = None
                admitted.append((e, evicted))
        return Access(hits, admitted, streamed)


class LFUDecay(LayerPolicy):
    """Least frequently used, with counts that fade: keeps the layer's popular experts.

    Each access of the layer (a touch or an admission) multiplies every count by `decay`; the
    accessed expert then gains 1. Ties go to the least recently used. Counts of evicted experts
    are remembered (one float per expert ever seen), so a popular expert that was pushed out
    comes back with its history.

    Cost: stored counts are scaled by g^clock (g = 1/decay) instead of decaying them all, and
    rescaled rarely. Victims come from a min-heap whose entries may understate a count (a touch
    does not update the heap; counts only grow): an outdated entry at the top is refreshed and
    pushed back. So a touch is O(1) and an eviction O(log capacity) amortized.
    """

    def __init__(self, capacity: int, decay: float = LFU_DECAY):
        super().__init__(capacity)
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], not {decay}")
        self._g = 1.0 / decay
        self._weight = 1.0  # what an access adds now, g^clock since the last rescale
        self._clock = 0
        self._score: dict[int, float] = {}  # every expert ever seen -> count × weight
        self._last: dict[int, int] = {}  # resident expert -> clock of its last access
        self._heap: list[tuple[float, int, int]] = []  # (score, last, expert), possibly outdated

    def __contains__(self, expert: int) -> bool:
        return expert in self._last

    def __len__(self) -> int:
        return len(self._last)

    def count(self, expert: int) -> float:
        """The decayed access count of an expert now (0 if never seen)."""
        return self._score.get(expert, 0.0) / self._weight

    def _tick(self) -> float:
        self._clock += 1
        self._weight *= self._g
        if self._weight > 1e100:  # rescale before floats overflow; order is unchanged
            for e in self._score:
                self._score[e] /= self._weight
            self._weight = 1.0
            self._rebuild()
        return self._weight

    def _rebuild(self) -> None:
        self._heap = [(self._score[e], t, e) for e, t in self._last.items()]
        heapq.heapify(self._heap)

    def touch(self, expert: int) -> None:
        if expert not in self._last:
            raise KeyError(expert)
        w = self._tick()
        self._score[expert] += w
        self._last[expert] = self._clock

    def victim(self, protect: Collection[int] = ()) -> int:
        heap, last = self._heap, self._last
        held = []
        try:
            while heap:
                s, t, e = heap[0]
                if e not in last:  # evicted since
                    heapq.heappop(heap)
                elif t != last[e]:  # touched since: refresh
                    heapq.heapreplace(heap, (self._score[e], last[e], e))
                elif e in protect:
                    held.append(heapq.heappop(heap))
                else:
                    return e
            raise LookupError("every resident expert is protected")
        finally:
            for entry in held:
                heapq.heappush(heap, entry)

    def _insert(self, expert: int) -> None:
        w = self._tick()
        s = self._score.get(expert, 0.0) + w
        self._score[expert] = s
        self._last[expert] = self._clock
        heapq.heappush(self._heap, (s, self._clock, expert))
        if len(self._heap) > 2 * self.capacity + 64:  # outdated duplicates of re-admitted experts
            self._rebuild()

    def remove(self, expert: int) -> None:
        del self._last[expert]  # its heap entry is dropped when it reaches the top

    def resident(self) -> list[int]:
        return sorted(self._last, key=lambda e: (self._score[e], self._last[e]))

    def access(self, experts: Sequence[int]) -> Access:
        # The generic version with touch inlined: hits are the common case.
        last, score = self._last, self._score
        hits = [e for e in experts if e in last]
        if hits and self._weight * self._g ** len(hits) < 1e100:  # no rescale due: tick in place
            w, g, clock = self._weight, self._g, self._clock
            for e in hits:
                w *= g
                clock += 1
                score[e] += w
                last[e] = clock
            self._weight, self._clock = w, clock
        else:
            for e in hits:
                self.touch(e)
        if len(hits) == len(experts):
            return Access(hits, [], [])
        return Access(hits, *self._admit_misses(experts))


def make_policy(name: str, capacity: int, **options) -> LayerPolicy:
    """A per-layer policy by name: "lru" or "lfu" (options: decay)."""
    if name == "lru":
        return LRU(capacity, **options)
    if name == "lfu":
        return LFUDecay(capacity, **options)
    raise ValueError(f"unknown cache policy {name!r}: use 'lru' or 'lfu'")


# ---------------------------------------------------------------- simulator


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


def as_trace(trace) -> Trace:
    """A trace as nested lists of ints, from lists or an int array [tokens, layers, k]."""
    if hasattr(trace, "tolist"):
        trace = trace.tolist()
    trace = [[[int(e) for e in ids] for ids in token] for token in trace]
    if trace and any(len(token) != len(trace[0]) for token in trace):
        raise ValueError("every token of a trace must list the same number of layers")
    return trace


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
        """Per layer, the groups in token order; or one list of all groups with global keys."""
        if glob not in self._groups:
            if glob:
                n = self.experts
                g = [
                    [[layer * n + e for e in ids] for token in self.trace for layer, ids in enumerate(token)]
                ]
            else:
                g = [[token[layer] for token in self.trace] for layer in range(self.layers)]
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


# ---------------------------------------------------------------- trace files


class TraceWriter:
    """Streams a routing trace to JSON lines, one token per `add`.

    Lines go to a temporary file beside `path`, renamed onto it by `close`: a reader never sees
    a half-written trace. Leaving a `with` block by an exception, or dropping the writer without
    `close`, deletes the temporary file. Call `close` yourself to keep a partial trace.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        self._tmp = Path(tmp)
        self._file = os.fdopen(fd, "w", encoding="utf-8")
        self._discard = weakref.finalize(self, _discard, self._file, self._tmp)
        self.tokens = 0

    def add(self, token_experts: Sequence[Sequence[int]]) -> None:
        """One token: for each MoE layer, the ids of the experts it picked."""
        ids = [[int(e) for e in layer] for layer in token_experts]
        self._file.write(json.dumps({"experts": ids}, separators=(",", ":")) + "\n")
        self.tokens += 1

    def close(self) -> None:
        """Finish the file and move it to `path`."""
        if not self._discard.alive:
            return
        self._discard.detach()
        self._file.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Drop what was written; `path` is left untouched."""
        self._discard()

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _discard(file, tmp: Path) -> None:
    file.close()
    tmp.unlink(missing_ok=True)


def write_trace(path: str | os.PathLike, trace) -> None:
    """Write a whole trace (nested lists or an int array [tokens, layers, k])."""
    with TraceWriter(path) as w:
        for token in as_trace(trace):
            w.add(token)


def read_trace(path: str | os.PathLike) -> Trace:
    """Read a JSON-lines trace; ValueError naming the line if it is malformed."""
    trace: Trace = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token = json.loads(line)["experts"]
                token = [[int(e) for e in ids] for ids in token]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: not a routing trace line ({e})") from None
            if trace and len(token) != len(trace[0]):
                raise ValueError(f"{path}:{n}: {len(token)} layers, earlier lines have {len(trace[0])}")
            trace.append(token)
    return trace


# ---------------------------------------------------------------- synthetic traces and statistics


def synthetic_trace(
    tokens: int,
    layers: int,
    experts: int = 128,
    k: int = 8,
    seed: int = 0,
    p_repeat_next: float = 0.45,
    p_within_8: float = 0.80,
    zipf: float = 1.0,
    recency: float = 0.6,
    sticky: float = 1.0,
) -> Trace:
    """A routing trace with the locality published for Qwen3-30B-A3B.

    Each of a token's k picks in a layer is, with probability `p_repeat_next`, an expert the layer
    used at the previous token; with probability `p_within_8 - p_repeat_next`, one last used 2-8
    tokens ago (weight `recency`^(distance-2), so distance 2 is common and the median reuse
    distance is 2); otherwise an expert not used in the last 8 tokens, drawn from a Zipf(`zipf`)
    popularity over a per-layer permutation of the experts, so the long tail gets used too. The
    three kinds are exclusive, so the measured shares equal the parameters up to sampling noise.
    """
    if not 0 <= p_repeat_next <= p_within_8 <= 1:
        raise ValueError("need 0 <= p_repeat_next <= p_within_8 <= 1")
    if not 0 < k <= experts:
        raise ValueError(f"top-{k} of {experts} experts is impossible")
    rng = random.Random(seed)
    trace: Trace = [[[] for _ in range(layers)] for _ in range(tokens)]
    rank_weight = [1.0 / (r + 1) ** zipf for r in range(experts)]
    for layer in range(layers):
        perm = list(range(experts))
        rng.shuffle(perm)
        pop = [0.0] * experts
        for r, e in enumerate(perm):
            pop[e] = rank_weight[r]
        cum = list(accumulate(pop))
        stick = [p**sticky for p in pop]
        last = [-(10**9)] * experts
        for t in range(tokens):
            n_next = n_near = 0
            for _ in range(k):
                u = rng.random()
                if u < p_repeat_next:
                    n_next += 1
                elif u < p_within_8:
                    n_near += 1
            picked: list[int] = []
            if t > 0:
                prev = trace[t - 1][layer]
                picked += _draw(rng, prev, [stick[e] for e in prev], n_next)
            short = n_next - len(picked)
            near = [
                e for d in range(2, WITHIN + 1) if t - d >= 0 for e in trace[t - d][layer] if last[e] == t - d
            ]
            weights = [stick[e] * recency ** (t - last[e] - 2) for e in near]
            picked += _draw(rng, near, weights, n_near + short)
            chosen = set(picked)
            tries = 0
            while len(picked) < k:
                e = bisect.bisect_right(cum, rng.random() * cum[-1])
                e = min(e, experts - 1)
                tries += 1
                if e in chosen or (t - last[e] <= WITHIN and tries < 200):
                    continue
                picked.append(e)
                chosen.add(e)
            for e in picked:
                last[e] = t
            trace[t][layer] = picked
    return trace


def _draw(rng: random.Random, items: list[int], weights: list[float], n: int) -> list[int]:
    """n distinct items (fewer if there are not enough), each drawn with probability ∝ weight."""
    items, weights = list(items), list(weights)
    out = []
    for _ in range(min(n, len(items))):
        i = rng.choices(range(len(items)), weights)[0]
        out.append(items.pop(i))
        weights.pop(i)
    return out


def trace_stats(trace) -> dict:
    """Locality of a trace, per pick from the second token on, pooled over layers.

    repeat_next: share of picks the layer also made at the previous token. within_8: share
    reused within 8 tokens. median_reuse: median token distance to the same layer's previous
    use of the expert (first uses count as infinitely far). distinct: experts used per layer.
    """
    trace = as_trace(trace)
    layers = len(trace[0]) if trace else 0
    distances: list[float] = []
    distinct = []
    for layer in range(layers):
        last: dict[int, int] = {}
        for t, token in enumerate(trace):
            for e in token[layer]:
                if t > 0:
                    distances.append(t - last[e] if e in last else math.inf)
                last[e] = t
        distinct.append(len(last))
    n = len(distances) or 1
    return {
        "tokens": len(trace),
        "layers": layers,
        "repeat_next": sum(d == 1 for d in distances) / n,
        "within_8": sum(d <= WITHIN for d in distances) / n,
        "median_reuse": statistics.median(distances) if distances else math.nan,
        "distinct_min": min(distinct, default=0),
        "distinct_mean": sum(distinct) / len(distinct) if distinct else 0.0,
        "distinct_per_layer": distinct,
    }
