#!/usr/bin/env bash
# One device call for the grids backward (README, "Two backward kernels"): compile its
# kernels, run the GPU tests with it selected, check it under compute-sanitizer, and
# time it beside the strips kernel and torch flash's backward. Planned to end inside
# 10 minutes on 16 CPU cores and an H100 (step limits below; not yet run whole).
# Usage, from the repository root on the GPU machine:
#   source .gpu/env.sh && bash benchmarks/gpu_grids.sh
# Logs go to $OUT (device runs) or /tmp/out. A step that fails or runs out of time is
# reported; the rest run.
set -u
cd "$(dirname "$0")/.."
export NBFLASH_BACKWARD_KERNEL=grids OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
export NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS=0 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
. benchmarks/steps.sh        # step NAME SECONDS COMMAND..., and the array failed

nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
step "precompile (grids, deterministic too)" 140 \
  $PY -m nbflash.precompile --dtypes float16 bfloat16 --head-dims 32 64 96 128 256 \
  --deterministic both
step "gpu tests (grids)" 220 bash -c "$PY -m pytest -q -n 16 -m gpu tests/test_attention.py \
  tests/test_reliability.py > $OUT/pytest_grids.txt 2>&1; rc=\$?; tail -15 $OUT/pytest_grids.txt; exit \$rc"
step "backward alone: strips, grids, candidates, torch flash" 100 \
  bash -c "$PY -m benchmarks backward --json $OUT/backward.json | tee $OUT/backward.md | grep '^|'"
step "compute-sanitizer (grids, float16)" 110 \
  $PY tests/gpu/sanitize.py --tools memcheck racecheck --jobs 16 -- --filter float16 \
  --max-cases 24
echo
echo "failed steps: ${failed[*]:-none}"
