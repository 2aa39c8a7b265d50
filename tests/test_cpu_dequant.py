"""quant.cpu_dequant, the C++ int4 dequantize, against the plain-torch path it replaces
(quant.int4.dequantize_int4_t / dequantize_int4): equal bit for bit for every CPU layout, group size
and output dtype, stacked or not; the prefill GEMM path and a model's prefill logits equal with and
without it; and the plain-torch fallback where it does not build."""

from __future__ import annotations

import pytest
import torch

from quant import cpu_dequant, kernels, quantize, to_kernel_layout
from quant.int4 import cpu_packing, dequantize_int4, dequantize_int4_t, pack_codes_for_cpu
from quant.kernels import kernel_max_rows, plain

PACKINGS = ("cpu-halves64", "cpu-halves32", "cpu-pairs32")  # every layout, whatever this CPU uses


@pytest.fixture(scope="module")
def built():
    if not cpu_dequant.OPERATOR.build():
        pytest.skip("no C++ compiler for torch extensions here")


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns: equal bits, not equal values (-0.0 is not 0.0 here)."""
    return t.view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32)


def random_int4(stack: int, n: int, k: int, group: int, packing: str, seed: int):
    """`stack` matrices [N, K] of random codes in `packing`, with scales and zeros of mixed signs
    and magnitudes; the first group of the first matrix holds values halfway between two bf16
    numbers (1 + odd multiples of 2^-8), where rounding to nearest even differs from truncating
    and from rounding halves up."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (stack, n, k), dtype=torch.uint8, generator=g)
    weight = torch.stack([pack_codes_for_cpu(c, packing) for c in codes])
    mag = torch.exp2(torch.randint(-12, 4, (stack, k // group, n, 2), generator=g).float())
    sz = torch.randn(stack, k // group, n, 2, generator=g) * mag
    sz[0, 0, :, 0], sz[0, 0, :, 1] = 2.0**-8, 1.0  # code c -> 1 + (c - 8) / 256
    return weight, sz.bfloat16()


@pytest.mark.parametrize("packing", PACKINGS)
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("stack", [1, 3])
def test_the_operator_equals_the_plain_torch_dequantize_bit_for_bit(built, packing, group, dtype, stack):
    n, k = 128, 256
    weight, sz = random_int4(stack, n, k, group, packing, seed=group + stack)
    shape = (n, k)
    wt = cpu_dequant.dequantize_int4_t(
        weight, sz, shape, group, packing, torch.empty(stack, k, n, dtype=dtype)
    )
    w = cpu_dequant.dequantize_int4(weight, sz, shape, group, packing, torch.empty(stack, n, k, dtype=dtype))
    assert wt.shape == (stack, k, n) and w.shape == (stack, n, k)
    for i in range(stack):
        ref_t = dequantize_int4_t(weight[i], sz[i], shape, group, packing, torch.empty(k, n)).to(dtype)
        ref = dequantize_int4(weight[i], sz[i], shape, group, packing, torch.empty(n, k, dtype=dtype))
        assert torch.equal(bits(wt[i]), bits(ref_t)), (i, "W.T")
        assert torch.equal(bits(w[i]), bits(ref)), (i, "W")
    if dtype == torch.bfloat16:  # 1 + odd/256 is halfway: to even (truncating: 11 -> 2, 15 -> 6)
        steps = set(((wt[0, :group].float() - 1) * 256).unique().tolist())
        assert steps == {*range(-8, 0), 0, 2, 4, 6, 8}


def test_a_two_dimensional_weight_is_one_matrix(built):
    weight, sz = random_int4(1, 64, 128, 64, "cpu-halves64", seed=9)
    got = cpu_dequant.dequantize_int4_t(weight[0], sz[0], (64, 128), 64, "cpu-halves64", torch.empty(128, 64))
    want = dequantize_int4_t(weight[0], sz[0], (64, 128), 64, "cpu-halves64", torch.empty(128, 64))
    assert got.shape == (128, 64) and torch.equal(bits(got), bits(want))


def test_a_library_compiled_before_loads_on_the_first_ask(built, monkeypatch):
    """Not in the background: the first prefill and the crossover probe see it, every run alike."""
    monkeypatch.setattr(cpu_dequant.OPERATOR, "status", "new")
    assert cpu_dequant.OPERATOR.ready()


def test_the_operator_reads_the_cpu_layouts_only():
    assert all(cpu_dequant.reads(p) for p in PACKINGS)
    assert not cpu_dequant.reads("plain")


def int4(shape, seed):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02
    return to_kernel_layout(quantize(w.to(torch.bfloat16), "int4", 64))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_the_gemm_path_takes_the_operator_and_equals_the_plain_torch_path(built, monkeypatch, dtype):
    if cpu_packing() is None:
        pytest.skip("this CPU's int4 layout is not one we pack")
    calls = []
    real = cpu_dequant.dequantize_int4_t
    monkeypatch.setattr(cpu_dequant, "dequantize_int4_t", lambda *a: calls.append(a[-1].dtype) or real(*a))
    for q, seed in ((int4((256, 512), 0), 1), (int4((128, 256), 2), 3)):
        x = torch.randn(40, q.shape[1], generator=torch.Generator().manual_seed(seed)).to(dtype)
        with torch.inference_mode():
            with cpu_dequant.OPERATOR.turned_off():
                want = plain(x, q)
            got = plain(x, q)
        assert torch.equal(bits(got), bits(want))
    assert calls == [kernels.gemm_dtype_cpu(dtype)] * 2  # straight into the GEMM's dtype


@pytest.fixture(scope="module")
def packable_ckpt(checkpoint_factory):
    """Small, with every expert matrix a multiple of 64 rows: all of them in the CPU kernel layout."""
    from tests.conftest import SMALL_VOCAB

    return checkpoint_factory(
        "cpu-dequant", {**SMALL_VOCAB, "hidden_size": 128, "moe_intermediate_size": 64}, dtype=torch.float32
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_prefill_logits_are_equal_with_and_without_the_operator(built, monkeypatch, packable_ckpt, dtype):
    from qwenlocal import load_model

    if cpu_packing() is None:
        pytest.skip("this CPU's int4 layout is not one we pack")
    model = load_model(packable_ckpt, dtype=dtype, quant="mixed")
    assert model.experts.layout.specs["gate_proj"].packing == cpu_packing()
    monkeypatch.setattr(kernels, "kernel_max_rows", lambda fmt: 1)  # every expert's rows: dequantize + GEMM
    calls = []
    real = cpu_dequant.dequantize_int4_t
    monkeypatch.setattr(cpu_dequant, "dequantize_int4_t", lambda *a: calls.append(1) or real(*a))
    ids = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        with cpu_dequant.OPERATOR.turned_off():
            want = model(ids)
        assert not calls
        got = model(ids)
    assert calls
    assert torch.equal(bits(got), bits(want))


def test_without_a_compiler_the_plain_torch_path_computes(monkeypatch):
    """A failed build leaves the operator unavailable for good; the GEMM path still computes, the
    same values as the plain-torch dequantize."""
    import torch.utils.cpp_extension as ext

    def no_compiler(*args, **kwargs):
        raise OSError("no C++ compiler")

    monkeypatch.setattr(cpu_dequant.OPERATOR, "status", "new")
    monkeypatch.setattr(ext, "load_inline", no_compiler)
    assert cpu_dequant.OPERATOR.build() is False
    assert not cpu_dequant.OPERATOR.ready()
    assert cpu_dequant.OPERATOR.status == "failed"  # not built again on the next ask
    q = int4((128, 256), 4)
    x = torch.randn(20, 256).to(torch.bfloat16)
    monkeypatch.setattr(cpu_dequant, "dequantize_int4_t", lambda *a: pytest.fail("the operator was called"))
    with torch.inference_mode():
        y = plain(x, q)
    n, k = q.shape
    wt = dequantize_int4_t(q.weight, q.scale_zero, (n, k), 64, q.packing, torch.empty(k, n))
    dt = kernels.gemm_dtype_cpu(x.dtype)
    assert torch.equal(y, torch.matmul(x.to(dt), wt.to(dt)).to(x.dtype))


def test_the_int4_crossover_is_timed_again_once_the_operator_is_ready(monkeypatch):
    timed = []
    monkeypatch.setattr(
        kernels, "best_seconds", lambda fn, repeat=5: timed.append(fn) or len(timed) % 2 + 1.0
    )
    kernel_max_rows.cache_clear()
    try:
        with cpu_dequant.OPERATOR.turned_off():
            kernel_max_rows("int4")
            kernel_max_rows("int4")  # answered from the cache
        before = len(timed)
        monkeypatch.setattr(cpu_dequant.OPERATOR, "status", "ready")
        kernel_max_rows("int4")
    finally:
        kernel_max_rows.cache_clear()
    if cpu_packing() is not None:
        assert before > 0 and len(timed) == 2 * before
