"""Tests of attention()'s launch plans (``interface._plans``) and of the flattened
kernel arguments they launch with (``_launch.ArgTemplate``).

A plan keeps what validation and configuration decided for one key of inputs; a call
with a planned key only allocates, fills in data pointers and launches. These tests
check that a planned call computes what an unplanned one does, that bad arguments are
still refused with a planned key, that a change of tile configuration or of the
test hooks replaces a plan, and that the argument template flattens as ``flatten``
does. Same file on a GPU and under the simulator; sizes are tiny.
"""
import dataclasses
import threading
import types

import numpy as np
import pytest

import nbflash
from nbflash import _launch, config, interface
from nbflash._launch import ArgTemplate, ArraySpec, flatten
from nbflash.interface import ON_GPU, xp

SHAPE_Q, SHAPE_KV = (1, 9, 2, 16), (1, 7, 1, 16)


@pytest.fixture
def plans(monkeypatch):
    """An empty plan cache for the test (the module's own is left as it was)."""
    fresh = {}
    monkeypatch.setattr(interface, "_plans", fresh)
    return fresh


def _inputs(seed, dtype=np.float16, q_shape=SHAPE_Q, kv_shape=SHAPE_KV):
    rng = np.random.default_rng(seed)
    return [xp.asarray(rng.standard_normal(s).astype(dtype))
            for s in (q_shape, kv_shape, kv_shape)]


def _host(x):
    return xp.asnumpy(x) if ON_GPU else np.asarray(x)


def _same_bits(a, b):
    return _host(a).tobytes() == _host(b).tobytes()


def _counting_get_kernel(monkeypatch):
    keys = []
    real = interface.get_kernel

    def counting(key, *args):
        keys.append(key)
        return real(key, *args)

    monkeypatch.setattr(interface, "get_kernel", counting)
    return keys


# ---------------------------------------------------------------- planned calls

