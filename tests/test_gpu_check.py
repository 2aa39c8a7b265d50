"""bench/gpu_check.sh's dry run: the Python half of the GPU run, on the CPU with a tiny model, prints
its one table with every row (the loan's minutes are not the place to find a typo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run_prints_the_table(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "QWENLOCAL_CACHE_DIR": str(tmp_path)}
    r = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    table = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    checks = [line.split(" | ")[0].removeprefix("| ") for line in table[1:]]
    assert "stopped here" not in checks, r.stdout
    assert checks[:2] == ["CUDA tests (tests/test_cuda.py)", "self-check: grouped"]
    for row in (
        "resident, grouped, ctx 256",
        "resident, loop, ctx 256",
        "--cold-experts auto",
        "peak memory",
    ):
        assert any(row in c for c in checks), (row, checks)
    assert (tmp_path / "gpu_check.json").is_file()
