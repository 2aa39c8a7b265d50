#!/usr/bin/env bash
# The one prepared run for a lent GPU (the device tool): at most 8 minutes of wall time on an H100
# or H200, one table at the end (bench/gpu_check.py): the CUDA tests, the self-check's verdict per
# fast path, resident decode (grouped + graph vs loop), the same conversation under --ctx-size 4k
# and 32k, an 8 GiB budget with --cold-experts copy|cpu|auto, peak memory against `vram`.
#
# That machine has no network, and its Python lacks bitsandbytes and pytest. Carry their wheels in
# .wheels/ (ignored by git; ~57 MB of the 64 MiB carry), fetched once on a machine with network:
#   pip download --no-deps --only-binary=:all: --platform manylinux_2_24_x86_64 \
#       --python-version 3.12 -d .wheels bitsandbytes==0.50.2 pytest pluggy iniconfig
#   pip download --no-deps --only-binary=:all: -d .wheels transformers==5.24.0
#   pip download --no-deps --only-binary=:all: --platform manylinux_2_17_x86_64 \
#       --python-version 3.12 -d .wheels regex pyyaml        (transformers' own needs)
# (bitsandbytes 0.50.2 43 MB, transformers ~11 MB, the rest < 3 MB.) Then call the device tool
# with carry [".wheels"], timeout_s 540, and: bash bench/gpu_check.sh
#
# A dry run of the same Python on the CPU, with a tiny model (tests/test_gpu_check.py runs it):
#   bash bench/gpu_check.sh --dry-run
set -uo pipefail
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/gpu-out}
PY=${PYTHON:-python}
TESTS_S=${TESTS_S:-130}  # the CUDA tests' share of the 8 minutes
CHECK_S=${CHECK_S:-320}  # the measurements' share (the checkpoint is written inside it)
mkdir -p "$OUT"
if [ "${1:-}" = "--dry-run" ]; then
  exec "$PY" bench/gpu_check.py --dry-run --out "$OUT"
fi

have() { "$PY" -c "import $1" 2>/dev/null; }
for pkg in bitsandbytes pytest transformers; do
  have "$pkg" && continue
  case $pkg in
    bitsandbytes) "$PY" -m pip install --no-deps -q --no-index .wheels/bitsandbytes-*.whl ;;
    pytest) "$PY" -m pip install --no-deps -q --no-index .wheels/pytest-*.whl .wheels/pluggy-*.whl .wheels/iniconfig-*.whl ;;
    transformers) "$PY" -m pip install --no-deps -q --no-index .wheels/transformers-*.whl .wheels/regex-*.whl .wheels/pyyaml-*.whl ;;
  esac 2>&1 | tail -1
done
nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.max,pcie.link.width.max --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
if have pytest; then
  timeout "$TESTS_S" "$PY" -m pytest -q -p no:cacheprovider -p no:randomly tests/test_cuda.py >"$OUT/cuda_tests.log" 2>&1
  grep -E "^(FAILED|ERROR)" "$OUT/cuda_tests.log" | head -10
fi
timeout "$CHECK_S" "$PY" bench/gpu_check.py --out "$OUT" --tests "$OUT/cuda_tests.log" 2>&1 | tee "$OUT/gpu_check.log" | tail -25
