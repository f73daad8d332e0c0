"""FlashAttention backward pass, SIMT version (plain CUDA cores, any dtype).

Follows ``reference/tiled.py::flash_backward`` (FlashAttention-2, Dao 2023, Alg. 2).
The N x N probabilities are recomputed tile by tile from Q, K and the forward's lse,
never stored. With P = softmax(S), dP = dO V^T and Delta_i = sum_j P_ij dP_ij:

    dV = P^T dO        dS = P * (dP - Delta)        dQ = scale dS K      dK = scale dS^T Q

and Delta_i = sum_j P_ij (dO_i . V_j) = dO_i . O_i, a cheap per-row dot product.
Three kernels:

1. ``preprocess``: Delta = rowsum(dO * O) (the dQ accumulator is zeroed by a memset;
   the tensor-core backward's ``stats`` pre-pass zeroes it itself).
2. ``main``: one block per (key tile, kv head, batch) keeps K_j, V_j in shared memory
   and dK_j, dV_j in registers, and loops over the query heads of its GQA group and
   the query tiles that see the key tile. dK and dV are owned by exactly one block,
   so they are written once, without atomics. dQ_i gets a contribution from every
   key tile; these are added into the accumulator with float32 atomics (float64 for
   float64 inputs). Atomics keep the work in one pass over S (a separate dQ pass
   would recompute S and dP, 40% more arithmetic); the price is that dQ's summation
   order, and so its last bits, vary from run to run.
3. ``convert``: dQ accumulator -> dQ in the input dtype (not needed for float32 and
   float64, whose accumulator is the output, unless deterministic).

DETERMINISM. By default the grid has one block per key tile and the atomics' order
varies. ``deterministic=True`` launches ``splits`` blocks per (kv head, batch)
instead; block s handles key tiles s, s + splits, s + 2 splits, ... in that order and
adds into its own slice s of a ``(splits * batch, seqlen_q, nheads, head_dim)``
accumulator. Each element of a slice is then added to by one thread, in program
order, and ``convert`` sums the slices in a fixed order: bitwise reproducible for a
given shape and GPU (the split count depends on the SM count).
``deterministic`` is a compile-time flag: the default kernels keep one key tile per
block, without the loop's registers.
"""
import functools
import math

import numpy as np
from numba import cuda, from_dtype

from .. import ops
from ..config import ACCUMULATOR, STORAGE, TileConfig, backward_shared_elements, padded
from .common import (LOG2E, NEG_INF, config_name, device, dq_acc_place, element_codec, kernel,
                     make_key_tile_schedule, make_row_loader, make_tile_loader,
                     query_tile_range, tile_needs_mask)

#: Threads per block of the two row kernels (one warp under the simulator, where each
#: thread is an OS thread), and the query rows each block handles.
ROW_THREADS = 32 if ops.SIMULATOR else 128
ROWS_PER_BLOCK = 32
_ROW_WARPS = ROW_THREADS // 32


def _warp_rows():
    """(lane, first row, row step, row stop) of this thread in a row kernel: each warp
    takes every ``_ROW_WARPS``-th row of the block's ``ROWS_PER_BLOCK``."""
    tid = cuda.threadIdx.x
    row0 = cuda.blockIdx.x * ROWS_PER_BLOCK
    return tid & 31, row0 + (tid >> 5), _ROW_WARPS, row0 + ROWS_PER_BLOCK


warp_rows = device(_warp_rows)


def make_row_dot(dtype_name):
    """``dot(dout, out, b, row, h, lane) -> dO_row . O_row``, summed over the warp: the
    lanes take consecutive head-dim columns, so that every load is one contiguous run
    (a thread per row read 32 rows' columns at a time, one sector each, and took longer
    than the backward's main kernel at large sizes). Every lane gets the sum."""
    ACC_SCALAR = ACCUMULATOR[dtype_name]
    to_acc, _ = element_codec(dtype_name)

    def dot(dout, out, b, row, h, lane):
        total = ACC_SCALAR(0.0)
        for d in range(lane, out.shape[3], 32):
            total += to_acc(dout[b, row, h, d]) * to_acc(out[b, row, h, d])
        for width in (16, 8, 4, 2, 1):
            total += ops.shfl_xor(total, width)
        return total

    return device(dot)


