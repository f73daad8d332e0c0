"""Tests of the public API's argument checks and of its empty-problem edge cases.

Every bad input must raise ``TypeError`` or ``ValueError`` whose message names the
offending argument, before anything is allocated or launched: during those tests
``Kernel.__call__``, ``interface.get_kernel`` and ``interface._empty`` are replaced
by functions that raise ``AssertionError``.

The same file runs on a GPU (CuPy arrays) and under the CUDA simulator (NumPy
arrays): every array is made with ``interface.xp``. Inputs are random and tiny.
"""
import math
import warnings
import zlib

import ml_dtypes
import numpy as np
import pytest

import nbflash
from nbflash import _launch, interface
from nbflash.interface import ON_GPU, xp

B, SQ, SK, H, HK, D = 1, 4, 3, 2, 1, 8
Q_SHAPE = (B, SQ, H, D)
KV_SHAPE = (B, SK, HK, D)
LSE_SHAPE = (B, H, SQ)

DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32,
          "float64": np.float64}
ACC = {"float16": np.float32, "bfloat16": np.float32, "float32": np.float32,
       "float64": np.float64}

# The message of a wrong array type, on either platform.
NOT_ARRAY = r"must be a (cupy\.ndarray|numpy\.ndarray \(CUDA simulator\))"
only_gpu = pytest.mark.skipif(not ON_GPU, reason="NumPy arrays are the array type of "
                                                 "the simulator")
only_simulator = pytest.mark.skipif(ON_GPU, reason="simulator-only case")
# Selected by ``pytest -m gpu`` on a GPU and ``-m simulator`` without one.
pytestmark = [pytest.mark.gpu if ON_GPU else pytest.mark.simulator]


# ---------------------------------------------------------------- input helpers

def _rng(name):
    return np.random.default_rng(zlib.crc32(name.encode()))


def rand(rng, shape, dtype=np.float32, *, host=False):
    """A random array (never all zeros) of ``shape`` and ``dtype``, on xp unless host."""
    dt = np.dtype(dtype)
    if dt.kind == "f" or dt.name == "bfloat16":
        a = (rng.standard_normal(shape) + 0.5).astype(dt)
    elif dt.kind in "iu":
        a = rng.integers(1, 100, shape).astype(dt)
    elif dt.kind == "c":
        a = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dt)
    elif dt.kind == "b":
        a = rng.random(shape) < 0.5
        a.flat[0] = True
    else:
        raise AssertionError(dt)
    return a if host else xp.asarray(a)


def R(shape, dtype=np.float32, host=False):
    """A lazily made random array, for a case table."""
    return lambda rng: rand(rng, shape, dtype, host=host)


def broadcast(shape):
    """A read-only view of a huge shape over one random row (no memory)."""
    return lambda rng: xp.broadcast_to(rand(rng, (1, 1, 1, shape[-1])), shape)


class DuckArray:
    """Looks like an array (shape, dtype, ndim) but is not the library's array type."""
    shape = Q_SHAPE
    ndim = 4
    dtype = np.dtype(np.float32)
    size = math.prod(Q_SHAPE)


ARRAY_NAMES = ("dout", "q", "k", "v", "out", "lse")
DEFAULT_SHAPES = {"dout": Q_SHAPE, "q": Q_SHAPE, "k": KV_SHAPE, "v": KV_SHAPE,
                  "out": Q_SHAPE, "lse": LSE_SHAPE}


def call(entry, name, **over):
    """Calls ``nbflash.<entry>`` with valid random defaults, except what ``over`` gives.

    ``over`` values are literals or functions of an rng (made lazily here).
    """
    rng = _rng(name)
    arrays = {}
    for a in ARRAY_NAMES:
        if a in over:
            x = over.pop(a)
            arrays[a] = x(rng) if callable(x) else x
        else:
            arrays[a] = rand(rng, DEFAULT_SHAPES[a])
    kw = {key: (x(rng) if callable(x) else x) for key, x in over.items()}
    if entry == "attention":
        return nbflash.attention(arrays["q"], arrays["k"], arrays["v"], **kw)
    return nbflash.attention_backward(*(arrays[a] for a in ARRAY_NAMES), **kw)


