#!/usr/bin/env bash
# One device call: environment, smoke test, kernel resources, GPU test suite, memory.
# Usage (device): source .gpu/env.sh && bash benchmarks/gpu_check.sh [pytest args...]
set -u
export NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS=0 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
python3 -c "import cupy, numba, numba_cuda, cuda.core, sys; print('python', sys.version.split()[0], 'cupy', cupy.__version__, 'numba', numba.__version__, 'numba-cuda', numba_cuda.__version__, 'cuda.core', cuda.core.__version__)"
echo "== smoke: python -m nbflash"
timeout 200 python3 -m nbflash 2>&1 | tee "$OUT/main.txt"
echo "== resources"
timeout 200 python3 -m benchmarks resources 2>&1 | tee "$OUT/resources.md"
echo "== gpu tests"
timeout ${PYTEST_TIMEOUT:-330} python3 -m pytest -q -n 8 -p no:randomly "$@" 2>&1 | tee "$OUT/pytest.txt" | tail -60
echo "== memory"
timeout 120 python3 -m benchmarks memory --heads 16 --head-dim 64 --seqlens 4096 8192 16384 32768 --json "$OUT/memory.json" 2>&1 | tail -12
