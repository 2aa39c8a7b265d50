"""int4: group-wise affine 4-bit weights, the convention of torch's int4pack kernels and GPTQ/AWQ.

Stored layout (checkpoint tensors, expert blobs of a checkpoint or resident on a GPU), for a weight W of
shape [N, K] (out, in) and group size G (32, 64 or 128; it divides K; "blocksize" in the metadata):

    weight      uint8    [N, K / 2]     row n, byte j: code of W[n, 2j] in the high nibble,
                                        code of W[n, 2j + 1] in the low nibble (bnb's nibble order;
                                        the uint8 input of torch's CUDA `_convert_weight_to_int4pack`)
    scale_zero  bfloat16 [K / G, N, 2]  (scale, zero) of group g of row n at [g, n]: torch's
                                        `qScaleAndZeros`, passed to its int4pack kernels unchanged

    W[n, k] = (code - 8) * scale[k // G, n] + zero[k // G, n]   (code in 0..15; computed in fp32
                                                                as code * scale + (zero - 8 * scale))

So `zero` is the value of code 8, a float (torch's convention). A GPTQ/AWQ checkpoint's integer
zero point qz (W = scale * (q - qz)) maps to zero = scale * (8 - qz). Bits per weight: 4 + 32 / G
(4.50 at G = 64, 4.25 at G = 128). There are no per-tensor constants.

In memory on the CPU, `weight` is repacked in place (same bytes, another order) into the layout of
`torch.ops.aten._convert_weight_to_int4pack_for_cpu`, which depends on the CPU capability torch
dispatches to: rows are cut into blocks of B (64 with AVX512, 32 with AVX2 and without
vectorization), stored K-major inside a block, each byte holding two rows' codes: with AVX2/AVX512
row j of the block in the low nibble and row j + B/2 in the high one ("halves"); otherwise rows 2j
(low) and 2j + 1 (high) ("pairs"). `codes` reads either back, so the plain-torch reference path
works on repacked tensors too. A self-check against torch's own packer (once) guards the guess;
when it fails, tensors stay in the stored layout and the plain path computes them. The host store
of offloaded experts is repacked too (the CPU computes cold experts from it), so a GPU slot gets
these bytes: the Triton kernels (quant/moe_triton.py) and `codes` read every packing.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import Tensor

from .scratch import scratch

GROUP_SIZES = (32, 64, 128)
# Alternating least-squares refits of (scale, zero) after the min/max start (see `quantize_int4`).
REFIT_ITERS = 2
# Rows quantized per step: bounds temporary memory (a few fp32 copies of the chunk).
CHUNK_ELEMS = 1 << 18


# --------------------------------------------------------------------------------------------
# Quantize


@torch.no_grad()
def quantize_int4(weight: Tensor, group: int, refit_iters: int | None = None) -> tuple[Tensor, Tensor]:
    """weight [N, K] (bf16/fp16/fp32) -> (weight uint8 [N, K/2], scale_zero bf16 [K/G, N, 2]).

    Per group: start from min/max (scale = range / 15), then alternate the best codes for the
    scale and zero (rounding) with the least-squares scale and zero for those codes (a linear fit),
    `refit_iters` times; codes are chosen last for the bf16-rounded scale and zero that are stored.
    Each step can only lower the group's squared error; on Gaussian weights it takes the error from
    min/max's 0.090 to 0.085 at G = 64 (NF4 with double quant: 0.092).
    """
    refit_iters = REFIT_ITERS if refit_iters is None else refit_iters
    n, k = weight.shape
    packed = torch.empty(n, k // 2, dtype=torch.uint8, device=weight.device)
    scale_zero = torch.empty(k // group, n, 2, dtype=torch.bfloat16, device=weight.device)
    step = max(1, CHUNK_ELEMS // k)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        g = weight[r0:r1].float().reshape(-1, group)
        scale, zero = _fit_groups(g, refit_iters)
        codes = _codes_for(g, scale, zero).view(r1 - r0, k)
        packed[r0:r1] = (codes[:, 0::2] << 4) | codes[:, 1::2]
        sz = torch.stack([scale, zero], dim=-1).view(r1 - r0, k // group, 2)
        scale_zero[:, r0:r1] = sz.transpose(0, 1)
    return packed, scale_zero


def _fit_groups(g: Tensor, iters: int) -> tuple[Tensor, Tensor]:
    """g [groups, G] fp32 -> bf16-exact (scale, zero) [groups], fp32."""
    lo, hi = g.aminmax(dim=1)
    scale = ((hi - lo) / 15).clamp(min=1e-30)
    zero = lo + 8 * scale
    size = g.shape[1]
    mean_w = g.mean(dim=1)
    u = torch.empty_like(g)
    for _ in range(iters):
        _signed_codes(g, scale, zero, out=u)
        mean_u = u.mean(dim=1)
        # per-group dot products as batched matmuls: one read of u (and g), no temporaries
        uu = torch.bmm(u.unsqueeze(1), u.unsqueeze(2)).view(-1) / size
        ug = torch.bmm(u.unsqueeze(1), g.unsqueeze(2)).view(-1) / size
        var = uu - mean_u * mean_u
        fit = (ug - mean_u * mean_w) / var.clamp(min=1e-30)
        # a group whose codes are all equal (var 0) keeps its scale; a fit scale is never <= 0
        scale = torch.where((var > 1e-12) & (fit > 0), fit, scale)
        zero = mean_w - scale * mean_u
    return scale.bfloat16().float(), zero.bfloat16().float()


def _signed_codes(g: Tensor, scale: Tensor, zero: Tensor, out: Tensor) -> Tensor:
    """code - 8 (in -8..7, as fp32) of the nearest code for each element under (scale, zero)."""
    inv = (1 / scale).unsqueeze(1)
    torch.addcmul((-zero).unsqueeze(1) * inv, g, inv, out=out)
    return out.round_().clamp_(-8, 7)


def _codes_for(g: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """The nearest code 0..15 for each element of g [groups, G] under (scale, zero) [groups]."""
    return _signed_codes(g, scale, zero, torch.empty_like(g)).add_(8).to(torch.uint8)


# --------------------------------------------------------------------------------------------
# Codes and dequantize (the plain-torch reference path)


def codes(weight: Tensor, shape: tuple[int, int], packing: str) -> Tensor:
    """The 4-bit codes, uint8 [..., N, K], from the stored layout or a CPU kernel layout; weight
    [..., N, K/2] is one matrix or several stacked (the grouped expert path reads k at once)."""
    n, k = shape
    lead = weight.shape[:-2]
    if packing == "plain":
        out = torch.empty(*lead, n, k // 2, 2, dtype=torch.uint8, device=weight.device)
        torch.bitwise_right_shift(weight, 4, out=out[..., 0])
        torch.bitwise_and(weight, 15, out=out[..., 1])
        return out.view(*lead, n, k)
    block, style = cpu_packing_parts(packing)
    p = weight.reshape(-1, n // block, k, block // 2)
    lo, hi = p & 15, p >> 4
    # halves: byte j holds rows j and j + B/2; pairs: rows 2j and 2j + 1
    both = torch.cat([lo, hi], dim=3) if style == "halves" else torch.stack([lo, hi], dim=4)
    return both.reshape(-1, n // block, k, block).transpose(2, 3).reshape(*lead, n, k)


def dequantize_int4(
    weight: Tensor, scale_zero: Tensor, shape: tuple[int, int], group: int, packing: str, out: Tensor
) -> Tensor:
    """W = (code - 8) * scale + zero, written into out ([N, K], any float dtype)."""
    n, k = shape
    wt = scratch("int4_wt", k * n, torch.float32, out.device)
    wt = dequantize_int4_t(weight, scale_zero, shape, group, packing, wt)
    return out.view(n, k).copy_(wt.t())


def dequantize_int4_t(
    weight: Tensor, scale_zero: Tensor, shape: tuple[int, int], group: int, packing: str, out: Tensor
) -> Tensor:
    """W.T [K, N] in fp32, into out: the orientation every layout unpacks into with contiguous
    writes (a GEMM takes it as it is). Computed as code * scale + (zero - 8 * scale), as the kernels do."""
    n, k = shape
    wt = out.view(k, n)
    u = scratch("int4_codes", k * n, torch.uint8, weight.device).view(k, n)
    if packing == "plain":
        u3 = u.view(k // 2, 2, n)  # rows 2j (high nibbles) and 2j + 1 (low nibbles) of W.T
        torch.bitwise_right_shift(weight.t(), 4, out=u3[:, 0])
        torch.bitwise_and(weight.t(), 15, out=u3[:, 1])
    else:
        block, style = cpu_packing_parts(packing)
        p = weight.view(n // block, k, block // 2)
        # the nibbles into kept scratch: fresh buffers for them cost more than the shifts
        lo = torch.bitwise_and(p, 15, out=scratch("int4_lo", p.numel(), torch.uint8, p.device).view(p.shape))
        hi = torch.bitwise_right_shift(
            p, 4, out=scratch("int4_hi", p.numel(), torch.uint8, p.device).view(p.shape)
        )
        if style == "halves":  # byte j of a block: rows j (low) and j + B/2 (high)
            u4 = u.view(k, n // block, 2, block // 2)
            u4[:, :, 0].copy_(lo.permute(1, 0, 2))
            u4[:, :, 1].copy_(hi.permute(1, 0, 2))
        else:  # pairs: rows 2j (low) and 2j + 1 (high)
            u4 = u.view(k, n // block, block // 2, 2)
            u4[..., 0].copy_(lo.permute(1, 0, 2))
            u4[..., 1].copy_(hi.permute(1, 0, 2))
    wt.copy_(u)
    sz = scale_zero.float()
    # contiguous [K/G, 1, N]: a strided operand would take the slow broadcast path (10x)
    scale = sz[..., 0].contiguous().unsqueeze(1)
    offset = torch.addcmul(sz[..., 1], sz[..., 0], torch.tensor(-8.0)).unsqueeze(1)
    groups = wt.view(k // group, group, n)
    return torch.addcmul(offset, groups, scale, out=groups).view(k, n)


# --------------------------------------------------------------------------------------------
# The CPU kernel layout


def cpu_packing() -> str | None:
    """The name of this CPU's int4pack layout ("cpu-halves64", "cpu-pairs32", ...), or None when
    torch's packer does not match any layout `codes` reads (then tensors stay as stored)."""
    return _probe_cpu_packing(torch.backends.cpu.get_cpu_capability())


