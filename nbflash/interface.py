"""The public entry points: validate, pick a configuration, allocate, launch.

The only module of nbflash that imports CuPy. Under the CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``) the same code runs on NumPy arrays.
"""
import numpy as np

from . import _validate, config, ops
from ._launch import array_type, get_kernel, scalar_type
from .kernels.backward import ROW_THREADS, build_backward, build_convert, build_preprocess
from .kernels.backward_mma import build_backward_mma
from .kernels.common import LOG2E
from .kernels.forward import build_forward
from .kernels.forward_mma import build_forward_mma

if ops.SIMULATOR:
    xp = np
else:
    try:
        import cupy as xp
    except ImportError as e:
        raise ImportError(
            "nbflash runs on CuPy arrays: install it with `pip install nbflash[cuda13]` "
            "(or [cuda12]), or set NUMBA_ENABLE_CUDASIM=1 to run the kernels in Numba's "
            "CUDA simulator on NumPy arrays") from e

ON_GPU = not ops.SIMULATOR


def _empty(shape, dtype):
    """Allocates every output and workspace; tests replace it to poison outputs."""
    return xp.empty(shape, dtype)


def _kernel_view(x):
    """What the kernels read: bfloat16 as its raw bits (Numba has no bfloat16 arrays)."""
    return x.view(np.uint16) if x.dtype.name == "bfloat16" else x


def _cdiv(a, b):
    return (a + b - 1) // b


def _check_inputs(q, k, v, causal, softmax_scale):
    dims = _validate.check_qkv(q, k, v, xp.ndarray, ON_GPU)
    _validate.check_flag("causal", causal)
    scale = _validate.softmax_scale_or_default(softmax_scale, dims[-1],
                                               _acc_dtype(_validate.dtype_name(q.dtype)))
    return dims, scale


def _acc_dtype(name):
    return config.ACCUMULATOR[name]


def attention(q, k, v, *, causal=False, softmax_scale=None, return_lse=False):
    """Scaled dot-product attention, computed FlashAttention-style in O(seqlen) memory.

    ``out[b, i, h] = sum_j softmax_j(softmax_scale * q[b, i, h] . k[b, j, g]) v[b, j, g]``
    with ``g = h // (nheads // nheads_k)`` (grouped-query attention).

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)`` CuPy array of float16, bfloat16
            (``ml_dtypes.bfloat16``), float32 or float64; any strides.
        k, v: ``(batch, seqlen_k, nheads_k, headdim)``, same dtype; ``nheads`` must
            be a multiple of ``nheads_k``. ``headdim`` is 1 to 256.
        causal: mask key j for query i when ``j > i + seqlen_k - seqlen_q``
            (aligned to the bottom-right corner, as FlashAttention 2.1+). For
            seqlen_q=2, seqlen_k=5 the visible keys are::

                1 1 1 1 0
                1 1 1 1 1

            and for seqlen_q=5, seqlen_k=2 the first three rows see no key. A row
            with no visible key gets output 0 and lse -inf.
        softmax_scale: multiplies the scores before the softmax; default
            ``1 / sqrt(headdim)``.
        return_lse: also return the log-sum-exp of each row's scaled scores.

    Returns:
        ``out`` with q's shape and dtype (contiguous), or ``(out, lse)`` where
        ``lse`` is ``(batch, nheads, seqlen_q)`` float32 (float64 for float64
        inputs): ``lse[b, h, i] = log(sum_j exp(softmax_scale * q_i . k_j))``
        over the visible j, in natural log.

    Launches on CuPy's current stream and returns without synchronising.
    """
    (batch, seqlen_q, seqlen_k, nheads, _, head_dim), scale = _check_inputs(
        q, k, v, causal, softmax_scale)
    _validate.check_flag("return_lse", return_lse)
    name = _validate.dtype_name(q.dtype)
    acc = _acc_dtype(name)
    out = _empty((batch, seqlen_q, nheads, head_dim), q.dtype)
    lse = _empty((batch, nheads, seqlen_q), acc)
    if batch and seqlen_q and nheads:
        _forward(q, k, v, out, lse, causal, scale, name)
    return (out, lse) if return_lse else out


