"""Grouped expert compute: all k selected experts of a token in two launches, expert ids read on the device.

    h   = silu(x @ G_e.T) * (x @ U_e.T)        gate_up: one program per (token, expert, row tile)
    out = sum_j  w_j * (h_j @ D_e_j.T)          down: one program per (token, row tile), j in id order

Where the weights live. `buf` holds one row per expert (or per cache slot) and `rows` [N, k] says which
row each (token, pick) reads, so resident experts (row = expert id) and the offload cache (row = slot)
share one kernel:

    quantized   buf uint8 [R, B]: one quant.pack blob per row; for each of gate, up, down the
                byte offsets of (weight, absmax, quant_map, nested_absmax, nested_quant_map, offset,
                scale_zero) within the row (-1: absent), every part 64-byte aligned.
                nf4/fp4 weight: two codes a byte, high nibble first, over the row-major [out, in] matrix;
                block b = element // blocksize scales by absmax[b] (fp32), or with double quant by
                nested_quant_map[absmax[b]] * nested_absmax[b // 256] + offset (absmax uint8).
                int8 weight [out, in], scaled per row by absmax[row] / 127 (bitsandbytes' formula).
                int4 weight uint8 [out, in / 2], as stored ("plain": row-major, high nibble first,
                the nf4 byte order) or in this CPU's int4 kernel layout (`packing`, quant/int4.py:
                rows in blocks of B, K-major inside a block, two rows a byte); scale_zero bf16
                [in / G, out, 2], G = blocksize:
                W[n, k] = code * scale + (zero - 8 * scale) with (scale, zero) = scale_zero[k // G, n].
                Resident blobs on the CPU and every host store of offloaded experts (and so the
                device slots, which get the same bytes) hold the CPU layout; both paths read either,
                each to the same result bit for bit whatever the packing.
    dense       gate_up [R, 2I, H] and down [R, H, I] in 16/32-bit (DenseExperts); offsets in elements.

Two implementations, equal within bf16 rounding: Triton kernels (quant/moe_triton.py, imported on
first use; CUDA, and the CPU through Triton's interpreter in the tests) and the plain-torch reference (gather the selected rows, dequantize, bmm),
which runs anywhere. `use_triton` picks one, in one place. Both are registered as torch ops
(`qwenlocal::grouped_gate_up`, `qwenlocal::grouped_down`) with fake kernels so a decode step can be
traced, compiled or captured. The reference sums the k experts in increasing id order in x's dtype, as
the loop path does; the Triton kernel sums them in the same order in fp32 and rounds once.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from .int4 import codes, cpu_packing_parts
from .spec import INT8_SCALE, NESTED_BLOCKSIZE, PARTS  # the kernels read the parts by index
from .triton_env import triton_missing

# Tokens up to which the grouped kernels are used; a longer prefill reads each expert once per token
# here, so the caller runs it expert by expert instead.
MAX_GROUPED_TOKENS = 16
FMT_IDS = {"dense": 0, "nf4": 1, "fp4": 1, "int8": 2, "int4": 3}
# (rows per program, input columns per step) of each stage: small row tiles give the down stage
# (one program per output tile, k experts each) enough programs to fill a large GPU.
TILES = {"gate_up": (32, 128), "down": (16, 128), "gemv": (16, 128)}
# The Triton kernels' PACK constexpr for int4's packings (quant/int4.py).
PACKINGS = {"plain": 0, "halves": 1, "pairs": 2}


@dataclass(frozen=True)
class GroupedSpec:
    """How one layer's experts are stored (see the module docstring). Gate and up share a shape and so
    their block size and packing; int4's down may differ in both (its group must divide I, and the CPU
    layout needs the row count to be a multiple of its block)."""

    fmt: str  # dense, nf4, fp4, int8, int4
    double_quant: bool
    blocksize: int  # gate and up: nf4/fp4 elements per absmax, int4 the group size
    hidden: int
    inter: int
    gate: tuple[int, ...]
    up: tuple[int, ...]
    down: tuple[int, ...]
    down_blocksize: int
    packing: str  # gate and up, int4: "plain" as stored, or a CPU kernel layout (quant/int4.py)
    down_packing: str

    @classmethod
    def from_layout(cls, layout) -> GroupedSpec:
        """From a quant.pack.PackLayout of gate_proj, up_proj and down_proj."""
        specs = layout.specs
        g, d = specs["gate_proj"], specs["down_proj"]
        offs = {name: [-1] * len(PARTS) for name in specs}
        for slot in layout.slots:
            if slot.part in PARTS:
                offs[slot.name][PARTS.index(slot.part)] = slot.offset
        inter, hidden = g.shape
        return cls(
            g.fmt,
            g.double_quant,
            g.blocksize,
            hidden,
            inter,
            tuple(offs["gate_proj"]),
            tuple(offs["up_proj"]),
            tuple(offs["down_proj"]),
            d.blocksize,
            g.packing,
            d.packing,
        )

    @classmethod
    def dense(cls, hidden: int, inter: int) -> GroupedSpec:
        """gate_up [R, 2I, H] (gate rows first) and down [R, H, I]."""
        return cls("dense", False, 0, hidden, inter, (0,), (inter * hidden,), (0,), 0, "plain", "plain")


# --------------------------------------------------------------------------------------------
# Dispatch


# Triton kernels turned off in this process (qwenlocal.model.selfcheck, after one failed its check here)
TRITON_OFF: set[str] = set()


def use_triton(x: Tensor, kernel: str = "grouped") -> bool:
    """Triton on CUDA; on the CPU only when asked for (QWENLOCAL_TRITON=1 with TRITON_INTERPRET=1).
    `kernel` ("grouped" or "gemv") is off when TRITON_OFF names it, or QWENLOCAL_TRITON_GEMV=0."""
    if kernel in TRITON_OFF or (kernel == "gemv" and os.environ.get("QWENLOCAL_TRITON_GEMV") == "0"):
        return False
    if x.is_cuda:
        return _triton_available()
    return os.environ.get("QWENLOCAL_TRITON") == "1" and os.environ.get("TRITON_INTERPRET") == "1"


def _triton_available() -> bool:
    # Triton ships with CUDA builds of torch; without it, or without what its first launch builds
    # with (quant.triton_env), the torch path serves
    return not triton_missing()


def grouped_swiglu(
    x: Tensor, rows: Tensor, weights: Tensor, gate_up_buf: Tensor, down_buf: Tensor, spec: GroupedSpec
) -> Tensor:
    """x [N, H], rows and weights [N, k] (rows sorted by expert id) -> sum_j w_j * expert_j(x) [N, H]."""
    s = spec
    h = torch.ops.qwenlocal.grouped_gate_up(
        x, rows, gate_up_buf, s.fmt, s.double_quant, s.blocksize, s.inter, list(s.gate), list(s.up), s.packing
    )
    return torch.ops.qwenlocal.grouped_down(
        h,
        rows,
        weights,
        down_buf,
        s.fmt,
        s.double_quant,
        s.down_blocksize,
        s.hidden,
        list(s.down),
        s.down_packing,
    )


@torch.library.custom_op("qwenlocal::grouped_gate_up", mutates_args=())
def _gate_up_op(
    x: Tensor,
    rows: Tensor,
    buf: Tensor,
    fmt: str,
    double_quant: bool,
    blocksize: int,
    inter: int,
    gate: list[int],
    up: list[int],
    packing: str,
) -> Tensor:
    if use_triton(x):
        return triton_gate_up(x, rows, buf, fmt, double_quant, blocksize, inter, gate, up, packing)
    return torch_gate_up(x, rows, buf, fmt, double_quant, blocksize, inter, gate, up, packing)


@_gate_up_op.register_fake
def _(x, rows, buf, fmt, double_quant, blocksize, inter, gate, up, packing):
    return x.new_empty(rows.numel(), inter)


@torch.library.custom_op("qwenlocal::grouped_down", mutates_args=())
def _down_op(
    h: Tensor,
    rows: Tensor,
    weights: Tensor,
    buf: Tensor,
    fmt: str,
    double_quant: bool,
    blocksize: int,
    hidden: int,
    down: list[int],
    packing: str,
) -> Tensor:
    if use_triton(h):
        return triton_down(h, rows, weights, buf, fmt, double_quant, blocksize, hidden, down, packing)
    return torch_down(h, rows, weights, buf, fmt, double_quant, blocksize, hidden, down, packing)


@_down_op.register_fake
def _(h, rows, weights, buf, fmt, double_quant, blocksize, hidden, down, packing):
    return h.new_empty(rows.shape[0], hidden)


# --------------------------------------------------------------------------------------------
# Plain torch: the reference, and the path on devices without Triton


def dequantize_rows(
    sel: Tensor,
    fmt: str,
    double_quant: bool,
    blocksize: int,
    offs: list[int],
    shape: tuple[int, int],
    packing: str = "plain",
) -> Tensor:
    """sel [M, B]: M gathered rows of `buf` -> their matrices [M, out, in] in fp32 (dense: as stored)."""
    m, (out, inn) = sel.shape[0], shape
    n = out * inn

    def part(i: int, dtype: torch.dtype, count: int) -> Tensor:
        raw = sel[:, offs[i] : offs[i] + count * dtype.itemsize]
        return raw.view(dtype)

    if fmt == "dense":
        return sel.reshape(m, -1)[:, offs[0] : offs[0] + n].reshape(m, out, inn)
    if fmt == "int8":
        w = part(0, torch.int8, n).view(m, out, inn)
        return w * part(1, torch.float32, out).unsqueeze(-1) * INT8_SCALE
    if fmt == "int4":  # code * scale + (zero - 8 * scale), as quant.int4 computes it
        groups = inn // blocksize
        c = codes(part(0, torch.uint8, n // 2).view(m, out, inn // 2), shape, packing)
        sz = part(6, torch.bfloat16, groups * out * 2).view(m, groups, out, 2).float().transpose(1, 2)
        scale, zero = sz[..., 0:1], sz[..., 1:2]  # [M, out, groups, 1]
        w = c.view(m, out, groups, blocksize).float()
        return torch.addcmul(zero - 8 * scale, w, scale, out=w).view(m, out, inn)
    nblocks = -(-n // blocksize)
    packed = part(0, torch.uint8, (n + 1) // 2)
    qmap = part(2, torch.float32, 16)
    pairs = torch.stack((packed >> 4, packed & 15), dim=-1).view(m, -1)[:, :n].long()
    vals = qmap.gather(1, pairs)
    if double_quant:
        nested = part(3, torch.float32, -(-nblocks // NESTED_BLOCKSIZE))
        nested_per_block = nested.repeat_interleave(NESTED_BLOCKSIZE, dim=1)[:, :nblocks]
        code = part(4, torch.float32, 256)  # bnb: code[qabsmax[b]] * nested_absmax[b // 256] + offset
        absmax = code.gather(1, part(1, torch.uint8, nblocks).long()) * nested_per_block + part(
            5, torch.float32, 1
        )
    else:
        absmax = part(1, torch.float32, nblocks)
    full = (n // blocksize) * blocksize
    w = torch.empty(m, n, dtype=torch.float32, device=sel.device)
    torch.mul(
        vals[:, :full].view(m, -1, blocksize),
        absmax[:, : full // blocksize].unsqueeze(-1),
        out=w[:, :full].view(m, -1, blocksize),
    )
    if full < n:
        torch.mul(vals[:, full:], absmax[:, -1:], out=w[:, full:])
    return w.view(m, out, inn)


def _gather(buf: Tensor, rows: Tensor) -> Tensor:
    return buf.index_select(0, rows.reshape(-1)).reshape(rows.numel(), -1)


def _compute_dtype(fmt: str, x: Tensor) -> torch.dtype:
    # quantized weights are dequantized to fp32 and multiplied in fp32, as quant.linear does on the CPU
    return x.dtype if fmt == "dense" else torch.float32


def torch_gate_up(x, rows, buf, fmt, double_quant, blocksize, inter, gate, up, packing="plain") -> Tensor:
    n, hidden = x.shape
    k = rows.shape[1]
    sel = _gather(buf, rows)
    dt = _compute_dtype(fmt, x)
    xs = x.to(dt).unsqueeze(-1)  # [N, H, 1]
    out = []
    for offs in (gate, up):
        w = dequantize_rows(sel, fmt, double_quant, blocksize, offs, (inter, hidden), packing)
        out.append(torch.bmm(w.reshape(n, k * inter, hidden), xs).view(n * k, inter).to(x.dtype))
    return torch.nn.functional.silu(out[0]) * out[1]


def torch_down(h, rows, weights, buf, fmt, double_quant, blocksize, hidden, down, packing="plain") -> Tensor:
    m, inter = h.shape
    n, k = rows.shape
    w = dequantize_rows(_gather(buf, rows), fmt, double_quant, blocksize, down, (hidden, inter), packing)
    y = torch.bmm(w, h.to(w.dtype).unsqueeze(-1)).view(n, k, hidden).to(h.dtype)
    y = y * weights.to(h.dtype).unsqueeze(-1)
    out = y[:, 0].clone()
    for j in range(1, k):  # one expert after another, in id order, as the loop path sums
        out += y[:, j]
    return out


# --------------------------------------------------------------------------------------------
# Triton


def _meta(fmt: str, double_quant: bool, blocksize: int, k: int, stage: str, packing: str) -> dict:
    block_n, block_k = TILES[stage]
    block_k = min(block_k, max(16, 1 << (k - 1).bit_length()))
    if fmt in ("nf4", "fp4", "int4"):  # int4: one group per step (K is a multiple of the group)
        block_k = min(block_k, blocksize)
    row_scale = fmt in ("nf4", "fp4") and k % blocksize == 0
    block, style = (0, "plain") if packing == "plain" else cpu_packing_parts(packing)
    return {
        "FMT": FMT_IDS[fmt],
        "DQ": bool(double_quant),
        "BS": max(blocksize, 1),
        "ROW_SCALE": row_scale,
        "PACK": PACKINGS[style],
        "PB": block,
        "BLOCK_N": block_n,
        "BLOCK_K": block_k,
    }


def on_device(device: torch.device):
    """Triton launches on the current CUDA device and its current stream: make it the tensors'
    (`--device cuda:1` while device 0 is current would launch on the wrong card)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _offsets(offs: list[int]) -> list[int]:
    return [max(o, 0) for o in offs] + [0] * (len(PARTS) - len(offs))