@pytest.fixture
def no_launch(monkeypatch):
    """Any kernel build or launch fails the test."""
    def launched(*args, **kwargs):
        raise AssertionError("launched")

    monkeypatch.setattr(_launch.Kernel, "__call__", launched)
    monkeypatch.setattr(interface, "get_kernel", launched)


@pytest.fixture
def no_alloc(monkeypatch):
    """Any allocation of an output or workspace fails the test."""
    def allocated(shape, dtype):
        raise AssertionError("allocated")

    monkeypatch.setattr(interface, "_empty", allocated)


# ---------------------------------------------------------------- bad inputs

def case(id, over, exc, match, marks=()):
    return pytest.param(over, exc, match, id=id, marks=marks)


# Bad q, k, v, causal or softmax_scale: checked the same way by both entry points.
QKV_CASES = [
    # not an array
    *(case(f"{n}-{what}", {n: value}, TypeError, rf"^{n} {NOT_ARRAY}")
      for n in ("q", "k", "v")
      for what, value in (("list", [[[[1.0, 2.0]]]]), ("None", None), ("scalar", 3.5))),
    case("q-duck-array", {"q": DuckArray()}, TypeError, rf"^q {NOT_ARRAY}.*DuckArray"),
    case("q-numpy-list-on-simulator", {"q": lambda rng: rand(rng, Q_SHAPE, host=True).tolist()},
         TypeError, r"^q must be a numpy\.ndarray \(CUDA simulator\).*list",
         marks=only_simulator),
    *(case(f"{n}-numpy-on-gpu", {n: R(DEFAULT_SHAPES[n], host=True)}, TypeError,
           rf"^{n} is a NumPy array in host memory.*cupy\.asarray\({n}\)", marks=only_gpu)
      for n in ("q", "k", "v")),
    # dtypes
    case("q-float16-k-float32",
         {"q": R(Q_SHAPE, np.float16), "v": R(KV_SHAPE, np.float16)},
         TypeError, r"^q, k and v must share one dtype; got q float16, k float32, v float16"),
    case("v-float64-others-float32", {"v": R(KV_SHAPE, np.float64)},
         TypeError, r"^q, k and v must share one dtype.*v float64"),
    *(case(f"q-{dt}", {"q": R(Q_SHAPE, dt)}, TypeError, rf"^q has dtype {dt}; supported")
      for dt in ("int32", "int64", "complex64", "bool")),
    case("k-int32", {"k": R(KV_SHAPE, np.int32)}, TypeError, r"^k has dtype int32; supported"),
    case("v-bool", {"v": R(KV_SHAPE, np.bool_)}, TypeError, r"^v has dtype bool; supported"),
    # ndim
    case("q-3d", {"q": R(Q_SHAPE[:3])}, ValueError, r"^q must have 4 dimensions.*\(1, 4, 2\)"),
    case("q-5d", {"q": R(Q_SHAPE + (1,))}, ValueError, r"^q must have 4 dimensions"),
    case("k-3d", {"k": R(KV_SHAPE[:3])}, ValueError, r"^k must have 4 dimensions"),
    case("v-5d", {"v": R((1,) + KV_SHAPE)}, ValueError, r"^v must have 4 dimensions"),
    # shapes
    case("batch-q2-k1", {"q": R((2, SQ, H, D))}, ValueError,
         r"^k and v must have q's batch size 2; got 1"),
    case("headdim-q8-kv4", {"k": R((B, SK, HK, 4)), "v": R((B, SK, HK, 4))}, ValueError,
         r"^k and v must have q's headdim 8; got 4"),
    case("k-v-shapes-differ", {"v": R((B, SK + 1, HK, D))}, ValueError,
         r"^k and v must have the same shape.*got k \(1, 3, 1, 8\), v \(1, 4, 1, 8\)"),
    case("nheads3-nheads_k2", {"q": R((B, SQ, 3, D)), "k": R((B, SK, 2, D)),
                               "v": R((B, SK, 2, D))},
         ValueError, r"nheads of q \(3\) must be a multiple of nheads_k .*\(2\)"),
    case("nheads2-nheads_k4", {"k": R((B, SK, 4, D)), "v": R((B, SK, 4, D))},
         ValueError, r"nheads of q \(2\) must be a multiple of nheads_k"),
    case("nheads_k-0", {"k": R((B, SK, 0, D)), "v": R((B, SK, 0, D))},
         ValueError, r"nheads_k >= 1"),
    case("headdim-0", {"q": R((B, SQ, H, 0)), "k": R((B, SK, HK, 0)), "v": R((B, SK, HK, 0))},
         ValueError, r"^headdim .*between 1 and 256; got 0"),
    case("headdim-257", {"q": R((B, 1, 1, 257)), "k": R((B, 1, 1, 257)),
                         "v": R((B, 1, 1, 257))},
         ValueError, r"^headdim .*between 1 and 256; got 257"),
    case("batch-65536", {"q": broadcast((65536, 1, 1, D)), "k": broadcast((65536, 1, 1, D)),
                         "v": broadcast((65536, 1, 1, D))},
         ValueError, r"batch and nheads must each be at most 65535; got batch 65536"),
    case("nheads-65536", {"q": broadcast((1, 1, 65536, D)), "k": R((1, 1, 1, D)),
                          "v": R((1, 1, 1, D))},
         ValueError, r"batch and nheads .*nheads 65536"),
    # softmax_scale
    *(case(f"softmax_scale-{what}", {"softmax_scale": value}, ValueError,
           r"^softmax_scale must be finite and positive")
      for what, value in (("0", 0.0), ("int-0", 0), ("negative", -0.5), ("nan", math.nan),
                          ("inf", math.inf), ("-inf", -math.inf),
                          ("np-float32-nan", np.float32("nan")))),
    *(case(f"softmax_scale-{what}", {"softmax_scale": value}, TypeError,
           r"^softmax_scale must be a real number or None")
      for what, value in (("str", "0.5"), ("True", True), ("False", False),
                          ("np-bool", np.True_), ("complex", 0.5 + 0j),
                          ("numpy-array", np.array([0.5])),
                          ("numpy-0d-array", np.array(0.5)))),
    case("softmax_scale-xp-array", {"softmax_scale": lambda rng: xp.asarray([0.5])},
         TypeError, r"^softmax_scale must be a real number or None", marks=only_gpu),
    # causal
    *(case(f"causal-{what}", {"causal": value}, TypeError, r"^causal must be True or False")
      for what, value in (("yes", "yes"), ("1", 1), ("0", 0), ("None", None),
                          ("float", 1.0), ("np-int", np.int64(1)))),
]

