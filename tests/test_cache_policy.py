"""Expert cache policies, the trace simulator, trace files and the synthetic trace generator."""

from __future__ import annotations

import gc
import itertools
import random

import pytest

from qwenlocal.experts.cache_policy import LRU, Access, LayerPolicy, LFUDecay, make_policy
from qwenlocal.planning.cache_sim import simulate, sweep
from qwenlocal.planning.routing_trace import TraceWriter, read_trace, write_trace
from qwenlocal.planning.synthetic_trace import synthetic_trace, trace_stats


def random_trace(tokens: int, layers: int, experts: int, k: int, seed: int) -> list:
    rng = random.Random(seed)
    return [[rng.sample(range(experts), k) for _ in range(layers)] for _ in range(tokens)]


# ---------------------------------------------------------------- LRU


def test_lru_evicts_what_lru_says():
    c = LRU(3)
    assert [c.admit(e) for e in (1, 2, 3)] == [None, None, None]
    c.touch(1)  # order 2 3 1
    assert c.resident() == [2, 3, 1]
    assert c.victim() == 2 and 2 in c  # victim() does not evict
    assert c.admit(4) == 2  # 3 1 4
    assert c.admit(5, protect={3}) == 1  # 3 is oldest but protected: 3 4 5
    c.touch(3)  # 4 5 3
    assert c.admit(2) == 4  # 5 3 2
    assert c.access([3, 6, 7]) == Access(hits=[3], admitted=[(6, 5), (7, 2)], streamed=[])
    assert c.resident() == [3, 6, 7] and len(c) == 3
    c.remove(6)
    assert c.resident() == [3, 7] and 6 not in c
    assert c.admit(7) is None and c.resident() == [3, 7]  # admitting a resident one is a hit


def test_protect_is_respected_and_full_protection_raises():
    c = LRU(3)
    for e in (1, 2, 3):
        c.admit(e)
    assert c.victim(protect={1, 2}) == 3
    with pytest.raises(LookupError):
        c.victim(protect={1, 2, 3})
    with pytest.raises(LookupError):
        c.admit(4, protect={1, 2, 3})
    assert c.resident() == [1, 2, 3]  # unchanged
    # capacity below top-k: the token's other experts are streamed, never evicting its own
    small = LRU(2)
    assert small.access([1, 2, 3]) == Access(hits=[], admitted=[(1, None), (2, None)], streamed=[3])
    acc = small.access([4, 1, 5])
    assert acc.hits == [1] and acc.admitted == [(4, 2)] and acc.streamed == [5]


@pytest.mark.parametrize(("name", "options"), [("lru", {}), ("lfu", {}), ("lfu", {"decay": 0.5})])
def test_fast_access_equals_generic_access(name, options):
    """LRU and LFUDecay inline `access` for speed; it must match touch/admit one by one
    (decay 0.5 rescales the LFU counts every ~330 accesses)."""
    trace = random_trace(400, 1, 12, 4, seed=3)
    for capacity in (2, 4, 5, 9):
        fast, slow = make_policy(name, capacity, **options), make_policy(name, capacity, **options)
        for token in trace:
            assert fast.access(token[0]) == LayerPolicy.access(slow, token[0])
            assert fast.resident() == slow.resident()


def test_make_policy_names():
    assert isinstance(make_policy("lru", 4), LRU)
    assert isinstance(make_policy("lfu", 4, decay=0.9), LFUDecay)
    with pytest.raises(ValueError):
        make_policy("fifo", 4)
    with pytest.raises(ValueError):
        LRU(0)


# ---------------------------------------------------------------- LFU with decay


def test_lfu_keeps_a_frequent_expert_that_lru_evicts():
    seq = [[1], [1], [1], [1], [2], [3], [1]]
    lru, lfu = LRU(2), LFUDecay(2, decay=0.9)
    for ids in seq[:5]:
        lru.access(ids), lfu.access(ids)
    assert lru.victim() == 1  # least recent
    assert lfu.victim() == 2  # least frequent
    hits = {"lru": 0, "lfu": 0}
    for ids in seq[5:]:
        hits["lru"] += len(lru.access(ids).hits)
        hits["lfu"] += len(lfu.access(ids).hits)
    assert hits == {"lru": 0, "lfu": 1}


