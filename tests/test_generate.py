"""Sampling and the generation loop: records, summary, stops, cache reuse."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from qwenlocal import UserError, load_model
from qwenlocal.generation.generate import Generator, SamplingParams, Summary, TokenRecord, sample
from qwenlocal.generation.tokenizer import Tokenizer


def test_greedy_is_argmax():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert sample(logits, SamplingParams(temperature=0)) == 1


def test_top_k_one_is_greedy_even_when_hot():
    logits = torch.randn(1000)
    p = SamplingParams(temperature=5.0, top_k=1, top_p=1.0)
    assert all(sample(logits, p, torch.Generator().manual_seed(s)) == int(logits.argmax()) for s in range(20))


def test_top_p_keeps_the_smallest_prefix():
    # probabilities 0.5, 0.3, 0.2: top_p 0.7 keeps the first two only
    logits = torch.tensor([0.5, 0.3, 0.2]).log()
    p = SamplingParams(temperature=1.0, top_k=0, top_p=0.7)
    picks = {sample(logits, p, torch.Generator().manual_seed(s)) for s in range(200)}
    assert picks == {0, 1}


def test_min_p_drops_unlikely_tokens():
    logits = torch.tensor([0.6, 0.3, 0.1]).log()
    p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.2)  # threshold 0.12
    picks = {sample(logits, p, torch.Generator().manual_seed(s)) for s in range(300)}
    assert picks == {0, 1}


def test_presence_penalty_moves_away_from_seen_tokens():
    logits = torch.tensor([2.0, 1.9])
    p = SamplingParams(temperature=0, presence_penalty=1.0)
    assert sample(logits, p, seen=torch.tensor([0])) == 1


def test_seed_is_reproducible():
    logits = torch.randn(5000)
    p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0)
    a = [sample(logits, p, torch.Generator().manual_seed(7)) for _ in range(5)]
    b = [sample(logits, p, torch.Generator().manual_seed(7)) for _ in range(5)]
    assert a == b


def test_mode_defaults(tiny_ckpt):
    generation = json.loads((tiny_ckpt / "generation_config.json").read_text())
    thinking = SamplingParams.for_mode(True, generation)
    assert (thinking.temperature, thinking.top_p, thinking.top_k, thinking.min_p) == (0.6, 0.95, 20, 0.0)
    plain = SamplingParams.for_mode(False, generation, top_k=5)
    assert (plain.temperature, plain.top_p, plain.top_k) == (0.7, 0.8, 5)
    with pytest.raises(UserError, match="top_p"):
        SamplingParams.for_mode(False, None, top_p=1.5)


@pytest.fixture(scope="module")
def tiny(tiny_ckpt):
    return load_model(tiny_ckpt, dtype=torch.float32), Tokenizer.from_dir(tiny_ckpt)


def test_records_and_summary(tiny):
    model, tok = tiny
    gen = Generator(model, tok, ctx_size=128)
    prompt = tok.encode_chat([{"role": "user", "content": "Grüß dich! 你好"}])
    *records, s = gen.stream(prompt, SamplingParams(temperature=0), max_tokens=10, eos_ids=())
    assert isinstance(s, Summary) and all(isinstance(r, TokenRecord) for r in records)
    assert [r.index for r in records] == list(range(10))
    assert [r.token_id for r in records] == s.token_ids
    assert "".join(r.text for r in records) == s.text == tok.decode(s.token_ids)
    assert s.finish_reason == "length" and s.generated_tokens == 10 and s.prompt_tokens == len(prompt)
    assert s.prompt_tps > 0 and s.gen_tps > 0 and s.peak_memory_bytes > 0
    assert s.expert_cache is None and s.expert_hit_rate is None  # resident experts: no cache
    assert all(b.elapsed_s >= a.elapsed_s for a, b in zip(records, records[1:], strict=False))


def test_stops_at_eos(tiny):
    model, tok = tiny
    gen = Generator(model, tok, ctx_size=128)
    prompt = tok.encode("hello there")
    first = gen.run(prompt, SamplingParams(temperature=0), max_tokens=5, eos_ids=()).token_ids
    gen.reset()
    stopped = gen.run(prompt, SamplingParams(temperature=0), max_tokens=5, eos_ids=(first[2],))
    assert stopped.token_ids == first[:2] and stopped.finish_reason == "stop"


def test_stop_string_cuts_text(tiny):
    model, tok = tiny
    gen = Generator(model, tok, ctx_size=128)
    prompt = tok.encode("hello there")
    full = gen.run(prompt, SamplingParams(temperature=0), max_tokens=6, eos_ids=()).text
    assert len(full) >= 4  # six tokens of a byte-level vocabulary, special ones spelled out
    marker = full[len(full) // 2 : len(full) // 2 + 2]
    gen.reset()
    cut = gen.run(prompt, SamplingParams(temperature=0), max_tokens=6, eos_ids=(), stop=[marker])
    assert cut.finish_reason == "stop" and cut.text == full[: full.find(marker)]


def test_cancel_ends_with_a_cancelled_summary(tiny):
    model, tok = tiny
    gen = Generator(model, tok, ctx_size=128, prefill_chunk=2)
    prompt = tok.encode("one two three four five six seven")
    seen: list[TokenRecord] = []
    records = gen.stream(
        prompt, SamplingParams(temperature=0), max_tokens=50, eos_ids=(), cancel=lambda: len(seen) == 3
    )
    for r in records:
        if isinstance(r, Summary):
            break
        seen.append(r)
    assert (
        r.finish_reason == "cancelled"
        and r.generated_tokens == 3
        and r.token_ids == [x.token_id for x in seen]
    )
    # cancelled during the prefill: no token, and the cache holds the chunks that ran
    gen.reset()
    calls = []
    s = gen.run(
        prompt, SamplingParams(temperature=0), eos_ids=(), cancel=lambda: calls.append(1) or len(calls) == 2
    )
    assert (s.finish_reason, s.generated_tokens) == ("cancelled", 0) and gen.cached == prompt[:4]


def test_context_full_stops_with_length(tiny):
    model, tok = tiny
    gen = Generator(model, tok, ctx_size=12)
    prompt = tok.encode("one two three four five")
    s = gen.run(prompt, SamplingParams(temperature=0), max_tokens=100, eos_ids=())
    assert s.finish_reason == "length" and len(prompt) + s.generated_tokens == 13


def test_prompt_longer_than_context(tiny):
    model, tok = tiny
    gen = Generator(model, tok, ctx_size=4)
    with pytest.raises(UserError, match="the context holds 4"):
        gen.run(tok.encode("one two three four five six"), SamplingParams(temperature=0))


def test_cache_reuse_equals_fresh_prefill(tiny):
    """A prompt that extends the cached tokens prefills only the new part, with the same tokens."""
    model, tok = tiny
    p = SamplingParams(temperature=0)
    gen = Generator(model, tok, ctx_size=256)
    turn1 = tok.encode_chat([{"role": "user", "content": "first question"}])
    reply = gen.run(turn1, p, max_tokens=6, eos_ids=()).text
    turn2 = tok.encode_chat(
        [
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": reply},
            {"role": "user", "content": "second"},
        ]
    )
    reused = gen.run(turn2, p, max_tokens=6, eos_ids=())
    assert reused.cached_tokens >= len(turn1) - 1
    fresh = Generator(model, tok, ctx_size=256).run(turn2, p, max_tokens=6, eos_ids=())
    assert fresh.cached_tokens == 0
    assert reused.token_ids == fresh.token_ids


def test_fp8_kv_cache_stores_rounded_keys_at_half_the_size(tiny_ckpt):
    model = load_model(tiny_ckpt, dtype=torch.bfloat16)
    prompt = list(range(1000, 1040))
    ref = Generator(model, ctx_size=64)
    ref_logits = ref.prefill(prompt)
    plan = model.plan
    model.plan = dataclasses.replace(plan, kv_dtype=torch.float8_e4m3fn)
    try:
        small = Generator(model, ctx_size=64)
        assert small.cache.nbytes * 2 == ref.cache.nbytes
        small.prefill(prompt[:20])
        logits = small.prefill(prompt[20:])  # the second chunk attends through the fp8 cache
    finally:
        model.plan = plan
    # layer 0's keys do not depend on the cache: stored exactly as the bf16 keys rounded to fp8
    want = ref.cache.k[0][:, :, :40].to(torch.float8_e4m3fn).to(torch.bfloat16)
    assert torch.equal(small.cache.k[0][:, :, :40].to(torch.bfloat16), want)
    assert torch.isfinite(logits).all()
    # a random model amplifies the 3-mantissa-bit rounding; the logits still point the same way
    cos = torch.nn.functional.cosine_similarity(logits.float(), ref_logits.float(), dim=0)
    assert cos > 0.8


def test_an_interrupted_graph_step_leaves_no_phantom_token(tiny):
    """A Ctrl-C (or a capture error) inside the graph decode before the replay: the next turn
    reuses only what the cache really holds and equals a fresh run."""
    model, tok = tiny
    greedy = SamplingParams(temperature=0)
    prompt = tok.encode("one two three four")

    def interrupted(token: int) -> torch.Tensor:
        raise KeyboardInterrupt

    gen = Generator(model, tok, ctx_size=64)
    gen.graph = interrupted
    with pytest.raises(KeyboardInterrupt):
        gen.run(prompt, greedy, max_tokens=3, eos_ids=())
    gen.graph = None
    first = Generator(model, tok, ctx_size=64).run(prompt, greedy, max_tokens=1, eos_ids=()).token_ids
    assert gen.cached == prompt and gen.cache.length == len(prompt)
    follow_up = prompt + first + tok.encode(" five six")
    again = gen.run(follow_up, greedy, max_tokens=4, eos_ids=())
    fresh = Generator(model, tok, ctx_size=64).run(follow_up, greedy, max_tokens=4, eos_ids=())
    assert again.cached_tokens == len(prompt) and again.token_ids == fresh.token_ids
