"""The GPU benchmark: the full 48-layer Qwen3-30B-A3B shape with random weights, quantized (mixed)
straight from random tensors made on the GPU (its 61 GB bf16 source never exists), then decode at
several VRAM budgets and all-resident, with the memory model's estimate beside the allocator's
and the driver's figures, and the `vram --gpu` speed estimate beside the measured speed.

    python bench/gpu_bench.py --out $OUT        (run by bench/gpu_check.sh on a lent GPU)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import greedy_run, machine, markdown_table

from qwenlocal import load_model
from qwenlocal.memory import GIB, device_memory, estimate, model_plan
from qwenlocal.random_checkpoint import write_random_quantized_checkpoint

CONTEXT = {"bytes": 0}  # the CUDA context, measured once before anything is allocated


def copy_rate_gbs(nbytes: int = 256 * 1024**2) -> float:
    """Pinned host -> device copy rate of this host, GB/s."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return 5 * nbytes / (time.perf_counter() - t) / 1e9


def run(folder: Path, budget: int | None, ctx: int, prompt: list[int], n_decode: int) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    free0, _ = torch.cuda.mem_get_info()
    t = time.perf_counter()
    model = load_model(folder, device="cuda", dtype=torch.bfloat16, ctx_size=ctx, vram_budget=budget)
    load_s = time.perf_counter() - t
    r = greedy_run(model, prompt, n_decode, ctx)
    est = estimate(model.config, model_plan(model, ctx))
    mem = device_memory(torch.device("cuda"))
    free1, _ = torch.cuda.mem_get_info()
    row = {
        "budget_gib": None if budget is None else budget / GIB,
        "ctx": ctx,
        "load_s": load_s,
        "prompt_tps": r["prompt_tps"],
        "gen_tps": r["gen_tps"],
        "estimate_gpu_bytes": est.gpu_total,
        "max_reserved_bytes": mem["max_reserved"],
        "process_gpu_bytes": free0 - free1 + CONTEXT["bytes"],  # what the driver says this run holds
        "slots": est.expert_slots,
        "experts_total": est.experts_total,
    }
    if "hit" in r:
        row.update(hit_rate=r["hit"], copy_gbs=r["gb"] / r["wall"], wait_share=r["wait"], recall=r["recall"])
    try:
        from qwenlocal.gpus import decode_speed, find_gpu

        gpu = find_gpu("H200")
        speed = decode_speed(est, gpu.bandwidth_gbs, gpu.pcie_gbs)
        row.update(predicted_low=speed.tok_s_low, predicted_high=speed.tok_s_high)
    except Exception as e:  # the estimate is a side column; the measurement stands alone
        row["predicted_error"] = str(e)
    del model
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/gpu-out")
    ap.add_argument("--folder", default="/tmp/qwen3-30b-a3b-random-mixed")
    ap.add_argument("--budgets", type=float, nargs="+", default=[8, 12, 16])
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 32768])
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--decode", type=int, default=128)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.cuda.init()
    free, total = torch.cuda.mem_get_info()
    CONTEXT["bytes"] = total - free
    folder = Path(args.folder)
    if not (folder / "config.json").is_file():
        t = time.perf_counter()
        write_random_quantized_checkpoint(folder, {}, preset="mixed", device="cuda", force=True)
        print(f"wrote {folder} in {time.perf_counter() - t:.0f} s", flush=True)
    prompt = torch.randint(0, 151_000, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    rows = [run(folder, None, args.contexts[0], prompt, args.decode)]
    for ctx in args.contexts[1:]:
        rows.append(run(folder, None, ctx, prompt, args.decode))
    for b in args.budgets:
        rows.append(run(folder, int(b * GIB), args.contexts[0], prompt, args.decode))
    rows.append(run(folder, int(args.budgets[0] * GIB), args.contexts[-1], prompt, args.decode))
    (out / "gpu_bench.json").write_text(json.dumps(rows, indent=2))
    table = []
    for r in rows:
        table.append(
            [
                "all resident" if r["budget_gib"] is None else f"{r['budget_gib']:.0f} GiB",
                f"{r['ctx']:,}",
                f"{r['slots']:,}/{r['experts_total']:,}",
                f"{r['prompt_tps']:.0f}",
                f"{r['gen_tps']:.1f}",
                f"{r.get('predicted_low', 0):.0f}-{r.get('predicted_high', 0):.0f}",
                f"{100 * r['hit_rate']:.1f} %" if "hit_rate" in r else "-",
                f"{r['copy_gbs']:.2f}" if "copy_gbs" in r else "-",
                f"{100 * r['wait_share']:.0f} %" if "wait_share" in r else "-",
                f"{r['estimate_gpu_bytes'] / GIB:.2f}",
                f"{r['process_gpu_bytes'] / GIB:.2f}",
                f"{100 * (r['estimate_gpu_bytes'] / r['process_gpu_bytes'] - 1):+.1f} %",
            ]
        )
    print(f"machine: {machine()}; pinned copy {copy_rate_gbs():.1f} GB/s")
    print(
        f"prompt {args.prompt} tokens, {args.decode} greedy decode steps; random 48-layer model, mixed recipe"
    )
    print(
        markdown_table(
            [
                "budget",
                "ctx",
                "experts on GPU",
                "prefill tok/s",
                "decode tok/s",
                "vram --gpu H200 estimate",
                "hit rate",
                "copies GB/s",
                "waiting",
                "estimate GiB",
                "driver GiB (process)",
                "estimate vs driver",
            ],
            table,
        )
    )


if __name__ == "__main__":
    main()