@functools.lru_cache(maxsize=None)
def build_preprocess(dtype_name: str):
    """``preprocess(dout, out, delta)``: delta[b, h, i] = dO_i . O_i.

    Grid ``(ceil(seqlen_q / ROWS_PER_BLOCK), nheads, batch)`` of ``ROW_THREADS``, a warp
    per row."""
    dot = make_row_dot(dtype_name)

    @kernel(f"preprocess_{dtype_name}", dtype_name)
    def preprocess(dout, out, delta):
        lane, first, step, stop = warp_rows()
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        for row in range(first, min(stop, out.shape[1]), step):
            total = dot(dout, out, b, row, h, lane)
            if lane == 0:
                delta[b, h, row] = total

    return preprocess


acc_place = device(dq_acc_place)


@device
def row_major_place(row, col):
    return row, col


#: Bytes per lane of the wide row kernels' loads and stores (``ld.global.v4.u32``).
CHUNK_BYTES = 16


def _chunk_group(chunks):
    """Lanes per row in a wide row kernel, for rows of ``chunks`` 16-byte chunks: the
    least power of two >= chunks, at most a warp (larger rows loop)."""
    group = 1
    while group < chunks and group < 32:
        group *= 2
    return group


chunk_group = device(_chunk_group)


def make_chunk_dot(dtype_name):
    """``dot(x, y)`` of two 16-byte chunks (tuples of four uint32 words) of float16,
    bfloat16 or float32 elements, in float32."""
    if dtype_name == "float32":
        def dot(x, y):
            total = np.float32(0.0)
            for i in range(4):
                total += ops.u32_as_f32(x[i]) * ops.u32_as_f32(y[i])
            return total
    else:
        unpack = ops.unpack_f16x2 if dtype_name == "float16" else ops.unpack_bf16x2

        def dot(x, y):
            total = np.float32(0.0)
            for i in range(4):
                x0, x1 = unpack(x[i])
                y0, y1 = unpack(y[i])
                total += x0 * y0 + x1 * y1
            return total
    return device(dot)


