"""The CUDA paths: run only where a GPU is present (bench/gpu_check.sh runs them on a lent H200).

On the CPU every test here is skipped; the same logic is covered by the CPU tests."""

from __future__ import annotations

import pytest
import torch

from quant.formats import dequantize, quantize
from quant.linear import qlinear
from qwenlocal import load_model
from qwenlocal.generation.generate import Generator, SamplingParams

from .conftest import TINY

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PROMPT = [17, 923, 4, 511, 77, 1000, 3, 250, 64, 9, 800, 12]


@cuda
@pytest.mark.parametrize("fmt, dq", [("nf4", False), ("nf4", True), ("fp4", True), ("int8", False)])
def test_quantize_on_gpu_equals_cpu(fmt, dq):
    w = torch.randn(768, 2048, dtype=torch.bfloat16)
    a, b = quantize(w, fmt, 64, dq), quantize(w.cuda(), fmt, 64, dq).to("cpu")
    for name, t in a.parts().items():
        assert torch.equal(t, b.parts()[name]), name


@cuda
@pytest.mark.parametrize("fmt", ["nf4", "int8"])
@pytest.mark.parametrize("rows", [1, 16])
def test_qlinear_on_gpu(fmt, rows):
    w = torch.randn(768, 2048, dtype=torch.bfloat16, device="cuda")
    q = quantize(w, fmt, 64, fmt == "nf4")
    x = torch.randn(rows, 2048, dtype=torch.bfloat16, device="cuda")
    want = torch.nn.functional.linear(x.float(), dequantize(q, torch.float32))
    got = qlinear(x, q).float()
    assert ((got - want).norm() / want.norm()).item() < 2e-2


@pytest.fixture(scope="module")
def qckpt(checkpoint_factory):
    from quant.recipe import Recipe
    from qwenlocal.weights.quantize import quantize_checkpoint

    src = checkpoint_factory("cuda-src", {**TINY, "num_hidden_layers": 3}, dtype=torch.bfloat16)
    out = src.parent / "cuda-q"
    if not out.exists():
        quantize_checkpoint(src, out, Recipe.from_preset("mixed"))
    return out


@cuda
@pytest.mark.parametrize("per_layer", [2, 4])
def test_offloaded_equals_resident_on_gpu(qckpt, per_layer):
    # the loop path on both sides: a prompt whose experts outnumber the slots is computed expert
    # by expert when offloaded (the grouped path has its own test below)
    resident = load_model(qckpt, device="cuda", dtype=torch.bfloat16, moe="loop")
    model = load_model(qckpt, device="cuda", dtype=torch.bfloat16, gpu_experts=per_layer * 3, moe="loop")
    assert model.experts.blobs[0].is_pinned() and model.experts.slot_buf.is_cuda
    ids = torch.tensor([PROMPT], device="cuda")
    assert torch.equal(model(ids), resident(ids))
    p = SamplingParams(temperature=0)
    a, b = Generator(resident, ctx_size=64), Generator(model, ctx_size=64)
    assert (
        a.run(PROMPT, p, max_tokens=12, eos_ids=()).token_ids
        == b.run(PROMPT, p, max_tokens=12, eos_ids=()).token_ids
    )


@cuda
def test_no_allocation_during_decode(qckpt):
    model = load_model(qckpt, device="cuda", dtype=torch.bfloat16, gpu_experts=6)
    gen = Generator(model, ctx_size=128)
    list(gen.stream(PROMPT, SamplingParams(temperature=0), max_tokens=4, eos_ids=()))  # warm-up
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    slots = model.experts.slot_buf.data_ptr()
    list(gen.stream(PROMPT + [5, 6], SamplingParams(temperature=0), max_tokens=24, eos_ids=()))
    torch.cuda.synchronize()
    assert model.experts.slot_buf.data_ptr() == slots
    assert torch.cuda.memory_allocated() == before


