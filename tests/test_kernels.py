"""quant.kernels and quant.int4 against independent references: bitsandbytes' dequantize, a
dequantizer written here from int4's documented layout, and torch's own int4pack packer and kernel."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from quant import QuantLinear, dequantize, kernels, qlinear, quantize, to_kernel_layout
from quant.int4 import codes, cpu_packing, pack_codes_for_cpu, quantize_int4, repack_for_cpu
from quant.kernels import (
    KERNEL_ROWS_LADDER,
    bnb_4bit_faster_on_cpu,
    bnb_matmul_4bit,
    int4_kernel_cpu,
    int8_gemm_cpu,
    int8_kernel_cpu,
    kernel_max_rows,
    pick_kernel,
    plain,
)
from quant.linear import qmatmul
from quant.recipe import Recipe
from quant.spec import PARTS

ROOT = Path(__file__).resolve().parent.parent


def weights(shape, dist="gauss", seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dist == "gauss":
        w = torch.randn(shape, generator=g)
    else:  # Student-t with 3 degrees of freedom: heavy tails, like real weights' outliers
        w = torch.randn(shape, generator=g) / torch.sqrt(torch.distributions.Chi2(3.0).sample(shape) / 3)
    return (w * 0.02).to(torch.bfloat16)


def int4_from_spec(weight: torch.Tensor, scale_zero: torch.Tensor, group: int) -> torch.Tensor:
    """The int4 layout as quant/int4.py documents it, read element by element in fp64."""
    n, half = weight.shape
    k = 2 * half
    w = torch.empty(n, k, dtype=torch.float64)
    w[:, 0::2] = (weight >> 4).double()
    w[:, 1::2] = (weight & 15).double()
    scale = scale_zero[..., 0].double().t().repeat_interleave(group, dim=1)  # [N, K]
    zero = scale_zero[..., 1].double().t().repeat_interleave(group, dim=1)
    return (w - 8) * scale + zero


def bf16_close(y: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal within what bf16 inputs and outputs can hold (a few bf16 ulps of the output scale)."""
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2 * ref.abs().max().item())


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_layout_matches_its_documentation(group):
    w = weights((96, 256))
    q = quantize(w, "int4", group)
    assert q.weight.shape == (96, 128) and q.weight.dtype == torch.uint8
    assert q.scale_zero.shape == (256 // group, 96, 2) and q.scale_zero.dtype == torch.bfloat16
    assert q.absmax is None and q.bits_per_weight == 4 + 32 / group
    ref = int4_from_spec(q.weight, q.scale_zero, group)
    torch.testing.assert_close(dequantize(q, torch.float32).double(), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dist", ["gauss", "t3"])
def test_int4_search_beats_min_max(dist):
    w = weights((256, 512), dist)

    def err(refit: int) -> float:
        packed, sz = quantize_int4(w, 64, refit_iters=refit)
        d = int4_from_spec(packed, sz, 64)
        return ((d - w.double()).norm() / w.double().norm()).item()

    assert err(2) < 0.97 * err(0)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_torch_int4pack_kernel_equals_the_dequantized_weight(group):
    """torch's own packer and kernel on our codes and scale_zero compute x @ W.T of our layout."""
    w = weights((128, 512))
    q = quantize(w, "int4", group)
    c = codes(q.weight, q.shape, "plain")
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(c.to(torch.int32), 1)
    x = torch.randn(3, 512).to(torch.bfloat16)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, q.scale_zero)
    bf16_close(y, F.linear(x.double(), int4_from_spec(q.weight, q.scale_zero, group)))


def test_cpu_repack_is_torchs_layout_and_reads_back():
    w = weights((128, 256))
    q = quantize(w, "int4", 64)
    c = codes(q.weight, q.shape, "plain").clone()
    before = dequantize(q, torch.float32)
    packing = cpu_packing()
    assert packing is not None  # torch's packer matches one of the layouts quant/int4.py reads
    torch_packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(c.to(torch.int32), 1)
    assert torch.equal(pack_codes_for_cpu(c, packing).view(-1), torch_packed.view(-1))
    qk = to_kernel_layout(q)
    assert qk.packing == packing and qk.weight.data_ptr() == q.weight.data_ptr()  # in place
    assert torch.equal(qk.weight.view(-1), torch_packed.view(-1))
    assert torch.equal(codes(qk.weight, qk.shape, qk.packing), c)
    assert torch.equal(dequantize(qk, torch.float32), before)
    assert to_kernel_layout(qk) is qk


@pytest.mark.parametrize("packing", ["cpu-halves64", "cpu-halves32", "cpu-pairs32"])
def test_repack_byte_to_byte_equals_packing_the_codes(packing):
    """repack_for_cpu (stored bytes straight to the CPU layout, at every load) makes the bytes that
    packing the codes one by one does, in every layout (torch's packer checks this CPU's only)."""
    q = quantize(weights((128, 256)), "int4", 64)
    want = pack_codes_for_cpu(codes(q.weight, q.shape, "plain"), packing)
    w = q.weight.clone()
    repack_for_cpu(w, q.shape, packing)
    assert torch.equal(w, want)


@pytest.mark.parametrize("packing", ["plain", "cpu"])
def test_int4_codes_of_stacked_matrices(packing):
    """The grouped expert path reads k matrices at once: the codes of a stack, in either layout, are
    each matrix's documented nibbles (column 2j high, 2j + 1 low)."""
    qs = [quantize(weights((128, 64), seed=s), "int4", 32) for s in range(3)]
    want = torch.stack([torch.stack([q.weight >> 4, q.weight & 15], dim=-1).view(128, 64) for q in qs])
    if packing == "cpu":
        if cpu_packing() is None:
            pytest.skip("torch's CPU int4 layout is not one quant.int4 reads")
        qs = [to_kernel_layout(q) for q in qs]  # repacked in place
        assert qs[0].packing == cpu_packing()
    got = codes(torch.stack([q.weight for q in qs]), (128, 64), qs[0].packing)
    assert torch.equal(got, want)


def rows_of(which: str, fmt: str) -> int:
    """A row count: a number, or "max" / "max+1" around this CPU's measured kernel crossover."""
    if which in ("max", "max+1"):
        return kernel_max_rows(fmt) + (which == "max+1")
    return int(which)


@pytest.mark.parametrize("rows", ["1", "3", "max", "max+1", "80"])
@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_int4_paths_equal_the_dequantized_linear(rows, xdtype):
    rows = rows_of(rows, "int4")
    w = weights((128, 256))
    q = to_kernel_layout(quantize(w, "int4", 64))
    x = torch.randn(rows, 256).to(xdtype)
    ref = F.linear(x.double(), int4_from_spec(*_stored_int4(w, 64), 64))
    expected = int4_kernel_cpu if rows <= kernel_max_rows("int4") and xdtype != torch.float32 else plain
    assert pick_kernel(q, x) is expected
    for kernel in (int4_kernel_cpu, plain):
        y = kernel(x, q)
        assert y.dtype == xdtype
        bf16_close(y, ref)
    y = qlinear(x, q)
    if expected is plain and xdtype == torch.float32:  # exact up to fp32 summation
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def _stored_int4(w, group):
    q = quantize(w, "int4", group)
    return q.weight, q.scale_zero


@pytest.mark.parametrize("rows", ["1", "max", "max+1", "80"])
@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_int8_paths_equal_bnb_dequantized_linear(rows, xdtype):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    rows = rows_of(rows, "int8")
    w = weights((96, 256))
    q = quantize(w, "int8")
    data, row_stats, _ = bnbf.int8_vectorwise_quant(w.clone())
    ref = F.linear(
        x := torch.randn(rows, 256).to(xdtype), bnbf.int8_vectorwise_dequant(data, row_stats).to(x.dtype)
    )
    if xdtype == torch.float32:
        expected = plain
    else:
        expected = int8_kernel_cpu if rows <= kernel_max_rows("int8") else int8_gemm_cpu
    assert pick_kernel(q, x) is expected
    for kernel in (int8_kernel_cpu, int8_gemm_cpu, plain):
        y = kernel(x, q)
        assert y.dtype == xdtype and y.shape == (rows, 96)
        bf16_close(y, F.linear(x.double(), bnbf.int8_vectorwise_dequant(data, row_stats).double()))
    bf16_close(qlinear(x, q), ref)


def test_quant_linear_int4_module_repacks_once():
    lin = torch.nn.Linear(256, 128, bias=True).to(torch.bfloat16)
    m = QuantLinear.from_linear(lin, "int4", 64)
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    before = m(x)
    m.use_kernel_layout()
    assert m.spec.packing == cpu_packing() and m.qtensor.packing == m.spec.packing
    bf16_close(m(x), before)
    assert "int4" in repr(m)


@pytest.mark.parametrize(("fmt", "dq"), [("nf4", True), ("int8", False), ("int4", False)])
def test_qmatmul_op_and_its_fake_agree(fmt, dq):
    """torch's own check of the op (schema, fake tensor, tracing): the decode step is traced and
    captured through it."""
    q = quantize(torch.randn(64, 128, dtype=torch.bfloat16), fmt, 64, dq)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    bias = torch.randn(64, dtype=torch.bfloat16)
    parts = [getattr(q, name) for name in PARTS]
    args = (x, parts, bias, q.fmt, list(q.shape), q.dtype, q.blocksize, q.packing)
    result = torch.library.opcheck(torch.ops.qwenlocal.qmatmul.default, args)
    assert set(result.values()) == {"SUCCESS"}
    bf16_close(qmatmul(x, q, bias), F.linear(x.double(), dequantize(q).double(), bias.double()))


def misaligned(t: torch.Tensor, offset: int = 8) -> torch.Tensor:
    """A copy of t that starts `offset` bytes past an aligned address, as a tensor memory-mapped
    from a safetensors file can (its tensors are only 8-byte aligned)."""
    raw = torch.empty(t.numel() * t.element_size() + 64, dtype=torch.uint8)
    assert raw.data_ptr() % 64 == 0
    out = raw[offset : offset + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
    out.copy_(t)
    return out


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_misaligned_weights_never_reach_torchs_kernels(fmt):
    """torch's int8 kernel crashes the process on AVX512 CPUs for a weight 8 bytes off alignment
    and a few rows (a prefill of 12 tokens): such a weight takes the plain path, and at load
    it moves into an aligned copy that the kernels then read."""
    lin = torch.nn.Linear(256, 128, bias=False).to(torch.bfloat16)
    m = QuantLinear.from_linear(lin, fmt, 64)
    m.weight = misaligned(m.weight)
    m._q = None
    x = torch.randn(12, 256, dtype=torch.bfloat16)
    assert pick_kernel(m.qtensor, x) is plain
    ref = F.linear(x.double(), dequantize(m.qtensor).double())
    bf16_close(m(x), ref)
    m.use_kernel_layout()
    assert m.weight.data_ptr() % 64 == 0 and m.qtensor.weight is m.weight
    if fmt == "int4" and cpu_packing() is None:
        return
    rows = x[: min(kernel_max_rows("int8"), kernel_max_rows("int4"))]
    assert pick_kernel(m.qtensor, rows) is (int8_kernel_cpu if fmt == "int8" else int4_kernel_cpu)
    bf16_close(m(rows), ref[: rows.shape[0]])
    assert m.state_dict()["weight"].data_ptr() == m.weight.data_ptr()


def test_recipe_int4_group_sizes_and_narrow_tensors():
    r = Recipe.from_preset("mixed")
    assert r.format_for("experts") == "int4" and r.format_for("attention") == "int8"
    assert r.spec("experts", (768, 2048)).blocksize == 64
    assert r.spec("experts", (64, 32)).blocksize == 32  # a width 64 does not divide
    assert r.to_config()["classes"]["experts"] == {
        "format": "int4",
        "bits": 4,
        "blocksize": 64,
        "double_quant": False,
    }
    assert "group size 64" in r.describe()
    r128 = Recipe.from_preset("nf4", fmt4="int4", group_size=128)
    assert r128.spec("attention", (512, 2048)).blocksize == 128


@pytest.mark.parametrize("quant", ["mixed", "nf4"])
def test_cpu_generate_never_imports_bitsandbytes(tiny_ckpt, quant):
    """bitsandbytes 0.50 prints a warning at import on CPU-only machines. The default recipe's CPU
    path (quantize while loading, dequantize, every kernel) must not import it; NF4 may, to time
    bitsandbytes' own matmul_4bit against ours, and its warning must not reach the user."""
    code = (
        "import sys\n"
        "from qwenlocal.cli import app\n"
        "try:\n"
        f"    app(['generate', {str(tiny_ckpt)!r}, 'Hello', '-n', '3', '--device', 'cpu',"
        f" '--quant', {quant!r}, '--temp', '0'])\n"
        "except SystemExit as e:\n"
        "    rc = e.code\n"
        "print('bitsandbytes imported:', 'bitsandbytes' in sys.modules, file=sys.stderr)\n"
        "sys.exit(rc)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    if quant == "mixed":
        assert "bitsandbytes imported: False" in r.stderr
    assert "kernels-community" not in r.stderr and "Failed to load" not in r.stderr


@pytest.mark.parametrize("fmt, dq", [("nf4", True), ("nf4", False), ("fp4", False)])
@pytest.mark.parametrize("rows", [1, 8])
@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float16], ids=str)
def test_bnb_matmul_4bit_on_the_cpu_equals_the_dequantized_linear(fmt, dq, rows, xdtype):
    pytest.importorskip("bitsandbytes")
    q = quantize(weights((96, 256)), fmt, 64, dq)
    x = torch.randn(rows, 256).to(xdtype)
    y = bnb_matmul_4bit(x, q)
    assert y.dtype == xdtype and y.shape == (rows, 96)
    bf16_close(y, F.linear(x.double(), dequantize(q).double()))


@pytest.mark.parametrize("bnb_faster", [True, False])
def test_nf4_on_the_cpu_takes_the_kernel_measured_faster(monkeypatch, bnb_faster):
    """The choice follows the timing (bitsandbytes' matmul_4bit is timed first, then ours)."""
    pytest.importorskip("bitsandbytes")
    times = iter([1.0, 2.0] if bnb_faster else [2.0, 1.0])
    monkeypatch.setattr(kernels, "best_seconds", lambda fn: next(times))
    bnb_4bit_faster_on_cpu.cache_clear()
    try:
        q = quantize(weights((96, 256)), "nf4", 64, True)
        x = torch.randn(1, 256, dtype=torch.bfloat16)
        assert pick_kernel(q, x) is (bnb_matmul_4bit if bnb_faster else plain)
        assert pick_kernel(q, x.float()) is plain  # fp32 stays exact
        narrow = quantize(weights((64, 32)), "nf4", 64, True)  # blocks across rows
        assert pick_kernel(narrow, torch.randn(1, 32, dtype=torch.bfloat16)) is plain
    finally:
        bnb_4bit_faster_on_cpu.cache_clear()


@pytest.mark.parametrize("path", [plain, int8_gemm_cpu], ids=["plain", "gemm"])
def test_int8_paths_in_row_slices_for_a_large_weight(monkeypatch, path):
    import quant.kernels

    monkeypatch.setattr(quant.kernels, "PLAIN_CHUNK_ELEMS", 256 * 10)
    w = weights((96, 256))
    q = quantize(w, "int8")
    x = torch.randn(20, 256).to(torch.bfloat16)
    ref = F.linear(x.double(), dequantize(q, torch.float64))
    bf16_close(path(x, q), ref)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("loses_at", [4, 16, 32, None])
def test_kernel_crossover_is_the_last_row_count_where_the_kernel_was_faster(monkeypatch, fmt, loses_at):
    """The probe times the kernel, then the GEMM path, at each count of the ladder, and stops at
    the first count where the kernel is not faster (here scripted by the count being timed)."""
    if fmt == "int4" and cpu_packing() is None:
        pytest.skip("torch's CPU int4 layout is not one quant.int4 reads")
    timed = []

    def fake_best_seconds(fn, repeat=5):
        timed.append(fn)
        rows = KERNEL_ROWS_LADDER[(len(timed) - 1) // 2]
        kernel_turn = len(timed) % 2 == 1
        return 1.0 if kernel_turn != (loses_at is not None and rows >= loses_at) else 2.0

    monkeypatch.setattr(kernels, "best_seconds", fake_best_seconds)
    kernel_max_rows.cache_clear()
    try:
        got = kernel_max_rows(fmt)
    finally:
        kernel_max_rows.cache_clear()
    ladder = list(KERNEL_ROWS_LADDER)
    want = (
        1 if loses_at == ladder[0] else ladder[-1] if loses_at is None else ladder[ladder.index(loses_at) - 1]
    )
    assert got == want
    stop = len(ladder) if loses_at is None else ladder.index(loses_at) + 1
    assert len(timed) == 2 * stop


def test_model_in_bf16_through_the_kernels_matches_the_plain_fp32_path(small_ckpt):
    """The same quantized model: bf16 decode-sized inputs take torch's int8/int4 kernels; fp32
    inputs through the plain path only (the reference); the logits agree within bf16 rounding.
    An fp32 decode row left to the dispatch takes the kernels too, within bf16 rounding of it."""
    from qwenlocal import load_model

    ids = torch.tensor([[1, 5, 9, 200, 7]])
    with torch.inference_mode():
        fast = load_model(small_ckpt, dtype=torch.bfloat16, quant="mixed")
        assert fast.experts.layout.specs["down_proj"].packing == cpu_packing()
        fp32_model = load_model(small_ckpt, dtype=torch.float32, quant="mixed")
        a, one_fast = fast(ids).float(), fp32_model(ids[:, :1])
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(kernels, "pick_kernel", lambda q, x: kernels.plain)
            b, one_plain = fp32_model(ids), fp32_model(ids[:, :1])
    assert ((a - b).norm() / b.norm()).item() < 0.03
    assert ((one_fast - one_plain).norm() / one_plain.norm()).item() < 0.03


def test_a_float32_models_decode_token_takes_the_kernels_in_bf16(monkeypatch):
    """load_model's float32 on a quantized folder: a decode row of a quantized linear layer goes
    through torch's kernel in bf16; more rows keep the exact path."""
    lin = QuantLinear.from_linear(weights((96, 256)), "int8")
    calls = []
    kernels.kernel_max_rows("int8")  # the crossover probe's own kernel calls, before they are counted
    monkeypatch.setattr(kernels, "int8_kernel_cpu", lambda x, q: calls.append(x.dtype) or plain(x, q))
    x = torch.randn(1, 256)
    y = lin(x)
    assert calls == [torch.bfloat16] and y.dtype == torch.float32
    bf16_close(y, F.linear(x.double(), lin.dequantized_weight(torch.float32).double()))
    assert kernels.decode_in_bf16(x, lin.qtensor)
    assert not kernels.decode_in_bf16(torch.randn(2, 256), lin.qtensor)


def test_the_crossover_is_timed_once_when_threads_ask_together(monkeypatch):
    """The cold-expert workers can all reach their first quantized matmul at once: one probe runs,
    and every thread gets its answer."""
    import threading

    timings = []

    def slow_best_seconds(fn, repeat=5):
        timings.append(fn)
        threading.Event().wait(0.01)  # long enough for the other threads to arrive
        return 1.0 if len(timings) % 2 else 2.0  # the kernel always faster

    monkeypatch.setattr(kernels, "best_seconds", slow_best_seconds)
    kernel_max_rows.cache_clear()
    got = []
    try:
        threads = [threading.Thread(target=lambda: got.append(kernel_max_rows("int8"))) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        kernel_max_rows.cache_clear()
    assert got == [KERNEL_ROWS_LADDER[-1]] * 4
    assert len(timings) == 2 * len(KERNEL_ROWS_LADDER)
