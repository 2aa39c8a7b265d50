"""The expert cache's counters, per MoE layer: what the cache did (hits, misses, copies, waits,
prefetches) and what the CPU computed beside it (cold.py). Generation records carry them and the
chat, the server and `--json` show them."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LayerStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_copied: int = 0
    # Time the computation waited for copies: on the CPU the copies themselves (they are
    # synchronous); on CUDA the compute stream's stalls, timed on the device by events.
    wait_s: float = 0.0
    prefetched: int = 0  # copies started early by the prefetcher
    prefetch_useful: int = 0  # prefetched experts that the layer then used
    predicted: int = 0  # expert picks the prefetcher guessed
    actual: int = 0  # expert picks made while a guess existed
    # misses computed on the CPU (--cold-experts cpu/auto, cold.py); the other misses were copied
    cpu_computed: int = 0
    cpu_s: float = 0.0  # their compute time, summed over the workers
    cpu_wall_s: float = 0.0  # from the layer's first CPU job to its last result
    cpu_wait_s: float = 0.0  # of that, time the layer waited after its device work
    promoted: int = 0  # CPU-computed experts then copied into a slot for later tokens

    def add(self, other: LayerStats) -> None:
        for f in self.__dataclass_fields__:
            setattr(self, f, getattr(self, f) + getattr(other, f))


@dataclass
class CacheStats:
    layers: dict[int, LayerStats] = field(default_factory=dict)

    def total(self) -> LayerStats:
        t = LayerStats()
        for s in self.layers.values():
            t.add(s)
        return t

    @property
    def hit_rate(self) -> float | None:
        """Share of expert uses served from the cache; None before any use."""
        t = self.total()
        return t.hits / (t.hits + t.misses) if t.hits + t.misses else None

    @property
    def prefetch_recall(self) -> float | None:
        t = self.total()
        return t.predicted / t.actual if t.actual else None

    def snapshot(self) -> CacheStats:
        return CacheStats({k: LayerStats(**v.__dict__) for k, v in self.layers.items()})

    def since(self, before: CacheStats) -> CacheStats:
        """The counters accumulated after `before` was taken (e.g. for one reply)."""
        out = CacheStats()
        for k, v in self.layers.items():
            b = before.layers.get(k, LayerStats())
            out.layers[k] = LayerStats(**{f: getattr(v, f) - getattr(b, f) for f in v.__dataclass_fields__})
        return out
