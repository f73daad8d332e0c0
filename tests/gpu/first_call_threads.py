"""nbflash's very first calls, made from several threads at once (GPU only).

Run in a fresh process, ideally with an empty Numba disk cache so that the kernels
really compile (seconds each, a wide race window):

    NUMBA_CACHE_DIR=$(mktemp -d) python3 tests/gpu/first_call_threads.py

8 threads wait on a barrier, then each calls attention and attention_backward on
its own CuPy stream: threads 0-3 with one configuration, 4-7 with another. Every
kernel must be built once (``nbflash._launch.get_kernel`` is lock-protected): one
``Kernel`` constructed per key of ``nbflash._launch._kernels``, one build per key.
Threads with the same configuration must get bitwise equal out, lse, dk, dv, and
the results must be accurate against the float64 reference. Prints one JSON line;
exit status 0 when all holds. ``tests/test_reliability.py`` runs it.
"""
import collections
import json
import pathlib
import sys
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import cupy  # noqa: E402
import numpy as np  # noqa: E402


N_THREADS = 8
CONFIGS = [  # dtype, (batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim), causal
    ("float16", (1, 200, 150, 4, 2, 64), True),
    ("bfloat16", (1, 130, 130, 2, 2, 96), False),
]


def main():
    t_start = time.perf_counter()
    from nbflash import _launch, interface   # nothing compiled yet
    import nbflash

    lock = threading.Lock()
    builds = collections.Counter()
    constructed = []
    original_get_kernel = interface.get_kernel
    original_kernel = _launch.Kernel

    class CountingKernel(original_kernel):
        def __init__(self, *args, **kwargs):
            with lock:
                constructed.append(threading.get_ident())
            super().__init__(*args, **kwargs)

    def counting_get_kernel(key, build, signature, shared_bytes):
        def counted_build():
            with lock:
                builds[repr(key)] += 1
            return build()
        return original_get_kernel(key, counted_build, signature, shared_bytes)

    _launch.Kernel = CountingKernel
    interface.get_kernel = counting_get_kernel
    assert not _launch._kernels, "kernels were built before the threads started"

    rng = np.random.default_rng(0)
    inputs = []
    for dtype_name, shape, causal in CONFIGS:
        host = random_inputs(rng, dtype_name, shape)
        inputs.append((host, [cupy.asarray(x) for x in host], causal, dtype_name))
    cupy.cuda.Device().synchronize()

    barrier = threading.Barrier(N_THREADS)
    results, errors = [None] * N_THREADS, []

    def worker(t):
        try:
            _, (q, k, v, do), causal, _ = inputs[t * len(CONFIGS) // N_THREADS]
            stream = cupy.cuda.Stream(non_blocking=True)
            with stream:
                barrier.wait()
                out, lse = nbflash.attention(q, k, v, causal=causal, return_lse=True)
                dq, dk, dv = nbflash.attention_backward(do, q, k, v, out, lse, causal=causal)
                stream.synchronize()
            results[t] = [x.get() for x in (out, lse, dq, dk, dv)]
        except BaseException as e:  # noqa: BLE001
            errors.append(f"thread {t}: {e!r}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(N_THREADS)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0

    problems = list(errors)
    keys = list(_launch._kernels)
    if len(constructed) != len(keys):
        problems.append(f"{len(constructed)} Kernel objects built for {len(keys)} keys")
    twice = {k: n for k, n in builds.items() if n != 1}
    if twice:
        problems.append(f"built more than once: {twice}")
    per_config = N_THREADS // len(CONFIGS)
    if not errors:
        for c, (host, _, causal, dtype_name) in enumerate(inputs):
            group = results[c * per_config:(c + 1) * per_config]
            for r in group[1:]:
                for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), r, group[0]):
                    if name != "dq" and a.tobytes() != b.tobytes():
                        problems.append(f"config {c}: {name} differs between threads")
            problems += [f"config {c}: {p}"
                         for p in accuracy_problems(host, group[0], causal, dtype_name)]

    result = {"ok": not problems, "problems": problems, "threads": N_THREADS,
              "kernels": len(keys), "kernel_objects_built": len(constructed),
              "builds_per_key": dict(builds), "first_calls_wall_s": round(wall, 2),
              "total_s": round(time.perf_counter() - t_start, 2)}
    print(json.dumps(result), flush=True)
    return 0 if not problems else 1


def random_inputs(rng, dtype_name, shape):
    """Host q, k, v, dout for ``shape`` = (batch, seqlen_q, seqlen_k, nheads, nheads_k,
    headdim), standard normal, in ``dtype_name``."""
    from strategies import DTYPES
    b, sq, sk, h, hk, d = shape
    return [rng.standard_normal(s).astype(DTYPES[dtype_name]) for s in
            ((b, sq, h, d), (b, sk, hk, d), (b, sk, hk, d), (b, sq, h, d))]


def accuracy_problems(host, got, causal, dtype_name):
    """The accuracy rule's failures for ``got`` = (out, lse, dq, dk, dv) computed from
    ``host`` = (q, k, v, dout) NumPy arrays; an empty list when all hold."""
    import reference
    from tolerance import assert_accurate, max_abs_logit, to_numpy64
    q, k, v, do = host
    exact = reference.attention(q, k, v, causal=causal)
    naive = reference.naive_attention(q, k, v, causal=causal)
    out, lse = got[:2]
    grads_exact = reference.attention_backward(
        do, q, k, v, causal=causal, out=to_numpy64(out), lse=to_numpy64(lse))
    grads_naive = reference.naive_attention_backward(do, q, k, v, causal=causal)
    logit = max_abs_logit(q, k, None)
    n_fwd = max(k.shape[1], q.shape[3])
    n_bwd = max(q.shape[1] * (q.shape[2] // k.shape[2]), k.shape[1], q.shape[3])
    problems = []
    checks = zip(("out", "lse", "dq", "dk", "dv"), got, exact + grads_exact,
                 naive + grads_naive, (n_fwd, n_fwd, n_bwd, n_bwd, n_bwd))
    for name, g, e, nv, n in checks:
        try:
            assert_accurate(name, g, e, nv, dtype_name, n, logit)
        except AssertionError as err:
            problems.append(str(err))
    return problems


if __name__ == "__main__":
    sys.exit(main())
