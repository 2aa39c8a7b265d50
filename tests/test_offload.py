"""Expert offload on the CPU (the same code path as CUDA apart from the stream and pinning):
offloaded output equals fully resident output at every cache size; counters add up; LRU evicts
exactly what it should; bad sizes are clear errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from quant.int4 import cpu_packing
from qwenlocal import UserError, load_model
from qwenlocal.experts.offload import OffloadedExperts
from qwenlocal.experts.store import QuantExperts
from qwenlocal.generation.generate import Generator, SamplingParams

from .conftest import TINY

PROMPT = [17, 923, 4, 511, 77, 1000, 3, 250, 64, 9, 800, 12, 4000, 1500, 6, 7, 99, 123, 45, 6789]
LAYERS = 3


@pytest.fixture(scope="module")
def qckpt(checkpoint_factory):
    """A quantized folder (mixed recipe) of a tiny model with 8 experts, top-2, 3 MoE layers."""
    from quant.recipe import Recipe
    from qwenlocal.weights.quantize import quantize_checkpoint

    src = checkpoint_factory("offload-src", {**TINY, "num_hidden_layers": LAYERS}, dtype=torch.bfloat16)
    out = src.parent / "offload-q"
    if not out.exists():
        quantize_checkpoint(src, out, Recipe.from_preset("mixed"))
    return out


def greedy(model, n=12):
    gen = Generator(model, ctx_size=64, prefill_chunk=8)
    return gen.run(PROMPT, SamplingParams(temperature=0), max_tokens=n, eos_ids=()).token_ids


@pytest.fixture(scope="module")
def resident(qckpt):
    model = load_model(qckpt, dtype=torch.float32)
    assert type(model.experts) is QuantExperts
    return model


@pytest.mark.parametrize("per_layer", [2, 3, 5, 7, 8])
@pytest.mark.parametrize("prefetch", [True, False])
def test_offloaded_equals_resident(qckpt, resident, per_layer, prefetch):
    model = load_model(qckpt, dtype=torch.float32, gpu_experts=per_layer * LAYERS, prefetch=prefetch)
    expected_logits = resident(torch.tensor([PROMPT]))
    if per_layer == 8:  # everything fits: the plain resident experts, no cache
        assert type(model.experts) is QuantExperts
        return
    assert isinstance(model.experts, OffloadedExperts) and model.experts.slots_per_layer == per_layer
    assert torch.equal(model(torch.tensor([PROMPT])), expected_logits)
    assert greedy(model) == greedy(resident)
    if not prefetch:
        s = model.experts.stats.total()
        assert s.prefetched == s.prefetch_useful == s.predicted == 0


@pytest.mark.parametrize("per_layer", [2, 5])
def test_offloaded_int4_is_stored_as_the_resident_model_keeps_it(qckpt, per_layer):
    """The host store, and so the slots, hold int4 in this CPU's kernel layout, as resident experts
    on the CPU do: in bf16 both run torch's int4 kernel and agree bit for bit."""
    packing = cpu_packing()
    if packing is None:
        pytest.skip("torch's CPU int4 layout is not one quant.int4 reads: the blobs stay as stored")
    resident = load_model(qckpt, dtype=torch.bfloat16)
    model = load_model(qckpt, dtype=torch.bfloat16, gpu_experts=per_layer * LAYERS)
    assert model.experts.layout == resident.experts.layout
    assert any(s.packing == packing for s in model.experts.layout.specs.values())
    prompt = torch.tensor([PROMPT])
    assert torch.equal(model(prompt), resident(prompt))
    assert greedy(model) == greedy(resident)


def test_nothing_allocated_during_generation(qckpt):
    model = load_model(qckpt, dtype=torch.float32, gpu_experts=3 * LAYERS)
    experts = model.experts
    slots_ptr = experts.slot_buf.data_ptr()
    store_ptrs = {layer: b.data_ptr() for layer, b in experts.blobs.items()}
    greedy(model, n=16)
    assert experts.slot_buf.data_ptr() == slots_ptr
    assert {layer: b.data_ptr() for layer, b in experts.blobs.items()} == store_ptrs
    assert len(experts._slot_views) <= experts.slot_buf.shape[0]
    # every cached view points into the one preallocated slot buffer
    lo, hi = slots_ptr, slots_ptr + experts.slot_buf.numel()
    for views in experts._slot_views.values():
        for q in views.values():
            assert lo <= q.weight.data_ptr() < hi


