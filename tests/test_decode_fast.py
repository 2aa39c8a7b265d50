"""The CPU decode step's fast paths equal the plain paths they replace, bit for bit, and are taken."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from qwenlocal.experts.store import quant_swiglu
from tests.test_grouped import make_experts, routing

ROOT = Path(__file__).resolve().parent.parent


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
    if not cpu_moe.OPERATOR.build():
        pytest.skip("no C++ compiler for torch extensions here")
    ex, dt = kernel_experts("int4")
    assert ex.fused_args() is not None
    for n_picks in (1, 2, 8):
        ids, w = routing(1, n_picks, dtype=dt, seed=n_picks)
        x = torch.randn(1, 128, generator=torch.Generator().manual_seed(n_picks)).to(dt)
        with torch.inference_mode():
            assert cpu_moe.OPERATOR.ready()
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


# --- the operator's own int4 kernel (quant/cpu_moe.py): bit for bit torch's, per capability ---

OWN_KERNEL_SHAPES = [(128, 64, 64), (512, 256, 64), (512, 256, 128)]  # hidden, inter, int4 group
# Qwen3-30B-A3B's top-8 of 16 experts at tiny widths that whole 64-row blocks divide
OWN_KERNEL_MODEL = {
    "hidden_size": 128,
    "moe_intermediate_size": 64,
    "num_experts": 16,
    "num_experts_per_tok": 8,
}


def own_block() -> int:
    """The own kernel's block under the capability torch dispatches to now (0: none)."""
    cap = torch.backends.cpu.get_cpu_capability()
    return 64 if cap.startswith("AVX512") else 32 if cap == "AVX2" else 0


def built_cpu_moe():
    from quant import cpu_moe
    from quant.int4 import cpu_packing

    if cpu_packing() is None:
        pytest.skip("this CPU's int4 layout is not one we pack")
    if not cpu_moe.OPERATOR.build():
        pytest.skip("no C++ compiler for torch extensions here")
    if own_block() not in cpu_moe.kernel_blocks():
        pytest.skip("no own int4 kernel for this CPU")
    return cpu_moe


def int4_layer(hidden: int, inter: int, group: int, crafted: bool = False):
    """16 random int4 experts, repacked as loaded. `crafted`: every (scale, zero) is
    (1 + 2^-7, -1.5 * 2^-23), where zero - 8 * scale is not exact in fp32, so torch's AVX512 and
    AVX2 formulas give different bf16 results."""
    ex, _ = make_experts("int4", False, hidden=hidden, inter=inter, experts=16, group=group)
    if crafted:
        for sl in ex.layout:
            if sl.part == "scale_zero":
                sz = ex.blobs[0][:, sl.offset : sl.offset + sl.nbytes].view(torch.bfloat16).view(16, -1, 2)
                sz[..., 0] = 1 + 2**-7
                sz[..., 1] = -1.5 * 2**-23
    ex.use_kernel_layout()
    return ex


def own_kernel_outputs(hidden: int, inter: int, group: int, crafted: bool = False) -> list[torch.Tensor]:
    """The operator's outputs through the own kernel for three random tokens (8 distinct experts
    in random order, random weights), each asserted equal to the operator through torch's kernel
    and to the Python loop. A crafted layer gets one-hot tokens: gate and up are single weights."""
    from qwenlocal.experts.store import Experts

    cpu_moe = built_cpu_moe()
    ex = int4_layer(hidden, inter, group, crafted)
    args = ex.fused_args()
    assert args is not None and args[-1] == own_block()
    outs = []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randperm(16, generator=g)[:8]
        w = torch.rand(8, generator=g).softmax(-1).bfloat16()
        x = torch.randn(1, hidden, generator=g).bfloat16()
        if crafted:
            x = torch.zeros_like(x)
            x[0, 5 + seed] = 1
        with torch.inference_mode():
            own = cpu_moe.moe_int4_row(x, ids, w, ex.blobs[0], *args)
            aten = cpu_moe.moe_int4_row(x, ids, w, ex.blobs[0], *args[:-1], 0)
            loop = Experts.one_token(ex, 0, x, ids, w)
        assert torch.equal(own, loop) and torch.equal(aten, loop)
        outs.append(own)
    return outs