def cpu_packing_parts(packing: str) -> tuple[int, str]:
    """The block of rows and how a byte pairs them: "cpu-halves64" -> (64, "halves")."""
    style, block = packing.removeprefix("cpu-")[:-2], int(packing[-2:])
    return block, style


def cpu_packable(shape: tuple[int, ...], packing: str | None) -> bool:
    return packing is not None and len(shape) == 2 and shape[0] % cpu_packing_parts(packing)[0] == 0


@cache
def _probe_cpu_packing(capability: str) -> str | None:
    if capability == "AVX2" or capability.startswith("AVX512"):
        guess = "cpu-halves64" if capability.startswith("AVX512") else "cpu-halves32"
    else:
        guess = "cpu-pairs32"
    g = torch.Generator().manual_seed(0)
    probe = torch.randint(0, 16, (128, 64), dtype=torch.uint8, generator=g)
    try:
        ref = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe.to(torch.int32), 1)
    except (RuntimeError, AttributeError):
        return None
    ours = pack_codes_for_cpu(probe, guess)
    return guess if ref.dtype == torch.uint8 and torch.equal(ref.view(-1), ours.view(-1)) else None


def pack_codes_for_cpu(c: Tensor, packing: str) -> Tensor:
    """codes uint8 [N, K] -> the CPU kernel layout, uint8 [N, K/2] (what torch's
    `_convert_weight_to_int4pack_for_cpu` makes, in plain torch and without its int32 copy)."""
    n, k = c.shape
    block, style = cpu_packing_parts(packing)
    t = c.view(n // block, block, k).transpose(1, 2).contiguous()  # [NB, K, B], K-major per block
    lo, hi = (
        (t[..., : block // 2], t[..., block // 2 :]) if style == "halves" else (t[..., 0::2], t[..., 1::2])
    )
    return (lo | (hi << 4)).view(n, k // 2)


def repack_for_cpu(weight: Tensor, shape: tuple[int, int], packing: str) -> None:
    """Rewrite the stored bytes of `weight` (uint8 [N, K/2]) in place into the CPU kernel layout,
    byte to byte: a stored byte holds columns 2j (high nibble) and 2j + 1 of one row, a CPU byte one
    column of two rows (the first in the low nibble). Ten times `pack_codes_for_cpu`'s speed: the
    host store of offloaded experts is repacked at every load."""
    n, k = shape
    block, style = cpu_packing_parts(packing)
    if style == "halves":  # rows j and j + B/2 of a block share a byte
        w = weight.view(n // block, 2, block // 2, k // 2)
        first, second = w[:, 0], w[:, 1]
    else:  # rows 2j and 2j + 1
        w = weight.view(n // block, block // 2, 2, k // 2)
        first, second = w[:, :, 0], w[:, :, 1]
    out = torch.empty(n // block, k // 2, 2, block // 2, dtype=torch.uint8, device=weight.device)
    out[:, :, 0].copy_(((first >> 4) | (second & 0xF0)).transpose(1, 2))  # column 2j
    out[:, :, 1].copy_(((first & 15) | (second << 4)).transpose(1, 2))  # column 2j + 1
    weight.copy_(out.view(weight.shape))


def int4_mm_cpu(x: Tensor, weight: Tensor, scale_zero: Tensor, group: int) -> Tensor:
    """x [M, K] bf16 @ W.T with W in the CPU kernel layout -> [M, N] bf16."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, weight, group, scale_zero)
