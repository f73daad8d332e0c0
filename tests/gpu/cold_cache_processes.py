"""Processes that start together on an empty disk cache (GPU only).

Training jobs start one process per GPU rank, and test runners one per worker, all
at once; Numba's disk cache does not guard concurrent writers, and two
configurations of one kernel function used to share one index file. This script:

1. fills an empty ``NUMBA_CACHE_DIR`` with ``nbflash.precompile``, 6 processes at
   once: 3 configurations (forward causal/full and backward, on one kernel source
   each), every one of them compiled by two processes at the same moment;
2. starts a fresh process (``--check``) that runs each configuration at a real
   shape and checks the accuracy rule, and that every kernel it used was loaded
   from the disk cache (no cache miss, i.e. no recompile).

    python3 tests/gpu/cold_cache_processes.py

Prints one JSON line; exit status 0 when all holds. ``tests/test_reliability.py``
runs it.
"""
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests/gpu")]

CONFIGS = [  # dtype, (batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim), causal
    ("float16", (1, 150, 200, 2, 1, 32), True),
    ("float16", (2, 100, 100, 2, 2, 32), False),
]


def fill_cache():
    from nbflash.precompile import precompile
    jobs = [("forward", "float16", 32, True, False), ("forward", "float16", 32, False, False),
            ("backward", "float16", 32, True, False)] * 2
    return precompile(jobs, processes=len(jobs), report=lambda line: None)


def check():
    import cupy
    import numpy as np

    import nbflash
    from first_call_threads import accuracy_problems, random_inputs
    from nbflash import _launch

    rng = np.random.default_rng(1)
    problems = []
    for dtype_name, shape, causal in CONFIGS:
        host = random_inputs(rng, dtype_name, shape)
        q, k, v, do = (cupy.asarray(x) for x in host)
        out, lse = nbflash.attention(q, k, v, causal=causal, return_lse=True)
        grads = nbflash.attention_backward(do, q, k, v, out, lse, causal=causal)
        got = [x.get() for x in (out, lse, *grads)]
        problems += [f"{dtype_name} causal={causal}: {p}"
                     for p in accuracy_problems(host, got, causal, dtype_name)]
    stats = {}
    for kernel in _launch._kernels.values():
        s = kernel.dispatcher.stats
        stats[kernel.dispatcher.py_func.__name__] = {
            "hits": sum(s.cache_hits.values()), "misses": sum(s.cache_misses.values())}
    # The backward's causal=False kernel was not precompiled: the one miss expected.
    for name, s in stats.items():
        expect_miss = name.startswith("backward_") and name.endswith("_full")
        if s["misses"] != int(expect_miss) or s["hits"] != 1 - int(expect_miss):
            problems.append(f"{name}: {s['hits']} cache hits, {s['misses']} misses")
    return {"ok": not problems, "problems": problems, "kernels": stats}


def main():
    if "--check" in sys.argv:
        print(json.dumps(check()), flush=True)
        return 0
    os.environ["NUMBA_CACHE_DIR"] = os.environ.get("NUMBA_CACHE_DIR") or tempfile.mkdtemp()
    t0 = time.perf_counter()
    fill_seconds = fill_cache()
    proc = subprocess.run([sys.executable, __file__, "--check"], capture_output=True,
                          text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    result = json.loads(lines[-1]) if lines else {
        "ok": False, "problems": [f"check process: rc {proc.returncode}: {proc.stderr[-3000:]}"]}
    files = sorted(p.name for p in pathlib.Path(os.environ["NUMBA_CACHE_DIR"]).rglob("*.nbi"))
    result.update(fill_s=round(fill_seconds, 1), total_s=round(time.perf_counter() - t0, 1),
                  index_files=files)
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
