"""The accuracy rule, in one place.

For each output: max |nbflash - exact| <= 2 * max |naive - exact| + atol, where exact
is the float64 reference and naive is plain attention computed in the input dtype
(``reference.naive_attention``), as a user would write it.

atol covers two things the naive baseline does not.

1. A different, equally valid order of summation. Summing n terms in another order
   moves a result by about sqrt(n) units of the accumulator's rounding (float32, or
   float64 for float64 inputs), and the softmax amplifies a relative error e of a
   logit x into an absolute error e |x| of its exponent:
   4 * eps(accumulator) * sqrt(n) * max(1, max |logit|) * max(1, M),
   with n the longest reduction behind the output, |logit| the larger of
   |scale * q.k| and the root-sum-square of its terms (``max_abs_logit``), and M the
   size of what is summed: max |exact| for the forward's outputs; for gradients the
   largest sum of absolute terms (``reference.attention_backward_magnitudes``), since
   dS = P (dP - Delta) cancels (exactly, with a single key) and a gradient of 0 still
   carries the rounding of its terms.
2. The resolution of the input dtype, as FlashAttention 3's tests floor it:
   2 * max |(exact + 0.3) - 0.3 - exact| evaluated in the input dtype, about one unit
   in the last place at magnitude 0.3 (4e-3 for bfloat16, 5e-4 for float16, 6e-8 for
   float32). At tiny sizes (one output element, say) the naive error is a single
   draw that can land near zero by luck; tensor-core kernels round P to the input
   dtype before P V, exactly as FlashAttention does, and would fail on that luck.

For float32 the naive baseline is itself nearly exactly rounded, so term 1 is what
keeps the rule from demanding agreement with one particular summation order.

float32 with ``allow_tf32=True`` takes its floor in tf32 (``dtype_name="tf32"``): its
products read 10-bit operands, P among them, so it rounds P where FlashAttention
rounds it to 16 bits, and meets the same luck (the H100 found a causal 10 x 10 case
at head dim 1 whose naive tf32 error was 1.4e-4 against the kernel's 3.1e-4, about
0.6 of a tf32 unit at 1).
"""
import math

import numpy as np

ACCUMULATOR_EPS = {"float16": np.finfo(np.float32).eps, "bfloat16": np.finfo(np.float32).eps,
                   "float32": np.finfo(np.float32).eps, "tf32": np.finfo(np.float32).eps,
                   "float64": np.finfo(np.float64).eps}


def to_numpy64(x):
    if hasattr(x, "get"):
        x = x.get()
    return np.asarray(x).astype(np.float64)


def max_abs_logit(q, k, softmax_scale):
    """The size of the logits' rounding, over all (query, key) pairs of each kv group:
    max of |softmax_scale * q_i . k_j| and of the root-sum-square of its terms,
    softmax_scale * sqrt(sum_d (q_id k_jd)^2).

    A dot product summed in another order errs by about sqrt(d) roundings of its
    partial sums, and partial sums are as large as the root-sum-square of the terms
    even when the terms cancel and the logit itself is small (the H100's long run
    found a float32 logit of 80 terms of size ~9 that cancelled to below 1)."""
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    if q.size == 0 or k.size == 0:
        return 0.0
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    b, sq, h, d = q.shape
    hk = k.shape[2]
    qg = q.reshape(b, sq, hk, h // hk, d).transpose(0, 2, 1, 3, 4).reshape(b, hk, -1, d)
    kg = k.transpose(0, 2, 3, 1)                                   # (b, hk, d, sk)
    logit = np.abs(np.matmul(qg, kg)).max()
    rss = np.sqrt(np.matmul(qg * qg, kg * kg).max())
    return float(scale * max(logit, rss))


def dtype_floor(dtype_name, exact):
    """2 * max |(exact + 0.3) - 0.3 - exact| with the arithmetic in the input dtype
    (``"tf32"``: float32 arithmetic rounded to tf32 after each step)."""
    finite = exact[np.isfinite(exact)]
    if finite.size == 0:
        return 0.0
    if dtype_name == "tf32":
        from reference import tf32_round
        dt, rnd = np.float32, tf32_round
    else:
        from strategies import DTYPES
        dt, rnd = DTYPES[dtype_name], lambda x: x
    c = rnd(np.asarray(0.3, dt))
    shifted = rnd((rnd(finite.astype(dt)) + c).astype(dt))
    back = rnd((shifted - c).astype(dt)).astype(np.float64)
    return 2.0 * float(np.max(np.abs(back - finite)))


def atol(dtype_name, exact, n, logit=0.0, magnitude=None):
    size = exact if magnitude is None else np.asarray(magnitude, dtype=np.float64)
    scale = max(1.0, float(np.max(np.abs(size[np.isfinite(size)]), initial=0.0)))
    summation = 4 * ACCUMULATOR_EPS[dtype_name] * math.sqrt(max(n, 1)) * max(1.0, logit) * scale
    return summation + dtype_floor(dtype_name, exact)


def assert_accurate(name, got, exact, naive, dtype_name, n, logit=0.0, magnitude=None):
    """Checks one output against the rule; -inf must match -inf exactly (lse of rows
    that see no key), and every element must have been written (no NaN)."""
    got = to_numpy64(got)
    exact = np.asarray(exact, dtype=np.float64)
    naive = to_numpy64(naive)
    assert got.shape == exact.shape, f"{name}: shape {got.shape} != {exact.shape}"
    assert not np.isnan(got).any(), f"{name}: {np.isnan(got).sum()} NaN (unwritten or bad)"
    inf = np.isinf(exact)
    assert np.array_equal(got[inf], exact[inf]), f"{name}: infinities differ"
    assert np.isfinite(got[~inf]).all(), f"{name}: inf where exact is finite"
    err = float(np.max(np.abs(got[~inf] - exact[~inf]), initial=0.0))
    naive_err = float(np.max(np.abs(naive[~inf] - exact[~inf]), initial=0.0))
    tol = atol(dtype_name, exact, n, logit, magnitude)
    assert err <= 2 * naive_err + tol, (f"{name}: max error {err:.3g} > 2 * naive error "
                                        f"{naive_err:.3g} + atol {tol:.3g}")
