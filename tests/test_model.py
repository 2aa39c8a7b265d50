"""Logits and greedy tokens equal to transformers' Qwen3MoeForCausalLM on the same random checkpoint."""

from __future__ import annotations

import pytest
import torch

from qwenlocal import load_model
from qwenlocal.generation.generate import Generator, SamplingParams

from .conftest import SMALL_VOCAB

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "fp32-sharded": ({}, {"dtype": torch.float32, "shard_size": 150_000}),
    "bf16": ({}, {"dtype": torch.bfloat16}),
    "spelling-5x": ({}, {"dtype": torch.float32, "spelling": "5.x"}),
    "mlp-only-layers": ({"num_hidden_layers": 3, "mlp_only_layers": [1]}, {"dtype": torch.float32}),
    "sparse-step-2": ({"num_hidden_layers": 4, "decoder_sparse_step": 2}, {"dtype": torch.float32}),
    "tied": ({"tie_word_embeddings": True}, {"dtype": torch.float32}),
    "yarn": (
        {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}},
        {"dtype": torch.float32},
    ),
    "bias-no-norm-topk": ({"attention_bias": True, "norm_topk_prob": False}, {"dtype": torch.float32}),
    "head-dim-explicit": ({"head_dim": 32, "num_experts_per_tok": 3}, {"dtype": torch.float32}),
}
PROMPT = torch.tensor([[17, 923, 4, 511, 77, 1000, 3, 250, 64, 9, 800, 12]])


def reference(folder, dtype=torch.float32):
    model = transformers.Qwen3MoeForCausalLM.from_pretrained(folder, dtype=dtype)
    return model.eval()


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, checkpoint_factory):
    overrides, kw = CONFIGS[request.param]
    folder = checkpoint_factory(f"model-{request.param}", {**SMALL_VOCAB, **overrides}, **kw)
    return load_model(folder, dtype=torch.float32), reference(folder)


def test_full_prompt_logits(pair):
    ours, ref = pair
    with torch.no_grad():
        expected = ref(PROMPT).logits
    got = ours(PROMPT)
    assert got.shape == expected.shape == (1, PROMPT.shape[1], 1024)
    assert (got - expected).abs().max().item() < 1e-4


def test_decode_through_kv_cache(pair):
    ours, ref = pair
    with torch.no_grad():
        expected = ref(PROMPT).logits[0]
    cache = ours.new_cache(64)
    got = torch.cat([ours(PROMPT[:, i : i + 1], cache=cache)[0] for i in range(PROMPT.shape[1])])
    assert (got - expected).abs().max().item() < 1e-4
    # a chunk after cached tokens (chunked prefill) too
    cache = ours.new_cache(64)
    ours(PROMPT[:, :5], cache=cache)
    got = ours(PROMPT[:, 5:], cache=cache)[0]
    assert (got - expected[5:]).abs().max().item() < 1e-4


MARGIN = 1e-3  # 10x the logits' agreement: a top-2 gap this wide cannot flip between kernels


def test_32_greedy_tokens(pair):
    """Our greedy tokens equal transformers' up to the first step where transformers' own top two
    are closer than MARGIN (past it, either pick is right and the paths may part)."""
    ours, ref = pair
    with torch.no_grad():
        out = ref.generate(
            PROMPT,
            max_new_tokens=32,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            output_scores=True,
            return_dict_in_generate=True,
        )
    expected = out.sequences[0, PROMPT.shape[1] :].tolist()
    gaps = [float(s[0].topk(2).values.diff().abs()) for s in out.scores]
    clear = next((i for i, g in enumerate(gaps) if g < MARGIN), len(gaps))
    gen = Generator(ours, ctx_size=64, prefill_chunk=5)
    got = gen.run(PROMPT[0].tolist(), SamplingParams(temperature=0), max_tokens=32, eos_ids=()).token_ids
    assert len(expected) == len(got) == 32
    assert clear >= 24, gaps  # the random weights give clear margins: the test compares most steps
    assert got[:clear] == expected[:clear]


def test_bf16_compute_close(checkpoint_factory):
    folder = checkpoint_factory("model-bf16", SMALL_VOCAB, dtype=torch.bfloat16)
    ours = load_model(folder, dtype=torch.bfloat16)
    ref = reference(folder, torch.bfloat16)
    with torch.no_grad():
        expected = ref(PROMPT).logits.float()
    got = ours(PROMPT)
    assert got.dtype == torch.float32
    # bf16 has ~3 significant digits; the two implementations round in different places
    assert (got - expected).abs().max().item() < 0.1
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean().item() >= 0.9


def test_batch_of_two_equals_each_alone(small_ckpt):
    model = load_model(small_ckpt, dtype=torch.float32)
    a, b = PROMPT, PROMPT.flip(1)
    both = model(torch.cat([a, b]))
    assert torch.allclose(both[0], model(a)[0], atol=1e-5)
    assert torch.allclose(both[1], model(b)[0], atol=1e-5)
