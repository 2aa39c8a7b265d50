"""quant.formats / quant.linear against bitsandbytes itself: same bytes, same values, same sizes."""

from __future__ import annotations

import json
import math

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from quant import (
    PACK_ALIGN,
    PackLayout,
    QSpec,
    QTensor,
    QuantFormatError,
    QuantLinear,
    dequantize,
    from_bnb,
    pack_layout,
    qlinear,
    quantize,
    storage_nbytes,
    to_bnb_quant_state,
    unpack,
)
from quant.bnb_cpu import bounds_4bit, code_4bit, dynamic_map, quantize_int8
from quant.pack import pack
from qwenlocal.errors import UserError

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# (shape, blocksize): the expert shapes, numel not a multiple of the block, odd numel, bigger blocks
CASES_4BIT = [
    ((768, 2048), 64),
    ((2048, 768), 64),
    ((33, 66), 64),
    ((5, 7), 64),
    ((96, 320), 128),
    ((40, 1000), 256),
    ((3, 4096), 4096),
    ((7, 160), 32),
]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (so NaNs compare equal too). What "equal to bitsandbytes" means
    for stored data: packed codes, scales and code books."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(
        a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8)
    )


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and values, with -0.0 == +0.0 and NaN == NaN. What "equal to bitsandbytes"
    means for dequantized weights: FP4's negative-zero code decodes to -0.0 in bnb's CUDA and some
    of its CPU builds and to +0.0 in others (AVX512 vs AVX2), and the sign of a zero weight changes
    no product."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    both_nan = torch.isnan(a) & torch.isnan(b)
    return bool(((a == b) | both_nan).all())


