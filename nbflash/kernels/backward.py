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
from ..config import ACCUMULATOR, TileConfig, backward_shared_elements, padded
from .common import (LOG2E, NEG_INF, config_name, device, element_codec, kernel,
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


def make_row_dot(dtype_name, pairs=False):
    """``dot(dout, out, b, row, h, lane) -> dO_row . O_row``, summed over the warp: the
    lanes take consecutive head-dim columns, so that every load is one contiguous run
    (a thread per row read 32 rows' columns at a time, one sector each, and took longer
    than the backward's main kernel at large sizes). Every lane gets the sum.
    With ``pairs`` (16-bit dtypes), the rows come as uint32 words of two packed
    elements: one load per pair, not per element."""
    ACC_SCALAR = ACCUMULATOR[dtype_name]
    if pairs:
        unpack = ops.unpack_f16x2 if dtype_name == "float16" else ops.unpack_bf16x2

        def term(x, y):
            x0, x1 = unpack(x)
            y0, y1 = unpack(y)
            return x0 * y0 + x1 * y1
    else:
        to_acc, _ = element_codec(dtype_name)

        def term(x, y):
            return to_acc(x) * to_acc(y)

    term_d = device(term)

    def dot(dout, out, b, row, h, lane):
        total = ACC_SCALAR(0.0)
        for d in range(lane, out.shape[3], 32):
            total += term_d(dout[b, row, h, d], out[b, row, h, d])
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


@functools.lru_cache(maxsize=None)
def build_stats(dtype_name: str, pairs: bool = False):
    """``stats(dout, out, lse, stats, dq_pairs, scale)``, the tensor-core backward's
    pre-pass: for each query row i, stats[b, h, 0, i] = lse[b, h, i] log2(e) and
    stats[b, h, 1, i] = scale dO_i . O_i (Delta times the softmax scale, so that the
    backward forms scale (dP - Delta) in one fused multiply-add). Rows that see no key
    (lse = -inf) and the padding rows past seqlen_q get +inf and 0, which make their
    probabilities exp2(-inf) = 0. It also zeroes the row in every slice of the dQ
    accumulator, seen as complex64 column pairs (one 8-byte store per pair; a
    separate memset was another pass over it).

    ``stats`` is (batch, nheads, 2, seqlen_q rounded up to whole query tiles), so the
    backward copies a tile's rows as whole 16-byte chunks. With ``pairs``, dout and
    out come as uint32 views of packed element pairs (even head dims, 4-byte aligned
    rows). Grid ``(ceil(stats.shape[3] / ROWS_PER_BLOCK), nheads, batch)`` of
    ``ROW_THREADS``."""
    dot = make_row_dot(dtype_name, pairs)
    INF = np.float32(math.inf)
    LOG2E_32 = np.float32(LOG2E)
    ZERO_PAIR = np.complex64(0)

    @kernel(f"stats_{dtype_name}{'_pairs' if pairs else ''}", (dtype_name, pairs))
    def stats_kernel(dout, out, lse, stats, dq_pairs, scale):
        lane, first, step, stop = warp_rows()
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        seqlen_q = out.shape[1]
        batch = out.shape[0]
        for row in range(first, min(stop, stats.shape[3]), step):
            if row < seqlen_q:
                total = np.float32(dot(dout, out, b, row, h, lane)) * scale
                x = lse[b, h, row]
                x = INF if x == -INF else x * LOG2E_32
                for s in range(dq_pairs.shape[0] // batch):     # deterministic slices
                    for c in range(lane, dq_pairs.shape[3], 32):
                        dq_pairs[s * batch + b, row, h, c] = ZERO_PAIR
            else:
                total = np.float32(0.0)
                x = INF
            if lane == 0:
                stats[b, h, 0, row] = x
                stats[b, h, 1, row] = total

    return stats_kernel


@functools.lru_cache(maxsize=None)
def build_convert(dtype_name: str, pairs: bool = False):
    """``convert(src, dst)``: dst = src in the input dtype, over (batch, seqlen, heads,
    head_dim); src may hold several deterministic slices (``splits * batch`` rows on
    axis 0), summed in order, and a head dim padded past dst's.
    Grid ``(ceil(seqlen / ROWS_PER_BLOCK), heads, batch)`` of ``ROW_THREADS``, a warp per
    row as in ``preprocess``.

    With ``pairs`` (16-bit outputs of even head dim), src comes as complex64 column
    pairs and dst as uint32 words of two packed elements: each pair is one 8-byte load
    and one 4-byte store (per element, the pass ran at half the memory bandwidth). A
    complex sum adds the two columns separately, in the same slice order."""
    if pairs:
        pack = ops.pack_f16x2 if dtype_name == "float16" else ops.pack_bf16x2

        def finish(total):
            return pack(total.real, total.imag)
    else:
        _, finish = element_codec(dtype_name)

    finish_d = device(finish)

    @kernel(f"convert{'_pairs' if pairs else ''}_{dtype_name}", (dtype_name, pairs))
    def convert(src, dst):
        lane, first, step, stop = warp_rows()
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        batch = dst.shape[0]
        for row in range(first, min(stop, dst.shape[1]), step):
            for d in range(lane, dst.shape[3], 32):
                total = src[b, row, h, d]
                for s in range(1, src.shape[0] // batch):   # deterministic slices
                    total += src[s * batch + b, row, h, d]
                dst[b, row, h, d] = finish_d(total)

    return convert


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
