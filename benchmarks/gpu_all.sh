#!/usr/bin/env bash
# Every benchmark over the standard grid, on one GPU machine, in under 10 minutes on an H100.
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
. benchmarks/steps.sh        # step NAME SECONDS COMMAND..., and the array failed

main() {
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv
  # The same steps ran on an H100 on 2026-11-24 (dd4f60e) as separate device calls:
  # precompile 72-116 s (16 CPU cores), speed over the full grid 111 s (float16) +
  # 76 s (bfloat16), resources 3 s, memory 8 s, io 127 s (compiling its tile
  # variants) + 19 s, animate 9 s. The limits add up to 9 min 40 s.
  step "precompile" 140 $PY -m nbflash.precompile --dtypes float16 bfloat16 --head-dims 64 128
  step "speed float16" 150 $PY -m benchmarks speed --dtypes float16 --repeats 10 --budget 0.5
  step "speed bfloat16" 110 $PY -m benchmarks speed --dtypes bfloat16 --repeats 10 \
    --budget 0.5 --overhead-calls 0 --merge
  step "resources (float16, bfloat16; head dims 64 and 128)" 20 \
    $PY -m benchmarks resources --dtypes float16 bfloat16 --head-dims 64 128
  step "memory" 30 $PY -m benchmarks memory --seqlens 2048 4096 8192 16384 32768 65536
  step "io" 110 $PY -m benchmarks io --timeout 100
  step "animate" 20 $PY -m benchmarks animate
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