def weights(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    # uneven block scales, like real weights
    w.view(-1)[:: max(1, w.numel() // 50)] *= 40
    return w.to(dtype)


def assert_matches_bnb(w: torch.Tensor, fmt: str, blocksize: int, dq: bool) -> QTensor:
    packed, state = bnbf.quantize_4bit(
        w, blocksize=blocksize, compress_statistics=dq, quant_type=fmt, quant_storage=torch.uint8
    )
    q = quantize(w, fmt, blocksize, dq)
    assert same_bits(q.weight, packed)
    assert same_bits(q.absmax, state.absmax)
    assert same_bits(q.quant_map, state.code)
    if dq:
        assert same_bits(q.nested_absmax, state.state2.absmax)
        assert same_bits(q.nested_quant_map, state.state2.code)
        assert same_bits(q.offset, state.offset)
    else:
        assert q.nested_absmax is None and q.offset is None
    return q


# ---------------------------------------------------------------------------------- 4-bit


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("dq", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,blocksize", CASES_4BIT, ids=str)
def test_4bit_bit_identical_to_bnb(fmt, dq, dtype, shape, blocksize):
    w = weights(shape, dtype)
    q = assert_matches_bnb(w, fmt, blocksize, dq)
    assert q.shape == shape and q.dtype == dtype and q.blocksize == blocksize and q.fmt == fmt


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
def test_4bit_ties_and_edge_values(fmt):
    """Values exactly on bnb's midpoints and one ulp either side, zeros, subnormals, zero blocks."""
    bounds, _ = bounds_4bit(fmt)
    vals = [1.0, -1.0, 0.0, -0.0, 1e-40, -1e-40, 1e-45]
    for b in bounds:
        vals += [
            b.item(),
            torch.nextafter(b, torch.tensor(2.0)).item(),
            torch.nextafter(b, torch.tensor(-2.0)).item(),
        ]
    x = torch.zeros(4, 64)
    x.view(-1)[: len(vals)] = torch.tensor(vals)
    x[2] = 1e-39  # absmax below bnb's 1e-38 clamp
    x[2, 3] = -5e-40
    assert_matches_bnb(x, fmt, 64, False)
    assert_matches_bnb(x.view(-1)[:200].contiguous(), fmt, 64, False)  # tail block of 8


@pytest.mark.parametrize("threads", [1, 2])
def test_double_quant_offset_follows_bnb_threads(threads):
    """bnb's offset is an fp32 mean whose last bit depends on torch's thread count past 32768 blocks;
    ours is computed the same way, so both agree under any one setting (both are set here, so the
    test does not depend on the machine's default)."""
    w = weights((1024, 4096), torch.bfloat16)  # 65536 blocks
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert_matches_bnb(w, "nf4", 64, True)
    finally:
        torch.set_num_threads(before)


def test_4bit_odd_views_and_strides():
    big = weights((65 * 64 + 1,), torch.bfloat16)
    assert_matches_bnb(big[1:].view(65, 64), "nf4", 64, False)  # starts at an odd element
    assert_matches_bnb(weights((128, 64), torch.bfloat16).t(), "nf4", 64, True)  # not contiguous


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("dq", [False, True], ids=["plain", "dq"])
def test_4bit_nonfinite_and_degenerate_blocks(fmt, dq):
    w = weights((300, 64), torch.bfloat16)
    w[0, 5] = float("nan")
    w[1, 3] = float("inf")
    w[2, 7] = -float("inf")
    w[3] = 0
    assert_matches_bnb(w, fmt, 64, dq)
    # every block with the same absmax: the nested blocks are all zero
    z = torch.ones(512, 64, dtype=torch.bfloat16)
    z[:, ::2] = -1
    assert_matches_bnb(z, fmt, 64, dq)
    assert_matches_bnb(torch.zeros(8, 64), fmt, 64, dq)


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("dq", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,blocksize", [((192, 512), 64), ((33, 66), 64), ((40, 1000), 256)], ids=str)
def test_4bit_dequantize_equals_bnb(fmt, dq, dtype, shape, blocksize):
    w = weights(shape, dtype)
    packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=dq, quant_type=fmt)
    q = quantize(w, fmt, blocksize, dq)
    ref = bnbf.dequantize_4bit(packed, state)
    ours = dequantize(q)
    assert ours.dtype == dtype and ours.shape == shape
    assert same_values(ours, ref)
    # bnb reading our tensors through to_bnb_quant_state gives the same values
    assert same_values(bnbf.dequantize_4bit(q.weight, to_bnb_quant_state(q)), ref)
    # to another dtype, into a caller's buffer
    state.dtype = torch.float32
    buf = torch.empty(w.numel(), dtype=torch.float32)
    assert same_values(dequantize(q, out=buf).view(shape), bnbf.dequantize_4bit(packed, state))


def test_same_values_ignores_the_sign_of_zero_only():
    a = torch.tensor([0.0, 1.0, float("nan")])
    assert same_values(a, torch.tensor([-0.0, 1.0, float("nan")]))
    assert not same_bits(a, torch.tensor([-0.0, 1.0, float("nan")]))
    assert not same_values(a, torch.tensor([0.0, 1.0 + 2**-23, float("nan")]))
    assert not same_values(a, a.double())


def test_code_books_equal_bitsandbytes():
    """The code books are written out in quant.formats (the CPU path never imports bnb)."""
    for fmt in ("nf4", "fp4"):
        assert same_bits(code_4bit(fmt), bnbf.get_4bit_type(fmt, device="cpu").float())
    assert same_bits(dynamic_map(), bnbf.create_dynamic_map().float())


def test_from_bnb_round_trip():
    w = weights((64, 256), torch.bfloat16)
    for dq in (False, True):
        packed, state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=dq)
        q = from_bnb(packed, state)
        ref = quantize(w, "nf4", 64, dq)
        assert q.spec == ref.spec
        for name, t in ref.parts().items():
            assert same_bits(q.parts()[name], t)
        st = to_bnb_quant_state(q)
        assert st.nested == dq and st.quant_type == "nf4" and tuple(st.shape) == (64, 256)
    data, row_absmax, _ = bnbf.int8_vectorwise_quant(w)
    q8 = from_bnb(data, row_absmax, dtype=torch.bfloat16)
    assert same_bits(q8.weight, quantize(w, "int8").weight)
    with pytest.raises(ValueError):
        to_bnb_quant_state(q8)


# ---------------------------------------------------------------------------------- int8


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(768, 2048), (2048, 768), (3, 5), (1, 7)], ids=str)
def test_int8_bit_identical_to_bnb(dtype, shape):
    w = weights(shape, dtype)
    data, row_absmax, outliers = bnbf.int8_vectorwise_quant(w.clone())
    assert outliers is None
    q = quantize(w, "int8")
    assert same_bits(q.weight, data)
    assert same_bits(q.absmax, row_absmax)
    assert q.blocksize == shape[-1] and q.quant_map is None
    ref = bnbf.int8_vectorwise_dequant(data, row_absmax)
    assert same_values(dequantize(q, torch.float32), ref)
    assert same_values(dequantize(q), ref.to(dtype))


def test_int8_zero_row_and_3d():
    w = weights((4, 6, 32), torch.bfloat16)
    w[1, 2] = 0
    data, row_absmax, _ = bnbf.int8_vectorwise_quant(w.reshape(-1, 32))
    q = quantize(w, "int8")
    assert q.weight.shape == (4, 6, 32)
    assert same_bits(q.weight.reshape(-1, 32), data)
    assert same_bits(q.absmax, row_absmax)


# ---------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    "shape,fmt,blocksize,dq",
    [
        ((768, 2048), "nf4", 64, False),
        ((768, 2048), "nf4", 64, True),
        ((2048, 768), "fp4", 128, True),
        ((33, 66), "nf4", 64, True),
        ((5, 7), "fp4", 64, False),
        ((70000, 8), "nf4", 64, True),  # more than 256 nested blocks, last one partial
        ((768, 2048), "int8", 64, False),
        ((3, 5), "int8", 64, False),
    ],
    ids=str,
)
def test_storage_nbytes_is_exact(shape, fmt, blocksize, dq):
    q = quantize(weights(shape, torch.bfloat16), fmt, blocksize, dq)
    real = sum(t.numel() * t.element_size() for t in q.parts().values())
    assert storage_nbytes(shape, fmt, blocksize, dq) == real == q.nbytes == q.spec.nbytes
    assert [(n, dt, tuple(sh)) for n, dt, sh in q.spec.parts()] == [
        (n, t.dtype, tuple(t.shape)) for n, t in q.parts().items()
    ]


