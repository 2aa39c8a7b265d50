"""Synthetic routing traces with the locality published for Qwen3-30B-A3B, and the statistics
that describe a trace's locality (for recorded traces too)."""

from __future__ import annotations

import bisect
import math
import random
import statistics
from itertools import accumulate

from qwenlocal.planning.routing_trace import Trace, as_trace

WITHIN = 8  # "reused within 8 tokens", the window of the published Qwen3-30B-A3B figures


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
