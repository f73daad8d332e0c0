"""Tests of the NumPy reference (reference/attention.py, reference/tiled.py).

CPU only, numpy + hypothesis + pytest.
"""

import math
import warnings

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import ml_dtypes

from reference import (
    attention,
    attention_backward,
    causal_mask,
    flash_backward,
    flash_forward,
    key_tile_range,
    naive_attention,
    naive_attention_backward,
    query_tile_range,
)

seeds = st.integers(0, 2**32 - 1)


def make_inputs(seed, b, sq, sk, h, hk, d, dtype=np.float64):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, sq, h, d)).astype(dtype)
    k = rng.standard_normal((b, sk, hk, d)).astype(dtype)
    v = rng.standard_normal((b, sk, hk, d)).astype(dtype)
    do = rng.standard_normal((b, sq, h, d)).astype(dtype)
    return q, k, v, do


def textbook_attention(q, k, v, causal, scale):
    """Per-row loops, straight from the definition (independent of the reference)."""
    b_, sq, h_, d = q.shape
    sk, hk_ = k.shape[1], k.shape[2]
    group = h_ // hk_
    out = np.zeros(q.shape)
    lse = np.zeros((b_, h_, sq))
    for b in range(b_):
        for h in range(h_):
            g = h // group
            for i in range(sq):
                keys = [j for j in range(sk) if not causal or j <= i + sk - sq]
                if not keys:
                    lse[b, h, i] = -math.inf
                    continue
                logits = [scale * float(np.dot(q[b, i, h], k[b, j, g])) for j in keys]
                mx = max(logits)
                w = [math.exp(x - mx) for x in logits]
                tot = sum(w)
                lse[b, h, i] = mx + math.log(tot)
                for wj, j in zip(w, keys):
                    out[b, i, h] += (wj / tot) * v[b, j, g]
    return out, lse


def rel_err(a, b):
    den = np.max(np.abs(b))
    return np.max(np.abs(a - b)) / (den if den > 0 else 1.0)


# --------------------------------------------------------------------------
# exact reference
# --------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(seed=seeds, b=st.integers(1, 2), sq=st.integers(1, 9), sk=st.integers(1, 9),
       hk=st.integers(1, 2), group=st.integers(1, 3), d=st.integers(1, 8),
       causal=st.booleans(), scale=st.one_of(st.none(), st.floats(0.05, 2.0)))
def test_attention_matches_textbook(seed, b, sq, sk, hk, group, d, causal, scale):
    q, k, v, _ = make_inputs(seed, b, sq, sk, hk * group, hk, d)
    out, lse = attention(q, k, v, causal=causal, softmax_scale=scale)
    s = 1.0 / math.sqrt(d) if scale is None else scale
    out_t, lse_t = textbook_attention(q, k, v, causal, s)
    assert out.shape == q.shape and out.dtype == np.float64
    assert lse.shape == (b, hk * group, sq) and lse.dtype == np.float64
    np.testing.assert_allclose(out, out_t, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(lse_t))
    fin = np.isfinite(lse_t)
    np.testing.assert_allclose(lse[fin], lse_t[fin], rtol=1e-12, atol=1e-12)


