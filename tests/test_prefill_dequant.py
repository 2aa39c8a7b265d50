"""The int4 dequantize + GEMM path (a prefill chunk's rows above the kernels' crossover) against
the same arithmetic written here from quant.int4.codes: equal bit for bit, also when its kept
scratch buffers are reused by weights of other sizes in between."""

from __future__ import annotations

import torch

from quant import quantize, to_kernel_layout
from quant.int4 import codes
from quant.kernels import gemm_dtype_cpu, plain


def reference(x: torch.Tensor, q) -> torch.Tensor:
    """W.T in fp32 as code * scale + (zero - 8 * scale), rounded once to the GEMM's dtype."""
    n, k = q.shape
    g = q.blocksize
    sz = q.scale_zero.float()
    scale = sz[..., 0].contiguous().unsqueeze(1)
    offset = torch.addcmul(sz[..., 1], sz[..., 0], torch.tensor(-8.0)).unsqueeze(1)
    wt = codes(q.weight, q.shape, q.packing).t().float().contiguous().view(k // g, g, n)
    wt = torch.addcmul(offset, wt, scale).view(k, n)
    dt = gemm_dtype_cpu(x.dtype)
    return torch.matmul(x.to(dt), wt.to(dt)).to(x.dtype)


def int4(shape, seed):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02
    return to_kernel_layout(quantize(w.to(torch.bfloat16), "int4", 64))


def test_plain_int4_equals_the_reference_bit_for_bit_across_reused_scratch():
    big, small = int4((256, 512), 0), int4((128, 256), 1)
    for q, seed in ((big, 2), (small, 3), (big, 4), (small, 5)):
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(40, q.shape[1], generator=torch.Generator().manual_seed(seed)).to(dtype)
            with torch.inference_mode():
                y = plain(x, q)
            assert torch.equal(y, reference(x, q)), (q.shape, dtype)
