"""Reliability tests: gradient check, edge semantics, NaN propagation, determinism,
streams and threads, resource hygiene, huge shapes.

Tests marked with ``MODE`` run under the CUDA simulator (at tiny sizes) and on a GPU
(at small sizes); tests marked ``gpu`` only on a GPU. ``NBFLASH_LONG=1`` makes the
thread and hygiene tests run 1000 and 10,000 iterations instead of 50 and 500.
The huge-shape tests are also marked ``slow``:

    python3 -m pytest tests/test_reliability.py -m "gpu and not slow" -q
    python3 -m pytest tests/test_reliability.py -m "gpu and slow" -q

Measurements (dq run-to-run differences, call times on a busy stream, thread and
hygiene counts, NaN leaks) are printed and appended to $NBFLASH_REPORT (default
$OUT/reliability.txt when $OUT is set).

Sanitizers and first-call latency are scripts in ``tests/gpu/``.

NaN semantics, as the kernels implement them (checked in the simulator, which runs
the same kernel source, and on the GPU). float32/float64 run the SIMT kernels, float16/bfloat16
the tensor-core ones. For a row i of q, a row j of k or v:

* NaN in q row i changes out row i and lse i only (and dq row i): they come out
  NaN. The running max is NaN-sticky, so a row whose only visible keys have NaN
  scores is NaN too, not taken for a row that sees no key.
* NaN in k row j: out rows that see key j become NaN, the others are unchanged;
  lse of those rows is NaN as well (-inf is written only when the softmax
  denominator is exactly 0), so the backward gives them NaN gradients rather than
  treating them as rows that see no key.
* NaN in v row j: out rows that see key j become NaN, and so do rows that do not
  see it but belong to a query tile that loads j's key tile (0 * NaN = NaN in P V,
  as in FlashAttention), including rows that see no key at all, whose output is
  otherwise 0. Rows of query tiles that never load j's tile are unchanged; lse and
  dv are unchanged (they do not depend on v).
* inf in one element of q row i changes only row i.
"""
import gc
import itertools
import json
import math
import os
import pathlib
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest

import nbflash
import reference
from conftest import SIMULATOR
from nbflash import _launch, block_info, config, interface
from strategies import DTYPES
from tolerance import assert_accurate, max_abs_logit, to_numpy64

xp = interface.xp
MODE = pytest.mark.simulator if SIMULATOR else pytest.mark.gpu
LONG = os.environ.get("NBFLASH_LONG", "0") not in ("", "0")
ROOT = pathlib.Path(__file__).resolve().parents[1]
ALL_DTYPES = list(DTYPES)
# The simulator runs the tensor-core (float16/bfloat16) kernels slowly: there,
# bfloat16 (which differs from float16 only in conversions) is left out.
SIM_DTYPES = [d for d in ALL_DTYPES if not (SIMULATOR and d == "bfloat16")]


# ------------------------------------------------------------------ helpers

