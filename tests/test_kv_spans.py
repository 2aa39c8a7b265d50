"""Decode attention that costs what the cache holds: the replayed step reads the smallest KV span
(256, 512, 1024, ...) holding its keys; run eagerly on the CPU it equals unmasked attention over
exactly those keys; the memory model and `vram` count the spans, not the whole context."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from qwenlocal import load_model
from qwenlocal.model import qwen3_moe as model_mod
from qwenlocal.model.config import Qwen3MoeConfig
from qwenlocal.model.graphs import GraphDecoder, graph_bytes, kv_bucket, kv_spans
from qwenlocal.planning import memory
from qwenlocal.planning.gpus import SPEED_AT_TOKENS, bytes_per_step, kv_read_bytes

from .conftest import TINY


def test_kv_bucket_is_the_smallest_span_that_holds_the_keys():
    assert [kv_bucket(k, 32768) for k in (1, 255, 256, 257, 512, 513, 1025)] == [
        256, 256, 256, 512, 512, 1024, 2048
    ]  # fmt: skip
    assert kv_bucket(32768, 32768) == 32768 and kv_bucket(20000, 32768) == 32768
    assert kv_bucket(700, 1000) == 1000 and kv_bucket(3, 100) == 100  # never past the cache
    for bad in (0, 1001):
        with pytest.raises(ValueError):
            kv_bucket(bad, 1000)
    assert kv_spans(32768) == [256, 512, 1024, 2048, 4096, 8192, 16384, 32768]
    assert len(kv_spans(131072)) == 10 and kv_spans(1000) == [256, 512, 1000] and kv_spans(100) == [100]
    assert set(kv_spans(5000)) == {kv_bucket(k, 5000) for k in range(1, 5001)}


@pytest.fixture(scope="module")
def tiny(checkpoint_factory):
    folder = checkpoint_factory("kv-spans", TINY, dtype=torch.float32)
    return load_model(folder, dtype=torch.float32)


@pytest.mark.parametrize("p", [255, 256, 257, 511, 512, 513])
def test_replayed_step_equals_attention_over_exactly_its_keys(tiny, monkeypatch, p):
    """The step a graph captures for position p - 1 (p keys after it), run eagerly: it reads the
    span kv_bucket(p) through a mask and equals the step that reads exactly p keys unmasked."""
    max_len = 2048
    gen_ids = torch.randint(0, tiny.config.vocab_size, (1, p), generator=torch.Generator().manual_seed(p))
    cache = tiny.new_cache(max_len)
    tiny(gen_ids[:, :-1], cache=cache)  # p - 1 keys stored
    decoder = GraphDecoder(tiny, cache)
    decoder.x.copy_(tiny.embed(gen_ids[:, -1:]))
    decoder.pos.fill_(p - 1)
    spans = []
    real = F.scaled_dot_product_attention

    def sdpa(q, k, v, *args, **kw):
        spans.append(k.shape[-2])
        return real(q, k, v, *args, **kw)

    monkeypatch.setattr(model_mod.F, "scaled_dot_product_attention", sdpa)
    # the Python layers, whose SDPA calls are counted (cpu_decode's operator makes the same from C++)
    monkeypatch.setattr(model_mod.cpu_decode.OPERATOR, "status", "failed")
    replayed = decoder.eager(kv_bucket(p, max_len))[0, -1]
    assert set(spans) == {kv_bucket(p, max_len)} and kv_bucket(p, max_len) < max_len
    spans.clear()
    exact = tiny.step(decoder.x, decoder.pos, cache, p)[0, -1]  # unmasked, exactly p keys
    assert set(spans) == {p}
    torch.testing.assert_close(replayed, exact, atol=1e-5, rtol=1e-5)


def test_memory_model_counts_the_graphs():
    c = Qwen3MoeConfig.builtin()
    plan = memory.make_plan(recipe=None, ctx_size=32768, dtype=torch.bfloat16, kv_dtype=None, device="cuda")
    est = memory.estimate(c, plan)
    assert (
        est.bytes_of("decode_graphs") == graph_bytes(c, 32768) == 8 * 151936 * 4 + 151936 * 2 + 32 * 32768 * 4
    )
    cpu = memory.estimate(c, plan.replace(device="cpu"))
    assert cpu.bytes_of("decode_graphs") == 0  # no graphs on the CPU
    offloaded = memory.estimate(c, plan.replace(expert_slots=48 * 16))
    assert offloaded.bytes_of("decode_graphs") == 0  # the offload cache is not captured


def test_vram_speed_reads_the_kv_span_reached_not_the_context():
    c = Qwen3MoeConfig.builtin()
    make = lambda ctx: memory.estimate(  # noqa: E731
        c, memory.make_plan(recipe=None, ctx_size=ctx, dtype=torch.bfloat16, kv_dtype=None, device="cuda")
    )
    short, long = make(4096), make(131072)
    per_token = memory.kv_cache_bytes(c, 1)
    assert kv_read_bytes(short) == kv_read_bytes(long) == kv_bucket(SPEED_AT_TOKENS, 4096) * per_token
    # the context's size no longer changes what a token reads (only the RoPE/graph tables differ)
    assert bytes_per_step(short) == bytes_per_step(long)
    assert kv_read_bytes(make(1000)) == 1000 * per_token  # a context shorter than the conversation


class FakeGraph:
    """torch.cuda.CUDAGraph on the CPU: 'replaying' runs the captured step eagerly again."""

    decoder: GraphDecoder | None = None

    def replay(self) -> None:
        d = self.decoder
        d.logits[d.span].copy_(d.eager())

    def pool(self):
        return ("pool", id(self))


@pytest.fixture
def cpu_graphs(monkeypatch):
    """GraphDecoder's CUDA calls replaced so that its span logic runs on the CPU."""
    from qwenlocal.model import graphs

    cuda = SimpleNamespace(
        device=lambda d: contextlib.nullcontext(),
        stream=lambda s: contextlib.nullcontext(),
        Stream=lambda d: SimpleNamespace(wait_stream=lambda other: None),
        current_stream=lambda d: SimpleNamespace(wait_stream=lambda other: None),
        CUDAGraph=FakeGraph,
        graph=lambda g, pool=None: contextlib.nullcontext(),
    )
    monkeypatch.setattr(graphs.torch, "cuda", cuda)
    monkeypatch.setattr(graphs, "graphs_supported", lambda m: True)


def test_decoder_replays_the_span_of_each_token_and_keeps_its_rope(tiny, cpu_graphs):
    from qwenlocal.generation.generate import Generator, SamplingParams
    from qwenlocal.model import graphs

    prompt = [3 + i for i in range(250)]
    greedy = SamplingParams(temperature=0)
    eager = Generator(tiny, ctx_size=1024)
    eager.graph = None
    want = eager.run(prompt, greedy, max_tokens=12, eos_ids=()).token_ids
    gen = Generator(tiny, ctx_size=1024)
    assert isinstance(gen.graph, graphs.GraphDecoder)
    FakeGraph.decoder = gen.graph
    got = gen.run(prompt, greedy, max_tokens=12, eos_ids=()).token_ids
    assert got == want  # positions 250..260: the 256-key span, then the 512-key one
    assert sorted(gen.graph.graphs) == [256, 512] and gen.graph.span == 512
    captured = gen.graph.rope
    Generator(tiny, ctx_size=tiny.rope.max_len + 1)  # a longer context makes new RoPE tables
    assert tiny.rope is not captured and gen.graph.rope is captured  # the graphs' tables stay alive
