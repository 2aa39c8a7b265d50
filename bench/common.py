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
    from qwenlocal.random_checkpoint import write_random_checkpoint

    name = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    out = CACHE / f"real-shapes-{layers}L-{name}"
    if not (out / "model.safetensors.index.json").is_file():
        write_random_checkpoint(out, {"num_hidden_layers": layers}, dtype=dtype, force=True)
    return out


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
