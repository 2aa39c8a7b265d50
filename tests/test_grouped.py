"""The grouped expert path (quant.moe_kernels) equals the loop path: every storage format, several k,
a decode token and a small prefill batch; the Triton kernels (under Triton's interpreter, in a
subprocess) equal the plain-torch path."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quant.int4 import GROUP_SIZES, cpu_packing, repack_for_cpu
from quant.moe_kernels import GroupedSpec, torch_down, torch_gate_up
from quant.pack import unpack
from qwenlocal.experts.store import DenseExperts, QuantExperts
from qwenlocal.model.config import Qwen3MoeConfig

ROOT = Path(__file__).resolve().parent.parent
# (format, double quant); "bf16"/"fp32": the stacked 16/32-bit experts
FORMATS = [
    ("nf4", True),
    ("nf4", False),
    ("fp4", True),
    ("int8", False),
    ("int4", False),
    ("bf16", False),
    ("fp32", False),
]


def blocksize(fmt: str, width: int) -> int:
    """64, or for int4 the largest group that divides the width (as the recipes choose): with the
    small shapes here gate/up group by 64 and down by 32."""
    return max(g for g in GROUP_SIZES if g <= 64 and width % g == 0) if fmt == "int4" else 64


def make_experts(
    fmt: str, dq: bool, hidden: int = 64, inter: int = 32, experts: int = 8, seed: int = 0, group: int = 0
):
    """One MoE layer of random experts in the given storage; int4 in groups of `group` if given."""
    from quant.formats import quantize
    from quant.pack import pack

    config = Qwen3MoeConfig.from_dict(
        {
            "hidden_size": hidden,
            "moe_intermediate_size": inter,
            "num_experts": experts,
            "num_experts_per_tok": 2,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "vocab_size": 32,
            "model_type": "qwen3_moe",
        }
    )
    g = torch.Generator().manual_seed(seed)
    weights = {
        e: {
            "gate_proj": torch.randn(inter, hidden, generator=g) / hidden**0.5,
            "up_proj": torch.randn(inter, hidden, generator=g) / hidden**0.5,
            "down_proj": torch.randn(hidden, inter, generator=g) / inter**0.5,
        }
        for e in range(experts)
    }
    if fmt in ("bf16", "fp32"):
        dt = torch.bfloat16 if fmt == "bf16" else torch.float32
        ex = DenseExperts(config)
        ex.allocate("cpu", dt)
        for e, ws in weights.items():
            for proj, w in ws.items():
                ex.set_expert(0, e, proj, w.to(dt))
        return ex, dt
    layout = None
    blobs = []
    for e in range(experts):
        qs = {
            p: quantize(w.to(torch.bfloat16), fmt, group or blocksize(fmt, w.shape[1]), dq)
            for p, w in weights[e].items()
        }
        blob, layout = pack(qs)
        blobs.append(blob)
    ex = QuantExperts(config, layout)
    for e, blob in enumerate(blobs):
        ex.set_blob(0, e, blob)
    return ex, torch.bfloat16


def routing(n: int, k: int, experts: int = 8, dtype=torch.bfloat16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(n)])
    w = torch.rand(n, k, generator=g).softmax(-1).to(dtype)
    return ids, w


CPU_PACKINGS = ("cpu-halves64", "cpu-halves32", "cpu-pairs32")  # every layout of quant/int4.py


def repacked(ex: QuantExperts, packing: str):
    """A copy of ex's layer-0 blobs with every int4 weight rewritten in `packing` (whatever this
    CPU's own is), and its GroupedSpec."""
    buf = ex.blobs[0].clone()
    specs = dict(ex.layout.specs)
    for e in range(buf.shape[0]):
        for name, q in unpack(buf[e], ex.layout).items():
            repack_for_cpu(q.weight, q.shape, packing)
            specs[name] = dataclasses.replace(q.spec, packing=packing)
    return buf, GroupedSpec.from_layout(dataclasses.replace(ex.layout, specs=specs))