def greedy_logits(folder: Path, operator: bool, steps: int = 5) -> list[torch.Tensor]:
    """A prompt, then `steps` greedy tokens of the int4 model in `folder`; the logits of each
    forward. `operator` False: the experts in the Python loop."""
    from quant import cpu_moe
    from qwenlocal import load_model

    model = load_model(folder, dtype=torch.bfloat16, quant="mixed")
    assert model.experts.fused_args()[-1] == own_block()
    cache = model.new_cache(32)
    ids = torch.tensor([[17, 923, 4, 511, 77]])
    out = []
    with torch.inference_mode(), mock.patch.object(cpu_moe.OPERATOR, "ready", lambda: operator):
        for _ in range(steps + 1):
            logits = model(ids, cache)
            out.append(logits)
            ids = logits[:, -1:].argmax(-1)
    return out


def check_greedy(folder: Path) -> None:
    built_cpu_moe()
    with_op, without = greedy_logits(folder, True), greedy_logits(folder, False)
    assert all(torch.equal(a, b) for a, b in zip(with_op, without, strict=True))


@pytest.mark.parametrize("shape", OWN_KERNEL_SHAPES)
def test_the_own_int4_kernel_equals_torchs_and_the_python_loop_bit_for_bit(shape):
    own_kernel_outputs(*shape)
    own_kernel_outputs(*shape, crafted=True)


def test_a_model_decodes_the_same_greedy_tokens_with_and_without_the_operator(checkpoint_factory):
    from qwenlocal.weights.random_checkpoint import TINY

    shape = {**TINY, **OWN_KERNEL_MODEL, "vocab_size": 1024}
    check_greedy(checkpoint_factory("own-int4-kernel", shape, dtype=torch.bfloat16))


def test_the_operator_refuses_an_expert_id_outside_the_layer():
    cpu_moe = built_cpu_moe()
    ex = int4_layer(128, 64, 64)
    x, w = torch.randn(1, 128).bfloat16(), torch.ones(2).bfloat16()
    for block in (0, own_block()):
        with pytest.raises(RuntimeError, match="out of range"):
            cpu_moe.moe_int4_row(x, torch.tensor([3, 16]), w, ex.blobs[0], *ex.fused_args()[:-1], block)


AVX2_SCRIPT = """
import sys, torch
from tests.test_decode_fast import OWN_KERNEL_SHAPES, check_greedy, own_kernel_outputs
assert torch.backends.cpu.get_cpu_capability() == "AVX2"
for shape in OWN_KERNEL_SHAPES:
    own_kernel_outputs(*shape)
torch.save(own_kernel_outputs(*OWN_KERNEL_SHAPES[0], crafted=True), sys.argv[1])
check_greedy(sys.argv[2])
print("ok")
"""