def test_a_planned_call_computes_what_an_unplanned_one_does(monkeypatch, plans):
    keys = _counting_get_kernel(monkeypatch)
    first = nbflash.attention(*_inputs(1), causal=True, return_lse=True)
    assert len(plans) == 1 and len(keys) == 1
    q, k, v = _inputs(2)                          # same layout, other data and addresses
    planned = nbflash.attention(q, k, v, causal=True, return_lse=True)
    assert len(plans) == 1 and len(keys) == 1, "the second call did not use the plan"
    plans.clear()
    unplanned = nbflash.attention(q, k, v, causal=True, return_lse=True)
    assert len(keys) == 2
    for a, b in zip(planned, unplanned):
        assert _same_bits(a, b)
    assert not _same_bits(first[0], planned[0])


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["float32", "float16"])
def test_each_layout_and_flag_gets_its_own_plan(plans, dtype):
    q, k, v = _inputs(3, dtype)
    base = nbflash.attention(q, k, v)
    for kw in (dict(causal=True), dict(return_lse=True), dict(softmax_scale=0.5)):
        nbflash.attention(q, k, v, **kw)
    # Equal scales of different types are one key; numpy flags are validated per call.
    for scale in (1, 1.0, np.float64(1.0), np.float32(1.0)):
        nbflash.attention(q, k, v, softmax_scale=scale)
    assert len(plans) == 5
    assert _same_bits(nbflash.attention(q, k, v, causal=np.False_), base)
    assert len(plans) == 5
    # A transposed view of the same data: a new key, the same result.
    qt = xp.ascontiguousarray(q.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    assert _same_bits(nbflash.attention(qt, k, v), base)
    assert len(plans) == 6


BAD_WITH_A_PLANNED_KEY = [
    (dict(causal=1), TypeError, "^causal must be True or False"),
    (dict(causal=None), TypeError, "^causal must be True or False"),
    (dict(return_lse=1), TypeError, "^return_lse must be True or False"),
    (dict(softmax_scale=True), TypeError, "^softmax_scale must be a real number"),
    (dict(softmax_scale=0.0), ValueError, "^softmax_scale must be finite and positive"),
    (dict(softmax_scale=-1), ValueError, "^softmax_scale must be finite and positive"),
    (dict(softmax_scale=float("nan")), ValueError, "^softmax_scale must be finite"),
    (dict(softmax_scale=np.array([0.5])), TypeError, "^softmax_scale must be a real"),
]


@pytest.mark.parametrize("kw, exc, match", BAD_WITH_A_PLANNED_KEY,
                         ids=[str(c[0]) for c in BAD_WITH_A_PLANNED_KEY])
def test_bad_flags_and_scales_are_refused_after_a_planned_call(plans, kw, exc, match):
    q, k, v = _inputs(4)
    nbflash.attention(q, k, v, causal=True, return_lse=True, softmax_scale=1.0)
    with pytest.raises(exc, match=match):
        nbflash.attention(q, k, v, **{"causal": True, "return_lse": True,
                                      "softmax_scale": 1.0, **kw})
    assert len(plans) == 1


def test_bad_arrays_are_refused_after_a_planned_call(plans):
    q, k, v = _inputs(5)
    nbflash.attention(q, k, v)
    with pytest.raises(TypeError, match="^q, k and v must share one dtype"):
        nbflash.attention(q, k.astype(np.float32), v)
    with pytest.raises(ValueError, match="^k and v must have the same shape"):
        nbflash.attention(q, k, v[:, :-1])
    with pytest.raises(TypeError, match="^v must be a"):
        nbflash.attention(q, k, _host(v).tolist())
    assert len(plans) == 1


def test_key_is_none_for_what_plans_do_not_cover():
    q, k, v = _inputs(6)
    key = interface._forward_key
    assert key(q, k, v, False, None, False) is not None
    assert key(q, k, v, np.True_, None, False) is None
    assert key(q, k, v, False, None, 0) is None
    assert key(q, k, v, False, "0.5", False) is None
    assert key(q, k, _host(v).tolist(), False, None, False) is None
    if not ON_GPU:
        class Sub(np.ndarray):
            pass
        assert key(q, k, v.view(Sub), False, None, False) is None


def test_a_new_tile_configuration_replaces_the_plan(monkeypatch, plans):
    q, k, v = _inputs(7)
    before = nbflash.attention(q, k, v, causal=True)
    (plan,) = plans.values()
    cfg = plan.launch.cfg
    other = dataclasses.replace(cfg, block_n=cfg.block_n // 2 if cfg.block_n >= 32
                                else 2 * cfg.block_n)
    other.check()
    monkeypatch.setattr(config, "select_forward_mma",
                        lambda head_dim, simulator=False, causal=False: other)
    after = nbflash.attention(q, k, v, causal=True)
    (plan,) = plans.values()
    assert plan.launch.cfg == other
    np.testing.assert_allclose(_host(after).astype(np.float32),
                               _host(before).astype(np.float32), rtol=0, atol=2e-3)


def test_replacing_get_kernel_replaces_the_plan(monkeypatch, plans):
    q, k, v = _inputs(8)
    nbflash.attention(q, k, v)
    keys = _counting_get_kernel(monkeypatch)
    nbflash.attention(q, k, v)
    assert len(keys) == 1


def test_the_cache_is_bounded(monkeypatch, plans):
    monkeypatch.setattr(interface, "_MAX_PLANS", 2)
    q, k, v = _inputs(9)
    for kw in (dict(), dict(causal=True), dict(return_lse=True)):
        nbflash.attention(q, k, v, **kw)
        assert 1 <= len(plans) <= 2


def test_a_misaligned_contiguous_input_is_copied(plans):
    """q at 2 bytes past a 16-byte boundary: the tensor-core kernels' 16-byte loads need
    an aligned copy, even though q is C-contiguous."""
    q, k, v = _inputs(10)
    buf = xp.empty(q.size + 1, q.dtype)
    buf[1:] = q.reshape(-1)
    q_off = buf[1:].reshape(q.shape)
    assert interface._data_ptr(q_off) % 16 == 2
    assert not interface._chunk_ready(q_off)
    copy = interface._chunk_copy(q_off)
    assert interface._chunk_ready(copy) and _same_bits(copy, q)
    assert _same_bits(nbflash.attention(q_off, k, v), nbflash.attention(q, k, v))


def test_a_row_stride_over_the_32_bit_tile_offsets_is_copied(plans):
    """k's rows 8 MiB + 16 bytes apart: the tile copies form offsets within a tile in
    32 bits, so such an input goes through the (heads-major) chunk copy."""
    q, k, v = _inputs(12, q_shape=(1, 3, 1, 8), kv_shape=(1, 3, 1, 8))
    row = (interface.MAX_ROW_STRIDE + 16) // k.itemsize
    big = xp.zeros((1, 3, 1, row), k.dtype)
    big[..., :8] = k
    far = big[..., :8]
    assert far.strides[1] > interface.MAX_ROW_STRIDE
    assert not interface._chunk_ready(far)
    assert interface._chunk_ready(interface._chunk_copy(far))
    assert _same_bits(nbflash.attention(q, far, v), nbflash.attention(q, k, v))


def test_padded_head_dim_copies(plans):
    """Head dim 12 (not a multiple of 8) and a sliced k: copies padded to 16."""
    q, k, v = _inputs(11, q_shape=(1, 5, 1, 12), kv_shape=(1, 6, 1, 12))
    big = xp.zeros((1, 6, 1, 20), k.dtype)
    big[..., :12] = k
    sliced = big[..., :12]
    assert not interface._chunk_ready(sliced)
    out = nbflash.attention(q, sliced, v)
    (plan,) = plans.values()
    assert plan.launch.relayout == (True, True, True)
    assert _same_bits(nbflash.attention(q, sliced, v), out)
    assert _same_bits(nbflash.attention(q, k, v), out)


@pytest.mark.gpu
def test_threads_on_their_own_streams_share_plans(plans):
    import cupy
    inputs = [_inputs(20 + t) for t in range(4)]
    expected = [nbflash.attention(*x, causal=True, return_lse=True) for x in inputs]
    cupy.cuda.Device().synchronize()
    results, errors = [None] * 4, []
    barrier = threading.Barrier(4)

    def worker(t):
        try:
            stream = cupy.cuda.Stream(non_blocking=True)
            with stream:
                barrier.wait()
                for _ in range(20):
                    results[t] = nbflash.attention(*inputs[t], causal=True,
                                                   return_lse=True)
                stream.synchronize()
        except BaseException as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for got, want in zip(results, expected):
        assert all(_same_bits(a, b) for a, b in zip(got, want))
    assert len(plans) == 1


# ---------------------------------------------------------------- argument templates

class _Flattenable:
    """A NumPy array as ``flatten`` sees a CuPy array (``.data.ptr``)."""

    def __init__(self, a):
        self.size, self.itemsize, self.shape, self.strides = (a.size, a.itemsize, a.shape,
                                                              a.strides)
        self.data = types.SimpleNamespace(ptr=a.__array_interface__["data"][0])


def _layouts():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((2, 5, 3, 8)).astype(np.float16)
    big = np.zeros((2, 5, 3, 11), np.float16)
    return {
        "contiguous": base,
        "transposed": np.ascontiguousarray(base.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3),
        "sliced": big[..., :8],
        "reversed": base[:, ::-1],
        "broadcast": np.broadcast_to(base[:1, :1, :1], (2, 5, 3, 8)),
        "empty": base[:, :0],
        "ones": base[:1, :1],
    }


@pytest.mark.parametrize("layout", list(_layouts()))
def test_template_fills_as_flatten_flattens(layout):
    a = _layouts()[layout]
    out = np.empty((2, 3, 5), np.float32)
    scalar = np.float32(0.125)
    template = ArgTemplate([ArraySpec.of(a), ArraySpec.contiguous(out.shape, 4), scalar])
    pointers = [_Flattenable(x).data.ptr for x in (a, out)]
    filled = template.fill(pointers)
    assert filled == flatten([_Flattenable(a), _Flattenable(out), scalar])
    assert type(filled) is _launch.Flattened
    # The uint16 view the kernels take of 16-bit floats flattens as the array does.
    assert flatten([_Flattenable(a.view(np.uint16))]) == flatten([_Flattenable(a)])
    with pytest.raises(ValueError):
        template.fill(pointers[:1])


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 5, 3, 8), (1, 7, 1, 12), (4, 1, 2)])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_contiguous_spec_is_what_empty_makes(shape, dtype):
    spec = ArraySpec.contiguous(shape, np.dtype(dtype).itemsize)
    made = xp.empty(shape, dtype)
    assert (spec.shape, spec.strides, spec.itemsize) == (made.shape, made.strides,
                                                         made.itemsize)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 5, 3, 8), (1, 7, 1, 12)])
def test_chunk_copy_spec_is_the_copy_layout(shape):
    x = xp.zeros(shape, np.float16)[:, ::-1]          # not contiguous: always copied
    spec, copy = interface._chunk_copy_spec(x), interface._chunk_copy(x)
    assert (spec.shape, spec.strides) == (copy.shape, copy.strides)
    assert interface._chunk_ready(copy)