@cuda
@pytest.mark.parametrize("per_layer", [2, 4])
def test_offloaded_grouped_equals_resident_grouped_on_gpu(qckpt, per_layer):
    resident = load_model(qckpt, device="cuda", dtype=torch.bfloat16, moe="grouped")
    model = load_model(qckpt, device="cuda", dtype=torch.bfloat16, gpu_experts=per_layer * 3, moe="grouped")
    a, b = Generator(resident, ctx_size=64, prefill_chunk=1), Generator(model, ctx_size=64, prefill_chunk=1)
    assert a.graph is not None and b.graph is None  # the offload cache is not captured
    for tok in PROMPT:  # one token at a time: the grouped kernels in every step of both
        assert torch.equal(a.prefill([tok]).clone(), b.prefill([tok]))
    assert model.experts.stats.total().misses > 0


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_graph_replay_equals_eager(qckpt, dtype):
    model = load_model(qckpt, device="cuda", dtype=dtype, moe="grouped")
    gen = Generator(model, ctx_size=96)
    assert gen.graph is not None
    eager_cache = model.new_cache(96)
    gen.prefill(PROMPT[:-1])
    model(torch.tensor([PROMPT[:-1]]), cache=eager_cache)
    for tok in [PROMPT[-1], 5, 77, 300, 4000]:
        replayed = gen.prefill([tok]).clone()
        # the captured step run eagerly on the same inputs: the same kernels, the same numbers
        assert torch.equal(replayed, gen.graph.eager()[0, -1])
        # the ordinary forward (keys sliced, not masked): equal within rounding, same top token
        eager = model(torch.tensor([[tok]]), cache=eager_cache)[0, -1]
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        assert ((replayed - eager).norm() / eager.norm()).item() < tol
        assert replayed.argmax() == eager.argmax()


@cuda
def test_graph_greedy_tokens_equal_eager_over_64_steps(qckpt, monkeypatch):
    model = load_model(qckpt, device="cuda", dtype=torch.float32, moe="grouped")
    p = SamplingParams(temperature=0)
    graphed = Generator(model, ctx_size=128)
    assert graphed.graph is not None
    want = graphed.run(PROMPT, p, max_tokens=64, eos_ids=()).token_ids
    monkeypatch.setenv("QWENLOCAL_CUDA_GRAPHS", "0")
    eager = Generator(model, ctx_size=128)
    assert eager.graph is None
    got = eager.run(PROMPT, p, max_tokens=64, eos_ids=()).token_ids
    assert got == want and len(got) == 64


@cuda
@pytest.mark.parametrize("moe", ["grouped", "loop"])
def test_model_equals_transformers_on_gpu(checkpoint_factory, moe):
    transformers = pytest.importorskip("transformers")
    from .conftest import SMALL_VOCAB

    folder = checkpoint_factory("cuda-fp32", SMALL_VOCAB, dtype=torch.float32)
    ref = transformers.Qwen3MoeForCausalLM.from_pretrained(folder, dtype=torch.float32).cuda().eval()
    ours = load_model(folder, device="cuda", dtype=torch.float32, moe=moe)
    ids = torch.tensor([PROMPT], device="cuda")
    with torch.no_grad():
        want = ref(ids).logits
    assert (ours(ids) - want).abs().max().item() < 1e-3
    cache = ours.new_cache(64)
    ours(ids[:, :-1], cache=cache)
    assert (ours(ids[:, -1:], cache=cache)[0, -1] - want[0, -1]).abs().max().item() < 1e-3


@cuda
def test_memory_estimate_against_the_allocator(qckpt):
    from qwenlocal.planning.memory import CUDA_CONTEXT_BYTES, estimate, model_plan

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = load_model(qckpt, device="cuda", dtype=torch.bfloat16, ctx_size=256, moe="grouped")
    list(
        Generator(model, ctx_size=256).stream(PROMPT, SamplingParams(temperature=0), max_tokens=8, eos_ids=())
    )
    peak = torch.cuda.max_memory_allocated() - base
    est = estimate(model.config, model_plan(model, 256)).gpu_total - CUDA_CONTEXT_BYTES
    # the allocator rounds blocks up to 512 bytes and keeps the graph's pool: a tiny model's
    # figures are small, so allow a fixed slack beside the ratio
    assert peak <= est * 1.25 + 16 * 1024**2, (peak, est)
    assert peak >= est * 0.5, (peak, est)