@functools.lru_cache(maxsize=None)
def build_stats(dtype_name: str, tiled: bool = False):
    """``stats(dout, out, lse, stats, dq_accum, scale)``, the tensor-core backward's
    pre-pass: for each query row i, stats[b, h, 0, i] = lse[b, h, i] log2(e) and
    stats[b, h, 1, i] = scale dO_i . O_i (Delta times the softmax scale, so that the
    backward forms scale (dP - Delta) in one fused multiply-add). Rows that see no key
    (lse = -inf) and the padding rows past seqlen_q get +inf and 0, which make their
    probabilities exp2(-inf) = 0. It also zeroes the row in every slice of the dQ
    accumulator (a separate memset was another pass over it): row-major, or
    ``tiled`` in fragment order (``dq_acc_place``), whose rows are padded like
    stats' and are all zeroed; there rows 16 i + g and 16 i + 8 + g share
    accumulator row 8 i + g, and each zeroes one half of it.

    ``stats`` is (batch, nheads, 2, seqlen_q rounded up to whole query tiles), so the
    backward copies a tile's rows as whole 16-byte chunks. dout and out (float16,
    bfloat16 or float32) must be chunk-ready like the tensor-core kernels' inputs
    (unit stride, head dim a multiple of 8, 16-byte aligned rows), dq_accum float32
    with a head dim that is a multiple of 4, 16-byte aligned.

    A group of ``_chunk_group`` lanes takes a row, one 16-byte chunk of dO and of O
    per lane (8 elements at 16 bits), and sums over the group; with 4-byte words per
    lane and a warp per row the pass ran at two thirds of FlashAttention-2's row
    kernel's bandwidth (ncu, H100). Every lane runs the same number of passes over
    the block's rows, so that the shuffles see the whole warp.
    Grid ``(ceil(stats.shape[3] / ROWS_PER_BLOCK), nheads, batch)`` of
    ``ROW_THREADS``."""
    dot = make_chunk_dot(dtype_name)
    EC = CHUNK_BYTES // np.dtype(STORAGE[dtype_name]).itemsize
    INF = np.float32(math.inf)
    LOG2E_32 = np.float32(LOG2E)
    ZERO = np.uint32(0)

    @kernel(f"stats_{dtype_name}" + ("_tiled" if tiled else ""), (dtype_name, tiled))
    def stats_kernel(dout, out, lse, stats, dq_accum, scale):
        tid = cuda.threadIdx.x
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        seqlen_q = out.shape[1]
        batch = out.shape[0]
        chunks = out.shape[3] // EC
        group = chunk_group(chunks)
        part = tid & (group - 1)
        step = ROW_THREADS // group
        row0 = cuda.blockIdx.x * ROWS_PER_BLOCK + tid // group
        for k in range((ROWS_PER_BLOCK + step - 1) // step):
            row = row0 + k * step
            total = np.float32(0.0)
            if row < seqlen_q:
                for c in range(part, chunks, group):
                    total += dot(ops.ld_global_nc_v4_u32(ops.global_addr(dout, b, row, h, EC * c)),
                                 ops.ld_global_nc_v4_u32(ops.global_addr(out, b, row, h, EC * c)))
            width = group >> 1
            while width > 0:
                total += ops.shfl_xor(total, width)
                width >>= 1
            if row < (stats.shape[3] if tiled else seqlen_q):
                acc_row, first, width = row, 0, dq_accum.shape[3]
                if tiled:
                    width >>= 1
                    acc_row, _ = acc_place(row, 0)
                    first = (row >> 3 & 1) * width
                for s in range(dq_accum.shape[0] // batch):     # deterministic slices
                    for c in range(part, width // 4, group):
                        ops.st_global_v4_u32(
                            ops.global_addr(dq_accum, s * batch + b, acc_row, h, first + 4 * c),
                            ZERO, ZERO, ZERO, ZERO)
            if part == 0 and row < stats.shape[3]:
                x = INF
                if row < seqlen_q:
                    x = lse[b, h, row]
                    x = INF if x == -INF else x * LOG2E_32
                    total *= scale
                stats[b, h, 0, row] = x
                stats[b, h, 1, row] = total

    return stats_kernel


@functools.lru_cache(maxsize=None)
def build_convert(dtype_name: str, wide: bool = False, tiled: bool = False):
    """``convert(src, dst)``: dst = src in the input dtype, over (batch, seqlen, heads,
    head_dim); src may hold several deterministic slices (``splits * batch`` rows on
    axis 0), summed in order, and a head dim padded past dst's; it is row-major, or
    ``tiled`` in fragment order (``dq_acc_place``, the 16-bit tensor-core backward's).
    Grid ``(ceil(seqlen / ROWS_PER_BLOCK), heads, batch)`` of ``ROW_THREADS``.

    Element by element, a warp per row as in ``preprocess``; or ``wide`` (float32 src,
    dst of the same head dim, a multiple of 8, both 16-byte aligned with unit stride
    there), with lanes grouped per row as in ``build_stats``: row-major float32 dst,
    a 16-byte chunk per lane; ``tiled`` float16 or bfloat16 dst, two 16-byte chunks
    per lane, in rows g and g + 8 of a 16, from the four chunks of src that hold
    them."""
    _, finish = element_codec(dtype_name)
    finish_d = device(finish)
    name = f"convert_{'wide_' if wide else ''}{'tiled_' if tiled else ''}{dtype_name}"
    if not wide:
        place = acc_place if tiled else row_major_place

        @kernel(name, (dtype_name, wide, tiled))
        def convert(src, dst):
            lane, first, step, stop = warp_rows()
            h = cuda.blockIdx.y
            b = cuda.blockIdx.z
            batch = dst.shape[0]
            for row in range(first, min(stop, dst.shape[1]), step):
                for d in range(lane, dst.shape[3], 32):
                    r, c = place(row, d)
                    total = src[b, r, h, c]
                    for s in range(1, src.shape[0] // batch):   # deterministic slices
                        total += src[s * batch + b, r, h, c]
                    dst[b, row, h, d] = finish_d(total)

        return convert

    EC = CHUNK_BYTES // np.dtype(STORAGE[dtype_name]).itemsize   # dst elements
    if tiled:
        assert EC == 8, dtype_name
        return _build_convert_tiled(dtype_name, name)
    # Wide and row-major: float32 (the tf32 backward's dq), one chunk of src per lane.
    assert EC == 4, dtype_name

    @kernel(name, (dtype_name, wide, tiled))
    def convert_wide(src, dst):
        tid = cuda.threadIdx.x
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        batch = dst.shape[0]
        chunks = dst.shape[3] // EC
        group = chunk_group(chunks)
        part = tid & (group - 1)
        step = ROW_THREADS // group
        stop = min(cuda.blockIdx.x * ROWS_PER_BLOCK + ROWS_PER_BLOCK, dst.shape[1])
        v = cuda.local.array(4, np.float32)
        for row in range(cuda.blockIdx.x * ROWS_PER_BLOCK + tid // group, stop, step):
            for c in range(part, chunks, group):
                load_floats(v, src, b, row, h, EC * c, batch, 1)
                ops.st_global_v4_u32(ops.global_addr(dst, b, row, h, EC * c),
                                     ops.f32_as_u32(v[0]), ops.f32_as_u32(v[1]),
                                     ops.f32_as_u32(v[2]), ops.f32_as_u32(v[3]))

    return convert_wide


@device
def load_floats(v, src, b, row, h, e0, batch, n):
    """v[:4 n] = the 4 n float32 of src[., row, h, e0:] (n 16-byte loads per slice),
    summed over src's deterministic slices."""
    for k in range(n):
        x = ops.ld_global_nc_v4_u32(ops.global_addr(src, b, row, h, e0 + 4 * k))
        for i in range(4):
            v[4 * k + i] = ops.u32_as_f32(x[i])
    for s in range(1, src.shape[0] // batch):
        for k in range(n):
            x = ops.ld_global_nc_v4_u32(ops.global_addr(src, s * batch + b, row, h, e0 + 4 * k))
            for i in range(4):
                v[4 * k + i] += ops.u32_as_f32(x[i])


def _build_convert_tiled(dtype_name, name):
    """The wide convert from a fragment-order accumulator: a group of lanes takes
    accumulator row 8 i + g, which holds query rows 16 i + g and 16 i + 8 + g (see
    ``dq_acc_place``); per lane 16 accumulator columns give 8 columns of each row."""
    pack = ops.pack_f16x2 if dtype_name == "float16" else ops.pack_bf16x2
    HALF = ROWS_PER_BLOCK // 2           # accumulator rows per block
    assert ROWS_PER_BLOCK % 16 == 0

    @kernel(name, (dtype_name, True, True))
    def convert_tiled(src, dst):
        tid = cuda.threadIdx.x
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        batch = dst.shape[0]
        seqlen = dst.shape[1]
        chunks = dst.shape[3] // 8
        group = chunk_group(chunks)
        part = tid & (group - 1)
        step = ROW_THREADS // group
        first = cuda.blockIdx.x * HALF
        v = cuda.local.array(16, np.float32)
        for acc_row in range(first + tid // group, first + HALF, step):
            row = (acc_row >> 3 << 4) + (acc_row & 7)
            if row < seqlen:
                for c in range(part, chunks, group):
                    # Chunk k of the four holds (row, row + 8) x columns 8 c + 2 k, + 1.
                    load_floats(v, src, b, acc_row, h, 16 * c, batch, 4)
                    ops.st_global_v4_u32(ops.global_addr(dst, b, row, h, 8 * c),
                                         pack(v[0], v[1]), pack(v[4], v[5]),
                                         pack(v[8], v[9]), pack(v[12], v[13]))
                    if row + 8 < seqlen:
                        ops.st_global_v4_u32(ops.global_addr(dst, b, row + 8, h, 8 * c),
                                             pack(v[2], v[3]), pack(v[6], v[7]),
                                             pack(v[10], v[11]), pack(v[14], v[15]))

    return convert_tiled


@functools.lru_cache(maxsize=None)
def build_backward(cfg: TileConfig, dtype_name: str, causal: bool,
                   deterministic: bool = False):
    """The main backward kernel
    ``(q, k, v, dout, lse, delta, dq_accum, dk, dv, scale, scale_log2)``.

    Launch with grid ``(ceil(seqlen_k / block_n), nheads_k, batch)``, ``cfg.threads``
    threads and ``backward_shared_elements(cfg)`` accumulator-sized elements of
    dynamic shared memory.
    """
    BM, BN, D, NT, TN = cfg.block_m, cfg.block_n, cfg.head_dim, cfg.threads, cfg.thread_cols
    TM = cfg.thread_rows
    RM, RN, RD = BM // TM, BN // TN, D // TN   # per thread: S rows, S columns, head-dim columns
    RK = BN // TM                              # per thread: dK/dV rows
    ROW, SROW = padded(D), padded(BN)
    ACC = from_dtype(ACCUMULATOR[dtype_name])   # Numba type, for shared/local arrays
    CAUSAL = causal
    key_tiles = make_key_tile_schedule(deterministic, BN)

    OFF_K = 0
    OFF_V = OFF_K + BN * ROW
    OFF_Q = OFF_V + BN * ROW
    OFF_DO = OFF_Q + BM * ROW
    OFF_P = OFF_DO + BM * ROW
    OFF_DS = OFF_P + BM * SROW
    OFF_LSE = OFF_DS + BM * SROW
    OFF_DELTA = OFF_LSE + BM
    assert OFF_DELTA + BM == backward_shared_elements(cfg)

    to_acc, from_acc = element_codec(dtype_name)
    load_kv = make_tile_loader(BN, D, NT, to_acc)
    load_q = make_tile_loader(BM, D, NT, to_acc)
    load_rows = make_row_loader(BM, NT)

    def probabilities(p_tile, ds_tile, q_tile, k_tile, v_tile, do_tile, lse_row, delta_row,
                      m0, n0, seqlen_q, seqlen_k, head_dim, scale_log2, masked, ty, tx):
        """P = exp2(S * scale_log2 - lse * log2 e) and dS = P (dO V^T - Delta), for this
        thread's RM x RN entries. Masked entries and rows with lse = -inf give P = 0."""
        s = cuda.local.array((RM, RN), ACC)
        dp = cuda.local.array((RM, RN), ACC)
        for i in range(RM):
            for j in range(RN):
                s[i, j] = 0.0
                dp[i, j] = 0.0
        for d in range(head_dim):
            for i in range(RM):
                qv = q_tile[ty + TM * i, d]
                dov = do_tile[ty + TM * i, d]
                for j in range(RN):
                    s[i, j] += qv * k_tile[tx + TN * j, d]
                    dp[i, j] += dov * v_tile[tx + TN * j, d]
        for i in range(RM):
            r = ty + TM * i
            lse_log2 = lse_row[r] * LOG2E
            for j in range(RN):
                c = tx + TN * j
                visible = lse_log2 != NEG_INF
                if masked:
                    key = n0 + c
                    if key >= seqlen_k or (CAUSAL and key > m0 + r + seqlen_k - seqlen_q):
                        visible = False
                # fma: one rounding of S c - lse log2(e), relative to the (small) result.
                p = math.exp2(cuda.fma(s[i, j], scale_log2, -lse_log2)) if visible else 0.0
                p_tile[r, c] = p
                ds_tile[r, c] = p * (dp[i, j] - delta_row[r])

    def accumulate_dk_dv(dk, dv, p_tile, ds_tile, q_tile, do_tile, ty, tx):
        """dV += P^T dO and dK += dS^T Q for this thread's RK x RD entries."""
        for r in range(BM):
            for j in range(RD):
                c = tx + TN * j
                qv = q_tile[r, c]
                dov = do_tile[r, c]
                for i in range(RK):
                    n = ty + TM * i
                    dv[i, j] += p_tile[r, n] * dov
                    dk[i, j] += ds_tile[r, n] * qv

    def add_dq(dq_accum, ds_tile, k_tile, b, m0, h, seqlen_q, head_dim, scale, ty, tx):
        """dQ_i += scale dS K_j, added into the accumulator with atomics."""
        part = cuda.local.array((RM, RD), ACC)
        for i in range(RM):
            for j in range(RD):
                part[i, j] = 0.0
        for n in range(BN):
            for i in range(RM):
                dsv = ds_tile[ty + TM * i, n]
                for j in range(RD):
                    part[i, j] += dsv * k_tile[n, tx + TN * j]
        for i in range(RM):
            row = m0 + ty + TM * i
            if row < seqlen_q:
                for j in range(RD):
                    c = tx + TN * j
                    if c < head_dim:
                        cuda.atomic.add(dq_accum, (b, row, h, c), part[i, j] * scale)

    probabilities_d = device(probabilities)
    dk_dv_d = device(accumulate_dk_dv)
    add_dq_d = device(add_dq)

    @kernel(f"backward_{dtype_name}_{config_name(cfg)}_{'causal' if causal else 'full'}"
            + ("_deterministic" if deterministic else ""),
            (cfg, dtype_name, causal, deterministic))
    def backward(q, k, v, dout, lse, delta, dq_accum, dk, dv, scale, scale_log2):
        h_kv = cuda.blockIdx.y
        b = cuda.blockIdx.z
        tid = cuda.threadIdx.x
        ty = tid // TN
        tx = tid - ty * TN
        seqlen_q = q.shape[1]
        seqlen_k = k.shape[1]
        head_dim = q.shape[3]
        group = q.shape[2] // k.shape[2]
        split, stop, step, dq_b = key_tiles(b, q.shape[0], seqlen_k)   # see DETERMINISM

        smem = cuda.shared.array(0, ACC)
        k_tile = ops.smem_view2d(smem, OFF_K, BN, ROW)
        v_tile = ops.smem_view2d(smem, OFF_V, BN, ROW)
        q_tile = ops.smem_view2d(smem, OFF_Q, BM, ROW)
        do_tile = ops.smem_view2d(smem, OFF_DO, BM, ROW)
        p_tile = ops.smem_view2d(smem, OFF_P, BM, SROW)
        ds_tile = ops.smem_view2d(smem, OFF_DS, BM, SROW)
        lse_row = smem[OFF_LSE:OFF_LSE + BM]
        delta_row = smem[OFF_DELTA:OFF_DELTA + BM]

        dk_acc = cuda.local.array((RK, RD), ACC)
        dv_acc = cuda.local.array((RK, RD), ACC)
        for n_block in range(split, stop, step):
            n0 = n_block * BN
            cuda.syncthreads()   # the previous key tile's K and V are free
            # ---- Prologue: this block's key/value tile stays in shared memory
            load_kv(k_tile, k, b, n0, seqlen_k, h_kv, head_dim, tid)
            load_kv(v_tile, v, b, n0, seqlen_k, h_kv, head_dim, tid)
            for i in range(RK):
                for j in range(RD):
                    dk_acc[i, j] = 0.0
                    dv_acc[i, j] = 0.0

            # ---- Mainloop over the group's query heads and the query tiles that see K_j
            m_start, m_end = query_tile_range(n_block, BM, BN, seqlen_q, seqlen_k, CAUSAL)
            for h in range(h_kv * group, (h_kv + 1) * group):
                for m_block in range(m_start, m_end):
                    m0 = m_block * BM
                    cuda.syncthreads()  # everyone is done with the previous Q, dO, P, dS
                    load_q(q_tile, q, b, m0, seqlen_q, h, head_dim, tid)
                    load_q(do_tile, dout, b, m0, seqlen_q, h, head_dim, tid)
                    load_rows(lse_row, lse, b, h, m0, seqlen_q, NEG_INF, tid)
                    load_rows(delta_row, delta, b, h, m0, seqlen_q, 0.0, tid)
                    cuda.syncthreads()
                    masked = tile_needs_mask(m_block, n_block, BM, BN, seqlen_q, seqlen_k,
                                             CAUSAL)
                    probabilities_d(p_tile, ds_tile, q_tile, k_tile, v_tile, do_tile, lse_row,
                                    delta_row, m0, n0, seqlen_q, seqlen_k, head_dim, scale_log2,
                                    masked, ty, tx)
                    cuda.syncthreads()
                    dk_dv_d(dk_acc, dv_acc, p_tile, ds_tile, q_tile, do_tile, ty, tx)
                    add_dq_d(dq_accum, ds_tile, k_tile, dq_b, m0, h, seqlen_q, head_dim, scale,
                             ty, tx)

            # ---- Epilogue: dK_j and dV_j are complete; write them once
            for i in range(RK):
                key = n0 + ty + TM * i
                if key < seqlen_k:
                    for j in range(RD):
                        c = tx + TN * j
                        if c < head_dim:
                            dk[b, key, h_kv, c] = from_acc(dk_acc[i, j] * scale)
                            dv[b, key, h_kv, c] = from_acc(dv_acc[i, j])

    return backward
