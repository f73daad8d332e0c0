"""NumPy test oracles for attention (forward and backward).

Layout (FlashAttention convention):
    q      (batch, seqlen_q, nheads,   headdim)
    k, v   (batch, seqlen_k, nheads_k, headdim)
    out    (batch, seqlen_q, nheads,   headdim)
    lse    (batch, nheads, seqlen_q)

GQA/MQA: nheads % nheads_k == 0 and query head h reads kv head
h // (nheads // nheads_k) (contiguous grouping). In the backward pass dk and dv
of a kv head are the sums over the query heads of its group.

Causal masking is bottom-right aligned (FlashAttention >= 2.1): key j is visible
to query i iff j <= i + seqlen_k - seqlen_q. When seqlen_q > seqlen_k the first
seqlen_q - seqlen_k rows see no key at all ("fully masked"); their output is 0
and their lse is -inf, and the backward treats their probabilities as 0.

lse is the natural log of sum_j exp(scale * q_i . k_j) over visible j: the
log-sum-exp of the *scaled* logits (not max-subtracted). No gradient flows
through it.

Two families of functions:

* ``attention`` / ``attention_backward``: exact, all math in float64,
  whatever the input float dtype.
* ``naive_attention`` / ``naive_attention_backward``: the same formulas with
  every intermediate tensor rounded to the input dtype, modelling "plain
  attention as a user writes it on a GPU in that dtype" (matmuls and row sums
  accumulate in float32, or float64 for float64 inputs). They give the
  same-precision baseline error that a kernel's error is compared against.

These are test oracles: they validate nothing beyond what they need.
"""

import math

import numpy as np

__all__ = [
    "causal_mask",
    "attention",
    "attention_backward",
    "naive_attention",
    "tf32_round",
    "naive_attention_backward",
]


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def causal_mask(seqlen_q, seqlen_k):
    """Bottom-right aligned causal mask, bool (seqlen_q, seqlen_k), True = may attend.

    Key j is visible to query i iff j <= i + seqlen_k - seqlen_q.
    Example: seqlen_q=2, seqlen_k=5 gives rows [1 1 1 1 0], [1 1 1 1 1];
    seqlen_q=5, seqlen_k=2 gives three fully masked rows, then [1 0], [1 1].
    """
    i = np.arange(seqlen_q)[:, None]
    j = np.arange(seqlen_k)[None, :]
    return j <= i + (seqlen_k - seqlen_q)


def _scale(softmax_scale, headdim):
    return 1.0 / math.sqrt(headdim) if softmax_scale is None else float(softmax_scale)


def _to_bhsd(x):
    """(B, S, H, D) -> (B, H, S, D)."""
    return np.swapaxes(x, 1, 2)


def _from_bhsd(x):
    """(B, H, S, D) -> (B, S, H, D), made contiguous."""
    return np.ascontiguousarray(np.swapaxes(x, 1, 2))


def _expand_kv(x, nheads):
    """Repeat kv heads so that query head h lines up with kv head h // group."""
    group = nheads // x.shape[2]
    return x if group == 1 else np.repeat(x, group, axis=2)