def test_causal_mask_examples():
    np.testing.assert_array_equal(
        causal_mask(2, 5).astype(int), [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(
        causal_mask(5, 2).astype(int), [[0, 0], [0, 0], [0, 0], [1, 0], [1, 1]])
    np.testing.assert_array_equal(causal_mask(3, 3), np.tril(np.ones((3, 3), bool)))


@pytest.mark.parametrize("fn", ["exact", "naive64", "naive16", "tiled"])
def test_fully_masked_rows(fn):
    q, k, v, do = make_inputs(7, 2, 5, 2, 4, 2, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(all="raise"):
            if fn == "exact":
                out, lse = attention(q, k, v, causal=True)
                grads = attention_backward(do, q, k, v, causal=True)
            elif fn == "naive64":
                out, lse = naive_attention(q, k, v, causal=True)
                grads = naive_attention_backward(do, q, k, v, causal=True)
            elif fn == "naive16":
                args = [x.astype(np.float16) for x in (q, k, v)]
                out, lse = naive_attention(*args, causal=True)
                grads = naive_attention_backward(do.astype(np.float16), *args, causal=True)
            else:
                out, lse = flash_forward(q, k, v, causal=True, block_m=2, block_n=16)
                grads = flash_backward(do, q, k, v, out, lse, causal=True,
                                       block_m=2, block_n=16)
    out, lse = np.asarray(out, np.float64), np.asarray(lse, np.float64)
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    assert np.all(out[:, :3] == 0)
    assert np.all(np.isneginf(lse[:, :, :3]))
    assert np.all(np.isfinite(lse[:, :, 3:]))
    # row 3 sees only key 0: output equals v[key 0] of the group's kv head
    np.testing.assert_allclose(out[:, 3], np.repeat(v[:, 0], 2, axis=1).astype(out.dtype),
                               rtol=1e-3)
    dq = np.asarray(grads[0], np.float64)
    for g in grads:
        assert not np.isnan(np.asarray(g, np.float64)).any()
    assert np.all(dq[:, :3] == 0)


@settings(max_examples=20, deadline=None)
@given(seed=seeds, sq=st.integers(1, 8), sk=st.integers(1, 8), hk=st.integers(1, 2),
       group=st.integers(2, 3), d=st.integers(1, 6), causal=st.booleans())
def test_gqa_equals_repeated_kv(seed, sq, sk, hk, group, d, causal):
    h = hk * group
    q, k, v, do = make_inputs(seed, 2, sq, sk, h, hk, d)
    kr, vr = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    out, lse = attention(q, k, v, causal=causal)
    out_r, lse_r = attention(q, kr, vr, causal=causal)
    np.testing.assert_array_equal(out, out_r)
    np.testing.assert_array_equal(lse, lse_r)
    dq, dk, dv = attention_backward(do, q, k, v, causal=causal)
    dq_r, dk_r, dv_r = attention_backward(do, q, kr, vr, causal=causal)
    assert dk.shape == k.shape and dv.shape == v.shape
    np.testing.assert_allclose(dq, dq_r, rtol=1e-13, atol=1e-13)
    b = dk_r.shape[0]
    np.testing.assert_allclose(dk, dk_r.reshape(b, sk, hk, group, d).sum(3),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dv, dv_r.reshape(b, sk, hk, group, d).sum(3),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(1, 3, 4, 2, 1, 3), (2, 4, 3, 3, 3, 2),
                                   (1, 5, 2, 4, 2, 3), (1, 2, 5, 2, 2, 4)])
def test_backward_finite_differences(shape, causal):
    b, sq, sk, h, hk, d = shape
    q, k, v, do = make_inputs(1234 + sq * 7 + sk, b, sq, sk, h, hk, d)
    scale = 0.7

    def loss(q_, k_, v_):
        return np.sum(attention(q_, k_, v_, causal=causal, softmax_scale=scale)[0] * do)

    grads = attention_backward(do, q, k, v, causal=causal, softmax_scale=scale)
    eps = 1e-5
    for idx, (x, g) in enumerate(zip((q, k, v), grads)):
        assert g.shape == x.shape
        num = np.zeros_like(x)
        for pos in np.ndindex(x.shape):
            args = [q, k, v]
            xp, xm = x.copy(), x.copy()
            xp[pos] += eps
            xm[pos] -= eps
            args[idx] = xp
            fp = loss(*args)
            args[idx] = xm
            fm = loss(*args)
            num[pos] = (fp - fm) / (2 * eps)
        err = np.linalg.norm(num - g) / np.linalg.norm(num)
        assert err < 1e-6, (idx, err)


@settings(max_examples=20, deadline=None)
@given(seed=seeds, sq=st.integers(1, 12), sk=st.integers(1, 12), d=st.integers(1, 16),
       causal=st.booleans(), scale=st.floats(0.1, 3.0))
def test_lse_is_logsumexp_of_scaled_logits(seed, sq, sk, d, causal, scale):
    q, k, v, _ = make_inputs(seed, 1, sq, sk, 2, 1, d)
    _, lse = attention(q, k, v, causal=causal, softmax_scale=scale)
    logits = scale * np.einsum("bihd,bjd->bhij", q, k[:, :, 0])
    mask = causal_mask(sq, sk) if causal else np.ones((sq, sk), bool)
    with np.errstate(divide="ignore"):
        direct = np.log(np.sum(np.where(mask, np.exp(logits), 0.0), axis=-1))
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(direct))
    fin = np.isfinite(direct)
    np.testing.assert_allclose(lse[fin], direct[fin], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32])
