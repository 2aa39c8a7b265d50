"""Decode tok/s against expert-cache size, with the share of time spent waiting for expert copies,
for each way of serving a missed expert (`--cold-experts copy|cpu|auto`).

On the random checkpoint with Qwen3-30B-A3B's real layer shapes, quantized (nf4 by default, as
bench/quantize.py writes it). Every row runs the same prompt and the same greedy decode; the
fully resident model is the reference row. On the CPU the "device" slots are host memory too, so
copies are memcpy, and `cpu` computes a miss from the host store through the worker pool: what a
row loses against all-resident there is the mechanism's own cost (bookkeeping, hand-offs, copies).
On a GPU copies cross PCIe on a side stream and `cpu` runs beside the GPU's work.

    python bench/offload.py --device cpu
    python bench/offload.py --device cpu --overhead --sizes 16 64 --rounds 3
"""

from __future__ import annotations

import argparse

import torch
from common import CACHE, greedy_run, machine, markdown_table

from qwenlocal import load_model


def load(folder, device, slots_per_layer, prefetch, layers, cold="copy"):
    gpu_experts = None if slots_per_layer is None else slots_per_layer * layers
    return load_model(
        folder,
        device=device,
        dtype=torch.bfloat16,
        gpu_experts=gpu_experts,
        prefetch=prefetch,
        cold_experts=cold,
    )


def run(folder, device, slots_per_layer, prefetch, prompt, n_decode, layers, cold="copy"):
    model = load(folder, device, slots_per_layer, prefetch, layers, cold)
    return greedy_run(model, prompt, n_decode, len(prompt) + n_decode + 8)


def overhead(args, config, layers, prompt) -> None:
    """The mechanism's cost against all-resident on a shared machine: every model loaded once,
    then `rounds` interleaved runs, each model's best decode speed kept (load moves between rounds,
    not within one)."""
    models = {"all resident": load(args.folder, args.device, None, False, layers)}
    for size in args.sizes:
        for cold in args.cold:
            models[f"{size}/{config.num_experts} per layer, {cold}"] = load(
                args.folder, args.device, size, False, layers, cold
            )
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for name, model in models.items():
            r = greedy_run(model, prompt, args.decode, len(prompt) + args.decode + 8)
            if name not in best or r["gen_tps"] > best[name]["gen_tps"]:
                best[name] = r
    ref = best["all resident"]
    rows = [
        [
            name,
            f"{r['gen_tps']:.2f}",
            f"{r['gen_tps'] / ref['gen_tps']:.2f}x",
            f"{r['prompt_tps']:.1f}",
            f"{100 * r.get('cpu', 0):.1f} %",
            "yes" if r["tokens"] == ref["tokens"] else "NO",
        ]
        for name, r in best.items()
    ]
    print(f"machine: {machine()} (shared with other jobs: best of {args.rounds} interleaved rounds)")
    print(f"checkpoint: {args.folder}, prompt {args.prompt} tokens, {args.decode} greedy decode steps")
    print(
        markdown_table(
            [
                "experts",
                "decode tok/s (best)",
                "vs resident",
                "prefill tok/s",
                "picks on the CPU",
                "same tokens",
            ],
            rows,
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", default=str(CACHE / "real-shapes-2L-nf4"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--cold", nargs="+", default=["copy", "cpu", "auto"], help="--cold-experts modes")
    ap.add_argument("--prefetch", action="store_true", help="also the copy rows with prefetch on")
    ap.add_argument("--overhead", action="store_true", help="models loaded once, interleaved rounds")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    from qwenlocal.model.config import Qwen3MoeConfig

    config = Qwen3MoeConfig.from_file(f"{args.folder}/config.json")
    layers = len(config.moe_layers)
    prompt = torch.randint(0, 151_000, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    if args.overhead:
        return overhead(args, config, layers, prompt)
    ref = run(args.folder, args.device, None, False, prompt, args.decode, layers)
    rows = [
        [
            "all resident",
            "-",
            "-",
            f"{ref['prompt_tps']:.1f}",
            f"{ref['gen_tps']:.2f}",
            "1.00x",
            "100 %",
            "-",
            "-",
            "-",
            "-",
            "yes",
        ]
    ]
    variants = [(c, False) for c in args.cold] + ([("copy", True)] if args.prefetch else [])
    for size in args.sizes:
        for cold, prefetch in variants:
            r = run(args.folder, args.device, size, prefetch, prompt, args.decode, layers, cold)
            recall = "-" if r["recall"] is None else f"{100 * r['recall']:.0f} %"
            rows.append(
                [
                    f"{size}/{config.num_experts} per layer ({100 * size / config.num_experts:.0f} %)",
                    cold,
                    "on" if prefetch else "off",
                    f"{r['prompt_tps']:.1f}",
                    f"{r['gen_tps']:.2f}",
                    f"{r['gen_tps'] / ref['gen_tps']:.2f}x",
                    f"{100 * r['hit']:.1f} %",
                    f"{100 * r['wait']:.1f} %",
                    f"{100 * r['cpu']:.1f} %",
                    f"{r['gb'] / r['wall']:.2f} GB/s",
                    recall,
                    "yes" if r["tokens"] == ref["tokens"] else "NO",
                ]
            )
    print(f"machine: {machine()}")
    print(
        f"checkpoint: {args.folder} ({layers} MoE layers), device {args.device}, prompt {args.prompt} tokens, "
        f"{args.decode} greedy decode steps"
    )
    print(
        markdown_table(
            [
                "expert slots",
                "cold experts",
                "prefetch",
                "prefill tok/s",
                "decode tok/s",
                "vs resident",
                "hit rate (prompt+decode)",
                "time waiting for copies",
                "picks on the CPU",
                "copy rate",
                "prefetch recall",
                "same tokens as resident",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