def test_lfu_counts_decay_and_ties_go_to_the_least_recent():
    c = LFUDecay(3, decay=0.5)
    c.admit(1)
    c.touch(1)  # 0.5 + 1
    assert c.count(1) == pytest.approx(1.5)
    c.admit(2)
    c.touch(2)
    assert c.count(1) == pytest.approx(0.375) and c.count(2) == pytest.approx(1.5)
    assert c.victim() == 1  # more accesses, but older
    pure = LFUDecay(3, decay=1.0)
    pure.admit(5), pure.admit(6)
    assert pure.victim() == 5  # equal counts: least recent
    pure.touch(5)
    assert pure.victim() == 6


def test_lfu_rescales_without_overflow_and_remembers_evicted_experts():
    c = LFUDecay(2, decay=0.5)  # the weight doubles per access: rescaled every ~330 accesses
    c.admit(1)
    for _ in range(3000):
        c.touch(1)
    assert c.count(1) == pytest.approx(2.0)
    c.admit(2)
    assert c.count(2) == pytest.approx(1.0) and c.count(1) == pytest.approx(1.0)
    h = LFUDecay(1, decay=1.0)
    h.admit(7), h.touch(7), h.touch(7)
    h.admit(8)  # evicts 7
    h.admit(7)  # back with its history
    assert h.count(7) == 4.0


# ---------------------------------------------------------------- simulator


def brute_force_best(groups: list[list[int]], capacity: int) -> int:
    """Most hits any eviction schedule can get (every miss admitted, the group protected)."""
    states = {frozenset(): 0}
    for ids in groups:
        nxt: dict[frozenset, int] = {}
        for state, hits in states.items():
            h = hits + sum(e in state for e in ids)
            keep = state - set(ids)
            need = len(state | set(ids)) - capacity
            for drop in itertools.combinations(sorted(keep), max(need, 0)):
                s = (state | set(ids)) - set(drop)
                nxt[s] = max(nxt.get(s, -1), h)
        states = nxt
    return max(states.values())


def test_belady_is_optimal_on_tiny_traces():
    for seed in range(12):
        trace = random_trace(10, 1, 6, 2, seed)
        for capacity in (2, 3, 4):
            best = brute_force_best([t[0] for t in trace], capacity)
            assert simulate(trace, "belady", capacity).hits == best, (seed, capacity)


@pytest.mark.parametrize("source", ["random", "synthetic"])
def test_belady_beats_every_policy(source):
    if source == "random":
        trace = random_trace(300, 3, 16, 4, seed=1)
        caps = [2, 4, 6, 9, 12]
        k = 4
    else:
        trace = synthetic_trace(300, 4, experts=32, k=4, seed=2)
        caps = [2, 4, 8, 16, 24]
        k = 4
    res = {(r.policy, r.capacity): r.hits for r in sweep(trace, ["lru", "lfu", "belady"], caps)}
    glob = {
        (r.policy, r.capacity): r.hits
        for r in sweep(trace, ["global-lru", "global-lfu", "global-belady"], caps)
    }
    for c in caps:
        assert res["belady", c] >= max(res["lru", c], res["lfu", c])
        assert glob["global-belady", c] >= max(glob["global-lru", c], glob["global-lfu", c])
        if c >= k:  # below top-k the per-layer caches stream (skip caching), which global ones never do
            assert glob["global-belady", c] >= res["belady", c]


def test_global_and_per_layer_lru_agree_under_equal_demand():
    """Equal, interleaved demand, the same total slots: one LRU over all layers matches
    per-layer LRUs within 0.5 % once each layer's share is 3 × top-k or more. Just above top-k
    the global LRU is worse: a reuse two tokens apart has ~layers × (distinct experts in two
    tokens) keys in between, nearly the same every time, so it is all or nothing, while some
    per-layer caches still hit. Below top-k per layer it sees a cyclic scan longer than itself
    and gets no hits at all."""
    trace = synthetic_trace(500, 6, experts=64, k=4, seed=4)
    for capacity in (12, 16, 32):
        per_layer = simulate(trace, "lru", capacity).hit_rate
        glob = simulate(trace, "global-lru", capacity).hit_rate
        assert abs(per_layer - glob) < 0.005, (capacity, per_layer, glob)
    for capacity in (5, 6, 8):
        assert simulate(trace, "global-lru", capacity).hits < simulate(trace, "lru", capacity).hits
    assert simulate(trace, "global-lru", 3).hits == 0
    assert simulate(trace, "lru", 3).hits > 0


