"""Prefill and decode tok/s of qwenlocal vs transformers on the same random checkpoint.

The checkpoint has Qwen3-30B-A3B's real layer shapes (hidden 2048, 128 experts, top-8, 32/4
heads, head_dim 128, real vocabulary) and a few layers. Both engines run the same prompt, the
same greedy decode, in one process, one after the other.

    python bench/decode.py --layers 2 --prompt 128 --decode 64
"""

from __future__ import annotations

import argparse
import time

import torch
from common import machine, markdown_table, real_shape_checkpoint

from qwenlocal import load_model


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def bench_qwenlocal(folder, prompt, n_decode, dtype):
    model = load_model(folder, dtype=dtype)
    model(prompt[:, :8], cache=model.new_cache(16), last_only=True)  # warm-up
    cache = model.new_cache(prompt.shape[1] + n_decode + 1)
    logits, t_prefill = timed(lambda: model(prompt, cache=cache, last_only=True))
    tokens = [int(logits[0, -1].argmax())]

    def decode():
        for _ in range(n_decode):
            step = model(torch.tensor([[tokens[-1]]]), cache=cache)
            tokens.append(int(step[0, -1].argmax()))

    _, t_decode = timed(decode)
    return t_prefill, t_decode, tokens


def bench_transformers(folder, prompt, n_decode, dtype):
    from transformers import DynamicCache, Qwen3MoeForCausalLM

    model = Qwen3MoeForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    with torch.inference_mode():
        model(prompt[:, :8], logits_to_keep=1)  # warm-up
        cache = DynamicCache(config=model.config)
        out, t_prefill = timed(lambda: model(prompt, cache=cache, use_cache=True, logits_to_keep=1))
        tokens = [int(out.logits[0, -1].argmax())]

        def decode():
            for _ in range(n_decode):
                step = model(torch.tensor([[tokens[-1]]]), cache=cache, use_cache=True)
                tokens.append(int(step.logits[0, -1].argmax()))

        _, t_decode = timed(decode)
    return t_prefill, t_decode, tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--quantized", nargs="*", default=[], help="quantized folders of the same checkpoint")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    folder = real_shape_checkpoint(args.layers, torch.bfloat16)
    prompt = torch.randint(0, 151_000, (1, args.prompt), generator=torch.Generator().manual_seed(0))

    rows, results = [], {}
    for name, fn in (("transformers", bench_transformers), ("qwenlocal", bench_qwenlocal)):
        t_prefill, t_decode, tokens = fn(folder, prompt, args.decode, dtype)
        results[name] = (args.prompt / t_prefill, args.decode / t_decode, tokens)
    for q in args.quantized:
        from qwenlocal.config import Qwen3MoeConfig

        preset = Qwen3MoeConfig.from_file(f"{q}/config.json").quantization_config["preset"]
        t_prefill, t_decode, tokens = bench_qwenlocal(q, prompt, args.decode, dtype)
        results[f"qwenlocal, {preset} quantized"] = (args.prompt / t_prefill, args.decode / t_decode, tokens)
    ref_p, ref_d, ref_tokens = results["transformers"]
    for name, (p, d, tokens) in results.items():
        same = sum(a == b for a, b in zip(tokens, ref_tokens, strict=True))
        rows.append(
            [name, f"{p:.1f}", f"{d:.2f}", f"{p / ref_p:.2f}x", f"{d / ref_d:.2f}x", f"{same}/{len(tokens)}"]
        )
    print(f"machine: {machine()}")
    print(
        f"checkpoint: real layer shapes, {args.layers} layers, {args.dtype}, "
        f"prompt {args.prompt} tokens, {args.decode} greedy decode steps, {torch.get_num_threads()} threads"
    )
    print(
        markdown_table(
            [
                "engine",
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
