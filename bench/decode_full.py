"""Decode tok/s of the full 48-layer Qwen3-30B-A3B shape on the CPU, against its memory-bound ceiling.

The checkpoint is written quantized straight from random tensors (`write_random_quantized_checkpoint`,
~17 GB with the default `mixed` recipe; written once into the bench cache). The ceiling is the bytes
one decode token reads (the dense weights as stored, the 8 selected experts of every layer, the
lm_head, and the KV cache up to the context reached) divided by this machine's read bandwidth,
measured in the same run with the same threads (a sum over a buffer larger than the caches).

    python bench/decode_full.py --prompt 32 --decode 32
"""

from __future__ import annotations

import argparse
import time

import torch
from common import CACHE, machine, markdown_table
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

from qwenlocal import load_model
from qwenlocal.weights.random_checkpoint import write_random_quantized_checkpoint

BANDWIDTH_PROBE_BYTES = 2 * 1024**3


def full_checkpoint(preset: str, layers: int):
    out = CACHE / f"random-{layers}L-{preset}"
    if (out / "config.json").is_file():
        return out
    with Progress("writing {task.description}", BarColumn(), DownloadColumn(), TimeRemainingColumn()) as bar:
        task = bar.add_task(out.name, total=None)
        write_random_quantized_checkpoint(
            out,
            {"num_hidden_layers": layers},
            preset=preset,
            force=True,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    return out


def read_bandwidth_gbs(nbytes: int = BANDWIDTH_PROBE_BYTES) -> float:
    """Best of 5 sums over `nbytes` of int64: what the CPU reads from memory per second."""
    x = torch.ones(nbytes // 8, dtype=torch.int64)
    x.sum()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def bytes_per_token(model, ctx: int) -> dict[str, int]:
    """What one decode step reads, by part, from the loaded model's own tensors."""
    config = model.config
    experts = model.experts
    dense = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.startswith("experts.") or "embed_tokens" in name:
            continue  # the embedding is one row per token; experts are counted below
        dense += t.numel() * t.element_size()
    per_expert = experts.nbytes // (len(config.moe_layers) * config.num_experts)
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2 * ctx
    return {
        "dense (attention, norms, routers, lm_head)": dense,
        "experts (8 a layer)": len(config.moe_layers) * config.num_experts_per_tok * per_expert,
        f"KV cache (bf16, {ctx} positions)": kv,
    }


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="mixed")
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--moe", default="auto", choices=["auto", "grouped", "loop"])
    args = ap.parse_args()

    folder = full_checkpoint(args.preset, args.layers)
    t = time.perf_counter()
    model = load_model(folder, dtype=torch.bfloat16, moe=args.moe)
    t_load = time.perf_counter() - t
    prompt = torch.randint(0, 151_000, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(args.prompt + args.decode + 8)
    t = time.perf_counter()
    logits = model(prompt, cache=cache, last_only=True)
    t_prefill = time.perf_counter() - t
    token = logits[0, -1].argmax().view(1, 1)
    model(token, cache=cache)  # the first decode step: warm-up
    t = time.perf_counter()
    for _ in range(args.decode):
        token = model(token, cache=cache)[0, -1].argmax().view(1, 1)
    t_decode = (time.perf_counter() - t) / args.decode

    parts = bytes_per_token(model, args.prompt + args.decode)
    total = sum(parts.values())
    gbs = read_bandwidth_gbs()
    ceiling = gbs * 1e9 / total
    print(f"machine: {machine()}; {torch.get_num_threads()} threads")
    print(
        f"checkpoint: {args.layers} layers, random weights, recipe {model.recipe.describe()}; load {t_load:.0f} s; "
        f"prompt {args.prompt}, {args.decode} greedy decode steps; moe {model.experts.moe}"
    )
    rows = [[name, f"{n / 1e9:.3f}"] for name, n in parts.items()] + [["total", f"{total / 1e9:.3f}"]]
    print(markdown_table(["read per decode token", "GB"], rows))
    print()
    print(
        markdown_table(
            ["read bandwidth GB/s", "ceiling tok/s", "prefill tok/s", "decode tok/s", "decode / ceiling"],
            [
                [
                    f"{gbs:.1f}",
                    f"{ceiling:.2f}",
                    f"{args.prompt / t_prefill:.1f}",
                    f"{1 / t_decode:.2f}",
                    f"{(1 / t_decode) / ceiling:.0%}",
                ]
            ],
        )
    )


if __name__ == "__main__":
    main()