def test_everything_fits_means_only_first_uses_miss():
    trace = random_trace(200, 2, 10, 3, seed=5)
    for policy in ("lru", "lfu", "belady", "global-lru"):
        r = simulate(trace, policy, 10)
        assert r.misses == 2 * 10 and r.layer_accesses == [600, 600]
    direct = LRU(10)  # the shortcut agrees with running the cache
    assert sum(len(direct.access(t[0]).hits) for t in trace) == r.layer_hits[0]


def test_simulate_rejects_unknown_policies_and_takes_arrays():
    np = pytest.importorskip("numpy")
    trace = random_trace(50, 2, 8, 2, seed=6)
    assert simulate(np.array(trace), "lru", 4) == simulate(trace, "lru", 4)
    with pytest.raises(ValueError):
        simulate(trace, "mru", 4)


# ---------------------------------------------------------------- trace files


def test_trace_round_trip(tmp_path):
    trace = random_trace(20, 3, 128, 8, seed=7)
    path = tmp_path / "routing.jsonl"
    write_trace(path, trace)
    assert read_trace(path) == trace
    assert path.read_text().splitlines()[0].startswith('{"experts":[[')
    assert [p.name for p in tmp_path.iterdir()] == ["routing.jsonl"]


def test_writer_publishes_only_on_close(tmp_path):
    path = tmp_path / "t.jsonl"
    w = TraceWriter(path)
    w.add([[1, 2], [3, 4]])
    assert not path.exists()  # still under a temporary name
    w.close()
    assert read_trace(path) == [[[1, 2], [3, 4]]]
    w.close()  # twice is harmless


def test_writer_leaves_nothing_when_not_closed(tmp_path):
    path = tmp_path / "t.jsonl"
    with pytest.raises(RuntimeError), TraceWriter(path) as w:
        w.add([[1, 2]])
        raise RuntimeError("generation failed")
    assert list(tmp_path.iterdir()) == []
    w = TraceWriter(path)
    w.add([[1, 2]])
    del w
    gc.collect()
    assert list(tmp_path.iterdir()) == []
    write_trace(path, [[[5]]])
    w = TraceWriter(path)  # an aborted rewrite keeps the old file
    w.add([[6]])
    w.abort()
    assert read_trace(path) == [[[5]]] and [p.name for p in tmp_path.iterdir()] == ["t.jsonl"]


def test_read_trace_names_the_bad_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"experts": [[1, 2]]}\n\n{"experts": [[1, 2], [3]]}\n')
    with pytest.raises(ValueError, match=":3: 2 layers"):
        read_trace(path)
    path.write_text('{"experts": [[1, 2]]}\nnot json\n')
    with pytest.raises(ValueError, match=":2: not a routing trace"):
        read_trace(path)


# ---------------------------------------------------------------- synthetic traces


def test_synthetic_trace_matches_published_locality():
    trace = synthetic_trace(1000, 8, seed=0)
    assert len(trace) == 1000 and all(
        len(t) == 8 and all(len(ids) == len(set(ids)) == 8 for ids in t) for t in trace
    )
    s = trace_stats(trace)
    assert s["repeat_next"] == pytest.approx(0.45, abs=0.02)
    assert s["within_8"] == pytest.approx(0.80, abs=0.02)
    assert s["median_reuse"] == 2
    assert s["distinct_min"] == 128  # the long tail gets used
    assert synthetic_trace(50, 2, seed=0) == synthetic_trace(50, 2, seed=0)


def test_synthetic_trace_follows_its_parameters():
    s = trace_stats(synthetic_trace(800, 4, experts=64, k=4, seed=1, p_repeat_next=0.3, p_within_8=0.6))
    assert s["repeat_next"] == pytest.approx(0.3, abs=0.02)
    assert s["within_8"] == pytest.approx(0.6, abs=0.02)


def test_trace_stats_by_hand():
    trace = [[[1, 2]], [[1, 3]], [[2, 3]]]
    s = trace_stats(trace)
    # picks after token 0: 1 (d=1), 3 (new), 2 (d=2), 3 (d=1)
    assert s["repeat_next"] == 0.5 and s["within_8"] == 0.75 and s["median_reuse"] == 1.5
    assert s["distinct_per_layer"] == [3]
