"""The CUDA paths: run only where a GPU is present (bench/gpu_check.sh runs them on a lent H200).

On the CPU every test here is skipped; the same logic is covered by the CPU tests."""

from __future__ import annotations

import pytest
import torch

from quant.formats import dequantize, quantize
from quant.linear import qlinear
from qwenlocal import load_model
from qwenlocal.generate import Generator, SamplingParams

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
    from qwenlocal.quantize import quantize_checkpoint

    src = checkpoint_factory("cuda-src", {**TINY, "num_hidden_layers": 3}, dtype=torch.bfloat16)
    out = src.parent / "cuda-q"
    if not out.exists():
        quantize_checkpoint(src, out, Recipe.from_preset("mixed"))
    return out


@cuda
@pytest.mark.parametrize("per_layer", [2, 4])
def test_offloaded_equals_resident_on_gpu(qckpt, per_layer):
    resident = load_model(qckpt, device="cuda", dtype=torch.bfloat16)
    model = load_model(qckpt, device="cuda", dtype=torch.bfloat16, gpu_experts=per_layer * 3)
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
