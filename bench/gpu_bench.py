"""The GPU benchmark: the full 48-layer Qwen3-30B-A3B shape with random weights, quantized (mixed)
straight from random tensors made on the GPU (its 61 GB bf16 source never exists), then decode
all resident (grouped experts replayed as a CUDA graph, and the loop path it replaces) and at an
8 GiB budget, with kernels and host launches per token and the graph replay time from the torch
profiler, beside the `vram --gpu` estimate and the allocator's and driver's memory figures.

    python bench/gpu_bench.py --out $OUT                      (run by bench/gpu_check.sh)
    python bench/gpu_bench.py --device cpu --tiny --out /tmp/x   (a dry run of this script)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import greedy_run, machine, markdown_table

from qwenlocal import load_model
from qwenlocal.planning.memory import CUDA_CONTEXT_BYTES, GIB, estimate, model_plan
from qwenlocal.weights.random_checkpoint import TINY, write_random_quantized_checkpoint

LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cudaGraphLaunch")


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


def profile_decode(model, prompt: list[int], ctx: int, steps: int = 16) -> dict:
    """Device kernels and host launch calls per decode token; device time per token (the graph's
    replay time when the step is captured)."""
    from torch.profiler import ProfilerActivity, profile

    from qwenlocal.generation.generate import Generator

    cuda = model.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    gen = Generator(model, ctx_size=ctx)
    logits = gen.prefill(prompt[:32])
    token = int(logits.argmax())
    sync()
    t = time.perf_counter()
    token = int(gen.prefill([token]).argmax())  # the first step captures the graph (if any)
    first_s = time.perf_counter() - t
    for _ in range(2):  # warm-up outside the profile
        token = int(gen.prefill([token]).argmax())
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            token = int(gen.prefill([token]).argmax())
        sync()
    kernels = launches = 0
    device_us = 0.0
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels += 1
            device_us += e.device_time
        elif e.name in LAUNCH_CALLS:
            launches += 1
    row = {
        "kernels_per_token": kernels / steps,
        "launches_per_token": launches / steps,
        "first_step_s": first_s,
    }
    row["device_ms_per_token"] = device_us / steps / 1000
    if gen.graph is not None:  # replay alone, timed by CUDA events
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            gen.graph.graphs[gen.graph.span].replay()
        end.record()
        torch.cuda.synchronize()
        row["replay_ms"] = start.elapsed_time(end) / steps
    return row


def run(folder: Path, args, budget: int | None, moe: str, n_decode: int, prompt: list[int]) -> dict:
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        free0, _ = torch.cuda.mem_get_info()
    t = time.perf_counter()
    model = load_model(
        folder,
        device=args.device,
        dtype=torch.bfloat16,
        ctx_size=args.ctx,
        vram_budget=budget,
        moe=moe,
        cold_experts="copy",  # every miss copied in: the grouped offload path (bench/cold_gpu.py: the rest)
    )
    load_s = time.perf_counter() - t
    r = greedy_run(model, prompt, n_decode, args.ctx)
    est = estimate(model.config, model_plan(model, args.ctx))
    row = {
        "moe": moe,
        "budget_gib": None if budget is None else budget / GIB,
        "ctx": args.ctx,
        "load_s": load_s,
        "prompt_tps": r["prompt_tps"],
        "gen_tps": r["gen_tps"],
        "tokens": r["tokens"][:16],
        "estimate_gpu_bytes": est.gpu_total,
        "slots": est.expert_slots,
        "experts_total": est.experts_total,
    }
    if cuda:
        free1, _ = torch.cuda.mem_get_info()
        row["max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        row["process_gpu_bytes"] = free0 - free1 + CUDA_CONTEXT_BYTES  # driver's view, context estimated
    try:
        row.update(profile_decode(model, prompt, args.ctx, steps=16 if cuda else 2))
    except Exception as e:  # a profiler failure must not lose the row's speed
        row["profile_error"] = f"{type(e).__name__}: {e}"
    if "hit" in r:
        row.update(hit_rate=r["hit"], copy_gbs=r["gb"] / r["wall"], wait_share=r["wait"])
    try:
        from qwenlocal.planning.gpus import decode_speed, find_gpu

        gpu = find_gpu(args.gpu)
        speed = decode_speed(est, gpu.bandwidth_gbs, gpu.pcie_gbs)
        row.update(predicted_low=speed.tok_s_low, predicted_high=speed.tok_s_high)
    except Exception as e:  # the estimate is a side column; the measurement stands alone
        row["predicted_error"] = str(e)
    del model
    return row


def fmt_row(r: dict) -> list[str]:
    def f(key, spec, scale=1.0):
        return format(r[key] * scale, spec) if r.get(key) is not None else "-"

    return [
        "all resident" if r["budget_gib"] is None else f"{r['budget_gib']:g} GiB",
        r["moe"] + (" + graph" if r.get("replay_ms") is not None else ""),
        f"{r['slots']:,}/{r['experts_total']:,}",
        f"{r['prompt_tps']:.0f}",
        f"{r['gen_tps']:.1f}",
        f"{r.get('predicted_low', 0):.0f}-{r.get('predicted_high', 0):.0f}",
        f("kernels_per_token", ".0f"),
        f("launches_per_token", ".0f"),
        f("device_ms_per_token", ".2f"),
        f("replay_ms", ".2f"),
        f("first_step_s", ".1f"),
        f("hit_rate", ".1%"),
        f("copy_gbs", ".2f"),
        f"{r['estimate_gpu_bytes'] / GIB:.2f}",
        f("max_allocated_bytes", ".2f", 1 / GIB),
        f("process_gpu_bytes", ".2f", 1 / GIB),
    ]


HEADERS = [
    "budget",
    "experts",
    "experts on GPU",
    "prefill tok/s",
    "decode tok/s",
    "vram --gpu estimate tok/s",
    "kernels/token",
    "host launches/token",
    "device ms/token",
    "graph replay ms",
    "first step s (capture)",
    "hit rate",
    "copies GB/s",
    "estimate GiB",
    "max allocated GiB",
    "driver GiB",
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/gpu-out")
    ap.add_argument("--folder", default="/tmp/qwen3-30b-a3b-random-mixed")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--gpu", default="H200", help="the card for the vram --gpu estimate column")
    ap.add_argument("--tiny", action="store_true", help="a tiny model (a dry run of this script)")
    ap.add_argument("--budget", type=float, default=8.0, help="GiB for the offloaded row")
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--loop-decode", type=int, default=32, help="decode steps of the (slow) loop row")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folder = Path(args.folder)
    overrides = {**TINY, "num_hidden_layers": 3} if args.tiny else {}
    if not (folder / "config.json").is_file():
        t = time.perf_counter()
        write_random_quantized_checkpoint(folder, overrides, preset="mixed", device=args.device, force=True)
        print(f"wrote {folder} in {time.perf_counter() - t:.0f} s", flush=True)
    vocab = 1000 if args.tiny else 151_000
    prompt = torch.randint(0, vocab, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    specs = [("grouped", None, args.decode), ("loop", None, args.loop_decode)]
    if not args.tiny:  # the offload cache needs a GPU budget
        specs.append(("grouped", int(args.budget * GIB), args.decode // 2))
    rows = []
    for moe, budget, n in specs:
        t = time.perf_counter()
        rows.append(run(folder, args, budget, moe, n, prompt))
        print(f"row {len(rows)} ({moe}, budget {budget}) in {time.perf_counter() - t:.0f} s", flush=True)
        (out / "gpu_bench.json").write_text(json.dumps(rows, indent=2))
    same = rows[0]["tokens"] == rows[1]["tokens"]
    rate = f"; pinned copy {copy_rate_gbs():.1f} GB/s" if args.device == "cuda" else ""
    print(f"machine: {machine()}{rate}")
    print(
        f"random 48-layer model, mixed recipe (experts int4 g64, attention int8), ctx {args.ctx:,}; "
        f"prompt {args.prompt} tokens; greedy decode; grouped and loop agree on the first 16 tokens: {same}"
    )
    print(markdown_table(HEADERS, [fmt_row(r) for r in rows]))
    for r in rows:
        if "profile_error" in r:
            print(f"profiler ({r['moe']}, budget {r['budget_gib']}): {r['profile_error']}")


if __name__ == "__main__":
    main()