def _forward(q, k, v, out, lse, causal, scale, name):
    if name in config.MMA_DTYPES:
        _forward_mma(q, k, v, out, lse, causal, scale, name)
        return
    cfg = config.select_forward(name, q.shape[3], ops.SIMULATOR)
    elements = config.forward_shared_elements(cfg)
    nbytes = config.check_fits(cfg, elements, name)
    acc = _acc_dtype(name)
    store = config.STORAGE[name]
    scale_log2 = acc(scale * LOG2E)
    signature = ([array_type(store, 4)] * 4 + [array_type(acc, 3), scalar_type(scale_log2)])
    kernel = get_kernel(("forward", cfg, name, causal),
                        lambda: build_forward(cfg, name, causal), signature, nbytes)
    batch, seqlen_q, nheads, _ = q.shape
    grid = (_cdiv(seqlen_q, cfg.block_m), nheads, batch)
    kernel(grid, (cfg.threads,), [_kernel_view(q), _kernel_view(k), _kernel_view(v),
                                  _kernel_view(out), lse, scale_log2])


def _data_ptr(x):
    return x.ctypes.data if isinstance(x, np.ndarray) else x.data.ptr


def _chunk_ready(x):
    """Whether the tensor-core kernels can copy x's rows in 16-byte chunks as it is:
    unit stride and a multiple of 8 elements on the head dim, 16-byte aligned rows."""
    if x.size == 0:
        return True
    if x.strides[3] != x.itemsize or x.shape[3] % 8 or _data_ptr(x) % 16:
        return False
    return all(stride % 16 == 0 for n, stride in zip(x.shape[:3], x.strides[:3]) if n > 1)


def _chunk_layout(x):
    """x itself when chunk-ready, else a contiguous copy with the head dim zero-padded to
    a multiple of 8 (zero columns add nothing to q.k and are not written out)."""
    if _chunk_ready(x):
        return x
    b, s, h, d = x.shape
    padded = (d + 7) // 8 * 8
    if padded == d:
        return xp.ascontiguousarray(x)
    y = xp.zeros((b, s, h, padded), x.dtype)
    y[..., :d] = x
    return y


def _forward_mma(q, k, v, out, lse, causal, scale, name):
    cfg = config.select_forward_mma(q.shape[3], ops.SIMULATOR)
    cfg.check()
    q, k, v = (_chunk_layout(x).view(np.uint16) for x in (q, k, v))
    scale_log2 = np.float32(scale * LOG2E)
    signature = ([array_type(np.uint16, 4)] * 3 + [array_type(config.STORAGE[name], 4),
                 array_type(np.float32, 3), scalar_type(scale_log2)])
    kernel = get_kernel(("forward_mma", cfg, name, causal),
                        lambda: build_forward_mma(cfg, name, causal), signature,
                        cfg.forward_shared_bytes)
    batch, seqlen_q, nheads, _ = q.shape
    grid = (_cdiv(seqlen_q, cfg.block_m), nheads, batch)
    kernel(grid, (cfg.threads,), [q, k, v, _kernel_view(out), lse, scale_log2])