def test_bits_per_weight():
    bpw = {
        (fmt, dq): (
            QSpec((768, 2048), fmt, 64, dq).bits_per_weight + QSpec((2048, 768), fmt, 64, dq).bits_per_weight
        )
        / 2
        for fmt, dq in [("nf4", False), ("nf4", True), ("int8", False)]
    }
    assert round(bpw["nf4", False], 2) == 4.50
    assert round(bpw["nf4", True], 2) == 4.13
    assert round(bpw["int8", False], 2) == 8.03  # 8.016 for [768, 2048], 8.042 for [2048, 768]
    assert round(QSpec((768, 2048), "int8").bits_per_weight, 2) == 8.02
    q = quantize(weights((768, 2048), torch.bfloat16), "nf4", 64, True)
    assert q.bits_per_weight == pytest.approx(4.1325, abs=1e-4)
    # one expert (gate, up, down) in MiB: the sizes behind `qwenlocal vram`'s experts row
    expert = [(768, 2048), (768, 2048), (2048, 768)]
    mib = {
        k: sum(storage_nbytes(s, *k) for s in expert) / 2**20
        for k in [("nf4", 64, True), ("int8", 64, False)]
    }
    assert round(mib["nf4", 64, True], 3) == 2.325
    assert round(mib["int8", 64, False], 3) == 4.514


# ---------------------------------------------------------------------------------- serialization


def test_safetensors_round_trip(tmp_path):
    qs = {
        "model.layers.0.mlp.experts.0.gate_proj": quantize(
            weights((96, 256), torch.bfloat16), "nf4", 64, True
        ),
        "model.layers.0.mlp.experts.0.down_proj": quantize(weights((256, 96), torch.bfloat16), "fp4", 128),
        "model.layers.0.self_attn.q_proj": quantize(weights((64, 96), torch.float16), "int8"),
    }
    tensors, meta = {}, {}
    for prefix, q in qs.items():
        tensors |= q.to_tensors(prefix)
        meta[prefix] = q.meta()
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" in tensors
    assert "model.layers.0.mlp.experts.0.gate_proj.nested_absmax" in tensors
    path = tmp_path / "q.safetensors"
    save_file(tensors, str(path))
    meta = json.loads(json.dumps(meta))  # what a config.json would carry
    loaded = load_file(str(path))
    for prefix, q in qs.items():
        back = QTensor.from_tensors(loaded, prefix, meta[prefix])
        assert back.spec == q.spec
        for name, t in q.parts().items():
            assert same_bits(back.parts()[name], t)
        assert same_bits(dequantize(back), dequantize(q))
    with pytest.raises(QuantFormatError, match="missing"):
        QTensor.from_tensors({}, "x", meta["model.layers.0.self_attn.q_proj"])