def test_the_own_avx2_kernel_equals_torchs_avx2_kernel_in_a_subprocess(tmp_path, checkpoint_factory):
    """torch's AVX2 kernels forced on this CPU: the AVX2 layout and formula, checked as above; the
    crafted layer's outputs differ from the AVX512 formula's, so each check can tell them apart."""
    from qwenlocal.weights.random_checkpoint import TINY

    built_cpu_moe()
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        pytest.skip("the AVX2 kernels are the ones this process runs already, if any")
    folder = checkpoint_factory(
        "own-int4-kernel", {**TINY, **OWN_KERNEL_MODEL, "vocab_size": 1024}, dtype=torch.bfloat16
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "avx2.pt"
    r = subprocess.run(
        [sys.executable, "-c", AVX2_SCRIPT, str(out), str(folder)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr
    avx512 = own_kernel_outputs(*OWN_KERNEL_SHAPES[0], crafted=True)
    assert not any(torch.equal(a, b) for a, b in zip(avx512, torch.load(out), strict=True))


# --- attention at one token: q/k/v as one matmul, fewer ops in the norms and RoPE ---

ATTN_SHAPE = {"hidden_size": 128, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32}


def reference_rms_norm(x, weight, eps):
    """The norm as it was computed before: x in fp32, normalized, cast back, times the weight."""
    return weight * torch.nn.functional.rms_norm(x.float(), weight.shape, eps=eps).to(x.dtype)


def three_linears(dtype, bias=False, seed=0):
    from qwenlocal.model.qwen3_moe import Linear

    g = torch.Generator().manual_seed(seed)
    layers = []
    for rows in (256, 64, 64):
        m = Linear(128, rows, bias)
        m.weight.data = torch.randn(rows, 128, generator=g).to(dtype)
        if bias:
            m.bias.data = torch.randn(rows, generator=g).to(dtype)
        layers.append(m)
    return layers


def shares_storage(part, whole) -> bool:
    return part.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
def test_stacked_16bit_projection_equals_three_calls_bit_for_bit(dtype, bias):
    from qwenlocal.model.qwen3_moe import Linear

    layers = three_linears(dtype, bias)
    x = torch.randn(1, 3, 128, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.inference_mode():
        wants = [(torch.cat([m(x[:, :r]) for m in layers], -1)) for r in (1, 3)]
        fused = Linear.concat_rows(layers)
        assert fused is not None and fused.weight.shape == (384, 128)
        for r, want in zip((1, 3), wants, strict=True):
            assert torch.equal(fused(x[:, :r]), want)
            assert torch.equal(torch.cat([m(x[:, :r]) for m in layers], -1), want)  # the views
    for m in layers:  # views into the fused matrix, not a second copy
        assert shares_storage(m.weight, fused.weight)
        assert not bias or shares_storage(m.bias, fused.bias)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
def test_stacked_int8_projection_equals_three_calls_bit_for_bit(dtype, bias):
    from quant.kernels import int8_kernel_cpu, pick_kernel
    from quant.linear import QuantLinear

    layers = [QuantLinear.from_linear(m.weight.float(), "int8") for m in three_linears(torch.float32)]
    if bias:
        for m, b in zip(layers, three_linears(dtype, bias=True, seed=9), strict=True):
            m.bias = b.bias.data.clone()
    for m in layers:
        m.use_kernel_layout()
    x = torch.randn(1, 1, 128, generator=torch.Generator().manual_seed(2)).to(dtype)
    with torch.inference_mode():
        want = torch.cat([m(x) for m in layers], -1)
        fused = QuantLinear.concat_rows(layers)
        assert fused is not None
        assert torch.equal(fused(x), want)
        assert torch.equal(torch.cat([m(x) for m in layers], -1), want)
    kernel_x = x if dtype != torch.float32 else x.bfloat16()  # a float32 token goes in bf16
    assert pick_kernel(fused.qtensor, kernel_x) is int8_kernel_cpu  # one _weight_int8pack_mm call
    for m in layers:
        assert shares_storage(m.weight, fused.weight) and shares_storage(m.absmax, fused.absmax)
        assert not bias or shares_storage(m.bias, fused.bias)


def test_projections_that_do_not_stack_stay_apart():
    from quant.linear import QuantLinear
    from qwenlocal.model.qwen3_moe import Linear

    nf4 = [QuantLinear.from_linear(m.weight, "nf4", 64) for m in three_linears(torch.float32)]
    assert QuantLinear.concat_rows(nf4) is None
    mixed = three_linears(torch.bfloat16)
    mixed[2].weight.data = mixed[2].weight.float()
    assert Linear.concat_rows(mixed) is None
    int8 = [QuantLinear.from_linear(m.weight, "int8") for m in three_linears(torch.float32)]
    assert Linear.concat_rows([int8[0], *three_linears(torch.float32)[1:]]) is None
    assert QuantLinear.concat_rows([int8[0], *three_linears(torch.float32)[1:]]) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rms_norm_equals_the_fp32_round_trip_bit_for_bit(dtype):
    from qwenlocal.model.qwen3_moe import rms_norm

    g = torch.Generator().manual_seed(3)
    for shape in [(1, 1, 2048), (1, 36, 1, 128), (2, 5, 128), (1, 1, 64)]:
        for scale in (1e-3, 1.0, 300.0):
            x = (torch.randn(shape, generator=g) * scale).to(dtype)
            w = (1 + torch.randn(shape[-1], generator=g) / 4).to(dtype)
            assert torch.equal(rms_norm(x, w, 1e-6), reference_rms_norm(x, w, 1e-6))


def attention_and_step(dtype, fmt):
    from quant.linear import QuantLinear
    from qwenlocal.model.config import Qwen3MoeConfig
    from qwenlocal.model.qwen3_moe import Attention, Step
    from qwenlocal.model.rope import Rope
    from qwenlocal.weights.random_checkpoint import config_dict

    config = Qwen3MoeConfig.from_dict(config_dict(ATTN_SHAPE))
    attn = Attention(config, 0)
    g = torch.Generator().manual_seed(7)
    for name, p in attn.named_parameters():
        p.data = (torch.randn(p.shape, generator=g) / (1 if "norm" in name else 8)).to(dtype)
    if fmt == "int8":
        for name in ("q_proj", "k_proj", "v_proj"):
            layer = QuantLinear.from_linear(getattr(attn, name).weight.float(), "int8")
            layer.use_kernel_layout()
            setattr(attn, name, layer)
    positions = torch.tensor([5])
    cos, sin = Rope(config, 16).at(positions, dtype)
    return attn, Step(positions, cos, sin, None, None, None, False)


@pytest.mark.parametrize("fmt", ["16-bit", "int8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_fused_attention_token_equals_the_plain_path_bit_for_bit(fmt, dtype):
    attn, s = attention_and_step(dtype, fmt)
    x = torch.randn(1, 1, 128, generator=torch.Generator().manual_seed(8)).to(dtype)
    with torch.inference_mode():
        plain = attn.project(x, s)
        plain_out = attn(x, s)
        assert attn.fuse_qkv() and attn.qkv is not None
        fused = attn.project(x, s)
        for got, want in zip(fused, plain, strict=True):
            assert got.shape == want.shape and torch.equal(got, want)
        assert torch.equal(attn(x, s), plain_out)
        attn.to(dtype)  # moved or cast: the views are no longer the fused matrix, so it is dropped
        assert attn.qkv is None
        assert all(torch.equal(a, b) for a, b in zip(attn.project(x, s), plain, strict=True))


def test_a_loaded_cpu_model_decodes_fused_as_it_does_unfused(checkpoint_factory):
    from qwenlocal import load_model
    from qwenlocal.weights.random_checkpoint import TINY

    src = checkpoint_factory("fused-qkv", {**TINY, "num_hidden_layers": 2}, dtype=torch.bfloat16)
    for quant in ("none", "mixed"):  # 16-bit attention, and int8 attention (the default recipe)
        fused = load_model(src, dtype=torch.bfloat16, quant=quant)
        plain = load_model(src, dtype=torch.bfloat16, quant=quant)
        assert all(layer.self_attn.qkv is not None for layer in fused.model.layers)
        for layer in plain.model.layers:
            layer._apply(lambda t: t)  # drops the fused projection (and layer operator), keeps the weights
            assert layer.self_attn.qkv is None and layer.decode_args is None
        caches = fused.new_cache(32), plain.new_cache(32)
        prompt = torch.tensor([[17, 923, 4, 511, 77]])
        with torch.inference_mode():
            assert torch.equal(fused(prompt, caches[0]), plain(prompt, caches[1]))
            for token in (5, 900, 33):
                ids = torch.tensor([[token]])
                assert torch.equal(fused(ids, caches[0]), plain(ids, caches[1]))
