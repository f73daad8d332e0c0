"""Peak extra GPU memory of attention, nbflash versus naive CuPy attention.

Extra memory is what a call allocates beyond its inputs: outputs, workspaces and (for
the naive version) the seqlen x seqlen score and probability matrices. It is read
from a fresh CuPy memory pool, which keeps every block it handed out until
``free_all_blocks``, so the pool's total after the call is the call's high-water mark.
Naive attention that runs out of memory is recorded as such, not crashed on.
"""
import argparse
import json

import numpy as np

GIB = 2.0**30


def _naive_forward_backward(cupy, q, k, v, do, causal):
    import math
    scale = 1.0 / math.sqrt(q.shape[-1])
    qh, kh, vh, doh = (x.transpose(0, 2, 1, 3) for x in (q, k, v, do))
    s = cupy.matmul(qh, kh.transpose(0, 1, 3, 2)) * scale
    if causal:
        n = s.shape[-1]
        s = cupy.where(cupy.tri(n, dtype=bool), s, -cupy.inf).astype(s.dtype)
    p = cupy.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    out = cupy.matmul(p, vh)
    dv = cupy.matmul(p.transpose(0, 1, 3, 2), doh)
    dp = cupy.matmul(doh, vh.transpose(0, 1, 3, 2))
    ds = p * (dp - (doh * out).sum(axis=-1, keepdims=True))
    dq = cupy.matmul(ds, kh) * scale
    dk = cupy.matmul(ds.transpose(0, 1, 3, 2), qh) * scale
    return out, dq, dk, dv


def _nbflash_forward_backward(q, k, v, do, causal):
    import nbflash
    out, lse = nbflash.attention(q, k, v, causal=causal, return_lse=True)
    return nbflash.attention_backward(do, q, k, v, out, lse, causal=causal)


def _naive_forward(cupy, q, k, v, causal):
    from nbflash._naive import naive_attention
    return naive_attention(cupy, q, k, v, causal)


def peak_extra_bytes(fn, inputs_bytes):
    """(peak extra bytes, None) or (None, 'out of memory')."""
    import cupy
    pool = cupy.get_default_memory_pool()
    cupy.cuda.Device().synchronize()
    pool.free_all_blocks()
    try:
        result = fn()
        cupy.cuda.Device().synchronize()
        peak = pool.total_bytes() - inputs_bytes
        del result
        return peak, None
    except cupy.cuda.memory.OutOfMemoryError:
        return None, "out of memory"
    finally:
        pool.free_all_blocks()


def run(seqlens, batch=1, heads=16, head_dim=128, dtype="float16", causal=False):
    import cupy
    rows = []
    rng = np.random.default_rng(0)
    for n in seqlens:
        shape = (batch, n, heads, head_dim)
        q, k, v, do = (cupy.asarray(rng.standard_normal(shape, dtype=np.float32), dtype=dtype)
                       for _ in range(4))
        inputs = 4 * q.nbytes
        row = {"seqlen": n}
        for name, fn in (
            ("nbflash_fwd", lambda: __import__("nbflash").attention(q, k, v, causal=causal)),
            ("nbflash_fwd_bwd", lambda: _nbflash_forward_backward(q, k, v, do, causal)),
            ("naive_fwd", lambda: _naive_forward(cupy, q, k, v, causal)),
            ("naive_fwd_bwd", lambda: _naive_forward_backward(cupy, q, k, v, do, causal)),
        ):
            peak, err = peak_extra_bytes(fn, inputs)
            row[name] = peak if err is None else err
        rows.append(row)
        del q, k, v, do
        cupy.get_default_memory_pool().free_all_blocks()
    return rows


def fmt(x):
    return f"{x / GIB:9.3f}" if isinstance(x, (int, float)) else f"{x:>9}"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks memory", description=__doc__)
    ap.add_argument("--seqlens", type=int, nargs="+",
                    default=[1024, 2048, 4096, 8192, 16384, 32768, 65536])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rows = run(args.seqlens, args.batch, args.heads, args.head_dim, args.dtype)
    print(f"peak extra GPU memory, GiB (batch {args.batch}, {args.heads} heads, headdim "
          f"{args.head_dim}, {args.dtype})")
    print(f"| seqlen | nbflash fwd | nbflash fwd+bwd | naive fwd | naive fwd+bwd |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['seqlen']} | {fmt(r['nbflash_fwd'])} | {fmt(r['nbflash_fwd_bwd'])} | "
              f"{fmt(r['naive_fwd'])} | {fmt(r['naive_fwd_bwd'])} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "rows": rows}, f, indent=1)
    return rows