def test_pack_unpack_views_share_the_blob():
    expert = {
        "gate_proj": quantize(weights((96, 256), torch.bfloat16, 1), "nf4", 64, True),
        "up_proj": quantize(weights((96, 256), torch.bfloat16, 2), "nf4", 64, True),
        "down_proj": quantize(weights((256, 96), torch.bfloat16, 3), "nf4", 64, True),
        "router": quantize(weights((8, 256), torch.bfloat16, 4), "int8"),
    }
    blob, layout = pack(expert)
    assert blob.dtype == torch.uint8 and blob.dim() == 1 and blob.numel() == layout.nbytes
    assert layout.nbytes == pack_layout({k: q.spec for k, q in expert.items()}).nbytes
    assert layout.nbytes >= sum(q.nbytes for q in expert.values())
    assert all(slot.offset % PACK_ALIGN == 0 for slot in layout)
    # the layout survives JSON
    layout2 = PackLayout.from_dict(json.loads(json.dumps(layout.to_dict())))
    assert layout2 == layout
    views = unpack(blob, layout2)
    lo, hi = blob.data_ptr(), blob.data_ptr() + blob.numel()
    for name, q in expert.items():
        v = views[name]
        assert v.spec == q.spec
        for part, t in v.parts().items():
            assert lo <= t.data_ptr() < hi  # a view, not a copy
            assert same_bits(t, q.parts()[part])
        assert same_bits(dequantize(v), dequantize(q))
    # one copy_ moves the whole expert: overwrite the blob, the views follow
    other, _ = pack(
        {
            k: quantize(weights(q.shape, q.dtype, 9), q.fmt, q.blocksize, q.double_quant)
            for k, q in expert.items()
        }
    )
    blob.copy_(other)
    assert not same_bits(views["gate_proj"].weight, expert["gate_proj"].weight)
    # packing into a caller's buffer
    buf = torch.zeros(layout.nbytes + 100, dtype=torch.uint8)
    out, _ = pack(expert, out=buf)
    assert out.data_ptr() == buf.data_ptr()
    assert same_bits(unpack(buf, layout)["down_proj"].absmax, expert["down_proj"].absmax)


# ---------------------------------------------------------------------------------- compute


def bnb_dequantized(w: torch.Tensor, fmt: str, blocksize: int = 64, dq: bool = False) -> torch.Tensor:
    """The fp32 weight bitsandbytes itself quantizes and dequantizes w to: the oracle for compute."""
    if fmt == "int8":
        data, row_stats, _ = bnbf.int8_vectorwise_quant(w.clone())
        return bnbf.int8_vectorwise_dequant(data, row_stats).float()
    packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=dq, quant_type=fmt)
    state.dtype = torch.float32
    return bnbf.dequantize_4bit(packed, state)