ENTRIES = ["attention", "attention_backward"]


@pytest.mark.parametrize("entry", ENTRIES, ids=["fwd", "bwd"])
@pytest.mark.parametrize("over, exc, match", QKV_CASES)
def test_bad_qkv_scale_causal(no_launch, no_alloc, entry, over, exc, match, request):
    with pytest.raises(exc, match=match):
        call(entry, request.node.name, **over)


FORWARD_CASES = [
    *(case(f"return_lse-{what}", {"return_lse": value}, TypeError,
           r"^return_lse must be True or False")
      for what, value in (("None", None), ("1", 1), ("str", "True"))),
]


@pytest.mark.parametrize("over, exc, match", FORWARD_CASES)
def test_bad_forward_only(no_launch, no_alloc, over, exc, match, request):
    with pytest.raises(exc, match=match):
        call("attention", request.node.name, **over)


BACKWARD_CASES = [
    # dout and out: q's shape and dtype
    *(case(f"{n}-{what}", {n: value}, TypeError, rf"^{n} {NOT_ARRAY}")
      for n in ("dout", "out")
      for what, value in (("list", [1.0, 2.0]), ("None", None), ("scalar", 1.0))),
    *(case(f"{n}-numpy-on-gpu", {n: R(DEFAULT_SHAPES[n], host=True)}, TypeError,
           rf"^{n} is a NumPy array in host memory.*cupy\.asarray\({n}\)", marks=only_gpu)
      for n in ("dout", "out", "lse")),
    case("dout-wrong-shape", {"dout": R((B, SQ + 1, H, D))}, ValueError,
         r"^dout must have q's shape \(1, 4, 2, 8\), got \(1, 5, 2, 8\)"),
    case("dout-k-shape", {"dout": R(KV_SHAPE)}, ValueError, r"^dout must have q's shape"),
    case("dout-3d", {"dout": R(Q_SHAPE[:3])}, ValueError, r"^dout must have q's shape"),
    case("dout-float16", {"dout": R(Q_SHAPE, np.float16)}, TypeError,
         r"^dout must have q's dtype float32, got float16"),
    case("dout-int32", {"dout": R(Q_SHAPE, np.int32)}, TypeError,
         r"^dout must have q's dtype float32, got int32"),
    case("out-wrong-shape", {"out": R((B, SQ, H, D + 1))}, ValueError,
         r"^out must have q's shape \(1, 4, 2, 8\), got \(1, 4, 2, 9\)"),
    case("out-float64", {"out": R(Q_SHAPE, np.float64)}, TypeError,
         r"^out must have q's dtype float32, got float64"),
    # lse: (batch, nheads, seqlen_q) in the accumulator dtype
    case("lse-wrong-shape", {"lse": R((B, H, SQ + 1))}, ValueError,
         r"^lse must have shape \(batch, nheads, seqlen_q\) = \(1, 2, 4\), got \(1, 2, 5\)"),
    case("lse-seq-major", {"lse": R((B, SQ, H))}, ValueError, r"^lse must have shape"),
    case("lse-kv-heads", {"lse": R((B, HK, SQ))}, ValueError, r"^lse must have shape"),
    case("lse-float16", {"lse": R(LSE_SHAPE, np.float16)}, TypeError,
         r"^lse must have dtype float32 \(as attention returns it\), got float16"),
    case("lse-float64-for-float32", {"lse": R(LSE_SHAPE, np.float64)}, TypeError,
         r"^lse must have dtype float32"),
    case("lse-float32-for-float64",
         {n: R(DEFAULT_SHAPES[n], np.float64) for n in ("dout", "q", "k", "v", "out")},
         TypeError, r"^lse must have dtype float64 .*got float32"),
    case("lse-float16-for-float16-inputs",
         {**{n: R(DEFAULT_SHAPES[n], np.float16) for n in ("dout", "q", "k", "v", "out")},
          "lse": R(LSE_SHAPE, np.float16)},
         TypeError, r"^lse must have dtype float32 .*got float16"),
    *(case(f"lse-{what}", {"lse": value}, TypeError, rf"^lse {NOT_ARRAY}")
      for what, value in (("list", [[[0.0]]]), ("None", None), ("scalar", 0.0))),
    case("lse-returned-out-by-mistake", {"lse": R(Q_SHAPE)}, ValueError,
         r"^lse must have shape"),
    *(case(f"deterministic-{what}", {"deterministic": value}, TypeError,
           r"^deterministic must be True or False")
      for what, value in (("None", None), ("1", 1), ("str", "yes"))),
]


