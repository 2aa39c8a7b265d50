"""Expert offload on the CPU (the same code path as CUDA apart from the stream and pinning):
offloaded output equals fully resident output at every cache size; counters add up; LRU evicts
exactly what it should; bad sizes are clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from qwenlocal import UserError, load_model
from qwenlocal.experts import QuantExperts
from qwenlocal.generate import Generator, SamplingParams
from qwenlocal.offload import OffloadedExperts

from .conftest import TINY

PROMPT = [17, 923, 4, 511, 77, 1000, 3, 250, 64, 9, 800, 12, 4000, 1500, 6, 7, 99, 123, 45, 6789]
LAYERS = 3


@pytest.fixture(scope="module")
def qckpt(checkpoint_factory):
    """A quantized folder (mixed recipe) of a tiny model with 8 experts, top-2, 3 MoE layers."""
    from quant.convert import quantize_checkpoint
    from quant.recipe import Recipe

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
    # counters add up
    s = model.experts.stats.total()
    assert s.hits + s.misses == model.experts.uses
    assert s.bytes_copied == (s.misses + s.prefetched) * model.experts.layout.nbytes
    if not prefetch:
        assert s.prefetched == 0


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
    script = [(0, 1), (2, 0), (3, 4), (0, 2), (5, 0)]
    # hand-computed LRU (capacity 3, a token's two experts touched/admitted together)
    expected = [
        ({0, 1}, 0, 2),  # resident after, hits, misses
        ({0, 1, 2}, 1, 1),
        ({2, 3, 4}, 0, 2),  # 0 and 1 were least recent: both evicted
        ({0, 2, 4}, 1, 1),  # 3 evicted
        ({0, 2, 5}, 1, 1),  # 4 evicted
    ]
    for (a, b), (resident_after, hits, misses) in zip(script, expected, strict=True):
        before = experts.stats.layers[layer].hits, experts.stats.layers[layer].misses
        with torch.inference_mode():
            experts(layer, x, torch.tensor([[a, b]]), w)
        st = experts.stats.layers[layer]
        assert set(experts.policies[layer].resident()) == resident_after
        assert {e for (lay, e) in experts.slot_of if lay == layer} == resident_after
        assert (st.hits - before[0], st.misses - before[1]) == (hits, misses)


def test_prefill_streams_through_few_slots(qckpt, resident):
    """A long prompt touching every expert works with the minimum cache (top-k per layer)."""
    model = load_model(qckpt, dtype=torch.float32, gpu_experts=2 * LAYERS)
    long_prompt = torch.tensor([list(range(100, 400, 3))])
    assert torch.equal(model(long_prompt), resident(long_prompt))


def test_prefetch_recall_is_measured(qckpt):
    model = load_model(qckpt, dtype=torch.float32, gpu_experts=4 * LAYERS, prefetch=True)
    greedy(model, n=10)
    recall = model.experts.stats.prefetch_recall
    assert recall is not None and 0.0 <= recall <= 1.0


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
    from qwenlocal.memory import Plan, estimate

    model = load_model(qckpt, dtype=torch.float32, gpu_experts=3 * LAYERS)
    config = model.config
    one = model.experts.layout.nbytes
    from quant.recipe import Recipe

    plan = Plan(
        recipe=Recipe.from_preset("mixed"), ctx_size=4096, dtype=torch.float32, device="cpu", expert_slots=0
    )
    without = estimate(config, plan).gpu_total
    budget = without + 4 * LAYERS * one + one // 2  # room for 4 per layer and a half
    sized = load_model(qckpt, dtype=torch.float32, vram_budget=budget)
    assert sized.experts.slots_per_layer == 4


def test_record_routing(qckpt, tmp_path):
    from qwenlocal.cache_policy import read_trace
    from qwenlocal.experts import RoutingRecorder

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
    from qwenlocal.engine import Stats, expert_cache_stats

    def served(model):  # the server's counters, summed from the generations' last records
        stats = Stats()
        gen = Generator(model, ctx_size=64, prefill_chunk=8)
        stats.record(gen.run(PROMPT, SamplingParams(temperature=0), max_tokens=4, eos_ids=()))
        return stats

    resident = load_model(qckpt, dtype=torch.float32)
    assert expert_cache_stats(served(resident), resident) is None
    model = load_model(qckpt, dtype=torch.float32, gpu_experts=3 * LAYERS)
    d = expert_cache_stats(served(model), model)
    assert d["hits"] + d["misses"] == model.experts.uses and 0 <= d["hit_rate"] <= 1
    assert d["slots_per_layer"] == 3 and d["bytes_copied"] > 0