def _group_sum(x, nheads_k):
    """Sum a per-query-head gradient (B, S, H, D) over each GQA group -> (B, S, Hk, D)."""
    b, s, h, d = x.shape
    return x.reshape(b, s, nheads_k, h // nheads_k, d).sum(axis=3)


def _mask(seqlen_q, seqlen_k, causal):
    """Visible-pair mask broadcastable to (B, H, Sq, Sk), or None when all visible."""
    return causal_mask(seqlen_q, seqlen_k) if causal else None


def _safe_log(x):
    """log(x) with log(0) = -inf, without raising a floating-point warning."""
    out = np.full(x.shape, -np.inf, dtype=x.dtype)
    np.log(x, out=out, where=x > 0)
    return out


def _safe_div(num, den):
    """num / den[..., None] with 0 where den == 0 (fully masked rows), no warning."""
    den = den[..., None]
    out = np.zeros(np.broadcast_shapes(num.shape, den.shape), dtype=num.dtype)
    np.divide(num, den, out=out, where=den > 0)
    return out


# --------------------------------------------------------------------------
# exact float64 reference
# --------------------------------------------------------------------------

def _exact_scores(q, k, causal, scale):
    """Scaled logits in float64, (B, H, Sq, Sk), -inf on masked entries.

    Products of float16/bfloat16/float32 inputs are exact in float64 and their sums
    err by far less than those inputs' precision. float64 inputs are multiplied and
    summed in extended precision (x86 long double, 64-bit significand) and rounded
    once: a float64 dot product with cancellation (terms summing to 100, result
    near 1) is otherwise off by tens of ulps, and an "exact" reference that rounds
    like plain float64 attention makes the naive baseline look exact.
    """
    nheads = q.shape[2]
    wide = np.longdouble if np.dtype(q.dtype) == np.float64 else np.float64
    qw = _to_bhsd(np.asarray(q, dtype=wide))
    kw = _to_bhsd(_expand_kv(np.asarray(k, dtype=wide), nheads))
    s = (np.matmul(qw, np.swapaxes(kw, -1, -2)) * wide(scale)).astype(np.float64)
    mask = _mask(q.shape[1], k.shape[1], causal)
    if mask is not None:
        s = np.where(mask, s, -np.inf)
    return s


def _exact_probs(q, k, causal, scale):
    """Return (P, lse) in float64; P is (B, H, Sq, Sk), 0 on masked entries."""
    s = _exact_scores(q, k, causal, scale)
    m = s.max(axis=-1, initial=-np.inf)                              # row max
    m_safe = np.where(np.isneginf(m), 0.0, m)                        # fully masked rows
    e = np.exp(s - m_safe[..., None])                                # exp(-inf) = 0
    l = e.sum(axis=-1)
    p = _safe_div(e, l)
    lse = m_safe + _safe_log(l)                                       # -inf if l == 0
    return p, lse


def attention(q, k, v, *, causal=False, softmax_scale=None):
    """Exact attention in float64.

    out[b, i, h] = sum_j P[b, h, i, j] v[b, j, h // group],
    P = softmax_j(scale * q[b, i, h] . k[b, j, h // group]) over the visible j.

    Returns (out (B, Sq, H, D) float64, lse (B, H, Sq) float64) where
    lse = log sum_j exp(scale * q_i . k_j) over visible j (natural log of the
    scaled logits). Fully masked rows: out 0, lse -inf. softmax_scale defaults
    to 1/sqrt(headdim). Accepts any float dtype (float16, bfloat16, float32,
    float64); inputs are upcast exactly.
    """
    scale = _scale(softmax_scale, q.shape[-1])
    p, lse = _exact_probs(q, k, causal, scale)
    v64 = _to_bhsd(_expand_kv(np.asarray(v, dtype=np.float64), q.shape[2]))
    out = _from_bhsd(np.matmul(p, v64))
    return out, lse


def attention_backward(dout, q, k, v, *, causal=False, softmax_scale=None, out=None,
                       lse=None):
    """Exact analytic gradients of attention in float64.

    By default everything is derived from q, k, v exactly. Given ``out`` and/or
    ``lse`` (what a forward pass returned, e.g. rounded to float16 and float32), the
    backward is instead evaluated exactly *as a function of those arguments*, the way
    FlashAttention's backward defines it: P = exp(scale S - lse) and
    Delta = rowsum(dO * out). The difference between the two is the error that
    rounding out and lse in the forward pass passes on to the gradients; a backward
    kernel cannot undo it.

    With P the softmax probabilities (0 where masked and on fully masked rows),
    O = P V and upstream gradient dO:
        dV    = P^T dO
        dP    = dO V^T
        Delta = rowsum(dO * O)           (= rowsum(P * dP))
        dS    = P * (dP - Delta)
        dQ    = scale * dS K
        dK    = scale * dS^T Q
    dK and dV are summed over the query heads sharing a kv head (GQA).
    Returns (dq, dk, dv) float64 with the shapes of q, k, v.
    """
    nheads, nheads_k = q.shape[2], k.shape[2]
    scale = _scale(softmax_scale, q.shape[-1])
    if lse is None:
        p, _ = _exact_probs(q, k, causal, scale)                      # (B, H, Sq, Sk)
    else:
        lse64 = np.asarray(lse, dtype=np.float64)[..., None]
        s = _exact_scores(q, k, causal, scale)
        visible = np.isfinite(s) & np.isfinite(lse64)
        p = np.where(visible, np.exp(np.where(visible, s, 0.0) - np.where(visible, lse64, 0.0)),
                     0.0)
    q64 = _to_bhsd(np.asarray(q, dtype=np.float64))
    k64 = _to_bhsd(_expand_kv(np.asarray(k, dtype=np.float64), nheads))
    v64 = _to_bhsd(_expand_kv(np.asarray(v, dtype=np.float64), nheads))
    do64 = _to_bhsd(np.asarray(dout, dtype=np.float64))

    o = np.matmul(p, v64) if out is None else _to_bhsd(np.asarray(out, dtype=np.float64))
    dv = np.matmul(np.swapaxes(p, -1, -2), do64)                      # (B, H, Sk, D)
    dp = np.matmul(do64, np.swapaxes(v64, -1, -2))                    # (B, H, Sq, Sk)
    delta = np.sum(do64 * o, axis=-1)                                 # (B, H, Sq)
    ds = p * (dp - delta[..., None])
    dq = scale * np.matmul(ds, k64)
    dk = scale * np.matmul(np.swapaxes(ds, -1, -2), q64)

    return (
        _from_bhsd(dq),
        _group_sum(_from_bhsd(dk), nheads_k),
        _group_sum(_from_bhsd(dv), nheads_k),
    )


def attention_backward_magnitudes(dout, q, k, v, out, lse, *, causal=False,
                                  softmax_scale=None):
    """The size of the terms each gradient element sums, as (dq, dk, dv) float64.

    The backward formulas with every factor replaced by its absolute value:
    |dS| <= P (|dO| |V|^T + |Delta|) with |Delta| <= rowsum(|dO| |out|), then
    scale |dS| |K|, scale |dS|^T |Q| and P^T |dO|. Where the terms cancel (one key,
    say, gives dS = 0 exactly) the gradient is 0 but its rounding error is not: it
    is a few units of the accumulator's rounding of these magnitudes.
    """
    nheads, nheads_k = q.shape[2], k.shape[2]
    scale = _scale(softmax_scale, q.shape[-1])
    lse64 = np.asarray(lse, dtype=np.float64)[..., None]
    s = _exact_scores(q, k, causal, scale)
    visible = np.isfinite(s) & np.isfinite(lse64)
    p = np.where(visible, np.exp(np.where(visible, s, 0.0) - np.where(visible, lse64, 0.0)), 0.0)
    q64, do64, o64 = (np.abs(_to_bhsd(np.asarray(x, dtype=np.float64))) for x in (q, dout, out))
    k64 = np.abs(_to_bhsd(_expand_kv(np.asarray(k, dtype=np.float64), nheads)))
    v64 = np.abs(_to_bhsd(_expand_kv(np.asarray(v, dtype=np.float64), nheads)))
    ds = p * (np.matmul(do64, np.swapaxes(v64, -1, -2)) + np.sum(do64 * o64, axis=-1)[..., None])
    dq = scale * np.matmul(ds, k64)
    dk = scale * np.matmul(np.swapaxes(ds, -1, -2), q64)
    dv = np.matmul(np.swapaxes(p, -1, -2), do64)
    return (_from_bhsd(dq), _group_sum(_from_bhsd(dk), nheads_k),
            _group_sum(_from_bhsd(dv), nheads_k))


# --------------------------------------------------------------------------
# same-precision ("naive") baseline
# --------------------------------------------------------------------------

def _precisions(dtype):
    """(storage dtype, accumulation dtype) for the naive model."""
    dtype = np.dtype(dtype)
    acc = np.float64 if dtype == np.float64 else np.float32
    return dtype, np.dtype(acc)


def _rounder(dtype, acc):
    """Function that rounds an accumulation-precision array to `dtype`, keeping it in `acc`."""
    if dtype == acc:
        return lambda x: x
    return lambda x: x.astype(dtype).astype(acc)


def tf32_round(x):
    """float32 values rounded to tf32 (10 mantissa bits, to nearest, ties away from
    zero), as float32: what a tf32 tensor-core product reads of its operands."""
    x = np.asarray(x, np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    r = ((u + 0x1000) & 0xFFFFE000).astype(np.uint32).view(np.float32)
    return np.where(np.isfinite(x), r, x)


def _naive_forward_parts(q, k, v, causal, softmax_scale, tf32=False):
    """Naive forward; returns intermediates (values are dtype-representable, held in acc).
    ``tf32``: the operands of both products are rounded to tf32 first."""
    dtype, acc = _precisions(q.dtype)
    rnd = _rounder(dtype, acc)
    operand = tf32_round if tf32 else (lambda x: x)
    nheads = q.shape[2]
    scale = _scale(softmax_scale, q.shape[-1])

    qa = _to_bhsd(np.asarray(q).astype(acc))
    ka = _to_bhsd(_expand_kv(np.asarray(k).astype(acc), nheads))
    va = _to_bhsd(_expand_kv(np.asarray(v).astype(acc), nheads))

    s = rnd(np.matmul(operand(qa), np.swapaxes(operand(ka), -1, -2)))  # q @ k^T
    s = rnd(s * acc.type(scale))                                      # * scale
    mask = _mask(q.shape[1], k.shape[1], causal)
    if mask is not None:
        s = np.where(mask, s, acc.type(-np.inf))
    m = s.max(axis=-1, initial=-np.inf)                               # exact (a selection)
    m_safe = np.where(np.isneginf(m), acc.type(0), m)
    x = rnd(s - m_safe[..., None])                                    # max subtraction
    e = rnd(np.exp(x))                                                # exp
    l = rnd(e.sum(axis=-1))                                           # row sum
    p = rnd(_safe_div(e, l))                                          # normalisation
    o = rnd(np.matmul(operand(p), operand(va)))                       # P @ V
    lse = m_safe + _safe_log(l)                                       # from rounded m, l
    return dict(dtype=dtype, acc=acc, rnd=rnd, scale=scale,
                qa=qa, ka=ka, va=va, p=p, o=o, lse=lse)


def naive_attention(q, k, v, *, causal=False, softmax_scale=None, tf32=False):
    """Attention computed "as a user writes it" in the input dtype.

    Every intermediate is rounded to q.dtype: S = q @ k^T (float32 accumulation,
    float64 for float64 inputs), S * scale, S - rowmax, exp, rowsum, division,
    P @ V (float32 accumulation). Masked logits are -inf; fully masked rows
    give out 0 and lse -inf.

    Returns (out (B, Sq, H, D) in q.dtype, lse (B, H, Sq) float32, or float64
    for float64 inputs), with lse = rowmax + log(rowsum) from the rounded values.
    For float64 inputs this agrees with ``attention`` to rounding error.

    ``tf32`` (float32 inputs): q, k, v and P are rounded to tf32 before the products,
    as with ``torch.backends.cuda.matmul.allow_tf32``; the baseline of
    ``nbflash.attention(..., allow_tf32=True)``.
    """
    parts = _naive_forward_parts(q, k, v, causal, softmax_scale, tf32)
    out = _from_bhsd(parts["o"]).astype(parts["dtype"])
    return out, parts["lse"].astype(parts["acc"])


def naive_attention_backward(dout, q, k, v, *, causal=False, softmax_scale=None, tf32=False):
    """Gradients of ``naive_attention`` with every intermediate rounded to q.dtype.

    Mirrors what autograd does through plain same-dtype attention (matmuls and
    reductions accumulate in float32, float64 for float64 inputs, then round):
        P     forward probabilities (rounded, as in naive_attention)
        O     forward output (rounded)
        dV    = round(P^T dO)                 per query head
        dP    = round(dO V^T)
        Delta = round(rowsum(dO * O))
        dS    = round(P * round(dP - Delta))
        dX    = round(scale * dS)             (gradient of the unscaled q @ k^T)
        dQ    = round(dX K)
        dK    = round(dX^T Q)                 per query head
    dK and dV of a kv head: sum of its group's (rounded) per-head gradients,
    accumulated in float32 and rounded once. Returns (dq, dk, dv) in q.dtype.

    ``tf32`` (float32 inputs): the operands of every product, the forward's too, are
    rounded to tf32 first; the baseline of ``nbflash.attention_backward(...,
    allow_tf32=True)``.
    """
    parts = _naive_forward_parts(q, k, v, causal, softmax_scale, tf32)
    op = tf32_round if tf32 else (lambda x: x)
    dtype, acc, rnd, scale = parts["dtype"], parts["acc"], parts["rnd"], parts["scale"]
    qa, ka, va, p, o = parts["qa"], parts["ka"], parts["va"], parts["p"], parts["o"]
    nheads_k = k.shape[2]
    doa = _to_bhsd(rnd(np.asarray(dout).astype(acc)))

    dv = rnd(np.matmul(op(np.swapaxes(p, -1, -2)), op(doa)))         # (B, H, Sk, D)
    dp = rnd(np.matmul(op(doa), op(np.swapaxes(va, -1, -2))))         # (B, H, Sq, Sk)
    delta = rnd(np.sum(doa * o, axis=-1))                             # (B, H, Sq)
    ds = rnd(p * rnd(dp - delta[..., None]))
    dx = rnd(ds * acc.type(scale))
    dq = rnd(np.matmul(op(dx), op(ka)))
    dk = rnd(np.matmul(op(np.swapaxes(dx, -1, -2)), op(qa)))

    dq = _from_bhsd(dq)
    dk = rnd(_group_sum(_from_bhsd(dk), nheads_k))
    dv = rnd(_group_sum(_from_bhsd(dv), nheads_k))
    return dq.astype(dtype), dk.astype(dtype), dv.astype(dtype)
