"""Which experts stay on the device: the per-layer eviction policies of the runtime expert cache.

`OffloadedExperts` keeps one `LayerPolicy` per MoE layer. For each step it touches the experts
that are resident (`touch`) and admits the missing ones (`admit`, which names the expert to
evict); a token's k experts are needed at once, so none of them may be evicted for another (the
`protect` set). `access` does the same for one token and is what the offline simulator
(`cache_sim`) replays: for a decode step (one token) the runtime and the simulator make the same
calls in the same order, so a hit rate simulated on a recorded trace is the one decode gets.
"""

from __future__ import annotations

import heapq
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Collection, Sequence
from typing import NamedTuple

# LFU with decay: equal to LRU from 20 % residency up and up to 3.8 points better below, on the
# synthetic trace and on a trace recorded from the model (BENCHMARKS.md, bench/cache_sim.py).
DEFAULT_CACHE_POLICY = "lfu"
RUNTIME_POLICIES = ("lru", "lfu")
LFU_DECAY = 0.95  # per access of the layer: a count halves in 13.5 accesses, ~1.7 tokens at top-8


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
