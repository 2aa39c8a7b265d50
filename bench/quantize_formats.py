"""Quantization throughput: quant.formats.quantize vs bitsandbytes on the same tensors, same output.

The input is `--experts` Qwen3-30B-A3B experts in bf16 (gate and up [768, 2048], down [2048, 768];
64 experts = 576 MiB). Each matrix is quantized by both, alternating, `--repeats` times, and its
best time counts (the machine may be shared). Throughput is MB/s of bf16 input; "identical"
compares every stored tensor byte for byte. A second table times y = x @ W.T on one expert's
shapes on this device.

    python bench/quantize_formats.py --experts 64 --repeats 2
    python bench/quantize_formats.py --threads 1 --cpu-time   # steadier on a shared machine
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch
import torch.nn.functional as F
from common import machine, markdown_table

from quant.formats import QTensor, dequantize, from_bnb, quantize, to_bnb_quant_state
from quant.linear import qlinear

EXPERT_SHAPES = [(768, 2048), (768, 2048), (2048, 768)]  # gate_proj, up_proj, down_proj


def experts(n: int, device: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16).to(device)
        for _ in range(n)
        for s in EXPERT_SHAPES
    ]


def bnb_quantize(w: torch.Tensor, fmt: str, dq: bool) -> QTensor:
    if fmt == "int8":
        data, row_absmax, _ = bnbf.int8_vectorwise_quant(w)
        return from_bnb(data, row_absmax, dtype=w.dtype)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type=fmt)
    return from_bnb(packed, state)


def same(a: QTensor, b: QTensor) -> bool:
    pa, pb = a.parts(), b.parts()
    return pa.keys() == pb.keys() and all(
        pa[k].dtype == pb[k].dtype
        and pa[k].shape == pb[k].shape
        and torch.equal(pa[k].reshape(-1).view(torch.uint8), pb[k].reshape(-1).view(torch.uint8))
        for k in pa
    )


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# wall-clock by default; --cpu-time with --threads 1 counts only this thread's CPU time, which a
# busy shared machine disturbs far less
CLOCK = time.perf_counter


def timed(fn: Callable[[], QTensor], device: str) -> tuple[float, QTensor]:
    sync(device)
    t = CLOCK()
    out = fn()
    sync(device)
    return CLOCK() - t, out


def quantize_table(ws: list[torch.Tensor], repeats: int, device: str) -> str:
    """Per matrix: bnb then ours, alternating; each matrix's best time over the repeats counts."""
    mb = sum(w.numel() * w.element_size() for w in ws) / 1e6
    rows = []
    for label, fmt, dq in [
        ("nf4", "nf4", False),
        ("nf4 + double quant", "nf4", True),
        ("int8 row-wise", "int8", False),
    ]:
        best_ours = [float("inf")] * len(ws)
        best_bnb = [float("inf")] * len(ws)
        identical = True
        for r in range(repeats):
            for i, w in enumerate(ws):
                t_bnb, ref = timed(partial(bnb_quantize, w, fmt, dq), device)
                t_ours, ours = timed(partial(quantize, w, fmt, 64, dq), device)
                if r == 0:
                    identical &= same(ours, ref)
                best_bnb[i], best_ours[i] = min(best_bnb[i], t_bnb), min(best_ours[i], t_ours)
        ours_s, bnb_s = sum(best_ours), sum(best_bnb)
        rows.append(
            [
                label,
                f"{mb / ours_s:.0f}",
                f"{mb / bnb_s:.0f}",
                f"{bnb_s / ours_s:.1f}x",
                "yes" if identical else "NO",
            ]
        )
    return markdown_table(
        ["format", "quant.formats MB/s", "bitsandbytes MB/s", "speed-up", "identical"], rows
    )


def best_time(fn: Callable[[], object], device: str, repeats: int = 30) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = CLOCK()
        fn()
        sync(device)
        best = min(best, CLOCK() - t)
    return best * 1e6


def qlinear_row(w: torch.Tensor, m: int, device: str) -> list[str]:
    q = quantize(w, "nf4", 64, True)
    q8 = quantize(w, "int8")
    state = to_bnb_quant_state(q)
    x = torch.randn(m, w.shape[1]).to(torch.bfloat16).to(device)
    cands = [
        lambda: F.linear(x, w),
        lambda: qlinear(x, q),
        lambda: bnb.matmul_4bit(x, q.weight, state),
        lambda: F.linear(x, dequantize(q)),
        lambda: qlinear(x, q8),
    ]
    return [f"[{m}, {w.shape[1]}] x [{w.shape[0]}, {w.shape[1]}]^T"] + [
        f"{best_time(c, device):.0f}" for c in cands
    ]


def qlinear_table(device: str) -> str:
    """Microseconds for y = x @ W.T with one expert's W: ours vs bitsandbytes' own paths."""
    torch.manual_seed(1)
    rows = []
    for shape in [(768, 2048), (2048, 768)]:
        w = (torch.randn(shape) * 0.02).to(torch.bfloat16).to(device)
        rows += [qlinear_row(w, m, device) for m in (1, 16)]
    headers = [
        "x @ W.T",
        "bf16 F.linear us",
        "qlinear nf4+dq us",
        "bnb.matmul_4bit nf4+dq us",
        "dequantize + F.linear us",
        "qlinear int8 us",
    ]
    return markdown_table(headers, rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--cpu-time", action="store_true", help="time this thread's CPU time (needs --threads 1)")
    ap.add_argument("--skip-qlinear", action="store_true")
    args = ap.parse_args()
    global CLOCK
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time:
        if torch.get_num_threads() != 1 or args.device != "cpu":
            ap.error("--cpu-time needs --threads 1 on the CPU")
        CLOCK = time.thread_time

    clock = "CPU time of one thread" if args.cpu_time else "wall clock"
    print(
        f"machine: {machine()}; bitsandbytes {bnb.__version__}; {torch.get_num_threads()} torch threads; {clock}"
    )
    ws = experts(args.experts, args.device)
    mib = sum(w.numel() * w.element_size() for w in ws) / 2**20
    print(
        f"\n{args.experts} experts, {len(ws)} bf16 matrices, {mib:.0f} MiB, on {args.device}, best of {args.repeats}\n"
    )
    print(quantize_table(ws, args.repeats, args.device))
    if not args.skip_qlinear:
        print(f"\ny = x @ W.T on {args.device}, bf16 x, best of 30 calls\n")
        print(qlinear_table(args.device))


if __name__ == "__main__":
    main()
