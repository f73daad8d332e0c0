"""``python -m nbflash``: check nbflash against plain attention, then time it.

On a GPU: forward and backward at a few shapes against float64 attention computed
with CuPy, then a small speed table against naive CuPy attention in the same dtype.
Without a GPU: the same correctness check under Numba's CUDA simulator at tiny sizes.
"""
import os
import sys


def _has_cuda_driver():
    import ctypes
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


if "NUMBA_ENABLE_CUDASIM" not in os.environ and not _has_cuda_driver():
    # No GPU: run the same check under the simulator, which Numba reads at import.
    os.execve(sys.executable, [sys.executable, "-m", "nbflash", *sys.argv[1:]],
              {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"})

import numpy as np  # noqa: E402

import nbflash  # noqa: E402
from nbflash import interface  # noqa: E402
from nbflash._naive import naive_attention  # noqa: E402

xp = interface.xp


def _grads64(q, k, v, dout, causal):
    """Gradients by autodiff-free finite structure: float64 attention backward."""
    import math
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    g = h // hk
    f = np.float64
    qh = q.astype(f).transpose(0, 2, 1, 3)
    kh = xp.repeat(k.astype(f).transpose(0, 2, 1, 3), g, axis=1)
    vh = xp.repeat(v.astype(f).transpose(0, 2, 1, 3), g, axis=1)
    doh = dout.astype(f).transpose(0, 2, 1, 3)
    scale = 1.0 / math.sqrt(d)
    s = xp.matmul(qh, kh.transpose(0, 1, 3, 2)) * scale
    if causal:
        i = xp.arange(sq)[:, None]
        j = xp.arange(sk)[None, :]
        s = xp.where(j <= i + sk - sq, s, -xp.inf)
    m = s.max(axis=-1, keepdims=True)
    m = xp.where(xp.isfinite(m), m, 0)
    p = xp.exp(s - m)
    den = p.sum(axis=-1, keepdims=True)
    p = p / xp.where(den > 0, den, 1)
    dv = xp.matmul(p.transpose(0, 1, 3, 2), doh)
    dp = xp.matmul(doh, vh.transpose(0, 1, 3, 2))
    ds = p * (dp - (p * dp).sum(axis=-1, keepdims=True))
    dq = xp.matmul(ds, kh) * scale
    dk = xp.matmul(ds.transpose(0, 1, 3, 2), qh) * scale
    fold = lambda x: x.reshape(b, hk, g, sk, d).sum(axis=2).transpose(0, 2, 1, 3)  # noqa: E731
    return dq.transpose(0, 2, 1, 3), fold(dk), fold(dv)


def check(shapes, dtypes):
    rng = np.random.default_rng(0)
    worst = 0.0
    print(f"{'dtype':9} {'shape (b, sq, sk, h, hk, d)':30} {'causal':6}  max|err|: "
          f"out      dq       dk       dv")
    for dtype in dtypes:
        for (b, sq, sk, h, hk, d) in shapes:
            for causal in (False, True):
                host = [rng.standard_normal(s).astype(np.float32)
                        for s in ((b, sq, h, d), (b, sk, hk, d), (b, sk, hk, d), (b, sq, h, d))]
                q, k, v, do = (xp.asarray(x).astype(dtype) for x in host)
                out, lse = nbflash.attention(q, k, v, causal=causal, return_lse=True)
                grads = nbflash.attention_backward(do, q, k, v, out, lse, causal=causal)
                ref_out, _ = naive_attention(xp, q, k, v, causal, compute_dtype=np.dtype(np.float64))
                refs = (ref_out,) + _grads64(q, k, v, do, causal)
                errs = [float(abs(a.astype(np.float64) - r).max()) for a, r in zip((out,) + grads, refs)]
                worst = max(worst, max(errs) if np.dtype(dtype).itemsize >= 4 else 0.0)
                print(f"{np.dtype(dtype).name:9} {str((b, sq, sk, h, hk, d)):30} {str(causal):6}"
                      f"            " + " ".join(f"{e:8.1e}" for e in errs))
                if not all(np.isfinite(errs)) or max(errs) > 0.1:
                    raise SystemExit("nbflash: result does not match the float64 reference")
    print("correctness: all outputs within tolerance of float64 attention")


def speed():
    import cupy
    from cupyx.profiler import benchmark
    rng = np.random.default_rng(0)
    print(f"\n{'seqlen':>7} {'causal':>6} {'nbflash ms':>11} {'naive ms':>9} {'speed-up':>8}"
          f"   (fp16, batch 2, 16 heads, headdim 64, forward)")
    for n in (512, 1024, 2048, 4096):
        for causal in (False, True):
            q, k, v = (cupy.asarray(rng.standard_normal((2, n, 16, 64)), dtype=np.float16)
                       for _ in range(3))
            t_nb = benchmark(lambda: nbflash.attention(q, k, v, causal=causal), n_repeat=10,
                             n_warmup=2).gpu_times.mean() * 1e3
            t_nv = benchmark(lambda: naive_attention(cupy, q, k, v, causal), n_repeat=10,
                             n_warmup=2).gpu_times.mean() * 1e3
            print(f"{n:>7} {str(causal):>6} {t_nb:>11.3f} {t_nv:>9.3f} {t_nv / t_nb:>7.2f}x")


def main():
    if interface.ON_GPU:
        import cupy
        print(f"nbflash {nbflash.__version__} on {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}")
        check([(1, 1, 1, 1, 1, 64), (2, 129, 257, 4, 2, 64), (1, 300, 200, 2, 1, 128),
               (1, 64, 64, 3, 3, 256), (2, 77, 77, 2, 1, 17)],
              [np.float16, np.float32])
        speed()
    else:
        print(f"nbflash {nbflash.__version__}: no CUDA GPU found; checking under Numba's CUDA "
              f"simulator at tiny sizes (no timing)")
        check([(1, 5, 9, 2, 1, 8), (1, 17, 6, 2, 2, 4)], [np.float16, np.float32])
    return 0


if __name__ == "__main__":
    sys.exit(main())
