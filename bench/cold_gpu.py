"""`--cold-experts copy|cpu|auto` on a GPU: the full 48-layer shape (random weights, mixed recipe,
the checkpoint bench/gpu_bench.py writes) at 8, 12 and 16 GiB budgets, each mode in turn: decode
and prefill tok/s, PCIe GB/s (copies and promotions), the share of picks computed on the CPU and
how much of the CPU's time the GPU's work covered. The `vram --gpu` estimate of each mode sits
beside it, from the pinned copy rate and the CPU read rate measured here.

    python bench/cold_gpu.py --out $OUT        (run by bench/gpu_check.sh, its cold-experts section)

Goals (issue 14): ≥ 40 tok/s at 8 GiB with the better mode; `auto` within 5 % of the better of
`copy` and `cpu`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import greedy_run, machine, markdown_table

from qwenlocal import load_model
from qwenlocal.planning.gpus import measure_cpu_bandwidth
from qwenlocal.weights.random_checkpoint import write_random_quantized_checkpoint

GIB = 1024**3
MODES = ("copy", "cpu", "auto")


def run(
    folder: Path, budget: int, mode: str, prompt: list[int], n_decode: int, ctx: int, device: str
) -> dict:
    if device == "cuda":
        torch.cuda.empty_cache()
    model = load_model(
        folder, device=device, dtype=torch.bfloat16, ctx_size=ctx, vram_budget=budget, cold_experts=mode
    )
    r = greedy_run(model, prompt, n_decode, ctx)
    experts = model.experts
    t = experts.stats.total() if hasattr(experts, "stats") else None  # None: everything fit
    row = {
        "budget_gib": budget / GIB,
        "mode": mode,
        "slots_per_layer": getattr(experts, "slots_per_layer", model.config.num_experts),
        "workers": getattr(experts, "workers", None),
        "timing": getattr(getattr(experts, "timing", None), "__dict__", None),
        "prompt_tps": r["prompt_tps"],
        "gen_tps": r["gen_tps"],
        "hit_rate": r.get("hit", 1.0),
        "cpu_share": r.get("cpu", 0.0),
        "pcie_gbs": r.get("gb", 0.0) / r["wall"],
        "overlap": 1 - t.cpu_wait_s / t.cpu_wall_s if t and t.cpu_wall_s else None,
        "promoted": t.promoted if t else 0,
        "tokens": r["tokens"],
    }
    try:
        from qwenlocal.planning.gpus import cpu_decode_speed, decode_speed, find_gpu
        from qwenlocal.planning.memory import estimate, model_plan

        est = estimate(model.config, model_plan(model, ctx))
        gpu = find_gpu("H200")
        row["copy_estimate"] = decode_speed(est, gpu.bandwidth_gbs, gpu.pcie_gbs).__dict__
        row["cpu_estimate"] = cpu_decode_speed(est, gpu.bandwidth_gbs, CPU["gbs"]).__dict__
    except Exception as e:  # a side column; the measurement stands alone
        row["estimate_error"] = str(e)
    del model
    return row


CPU = {"gbs": 0.0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/gpu-out")
    ap.add_argument("--folder", default="/tmp/qwen3-30b-a3b-random-mixed")
    ap.add_argument("--budgets", type=float, nargs="+", default=[8, 12, 16])
    ap.add_argument("--modes", nargs="+", default=list(MODES))
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of this script on a small checkpoint")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folder = Path(args.folder)
    if not (folder / "config.json").is_file():
        t = time.perf_counter()
        write_random_quantized_checkpoint(folder, {}, preset="mixed", device="cuda", force=True)
        print(f"wrote {folder} in {time.perf_counter() - t:.0f} s", flush=True)
    CPU["gbs"] = measure_cpu_bandwidth(512 * 1024**2)
    prompt = torch.randint(0, 151_000, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    rows = []
    for b in args.budgets:
        for mode in args.modes:
            rows.append(run(folder, int(b * GIB), mode, prompt, args.decode, args.ctx, args.device))
            r = rows[-1]
            print(f"{b:g} GiB {mode}: {r['gen_tps']:.1f} tok/s decode, {r['pcie_gbs']:.2f} GB/s", flush=True)
    (out / "cold_gpu.json").write_text(json.dumps(rows, indent=2))
    table = []
    for r in rows:
        same = [x for x in rows if x["budget_gib"] == r["budget_gib"]]
        best = max(x["gen_tps"] for x in same if x["mode"] != "auto")
        est = r.get("cpu_estimate" if r["mode"] == "cpu" else "copy_estimate")
        table.append(
            [
                f"{r['budget_gib']:g} GiB",
                r["mode"],
                f"{r['slots_per_layer']}/128",
                f"{r['prompt_tps']:.0f}",
                f"{r['gen_tps']:.1f}",
                f"{r['gen_tps'] / best:.2f}",
                f"{100 * r['hit_rate']:.1f} %",
                f"{100 * r['cpu_share']:.1f} %",
                f"{r['pcie_gbs']:.2f}",
                "-" if r["overlap"] is None else f"{100 * r['overlap']:.0f} %",
                f"{est['tok_s_low']:.0f}-{est['tok_s_high']:.0f}" if est and r["mode"] != "auto" else "-",
                "yes" if r["tokens"] == same[0]["tokens"] else "no",
            ]
        )
    print(f"machine: {machine()}; CPU read {CPU['gbs']:.1f} GB/s")
    print(
        f"prompt {args.prompt} tokens, {args.decode} greedy decode steps, ctx {args.ctx}; random 48-layer model"
    )
    print(
        markdown_table(
            [
                "budget",
                "--cold-experts",
                "slots",
                "prefill tok/s",
                "decode tok/s",
                "vs better of copy/cpu",
                "hit rate",
                "picks on CPU",
                "PCIe GB/s",
                "CPU overlapped",
                "vram --gpu estimate",
                "same tokens as copy",
            ],
            table,
        )
    )


if __name__ == "__main__":
    main()
