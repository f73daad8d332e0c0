"""Plain attention that materialises the scores: what a user writes by hand.

Used by ``python -m nbflash`` and ``benchmarks/`` as the baseline to check against
and to beat. ``xp`` is numpy or cupy; work is done in ``compute_dtype``.
"""
import math


def naive_attention(xp, q, k, v, causal=False, softmax_scale=None, compute_dtype=None):
    """(out, lse) of attention over (batch, seqlen, heads, headdim) arrays."""
    dt = compute_dtype or q.dtype
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
    qh = q.astype(dt).transpose(0, 2, 1, 3)                        # (b, h, sq, d)
    kh = xp.repeat(k.astype(dt).transpose(0, 2, 1, 3), h // hk, axis=1)
    vh = xp.repeat(v.astype(dt).transpose(0, 2, 1, 3), h // hk, axis=1)
    s = xp.matmul(qh, kh.transpose(0, 1, 3, 2)) * scale   # a Python float keeps dt
    if causal:
        i = xp.arange(sq)[:, None]
        j = xp.arange(sk)[None, :]
        s = xp.where(j <= i + sk - sq, s, -xp.inf)
    m = s.max(axis=-1, keepdims=True)
    m = xp.where(xp.isfinite(m), m, 0)
    p = xp.exp(s - m)
    denom = p.sum(axis=-1, keepdims=True)
    safe = xp.where(denom > 0, denom, 1)
    out = xp.matmul(p / safe, vh).transpose(0, 2, 1, 3)
    lse = xp.where(denom[..., 0] > 0, xp.log(safe[..., 0]) + m[..., 0], -xp.inf)
    return out, lse
