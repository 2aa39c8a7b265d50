"""Prefill tok/s of one recipe at several prompt lengths, each the fastest of `--rounds` timed
prefills into a fresh cache (one forward of the whole prompt, last position's logits only).

The checkpoint has Qwen3-30B-A3B's real layer shapes and a few layers (bench/common.py). To
compare two versions of the code, run this once per version, alternating, and keep the best
of each (BENCHMARKS.md, issue 22).

    python bench/prefill.py --layers 2 --recipe mixed --prompts 128 1024 --rounds 2

`--ab` times the int4 dequantize's two implementations in this one process, round by round in
turn: "before" is the plain-torch dequantize (quant.int4, with the crossover timed for it), "after"
the C++ operator (quant.cpu_dequant, built first if it is not).
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from common import git_rev, machine, real_shape_checkpoint

from quant import cpu_dequant
from quant.kernels import kernel_max_rows
from qwenlocal import load_model


@torch.inference_mode()
def prefill_seconds(model, prompt: torch.Tensor) -> float:
    cache = model.new_cache(prompt.shape[1] + 1)
    t = time.perf_counter()
    model(prompt, cache=cache, last_only=True)
    return time.perf_counter() - t


def variants(ab: bool) -> dict:
    """name -> a context that sets the int4 dequantize it times."""
    if not ab:
        return {"": contextlib.nullcontext}
    return {
        "before (plain-torch dequantize)": cpu_dequant.OPERATOR.turned_off,
        "after (C++ dequantize)": contextlib.nullcontext,
    }


def crossovers() -> dict:
    return {fmt: kernel_max_rows(fmt) for fmt in ("int8", "int4")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--recipe", default="mixed")
    ap.add_argument("--prompts", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--rounds", type=int, default=2, help="timed prefills per length; the best is kept")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--ab", action="store_true", help="plain-torch vs C++ int4 dequantize, in turn")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not cpu_dequant.OPERATOR.build() and args.ab:  # built before timing, not in the background during it
        raise SystemExit("--ab: the C++ dequantize did not build here")
    model = load_model(real_shape_checkpoint(args.layers), dtype=torch.bfloat16, quant=args.recipe)
    runs = variants(args.ab)
    print(f"machine: {machine()}; {torch.get_num_threads()} threads; rev {git_rev()}")
    print(f"{args.layers} layers, {model.recipe.describe()}")
    for name, context in runs.items():
        with context(), torch.inference_mode():
            model(torch.zeros(1, 8, dtype=torch.long), cache=model.new_cache(16), last_only=True)  # warm-up
            print(f"{name or 'this build'}: kernel crossover rows {crossovers()}")
    for n in args.prompts:
        prompt = torch.randint(0, 151_000, (1, n), generator=torch.Generator().manual_seed(n))
        best = dict.fromkeys(runs, float("inf"))
        for _ in range(args.rounds):
            for name, context in runs.items():
                with context():
                    best[name] = min(best[name], prefill_seconds(model, prompt))
        line = ", ".join(f"{name + ' ' if name else ''}{n / sec:.1f} tok/s" for name, sec in best.items())
        ratio = f"; after/before {best[next(iter(runs))] / best[list(runs)[-1]]:.2f}x" if args.ab else ""
        print(f"prefill {n} tokens (best of {args.rounds}): {line}{ratio}", flush=True)


if __name__ == "__main__":
    main()