@cuda
@pytest.mark.parametrize(
    "fmt, dq", [("nf4", True), ("nf4", False), ("int8", False), ("int4", False), ("bf16", False)]
)
@pytest.mark.parametrize("n, k", [(1, 8), (4, 8)])
def test_grouped_triton_equals_torch_on_gpu(fmt, dq, n, k):
    """The real shapes (hidden 2048, 768 per expert) through the compiled kernels."""
    from quant import moe_kernels as mk

    from .test_grouped import make_experts, routing

    ex, dt = make_experts(fmt, dq, hidden=2048, inter=768, experts=16)
    ex = ex.to("cuda")
    gu, down, s = ex.grouped_weights(0)
    x = torch.randn(n, 2048, device="cuda").to(dt)
    ids, w = routing(n, k, experts=16, dtype=dt)
    ids, w = ids.sort(-1).values.cuda(), w.cuda()
    args = (gu, s.fmt, s.double_quant, s.blocksize, s.inter, list(s.gate), list(s.up))
    h_ref, h = mk.torch_gate_up(x, ids, *args), mk.triton_gate_up(x, ids, *args)
    dargs = (down, s.fmt, s.double_quant, s.down_blocksize, s.hidden, list(s.down))
    y_ref, y = mk.torch_down(h_ref, ids, w, *dargs), mk.triton_down(h_ref, ids, w, *dargs)
    for a, b in ((h, h_ref), (y, y_ref)):
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 2e-2


@cuda
@pytest.mark.parametrize("fmt", ["int8", "nf4", "int4"])
@pytest.mark.parametrize("rows", [1, 16, 40])
def test_qmatmul_on_gpu(fmt, rows):
    """Attention's quantized matmul: the Triton GEMV up to 16 tokens, qlinear beyond."""
    from quant.linear import qmatmul

    w = torch.randn(4096, 2048, dtype=torch.bfloat16, device="cuda")
    q = quantize(w, fmt, 64, fmt == "nf4")
    x = torch.randn(rows, 2048, dtype=torch.bfloat16, device="cuda")
    want = torch.nn.functional.linear(x.float(), dequantize(q, torch.float32))
    got = qmatmul(x, q).float()
    assert ((got - want).norm() / want.norm()).item() < 2e-2


@cuda
def test_graph_spans_replay_equal_eager_across_a_span_edge(qckpt):
    model = load_model(qckpt, device="cuda", dtype=torch.float32, moe="grouped")
    gen = Generator(model, ctx_size=1024)
    eager_cache = model.new_cache(1024)
    prompt = [3 + i for i in range(250)]
    gen.prefill(prompt)
    model(torch.tensor([prompt]), cache=eager_cache)
    for tok in range(5, 15):  # positions 250..259: the 256-key graph, then the 512-key one
        replayed = gen.prefill([tok]).clone()
        eager = model(torch.tensor([[tok]]), cache=eager_cache)[0, -1]
        assert ((replayed - eager).norm() / eager.norm()).item() < 1e-4
        assert replayed.argmax() == eager.argmax()
    assert sorted(gen.graph.graphs) == [256, 512]


@cuda
def test_self_check_passes_every_fast_path_here(qckpt, tmp_path):
    from qwenlocal.model import selfcheck

    model = load_model(qckpt, device="cuda", dtype=torch.bfloat16, moe="grouped")
    verdicts = selfcheck.self_check(model, folder=tmp_path)
    assert {v.path for v in verdicts} == {"grouped", "gemv", "graph"}
    assert all(v.ok for v in verdicts), [v.line for v in verdicts if not v.ok]
