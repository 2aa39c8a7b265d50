"""A resident decode step with moe="grouped" keeps everything on the device: no host reads, a
bounded number of aten calls per layer; and the grouped model decodes like the loop model."""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qwenlocal import UserError, load_model
from qwenlocal.generation.generate import Generator, SamplingParams

from .conftest import TINY

PROMPT = [17, 923, 4, 511, 77, 1000, 3, 250, 64, 9, 800, 12]
HOST_READS = ("tolist", "item", "cpu", "numpy", "__bool__")
MAX_ATEN_PER_LAYER = 100


@pytest.fixture(scope="module", params=["nf4", "mixed"])
def qckpt(request, checkpoint_factory):
    from quant.recipe import Recipe
    from qwenlocal.weights.quantize import quantize_checkpoint

    src = checkpoint_factory("step-src", {**TINY, "num_hidden_layers": 3}, dtype=torch.bfloat16)
    out = src.parent / f"step-{request.param}"
    if not out.exists():  # mixed: int4 experts (the default recipe), int8 attention
        quantize_checkpoint(src, out, Recipe.from_preset(request.param))
    return out


class AtenCalls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[str(func)] += 1
        return func(*args, **(kwargs or {}))


def count_step(model, monkeypatch) -> tuple[int, int, collections.Counter]:
    """(host reads, aten calls, calls by op) of one decode step after a prompt."""
    cache = model.new_cache(64)
    model(torch.tensor([PROMPT]), cache=cache)
    token = torch.tensor([[5]])
    reads = collections.Counter()
    for name in HOST_READS:
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, _name=name, **kw):
            reads[_name] += 1
            return _orig(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    with AtenCalls() as mode:
        model(token, cache=cache)
    monkeypatch.undo()
    return sum(reads.values()), sum(mode.calls.values()), mode.calls


def test_grouped_decode_step_stays_on_the_device(qckpt, monkeypatch):
    """Custom ops (the grouped kernels, qmatmul) count once, as on the GPU where each is a launch.
    nf4 attention on the CPU goes through quant.linear's dequantize, which reads its code book."""
    if "nf4" in qckpt.name:
        pytest.skip("the CPU's 4-bit qlinear reads its code book back (quant.formats._code_pairs)")
    model = load_model(qckpt, dtype=torch.bfloat16, moe="grouped")
    reads, calls, by_op = count_step(model, monkeypatch)
    layers = model.config.num_hidden_layers
    assert reads == 0
    assert calls / layers <= MAX_ATEN_PER_LAYER, by_op.most_common(40)
    # the counters can fail: the loop path reads the routing back in every layer
    loop = load_model(qckpt, dtype=torch.bfloat16, moe="loop")
    reads, loop_calls, _ = count_step(loop, monkeypatch)
    assert reads >= layers and loop_calls > calls


def test_grouped_model_decodes_like_the_loop_model(qckpt):
    loop = load_model(qckpt, dtype=torch.float32, moe="loop")
    grouped = load_model(qckpt, dtype=torch.float32, moe="grouped")
    ids = torch.tensor([PROMPT[:6]])  # a prefill batch the grouped kernels take (6 <= 16 tokens)
    assert torch.allclose(grouped(ids), loop(ids), atol=1e-4, rtol=1e-4)
    p = SamplingParams(temperature=0)
    a, b = Generator(loop, ctx_size=64), Generator(grouped, ctx_size=64)
    assert (
        a.run(PROMPT, p, max_tokens=16, eos_ids=()).token_ids
        == b.run(PROMPT, p, max_tokens=16, eos_ids=()).token_ids
    )


def test_fixed_shape_step_equals_forward(small_ckpt):
    """The step a CUDA graph captures (whole cache, masked; positions on the device) gives the
    forward's logits."""
    model = load_model(small_ckpt, dtype=torch.float32, moe="grouped")
    cache_a, cache_b = model.new_cache(32), model.new_cache(32)
    model(torch.tensor([PROMPT]), cache=cache_a)
    model(torch.tensor([PROMPT]), cache=cache_b)
    for i, tok in enumerate([5, 77, 300]):
        want = model(torch.tensor([[tok]]), cache=cache_a)
        with torch.inference_mode():
            x = model.embed(torch.tensor([[tok]]))
            got = model.step(x, torch.tensor([len(PROMPT) + i]), cache_b, None)
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_bad_moe_value_is_a_user_error(small_ckpt):
    with pytest.raises(UserError, match="--moe"):
        load_model(small_ckpt, moe="fast")


@pytest.mark.parametrize("per_layer", [2, 5])
def test_offloaded_grouped_equals_resident(qckpt, per_layer):
    """Misses copied as one batch into slots, all k picks computed through the slot table: the same
    logits and tokens as the resident grouped model, bit for bit."""
    resident = load_model(qckpt, dtype=torch.float32, moe="grouped")
    layers = len(resident.config.moe_layers)
    model = load_model(qckpt, dtype=torch.float32, moe="grouped", gpu_experts=per_layer * layers)
    p = SamplingParams(temperature=0)
    # one token at a time: every step takes the grouped path in both models
    a, b = Generator(resident, ctx_size=64, prefill_chunk=1), Generator(model, ctx_size=64, prefill_chunk=1)
    for tok in PROMPT[:6]:
        assert torch.equal(a.prefill([tok]), b.prefill([tok]))
    a.reset(), b.reset()
    before = model.experts.stats.snapshot()
    assert (
        a.run(PROMPT, p, max_tokens=12, eos_ids=()).token_ids
        == b.run(PROMPT, p, max_tokens=12, eos_ids=()).token_ids
    )
    t = model.experts.stats.since(before).total()
    assert t.misses > 0 and t.hits + t.misses >= 11 * layers * resident.config.num_experts_per_tok
    assert t.bytes_copied == t.misses * model.experts.layout.nbytes
    # a small prefill batch whose experts fit the slots is grouped too; one that does not, the loop
    ids = torch.tensor([PROMPT[:3]])
    assert torch.allclose(model(ids), resident(ids), atol=1e-5, rtol=1e-5)
