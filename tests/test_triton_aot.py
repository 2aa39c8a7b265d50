"""Every Triton kernel compiled ahead of time, as a card of each generation would build it: sm_75
(T4, RTX 20xx: no native bf16), sm_80 (A100, RTX 30xx) and sm_90 (H100/H200). Triton's compiler and
its bundled ptxas run without a GPU; the metadata is what the launchers pass (moe_kernels._meta).
The interpreter tests run the kernels' Python, not this compiler."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

from quant import moe_kernels, moe_triton  # noqa: E402

# The activation dtype each card runs: fp16 below sm_80 (no native bf16), bf16 from sm_80 on.
CAPABILITIES = {75: "*fp16", 80: "*bf16", 90: "*bf16"}
# (format, double quant, packing): every storage the kernels read on every card; the rarer
# variants (no double quant, int4 in the CPU layouts of offloaded slots) on sm_90 only, to keep
# the test under a minute
FORMATS = [
    ("dense", False, "plain"),
    ("nf4", True, "plain"),
    ("int8", False, "plain"),
    ("int4", False, "plain"),
]
MORE_FORMATS = [("nf4", False, "plain"), ("int4", False, "cpu-halves64"), ("int4", False, "cpu-pairs32")]
STAGES = ("gate_up", "down", "gemv")
BLOCKSIZE, K = 64, 2048


def _ptxas() -> Path | None:
    env = os.environ.get("TRITON_PTXAS_PATH")
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    path = Path(env) if env else bundled
    return path if path.is_file() else None


def _types(fmt: str, dq: bool, act: str) -> dict[str, str]:
    dt = "*fp32" if fmt == "dense" else act
    return {
        "x_ptr": dt, "h_ptr": dt, "out_ptr": dt, "y_ptr": dt, "wts_ptr": dt, "rows_ptr": "*i64",
        "buf_ptr": dt if fmt == "dense" else "*u8", "stride_row": "i64",
        "w_ptr": "*i8" if fmt == "int8" else "*u8", "a_ptr": "*u8" if dq else "*fp32", "q_ptr": "*fp32",
        "na_ptr": "*fp32", "nq_ptr": "*fp32", "o_ptr": "*fp32", "sz_ptr": "*bf16",
    }  # fmt: skip


def cases(cap: int) -> list[tuple[str, str, bool, str]]:
    formats = FORMATS + (MORE_FORMATS if cap == 90 else [])
    return [
        (stage, fmt, dq, packing)
        for stage in STAGES
        for fmt, dq, packing in formats
        if not (stage == "gemv" and fmt == "dense")  # the GEMV serves quantized linears only
    ]


@pytest.mark.parametrize("cap", CAPABILITIES)
def test_every_triton_kernel_compiles_for(cap):
    if _ptxas() is None:
        pytest.skip("this Triton has no ptxas (set TRITON_PTXAS_PATH)")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    failed = []
    act = CAPABILITIES[cap]
    for stage, fmt, dq, packing in cases(cap):
        meta = moe_kernels._meta(fmt, dq, BLOCKSIZE, K, stage, packing)
        fn = getattr(moe_triton, f"{stage}_kernel")
        if stage != "gemv":
            meta["TOPK"] = 8
        types = _types(fmt, dq, act)
        signature = {n: ("constexpr" if n in meta else types.get(n, "i32")) for n in fn.arg_names}
        try:
            compiled = triton.compile(
                ASTSource(fn=fn, signature=signature, constexprs=meta), target=GPUTarget("cuda", cap, 32)
            )
            assert compiled.asm["cubin"]
        except Exception as e:  # collect every failure, not only the first
            failed.append(f"{stage} {fmt} dq={dq} {packing} {act}: {type(e).__name__}: {str(e)[:200]}")
    assert failed == [], "\n".join(failed)
