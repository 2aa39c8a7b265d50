"""The Triton kernels of quant.moe_kernels (layouts, launchers and the plain-torch reference are
there); a module of its own so that importing the package does not import Triton."""

import triton
import triton.language as tl


@triton.jit
def scale_of(blk, a_ptr, nq_ptr, na_ptr, o_ptr, mask, DQ: tl.constexpr):
    if DQ:
        qa = tl.load(a_ptr + blk, mask=mask, other=0).to(tl.int32)
        nq = nq_ptr.to(tl.pointer_type(tl.float32))
        na = na_ptr.to(tl.pointer_type(tl.float32))
        off = tl.load(o_ptr.to(tl.pointer_type(tl.float32)))
        scale = tl.load(nq + qa, mask=mask, other=0.0) * tl.load(na + blk // 256, mask=mask, other=0.0) + off
    else:
        scale = tl.load(a_ptr.to(tl.pointer_type(tl.float32)) + blk, mask=mask, other=0.0)
    return scale


@triton.jit
def int4_dots(
    x_ptr,
    w_ptr,
    sz_ptr,
    r,
    rmask,
    K,
    N,
    BS: tl.constexpr,
    PACK: tl.constexpr,
    PB: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """W[r, :] @ x in fp32 for int4 in any packing (PACK 0: as stored; 1, 2: the CPU layouts, blocks
    of PB rows); a step of BLOCK_K columns lies inside group k0 // BS of every row. Every packing
    does the same arithmetic in the same order (even and odd columns paired), so an offloaded
    expert's slot (CPU layout) gives the resident expert's result (as stored) bit for bit."""
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    HALF: tl.constexpr = BLOCK_K // 2
    j = tl.arange(0, HALF)
    if PACK != 0:
        # row r is row i of block r // PB, whose bytes are K-major, PB/2 a column: W[r, k] sits in
        # byte row_byte + k * PB/2 (row_byte counts the block's start), at bit `shift`
        HB: tl.constexpr = PB // 2
        i = r % PB
        if PACK == 1:  # halves: rows i and i + PB/2 share a byte, the first in the low nibble
            row_byte = (r // PB) * K * HB + i % HB
            shift = (i // HB) * 4
        else:  # pairs: rows 2b (low nibble) and 2b + 1 share byte b
            row_byte = (r // PB) * K * HB + i // 2
            shift = (i % 2) * 4
    for k0 in range(0, K, BLOCK_K):
        jm = k0 + 2 * j < K
        xe = tl.load(x_ptr + k0 + 2 * j, mask=jm, other=0.0).to(tl.float32)
        xo = tl.load(x_ptr + k0 + 2 * j + 1, mask=jm, other=0.0).to(tl.float32)
        m2 = rmask[:, None] & jm[None, :]
        if PACK == 0:  # row-major, columns 2j (high nibble) and 2j + 1 (low) in byte j
            byte = tl.load(w_ptr + ((r * K + k0) // 2)[:, None] + j[None, :], mask=m2, other=0).to(tl.int32)
            even, odd = byte >> 4, byte & 15
        else:
            col = w_ptr + row_byte[:, None] + (k0 + 2 * j)[None, :] * HB
            even = (tl.load(col, mask=m2, other=0).to(tl.int32) >> shift[:, None]) & 15
            odd = (tl.load(col + HB, mask=m2, other=0).to(tl.int32) >> shift[:, None]) & 15
        dot = tl.sum(even.to(tl.float32) * xe[None, :] + odd.to(tl.float32) * xo[None, :], axis=1)
        sz = sz_ptr.to(tl.pointer_type(tl.bfloat16)) + ((k0 // BS) * N + r) * 2
        s = tl.load(sz, mask=rmask, other=0.0).to(tl.float32)
        z = tl.load(sz + 1, mask=rmask, other=0.0).to(tl.float32)
        # sum_k (code_k * s + z - 8 s) x_k = s * (codes . x) + (z - 8 s) * sum(x)
        acc += dot * s + tl.sum(xe + xo, axis=0) * (z - 8.0 * s)
    return acc


@triton.jit
def row_dots(
    x_ptr,
    w_ptr,
    a_ptr,
    q_ptr,
    na_ptr,
    nq_ptr,
    o_ptr,
    sz_ptr,
    r,
    rmask,
    K,
    N,
    FMT: tl.constexpr,
    DQ: tl.constexpr,
    BS: tl.constexpr,
    ROW_SCALE: tl.constexpr,
    PACK: tl.constexpr,
    PB: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """W[r, :] @ x in fp32 for one matrix of N rows (see the module docstring for the layouts)."""
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    if FMT == 3:
        acc = int4_dots(x_ptr, w_ptr, sz_ptr, r, rmask, K, N, BS, PACK, PB, BLOCK_N, BLOCK_K)
    elif FMT == 1:  # two 4-bit codes a byte, high nibble first, row-major
        HALF: tl.constexpr = BLOCK_K // 2
        j = tl.arange(0, HALF)
        qmap = q_ptr.to(tl.pointer_type(tl.float32))
        for k0 in range(0, K, BLOCK_K):
            jm = k0 + 2 * j < K
            xe = tl.load(x_ptr + k0 + 2 * j, mask=jm, other=0.0).to(tl.float32)
            xo = tl.load(x_ptr + k0 + 2 * j + 1, mask=jm, other=0.0).to(tl.float32)
            m2 = rmask[:, None] & jm[None, :]
            first = r * K + k0  # element index of each row's first column in this step
            byte = tl.load(w_ptr + (first // 2)[:, None] + j[None, :], mask=m2, other=0).to(tl.int32)
            hi = tl.load(qmap + (byte >> 4))
            lo = tl.load(qmap + (byte & 15))
            prod = hi * xe[None, :] + lo * xo[None, :]
            if ROW_SCALE:  # the step lies inside one block of each row
                s = scale_of(first // BS, a_ptr, nq_ptr, na_ptr, o_ptr, rmask, DQ)
                acc += tl.sum(prod, axis=1) * s
            else:
                blk = (first[:, None] + 2 * j[None, :]) // BS
                s = scale_of(blk, a_ptr, nq_ptr, na_ptr, o_ptr, m2, DQ)
                acc += tl.sum(prod * s, axis=1)
    else:
        kk = tl.arange(0, BLOCK_K)
        wp = w_ptr
        if FMT == 2:
            wp = w_ptr.to(tl.pointer_type(tl.int8))
        for k0 in range(0, K, BLOCK_K):
            km = k0 + kk < K
            xv = tl.load(x_ptr + k0 + kk, mask=km, other=0.0).to(tl.float32)
            m2 = rmask[:, None] & km[None, :]
            w = tl.load(wp + r[:, None] * K + k0 + kk[None, :], mask=m2, other=0).to(tl.float32)
            acc += tl.sum(w * xv[None, :], axis=1)
        if FMT == 2:
            acc = acc * tl.load(a_ptr.to(tl.pointer_type(tl.float32)) + r, mask=rmask, other=0.0)
            acc = acc * 7.874015718698502e-3  # spec.INT8_SCALE: a jit kernel reads no module global
    return acc


@triton.jit
def gate_up_kernel(
    x_ptr,
    rows_ptr,
    buf_ptr,
    h_ptr,
    stride_row,
    H,
    INTER,
    gw,
    ga,
    gq,
    gna,
    gnq,
    go,
    gsz,
    uw,
    ua,
    uq,
    una,
    unq,
    uo,
    usz,
    TOPK: tl.constexpr,
    FMT: tl.constexpr,
    DQ: tl.constexpr,
    BS: tl.constexpr,
    ROW_SCALE: tl.constexpr,
    PACK: tl.constexpr,
    PB: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    m = tl.program_id(0)  # one (token, pick)
    r = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = r < INTER
    base = buf_ptr + tl.load(rows_ptr + m).to(tl.int64) * stride_row
    xp = x_ptr + (m // TOPK) * H
    g = row_dots(xp, base + gw, base + ga, base + gq, base + gna, base + gnq, base + go, base + gsz, r, rmask,
                 H, INTER, FMT, DQ, BS, ROW_SCALE, PACK, PB, BLOCK_N, BLOCK_K)  # fmt: skip
    u = row_dots(xp, base + uw, base + ua, base + uq, base + una, base + unq, base + uo, base + usz, r, rmask,
                 H, INTER, FMT, DQ, BS, ROW_SCALE, PACK, PB, BLOCK_N, BLOCK_K)  # fmt: skip
    # round as the loop path does (each projection in x's dtype), then SiLU * up
    g = g.to(h_ptr.dtype.element_ty).to(tl.float32)
    u = u.to(h_ptr.dtype.element_ty).to(tl.float32)
    h = g / (1.0 + tl.exp(-g)) * u
    tl.store(h_ptr + m * INTER + r, h.to(h_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def down_kernel(
    h_ptr,
    rows_ptr,
    wts_ptr,
    buf_ptr,
    out_ptr,
    stride_row,
    H,
    INTER,
    dw,
    da,
    dq,
    dna,
    dnq,
    do,
    dsz,
    TOPK: tl.constexpr,
    FMT: tl.constexpr,
    DQ: tl.constexpr,
    BS: tl.constexpr,
    ROW_SCALE: tl.constexpr,
    PACK: tl.constexpr,
    PB: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    n = tl.program_id(0)  # one token
    r = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = r < H
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j in tl.static_range(TOPK):  # in id order: the same order as the loop path's sum
        m = n * TOPK + j
        base = buf_ptr + tl.load(rows_ptr + m).to(tl.int64) * stride_row
        y = row_dots(h_ptr + m * INTER, base + dw, base + da, base + dq, base + dna, base + dnq, base + do,
                     base + dsz, r, rmask, INTER, H, FMT, DQ, BS, ROW_SCALE, PACK, PB, BLOCK_N, BLOCK_K)  # fmt: skip
        acc += y * tl.load(wts_ptr + m).to(tl.float32)
    tl.store(out_ptr + n * H + r, acc.to(out_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def gemv_kernel(
    x_ptr,
    w_ptr,
    a_ptr,
    q_ptr,
    na_ptr,
    nq_ptr,
    o_ptr,
    sz_ptr,
    y_ptr,
    K,
    OUT,
    FMT: tl.constexpr,
    DQ: tl.constexpr,
    BS: tl.constexpr,
    ROW_SCALE: tl.constexpr,
    PACK: tl.constexpr,
    PB: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    t = tl.program_id(0)
    r = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = r < OUT
    y = row_dots(x_ptr + t * K, w_ptr, a_ptr, q_ptr, na_ptr, nq_ptr, o_ptr, sz_ptr, r, rmask, K, OUT,
                 FMT, DQ, BS, ROW_SCALE, PACK, PB, BLOCK_N, BLOCK_K)  # fmt: skip
    tl.store(y_ptr + t * OUT + r, y.to(y_ptr.dtype.element_ty), mask=rmask)
