#!/usr/bin/env bash
# The one prepared run for a lent GPU (the device tool), under 8 minutes: the CUDA tests, then the
# full-size benchmark (bench/gpu_bench.py), which prints one table.
# That machine has no network. Its Python lacks bitsandbytes (quantizing on the GPU, the loop path
# and the prefill use it) and pytest; carry their wheels in .wheels/ (ignored by git, ~57 MB):
#   pip download --no-deps --only-binary=:all: --platform manylinux_2_24_x86_64 \
#       --python-version 3.12 -d .wheels bitsandbytes==0.50.2 pytest pluggy iniconfig
#   pip download --no-deps --only-binary=:all: -d .wheels transformers==5.24.0
#   pip download --no-deps --only-binary=:all: --platform manylinux_2_17_x86_64 \
#       --python-version 3.12 -d .wheels regex pyyaml        (transformers' own needs)
# then call the device tool with carry [".wheels"] and: bash bench/gpu_check.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
have() { python -c "import $1" 2>/dev/null; }
for pkg in bitsandbytes pytest transformers; do
  have "$pkg" && continue
  case $pkg in
    bitsandbytes) pip install --no-deps -q --no-index .wheels/bitsandbytes-*.whl ;;
    pytest) pip install --no-deps -q --no-index .wheels/pytest-*.whl .wheels/pluggy-*.whl .wheels/iniconfig-*.whl ;;
    transformers) pip install --no-deps -q --no-index .wheels/transformers-*.whl .wheels/regex-*.whl .wheels/pyyaml-*.whl ;;
  esac 2>&1 | tail -1
done
nvidia-smi --query-gpu=name,memory.total,pcie.link.gen.max,pcie.link.width.max --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
if have pytest; then
  # at most 2.5 minutes, so that the benchmark keeps its time
  timeout 150 python -m pytest -q -p no:cacheprovider -p no:randomly tests/test_cuda.py 2>&1 \
    | tee "$OUT/cuda_tests.log" | grep -E "passed|failed|error|FAILED|ERROR" | tail -15
fi
timeout 320 python bench/gpu_bench.py --out "$OUT" 2>&1 | tee "$OUT/gpu_bench.log" | tail -12

# ---- cold experts (issue 14; owned by the cold-experts work, kept apart from the run above) ----
# --cold-experts copy vs cpu vs auto at 8, 12 and 16 GiB: tok/s, PCIe GB/s, picks on the CPU.
# Reuses the 48-layer checkpoint gpu_bench.py wrote. Skip it with COLD_EXPERTS=0.
cold_experts_check() {
  python bench/cold_gpu.py --out "$OUT" 2>&1 | tee "$OUT/cold_gpu.log"
}
if [ "${COLD_EXPERTS:-1}" != 0 ]; then
  cold_experts_check
fi