def test_exact_accepts_low_precision_inputs(dtype):
    q, k, v, do = make_inputs(3, 1, 6, 7, 2, 1, 8, dtype)
    out, lse = attention(q, k, v, causal=True)
    assert out.dtype == np.float64 and lse.dtype == np.float64
    up = [x.astype(np.float64) for x in (q, k, v)]
    out64, lse64 = attention(*up, causal=True)
    # float64 inputs take the extended-precision path, whose logits can differ in
    # the last bit from the float64 sums of these exact products.
    np.testing.assert_allclose(out, out64, rtol=0, atol=1e-14)
    np.testing.assert_allclose(lse, lse64, rtol=0, atol=1e-14)
    grads = attention_backward(do, q, k, v, causal=True)
    assert all(g.dtype == np.float64 for g in grads)


def test_float64_logits_are_correctly_rounded():
    """A float64 dot product whose terms cancel (found by the GPU's long hypothesis
    run: 33 terms summing to 108 in size, logit 0.85) is exact to its last bit,
    where a float64 BLAS sum was 4e-15 off and made naive attention look exact."""
    from fractions import Fraction
    rng = np.random.default_rng(11572802)
    q = rng.standard_normal((1, 1, 1, 33)) * 3.0
    k = rng.standard_normal((1, 1, 1, 33)) * 3.0
    v = rng.standard_normal((1, 1, 1, 33))
    _, lse = attention(q, k, v, softmax_scale=0.5)
    true = sum(Fraction(a) * Fraction(b) for a, b in zip(q.ravel(), k.ravel())) / 2
    assert lse.ravel()[0] == float(true)


# --------------------------------------------------------------------------
# tiled FlashAttention-2
# --------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(seed=seeds, b=st.integers(1, 2), sq=st.integers(1, 70), sk=st.integers(1, 70),
       hk=st.integers(1, 2), group=st.integers(1, 3), d=st.integers(1, 40),
       block_m=st.sampled_from([16, 32, 64]), block_n=st.sampled_from([16, 32, 64]),
       causal=st.booleans(), scale=st.one_of(st.none(), st.floats(0.05, 2.0)))
# multi-tile cases with partial last tiles on both axes, both causal regimes
@example(seed=1, b=2, sq=70, sk=37, hk=2, group=3, d=40, block_m=16, block_n=16,
         causal=True, scale=None)
@example(seed=2, b=1, sq=37, sk=70, hk=1, group=2, d=17, block_m=32, block_n=16,
         causal=True, scale=0.3)
@example(seed=3, b=1, sq=69, sk=65, hk=2, group=1, d=33, block_m=16, block_n=64,
         causal=False, scale=1.5)
def test_tiled_matches_exact(seed, b, sq, sk, hk, group, d, block_m, block_n, causal, scale):
    q, k, v, do = make_inputs(seed, b, sq, sk, hk * group, hk, d)
    out, lse = flash_forward(q, k, v, causal=causal, softmax_scale=scale,
                             block_m=block_m, block_n=block_n)
    out_e, lse_e = attention(q, k, v, causal=causal, softmax_scale=scale)
    assert out.shape == out_e.shape and lse.shape == lse_e.shape
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    np.testing.assert_allclose(out, out_e, rtol=1e-10, atol=1e-10)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(lse_e))
    fin = np.isfinite(lse_e)
    np.testing.assert_allclose(lse[fin], lse_e[fin], rtol=1e-10, atol=1e-10)

    grads = flash_backward(do, q, k, v, out, lse, causal=causal, softmax_scale=scale,
                           block_m=block_m, block_n=block_n)
    grads_e = attention_backward(do, q, k, v, causal=causal, softmax_scale=scale)
    for g, ge in zip(grads, grads_e):
        assert g.shape == ge.shape
        np.testing.assert_allclose(g, ge, rtol=1e-10, atol=1e-10)


@settings(max_examples=60, deadline=None)
@given(sq=st.integers(1, 100), sk=st.integers(1, 100),
       block_m=st.sampled_from([1, 3, 16, 32, 64]), block_n=st.sampled_from([1, 5, 16, 64]),
       causal=st.booleans())
