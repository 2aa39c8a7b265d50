"""One MoE layer at the real shape (hidden 2048, 768 per expert, top-8) on the CPU: the loop path
(expert by expert) against the grouped path (plain-torch fallback: gather, dequantize, bmm) for a
decode token and a 4-token batch, per expert format (int4 repacked for torch's CPU kernel, as
loaded). Decides what `--moe auto` picks on the CPU.

    python bench/moe_cpu.py [FORMAT ...]       (int4 nf4+dq int8 bf16; default: all)
    python bench/moe_cpu.py --op [--threads N ...]

`--op`: a decode token's int4 experts through quant.cpu_moe's operator, one call a layer, with
torch's kernel per matrix (block 0, what the operator did first) against its own kernel,
interleaved in one process on the same tokens, on the op-structure shape (hidden 128, 64 per
expert) and the real one (group 64 and 128); each expert id drawn anew per call from 128, so the
weights come from memory as in a decode step.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from common import machine, markdown_table

from quant import cpu_moe

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.test_grouped import make_experts, routing  # noqa: E402

EXPERTS = 16  # a token's cost depends on its 8 picks, not on how many experts the layer holds
FORMATS = {"int4": ("int4", False), "nf4+dq": ("nf4", True), "int8": ("int8", False), "bf16": ("bf16", False)}


def best_ms(fn, repeat: int = 7) -> float:
    fn()  # warm-up: scratch buffers, code tables
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * min(times)


# (label, hidden, intermediate, int4 group, layers timed per call of best_ms)
OP_SHAPES = [
    ("op structure", 128, 64, 64, 200),
    ("real, group 64", 2048, 768, 64, 10),
    ("real, group 128", 2048, 768, 128, 10),
]
OP_EXPERTS = 128


def op_table(threads: list[int]) -> None:
    """The operator per layer: torch's kernel per matrix against the own kernel, interleaved."""
    assert cpu_moe.OPERATOR.build(), "the operator did not build"
    rows = []
    for label, hidden, inter, group, reps in OP_SHAPES:
        ex, _ = make_experts("int4", False, hidden=hidden, inter=inter, experts=OP_EXPERTS, group=group)
        ex.use_kernel_layout()
        args = ex.fused_args()
        assert args is not None and args[-1] in cpu_moe.kernel_blocks(), "no own kernel here"
        g = torch.Generator().manual_seed(0)
        tokens = [
            (torch.randn(1, hidden, generator=g).bfloat16(), torch.randperm(OP_EXPERTS, generator=g)[:8])
            for _ in range(reps)
        ]
        w = torch.rand(8, generator=g).softmax(-1).bfloat16()

        def layers(block: int, ex=ex, args=args, tokens=tokens, w=w) -> None:
            for x, ids in tokens:
                cpu_moe.moe_int4_row(x, ids, w, ex.blobs[0], *args[:-1], block)

        for n in threads:
            torch.set_num_threads(n)
            best = {0: float("inf"), args[-1]: float("inf")}
            with torch.inference_mode():
                for _ in range(5):  # interleaved rounds: the machine may be loaded
                    for block in best:
                        best[block] = min(best[block], best_ms(lambda b=block: layers(b), repeat=3) / reps)
            old, new = best[0], best[args[-1]]
            rows.append([label, n, f"{1000 * old:.1f}", f"{1000 * new:.1f}", f"{old / new:.2f}"])
            print(rows[-1], flush=True)
    print(f"machine: {machine()}; own kernel block {args[-1]}")
    print(
        markdown_table(
            ["shape", "threads", "torch kernel us / layer", "own kernel us / layer", "speed-up"], rows
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("formats", nargs="*", help=f"of {', '.join(FORMATS)} (default: all)")
    ap.add_argument("--op", action="store_true", help="the decode operator's two kernels per layer")
    ap.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    args = ap.parse_args()
    if set(args.formats) - set(FORMATS):
        ap.error(f"formats are {', '.join(FORMATS)}")
    torch.manual_seed(0)
    if args.op:
        op_table(args.threads)
        return
    rows = []
    for label in args.formats or FORMATS:
        fmt, dq = FORMATS[label]
        ex, dt = make_experts(fmt, dq, hidden=2048, inter=768, experts=EXPERTS)
        if fmt == "int4":
            ex.use_kernel_layout()  # as the loader leaves resident experts on the CPU
        for n in (1, 4):
            x = torch.randn(n, 2048).to(dt)
            ids, w = routing(n, 8, experts=EXPERTS, dtype=dt)
            with torch.inference_mode():
                ex.moe = "loop"
                loop = best_ms(lambda ex=ex, x=x, ids=ids, w=w: ex(0, x, ids, w))
                ex.moe = "grouped"
                grouped = best_ms(lambda ex=ex, x=x, ids=ids, w=w: ex(0, x, ids, w))
            rows.append([label, n, f"{loop:.1f}", f"{grouped:.1f}", f"{loop / grouped:.2f}"])
            print(rows[-1], flush=True)
    print(f"machine: {machine()}; threads {torch.get_num_threads()}")
    print(markdown_table(["experts", "tokens", "loop ms", "grouped ms", "loop / grouped"], rows))


if __name__ == "__main__":
    main()