@pytest.mark.parametrize("over, exc, match", BACKWARD_CASES)
def test_bad_backward_only(no_launch, no_alloc, over, exc, match, request):
    with pytest.raises(exc, match=match):
        call("attention_backward", request.node.name, **over)


@pytest.mark.parametrize("value", [None, 1, "True"], ids=["None", "1", "str"])
def test_bad_allow_tf32(no_launch, no_alloc, value, request):
    with pytest.raises(TypeError, match=r"^allow_tf32 must be True or False"):
        call("attention", request.node.name, allow_tf32=value)


def test_return_lse_is_not_a_backward_keyword():
    with pytest.raises(TypeError, match="return_lse"):
        call("attention_backward", "bwd-return_lse", return_lse=True)


def test_positional_keywords_are_refused():
    rng = _rng("positional")
    q, k, v = rand(rng, Q_SHAPE), rand(rng, KV_SHAPE), rand(rng, KV_SHAPE)
    with pytest.raises(TypeError):
        nbflash.attention(q, k, v, True)


def _fail_with(message):
    def fail(*args, **kwargs):
        raise AssertionError(message)
    return fail


@pytest.mark.parametrize("entry", ENTRIES, ids=["fwd", "bwd"])
def test_the_guards_catch_a_valid_call(monkeypatch, entry):
    """The guards of the bad-input tests do fire: a valid call allocates, then launches."""
    for target, attr, message in ((interface, "_empty", "allocated"),
                                  (interface, "get_kernel", "launched"),
                                  (_launch.Kernel, "__call__", "launched")):
        with monkeypatch.context() as m:
            m.setattr(target, attr, _fail_with(message))
            with pytest.raises(AssertionError, match=message):
                call(entry, f"guard-{entry}")