def _rng(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _randn(rng, shape, dtype_name="float64", scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(DTYPES[dtype_name])


def _problem(rng, sq, sk, h, hk, d, dtype_name, scale=1.0):
    """Host q, k, v, dout in the dtype (float64 values exactly representable)."""
    q = _randn(rng, (1, sq, h, d), dtype_name, scale)
    k = _randn(rng, (1, sk, hk, d), dtype_name, scale)
    v = _randn(rng, (1, sk, hk, d), dtype_name, scale)
    do = _randn(rng, (1, sq, h, d), dtype_name)
    return q, k, v, do


def _dev(*arrays):
    return [xp.asarray(a) for a in arrays]


def _fwd_bwd(q, k, v, do, **kw):
    """nbflash forward and backward on host arrays; returns device arrays."""
    dq_, dk_, dv_, ddo = _dev(q, k, v, do)
    out, lse = nbflash.attention(dq_, dk_, dv_, return_lse=True, **kw)
    grads = nbflash.attention_backward(ddo, dq_, dk_, dv_, out, lse, **kw)
    return (out, lse) + tuple(grads)


def _host(x):
    """A device or host array as a host array in its own dtype."""
    return np.asarray(x.get() if hasattr(x, "get") else x)


def _bits(x):
    """The raw bytes of an array, for bitwise comparison."""
    return np.ascontiguousarray(_host(x)).view(np.uint8)


def _same_bits(a, b):
    return np.array_equal(_bits(a), _bits(b))


def _rounding_noise(x):
    """2 * max |(x + 0.3) - 0.3 - x| in x's dtype: FlashAttention's test bound for
    results that may differ by their summation order (dq, with atomics)."""
    h = _host(x)
    dt = h.dtype
    t = dt.type(0.3)
    rounded = ((h + t).astype(dt) - t).astype(dt)
    return 2 * float(np.max(np.abs(rounded.astype(np.float64) - h.astype(np.float64)),
                            initial=0.0))


def _dq_summation_bound(q, k, v, do, out, lse, causal, dtype):
    """Elementwise bound on how far two summation orders of dq's float atomics can
    differ: 2 (n - 1) eps scale (|dS| |K|), n = key tiles adding into an element
    (at most ceil(seqlen_k / 16): every tile has 16 keys or more), eps the
    accumulator's (float64 for float64, else float32), dS exact from nbflash's out and lse. A lost or doubled atomic
    add would exceed it by orders of magnitude."""
    q, k, v, do, out, lse = (to_numpy64(x) for x in (q, k, v, do, out, lse))
    b, sq, h, d = q.shape
    sk, group = k.shape[1], h // k.shape[2]
    scale = 1.0 / math.sqrt(d)
    qh = q.transpose(0, 2, 1, 3)
    kh = np.repeat(k, group, axis=2).transpose(0, 2, 1, 3)
    vh = np.repeat(v, group, axis=2).transpose(0, 2, 1, 3)
    doh, oh = do.transpose(0, 2, 1, 3), out.transpose(0, 2, 1, 3)
    s = np.matmul(qh, kh.transpose(0, 1, 3, 2)) * scale
    if causal:
        s = np.where(reference.causal_mask(sq, sk), s, -np.inf)
    with np.errstate(invalid="ignore"):
        p = np.where(np.isfinite(lse)[..., None], np.exp(s - lse[..., None]), 0.0)
    ds = p * (np.matmul(doh, vh.transpose(0, 1, 3, 2)) - (doh * oh).sum(-1)[..., None])
    conditioned = scale * np.matmul(np.abs(ds), np.abs(kh)).transpose(0, 2, 1, 3)
    eps = np.finfo(np.float64 if np.dtype(dtype).name == "float64" else np.float32).eps
    n = -(-sk // 16)
    return 2 * (n - 1) * eps * conditioned


def _dq_tolerance(dq, q, k, v, do, out, lse, causal):
    """Elementwise: how far dq may move between runs (or with changes elsewhere that
    only reorder its atomics): FlashAttention's bound or the summation bound."""
    return np.maximum(_rounding_noise(dq),
                      _dq_summation_bound(q, k, v, do, out, lse, causal, _host(dq).dtype))


def _report(capsys, msg):
    """Prints a measurement past pytest's capture, and appends it to the file
    $NBFLASH_REPORT (default $OUT/reliability.txt when $OUT is set): pytest-xdist
    workers' prints do not reach the terminal."""
    with capsys.disabled():
        print(f"\n[reliability] {msg}", flush=True)
    path = os.environ.get("NBFLASH_REPORT") or (
        os.path.join(os.environ["OUT"], "reliability.txt") if os.environ.get("OUT") else None)
    if path:
        with open(path, "a") as f:
            f.write(msg + "\n")


def _sync():
    if not SIMULATOR:
        import cupy
        cupy.cuda.Device().synchronize()


# ------------------------------------------------------------------ 2. gradient check

def _loss(q, k, v, do, causal, scale):
    out = nbflash.attention(*_dev(q, k, v), causal=causal, softmax_scale=scale)
    return float(np.sum(to_numpy64(out) * do))


FD_STEP = 1e-5

# (seqlen_q, seqlen_k, nheads, nheads_k, headdim, causal, softmax_scale)
GRAD_COORD_CASES = [
    (5, 7, 1, 1, 2, False, None),
    (7, 4, 2, 1, 2, True, None),          # GQA; causal with 3 rows that see no key
    (4, 6, 2, 1, 2, True, 0.7),           # causal, seqlen_q < seqlen_k
]
GRAD_DIR_CASES = [
    (21, 19, 2, 1, 4, True, None),        # several tiles in the simulator (16 x 16)
    (18, 35, 1, 1, 3, False, 1.3),
]
if not SIMULATOR:
    GRAD_COORD_CASES += [(67, 67, 2, 1, 5, True, None), (40, 130, 4, 2, 3, False, None)]
    GRAD_DIR_CASES += [(70, 133, 4, 2, 17, True, None), (129, 65, 2, 1, 80, False, None),
                       (200, 77, 3, 1, 33, True, 0.5)]


@MODE
@pytest.mark.parametrize("case", GRAD_COORD_CASES, ids=str)
def test_gradient_matches_central_differences(case):
    """Every partial derivative of sum(attention(q, k, v) * dout), float64, against
    central differences through nbflash's own forward."""
    sq, sk, h, hk, d, causal, scale = case
    q, k, v, do = _problem(_rng("fd", case), sq, sk, h, hk, d, "float64")
    _, _, dq, dk, dv = _fwd_bwd(q, k, v, do, causal=causal, softmax_scale=scale)
    worst = 0.0
    for name, x, g in (("q", q, dq), ("k", k, dk), ("v", v, dv)):
        g = to_numpy64(g)
        fd = np.empty_like(x)
        flat, fdf = x.reshape(-1), fd.reshape(-1)
        for i in range(flat.size):
            x0 = flat[i]
            flat[i] = x0 + FD_STEP
            f_plus = _loss(q, k, v, do, causal, scale)
            flat[i] = x0 - FD_STEP
            f_minus = _loss(q, k, v, do, causal, scale)
            flat[i] = x0
            fdf[i] = (f_plus - f_minus) / (2 * FD_STEP)
        rel = float(np.max(np.abs(fd - g)) / max(np.max(np.abs(g)), 1e-300))
        worst = max(worst, rel)
        assert rel < 1e-6, f"d{name}: relative error {rel:.3g} against finite differences"
    assert worst < 1e-6


@MODE
@pytest.mark.parametrize("case", GRAD_DIR_CASES, ids=str)
def test_gradient_matches_directional_differences(case):
    """<grad, u> against (f(x + h u) - f(x - h u)) / 2h for random directions u of
    q, k and v together: checks every element at sizes with several tiles."""
    sq, sk, h, hk, d, causal, scale = case
    rng = _rng("dir", case)
    q, k, v, do = _problem(rng, sq, sk, h, hk, d, "float64")
    _, _, dq, dk, dv = _fwd_bwd(q, k, v, do, causal=causal, softmax_scale=scale)
    grads = [to_numpy64(g) for g in (dq, dk, dv)]
    for trial in range(4):
        u = [rng.standard_normal(x.shape) for x in (q, k, v)]
        plus = [x + FD_STEP * w for x, w in zip((q, k, v), u)]
        minus = [x - FD_STEP * w for x, w in zip((q, k, v), u)]
        fd = (_loss(*plus, do, causal, scale) - _loss(*minus, do, causal, scale)) / (2 * FD_STEP)
        dot = sum(float(np.sum(g * w)) for g, w in zip(grads, u))
        size = sum(float(np.sum(np.abs(g * w))) for g, w in zip(grads, u))
        rel = abs(fd - dot) / size
        assert rel < 1e-6, f"direction {trial}: relative error {rel:.3g} ({fd!r} vs {dot!r})"


# ------------------------------------------------------------------ 3. edge semantics

EMPTY_SHAPE = (37, 20, 2, 1, 8) if SIMULATOR else (203, 77, 4, 2, 64)


@MODE
@pytest.mark.parametrize("dtype_name", SIM_DTYPES)
def test_rows_without_keys(poison, dtype_name):
    """causal, seqlen_q > seqlen_k: the first seqlen_q - seqlen_k rows see no key.
    Their out is 0, lse -inf, dq 0, and what they hold (q, dout) does not change
    dk, dv or any other row. The sizes put such rows and ordinary rows in one tile."""
    sq, sk, h, hk, d = EMPTY_SHAPE
    n_empty = sq - sk
    rng = _rng("empty", dtype_name)
    q, k, v, do = _problem(rng, sq, sk, h, hk, d, dtype_name)
    out, lse, dq, dk, dv = _fwd_bwd(q, k, v, do, causal=True)
    out_h, lse_h, dq_h = to_numpy64(out), to_numpy64(lse), to_numpy64(dq)
    assert np.all(out_h[:, :n_empty] == 0)
    assert np.all(lse_h[:, :, :n_empty] == -np.inf)
    assert np.all(dq_h[:, :n_empty] == 0)
    assert np.isfinite(lse_h[:, :, n_empty:]).all()

    # Other values (larger, too) in the rows that see no key: nothing else changes.
    q2, do2 = q.copy(), do.copy()
    q2[:, :n_empty] = _randn(rng, q2[:, :n_empty].shape, dtype_name, 30.0)
    do2[:, :n_empty] = _randn(rng, do2[:, :n_empty].shape, dtype_name, 30.0)
    out2, lse2, dq2, dk2, dv2 = _fwd_bwd(q2, k, v, do2, causal=True)
    assert np.array_equal(to_numpy64(out2), out_h)
    assert np.array_equal(to_numpy64(lse2), lse_h)
    assert np.array_equal(to_numpy64(dk2), to_numpy64(dk))
    assert np.array_equal(to_numpy64(dv2), to_numpy64(dv))
    assert np.all(to_numpy64(dq2)[:, :n_empty] == 0)
    # dq is summed with atomics: same values up to the order of summation.
    tol = _dq_tolerance(dq, q, k, v, do, out, lse, True)
    assert np.all(np.abs(to_numpy64(dq2) - dq_h) <= tol)

    # And dk, dv are right.
    exact = reference.attention_backward(do, q, k, v, causal=True, out=out_h, lse=lse_h)
    naive = reference.naive_attention_backward(do, q, k, v, causal=True)
    n = max(sq * (h // hk), sk, d)
    logit = max_abs_logit(q, k, None)
    for name, got, e, nv in zip(("dq", "dk", "dv"), (dq, dk, dv), exact, naive):
        assert_accurate(name, got, e, nv, dtype_name, n, logit)


def _check_forward_backward(q, k, v, do, dtype_name, causal, scale, naive=None,
                            which=("out", "lse", "dq", "dk", "dv")):
    """Runs nbflash and checks the outputs named in ``which`` against the exact
    reference with the accuracy rule of tolerance.py; ``naive`` (out, lse, dq, dk,
    dv) replaces the naive baseline computed from the inputs."""
    kw = dict(causal=causal, softmax_scale=scale)
    if {"dq", "dk", "dv"} & set(which):
        out, lse, dq, dk, dv = _fwd_bwd(q, k, v, do, **kw)
        exact_grads = reference.attention_backward(do, q, k, v, out=to_numpy64(out),
                                                   lse=to_numpy64(lse), **kw)
    else:
        out, lse = nbflash.attention(*_dev(q, k, v), return_lse=True, **kw)
        dq = dk = dv = None
        exact_grads = (None,) * 3
    exact_out, exact_lse = reference.attention(q, k, v, **kw)
    if naive is None:
        naive = reference.naive_attention(q, k, v, **kw) + (
            reference.naive_attention_backward(do, q, k, v, **kw) if dq is not None
            else (None,) * 3)
    h, hk = q.shape[2], k.shape[2]
    logit = max_abs_logit(q, k, scale)
    n_fwd = max(k.shape[1], q.shape[3])
    n_bwd = max(q.shape[1] * (h // hk), k.shape[1], q.shape[3])
    got = (out, lse, dq, dk, dv)
    exact = (exact_out, exact_lse) + tuple(exact_grads)
    for name, g, e, nv, n in zip(("out", "lse", "dq", "dk", "dv"), got, exact, naive,
                                 (n_fwd, n_fwd, n_bwd, n_bwd, n_bwd)):
        if name not in which:
            continue
        assert not np.isnan(e).any(), f"{name}: the exact answer is NaN; bad test"
        # Finite where exact is, infinities equal (lse of rows that see no key).
        assert_accurate(name, g, e, nv, dtype_name, n, logit)
    return got


LARGE_SHAPE = (33, 33, 1, 1, 1) if SIMULATOR else (300, 300, 2, 1, 1)
LARGE_DTYPES = ["float32", "float16"] if SIMULATOR else ["float32", "float16", "bfloat16"]


@MODE
@pytest.mark.parametrize("dtype_name,causal", [
    (d, c) for d in LARGE_DTYPES for c in (False, True)
    if not (SIMULATOR and d != "float32" and not c)])
def test_large_logits(poison, dtype_name, causal):
    """Scores up to +-1e4 (q, k of magnitude 100, headdim 1, scale 1): finite and
    accurate, forward and backward. float32 as asked; float16 and bfloat16 (which
    hold these inputs) for the tensor-core kernels."""
    sq, sk, h, hk, d = LARGE_SHAPE
    rng = _rng("large", dtype_name, causal)
    dt = DTYPES[dtype_name]
    q = rng.uniform(-100, 100, (1, sq, h, d)).astype(dt)
    k = rng.uniform(-100, 100, (1, sk, hk, d)).astype(dt)
    v = _randn(rng, (1, sk, hk, d), dtype_name)
    do = _randn(rng, (1, sq, h, d), dtype_name)
    assert max_abs_logit(q, k, None) > 5e3
    _check_forward_backward(q, k, v, do, dtype_name, causal, None)


FP16_MAX_SHAPE = (33, 29, 2, 1, 8) if SIMULATOR else (257, 190, 4, 2, 64)


def _fp16_max_problem(causal):
    """q, k, v of magnitude 3e4 to 6.5e4 (float16 max is 65504) and a softmax_scale
    that makes the largest logit 20: q . k is ~1e10, far past float16 but fine in the
    float32 accumulator. The naive float16 baseline overflows on it, so it is taken
    on power-of-two rescaled inputs, which is exact (see below)."""
    sq, sk, h, hk, d = FP16_MAX_SHAPE
    rng = _rng("fp16max", causal)

    def big(shape):
        return (rng.choice([-1.0, 1.0], shape) * rng.uniform(3e4, 65504, shape)).astype(np.float16)

    q, k, v = big((1, sq, h, d)), big((1, sk, hk, d)), big((1, sk, hk, d))
    do = _randn(rng, (1, sq, h, d), "float16")
    scale = 20.0 / max_abs_logit(q, k, 1.0)

    # The naive float16 baseline overflows (q . k ~ 1e10); a user would rescale by
    # powers of two, which is exact: q, k by A (logits kept by softmax_scale / A^2)
    # and v by B. Then out = out' / B, lse = lse', dq = dq' A / B, dk = dk' A / B,
    # dv = dv', with every float16 rounding of the naive computation as it was.
    a, b = 2.0**-12, 2.0**-8

    def pow2(x, f):
        return (x.astype(np.float64) * f).astype(x.dtype)

    qs, ks, vs = pow2(q, a), pow2(k, a), pow2(v, b)
    kw = dict(causal=causal, softmax_scale=scale / a**2)
    n_out, n_lse = reference.naive_attention(qs, ks, vs, **kw)
    n_dq, n_dk, n_dv = reference.naive_attention_backward(do, qs, ks, vs, **kw)
    naive = (to_numpy64(n_out) / b, n_lse, to_numpy64(n_dq) * (a / b),
             to_numpy64(n_dk) * (a / b), n_dv)
    return q, k, v, do, scale, naive


@MODE
@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # the naive baseline's overflow
@pytest.mark.parametrize("causal", [False, True])
def test_float16_inputs_near_float16_max_forward(poison, causal):
    """out and lse finite and accurate (tolerance.py's rule) for float16 inputs near
    float16's max with a small softmax_scale (``_fp16_max_problem``)."""
    q, k, v, do, scale, naive = _fp16_max_problem(causal)
    got = _check_forward_backward(q, k, v, do, "float16", causal, scale, naive,
                                  which=("out", "lse"))
    assert float(np.max(np.abs(to_numpy64(got[0])))) > 1e4   # the outputs are large too


@MODE
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("causal", [False, True])
def test_float16_inputs_near_float16_max_backward(poison, causal):
    """dq, dk, dv finite and accurate for the same problem."""
    q, k, v, do, scale, naive = _fp16_max_problem(causal)
    _check_forward_backward(q, k, v, do, "float16", causal, scale, naive,
                            which=("dq", "dk", "dv"))


SCALE_SHAPE = (20, 23, 2, 1, 8) if SIMULATOR else (150, 133, 4, 2, 64)


@MODE
@pytest.mark.parametrize("softmax_scale", [1e-6, 1e3])
@pytest.mark.parametrize("dtype_name", SIM_DTYPES)
def test_softmax_scale_extremes(poison, dtype_name, softmax_scale):
    """softmax_scale 1e-6 (uniform attention) and 1e3 (one key per row dominates)
    with ordinary inputs: finite, and accurate by the rule of tolerance.py."""
    sq, sk, h, hk, d = SCALE_SHAPE
    rng = _rng("scale", dtype_name, softmax_scale)
    q, k, v, do = _problem(rng, sq, sk, h, hk, d, dtype_name)
    # Both masks on a GPU; one per scale in the (slow) simulator.
    for causal in ((softmax_scale > 1,) if SIMULATOR else (False, True)):
        _check_forward_backward(q, k, v, do, dtype_name, causal, softmax_scale)


# ------------------------------------------------------------------ 3. NaN and inf

NAN_DIM = 8 if SIMULATOR else 64


def _forward_tiles(dtype_name, head_dim):
    """(block_m, block_n) of the forward kernel nbflash runs for this dtype, as
    interface._forward picks it (tensor cores for float16/bfloat16, tf32 tensor cores
    for float32, SIMT for float64; causal or not, the same tiles at head dim 64)."""
    cfg = interface._forward_config(dtype_name, head_dim, causal=False)
    return cfg.block_m, cfg.block_n


def _nan_setup(dtype_name, causal):
    """Two query tiles and two key tiles plus 8 rows, and an index in the second
    tile (not its first row): rows that see it also see a full finite tile first."""
    bm, bn = _forward_tiles(dtype_name, NAN_DIM)
    sq, sk = 2 * bm + 8, 2 * bn + 8
    idx = max(bm, bn) + 4
    rng = _rng("nan", dtype_name, causal, sq, sk)
    q, k, v, do = _problem(rng, sq, sk, 1, 1, NAN_DIM, dtype_name)
    return q, k, v, do, idx


def _sees(i, j, sq, sk, causal):
    return not causal or j <= i + sk - sq


def _rows_loading_key(j, dtype_name, sq, sk, causal):
    """Query rows whose forward thread block loads the key tile that holds key j."""
    bm, bn = _forward_tiles(dtype_name, NAN_DIM)
    rows = np.zeros(sq, bool)
    for m in range((sq + bm - 1) // bm):
        start, end = block_info.key_tile_range(m, bm, bn, sq, sk, causal)
        if start <= j // bn < end:
            rows[m * bm:(m + 1) * bm] = True
    return rows


def _run_quiet(q, k, v, do, causal):
    with np.errstate(all="ignore"):
        return [to_numpy64(x) for x in _fwd_bwd(q, k, v, do, causal=causal)]


NAN_DTYPES = ["float32", "float16"] if SIMULATOR else ALL_DTYPES


def _nan_params(names, *choices):
    """The product of dtypes and choices; under the simulator, whose tensor-core
    (float16) path is slow, float16 only with the first of each choice's values."""
    out = []
    for d in NAN_DTYPES:
        for combo in itertools.product(*choices):
            if SIMULATOR and d != "float32" and any(c != ch[-1] for c, ch in zip(combo, choices)):
                continue
            out.append((d,) + combo)
    return pytest.mark.parametrize(names, out)

# The simulator's threads do the arithmetic, outside pytest's np.errstate.
quiet = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@MODE
@quiet
@_nan_params("dtype_name,causal,value", [False, True], [np.inf, -np.inf, np.nan])
def test_nonfinite_query_changes_only_its_row(dtype_name, causal, value):
    """NaN in q row i (or inf in one element of it) changes out and lse of row i
    only; dq of the other rows is unchanged (up to the atomics' summation order)."""
    q, k, v, do, i = _nan_setup(dtype_name, causal)
    clean = _run_quiet(q, k, v, do, causal)
    bad = q.copy()
    if np.isnan(value):
        bad[0, i, 0, :] = value
    else:
        bad[0, i, 0, 3] = value
    out, lse, dq, dk, dv = _run_quiet(bad, k, v, do, causal)
    others = np.arange(q.shape[1]) != i
    assert np.array_equal(out[:, others], clean[0][:, others])
    assert np.array_equal(lse[:, :, others], clean[1][:, :, others])
    tol = _dq_tolerance(clean[2].astype(q.dtype), q, k, v, do, clean[0], clean[1], causal)
    assert np.isfinite(dq[:, others]).all()
    assert np.all(np.abs(dq[:, others] - clean[2][:, others]) <= tol[:, others])


@MODE
@quiet
@_nan_params("dtype_name,causal", [False, True])
def test_nan_key_reaches_exactly_the_rows_that_see_it(dtype_name, causal):
    """NaN in k row j: out is NaN on every row that sees key j (here each such row
    also sees finite keys in an earlier tile) and unchanged on every other row, lse
    too. (lse of the NaN rows is -inf today: see test_nan_output_rows_have_nan_lse.)"""
    q, k, v, do, j = _nan_setup(dtype_name, causal)
    sq, sk = q.shape[1], k.shape[1]
    clean = _run_quiet(q, k, v, do, causal)
    bad = k.copy()
    bad[0, j, 0, :] = np.nan
    out, lse, *_ = _run_quiet(q, bad, v, do, causal)
    sees = np.array([_sees(i, j, sq, sk, causal) for i in range(sq)])
    assert sees.any() and (causal is False or not sees.all())
    assert np.isnan(out[:, sees]).all()
    assert np.array_equal(out[:, ~sees], clean[0][:, ~sees])
    assert np.array_equal(lse[:, :, ~sees], clean[1][:, :, ~sees])


@MODE
@quiet
@_nan_params("dtype_name,causal", [False, True])
def test_nan_value_row(dtype_name, causal, capsys):
    """NaN in v row j: out is NaN on every row that sees key j; rows of query tiles
    that never load j's key tile are unchanged; lse and dv are unchanged (neither
    depends on v). Rows that do not see j but share a tile with rows that do may
    come out NaN (0 * NaN in P V): allowed, and reported."""
    # (The simulator runs the tensor-core kernels slowly: float16 there does the
    # second case only.)
    for fewer_keys in (10,) if SIMULATOR and dtype_name != "float32" else (0, 10):
        q, k, v, do, j = _nan_setup(dtype_name, causal)
        if fewer_keys:
            # seqlen_q > seqlen_k: with causal the first 10 rows see no key, and
            # their query tile loads key 3's tile.
            k, v, j = k[:, :-fewer_keys], v[:, :-fewer_keys], 3
        sq, sk = q.shape[1], k.shape[1]
        clean = _run_quiet(q, k, v, do, causal)
        bad = v.copy()
        bad[0, j, 0, :] = np.nan
        out, lse, dq, dk, dv = _run_quiet(q, k, bad, do, causal)
        sees = np.array([_sees(i, j, sq, sk, causal) for i in range(sq)])
        loads = _rows_loading_key(j, dtype_name, sq, sk, causal)
        assert np.isnan(out[:, sees]).all()
        assert np.array_equal(out[:, ~loads], clean[0][:, ~loads])
        assert np.array_equal(lse, clean[1])
        assert np.array_equal(dv, clean[4])
        leaked = np.isnan(out).any(axis=(0, 2, 3)) & ~sees
        no_key = np.array([not any(_sees(i, jj, sq, sk, causal) for jj in range(sk))
                           for i in range(sq)])
        _report(capsys, f"NaN in v[{j}] ({dtype_name}, causal={causal}, seqlen_q={sq}, "
                        f"seqlen_k={sk}): {int(sees.sum())} rows see it, "
                        f"{int(leaked.sum())} rows that do not see it are NaN too "
                        f"({int((leaked & no_key).sum())} of them see no key at all)")


@MODE
@quiet
@pytest.mark.parametrize("where", ["q_row", "only_visible_key"])
@pytest.mark.parametrize("dtype_name", [
    d for d in ALL_DTYPES if not (SIMULATOR and d == "bfloat16")])
def test_nan_scores_reach_the_output(dtype_name, where):
    """A row whose scores are NaN has a NaN output row, not 0: a NaN q row; and
    (causal, seqlen_q == seqlen_k) row 0, whose only visible key k[0] is NaN."""
    causal = where == "only_visible_key"
    q, k, v, do, i = _nan_setup(dtype_name, causal)
    if where == "q_row":
        q[0, i, 0, :] = np.nan
    else:
        n = min(q.shape[1], k.shape[1])
        q, do, k, v, i = q[:, :n], do[:, :n], k[:, :n].copy(), v[:, :n], 0
        k[0, 0, 0, :] = np.nan
    out, lse, *_ = _run_quiet(q, k, v, do, causal)
    assert np.isnan(out[0, i]).all(), f"out row {i} is {out[0, i, 0, :4]}..., not NaN"


@MODE
@quiet
@pytest.mark.parametrize("dtype_name", ["float32", "float16"])
def test_nan_output_rows_have_nan_lse(dtype_name):
    q, k, v, do, j = _nan_setup(dtype_name, False)
    k[0, j, 0, :] = np.nan
    out, lse, *_ = _run_quiet(q, k, v, do, False)
    assert np.isnan(out).all()
    assert np.isnan(lse).all(), f"lse is {np.unique(lse)}"


# ------------------------------------------------------------------ 4. determinism

if SIMULATOR:
    DET_SHAPE, DET_RUNS, DET_DTYPES = (1, 20, 2, 1, 8), 2, ["float16", "float32"]
else:
    DET_SHAPE, DET_RUNS, DET_DTYPES = (2, 1024, 8, 8, 64), 20, ALL_DTYPES


#: Backward determinism cases: in the simulator, float16 only with the causal mask.
DET_BACKWARD_CASES = [(d, c) for d in DET_DTYPES for c in (False, True)
                      if not (SIMULATOR and d != "float32" and not c)]


def _det_inputs(dtype_name, causal):
    b, s, h, hk, d = DET_SHAPE
    rng = _rng("det", dtype_name, causal)
    return [xp.asarray(_randn(rng, shape, dtype_name)) for shape in
            ((b, s, h, d), (b, s, hk, d), (b, s, hk, d), (b, s, h, d))]


@MODE
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype_name", DET_DTYPES)
def test_forward_is_bitwise_reproducible(dtype_name, causal):
    q, k, v, _ = _det_inputs(dtype_name, causal)
    out0, lse0 = (_bits(x) for x in nbflash.attention(q, k, v, causal=causal,
                                                      return_lse=True))
    for run in range(1, DET_RUNS):
        out, lse = nbflash.attention(q, k, v, causal=causal, return_lse=True)
        assert np.array_equal(_bits(out), out0), f"out differs on run {run}"
        assert np.array_equal(_bits(lse), lse0), f"lse differs on run {run}"


@MODE
@pytest.mark.parametrize("dtype_name,causal", DET_BACKWARD_CASES)
def test_dk_dv_are_bitwise_reproducible(dtype_name, causal):
    q, k, v, do = _det_inputs(dtype_name, causal)
    out, lse = nbflash.attention(q, k, v, causal=causal, return_lse=True)
    _, dk0, dv0 = (_bits(x) for x in nbflash.attention_backward(do, q, k, v, out, lse,
                                                                 causal=causal))
    for run in range(1, DET_RUNS):
        _, dk, dv = nbflash.attention_backward(do, q, k, v, out, lse, causal=causal)
        assert np.array_equal(_bits(dk), dk0), f"dk differs on run {run}"
        assert np.array_equal(_bits(dv), dv0), f"dv differs on run {run}"


@MODE
@pytest.mark.parametrize("dtype_name,causal", DET_BACKWARD_CASES)
def test_deterministic_backward_is_bitwise_reproducible(dtype_name, causal, capsys):
    """deterministic=True: dq, dk and dv are bitwise identical run to run, and dq
    agrees with the default (atomic) mode's up to rounding noise."""
    q, k, v, do = _det_inputs(dtype_name, causal)
    out, lse = nbflash.attention(q, k, v, causal=causal, return_lse=True)
    first = nbflash.attention_backward(do, q, k, v, out, lse, causal=causal,
                                       deterministic=True)
    bits0 = [_bits(x) for x in first]
    for run in range(1, DET_RUNS):
        grads = nbflash.attention_backward(do, q, k, v, out, lse, causal=causal,
                                           deterministic=True)
        for name, g, b0 in zip(("dq", "dk", "dv"), grads, bits0):
            assert np.array_equal(_bits(g), b0), f"{name} differs on run {run}"
    default = nbflash.attention_backward(do, q, k, v, out, lse, causal=causal)
    for name, g, d in zip(("dk", "dv"), first[1:], default[1:]):
        assert np.array_equal(_bits(g), _bits(d)), f"{name} differs from the default mode"
    diff = np.abs(to_numpy64(first[0]) - to_numpy64(default[0]))
    bound = np.maximum(_rounding_noise(default[0]), _dq_summation_bound(
        q, k, v, do, out, lse, causal, default[0].dtype))
    _report(capsys, f"deterministic dq {dtype_name} causal={causal} shape={DET_SHAPE}: "
                    f"{DET_RUNS} runs bitwise equal; max |dq_det - dq_default| = "
                    f"{float(diff.max()):.3g}")
    assert not (diff > bound).any(), float(diff.max())


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype_name", ["float16", "float32"])
def test_dq_run_to_run_differences_are_rounding_noise(dtype_name, causal, capsys):
    """dq is summed with atomics, so its last bits vary. Over 20 runs (batch 2,
    seqlen 1024, 8 heads, headdim 64) every element's largest difference must be
    rounding noise: within FlashAttention's bound 2 max |(dq + 0.3) - 0.3 - dq| (dq's
    dtype; it covers a last-bit flip of float16 dq) or within the summation-order
    bound of ``_dq_summation_bound`` (float32 dq is the accumulator itself, and a
    reordering of ~16 float32 additions can move it by a few ulps, more than FA's
    bound for the largest elements). Prints what it measures."""
    q, k, v, do = _det_inputs(dtype_name, causal)
    out, lse = nbflash.attention(q, k, v, causal=causal, return_lse=True)
    dq0 = nbflash.attention_backward(do, q, k, v, out, lse, causal=causal)[0]
    ref = to_numpy64(dq0)
    diff = np.zeros_like(ref)
    differing = 0
    for _ in range(1, DET_RUNS):
        dq = to_numpy64(nbflash.attention_backward(do, q, k, v, out, lse, causal=causal)[0])
        diff = np.maximum(diff, np.abs(dq - ref))
        differing = max(differing, int(np.count_nonzero(dq != ref)))
    fa_bound = _rounding_noise(dq0)
    order_bound = _dq_summation_bound(q, k, v, do, out, lse, causal, dq0.dtype)
    worst = float(diff.max())
    outside = diff > np.maximum(fa_bound, order_bound)
    _report(capsys, f"dq {dtype_name} causal={causal} shape={DET_SHAPE}: max |dq_i - dq_0| "
                    f"over {DET_RUNS} runs = {worst:.3g} (at most {differing} of {ref.size} "
                    f"elements differ in a run); FA bound {fa_bound:.3g} "
                    f"({int(np.count_nonzero(diff > fa_bound))} elements above it); "
                    f"max |dq| {np.max(np.abs(ref)):.3g}")
    assert not outside.any(), (f"{int(outside.sum())} elements differ by more than "
                               f"rounding noise, up to {float(diff[outside].max()):.3g}")


# ------------------------------------------------------------------ 5. streams and threads

def _get_kernel_contention(n_threads):
    """get_kernel called for one new key from n threads at once: one build."""
    from nbflash.kernels.backward import build_preprocess
    builds = []
    key = ("reliability-test", time.time_ns())
    barrier = threading.Barrier(n_threads)
    got, errors = [None] * n_threads, []

    def build():
        builds.append(1)
        time.sleep(0.2)          # a slow compile widens the race window
        return build_preprocess("float32")

    def worker(t):
        try:
            barrier.wait()
            got[t] = _launch.get_kernel(key, build, [_launch.array_type(np.float32, 4)] * 2
                                        + [_launch.array_type(np.float32, 3)], 0)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    full_key = key if SIMULATOR else (_launch.cuda.get_current_device().id, key)
    try:
        assert not errors, errors
        assert len(builds) == 1
        assert all(g is got[0] for g in got)
        assert _launch._kernels[full_key] is got[0]
    finally:
        _launch._kernels.pop(full_key, None)


@MODE
def test_get_kernel_builds_once_under_contention():
    _get_kernel_contention(8)


if not SIMULATOR:
    SPIN_SOURCE = r"""
    extern "C" __global__ void spin(unsigned long long ns) {
        unsigned long long start, now;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
        do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now)); } while (now - start < ns);
    }
    """


def _device_bits_differ(cupy, a, b):
    """Number of elements whose bits differ (device scalar, no sync)."""
    u = {2: cupy.uint16, 4: cupy.uint32, 8: cupy.uint64}[a.dtype.itemsize]
    return cupy.count_nonzero(a.view(u) != b.view(u))


def _device_f64(cupy, a):
    if a.dtype.name == "bfloat16":
        return (a.view(cupy.uint16).astype(cupy.uint32) << 16).view(cupy.float32).astype(
            cupy.float64)
    return a.astype(cupy.float64)


@pytest.mark.gpu
def test_calls_are_asynchronous_on_the_current_stream(capsys):
    """On a fresh non-blocking stream busy with a 0.5 s kernel, attention and
    attention_backward return at once (no device-wide or stream sync) with the
    stream still busy, and their results are right once the stream finishes."""
    import cupy
    spin = cupy.RawKernel(SPIN_SOURCE, "spin")
    rng = _rng("stream")
    q, k, v, do = _problem(rng, 300, 257, 4, 2, 64, "float16")
    dq_, dk_, dv_, ddo = _dev(q, k, v, do)
    ref_out, ref_lse = nbflash.attention(dq_, dk_, dv_, causal=True, return_lse=True)
    ref = (ref_out, ref_lse) + nbflash.attention_backward(ddo, dq_, dk_, dv_, ref_out,
                                                          ref_lse, causal=True)
    cupy.cuda.Device().synchronize()
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        # Warm this stream's memory pool so the timed calls do not cudaMalloc.
        o, l = nbflash.attention(dq_, dk_, dv_, causal=True, return_lse=True)
        nbflash.attention_backward(ddo, dq_, dk_, dv_, o, l, causal=True)
        stream.synchronize()
        del o, l
        spin((1,), (1,), (np.uint64(500_000_000),))
        t0 = time.perf_counter()
        out, lse = nbflash.attention(dq_, dk_, dv_, causal=True, return_lse=True)
        t1 = time.perf_counter()
        done_after_forward = stream.done
        grads = nbflash.attention_backward(ddo, dq_, dk_, dv_, out, lse, causal=True)
        t2 = time.perf_counter()
        done_after_backward = stream.done
    _report(capsys, f"stream test: forward call {1e3 * (t1 - t0):.2f} ms, backward call "
                    f"{1e3 * (t2 - t1):.2f} ms while the stream was busy for 500 ms")
    assert not done_after_forward and not done_after_backward
    assert t2 - t0 < 0.25
    stream.synchronize()
    got = (out, lse) + tuple(grads)
    for name, g, r in zip(("out", "lse", "dq", "dk", "dv"), got, ref):
        if name == "dq":
            tol = _dq_tolerance(r, q, k, v, do, ref_out, ref_lse, True)
            assert np.all(np.abs(to_numpy64(g) - to_numpy64(r)) <= tol)
        else:
            assert _same_bits(g, r), name
    exact = reference.attention(q, k, v, causal=True)
    naive = reference.naive_attention(q, k, v, causal=True)
    assert_accurate("out", out, exact[0], naive[0], "float16", 257, max_abs_logit(q, k, None))


THREAD_CONFIGS = [  # dtype, (seqlen_q, seqlen_k, nheads, nheads_k, headdim), causal
    ("float16", (256, 256, 4, 4, 64), True),
    ("bfloat16", (200, 130, 4, 2, 64), False),
    ("float32", (130, 200, 4, 1, 32), True),
    ("float16", (100, 100, 2, 2, 128), False),
]


@pytest.mark.gpu
def test_threads_with_own_streams(capsys):
    """4 Python threads, each with its own CuPy stream and inputs, call attention
    and attention_backward concurrently N times (50; 1000 with NBFLASH_LONG=1). Every
    result must equal the one computed alone beforehand: out, lse, dk, dv bitwise,
    dq within rounding noise."""
    import cupy
    n_iter = 1000 if LONG else 50
    jobs = []
    for t, (dtype_name, (sq, sk, h, hk, d), causal) in enumerate(THREAD_CONFIGS):
        q, k, v, do = _dev(*_problem(_rng("threads", t), sq, sk, h, hk, d, dtype_name))
        out, lse = nbflash.attention(q, k, v, causal=causal, return_lse=True)
        dq, dk, dv = nbflash.attention_backward(do, q, k, v, out, lse, causal=causal)
        tol = _dq_tolerance(dq, q, k, v, do, out, lse, causal)
        jobs.append(dict(inputs=(q, k, v, do), causal=causal, expected=(out, lse, dk, dv),
                         dq=_device_f64(cupy, dq), dq_tol=cupy.asarray(tol)))
    cupy.cuda.Device().synchronize()
    barrier = threading.Barrier(len(jobs))
    results, errors = [None] * len(jobs), []

    def worker(t):
        try:
            job = jobs[t]
            q, k, v, do = job["inputs"]
            stream = cupy.cuda.Stream(non_blocking=True)
            with stream:
                bad = cupy.zeros((), cupy.int64)
                bad_dq = cupy.zeros((), cupy.int64)
                dq_err = cupy.zeros((), cupy.float64)
                barrier.wait()
                for _ in range(n_iter):
                    out, lse = nbflash.attention(q, k, v, causal=job["causal"],
                                                 return_lse=True)
                    dq, dk, dv = nbflash.attention_backward(do, q, k, v, out, lse,
                                                            causal=job["causal"])
                    for got, exp in zip((out, lse, dk, dv), job["expected"]):
                        bad += _device_bits_differ(cupy, got, exp)
                    dq_diff = cupy.abs(_device_f64(cupy, dq) - job["dq"])
                    bad_dq += cupy.count_nonzero(dq_diff > job["dq_tol"])
                    dq_err = cupy.maximum(dq_err, dq_diff.max())
                stream.synchronize()
            results[t] = (int(bad), int(bad_dq), float(dq_err))
        except BaseException as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(len(jobs))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _report(capsys, f"threads: {len(jobs)} x {n_iter} forward+backward in "
                    f"{time.perf_counter() - t0:.1f} s; (out/lse/dk/dv elements differing, "
                    f"dq elements beyond rounding noise, max dq diff) per thread: {results}")
    assert not errors, errors
    for t, (bad, bad_dq, dq_err) in enumerate(results):
        assert bad == 0, f"thread {t}: {bad} elements of out/lse/dk/dv differ"
        assert bad_dq == 0, f"thread {t}: dq differs beyond rounding noise (max {dq_err})"


@pytest.mark.gpu
def test_first_calls_from_threads_compile_each_kernel_once(tmp_path, capsys):
    """A fresh process (empty Numba disk cache) whose first nbflash calls come from
    8 threads at once, 4 per configuration: each kernel is built once, every thread
    gets right results (tests/gpu/first_call_threads.py)."""
    _run_gpu_script("first_call_threads.py", tmp_path, capsys, "first calls from threads", 600)


def _run_gpu_script(script, tmp_path, capsys, label, timeout):
    """Runs tests/gpu/``script`` in a fresh process with an empty Numba disk cache and
    checks the JSON line it prints last: exit status 0 and ``"ok": true``."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"),
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"),
                                           os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(ROOT / "tests/gpu" / script)],
                          env=env, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"no result (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    result = json.loads(lines[-1])
    _report(capsys, f"{label}: {result}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert result["ok"], result


@pytest.mark.gpu
def test_processes_on_a_cold_disk_cache(tmp_path, capsys):
    """6 processes compile 3 kernel configurations (each twice) into one empty disk
    cache at the same moment; a fresh process then loads every one of them from the
    cache and gets accurate results (tests/gpu/cold_cache_processes.py)."""
    _run_gpu_script("cold_cache_processes.py", tmp_path, capsys,
                    "processes on a cold disk cache", 900)


# ------------------------------------------------------------------ 6. resource hygiene

@pytest.mark.gpu
def test_no_growth_over_many_calls(capsys):
    """500 forward+backward calls (10,000 with NBFLASH_LONG=1) leave CuPy's pool, free
    device memory, nbflash's caches and the number of live Python objects where
    the first few calls left them."""
    import cupy
    n_calls = 10_000 if LONG else 500
    pool = cupy.get_default_memory_pool()
    q, k, v, do = _dev(*_problem(_rng("hygiene"), 100, 100, 2, 1, 64, "float16"))

    def call():
        out, lse = nbflash.attention(q, k, v, causal=True, return_lse=True)
        return nbflash.attention_backward(do, q, k, v, out, lse, causal=True)

    def snapshot():
        cupy.cuda.Device().synchronize()
        gc.collect()
        return dict(used=pool.used_bytes(), total=pool.total_bytes(),
                    free=cupy.cuda.runtime.memGetInfo()[0], kernels=len(_launch._kernels),
                    streams=len(_launch._streams), objects=len(gc.get_objects()))

    for _ in range(5):
        call()
    before = snapshot()
    t0 = time.perf_counter()
    for _ in range(n_calls):
        call()
    elapsed = time.perf_counter() - t0
    after = snapshot()
    _report(capsys, f"hygiene: {n_calls} calls in {elapsed:.1f} s; before {before}; "
                    f"after {after}")
    assert after["used"] == before["used"]
    assert after["total"] == before["total"]
    if "PYTEST_XDIST_WORKER" not in os.environ:   # free memory is device-wide
        assert before["free"] - after["free"] <= 2**20
    assert after["kernels"] == before["kernels"] and after["streams"] == before["streams"]
    assert after["objects"] - before["objects"] <= 200


# ------------------------------------------------------------------ 8. huge shapes
#
# On a GPU: tensors of over 2^31 elements. The same code runs in the simulator on a
# miniature problem (``test_huge_*_logic``), which checks the test itself.

HUGE = dict(rows=2**20 + 37, heads=16, dim=128, keys=64, slice=2**15)   # q: 2^31 + 75776
MINI = dict(rows=37, heads=1, dim=8, keys=17, slice=16)


def _fill(shape, seed):
    """float16 standard normal values (made in slices on a GPU, to keep the float32
    temporary small)."""
    if SIMULATOR:
        return np.random.default_rng(seed).standard_normal(shape).astype(np.float16)
    import cupy
    x = cupy.empty(shape, cupy.float16)
    rs = cupy.random.RandomState(seed)
    step = 2**16
    for s in range(0, shape[1], step):
        n = min(step, shape[1] - s)
        x[:, s:s + n] = rs.standard_normal((shape[0], n) + shape[2:], dtype=cupy.float32)
    return x


def _spot_rows(n, heads, dim, rng, count=16):
    """Rows to check: the first, the last, around the middle, both sides of the row
    where the element index passes 2^31, and random ones."""
    boundary = min(2**31 // (heads * dim), n - 1)
    fixed = {0, 1, n // 2, boundary - 1, boundary, n - 37, n - 2, n - 1}
    fixed = sorted(r for r in fixed if 0 <= r < n)
    rest = rng.choice(n, max(count - len(fixed), 0), replace=False)
    return np.unique(np.concatenate([fixed, rest]).astype(np.int64))


def _r16(x):
    """Round to float16 and back (to float64): the naive baseline's roundings."""
    return x.astype(np.float16).astype(np.float64)


def _free_pool():
    if not SIMULATOR:
        import cupy
        cupy.cuda.Device().synchronize()
        cupy.get_default_memory_pool().free_all_blocks()


def _kv_gradients_in_slices(q, k, v, do, out, lse, p):
    """dk, dv exact (float64) and naive (every intermediate rounded to float16, as
    reference.naive_attention_backward does) of non-causal attention over all the
    rows of q, evaluated in slices of rows; exact is the backward as a function of
    nbflash's out and lse, as in test_attention.py."""
    scale = 1.0 / math.sqrt(p["dim"])
    f64 = np.float64
    kt = k[0].astype(f64).transpose(1, 0, 2)            # (H, Sk, D)
    vt = v[0].astype(f64).transpose(1, 0, 2)
    # The naive forward's row statistics need the naive scores; rows are independent.
    dk, dv = xp.zeros_like(kt), xp.zeros_like(vt)
    ndk, ndv = xp.zeros_like(kt), xp.zeros_like(vt)
    for s in range(0, p["rows"], p["slice"]):
        sl = slice(s, min(s + p["slice"], p["rows"]))
        qc = q[0, sl].astype(f64).transpose(1, 0, 2)      # (H, C, D)
        dc = do[0, sl].astype(f64).transpose(1, 0, 2)
        oc = out[0, sl].astype(f64).transpose(1, 0, 2)
        sc = xp.matmul(qc, kt.transpose(0, 2, 1))          # (H, C, Sk), exact q . k
        pe = xp.exp(sc * scale - lse[0, :, sl].astype(f64)[..., None])
        dp = xp.matmul(dc, vt.transpose(0, 2, 1))
        ds = pe * (dp - (dc * oc).sum(axis=-1)[..., None])
        dv += xp.matmul(pe.transpose(0, 2, 1), dc)
        dk += xp.matmul(ds.transpose(0, 2, 1), qc)
        # naive: s = r(q k^T); s = r(s scale); x = r(s - max); e = r(exp x);
        # l = r(sum e); P = r(e / l); O = r(P V); dP = r(dO V^T); Delta = r(sum dO O);
        # dS = r(P r(dP - Delta)); dX = r(dS scale); dK += dX^T Q; dV += P^T dO
        ns = _r16(_r16(sc) * scale)
        e = _r16(xp.exp(_r16(ns - ns.max(axis=-1, keepdims=True))))
        pn = _r16(e / _r16(e.sum(axis=-1, keepdims=True)))
        on = _r16(xp.matmul(pn, vt))
        dpn = _r16(xp.matmul(dc, vt.transpose(0, 2, 1)))
        dsn = _r16(pn * _r16(dpn - _r16((dc * on).sum(axis=-1))[..., None]))
        ndv += xp.matmul(pn.transpose(0, 2, 1), dc)
        ndk += xp.matmul(_r16(dsn * scale).transpose(0, 2, 1), qc)
        del qc, dc, oc, sc, pe, dp, ds, ns, e, pn, on, dpn, dsn
    host = [to_numpy64(x.transpose(1, 0, 2)[None]) for x in (dk * scale, dv, ndk, ndv)]
    return host[:2], [_r16(x) for x in host[2:]]


def _huge_query_case(p, capsys):
    """q, out, dout, dq of (1, rows, heads, dim) float16, k, v of ``keys`` rows, not
    causal; forward and backward. Every output element written (poisoned with NaN
    first); out, lse, dq checked on 16 rows against float64 and the naive float16
    baseline on those rows; dk, dv checked in full against both, evaluated in
    slices of rows."""
    _free_pool()
    shape = (1, p["rows"], p["heads"], p["dim"])
    q, do = _fill(shape, 1), _fill(shape, 2)
    k = _fill((1, p["keys"], p["heads"], p["dim"]), 3)
    v = _fill((1, p["keys"], p["heads"], p["dim"]), 4)
    t0 = time.perf_counter()
    out, lse = nbflash.attention(q, k, v, return_lse=True)
    _sync()
    t1 = time.perf_counter()
    dq, dk, dv = nbflash.attention_backward(do, q, k, v, out, lse)
    _sync()
    t2 = time.perf_counter()
    for name, x in (("out", out), ("lse", lse), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert not bool(xp.isnan(x).any()), f"{name}: NaN (unwritten elements)"

    rows = _spot_rows(p["rows"], p["heads"], p["dim"], np.random.default_rng(5))
    rows_d = xp.asarray(rows)
    qh, doh = _host(q[:, rows_d]), _host(do[:, rows_d])
    kh, vh = _host(k), _host(v)
    out_r, lse_r = _host(out[:, rows_d]), _host(lse[:, :, rows_d])
    logit = max_abs_logit(qh, kh, None)
    n_fwd, n_bwd = max(p["keys"], p["dim"]), max(p["rows"], p["dim"])
    exact_out, exact_lse = reference.attention(qh, kh, vh)
    naive_out, naive_lse = reference.naive_attention(qh, kh, vh)
    assert_accurate("out", out_r, exact_out, naive_out, "float16", n_fwd, logit)
    assert_accurate("lse", lse_r, exact_lse, naive_lse, "float16", n_fwd, logit)
    # dq of a row depends on that row (and all of k, v) only.
    exact_dq = reference.attention_backward(doh, qh, kh, vh, out=to_numpy64(out_r),
                                            lse=to_numpy64(lse_r))[0]
    naive_dq = reference.naive_attention_backward(doh, qh, kh, vh)[0]
    assert_accurate("dq", _host(dq[:, rows_d]), exact_dq, naive_dq, "float16",
                    max(p["keys"], p["dim"]), logit)
    (exact_dk, exact_dv), (naive_dk, naive_dv) = _kv_gradients_in_slices(
        q, k, v, do, out, lse, p)
    full_logit = max(logit, max_abs_logit(_host(q[:, ::97]), kh, None))
    assert_accurate("dk", dk, exact_dk, naive_dk, "float16", n_bwd, full_logit)
    assert_accurate("dv", dv, exact_dv, naive_dv, "float16", n_bwd, full_logit)
    _report(capsys, f"huge q {shape}: forward {t1 - t0:.2f} s, backward {t2 - t1:.2f} s; "
                    f"checked rows {rows.tolist()}")


def _huge_key_case(p, capsys):
    """k, v of (1, rows, heads, dim) float16, q of ``keys`` rows, not causal: forward;
    all rows of out and lse checked against float64 and the naive float16 baseline,
    both evaluated in slices of keys (three passes: row max, row sum, P V)."""
    _free_pool()
    n_q = p["keys"]
    k = _fill((1, p["rows"], p["heads"], p["dim"]), 6)
    v = _fill((1, p["rows"], p["heads"], p["dim"]), 7)
    q = _fill((1, n_q, p["heads"], p["dim"]), 8)
    t0 = time.perf_counter()
    out, lse = nbflash.attention(q, k, v, return_lse=True)
    _sync()
    t1 = time.perf_counter()
    assert not bool(xp.isnan(out).any()) and not bool(xp.isnan(lse).any())

    f64 = np.float64
    scale = 1.0 / math.sqrt(p["dim"])
    qt = q[0].astype(f64).transpose(1, 0, 2)                  # (H, Q, D)
    slices = [slice(s, min(s + p["slice"], p["rows"])) for s in range(0, p["rows"], p["slice"])]

    def scores(sl):
        return xp.matmul(qt, k[0, sl].astype(f64).transpose(1, 2, 0))   # (H, Q, C)

    def values(sl):
        return v[0, sl].astype(f64).transpose(1, 0, 2)                 # (H, C, D)

    m = xp.full((p["heads"], n_q), -np.inf)
    nm = xp.full((p["heads"], n_q), -np.inf)
    for sl in slices:                                           # pass 1: row max
        sc = scores(sl)
        m = xp.maximum(m, (sc * scale).max(axis=-1))
        nm = xp.maximum(nm, _r16(_r16(sc) * scale).max(axis=-1))
    l = xp.zeros((p["heads"], n_q))
    nl = xp.zeros((p["heads"], n_q))
    for sl in slices:                                           # pass 2: row sum
        sc = scores(sl)
        l += xp.exp(sc * scale - m[..., None]).sum(axis=-1)
        nl += _r16(xp.exp(_r16(_r16(_r16(sc) * scale) - nm[..., None]))).sum(axis=-1)
    nl = _r16(nl)
    acc = xp.zeros((p["heads"], n_q, p["dim"]))
    nacc = xp.zeros((p["heads"], n_q, p["dim"]))
    logit = 0.0
    for sl in slices:                                           # pass 3: P V
        sc = scores(sl)
        logit = max(logit, float(xp.abs(sc).max()) * scale)
        vc = values(sl)
        acc += xp.matmul(xp.exp(sc * scale - m[..., None]) / l[..., None], vc)
        e = _r16(xp.exp(_r16(_r16(_r16(sc) * scale) - nm[..., None])))
        nacc += xp.matmul(_r16(e / nl[..., None]), vc)
    exact_out = to_numpy64(acc.transpose(1, 0, 2)[None])
    exact_lse = to_numpy64((m + xp.log(l))[None])
    naive_out = _r16(to_numpy64(nacc.transpose(1, 0, 2)[None]))
    naive_lse = to_numpy64((nm + xp.log(nl))[None]).astype(np.float32)
    assert_accurate("out", out, exact_out, naive_out, "float16", p["rows"], logit)
    assert_accurate("lse", lse, exact_lse, naive_lse, "float16", p["rows"], logit)
    _report(capsys, f"huge k/v {tuple(k.shape)}: forward {t1 - t0:.2f} s")


@pytest.mark.gpu
@pytest.mark.slow
def test_huge_query_tensor(poison, capsys):
    """q, out, dout, dq of (1, 2^20 + 37, 16, 128) float16: over 2^31 elements (4 GiB)
    each; k, v of 64 keys. About 30 GiB of GPU memory at the peak."""
    assert HUGE["rows"] * HUGE["heads"] * HUGE["dim"] > 2**31
    try:
        _huge_query_case(HUGE, capsys)
    finally:
        _free_pool()


@pytest.mark.gpu
@pytest.mark.slow
def test_huge_key_tensor(poison, capsys):
    """k, v of (1, 2^20 + 37, 16, 128) float16 (over 2^31 elements each), q of 64 rows."""
    try:
        _huge_key_case(HUGE, capsys)
    finally:
        _free_pool()


@pytest.mark.simulator
def test_huge_query_logic(poison, capsys):
    """test_huge_query_tensor's checks on a miniature problem (checks the test)."""
    _huge_query_case(MINI, capsys)


@pytest.mark.simulator
def test_huge_key_logic(poison, capsys):
    """test_huge_key_tensor's checks on a miniature problem (checks the test)."""
    _huge_key_case(MINI, capsys)
