#!/usr/bin/env bash
# The one prepared run for a lent GPU (the device tool): CUDA tests, then the full-size benchmark.
# bitsandbytes is not installed there: carry its manylinux wheel in .wheels/ (it fits the 64 MiB carry):
#   pip download --no-deps --only-binary=:all: --platform manylinux_2_24_x86_64 \
#       --python-version 3.12 -d .wheels bitsandbytes==0.50.2
# and call the device tool with carry [".wheels"] and: bash bench/gpu_check.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
python -c "import bitsandbytes" 2>/dev/null || pip install --no-deps -q .wheels/bitsandbytes-*.whl
python -c "import psutil" 2>/dev/null || pip install -q psutil 2>/dev/null || true
nvidia-smi --query-gpu=name,memory.total,pcie.link.gen.max,pcie.link.width.max --format=csv | tee "$OUT/gpu.txt"
if python -c "import pytest" 2>/dev/null; then
  python -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/cuda_tests.log" | tail -5
fi
python bench/gpu_bench.py --out "$OUT" 2>&1 | tee "$OUT/gpu_bench.log"

# ---- cold experts (issue 14; owned by the cold-experts work, kept apart from the run above) ----
# --cold-experts copy vs cpu vs auto at 8, 12 and 16 GiB: tok/s, PCIe GB/s, picks on the CPU.
# Reuses the 48-layer checkpoint gpu_bench.py wrote. Skip it with COLD_EXPERTS=0.
cold_experts_check() {
  python bench/cold_gpu.py --out "$OUT" 2>&1 | tee "$OUT/cold_gpu.log"
}
if [ "${COLD_EXPERTS:-1}" != 0 ]; then
  cold_experts_check
fi