@pytest.mark.parametrize("fmt, dq", FORMATS)
@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("k", [1, 2, 8])
def test_grouped_equals_loop(fmt, dq, n, k):
    ex, dt = make_experts(fmt, dq)
    x = torch.randn(n, 64, generator=torch.Generator().manual_seed(2)).to(dt)
    ids, w = routing(n, k, dtype=dt)
    loop = ex(0, x, ids, w)
    ex.moe = "grouped"
    assert ex.use_grouped(x)
    got = ex(0, x, ids, w)
    assert got.dtype == loop.dtype and got.shape == loop.shape
    # the same sums in the same order; bmm and the loop's matmul may round differently per element
    tol = 1e-5 if dt == torch.float32 else 2e-2
    assert ((got.float() - loop.float()).norm() / loop.float().norm()).item() < tol
    if dt == torch.float32:
        assert torch.allclose(got, loop, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("fmt, dq", [("int4", False), ("int8", False), ("nf4", True), ("bf16", False)])
def test_one_token_loop_equals_the_batch_loop_bit_for_bit(fmt, dq):
    """A decode token skips the batch loop's gathers and scatters; the sums stay the batch loop's:
    index_add_ of each expert's weighted output into zeros, in expert-id order (written here)."""
    ex, dt = make_experts(fmt, dq)
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(3)).to(dt)
    ids, w = routing(1, 8, dtype=dt)
    want = torch.zeros_like(x)
    for e in sorted(ids[0].tolist()):
        j = ids[0].tolist().index(e)
        want.index_add_(0, torch.tensor([0]), ex.expert_forward(0, e, x) * w[:, j : j + 1])
    got = ex(0, x, ids, w)
    assert got.dtype == dt and torch.equal(got, want)


def test_grouped_reads_the_rows_it_is_given():
    """The offload cache passes slot rows instead of expert ids: same weights, same result, bit for bit."""
    from quant.moe_kernels import grouped_swiglu

    ex, dt = make_experts("nf4", True)
    buf, _, spec = ex.grouped_weights(0)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(3))
    slots = buf[perm.argsort()]  # expert e now sits in row perm[e]
    x = torch.randn(1, 64).to(dt)
    ids, w = routing(1, 8, dtype=dt)
    ids, order = ids.sort(-1)
    w = w.gather(-1, order)
    a = grouped_swiglu(x, ids, w, buf, buf, spec)
    b = grouped_swiglu(x, perm[ids], w, slots, slots, spec)
    assert torch.equal(a, b)


@pytest.mark.parametrize("n", [1, 5])
def test_grouped_reads_int4_in_the_cpu_kernel_layout(n):
    """Resident int4 experts on the CPU are repacked for torch's int4 kernel (the loop path's): the
    grouped path reads the codes back from that layout, to the same result bit for bit."""
    packing = cpu_packing()
    if packing is None:
        pytest.skip("torch's CPU int4 layout is not one quant.int4 reads: the blobs stay as stored")
    ex, dt = make_experts("int4", False, hidden=64, inter=64)  # rows a multiple of every CPU block
    x = torch.randn(n, 64, generator=torch.Generator().manual_seed(2)).to(dt)
    ids, w = routing(n, 2, dtype=dt)
    ex.moe = "grouped"
    stored = ex(0, x, ids, w)
    ex.use_kernel_layout()
    spec = ex.grouped_weights(0)[2]
    assert spec.packing == spec.down_packing == packing
    assert torch.equal(ex(0, x, ids, w), stored)
    ex.moe = "loop"  # torch's int4 kernel
    loop = ex(0, x, ids, w)
    assert ((stored.float() - loop.float()).norm() / loop.float().norm()).item() < 2e-2


@pytest.mark.parametrize("packing", CPU_PACKINGS)
def test_torch_reference_reads_every_cpu_packing(packing):
    """The grouped torch path on int4 blobs repacked into any CPU layout equals it on the stored
    bytes, bit for bit (the codes are the same; only their order in memory moves)."""
    ex, dt = make_experts("int4", False, hidden=64, inter=128)
    buf, spec = ex.grouped_weights(0)[0], ex.grouped_weights(0)[2]
    pbuf, pspec = repacked(ex, packing)
    assert pspec.packing == pspec.down_packing == packing and not torch.equal(pbuf, buf)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2)).to(dt)
    ids, w = routing(3, 2, dtype=dt)
    ids = ids.sort(-1).values

    def grouped(b: torch.Tensor, s: GroupedSpec) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch_gate_up(x, ids, b, s.fmt, False, s.blocksize, s.inter, list(s.gate), list(s.up), s.packing)
        y = torch_down(h, ids, w, b, s.fmt, False, s.down_blocksize, s.hidden, list(s.down), s.down_packing)
        return h, y

    (h, y), (hp, yp) = grouped(buf, spec), grouped(pbuf, pspec)
    assert torch.equal(hp, h) and torch.equal(yp, y)


