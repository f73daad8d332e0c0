"""Cold and warm first-call latency of nbflash (GPU).

    python3 tests/gpu/latency.py [--dtype float16] [--head-dim 64] [--causal] [--runs 2]

Runs a fresh Python process ``--runs`` times (default 2) with ``NUMBA_CACHE_DIR``
pointing to one new, empty temporary directory. Each process times
``import nbflash`` and its first forward + backward call (inputs are made before
the clock starts; the GPU is synchronised before it stops). The first process
compiles every kernel it needs and fills the disk cache (nbflash's kernels are
``cache=True``); the later ones should load them from it. Prints a table and the
number of files in the cache; exit status 1 if a child fails.

``--cache-dir DIR`` uses (and keeps) DIR instead of a temporary directory.
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[2]

CHILD = r"""
import json, sys, time
import numpy as np
import cupy
dtype_name, head_dim, causal = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
if dtype_name == "bfloat16":
    import ml_dtypes
    dt = ml_dtypes.bfloat16
else:
    dt = np.dtype(dtype_name)
rng = np.random.default_rng(0)
b, s, h, d = 2, 512, 8, head_dim
q, k, v, do = (cupy.asarray(rng.standard_normal((b, s, h, d)).astype(dt)) for _ in range(4))
cupy.cuda.Device().synchronize()
t0 = time.perf_counter()
import nbflash
from nbflash import interface     # nbflash imports its kernels lazily
t1 = time.perf_counter()
out, lse = nbflash.attention(q, k, v, causal=causal, return_lse=True)
cupy.cuda.Device().synchronize()
t2 = time.perf_counter()
dq, dk, dv = nbflash.attention_backward(do, q, k, v, out, lse, causal=causal)
cupy.cuda.Device().synchronize()
t3 = time.perf_counter()
out, lse = nbflash.attention(q, k, v, causal=causal, return_lse=True)
dq, dk, dv = nbflash.attention_backward(do, q, k, v, out, lse, causal=causal)
cupy.cuda.Device().synchronize()
t4 = time.perf_counter()
assert np.isfinite(out.get().astype(np.float32)).all()
from nbflash import _launch
print(json.dumps({"import_s": t1 - t0, "forward_s": t2 - t1, "backward_s": t3 - t2,
                  "total_s": t3 - t0, "second_call_s": t4 - t3,
                  "kernels": len(_launch._kernels)}))
"""


def _count_files(path):
    return sum(1 for p in pathlib.Path(path).rglob("*") if p.is_file())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args(argv)

    tmp = None
    cache = args.cache_dir
    if cache is None:
        tmp = tempfile.TemporaryDirectory(prefix="nbflash-numba-cache-")
        cache = tmp.name
    env = dict(os.environ, NUMBA_CACHE_DIR=cache, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                        os.environ.get("PYTHONPATH")])))
    rows, failed = [], False
    for run in range(args.runs):
        before = _count_files(cache)
        proc = subprocess.run([sys.executable, "-c", CHILD, args.dtype, str(args.head_dim),
                               "1" if args.causal else "0"],
                              env=env, capture_output=True, text=True, cwd=str(ROOT))
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode or not lines:
            print(f"run {run + 1} failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
            failed = True
            break
        r = json.loads(lines[-1])
        r["cache_files_before"], r["cache_files_after"] = before, _count_files(cache)
        rows.append(r)

    print(f"first-call latency, {args.dtype}, batch 2, seqlen 512, 8 heads, headdim "
          f"{args.head_dim}, causal={args.causal}; NUMBA_CACHE_DIR={cache}")
    print(f"{'run':<10}{'import':>10}{'forward':>10}{'backward':>10}{'total':>10}"
          f"{'2nd call':>10}{'kernels':>9}{'cache files':>14}")
    for i, r in enumerate(rows):
        name = "cold" if i == 0 else "warm" if i == 1 else f"warm {i}"
        print(f"{name:<10}{r['import_s']:>9.2f}s{r['forward_s']:>9.2f}s{r['backward_s']:>9.2f}s"
              f"{r['total_s']:>9.2f}s{r['second_call_s']:>9.3f}s{r['kernels']:>9}"
              f"{r['cache_files_before']:>7} -> {r['cache_files_after']}")
    if len(rows) >= 2:
        speedup = rows[0]["total_s"] / max(rows[1]["total_s"], 1e-9)
        print(f"warm / cold: {rows[1]['total_s']:.2f} s / {rows[0]['total_s']:.2f} s "
              f"({speedup:.1f}x faster)")
        if rows[1]["cache_files_after"] == 0:
            print("note: the disk cache stayed empty: kernels were not cached")
    if tmp is not None:
        tmp.cleanup()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
