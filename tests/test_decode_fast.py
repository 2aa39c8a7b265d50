"""The CPU decode step's fast paths equal the plain paths they replace, bit for bit, and are taken."""

from __future__ import annotations

import pytest
import torch

from qwenlocal.experts.store import quant_swiglu
from tests.test_grouped import make_experts, routing


def kernel_experts(fmt: str):
    """Experts wide enough for torch's int4 CPU layout (rows in blocks of 64), repacked as loaded."""
    ex, dt = make_experts(fmt, False, hidden=128, inter=64)
    ex.use_kernel_layout()
    return ex, dt


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_a_decode_rows_experts_take_the_bound_kernels_and_equal_qlinear(fmt):
    from quant.int4 import cpu_packing

    if fmt == "int4" and cpu_packing() is None:
        pytest.skip("this CPU's int4 layout is not one we pack")
    ex, dt = kernel_experts(fmt)
    x = torch.randn(1, 128, generator=torch.Generator().manual_seed(4)).to(dt)
    with torch.inference_mode():
        for e in range(8):
            assert ex.row_kernels(0, e, dt) is not None
            assert torch.equal(ex.expert_forward(0, e, x), quant_swiglu(x, ex.qtensors(0, e)))


def test_rows_that_the_kernels_do_not_take_keep_the_plain_path():
    ex, _ = kernel_experts("int8")
    assert ex.row_kernels(0, 0, torch.float32) is None  # fp32 goes through qlinear's dispatch
    ex16, _ = make_experts("nf4", True, hidden=128, inter=64)
    assert ex16.row_kernels(0, 0, torch.bfloat16) is None


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_one_token_with_bound_kernels_equals_the_batch_loop(fmt):
    ex, dt = kernel_experts(fmt)
    x = torch.randn(1, 128, generator=torch.Generator().manual_seed(5)).to(dt)
    ids, w = routing(1, 2, dtype=dt)
    with torch.inference_mode():
        got = ex(0, x, ids, w)
        want = torch.zeros_like(x)
        for e in sorted(ids[0].tolist()):
            j = ids[0].tolist().index(e)
            want += quant_swiglu(x, ex.qtensors(0, e)) * w[:, j : j + 1]
    assert torch.equal(got, want)


def test_the_cpu_moe_operator_equals_the_python_loop_bit_for_bit():
    from quant import cpu_moe
    from quant.int4 import cpu_packing
    from qwenlocal.experts.store import Experts

    if cpu_packing() is None:
        pytest.skip("this CPU's int4 layout is not one we pack")
    if not cpu_moe.build():
        pytest.skip("no C++ compiler for torch extensions here")
    ex, dt = kernel_experts("int4")
    assert ex.fused_args() is not None
    for n_picks in (1, 2, 8):
        ids, w = routing(1, n_picks, dtype=dt, seed=n_picks)
        x = torch.randn(1, 128, generator=torch.Generator().manual_seed(n_picks)).to(dt)
        with torch.inference_mode():
            assert cpu_moe.ready()
            got = ex.one_token(0, x, ids[0], w[0])
            want = Experts.one_token(ex, 0, x, ids[0], w[0])
        assert torch.equal(got, want)


def test_experts_the_operator_cannot_read_take_the_python_loop():
    ex, _ = make_experts("int8", False, hidden=128, inter=64)
    assert ex.fused_args() is None
    ex4, _ = make_experts("int4", False, hidden=128, inter=64)  # stored layout, not repacked
    assert ex4.fused_args() is None


def test_a_float32_decode_token_goes_through_the_int4_kernels_in_bf16():
    from quant.int4 import cpu_packing

    if cpu_packing() is None:
        pytest.skip("this CPU's int4 layout is not one we pack")
    ex, _ = kernel_experts("int4")
    x = torch.randn(1, 128, generator=torch.Generator().manual_seed(6))
    ids, w = routing(1, 2, dtype=torch.float32)
    with torch.inference_mode():
        got = ex.one_token(0, x, ids[0], w[0])
        want = ex.one_token(0, x.bfloat16(), ids[0], w[0].bfloat16()).float()
    assert got.dtype == torch.float32 and torch.equal(got, want)