@pytest.mark.parametrize("fmt,dq", [("nf4", False), ("nf4", True), ("fp4", False), ("int8", False)])
@pytest.mark.parametrize("xshape", [(1, 256), (16, 256), (2, 3, 256)], ids=str)
@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float32], ids=str)
def test_qlinear_matches_dequantized_linear(fmt, dq, xshape, xdtype):
    w = weights((96, 256), torch.bfloat16)
    q = quantize(w, fmt, 64, dq)
    x = torch.randn(xshape).to(xdtype)
    y = qlinear(x, q)
    assert y.dtype == xdtype and y.shape == (*xshape[:-1], 96)
    ref = F.linear(x.float(), bnb_dequantized(w, fmt, 64, dq))
    if xdtype == torch.float32:
        torch.testing.assert_close(y.float(), ref, rtol=1e-5, atol=1e-5)
    else:  # bf16 in and out; the GEMM itself runs in bf16 on CPUs with native bf16 (AVX512-BF16)
        torch.testing.assert_close(y.float(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())
    bias = torch.randn(96)
    torch.testing.assert_close(qlinear(x.float(), q, bias), ref + bias, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        qlinear(torch.randn(1, 255), q)


@pytest.mark.parametrize("dq", [False, True], ids=["plain", "dq"])
def test_bnb_matmul_4bit_accepts_our_state(dq):
    q = quantize(weights((96, 256), torch.bfloat16), "nf4", 64, dq)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    y = bnb.matmul_4bit(x, q.weight, to_bnb_quant_state(q))
    torch.testing.assert_close(y.float(), qlinear(x, q).float(), rtol=2e-2, atol=2e-2)


def test_quant_linear_module():
    lin = torch.nn.Linear(256, 96, bias=True).to(torch.bfloat16)
    m = QuantLinear.from_linear(lin, "nf4", 64, double_quant=True)
    assert (m.in_features, m.out_features) == (256, 96)
    assert "nf4" in repr(m) and "double_quant" in repr(m)
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    w = bnb_dequantized(lin.weight.detach(), "nf4", 64, True)
    torch.testing.assert_close(m(x).float(), F.linear(x.float(), w, lin.bias.float()), rtol=1e-2, atol=1e-2)
    assert torch.equal(m.dequantized_weight(), dequantize(quantize(lin.weight.detach(), "nf4", 64, True)))
    # state_dict keys are the to_tensors names; a meta-built module loads them by assignment
    sd = m.state_dict()
    assert set(sd) - {"bias"} == {k.removeprefix("p.") for k in m.qtensor.to_tensors("p")}
    empty = QuantLinear.from_spec(m.spec, bias=True)
    assert empty.weight.is_meta
    empty.load_state_dict(sd, assign=True)
    assert torch.equal(empty(x), m(x))
    m8 = QuantLinear.from_linear(lin.weight.detach(), "int8")
    assert m8.bias is None and m8(x).shape == (4, 96)
    m8.to(torch.device("cpu"))
    assert m8.qtensor.absmax.dtype == torch.float32


# ---------------------------------------------------------------------------------- errors


def test_bad_recipes_raise_clear_errors():
    w = weights((8, 64), torch.bfloat16)
    for bad in [
        lambda: quantize(w, "nf3"),
        lambda: quantize(w, "nf4", 48),
        lambda: quantize(w, "int8", double_quant=True),
    ]:
        with pytest.raises(QuantFormatError) as e:
            bad()
        assert isinstance(e.value, UserError) and isinstance(e.value, ValueError)
        assert str(e.value).endswith(".")
    with pytest.raises(ValueError, match="nf4, fp4, int8"):
        storage_nbytes((8, 64), "q4_k")
    with pytest.raises(ValueError, match="float"):
        quantize(w.to(torch.int32), "nf4")
    with pytest.raises(ValueError):
        quantize(torch.empty(0, 64), "nf4")
    assert math.isclose(QSpec((8, 64), "nf4", 4096).bits_per_weight, (256 + 4 + 64) * 8 / 512)


def test_pack_into_a_used_buffer_gives_the_bytes_of_a_fresh_blob():
    """Packing into a loader's row (out=) that held something before: the parts and the zero
    padding between them, byte for byte what a new blob gets."""
    expert = {
        "gate_proj": quantize(weights((96, 256), torch.bfloat16, 1), "nf4", 64, True),
        "router": quantize(weights((8, 250), torch.bfloat16, 4), "int8"),  # padding after it
    }
    fresh, layout = pack(expert)
    used = torch.full((layout.nbytes + 64,), 0xAB, dtype=torch.uint8)
    blob, _ = pack(expert, out=used)
    assert blob is used and torch.equal(used[: layout.nbytes], fresh)
    assert torch.equal(used[layout.nbytes :], torch.full((64,), 0xAB, dtype=torch.uint8))
    gaps = torch.ones(layout.nbytes, dtype=torch.bool)
    for slot in layout:
        gaps[slot.offset : slot.offset + slot.nbytes] = False
    assert gaps.any() and not fresh[gaps].any()


class _OnGpu(torch.Tensor):
    """A CPU tensor that says it is on a GPU: reaches quantize_int8's GPU branch on this machine."""

    @property
    def is_cuda(self) -> bool:
        return True


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_int8_on_gpu_takes_every_dtype(dtype, monkeypatch):
    """bnb's CUDA int8_vectorwise_quant refuses anything but fp16 ('A must be float16'): the GPU
    branch must not hand it bf16/fp32 rows, and must give the CPU path's bytes."""

    real = bnbf.int8_vectorwise_quant

    def fp16_only(a, threshold=0.0):
        if a.dtype != torch.float16:
            raise RuntimeError("A must be float16")
        return real(a.as_subclass(torch.Tensor), threshold)

    monkeypatch.setattr(bnbf, "int8_vectorwise_quant", fp16_only)
    w = weights((300, 70), dtype)
    w[5] = 0
    data, row_absmax = quantize_int8(w.as_subclass(_OnGpu))
    ref = quantize(w, "int8")
    assert same_bits(data.as_subclass(torch.Tensor), ref.weight)
    assert same_bits(row_absmax.as_subclass(torch.Tensor), ref.absmax)