def test_lru_evicts_exactly_what_lru_says(qckpt):
    """A scripted routing sequence through one layer with 3 slots."""
    model = load_model(qckpt, dtype=torch.float32, gpu_experts=3 * LAYERS, prefetch=False, policy="lru")
    experts = model.experts
    layer = 0
    x = torch.randn(1, model.config.hidden_size)
    w = torch.full((1, 2), 0.5)
    script = [(0, 1), (2, 0), (3, 4), (0, 2), (5, 0), (0, 5)]
    # hand-computed LRU (capacity 3, a token's two experts touched/admitted together)
    expected = [
        ({0, 1}, 0, 2, 0),  # resident after, hits, misses, evictions
        ({0, 1, 2}, 1, 1, 0),
        ({2, 3, 4}, 0, 2, 2),  # 0 and 1 were least recent: both evicted
        ({0, 2, 4}, 1, 1, 1),  # 3 evicted
        ({0, 2, 5}, 1, 1, 1),  # 4 evicted
        ({0, 2, 5}, 2, 0, 0),  # all hits: nothing copied, nothing waited for
    ]
    fields = ("hits", "misses", "evictions", "bytes_copied", "wait_s")
    for (a, b), (resident_after, hits, misses, evictions) in zip(script, expected, strict=True):
        before = [getattr(experts.stats.layers[layer], f) for f in fields]
        with torch.inference_mode():
            experts(layer, x, torch.tensor([[a, b]]), w)
        st = experts.stats.layers[layer]
        got = dict(
            zip(fields, [getattr(st, f) - v for f, v in zip(fields, before, strict=True)], strict=True)
        )
        assert set(experts.policies[layer].resident()) == resident_after
        assert {e for (lay, e) in experts.slot_of if lay == layer} == resident_after
        assert (got["hits"], got["misses"], got["evictions"]) == (hits, misses, evictions)
        assert got["bytes_copied"] == misses * experts.layout.nbytes
        # on the CPU the copies are synchronous: the computation waits exactly while they run
        assert (got["wait_s"] > 0) == (misses > 0)
    assert sum(s.hits for s in experts.stats.layers.values()) == 5  # the other layers saw nothing


def test_prefill_streams_through_few_slots(qckpt, resident):
    """A long prompt touching every expert works with the minimum cache (top-k per layer)."""
    model = load_model(qckpt, dtype=torch.float32, gpu_experts=2 * LAYERS)
    long_prompt = torch.tensor([list(range(100, 400, 3))])
    assert torch.equal(model(long_prompt), resident(long_prompt))


def test_prefetch_counters(qckpt):
    """A guess of {3, 4} before a token that uses {3, 5}, worked by hand (LRU, 3 slots)."""
    model = load_model(qckpt, dtype=torch.float32, gpu_experts=3 * LAYERS, prefetch=True, policy="lru")
    experts = model.experts
    experts.attach_router(lambda layer, hidden: torch.tensor([[3, 4]]))
    x = torch.randn(1, model.config.hidden_size)
    w = torch.full((1, 2), 0.5)
    with torch.inference_mode():
        experts(0, x, torch.tensor([[0, 1]]), w)  # misses 0, 1; one slot left
        experts.prefetch(0, x.view(1, 1, -1))  # copies 3 (free slot) and 4 (evicts 0)
        assert set(experts.policies[0].resident()) == {1, 3, 4}
        experts(0, x, torch.tensor([[3, 5]]), w)  # 3 was prefetched: a hit; 5 misses, evicts 1
    st = experts.stats.layers[0]
    assert (st.hits, st.misses, st.evictions) == (1, 3, 2)
    assert (st.prefetched, st.prefetch_useful) == (2, 1)
    assert (st.predicted, st.actual) == (1, 2) and experts.stats.prefetch_recall == 0.5
    assert st.bytes_copied == 5 * experts.layout.nbytes  # 3 misses and 2 prefetches


def test_too_small_budgets(qckpt):
    with pytest.raises(UserError, match="at least 6 \\(2 per MoE layer\\)"):
        load_model(qckpt, gpu_experts=5)
    with pytest.raises(UserError, match="cannot hold this model: it needs at least"):
        load_model(qckpt, vram_budget=1024**2)
    with pytest.raises(UserError, match="not both"):
        load_model(qckpt, gpu_experts=6, vram_budget=2**30)


def test_offload_needs_quantized_experts(checkpoint_factory):
    src = checkpoint_factory("offload-src", {**TINY, "num_hidden_layers": LAYERS}, dtype=torch.bfloat16)
    with pytest.raises(UserError, match="needs quantized experts"):
        load_model(src, gpu_experts=6)


def test_budget_sizes_the_cache(qckpt):
    from qwenlocal.planning.memory import estimate, make_plan

    model = load_model(qckpt, dtype=torch.float32, gpu_experts=3 * LAYERS)
    config = model.config
    one = model.experts.layout.nbytes
    from quant.recipe import Recipe

    plan = make_plan(
        recipe=Recipe.from_preset("mixed"),
        ctx_size=4096,
        dtype=torch.float32,
        kv_dtype=None,
        device="cpu",
        expert_slots=0,
    )
    without = estimate(config, plan).gpu_total
    budget = without + 4 * LAYERS * one + one // 2  # room for 4 per layer and a half
    sized = load_model(qckpt, dtype=torch.float32, vram_budget=budget)
    assert sized.experts.slots_per_layer == 4


