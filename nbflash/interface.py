"""The public entry points: validate, pick a configuration, allocate, launch.

The only module of nbflash that imports CuPy. Under the CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``) the same code runs on NumPy arrays.
"""
import threading

import numpy as np

from . import _launch, _validate, config, ops
from ._launch import ArgTemplate, ArraySpec, array_type, get_kernel, scalar_type
from .kernels.backward import (ROW_THREADS, ROWS_PER_BLOCK, build_backward, build_convert,
                               build_preprocess, build_stats)
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
_ARRAY = xp.ndarray


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


def attention(q, k, v, *, causal=False, softmax_scale=None, return_lse=False,
              allow_tf32=False):
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
        allow_tf32: for float32 inputs, round q, k, v and the probabilities to tf32
            (10 mantissa bits, as ``torch.backends.cuda.matmul.allow_tf32``) and take
            one tensor-core product each: about 3x the speed, with errors of about
            1e-3 relative to the values' size instead of float32's 1e-7. By default
            float32 runs on tensor cores too, with each operand split into two tf32
            parts and three products (float32 accuracy). Ignored for other dtypes.

    Returns:
        ``out`` with q's shape and dtype (contiguous), or ``(out, lse)`` where
        ``lse`` is ``(batch, nheads, seqlen_q)`` float32 (float64 for float64
        inputs): ``lse[b, h, i] = log(sum_j exp(softmax_scale * q_i . k_j))``
        over the visible j, in natural log.

    Launches on CuPy's current stream and returns without synchronising.
    """
    key = _forward_key(q, k, v, causal, softmax_scale, return_lse, allow_tf32)
    plan = _plans.get(key)
    if plan is None or not plan.is_current():
        plan = _plan_forward(q, k, v, causal, softmax_scale, return_lse, allow_tf32)
        _remember(key, plan)
    return plan(q, k, v)


# ---------------------------------------------------------------- launch plans
#
# All that attention() decides before it allocates and launches (the validation, the
# tile configuration, the kernel, its grid, which inputs need a chunk-layout copy,
# the kernel's flattened arguments) depends only on the arguments' types, shapes,
# strides, dtypes, devices and 16-byte alignment, the flags, the scale and the
# current device. A launch plan keeps it per such key: a call whose key has a plan
# allocates its outputs, writes the data pointers into the plan's argument template
# and launches (tests/gpu/host_overhead.py measures the host time).

#: Scale types a key may hold: hashable, and equal values validate to one scale.
_KEY_SCALES = (type(None), float, int, np.float32, np.float64)
#: Plans kept; the cache is emptied when it is full.
_MAX_PLANS = 4096
_plans = {}
_plans_lock = threading.Lock()

if ON_GPU:
    def _array_key(x):
        data = x.data
        return x.shape, x.strides, x.dtype, data.ptr % 16, data.device_id

    _device_id = _launch.current_device_id
else:
    def _array_key(x):
        return x.shape, x.strides, x.dtype, x.ctypes.data % 16

    def _device_id():
        return None


def _forward_key(q, k, v, causal, softmax_scale, return_lse, allow_tf32=False):
    """The plan key of an attention call, or None (no plan kept: validated every call)
    unless q, k, v are of the array type itself, the flags bools and the scale None or
    a plain number."""
    if (type(q) is _ARRAY and type(k) is _ARRAY and type(v) is _ARRAY
            and type(causal) is bool and type(return_lse) is bool
            and type(allow_tf32) is bool and type(softmax_scale) in _KEY_SCALES):
        return (_array_key(q), _array_key(k), _array_key(v), causal, return_lse,
                allow_tf32, softmax_scale, _device_id())
    return None


def _remember(key, plan):
    if key is None:
        return
    with _plans_lock:
        if len(_plans) >= _MAX_PLANS:
            _plans.clear()
        _plans[key] = plan


def _plan_forward(q, k, v, causal, softmax_scale, return_lse, allow_tf32=False):
    """Validates an attention call, raising TypeError or ValueError naming the bad
    argument, and plans it."""
    (batch, seqlen_q, _, nheads, _, head_dim), scale = _check_inputs(
        q, k, v, causal, softmax_scale)
    _validate.check_flag("return_lse", return_lse)
    _validate.check_flag("allow_tf32", allow_tf32)
    name = _validate.dtype_name(q.dtype)
    launch = (_forward(q, k, v, causal, scale, name, allow_tf32)
              if batch and seqlen_q and nheads else None)
    return _ForwardPlan((batch, seqlen_q, nheads, head_dim), q.dtype,
                        (batch, nheads, seqlen_q), _acc_dtype(name), return_lse, launch)


class _ForwardPlan:
    """How attention() runs for one key: the outputs to allocate, and the launch (None
    when there is nothing to compute: no batch, query or head)."""
    __slots__ = ("out_shape", "out_dtype", "lse_shape", "lse_dtype", "return_lse",
                 "launch", "get_kernel")

    def __init__(self, out_shape, out_dtype, lse_shape, lse_dtype, return_lse, launch):
        self.out_shape, self.out_dtype = out_shape, out_dtype
        self.lse_shape, self.lse_dtype = lse_shape, lse_dtype
        self.return_lse, self.launch = bool(return_lse), launch
        self.get_kernel = get_kernel

    def is_current(self):
        """Whether the plan still holds: it was made through today's get_kernel (tests
        replace it to watch or forbid builds), and the tile configuration is unchanged
        (tile sweeps change config's tables or selectors between calls)."""
        return self.get_kernel is get_kernel and (self.launch is None
                                                  or self.launch.is_current())

    def __call__(self, q, k, v):
        out = _empty(self.out_shape, self.out_dtype)
        lse = _empty(self.lse_shape, self.lse_dtype)
        if self.launch is not None:
            self.launch(q, k, v, out, lse)
        return (out, lse) if self.return_lse else out


class _ForwardLaunch:
    """The forward kernel's launch for one plan.

    ``storage``: the dtypes the kernel reads q, k, v and out as (uint16 for 16-bit
    floats on tensor cores); ``relayout``: which of q, k, v get a chunk-layout copy
    (empty when none do); ``args``: the flattened arguments (q, k, v, out, lse, scale)
    with blank data pointers. On a GPU the arrays themselves are flattened, not uint16
    views of them: a view differs only in its dtype, and the ABI holds the itemsize.
    """
    __slots__ = ("name", "head_dim", "causal", "allow_tf32", "cfg", "kernel", "grid", "block",
                 "storage", "scalar", "relayout", "args")

    def __init__(self, name, cfg, kernel, q, k, v, causal, storage, acc, scalar, relayout=(),
                 allow_tf32=False):
        batch, seqlen_q, nheads, head_dim = q.shape
        self.name, self.head_dim, self.cfg, self.kernel = name, head_dim, cfg, kernel
        self.causal, self.allow_tf32 = causal, allow_tf32
        self.grid = (_cdiv(seqlen_q, cfg.block_m), nheads, batch)
        self.block = (cfg.threads,)
        self.storage, self.scalar = storage, scalar
        self.relayout = relayout if any(relayout) else ()
        inputs = [_chunk_copy_spec(x) if copy else ArraySpec.of(x)
                  for x, copy in zip((q, k, v), relayout or (False,) * 3)]
        itemsize = np.dtype(q.dtype).itemsize
        self.args = ArgTemplate(inputs + [
            ArraySpec.contiguous(q.shape, itemsize),
            ArraySpec.contiguous((batch, nheads, seqlen_q), np.dtype(acc).itemsize),
            scalar])

    def is_current(self):
        cfg = _forward_config(self.name, self.head_dim, self.causal, self.allow_tf32)
        return cfg is self.cfg or cfg == self.cfg

    def __call__(self, q, k, v, out, lse):
        if self.relayout:
            q, k, v = (_chunk_copy(x) if copy else x for x, copy in zip((q, k, v),
                                                                        self.relayout))
        if ON_GPU:
            args = self.args.fill((q.data.ptr, k.data.ptr, v.data.ptr, out.data.ptr,
                                   lse.data.ptr))
        else:
            args = [x.view(t) for x, t in zip((q, k, v, out), self.storage)]
            args += [lse, self.scalar]
        self.kernel(self.grid, self.block, args)


def _float32_passes(allow_tf32):
    """tf32 products per float32 product (0: the exact SIMT kernels)."""
    return 1 if allow_tf32 else config.FLOAT32_PASSES


def _forward_config(name, head_dim, causal, allow_tf32=False):
    """The forward's tiles: tensor cores for float16 and bfloat16, tf32 tensor cores
    for float32 (unless FLOAT32_PASSES is 0 and tf32 is not allowed), SIMT otherwise."""
    if name in config.MMA_DTYPES:
        return config.select_forward_mma(head_dim, ops.SIMULATOR, causal)
    if name == "float32" and _float32_passes(allow_tf32):
        return config.select_forward_mma(head_dim, ops.SIMULATOR, causal,
                                         _float32_passes(allow_tf32))
    return config.select_forward(name, head_dim, ops.SIMULATOR)


def _forward(q, k, v, causal, scale, name, allow_tf32=False):
    """The forward's launch for valid q, k, v with at least one query row."""
    cfg = _forward_config(name, q.shape[3], causal, allow_tf32)
    if isinstance(cfg, config.MmaConfig):
        passes = _float32_passes(allow_tf32) if name == "float32" else 1
        return _forward_mma(cfg, q, k, v, causal, scale, name, passes, allow_tf32)
    elements = config.forward_shared_elements(cfg)
    nbytes = config.check_fits(cfg, elements, name)
    acc = _acc_dtype(name)
    store = config.STORAGE[name]
    scale_log2 = acc(scale * LOG2E)
    signature = ([array_type(store, 4)] * 4 + [array_type(acc, 3), scalar_type(scale_log2)])
    kernel = get_kernel(("forward", cfg, name, causal),
                        lambda: build_forward(cfg, name, causal), signature, nbytes)
    return _ForwardLaunch(name, cfg, kernel, q, k, v, causal, (store,) * 4, acc, scale_log2)


def _data_ptr(x):
    return x.ctypes.data if isinstance(x, np.ndarray) else x.data.ptr


#: The tensor-core kernels' tile copies form offsets within a tile (at most 256 rows)
#: in 32 bits: a larger row stride, in bytes, goes through ``_chunk_copy``.
MAX_ROW_STRIDE = 2 ** 31 // 256


def _chunk_ready(x):
    """Whether the tensor-core kernels can copy x's rows in 16-byte chunks as it is:
    unit stride and a multiple of 8 elements on the head dim, 16-byte aligned rows,
    a row stride of at most ``MAX_ROW_STRIDE`` bytes."""
    if x.size == 0:
        return True
    if x.strides[3] != x.itemsize or x.shape[3] % 8 or _data_ptr(x) % 16:
        return False
    if abs(x.strides[1]) > MAX_ROW_STRIDE:
        return False
    return all(stride % 16 == 0 for n, stride in zip(x.shape[:3], x.strides[:3]) if n > 1)


def _chunk_layout(x):
    """x itself when chunk-ready, else ``_chunk_copy(x)``."""
    return x if _chunk_ready(x) else _chunk_copy(x)


def _chunk_copy(x):
    """A chunk-ready copy of x: newly allocated (so aligned), each head's rows
    contiguous (memory order batch, head, row, column; so the row stride is one padded
    row, whatever the number of heads), with the head dim zero-padded to a multiple of 8
    (zero columns add nothing to q.k and are not written out). Its layout is
    ``_chunk_copy_spec(x)``."""
    b, s, h, d = x.shape
    padded = _cdiv(d, 8) * 8
    y = (xp.empty if padded == d else xp.zeros)((b, h, s, padded), x.dtype)
    y = y.transpose(0, 2, 1, 3)
    y[..., :d] = x
    return y


def _chunk_copy_spec(x):
    b, s, h, d = x.shape
    heads_major = ArraySpec.contiguous((b, h, s, _cdiv(d, 8) * 8), x.itemsize)
    st = heads_major.strides
    return ArraySpec((b, s, h, heads_major.shape[3]), (st[0], st[2], st[1], st[3]), x.itemsize)


def _forward_mma(cfg, q, k, v, causal, scale, name, passes=1, allow_tf32=False):
    cfg.check()
    scale_log2 = np.float32(scale * LOG2E)
    tile = np.float32 if name == "float32" else np.uint16     # what the tiles copy
    signature = ([array_type(tile, 4)] * 3 + [array_type(config.STORAGE[name], 4),
                 array_type(np.float32, 3), scalar_type(scale_log2)])
    kernel = get_kernel(("forward_mma", cfg, name, causal, passes),
                        lambda: build_forward_mma(cfg, name, causal, passes), signature,
                        cfg.forward_shared_bytes)
    relayout = tuple(not _chunk_ready(x) for x in (q, k, v))
    storage = (tile,) * 3 + (config.STORAGE[name],)
    return _ForwardLaunch(name, cfg, kernel, q, k, v, causal, storage, np.float32, scale_log2,
                          relayout, allow_tf32)


def attention_backward(dout, q, k, v, out, lse, *, causal=False, softmax_scale=None,
                       deterministic=False, allow_tf32=False):
    """Gradients of ``attention`` with respect to q, k and v.

    Args:
        dout: gradient of the loss with respect to ``out``; q's shape and dtype.
        q, k, v, causal, softmax_scale: as given to ``attention``.
        out, lse: what ``attention(q, k, v, ..., return_lse=True)`` returned.
        deterministic: make dq bitwise reproducible (see below).
        allow_tf32: for float32 inputs, one tf32 product per product, as in
            ``attention`` (about 3x the speed, errors about 1e-3 of the values'
            size); by default float32 takes three tf32 products (float32 accuracy).
            Head dims over 128 run an exact float32 kernel without tensor cores
            either way. Ignored for other dtypes.

    Returns:
        ``(dq, dk, dv)`` with the shapes and dtype of q, k, v. For grouped-query
        attention, dk and dv sum over the query heads that share a kv head.

    The score matrix is recomputed tile by tile from q, k and lse; extra memory is
    O(seqlen): a float32 dQ accumulator and one float per query row. By default dq is
    summed with float atomics, so its last bits may differ from run to run; dk and dv
    are always bitwise reproducible. ``deterministic=True`` gives each group of key
    tiles its own dQ accumulator, summed in a fixed order afterwards: dq is then
    bitwise reproducible on a given GPU, at the price of up to
    ``DETERMINISTIC_MAX_SPLITS`` accumulators (float32, q's size each) and less
    parallelism when batch * nheads_k is small.
    """
    (batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim), scale = _check_inputs(
        q, k, v, causal, softmax_scale)
    _validate.check_flag("deterministic", deterministic)
    _validate.check_flag("allow_tf32", allow_tf32)
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
    tf32 = name == "float32" and _float32_passes(allow_tf32) > 0
    cfg = config.select_backward_mma(head_dim, ops.SIMULATOR, tf32) if (
        tf32 or name in config.MMA_DTYPES) else None
    mma = cfg is not None
    passes = _float32_passes(allow_tf32) if tf32 else 1
    if mma:
        cfg.check_backward()
        nbytes = cfg.backward_shared_bytes
    else:
        cfg = config.select_backward(name, head_dim, ops.SIMULATOR)
        nbytes = config.check_fits(cfg, config.backward_shared_elements(cfg), name)
    n_blocks = _cdiv(seqlen_k, cfg.block_n)
    splits = _deterministic_splits(n_blocks, batch * nheads_k) if deterministic else 1
    # The tensor-core kernel adds dQ in vectors of an 8-column block: pad its head dim
    # to 8. At 16 bits its accumulator is in fragment order (kernels/common.py,
    # dq_acc_place): rows padded to whole query tiles and paired, columns doubled.
    acc_dim = _cdiv(head_dim, 8) * 8 if mma else head_dim
    tiled = mma and not tf32
    if tiled:
        rows = _cdiv(seqlen_q, cfg.block_m) * cfg.block_m // 2
        dq_accum = _empty((splits * batch, rows, nheads, 2 * acc_dim), acc)
    else:
        dq_accum = _empty((splits * batch,) + q.shape[1:3] + (acc_dim,), acc)
    rows_grid = (_cdiv(seqlen_q, ROWS_PER_BLOCK), nheads, batch)
    scale_acc, scale_log2 = acc(scale), acc(scale * LOG2E)
    if mma:
        # One buffer of (lse log2 e, scale Delta) per row, padded to whole query tiles.
        stats = _empty((batch, nheads, 2, _cdiv(seqlen_q, cfg.block_m) * cfg.block_m), acc)
        # The tensor-core kernel reads q, k, v, dout in the chunk layout (16-bit
        # values as uint16); the pre-pass reads dout and out in 16-byte chunks too,
        # and zeroes dq_accum (acc_dim is a multiple of 8).
        tile = np.float32 if tf32 else np.uint16
        chunked = [_chunk_layout(x).view(tile) for x in (q, k, v, dout, out)]
        pre = get_kernel(("stats", name, tiled), lambda: build_stats(name, tiled),
                         [array_type(tile, 4)] * 2
                         + [array_type(acc, 3), array_type(acc, 4),
                            array_type(acc, 4), scalar_type(scale_acc)], 0)
        pre((_cdiv(stats.shape[3], ROWS_PER_BLOCK), nheads, batch), (ROW_THREADS,),
            chunked[3:] + [lse, stats, dq_accum, scale_acc])
        inputs = chunked[:4] + [stats]
        kind = "backward_mma"

        def build(cfg, name, causal, deterministic):
            return build_backward_mma(cfg, name, causal, deterministic, passes)
        signature = [array_type(tile, 4)] * 4 + [array_type(acc, 4)]
    else:
        dq_accum.fill(0)      # a memset on the GPU
        delta = _empty((batch, nheads, seqlen_q), acc)
        pre = get_kernel(("preprocess", name), lambda: build_preprocess(name),
                         [array_type(store, 4)] * 2 + [array_type(acc, 3)], 0)
        pre(rows_grid, (ROW_THREADS,), [_kernel_view(dout), _kernel_view(out), delta])
        inputs = [_kernel_view(x) for x in (q, k, v, dout)] + [lse, delta]
        kind, build = "backward", build_backward
        signature = [array_type(store, 4)] * 4 + [array_type(acc, 3)] * 2
    signature += ([array_type(acc, 4)] + [array_type(store, 4)] * 2
                  + [scalar_type(scale_acc)] * 2)
    main = get_kernel((kind, cfg, name, causal, deterministic, passes),
                      lambda: build(cfg, name, causal, deterministic), signature, nbytes)
    main((splits if deterministic else n_blocks, nheads_k, batch), (cfg.threads,),
         inputs + [dq_accum, _kernel_view(dk), _kernel_view(dv), scale_acc, scale_log2])

    if np.dtype(q.dtype) == np.dtype(acc) and not deterministic and acc_dim == head_dim:
        return dq_accum, dk, dv
    dq = _empty(q.shape, q.dtype)
    # dq is nbflash's own contiguous array: 16-byte chunks per lane when its rows are
    # whole chunks like dq_accum's.
    wide = mma and acc_dim == head_dim
    conv_args = [dq_accum, _kernel_view(dq)]
    conv = get_kernel(("convert", name, wide, tiled), lambda: build_convert(name, wide, tiled),
                      [array_type(x.dtype, 4) for x in conv_args], 0)
    conv(rows_grid, (ROW_THREADS,), conv_args)
    return dq, dk, dv


#: Most dQ accumulators ``attention_backward(..., deterministic=True)`` allocates.
DETERMINISTIC_MAX_SPLITS = 16


def _deterministic_splits(n_blocks, heads):
    """How many blocks share the key tiles of one (batch, kv head) in deterministic
    mode: enough for about two blocks per multiprocessor, at most one per key tile and
    at most DETERMINISTIC_MAX_SPLITS (each split is a float32 copy of dq)."""
    return max(1, min(n_blocks, DETERMINISTIC_MAX_SPLITS,
                      _cdiv(2 * _multiprocessors(), heads)))


_sm_count = {}


def _multiprocessors():
    if ops.SIMULATOR:
        return 2      # small, so that the simulator runs several splits
    device = xp.cuda.runtime.getDevice()
    n = _sm_count.get(device)
    if n is None:
        n = _sm_count[device] = xp.cuda.runtime.getDeviceProperties(device)[
            "multiProcessorCount"]
    return n
