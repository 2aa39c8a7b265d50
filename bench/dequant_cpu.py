"""The int4 dequantize on the CPU, plain torch (quant.int4) against the C++ operator
(quant.cpu_dequant), on the experts' real shapes; then what it moves: torch's int4 kernel against
dequantize + GEMM (`kernels.plain`) by rows of x, with each dequantize, in one process.

Times are CPU seconds of this thread (`time.thread_time`, 1 intra-op thread by default: on a
machine shared with other work, wall time mostly measures the others), best of `--repeats`.

    python bench/dequant_cpu.py --rows 4 8 16 24 32 64
"""

from __future__ import annotations

import argparse
import time

import torch
from common import machine, markdown_table

from quant import cpu_dequant, quantize, to_kernel_layout
from quant.int4 import dequantize_int4_t
from quant.kernels import int4_kernel_cpu, plain

SHAPES = {"gate/up 768 x 2048": (768, 2048), "down 2048 x 768": (2048, 768)}


def best_us(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t)
    return best * 1e6


@torch.inference_mode()
def time_matrix(name: str, n: int, k: int, rows: list[int], r: int) -> tuple[list, list]:
    """(the dequantize row, the kernel vs GEMM rows) of one matrix [N, K]."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n)) * 0.02
    q = to_kernel_layout(quantize(w.to(torch.bfloat16), "int4", 64))
    wt32, wt16 = torch.empty(k, n), torch.empty(k, n, dtype=torch.bfloat16)
    a = (q.weight, q.scale_zero, (n, k), q.blocksize, q.packing)
    torch_f32 = best_us(lambda: dequantize_int4_t(*a, wt32), r)
    torch_b16 = best_us(lambda: wt16.copy_(dequantize_int4_t(*a, wt32)), r)
    cpp_f32 = best_us(lambda: cpu_dequant.dequantize_int4_t(*a, wt32), r)
    cpp_b16 = best_us(lambda: cpu_dequant.dequantize_int4_t(*a, wt16), r)
    deq = [name, q.packing, *(f"{t:.0f}" for t in (torch_f32, torch_b16, cpp_f32, cpp_b16))]
    deq.append(f"{torch_b16 / cpp_b16:.1f}x")
    gemm = []
    for m in rows:
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
        kernel = best_us(lambda x=x: int4_kernel_cpu(x, q), r)
        after = best_us(lambda x=x: plain(x, q), r)
        with cpu_dequant.OPERATOR.turned_off():
            before = best_us(lambda x=x: plain(x, q), r)
        gemm.append([name, m, f"{kernel:.0f}", f"{before:.0f}", f"{after:.0f}"])
    return deq, gemm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[4, 8, 16, 24, 32, 64])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not cpu_dequant.OPERATOR.build():
        raise SystemExit("the C++ dequantize did not build here")
    print(f"machine: {machine()}; {args.threads} thread(s); CPU time of this thread, best of {args.repeats}")
    deq_rows, gemm_rows = [], []
    for name, (n, k) in SHAPES.items():
        deq, gemm = time_matrix(name, n, k, args.rows, args.repeats)
        deq_rows.append(deq)
        gemm_rows += gemm
    headers = ["matrix", "layout", "torch fp32", "torch bf16", "C++ fp32", "C++ bf16", "bf16 speed-up"]
    print(markdown_table(headers, deq_rows) + "\n")
    headers = ["matrix", "rows", "int4 kernel", "dequantize + GEMM, torch", "dequantize + GEMM, C++"]
    print(markdown_table(headers, gemm_rows))


if __name__ == "__main__":
    main()
