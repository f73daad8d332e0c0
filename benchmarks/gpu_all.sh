#!/usr/bin/env bash
# Every benchmark at moderate sizes, on one GPU machine, in under 10 minutes on an H100.
# Usage, from the repository root on the GPU machine:
#   source .gpu/env.sh && bash benchmarks/gpu_all.sh
# Tables go to stdout; JSON and PNG files to benchmarks/results/<gpu-name>/ and the GIF
# to benchmarks/results/forward.gif. When $OUT is set (device runs), everything under
# benchmarks/results/ is also packed into $OUT/results.tar.gz and the log kept as
# $OUT/gpu_all.log. A step that fails or runs out of time is reported; the rest run.
set -u
cd "$(dirname "$0")/.."
export NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS=0 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
failed=()

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo
  echo "== $name (at ${SECONDS}s, limit ${limit}s)"
  timeout "$limit" "$@"
  local rc=$?
  if [ $rc -ne 0 ]; then
    echo "!! $name: exit $rc"
    failed+=("$name")
  fi
}

main() {
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv
  # The step limits add up to 9 min 40 s. On an H100 (2026-11-24, ed3ce13) speed
  # --quick and resources together took 371 s (mostly compiling: 25-45 s per
  # tensor-core kernel), memory 55, io 79, animate 9. resources runs after speed so
  # that it loads speed's kernels from the disk cache.
  step "speed --quick" 330 $PY -m benchmarks speed --quick
  step "resources (float16, head dims 64 and 128)" 60 \
    $PY -m benchmarks resources --dtypes float16 --head-dims 64 128
  step "memory" 60 $PY -m benchmarks memory --seqlens 2048 4096 8192 16384 32768 65536
  step "io --quick" 100 $PY -m benchmarks io --quick --timeout 90
  step "animate" 30 $PY -m benchmarks animate
  echo
  echo "== done in ${SECONDS}s; failed: ${failed[*]:-none}"
}

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  main 2>&1 | tee "$OUT/gpu_all.log"
  tar -czf "$OUT/results.tar.gz" benchmarks/results
else
  main
fi