@pytest.mark.parametrize("dtype_name", ["float32", "float16", "bfloat16", "float64"])
def test_valid_values_of_flags_and_scale_are_accepted(no_launch, dtype_name):
    """numpy bools and numpy reals are fine (the call gets as far as the launch)."""
    dt = DTYPES[dtype_name]
    for kw in (dict(causal=np.True_, return_lse=np.False_),
               dict(softmax_scale=np.float32(0.25)), dict(softmax_scale=3),
               dict(softmax_scale=np.float64(1e-3))):
        with pytest.raises(AssertionError, match="launched"):
            call("attention", f"ok-{dtype_name}", q=R(Q_SHAPE, dt), k=R(KV_SHAPE, dt),
                 v=R(KV_SHAPE, dt), **kw)


# ---------------------------------------------------------------- softmax_scale range

def test_huge_integer_scale_raises_value_error(no_launch, no_alloc):
    with pytest.raises(ValueError, match="softmax_scale"):
        call("attention", "scale-10**400", softmax_scale=10**400)


@pytest.mark.parametrize("scale", [1e300, 1e-320], ids=["1e300", "1e-320"])
def test_scale_outside_float32_gives_error_or_finite_output(scale):
    """An accepted scale must give finite outputs for finite inputs."""
    rng = _rng(f"scale-{scale}")
    q, k, v = rand(rng, Q_SHAPE), rand(rng, KV_SHAPE), rand(rng, KV_SHAPE)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out, lse = nbflash.attention(q, k, v, softmax_scale=scale, return_lse=True)
    except ValueError as e:
        assert "softmax_scale" in str(e)
        return
    assert bool(xp.isfinite(out).all()) and bool(xp.isfinite(lse).all())


# ---------------------------------------------------------------- empty problems

def _qkv(name, dtype, q_shape, kv_shape):
    rng = _rng(name)
    return rand(rng, q_shape, dtype), rand(rng, kv_shape, dtype), rand(rng, kv_shape, dtype)


