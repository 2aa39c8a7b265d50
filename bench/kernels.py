"""µs per expert matrix for each quantized CPU path, by rows of x: where the kernels cross over.

x [M, 2048] @ W[768, 2048].T, bf16 activations, W cycling through `--weights` distinct matrices
(more than the caches hold, as in decode, where every expert matrix is read once per token). The
paths: bf16 / fp32 F.linear on 16-bit weights, our `plain` path (dequantize + GEMM) per format,
int8's GEMM on the codes followed by the row scales, torch's int8 and int4 kernels, our `qlinear` dispatch, and bitsandbytes' matmul_4bit (NF4).

    python bench/kernels.py --rows 1 2 4 8 16 32 64
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from common import machine, markdown_table

from quant import qlinear, quantize, to_kernel_layout
from quant.kernels import int4_kernel_cpu, int8_gemm_cpu, int8_kernel_cpu, kernel_max_rows, plain


def timed_us(fn, n_weights: int, repeats: int) -> float:
    fn(0)
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        for i in range(n_weights):
            fn(i)
        runs.append((time.perf_counter() - t) / n_weights)
    return statistics.median(runs) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--weights", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-bnb", action="store_true", help="leave bitsandbytes out")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n, k = 768, 2048
    g = torch.Generator().manual_seed(0)
    ws = [(torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16) for _ in range(args.weights)]
    w32 = [w.float() for w in ws]
    q8 = [quantize(w, "int8") for w in ws]
    q4 = [to_kernel_layout(quantize(w, "int4", 64)) for w in ws]
    nf4 = [quantize(w, "nf4", 64, True) for w in ws]
    paths = {
        "bf16 F.linear": lambda x, i: F.linear(x, ws[i]),
        "fp32 F.linear": lambda x, i: F.linear(x.float(), w32[i]),
        "int8 kernel": lambda x, i: int8_kernel_cpu(x, q8[i]),
        "int8 dequant+GEMM": lambda x, i: plain(x, q8[i]),
        "int8 GEMM, then row scales": lambda x, i: int8_gemm_cpu(x, q8[i]),
        "int4 kernel": lambda x, i: int4_kernel_cpu(x, q4[i]),
        "int4 dequant+GEMM": lambda x, i: plain(x, q4[i]),
        "nf4+dq qlinear": lambda x, i: qlinear(x, nf4[i]),
        "int8 qlinear": lambda x, i: qlinear(x, q8[i]),
        "int4 qlinear": lambda x, i: qlinear(x, q4[i]),
    }
    if not args.no_bnb:
        import bitsandbytes as bnb

        paths["nf4+dq bnb.matmul_4bit"] = lambda x, i: bnb.matmul_4bit(
            x, nf4[i].weight, nf4[i].bnb_quant_state()
        )
    rows = []
    for name, fn in paths.items():
        cells = []
        for m in args.rows:
            x = torch.randn(m, k, generator=g).to(torch.bfloat16)
            with torch.inference_mode():
                cells.append(f"{timed_us(lambda i, x=x, fn=fn: fn(x, i), args.weights, args.repeats):.0f}")
        rows.append([name, *cells])
    print(
        f"machine: {machine()}; {torch.get_num_threads()} threads; CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )
    print(
        f"x [M, {k}] bf16 @ W[{n}, {k}].T, {args.weights} distinct weights cycled; µs per call (median of {args.repeats})"
    )
    print(markdown_table(["path", *[f"M={m}" for m in args.rows]], rows))
    print(f"crossovers timed by qlinear's probe: int8 {kernel_max_rows('int8')} rows, int4 {kernel_max_rows('int4')}")


if __name__ == "__main__":
    main()