def test_prefill_beyond_the_grouped_limit_takes_the_loop():
    from quant.moe_kernels import MAX_GROUPED_TOKENS

    ex, dt = make_experts("int8", False)
    ex.moe = "grouped"
    assert not ex.use_grouped(torch.zeros(MAX_GROUPED_TOKENS + 1, 64))


TRITON_SCRIPT = r"""
import dataclasses, sys, torch
sys.path.insert(0, sys.argv[1])
from quant import moe_kernels as mk
from quant.formats import dequantize, quantize
from quant.int4 import repack_for_cpu
from tests.test_grouped import CPU_PACKINGS, FORMATS, make_experts, repacked, routing
assert mk.use_triton(torch.zeros(1))
worst = 0.0


def gate_up(impl, x, ids, buf, s):
    fn = mk.torch_gate_up if impl == "torch" else mk.triton_gate_up
    return fn(x, ids, buf, s.fmt, s.double_quant, s.blocksize, s.inter, list(s.gate), list(s.up), s.packing)


def down(impl, h, ids, w, buf, s):
    fn = mk.torch_down if impl == "torch" else mk.triton_down
    return fn(h, ids, w, buf, s.fmt, s.double_quant, s.down_blocksize, s.hidden, list(s.down), s.down_packing)


def check(ref, got, hidden, dt, what, same_as=None):
    # the torch path on `ref` (buffer, spec) against Triton on `got`: the same weights; Triton on
    # `same_as` (the same weights in another packing) must give Triton's result on `got` bit for bit
    global worst
    for n, k in ((1, 8), (3, 2)):
        x = torch.randn(n, hidden).to(dt)
        ids, w = routing(n, k, dtype=dt)
        ids = ids.sort(-1).values
        h_ref = gate_up("torch", x, ids, *ref)
        y_ref = down("torch", h_ref, ids, w, *ref)
        h, y = gate_up("triton", x, ids, *got), down("triton", h_ref, ids, w, *got)
        if same_as is not None:
            assert torch.equal(h, gate_up("triton", x, ids, *same_as)), what
            assert torch.equal(y, down("triton", h_ref, ids, w, *same_as)), what
        for a, b in ((h, h_ref), (y, y_ref)):
            err = ((a.float() - b.float()).norm() / b.float().norm()).item()
            worst = max(worst, err)
            # bf16: the torch path rounds each of the k products and partial sums, the kernel once
            assert err < (1e-5 if dt == torch.float32 else 2e-2), (what, n, k, err)


for fmt, dq in FORMATS:
    # gate/up: one scale per row step; down (32 < 64): per element
    ex, dt = make_experts(fmt, dq, 64, 32)
    gu, _, spec = ex.grouped_weights(0)
    check((gu, spec), (gu, spec), 64, dt, (fmt, dq))
# int4 in each CPU layout (the bytes an offloaded expert's slot gets), against the stored layout
ex, dt = make_experts("int4", False, 64, 128)  # gate/up: two blocks of 64 rows, down one
plain = ex.grouped_weights(0)
plain = (plain[0], plain[2])
for packing in CPU_PACKINGS:
    check(plain, repacked(ex, packing), 64, dt, packing, same_as=plain)
# the attention GEMV on quantized matrices
cases = [("int8", False, 64, "plain"), ("nf4", True, 64, "plain"), ("fp4", False, 64, "plain")]
cases += [("int4", False, 32, p) for p in ("plain", *CPU_PACKINGS)]
for fmt, dq, bs, packing in cases:
    rows, cols = (40, 96) if packing == "plain" else (128, 96)
    q = quantize(torch.randn(rows, cols, dtype=torch.bfloat16), fmt, bs, dq)
    x = torch.randn(3, cols, dtype=torch.bfloat16)
    want = x.float() @ dequantize(q, torch.float32).T
    as_stored = mk.triton_qgemv(x, q)
    if packing != "plain":
        q = dataclasses.replace(q, weight=q.weight.clone(), packing=packing)
        repack_for_cpu(q.weight, q.shape, packing)
    got = mk.triton_qgemv(x, q)
    assert torch.equal(got, as_stored), (fmt, packing)
    err = ((got.float() - want).norm() / want.norm()).item()
    assert err < 1e-2, (fmt, dq, packing, rows, cols, err)
print("ok", worst)
"""


def test_triton_kernels_equal_torch_under_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "QWENLOCAL_TRITON": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, "-c", TRITON_SCRIPT, str(ROOT)], env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("ok")
