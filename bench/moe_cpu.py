"""One MoE layer at the real shape (hidden 2048, 768 per expert, top-8) on the CPU: the loop path
(expert by expert) against the grouped path (plain-torch fallback: gather, dequantize, bmm) for a
decode token and a 4-token batch, per expert format (int4 repacked for torch's CPU kernel, as
loaded). Decides what `--moe auto` picks on the CPU.

    python bench/moe_cpu.py [FORMAT ...]       (int4 nf4+dq int8 bf16; default: all)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from common import machine, markdown_table

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


def main() -> None:
    torch.manual_seed(0)
    rows = []
    for label in sys.argv[1:] or FORMATS:
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
