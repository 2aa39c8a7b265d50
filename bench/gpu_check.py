"""The measuring half of bench/gpu_check.sh: one table for a lent GPU, in one process.

The full 48-layer Qwen3-30B-A3B shape with random weights (mixed recipe), quantized straight from
random tensors made on the GPU, then: the self-check's verdict per fast path; decode all resident
with the grouped experts replayed as CUDA graphs against the loop path; the same short
conversation under --ctx-size 4k and 32k (a token should read what the conversation holds, not
the context); an 8 GiB budget with --cold-experts copy, cpu and auto; peak memory against the
memory model (`vram`) for each. The CUDA tests' result (a pytest log) heads the table.

    python bench/gpu_check.py --out $OUT --tests $OUT/cuda_tests.log     (from bench/gpu_check.sh)
    python bench/gpu_check.py --dry-run --out /tmp/x   (the same code on the CPU, a tiny model)
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import signal
import time
from pathlib import Path

import torch
from common import machine, markdown_table

from qwenlocal import load_model
from qwenlocal.generation.generate import Generator, SamplingParams
from qwenlocal.model import selfcheck
from qwenlocal.planning.memory import GIB, estimate, model_plan
from qwenlocal.weights.random_checkpoint import TINY, write_random_quantized_checkpoint

# Goals of issue 20 for an H100/H200.
GOAL_RESIDENT_TPS = 300
GOAL_LONG_CTX_SHARE = 0.90
GOAL_BUDGET_TPS = 40
GOAL_MEMORY_ERROR = 0.03
GREEDY = SamplingParams(temperature=0)


def conversation(model, prompt: list[int], n_decode: int, ctx: int) -> dict:
    """Decode tok/s of one conversation (prompt, then n_decode greedy tokens) after a warm-up over
    the same positions (every graph it needs captured), and the device's peak while it ran."""
    gen = Generator(model, ctx_size=ctx)
    gen.run(prompt, GREEDY, max_tokens=n_decode, eos_ids=())  # warm-up: captures, Triton compiles
    gen.reset()
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    s = gen.run(prompt, GREEDY, max_tokens=n_decode, eos_ids=())
    spans = sorted(gen.graph.graphs) if gen.graph is not None else []
    return {"tps": s.gen_tps, "prefill_tps": s.prompt_tps, "tokens": s.token_ids, "spans": spans}


def memory_row(model, ctx: int, base: int) -> dict:
    """Peak bytes on the device (the allocator's peak reserve plus what the driver held before
    any tensor: the CUDA context) against the memory model's estimate for this plan."""
    est = estimate(model.config, model_plan(model, ctx)).gpu_total
    if model.device.type == "cuda":
        peak = base + torch.cuda.max_memory_reserved(model.device)
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak": peak, "estimate": est}