def test_tile_ranges_are_tight(sq, sk, block_m, block_n, causal):
    """A tile pair is visited iff it holds at least one visible (i, j) pair."""
    mask = causal_mask(sq, sk) if causal else np.ones((sq, sk), bool)
    n_m, n_n = -(-sq // block_m), -(-sk // block_n)
    has_pair = np.array([[mask[mb * block_m:(mb + 1) * block_m,
                               nb * block_n:(nb + 1) * block_n].any()
                          for nb in range(n_n)] for mb in range(n_m)])
    for mb in range(n_m):
        s, e = key_tile_range(mb, block_m, block_n, sq, sk, causal)
        visited = np.zeros(n_n, bool)
        visited[s:e] = True
        np.testing.assert_array_equal(visited, has_pair[mb])
    for nb in range(n_n):
        s, e = query_tile_range(nb, block_m, block_n, sq, sk, causal)
        visited = np.zeros(n_m, bool)
        visited[s:e] = True
        np.testing.assert_array_equal(visited, has_pair[:, nb])


# --------------------------------------------------------------------------
# naive same-precision baseline
# --------------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(seed=seeds, sq=st.integers(1, 20), sk=st.integers(1, 20), hk=st.integers(1, 2),
       group=st.integers(1, 2), d=st.integers(1, 24), causal=st.booleans())
def test_naive_float64_equals_exact(seed, sq, sk, hk, group, d, causal):
    q, k, v, do = make_inputs(seed, 2, sq, sk, hk * group, hk, d)
    out, lse = naive_attention(q, k, v, causal=causal)
    out_e, lse_e = attention(q, k, v, causal=causal)
    assert out.dtype == np.float64 and lse.dtype == np.float64
    np.testing.assert_allclose(out, out_e, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(lse_e))
    fin = np.isfinite(lse_e)
    np.testing.assert_allclose(lse[fin], lse_e[fin], rtol=1e-12, atol=1e-12)
    grads = naive_attention_backward(do, q, k, v, causal=causal)
    grads_e = attention_backward(do, q, k, v, causal=causal)
    for g, ge in zip(grads, grads_e):
        assert g.dtype == np.float64 and g.shape == ge.shape
        np.testing.assert_allclose(g, ge, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_naive_low_precision_error_order(dtype, causal):
    q, k, v, do = make_inputs(11, 2, 33, 40, 4, 2, 32, dtype)
    out, lse = naive_attention(q, k, v, causal=causal)
    assert out.dtype == np.dtype(dtype) and out.shape == q.shape
    assert lse.dtype == np.float32 and lse.shape == (2, 4, 33)
    out_e, lse_e = attention(q, k, v, causal=causal)      # exact on the same rounded inputs
    err = np.max(np.abs(out.astype(np.float64) - out_e))
    lse_err = np.max(np.abs(lse.astype(np.float64) - lse_e))
    if dtype == np.float32:
        assert err < 1e-5 and lse_err < 1e-5
    else:
        assert 0 < err < 5e-2
        assert 0 < lse_err < 5e-2

    grads = naive_attention_backward(do, q, k, v, causal=causal)
    grads_e = attention_backward(do, q, k, v, causal=causal)
    for g, ge in zip(grads, grads_e):
        assert g.dtype == np.dtype(dtype) and g.shape == ge.shape
        assert not np.isnan(g.astype(np.float64)).any()
        e = rel_err(g.astype(np.float64), ge)
        if dtype == np.float32:
            assert e < 1e-5
        else:
            assert 0 < e < 5e-2


def test_naive_bfloat16_worse_than_float16():
    """bfloat16 has 3 fewer mantissa bits than float16: its baseline error is larger."""
    q, k, v, _ = make_inputs(5, 2, 48, 48, 4, 4, 32)
    errs = {}
    for dt in (np.float16, ml_dtypes.bfloat16):
        args = [x.astype(dt) for x in (q, k, v)]
        out, _ = naive_attention(*args)
        out_e, _ = attention(*args)
        errs[dt] = np.max(np.abs(out.astype(np.float64) - out_e))
    assert errs[ml_dtypes.bfloat16] > 2 * errs[np.float16]
