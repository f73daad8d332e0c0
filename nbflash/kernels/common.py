"""Device-side building blocks shared by the forward and backward kernels.

Each ``make_*`` function returns a device function specialised on compile-time
constants (tile sizes, element type); the kernels close over what they need.
"""
import math
import re

import numpy as np
from numba import cuda

from .. import block_info, ops
from .cache import keyed

LOG2E = 1.4426950408889634  # log2(e): exp(x) == exp2(x * LOG2E)
LN2 = 0.6931471805599453    # ln(2): converts a base-2 log-sum-exp back to natural log
NEG_INF = -math.inf


def device(fn):
    """Compile ``fn`` as an inlined device function (plain Python in the simulator)."""
    return cuda.jit(device=True, **ops.jit_options(forceinline=True))(fn)


def kernel(name, key, **options):
    """``cuda.jit`` for a kernel, renamed ``name`` and disk-cached under ``key``.

    ``key`` holds every argument of the factory that builds the kernel (see
    ``cache.keyed``). Numba's disk cache keeps one index file per function name,
    and processes that compile two overloads of one name at once can overwrite
    each other's index and data files, so that one configuration's binary is later
    served for another. Each kernel configuration therefore gets its own name
    (which profilers show, too), and ``_launch`` locks that name's index while
    compiling.
    """
    def jit(fn):
        fn.__name__ = fn.__qualname__ = re.sub(r"\W", "_", name)
        return keyed(cuda.jit(**ops.jit_options(cache=True, **options))(fn), key)

    return jit


def config_name(cfg):
    """A short name for a tile configuration, e.g. ``128x64_d64_4w_qreg`` (a forward's)
    or ``64x128_d128_8w_242`` (a backward's)."""
    parts = [f"{cfg.block_m}x{cfg.block_n}", f"d{cfg.head_dim}"]
    if hasattr(cfg, "sdp_warps_m"):      # the backward's warp grids, by first axes
        parts.append(f"{cfg.warps}w_{cfg.sdp_warps_m}{cfg.dkv_warps_n}{cfg.dq_warps_m}")
    elif hasattr(cfg, "warps"):
        parts.append(f"{cfg.warps}w" + ("_qreg" if cfg.q_in_registers else ""))
    else:
        parts.append(f"{cfg.threads}t{cfg.thread_cols}c")
    return "_".join(parts)


def static_loop(n, body):
    """A device function ``loop(*args)`` running ``body(i, *args)`` for i = 0, ..., n - 1,
    with every i a compile-time constant.

    NVVM leaves long loops rolled, and a register array (mma fragments, accumulators)
    indexed by a run-time counter is moved to local memory. Chained inlined calls,
    one per i, give straight-line code with constant indices: ``#pragma unroll``.
    (A balanced tree of calls types faster but measured 70 more registers on the
    head-dim-128 forward kernel; the chain is kept.)

    Numba types a chain recursively, and more than about 64 links exceed Python's
    recursion limit, so a longer loop is a chain of chains of at most
    ``CHAIN_LINKS`` steps each; every configuration nbflash selects stays within one.
    """
    if n <= CHAIN_LINKS:
        return _chain(n, body, 0)
    loop = _chain(0, body, 0)
    for start in range(0, n, CHAIN_LINKS):
        part = _chain(min(CHAIN_LINKS, n - start), body, start)
        loop = _then(loop, _ignoring_index(part), start)
    return loop


def _ignoring_index(part):
    @device
    def step(i, *args):
        part(*args)

    return step


#: The longest straight chain ``static_loop`` builds.
CHAIN_LINKS = 32


def _chain(n, body, start):
    @device
    def loop(*args):
        pass

    for i in range(start, start + n):
        loop = _then(loop, body, i)
    return loop


def _then(first, body, i):
    @device
    def loop(*args):
        first(*args)
        body(i, *args)

    return loop


def dq_acc_place(row, col):
    """``(acc_row, acc_col)``: where dQ[row, col] sits in the 16-bit tensor-core
    backward's dQ accumulator, which is laid out in mma-fragment order.

    An m16n8 result fragment gives lane (g, t) the four values (row g, cols 2t, 2t+1)
    and (row g + 8, the same cols) of its 16-row block. The accumulator pairs rows
    g and g + 8 of every 16 into one row of twice the columns, and within each 8
    columns puts the lane's four values side by side, so that the backward adds a
    whole fragment with one 16-byte reduction (``ops.red_add_f32x4``), where the
    row-major layout took two of 8 bytes. Its shape is (rows rounded up to a
    multiple of 16) / 2 by twice the (8-padded) head dim: rows 16 i + g and
    16 i + 8 + g are row 8 i + g, and column 8 j + 2 p + e of row half h is column
    16 j + 4 p + 2 h + e."""
    acc_row = ((row >> 4) << 3) + (row & 7)
    acc_col = ((col >> 3) << 4) + ((col & 6) << 1) + ((row & 8) >> 2) + (col & 1)
    return acc_row, acc_col


def make_key_tile_schedule(deterministic, block_n):
    """``schedule(b, batch, seqlen_k) -> (first, stop, step, dq_b)``: the key tiles a
    backward block handles (``range(first, stop, step)``) and the batch row of its
    dQ accumulator slice. By default block x handles key tile x and adds into the
    shared accumulator; deterministic, block x of ``gridDim.x`` handles every
    ``gridDim.x``-th tile from x and owns slice x (see DETERMINISM in
    kernels/backward.py)."""
    if deterministic:
        def schedule(b, batch, seqlen_k):
            split = cuda.blockIdx.x
            return split, (seqlen_k + block_n - 1) // block_n, cuda.gridDim.x, b + batch * split
    else:
        def schedule(b, batch, seqlen_k):
            split = cuda.blockIdx.x
            return split, split + 1, 1, b
    return device(schedule)


def make_query_tile_order(causal):
    """``query_tile()``: the query tile a forward block handles. Causal tiles see more
    keys the later they start, so they are dealt out last tile first: the blocks
    launched at the end of the grid are then the short ones, and the last wave does
    not end on a few long tiles (longest-first scheduling; CUDA starts blocks in
    the order of their index). Without a mask every tile costs the same."""
    if causal:
        def query_tile():
            return cuda.gridDim.x - 1 - cuda.blockIdx.x
    else:
        def query_tile():
            return cuda.blockIdx.x
    return device(query_tile)


key_tile_range = device(block_info.key_tile_range)
query_tile_range = device(block_info.query_tile_range)
tile_needs_mask = device(block_info.tile_needs_mask)


def tf32_split_rounding():
    """The rounding for 3xTF32's split into tf32 parts (its mode does not matter, only
    that each part is a tf32 value): ``ops.to_tf32_rn``, one instruction, where the
    GPU has it (compute capability 9.0 and later; assumed so when no GPU answers,
    as when compiling offline for sm_90), else ``ops.to_tf32``."""
    if ops.SIMULATOR:
        return ops.to_tf32_rn
    try:
        cc = cuda.get_current_device().compute_capability
    except Exception:
        cc = (9, 0)
    return ops.to_tf32_rn if cc >= (9, 0) else ops.to_tf32


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