DTYPE_NAMES = list(DTYPES)
EMPTY_SHAPES = {
    "batch0": ((0, SQ, H, D), (0, SK, HK, D)),
    "seqlen_q0": ((B, 0, H, D), (B, SK, HK, D)),
    "seqlen_q0-seqlen_k0": ((B, 0, H, D), (B, 0, HK, D)),
}


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shapes", list(EMPTY_SHAPES.values()), ids=list(EMPTY_SHAPES))
@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
def test_forward_no_query_is_empty_without_launch(no_launch, dtype_name, shapes, causal):
    q_shape, kv_shape = shapes
    dt = DTYPES[dtype_name]
    q, k, v = _qkv(f"empty-{dtype_name}", dt, q_shape, kv_shape)
    out = nbflash.attention(q, k, v, causal=causal)
    assert isinstance(out, xp.ndarray)
    assert out.shape == q_shape and out.dtype == np.dtype(dt)
    out, lse = nbflash.attention(q, k, v, causal=causal, return_lse=True)
    assert isinstance(out, xp.ndarray) and isinstance(lse, xp.ndarray)
    assert out.shape == q_shape and out.dtype == np.dtype(dt)
    b, sq, h, _ = q_shape
    assert lse.shape == (b, h, sq) and lse.dtype == np.dtype(ACC[dtype_name])
    assert out.size == 0 and lse.size == 0


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype_name", ["float32", "float16", "float64"])
def test_forward_no_key_gives_zero_and_minus_inf(poison, dtype_name, causal):
    """seqlen_k 0: every row sees no key (the kernel runs and writes 0 and -inf)."""
    dt = DTYPES[dtype_name]
    q, k, v = _qkv(f"nokey-{dtype_name}", dt, Q_SHAPE, (B, 0, HK, D))
    out, lse = nbflash.attention(q, k, v, causal=causal, return_lse=True)
    assert out.shape == Q_SHAPE and out.dtype == np.dtype(dt)
    assert lse.shape == LSE_SHAPE and lse.dtype == np.dtype(ACC[dtype_name])
    out, lse = xp.asnumpy(out) if ON_GPU else out, xp.asnumpy(lse) if ON_GPU else lse
    assert np.all(out == 0)
    assert np.all(np.isneginf(lse))


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
def test_backward_no_query_gives_zero_dk_dv_without_launch(no_launch, poison,
                                                           dtype_name):
    dt = DTYPES[dtype_name]
    q, k, v = _qkv(f"bwd-noq-{dtype_name}", dt, (B, 0, H, D), KV_SHAPE)
    out = nbflash.attention(q, k, v)          # empty, no launch
    _, lse = nbflash.attention(q, k, v, return_lse=True)
    dout = xp.empty_like(q)
    dq, dk, dv = nbflash.attention_backward(dout, q, k, v, out, lse)
    assert dq.shape == q.shape and dq.dtype == np.dtype(dt)
    for g, x in ((dk, k), (dv, v)):
        assert g.shape == x.shape == KV_SHAPE and g.dtype == np.dtype(dt)
        g = xp.asnumpy(g) if ON_GPU else g
        assert np.all(g.astype(np.float64) == 0)


@pytest.mark.parametrize("dtype_name", ["float32", "float16", "float64"])
def test_backward_no_key_gives_zero_grads(poison, dtype_name):
    """seqlen_k 0: out is 0 whatever q is, so dq is 0; dk and dv are empty."""
    dt = DTYPES[dtype_name]
    q, k, v = _qkv(f"bwd-nokey-{dtype_name}", dt, Q_SHAPE, (B, 0, HK, D))
    out, lse = nbflash.attention(q, k, v, return_lse=True)
    dout = rand(_rng("dout"), Q_SHAPE, dt)
    dq, dk, dv = nbflash.attention_backward(dout, q, k, v, out, lse)
    assert dq.shape == Q_SHAPE and dq.dtype == np.dtype(dt)
    assert dk.shape == dv.shape == (B, 0, HK, D)
    assert dk.dtype == dv.dtype == np.dtype(dt)
    dq = xp.asnumpy(dq) if ON_GPU else dq
    assert np.all(dq == 0)


def test_backward_batch0_is_empty_without_launch(no_launch):
    q, k, v = _qkv("bwd-b0", np.float32, (0, SQ, H, D), (0, SK, HK, D))
    out, lse = nbflash.attention(q, k, v, return_lse=True)
    dq, dk, dv = nbflash.attention_backward(xp.empty_like(q), q, k, v, out, lse)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
