"""Prefill and decode tok/s of qwenlocal (16-bit and each quantized recipe) vs transformers bf16.

The checkpoint has Qwen3-30B-A3B's real layer shapes (hidden 2048, 128 experts, top-8, 32/4
heads, head_dim 128, real vocabulary) and a few layers. Every engine runs the same prompt and the
same greedy decode, in one process, one after the other; qwenlocal's recipes are quantized while
loading (nothing written), with the kernels the CPU dispatch picks (quant/kernels.py).

    python bench/decode.py --layers 2 --prompt 127 --decode 64 --recipes bf16 int8 nf4 mixed
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
from common import machine, markdown_table, real_shape_checkpoint

from qwenlocal import load_model


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


@torch.inference_mode()
def bench_qwenlocal(folder, prompt, n_decode, dtype, recipe, rounds):
    model = load_model(folder, dtype=dtype, quant=recipe)
    described = model.recipe.describe() if model.recipe is not None else "16-bit"
    model(prompt[:, :8], cache=model.new_cache(16), last_only=True)  # warm-up

    def one_round():
        cache = model.new_cache(prompt.shape[1] + n_decode + 1)
        logits, t_prefill = timed(lambda: model(prompt, cache=cache, last_only=True))
        tokens = [int(logits[0, -1].argmax())]

        def decode():
            for _ in range(n_decode):
                step = model(torch.tensor([[tokens[-1]]]), cache=cache)
                tokens.append(int(step[0, -1].argmax()))

        _, t_decode = timed(decode)
        return t_prefill, t_decode, tokens

    return (*best_of(one_round, rounds), described)


def best_of(one_round, rounds):
    """The fastest prefill and the fastest decode over `rounds` rounds (the tokens of the first):
    on a shared machine one round measures the neighbours as much as the code."""
    runs = [one_round() for _ in range(rounds)]
    return min(r[0] for r in runs), min(r[1] for r in runs), runs[0][2]


@torch.inference_mode()
def bench_transformers(folder, prompt, n_decode, dtype, rounds):
    from transformers import DynamicCache, Qwen3MoeForCausalLM

    model = Qwen3MoeForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    model(prompt[:, :8], logits_to_keep=1)  # warm-up

    def one_round():
        cache = DynamicCache(config=model.config)
        out, t_prefill = timed(lambda: model(prompt, cache=cache, use_cache=True, logits_to_keep=1))
        tokens = [int(out.logits[0, -1].argmax())]

        def decode():
            for _ in range(n_decode):
                step = model(torch.tensor([[tokens[-1]]]), cache=cache, use_cache=True)
                tokens.append(int(step.logits[0, -1].argmax()))

        _, t_decode = timed(decode)
        return t_prefill, t_decode, tokens

    return (*best_of(one_round, rounds), "bf16")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=127)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--recipes", nargs="*", default=["bf16", "int8", "nf4", "mixed"])
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--rounds", type=int, default=1, help="rounds per engine; the best is kept")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    folder = real_shape_checkpoint(args.layers, torch.bfloat16)
    prompt = torch.randint(0, 151_000, (1, args.prompt), generator=torch.Generator().manual_seed(0))

    runs = (
        []
        if args.no_transformers
        else [("transformers", lambda: bench_transformers(folder, prompt, args.decode, dtype, args.rounds))]
    )
    for r in args.recipes:
        runs.append((f"qwenlocal {r}", lambda r=r: bench_qwenlocal(folder, prompt, args.decode, dtype, r, args.rounds)))
    results = {}
    for name, fn in runs:
        t_prefill, t_decode, tokens, described = fn()
        gc.collect()
        results[name] = (args.prompt / t_prefill, args.decode / t_decode, tokens, described)
        print(
            f"{name}: prefill {results[name][0]:.1f} tok/s, decode {results[name][1]:.2f} tok/s", flush=True
        )
    ref = results.get("transformers")
    rows = []
    for name, (p, d, tokens, described) in results.items():
        vs = [f"{p / ref[0]:.2f}x", f"{d / ref[1]:.2f}x"] if ref else ["", ""]
        same = f"{sum(a == b for a, b in zip(tokens, ref[2], strict=True))}/{len(tokens)}" if ref else ""
        rows.append([name, described, f"{p:.1f}", f"{d:.2f}", *vs, same])
    print(f"machine: {machine()}")
    print(
        f"checkpoint: real layer shapes, {args.layers} layers, {args.dtype}, "
        f"prompt {args.prompt} tokens, {args.decode} greedy decode steps, {torch.get_num_threads()} threads, "
        f"best of {args.rounds} round(s) per engine"
    )
    print(
        markdown_table(
            [
                "engine",
                "weights",
                f"prefill tok/s ({args.prompt})",
                f"decode tok/s ({args.decode})",
                "prefill vs transformers",
                "decode vs transformers",
                "greedy tokens equal to transformers",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
