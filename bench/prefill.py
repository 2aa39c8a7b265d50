"""Prefill tok/s of one recipe at several prompt lengths, each the fastest of `--rounds` timed
prefills into a fresh cache (one forward of the whole prompt, last position's logits only).

The checkpoint has Qwen3-30B-A3B's real layer shapes and a few layers (bench/common.py). To
compare two versions of the code, run this once per version, alternating, and keep the best
of each (BENCHMARKS.md, issue 22).

    python bench/prefill.py --layers 2 --recipe mixed --prompts 128 1024 --rounds 2
"""

from __future__ import annotations

import argparse
import time

import torch
from common import git_rev, machine, real_shape_checkpoint

from quant.kernels import kernel_max_rows
from qwenlocal import load_model


@torch.inference_mode()
def prefill_seconds(model, prompt: torch.Tensor, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        cache = model.new_cache(prompt.shape[1] + 1)
        t = time.perf_counter()
        model(prompt, cache=cache, last_only=True)
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--recipe", default="mixed")
    ap.add_argument("--prompts", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--rounds", type=int, default=2, help="timed prefills per length; the best is kept")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(real_shape_checkpoint(args.layers), dtype=torch.bfloat16, quant=args.recipe)
    with torch.inference_mode():
        model(torch.zeros(1, 8, dtype=torch.long), cache=model.new_cache(16), last_only=True)  # warm-up
    crossover = {fmt: kernel_max_rows(fmt) for fmt in ("int8", "int4")}
    print(f"machine: {machine()}; {torch.get_num_threads()} threads; rev {git_rev()}")
    print(f"{args.layers} layers, {model.recipe.describe()}; kernel crossover rows {crossover}")
    for n in args.prompts:
        prompt = torch.randint(0, 151_000, (1, n), generator=torch.Generator().manual_seed(n))
        seconds = prefill_seconds(model, prompt, args.rounds)
        print(f"prefill {n} tokens: {n / seconds:.1f} tok/s (best of {args.rounds})", flush=True)


if __name__ == "__main__":
    main()
