"""Property tests: nbflash forward and backward against the exact reference.

Each example draws a fresh problem (shapes, GQA group, causal, scale, memory layout,
input magnitude, seed), runs nbflash with NaN-poisoned outputs, and checks every
output with the accuracy rule of ``tolerance.py``. The same tests run on the GPU
(marker ``gpu``, hypothesis profile ``gpu``: 300 examples per dtype and test) and under
the CUDA simulator at tiny sizes (marker ``simulator``).
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nbflash
import reference
from nbflash import config, interface
from strategies import DTYPES, Case, cases, make_inputs
from tolerance import assert_accurate, max_abs_logit, to_numpy64
from conftest import SIMULATOR

MODE = pytest.mark.simulator if SIMULATOR else pytest.mark.gpu
pytestmark = [MODE]
DTYPE_NAMES = list(DTYPES)
#: On a GPU each test runs once per head-dim bucket of the kernels (the compile work
#: spreads over pytest-xdist workers), sharing the profile's examples per dtype.
HEAD_DIMS = [None] if SIMULATOR else [(1, 32), (33, 64), (65, 96), (97, 128), (129, 256)]
EXAMPLES = settings(max_examples=max(1, settings.default.max_examples // len(HEAD_DIMS)))


def _check_masked_rows(case, out, lse):
    """Rows that see no key (causal, seqlen_q > seqlen_k) give exactly 0 and -inf."""
    if not case.causal or case.seqlen_q <= case.seqlen_k:
        return
    n_empty = case.seqlen_q - case.seqlen_k
    assert np.all(to_numpy64(out)[:, :n_empty] == 0)
    assert np.all(to_numpy64(lse)[:, :, :n_empty] == -np.inf)


@pytest.mark.parametrize("head_dims", HEAD_DIMS, ids=str)
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@EXAMPLES
@given(data=st.data())
def test_forward(poison, dtype_name, head_dims, data):
    _check_forward(dtype_name, data.draw(cases(SIMULATOR, head_dims), label="case"))


@pytest.mark.parametrize("head_dims", HEAD_DIMS, ids=str)
@EXAMPLES
@given(data=st.data())
def test_forward_allow_tf32(poison, head_dims, data):
    """float32 with allow_tf32=True, held to the rule against plain attention whose two
    products take tf32-rounded operands (reference.naive_attention(tf32=True))."""
    _check_forward("float32", data.draw(cases(SIMULATOR, head_dims), label="case"),
                   allow_tf32=True)


def _check_forward(dtype_name, case, allow_tf32=False):
    (q, k, v), (dq, dk, dv) = make_inputs(case, dtype_name, interface.xp)
    out, lse = nbflash.attention(dq, dk, dv, causal=case.causal, allow_tf32=allow_tf32,
                                 softmax_scale=case.softmax_scale, return_lse=True)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.shape == (case.batch, case.nheads, case.seqlen_q)
    assert lse.dtype == (np.float64 if dtype_name == "float64" else np.float32)
    kw = dict(causal=case.causal, softmax_scale=case.softmax_scale)
    exact_out, exact_lse = reference.attention(q, k, v, **kw)
    naive_out, naive_lse = reference.naive_attention(q, k, v, tf32=allow_tf32, **kw)
    n = max(case.seqlen_k, case.head_dim)
    logit = max_abs_logit(q, k, case.softmax_scale)
    rule = "tf32" if allow_tf32 else dtype_name        # tolerance.py: the dtype floor
    assert_accurate("out", out, exact_out, naive_out, rule, n, logit)
    assert_accurate("lse", lse, exact_lse, naive_lse, rule, n, logit)
    _check_masked_rows(case, out, lse)


def _regression(seqlen_q, seqlen_k, group, head_dim, softmax_scale=None):
    # A single key makes dS = P (dP - Delta) cancel exactly: exact dq and dk are 0.
    # Found on the H100 (bfloat16, float16, float64): judged by the size of the terms.
    return Case(batch=1, seqlen_q=seqlen_q, seqlen_k=seqlen_k, nheads_k=1, group=group,
                head_dim=head_dim, causal=False, softmax_scale=softmax_scale,
                layout="contiguous", input_scale=3.0, seed=39742)


#: A float64 logit whose 33 terms cancel (sizes sum to 108, logit 0.85): found by the
#: gpu-long run on the H100 (2026-11-24), where the float64 reference itself was
#: 4e-15 off; the reference now sums float64 products in extended precision.
#: A float32 logit of 80 terms of size ~9 that cancel (found the same way on ea21a5e):
#: summation-order error scales with the terms, not with the logit (tolerance.py).
FORWARD_REGRESSIONS = [
    Case(batch=1, seqlen_q=1, seqlen_k=1, nheads_k=1, group=1, head_dim=33, causal=False,
         softmax_scale=0.5, layout="contiguous", input_scale=3.0, seed=11572802),
    Case(batch=1, seqlen_q=1, seqlen_k=1, nheads_k=1, group=1, head_dim=80, causal=False,
         softmax_scale=1.0, layout="contiguous", input_scale=3.0, seed=19931969)]


@pytest.mark.parametrize("case", FORWARD_REGRESSIONS,
                         ids=["sk1-d33-cancelling-logit", "sk1-d80-scale1-cancelling-logit"])
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
def test_forward_regressions(poison, dtype_name, case):
    _check_forward(dtype_name, case)


@pytest.mark.parametrize("head_dims", HEAD_DIMS, ids=str)
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
@EXAMPLES
@given(data=st.data())
def test_backward(poison, dtype_name, head_dims, data):
    _check_backward(dtype_name, data.draw(cases(SIMULATOR, head_dims), label="case"))


@pytest.mark.parametrize("head_dims", HEAD_DIMS, ids=str)
@EXAMPLES
@given(data=st.data())
def test_backward_allow_tf32(poison, head_dims, data):
    """float32 with allow_tf32=True (one tf32 product each), forward and backward as a
    user runs them, held to the rule against plain attention whose products all take
    tf32-rounded operands (reference.naive_attention_backward(tf32=True)). (A
    3xTF32 forward's out under a tf32 backward mixes the two: Delta = dO . out then
    carries no tf32 rounding of V while dP = dO V^T does, and with one key, where dS
    cancels, that measured 2.06x the naive error.)"""
    _check_backward("float32", data.draw(cases(SIMULATOR, head_dims), label="case"),
                    allow_tf32=True)


#: Head dim 96: its 12 16-byte chunks per row do not divide evenly over the copy
#: loops' groups of 8 threads (16 or 32 groups on the GPU). Under the simulator the
#: bucket's tiles are replaced by two-warp ones (8 groups) to reach the same path.
UNEVEN_CHUNKS_CASE = Case(batch=1, seqlen_q=33, seqlen_k=35, nheads_k=1, group=1,
                          head_dim=90, causal=True, softmax_scale=None, layout="padded",
                          input_scale=1.0, seed=96)


@pytest.mark.parametrize("dtype_name", ["float16"] if SIMULATOR else ["float16", "bfloat16"])
def test_head_dim_96_uneven_chunk_copies(poison, monkeypatch, dtype_name):
    if SIMULATOR:
        monkeypatch.setitem(config.SIMULATOR_MMA_TILE, 96, config.MmaConfig(32, 32, 96, 2))
        monkeypatch.setitem(config.SIMULATOR_BACKWARD_MMA_TILE, 96,
                            config.BackwardMmaConfig(32, 32, 96, 2, 1, 2, 1))
    assert config.head_dim_bucket(UNEVEN_CHUNKS_CASE.head_dim) == 96
    _check_forward(dtype_name, UNEVEN_CHUNKS_CASE)
    _check_backward(dtype_name, UNEVEN_CHUNKS_CASE)


#: The tensor-core backward under the simulator, whose default tile has one warp: each
#: product split over several warps, several 16 x 16 blocks per warp, interleaved
#: along both axes, partial and causal tiles, GQA (head dim 96's uneven copies:
#: test_head_dim_96_uneven_chunk_copies).
WARP_GRID_CASES = [
    (config.BackwardMmaConfig(32, 32, 32, 4, 2, 2, 2),
     Case(batch=1, seqlen_q=37, seqlen_k=45, nheads_k=1, group=2, head_dim=20, causal=True,
          softmax_scale=None, layout="reversed", input_scale=1.0, seed=11)),
    (config.BackwardMmaConfig(32, 64, 32, 4, 1, 4, 2),
     Case(batch=2, seqlen_q=70, seqlen_k=29, nheads_k=1, group=1, head_dim=32, causal=False,
          softmax_scale=0.3, layout="heads_major", input_scale=2.0, seed=12)),
    (config.BackwardMmaConfig(64, 32, 64, 2, 2, 1, 1),
     Case(batch=1, seqlen_q=50, seqlen_k=70, nheads_k=2, group=1, head_dim=40, causal=True,
          softmax_scale=None, layout="padded", input_scale=1.0, seed=13)),
]


@pytest.mark.skipif(not SIMULATOR, reason="the GPU runs its multi-warp tables in test_backward")
@pytest.mark.parametrize("cfg,case", WARP_GRID_CASES, ids=["2x2", "1x4", "2x1-interleaved"])
def test_backward_warp_grids(poison, monkeypatch, cfg, case):
    monkeypatch.setitem(config.SIMULATOR_BACKWARD_MMA_TILE, cfg.head_dim, cfg)
    assert config.select_backward_mma(case.head_dim, True) == cfg
    _check_backward("float16", case)


#: Failures hypothesis found, kept as regressions.
REGRESSIONS = [_regression(1, 1, 2, 96), _regression(16, 1, 1, 17),
               _regression(1, 1, 1, 33, softmax_scale=1.0)]


@pytest.mark.parametrize("case", REGRESSIONS, ids=["sk1-gqa-d96", "sq16-sk1-d17",
                                                   "sk1-d33-scale1"])
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
def test_backward_regressions(poison, dtype_name, case):
    _check_backward(dtype_name, case)


#: One query, 148 keys, head dim 1 (found by the gpu-long run on the H100, 2026-11-24):
#: dq = scale * sum_j dS_j k_j has a single element. The tensor-core backward then
#: rounded P to 16 bits before forming dS = P (dP - Delta), a rounding
#: FlashAttention-2 does not make: emulated in NumPy, it gave exactly nbflash's dq,
#: 1.4e-4 off (2.3 units in the last place) where float32 P gives 2e-5 and naive
#: float16 attention 6e-5. dS is now formed from the float32 P.
P_ROUNDING_CASE = Case(batch=1, seqlen_q=1, seqlen_k=148, nheads_k=1, group=1, head_dim=1,
                       causal=False, softmax_scale=None, layout="contiguous", input_scale=1.0,
                       seed=2)


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
def test_backward_p_rounding_regression(poison, dtype_name):
    _check_backward(dtype_name, P_ROUNDING_CASE)


#: One query, 261 keys, head dim 1, logits up to 22 (found by the H100's default GPU run,
#: 2026-11-24, fifth session): dq is a single sum of 261 terms of total size 27.2 that
#: cancel to 0.457. FlashAttention-2's algorithm rounds dS to the input dtype before
#: dQ = dS K; emulated in NumPy with dS rounded to bfloat16 it gives 0.4245 (nbflash
#: 0.4238), with float32 dS 0.457295 (exact 0.457291). The naive baseline rounds dS
#: too, but its error here is one lucky draw (0.0037); over 150 seeds of this shape the
#: emulated FlashAttention-2 dq is a median 0.16x the naive error, yet fails the rule
#: for 6 seeds. Kept as a strict xfail: a known gap between the rule and 16-bit dS at
#: one-element gradients, not hidden by a wider tolerance.
DS_ROUNDING_CASE = Case(batch=1, seqlen_q=1, seqlen_k=261, nheads_k=1, group=1, head_dim=1,
                        causal=False, softmax_scale=None, layout="contiguous", input_scale=3.0,
                        seed=262)


@pytest.mark.xfail(strict=True, reason="dS rounded to bfloat16 before dQ = dS K, as in "
                                       "FlashAttention-2; see DS_ROUNDING_CASE")
def test_backward_ds_rounding_bfloat16(poison):
    _check_backward("bfloat16", DS_ROUNDING_CASE)


def _check_backward(dtype_name, case, allow_tf32=False):
    (q, k, v, do), (dq_in, dk_in, dv_in, ddo) = make_inputs(case, dtype_name, interface.xp,
                                                         with_grad=True)
    kw = dict(causal=case.causal, softmax_scale=case.softmax_scale)
    out, lse = nbflash.attention(dq_in, dk_in, dv_in, return_lse=True, allow_tf32=allow_tf32,
                                 **kw)
    grads = nbflash.attention_backward(ddo, dq_in, dk_in, dv_in, out, lse,
                                       deterministic=case.deterministic,
                                       allow_tf32=allow_tf32, **kw)
    # attention_backward is checked as the function of its arguments that it is:
    # out and lse arrive rounded (to q's dtype and to float32), and FlashAttention's
    # backward uses them as given (P = exp(scale S - lse), Delta = rowsum(dO * out)).
    # The gradient error that rounding passes on belongs to the forward's outputs,
    # which test_forward holds to the accuracy rule.
    out64, lse64 = to_numpy64(out), to_numpy64(lse)
    exact = reference.attention_backward(do, q, k, v, out=out64, lse=lse64, **kw)
    sizes = reference.attention_backward_magnitudes(do, q, k, v, out64, lse64, **kw)
    naive = reference.naive_attention_backward(do, q, k, v, tf32=allow_tf32, **kw)
    rule = "tf32" if allow_tf32 else dtype_name        # tolerance.py: the dtype floor
    n = max(case.seqlen_q * case.group, case.seqlen_k, case.head_dim)
    logit = max_abs_logit(q, k, case.softmax_scale)
    for name, got, ref, e, nv, size in zip(("dq", "dk", "dv"), grads, (q, k, v), exact, naive,
                                           sizes):
        assert got.shape == ref.shape and got.dtype == ref.dtype, name
        assert_accurate(name, got, e, nv, rule, n, logit, size)