def attention_backward(dout, q, k, v, out, lse, *, causal=False, softmax_scale=None):
    """Gradients of ``attention`` with respect to q, k and v.

    Args:
        dout: gradient of the loss with respect to ``out``; q's shape and dtype.
        q, k, v, causal, softmax_scale: as given to ``attention``.
        out, lse: what ``attention(q, k, v, ..., return_lse=True)`` returned.

    Returns:
        ``(dq, dk, dv)`` with the shapes and dtype of q, k, v. For grouped-query
        attention, dk and dv sum over the query heads that share a kv head.

    The score matrix is recomputed tile by tile from q, k and lse; extra memory is
    O(seqlen): a float32 dQ accumulator and one float per query row. dq is summed
    with float atomics, so its last bits may differ from run to run; dk and dv are
    bitwise reproducible.
    """
    (batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim), scale = _check_inputs(
        q, k, v, causal, softmax_scale)
    name = _validate.dtype_name(q.dtype)
    acc = _acc_dtype(name)
    _validate.check_like("dout", dout, "q", q, xp.ndarray, ON_GPU)
    _validate.check_like("out", out, "q", q, xp.ndarray, ON_GPU)
    _validate.check_lse(lse, (batch, nheads, seqlen_q), acc, xp.ndarray, ON_GPU)
    if ON_GPU:
        _validate.check_same_device((("q", q), ("dout", dout), ("out", out), ("lse", lse)))

    dk = _empty(k.shape, k.dtype)
    dv = _empty(v.shape, v.dtype)
    if not (batch and seqlen_q and seqlen_k and nheads):
        # No query or no key: out does not depend on q, k, v (it is empty or 0).
        dq = _empty(q.shape, q.dtype)
        for g in (dq, dk, dv):
            g[...] = 0
        return dq, dk, dv

    store = config.STORAGE[name]
    delta = _empty((batch, nheads, seqlen_q), acc)
    dq_accum = _empty(q.shape, acc)
    rows_grid = (_cdiv(seqlen_q, ROW_THREADS), nheads, batch)

    pre = get_kernel(("preprocess", name), lambda: build_preprocess(name),
                     [array_type(store, 4)] * 2 + [array_type(acc, 3), array_type(acc, 4)], 0)
    pre(rows_grid, (ROW_THREADS,), [_kernel_view(dout), _kernel_view(out), delta, dq_accum])

    scale_acc, scale_log2 = acc(scale), acc(scale * LOG2E)
    if name in config.MMA_DTYPES:
        cfg = config.select_backward_mma(head_dim, ops.SIMULATOR)
        cfg.check()
        inputs = [_chunk_layout(x).view(np.uint16) for x in (q, k, v, dout)]
        signature = ([array_type(np.uint16, 4)] * 4 + [array_type(acc, 3)] * 2
                     + [array_type(acc, 4)] + [array_type(store, 4)] * 2
                     + [scalar_type(scale_acc)] * 2)
        main = get_kernel(("backward_mma", cfg, name, causal),
                          lambda: build_backward_mma(cfg, name, causal), signature,
                          cfg.backward_shared_bytes)
    else:
        cfg = config.select_backward(name, head_dim, ops.SIMULATOR)
        elements = config.backward_shared_elements(cfg)
        nbytes = config.check_fits(cfg, elements, name)
        inputs = [_kernel_view(x) for x in (q, k, v, dout)]
        signature = ([array_type(store, 4)] * 4 + [array_type(acc, 3)] * 2
                     + [array_type(acc, 4)] + [array_type(store, 4)] * 2
                     + [scalar_type(scale_acc)] * 2)
        main = get_kernel(("backward", cfg, name, causal),
                          lambda: build_backward(cfg, name, causal), signature, nbytes)
    main((_cdiv(seqlen_k, cfg.block_n), nheads_k, batch), (cfg.threads,),
         inputs + [lse, delta, dq_accum, _kernel_view(dk), _kernel_view(dv), scale_acc,
                   scale_log2])

    if np.dtype(q.dtype) == np.dtype(acc):
        return dq_accum, dk, dv
    dq = _empty(q.shape, q.dtype)
    conv = get_kernel(("convert", name), lambda: build_convert(name),
                      [array_type(acc, 4), array_type(store, 4)], 0)
    conv(rows_grid, (ROW_THREADS,), [dq_accum, _kernel_view(dq)])
    return dq, dk, dv
