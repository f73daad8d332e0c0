"""Device-side building blocks shared by the forward and backward kernels.

Each ``make_*`` function returns a device function specialised on compile-time
constants (tile sizes, element type); the kernels close over what they need.
"""
import math

import numpy as np
from numba import cuda

from .. import block_info, ops

LOG2E = 1.4426950408889634  # log2(e): exp(x) == exp2(x * LOG2E)
LN2 = 0.6931471805599453    # ln(2): converts a base-2 log-sum-exp back to natural log
NEG_INF = -math.inf


def device(fn):
    """Compile ``fn`` as an inlined device function (plain Python in the simulator)."""
    return cuda.jit(device=True, **ops.jit_options(forceinline=True))(fn)


def static_loop(n, body):
    """A device function ``loop(*args)`` running ``body(i, *args)`` for i = 0, ..., n - 1,
    with every i a compile-time constant.

    NVVM leaves long loops rolled, and a register array (mma fragments, accumulators)
    indexed by a run-time counter is moved to local memory. Chained inlined calls,
    one per i, give straight-line code with constant indices: ``#pragma unroll``.
    (A balanced tree of calls types faster but measured 70 more registers on the
    head-dim-128 forward kernel; the chain is kept.)
    """
    @device
    def loop(*args):
        pass

    for i in range(n):
        loop = _then(loop, body, i)
    return loop


def _then(first, body, i):
    @device
    def loop(*args):
        first(*args)
        body(i, *args)

    return loop


key_tile_range = device(block_info.key_tile_range)
query_tile_range = device(block_info.query_tile_range)
tile_needs_mask = device(block_info.tile_needs_mask)


def element_codec(dtype_name):
    """Device functions ``(to_acc, from_acc)`` converting one stored element.

    bfloat16 is stored as its upper 16 bits of a float32, so widening is a shift and
    narrowing rounds to nearest even (NaN kept quiet), as CUDA's ``__float2bfloat16``.
    """
    if dtype_name == "float16":
        def to_acc(x):
            return np.float32(x)

        def from_acc(x):
            return np.float16(x)
    elif dtype_name == "bfloat16":
        def to_acc(x):
            return ops.u32_as_f32(np.uint32(x) << np.uint32(16))

        def from_acc(x):
            u = ops.f32_as_u32(np.float32(x))
            if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
                return np.uint16((u >> np.uint32(16)) | np.uint32(0x40))
            rounding = np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
            return np.uint16((u + rounding) >> np.uint32(16))
    elif dtype_name == "float32":
        def to_acc(x):
            return np.float32(x)

        def from_acc(x):
            return np.float32(x)
    elif dtype_name == "float64":
        def to_acc(x):
            return np.float64(x)

        def from_acc(x):
            return np.float64(x)
    else:
        raise ValueError(f"no kernels for dtype {dtype_name}")
    return device(to_acc), device(from_acc)


def make_tile_loader(rows, cols, threads, to_acc):
    """``load(tile, src, b, row0, n_rows, head, head_dim, tid)``.

    Fills ``tile[r, c] = src[b, row0 + r, head, c]`` for the ``rows x cols`` tile,
    widened to the accumulator type, with zeros outside ``n_rows`` and ``head_dim``,
    so that padded rows and columns contribute nothing to dot products. All threads
    of the block share the work; consecutive threads take consecutive columns, so
    the global reads coalesce when the head dim is the unit-stride axis.
    """
    def load(tile, src, b, row0, n_rows, head, head_dim, tid):
        for idx in range(tid, rows * cols, threads):
            r = idx // cols
            c = idx - r * cols
            row = row0 + r
            if row < n_rows and c < head_dim:
                tile[r, c] = to_acc(src[b, row, head, c])
            else:
                tile[r, c] = 0.0

    return device(load)


def make_row_loader(rows, threads):
    """``load(dst, src, b, head, row0, n_rows, fill, tid)``: ``dst[r] = src[b, head, row0 + r]``
    (a per-row statistic such as lse), ``fill`` past the end."""
    def load(dst, src, b, head, row0, n_rows, fill, tid):
        for r in range(tid, rows, threads):
            if row0 + r < n_rows:
                dst[r] = src[b, head, row0 + r]
            else:
                dst[r] = fill

    return device(load)
