"""Helpers shared by the benchmarks: machine description, checkpoint cache, table output."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CACHE = Path(os.environ.get("QWENLOCAL_BENCH_DIR", ROOT / ".bench"))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM{gpu}; torch {torch.__version__}"


def git_rev() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def real_shape_checkpoint(layers: int, dtype: torch.dtype = torch.bfloat16) -> Path:
    """A random checkpoint with Qwen3-30B-A3B's real layer shapes and `layers` layers, written once."""
    from qwenlocal.weights.random_checkpoint import write_random_checkpoint

    name = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    out = CACHE / f"real-shapes-{layers}L-{name}"
    if not (out / "model.safetensors.index.json").is_file():
        write_random_checkpoint(out, {"num_hidden_layers": layers}, dtype=dtype, force=True)
    return out


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def greedy_run(model, prompt: list[int], n_decode: int, ctx_size: int) -> dict:
    """A warm-up, then the prompt and `n_decode` greedy steps: speeds, tokens, and the expert-cache
    counters of the timed part (hit rate, time waiting, bytes copied, prefetch recall)."""
    import time

    from qwenlocal.generation.generate import Generator, SamplingParams

    greedy = SamplingParams(temperature=0)
    gen = Generator(model, ctx_size=ctx_size)
    list(gen.stream(prompt[:16], greedy, max_tokens=2, eos_ids=()))  # warm-up
    stats = getattr(model.experts, "stats", None)
    before = stats.snapshot() if stats else None
    gen.reset()
    t = time.perf_counter()
    s = gen.run(prompt, greedy, max_tokens=n_decode, eos_ids=())
    wall = time.perf_counter() - t
    row = {"tokens": s.token_ids, "prompt_tps": s.prompt_tps, "gen_tps": s.gen_tps, "wall": wall}
    if stats:
        delta = stats.since(before)
        d = delta.total()
        row.update(
            hit=d.hits / max(d.hits + d.misses, 1),
            wait=d.wait_s / wall,
            gb=d.bytes_copied / 1e9,
            recall=delta.prefetch_recall,
            cpu=d.cpu_computed / max(d.hits + d.misses, 1),  # picks computed on the CPU (--cold-experts)
        )
    return row