def release(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def tests_result(log: Path | None) -> str:
    """pytest's summary counts from its log ("12 passed, 1 failed in 80s" -> "12 passed, 1 failed")."""
    if log is None or not log.is_file():
        return "not run"
    counts = re.findall(r"(\d+) (passed|failed|skipped|errors?)", log.read_text())
    return ", ".join(f"{n} {what}" for n, what in counts[-4:]) if counts else "no summary (timed out?)"


def measure(folder, args, ctx_short, ctx_long, prompt, n_decode, n_loop, base, rows, record) -> None:
    """The table's rows after the tests', appended as each is measured."""
    dry, device = args.dry_run, "cpu" if args.dry_run else "cuda"
    # -- all resident: self-check, grouped + graph vs loop, 4k vs 32k -----------------------------
    release(device)
    model = load_model(folder, device=device, dtype=torch.bfloat16, ctx_size=ctx_long, moe="grouped")
    verdicts = selfcheck.self_check(model, folder=Path(args.out) / "self-check")  # a fresh check
    for v in verdicts:
        rows.append([f"self-check: {v.path}", f"ok ({v.seconds:.1f} s)" if v.ok else v.detail, "ok"])
    if not verdicts:
        rows.append(["self-check", "no fast path here" if dry else "none checked", "grouped, gemv, graph ok"])
    short = conversation(model, prompt, n_decode, ctx_short)
    mem_short = memory_row(model, ctx_short, base)
    release(device)
    long = conversation(model, prompt, n_decode, ctx_long)
    mem_long = memory_row(model, ctx_long, base)
    kind = "grouped + graph" if short["spans"] else "grouped"
    rows.append(
        [f"resident, {kind}, ctx {ctx_short:,}", f"{short['tps']:.1f} tok/s", f">= {GOAL_RESIDENT_TPS}"]
    )
    model.experts.moe, model.graph_decode = "loop", False
    release(device)
    loop = conversation(model, prompt, n_loop, ctx_short)
    rows.append(
        [
            f"resident, loop, ctx {ctx_short:,}",
            f"{loop['tps']:.1f} tok/s",
            f"{short['tps'] / loop['tps']:.1f}x",
        ]
    )
    share = long["tps"] / short["tps"]
    rows.append(
        [
            f"resident, {kind}, ctx {ctx_long:,}, same conversation",
            f"{long['tps']:.1f} tok/s ({share:.2f} of ctx {ctx_short:,}; spans {long['spans']})",
            f">= {GOAL_LONG_CTX_SHARE:.2f}",
        ]
    )
    record.update(short=short, long=long, loop=loop, verdicts=[v.__dict__ for v in verdicts])
    memories = [(f"resident, ctx {ctx_short:,}", mem_short), (f"resident, ctx {ctx_long:,}", mem_long)]
    del model
    release(device)

    # -- the budget, cold experts copy | cpu | auto ----------------------------------------------
    record["cold"] = {}
    for mode in ("copy", "cpu", "auto"):
        release(device)
        fit = {"gpu_experts": 4 * 3} if dry else {"vram_budget": int(args.budget * GIB)}
        model = load_model(
            folder, device=device, dtype=torch.bfloat16, ctx_size=ctx_short, cold_experts=mode, **fit
        )
        r = conversation(model, prompt, n_decode // 2, ctx_short)
        budget = "4 slots a layer" if dry else f"{args.budget:g} GiB"
        rows.append(
            [f"{budget}, --cold-experts {mode}", f"{r['tps']:.1f} tok/s", f">= {GOAL_BUDGET_TPS} (best)"]
        )
        memories.append((f"{budget}, {mode}", memory_row(model, ctx_short, base)))
        record["cold"][mode] = r
        del model

    for name, m in memories:
        err = m["peak"] / m["estimate"] - 1
        peak = "process RSS (dry run)" if dry else "peak"
        rows.append(
            [
                f"peak memory, {name}",
                f"{peak} {m['peak'] / GIB:.2f} GiB vs vram {m['estimate'] / GIB:.2f} GiB ({err:+.1%})",
                f"within {GOAL_MEMORY_ERROR:.0%}",
            ]
        )
    record["memory"] = dict(memories)


def _stop(signum, frame) -> None:
    raise TimeoutError("the time limit (SIGTERM) came first")


def main() -> None:
    signal.signal(signal.SIGTERM, _stop)
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/gpu-out")
    ap.add_argument("--folder", default="/tmp/qwen3-30b-a3b-random-mixed")
    ap.add_argument("--tests", type=Path, default=None, help="the CUDA tests' pytest log")
    ap.add_argument("--dry-run", action="store_true", help="the CPU, a tiny model, a few steps")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--loop-decode", type=int, default=16)
    ap.add_argument("--budget", type=float, default=8.0, help="GiB for the --cold-experts rows")
    args = ap.parse_args()
    dry = args.dry_run
    device = "cpu" if dry else "cuda"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folder = out / "tiny-checkpoint" if dry else Path(args.folder)
    ctx_short, ctx_long = (256, 1024) if dry else (4096, 32768)
    n_prompt, n_decode = (24, 6) if dry else (args.prompt, args.decode)
    n_loop = 3 if dry else args.loop_decode
    t0 = time.perf_counter()
    vocab = 1000 if dry else 151_000
    prompt = torch.randint(0, vocab, (n_prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    base = 0
    if device == "cuda":
        torch.empty(1, device="cuda")
        free, total = torch.cuda.mem_get_info()
        base = total - free  # the CUDA context, before any tensor
    rows: list[list[str]] = [["CUDA tests (tests/test_cuda.py)", tests_result(args.tests), "all pass"]]
    record: dict = {"machine": machine()}

    try:
        if not (folder / "config.json").is_file():
            overrides = {**TINY, "num_hidden_layers": 3} if dry else {}
            write_random_quantized_checkpoint(folder, overrides, preset="mixed", device=device, force=True)
            print(f"wrote {folder} in {time.perf_counter() - t0:.0f} s", flush=True)
        measure(folder, args, ctx_short, ctx_long, prompt, n_decode, n_loop, base, rows, record)
    except BaseException as e:  # a timeout or a failure: the rows measured so far still print
        rows.append(["stopped here", f"{type(e).__name__}: {str(e)[:200]}", ""])
    finally:
        (out / "gpu_check.json").write_text(json.dumps(record, indent=1, default=str))
        print(
            f"{machine()}; random {'3' if dry else '48'}-layer model, mixed recipe; {time.perf_counter() - t0:.0f} s"
        )
        print(markdown_table(["check", "result", "goal"], rows))


if __name__ == "__main__":
    main()