def triton_gate_up(x, rows, buf, fmt, double_quant, blocksize, inter, gate, up, packing="plain") -> Tensor:
    from .moe_triton import gate_up_kernel

    n, hidden = x.shape
    k = rows.shape[1]
    x = x.contiguous()
    rows = rows.contiguous()
    h = torch.empty(n * k, inter, dtype=x.dtype, device=x.device)
    meta = _meta(fmt, double_quant, blocksize, hidden, "gate_up", packing)
    grid = (n * k, -(-inter // meta["BLOCK_N"]))
    with on_device(x.device):
        gate_up_kernel[grid](
            x, rows, buf, h, buf.stride(0), hidden, inter, *_offsets(gate), *_offsets(up), TOPK=k, **meta
        )
    return h


def triton_down(h, rows, weights, buf, fmt, double_quant, blocksize, hidden, down, packing="plain") -> Tensor:
    from .moe_triton import down_kernel

    n, k = rows.shape
    inter = h.shape[1]
    out = torch.empty(n, hidden, dtype=h.dtype, device=h.device)
    meta = _meta(fmt, double_quant, blocksize, inter, "down", packing)
    grid = (n, -(-hidden // meta["BLOCK_N"]))
    with on_device(h.device):
        down_kernel[grid](
            h.contiguous(),
            rows.contiguous(),
            weights.contiguous(),
            buf,
            out,
            buf.stride(0),
            hidden,
            inter,
            *_offsets(down),
            TOPK=k,
            **meta,
        )
    return out


def triton_qgemv(x: Tensor, q) -> Tensor:
    """x [T, K] @ dequantize(q).T for a QTensor q (nf4/fp4/int8, int4 in any packing), without
    dequantizing the matrix."""
    from .moe_triton import gemv_kernel

    t, kdim = x.shape
    out = q.shape[0]
    y = torch.empty(t, out, dtype=x.dtype, device=x.device)
    meta = _meta(q.fmt, q.double_quant, q.blocksize, kdim, "gemv", q.packing)
    w = q.weight
    ptrs = [q.absmax, q.quant_map, q.nested_absmax, q.nested_quant_map, q.offset, q.scale_zero]
    ptrs = [p if p is not None else w for p in ptrs]  # never read: the format has no such part
    grid = (t, -(-out // meta["BLOCK_N"]))
    with on_device(x.device):
        gemv_kernel[grid](x.contiguous(), w, *ptrs, y, kdim, out, **meta)
    return y