def test_record_routing(qckpt, tmp_path):
    from qwenlocal.experts.store import RoutingRecorder
    from qwenlocal.planning.routing_trace import read_trace

    model = load_model(qckpt, dtype=torch.float32, gpu_experts=3 * LAYERS)
    model.experts.recorder = RoutingRecorder(tmp_path / "trace.jsonl", model.config)
    greedy(model, n=5)
    model.experts.recorder.close()
    trace = read_trace(tmp_path / "trace.jsonl")
    # every prompt token and every decoded token but the last (it is never fed back)
    assert len(trace) == len(PROMPT) + 4
    assert all(len(tok) == LAYERS and all(len(set(ids)) == 2 for ids in tok) for tok in trace)
    first = json.loads((tmp_path / "trace.jsonl").read_text().splitlines()[0])
    assert len(first["experts"]) == LAYERS


def test_server_reports_expert_cache(qckpt):
    from qwenlocal.generation.engine import Stats, expert_cache_stats

    def served(model):  # the server's counters, summed from the generations' last records
        stats = Stats()
        gen = Generator(model, ctx_size=64, prefill_chunk=8)
        stats.record(gen.run(PROMPT, SamplingParams(temperature=0), max_tokens=4, eos_ids=()))
        return stats

    resident = load_model(qckpt, dtype=torch.float32)
    assert expert_cache_stats(served(resident), resident) is None
    model = load_model(qckpt, dtype=torch.float32, gpu_experts=3 * LAYERS)
    d = expert_cache_stats(served(model), model)
    t = model.experts.stats.total()  # a fresh model: the one generation is all it counted
    assert (d["hits"], d["misses"], d["bytes_copied"]) == (t.hits, t.misses, t.bytes_copied)
    assert d["hit_rate"] == t.hits / (t.hits + t.misses) and d["slots_per_layer"] == 3


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_runtime_hits_equal_the_simulator(qckpt, tmp_path, policy):
    """Fed one token a step, the runtime cache hits exactly where the simulator replaying the
    recorded routing does, layer by layer."""
    from qwenlocal.experts.store import RoutingRecorder
    from qwenlocal.planning.cache_sim import simulate
    from qwenlocal.planning.routing_trace import read_trace

    model = load_model(qckpt, dtype=torch.float32, gpu_experts=3 * LAYERS, policy=policy)
    model.experts.recorder = RoutingRecorder(tmp_path / "trace.jsonl", model.config)
    gen = Generator(model, ctx_size=64, prefill_chunk=1)
    gen.run(PROMPT, SamplingParams(temperature=0), max_tokens=12, eos_ids=())
    model.experts.recorder.close()
    sim = simulate(read_trace(tmp_path / "trace.jsonl"), policy, 3)
    stats = model.experts.stats.layers
    assert [stats[layer].hits for layer in model.config.moe_layers] == sim.layer_hits
    assert sum(s.misses for s in stats.values()) == sim.misses


def test_every_storage_answers_the_same_questions(qckpt, resident):
    """What the rest of the program asks of an expert storage (experts.Experts): a resident one
    answers with the defaults, an offloaded one with its cache."""
    r = resident.experts
    assert (r.slots_per_layer, r.policy_name, r.stats) == (None, None, None)
    assert r.prefetch(1, torch.zeros(1, 1, resident.config.hidden_size)) is None
    assert [(c, t is r.blobs[layer]) for (c, t), layer in zip(r.held(), r.blobs, strict=True)] == [
        ("experts", True)
    ] * len(r.blobs)
    o = load_model(qckpt, dtype=torch.float32, gpu_experts=3 * LAYERS, policy="lru").experts
    assert (o.slots_per_layer, o.policy_name) == (3, "lru") and o.stats.hit_rate is None
    held = list(o.held())
    assert held[0][0] == "experts" and held[0][1] is o.slot_buf
    assert [c for c, _ in held[1:]] == ["expert_store"] * LAYERS


def test_no_module_probes_the_expert_storage():
    """Code reads the storage's interface, not `getattr(experts, ...)` guesses."""
    root = Path(__file__).resolve().parent.parent
    probe = re.compile(r"getattr\([^)]*experts")
    found = [
        f"{p.relative_to(root)}: {m.group(0)}"
        for pkg in ("qwenlocal", "quant")
        for p in sorted((root / pkg).rglob("*.py"))
        for m in probe.finditer(p.read_text(encoding="utf-8"))
    ]
    assert found == []
