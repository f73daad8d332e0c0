"""Compile nbflash's kernels for this GPU ahead of use, in parallel processes.

A tensor-core kernel takes tens of seconds to compile, once per configuration
(dtype, head-dim bucket, causal, forward or backward); after that it loads from
Numba's disk cache in well under a second. ``python -m nbflash.precompile``
compiles the configurations a program will use, one process per configuration,
so that a job's first calls (or every worker of a multi-process job) start warm::

    python -m nbflash.precompile --dtypes float16 bfloat16 --head-dims 64 128

Each process calls ``attention`` / ``attention_backward`` at a tiny shape, so the
kernels cached are exactly the ones later calls look up.
"""
import argparse
import itertools
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

DTYPES = ("float16", "bfloat16", "float32", "float64")


def jobs(dtypes=("float16", "bfloat16"), head_dims=(64, 128), causal=(False, True),
         forward=True, backward=True, deterministic=(False,)):
    """The compile jobs: tuples ``(pass, dtype, head_dim, causal, deterministic)``."""
    out = []
    for dtype, d, c in itertools.product(dtypes, head_dims, causal):
        if forward:
            out.append(("forward", dtype, d, c, False))
            if dtype == "float32":      # and its allow_tf32=True kernel
                out.append(("forward_tf32", dtype, d, c, False))
        if backward:
            out.extend(("backward", dtype, d, c, det) for det in deterministic)
            if dtype == "float32":      # and its allow_tf32=True kernel
                out.extend(("backward_tf32", dtype, d, c, det) for det in deterministic)
    return out


def compile_one(job):
    """Runs one job in this process; returns ``(job, seconds)``."""
    what, dtype_name, head_dim, causal, deterministic = job
    import numpy as np

    import nbflash
    from nbflash import config, interface
    xp = interface.xp
    if dtype_name == "bfloat16":
        import ml_dtypes
        dtype = np.dtype(ml_dtypes.bfloat16)
    else:
        dtype = np.dtype(dtype_name)
    shape = (1, 16, 1, head_dim)
    q, k, v = (xp.asarray(np.full(shape, 0.5, dtype)) for _ in range(3))
    start = time.perf_counter()
    if what in ("forward", "forward_tf32"):
        nbflash.attention(q, k, v, causal=causal, allow_tf32=what == "forward_tf32")
    else:
        lse = xp.zeros((1, 1, 16), config.ACCUMULATOR[dtype_name])
        nbflash.attention_backward(q, q, k, v, q, lse, causal=causal,
                                   deterministic=deterministic,
                                   allow_tf32=what == "backward_tf32")
    if interface.ON_GPU:
        xp.cuda.get_current_stream().synchronize()
    return job, time.perf_counter() - start


def precompile(job_list, processes=None, report=print):
    """Runs ``job_list`` (see ``jobs``) in up to ``processes`` processes (default:
    one per CPU) and returns the wall time in seconds."""
    start = time.perf_counter()
    processes = max(1, min(processes or os.cpu_count() or 1, len(job_list) or 1))
    with ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:
        for job, seconds in pool.map(compile_one, job_list):
            report(f"{seconds:7.1f} s  {' '.join(map(str, job))}")
    return time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m nbflash.precompile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"], choices=DTYPES)
    p.add_argument("--head-dims", nargs="+", type=int, default=[64, 128],
                   help="head dims (each compiles its bucket: 32, 64, 96, 128 or 256)")
    p.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    p.add_argument("--no-backward", action="store_true")
    p.add_argument("--deterministic", choices=["no", "both", "yes"], default="no",
                   help="backward kernels with deterministic=True too")
    p.add_argument("--processes", type=int, default=None)
    args = p.parse_args(argv)
    causal = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    det = {"no": (False,), "both": (False, True), "yes": (True,)}[args.deterministic]
    job_list = jobs(args.dtypes, args.head_dims, causal, backward=not args.no_backward,
                    deterministic=det)
    seconds = precompile(job_list, args.processes)
    print(f"{len(job_list)} configurations compiled or loaded in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
