"""FlashAttention forward pass, SIMT version (plain CUDA cores, any dtype).

Follows ``reference/tiled.py::flash_forward`` (FlashAttention-2, Dao 2023, Alg. 1).
One thread block per (query tile, head, batch):

    Prologue   load the query tile Q_i into shared memory; m = -inf, l = 0, acc = 0
    Mainloop   for each key tile j in key_tile_range (tiles above the causal
               diagonal are skipped):
                 load K_j, V_j into shared memory
                 S = Q_i K_j^T                          (masked to -inf where needed)
                 m_new = max(m, rowmax S);  P = exp2((S - m_new) c)
                 alpha = exp2((m - m_new) c);  l = alpha l + rowsum P
                 acc = alpha acc + P V_j
    Epilogue   O_i = acc / l;  lse_i = (m c + log2 l) ln 2   (0 and -inf for rows
               that see no key)

with c = softmax_scale * log2(e), so exp(scale x) = exp2(c x). Scores and the running
max stay unscaled: subtracting before scaling keeps the exponent's rounding error
relative to S - m (small where P matters) rather than to S itself.

Shared memory holds Q_i, K_j, V_j and S (float32; float64 for float64 inputs); the
output accumulator lives in registers, ``rows x cols`` per thread. Nothing of size
seqlen_q x seqlen_k exists anywhere.
"""
import functools
import math

import numpy as np
from numba import cuda, from_dtype

from .. import ops
from ..config import ACCUMULATOR, TileConfig, forward_shared_elements, padded
from .common import (LN2, NEG_INF, config_name, device, element_codec, kernel,
                     key_tile_range, make_query_tile_order, make_tile_loader,
                     tile_needs_mask)


@functools.lru_cache(maxsize=None)
def build_forward(cfg: TileConfig, dtype_name: str, causal: bool):
    """The forward kernel ``(q, k, v, o, lse, scale_log2)`` for one configuration.

    Launch with grid ``(ceil(seqlen_q / block_m), nheads, batch)``, ``cfg.threads``
    threads and ``forward_shared_elements(cfg)`` accumulator-sized elements of
    dynamic shared memory. ``scale_log2`` is ``softmax_scale * log2(e)``.
    """
    BM, BN, D, NT, TN = cfg.block_m, cfg.block_n, cfg.head_dim, cfg.threads, cfg.thread_cols
    TM = cfg.thread_rows
    RM, RN, RD = BM // TM, BN // TN, D // TN   # per thread: rows, S columns, O columns
    ROW, SROW = padded(D), padded(BN)          # shared row strides
    ACC = from_dtype(ACCUMULATOR[dtype_name])   # Numba type, for shared/local arrays
    CAUSAL = causal
    query_tile = make_query_tile_order(causal)

    # Shared-memory layout, in accumulator elements.
    OFF_Q = 0
    OFF_K = OFF_Q + BM * ROW
    OFF_V = OFF_K + BN * ROW
    OFF_S = OFF_V + BN * ROW
    OFF_M = OFF_S + BM * SROW
    OFF_L = OFF_M + BM
    OFF_ALPHA = OFF_L + BM
    assert OFF_ALPHA + BM == forward_shared_elements(cfg)

    to_acc, from_acc = element_codec(dtype_name)
    load_q = make_tile_loader(BM, D, NT, to_acc)
    load_kv = make_tile_loader(BN, D, NT, to_acc)

    def scores(s_tile, q_tile, k_tile, m0, n0, seqlen_q, seqlen_k, head_dim, masked, ty, tx):
        """s_tile = Q K^T for this thread's RM x RN entries, -inf where masked."""
        s = cuda.local.array((RM, RN), ACC)
        for i in range(RM):
            for j in range(RN):
                s[i, j] = 0.0
        for d in range(head_dim):
            for i in range(RM):
                qv = q_tile[ty + TM * i, d]
                for j in range(RN):
                    s[i, j] += qv * k_tile[tx + TN * j, d]
        for i in range(RM):
            r = ty + TM * i
            for j in range(RN):
                c = tx + TN * j
                x = s[i, j]
                if masked:
                    key = n0 + c
                    if key >= seqlen_k or (CAUSAL and key > m0 + r + seqlen_k - seqlen_q):
                        x = NEG_INF
                s_tile[r, c] = x

    def online_softmax_row(s_tile, m_row, l_row, alpha_row, r, scale_log2):
        """One row's online-softmax update; turns the row of S into P in place.

        A row that has seen no visible key keeps m = -inf; its P is 0 and its alpha 1,
        so no inf - inf (NaN) is ever formed.
        """
        m_old = m_row[r]
        m_new = m_old
        for c in range(BN):
            x = s_tile[r, c]
            # NaN-sticky: max() would drop a NaN score while m_new is still -inf.
            if x > m_new or x != x:
                m_new = x
        if m_new == NEG_INF:
            for c in range(BN):
                s_tile[r, c] = 0.0
            alpha_row[r] = 1.0
            return
        row_sum = 0.0
        for c in range(BN):
            p = math.exp2((s_tile[r, c] - m_new) * scale_log2)
            s_tile[r, c] = p
            row_sum += p
        alpha = math.exp2((m_old - m_new) * scale_log2)   # 0 when m_old is -inf
        alpha_row[r] = alpha
        l_row[r] = l_row[r] * alpha + row_sum
        m_row[r] = m_new

    def accumulate_pv(acc, p_tile, v_tile, alpha_row, ty, tx):
        """acc = alpha * acc + P V for this thread's RM x RD output entries."""
        for i in range(RM):
            alpha = alpha_row[ty + TM * i]
            for j in range(RD):
                acc[i, j] *= alpha
        for c in range(BN):
            for i in range(RM):
                p = p_tile[ty + TM * i, c]
                for j in range(RD):
                    acc[i, j] += p * v_tile[c, tx + TN * j]

    scores_d = device(scores)
    softmax_d = device(online_softmax_row)
    pv_d = device(accumulate_pv)

    @kernel(f"forward_{dtype_name}_{config_name(cfg)}_{'causal' if causal else 'full'}",
            (cfg, dtype_name, causal))
    def forward(q, k, v, o, lse, scale_log2):
        m_block = query_tile()
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        tid = cuda.threadIdx.x
        ty = tid // TN
        tx = tid - ty * TN
        seqlen_q = q.shape[1]
        seqlen_k = k.shape[1]
        head_dim = q.shape[3]
        h_kv = h // (q.shape[2] // k.shape[2])
        m0 = m_block * BM

        smem = cuda.shared.array(0, ACC)
        q_tile = ops.smem_view2d(smem, OFF_Q, BM, ROW)
        k_tile = ops.smem_view2d(smem, OFF_K, BN, ROW)
        v_tile = ops.smem_view2d(smem, OFF_V, BN, ROW)
        s_tile = ops.smem_view2d(smem, OFF_S, BM, SROW)
        m_row = smem[OFF_M:OFF_M + BM]
        l_row = smem[OFF_L:OFF_L + BM]
        alpha_row = smem[OFF_ALPHA:OFF_ALPHA + BM]

        # ---- Prologue
        load_q(q_tile, q, b, m0, seqlen_q, h, head_dim, tid)
        if tid < BM:
            m_row[tid] = NEG_INF
            l_row[tid] = 0.0
        acc = cuda.local.array((RM, RD), ACC)
        for i in range(RM):
            for j in range(RD):
                acc[i, j] = 0.0

        # ---- Mainloop over key/value tiles
        n_start, n_end = key_tile_range(m_block, BM, BN, seqlen_q, seqlen_k, CAUSAL)
        for n_block in range(n_start, n_end):
            n0 = n_block * BN
            cuda.syncthreads()  # everyone is done with the previous K, V and P
            load_kv(k_tile, k, b, n0, seqlen_k, h_kv, head_dim, tid)
            load_kv(v_tile, v, b, n0, seqlen_k, h_kv, head_dim, tid)
            cuda.syncthreads()
            masked = tile_needs_mask(m_block, n_block, BM, BN, seqlen_q, seqlen_k, CAUSAL)
            scores_d(s_tile, q_tile, k_tile, m0, n0, seqlen_q, seqlen_k, head_dim, masked,
                     ty, tx)
            cuda.syncthreads()
            if tid < BM:
                softmax_d(s_tile, m_row, l_row, alpha_row, tid, scale_log2)
            cuda.syncthreads()
            pv_d(acc, s_tile, v_tile, alpha_row, ty, tx)

        # ---- Epilogue
        cuda.syncthreads()
        for i in range(RM):
            r = ty + TM * i
            row = m0 + r
            if row < seqlen_q:
                l = l_row[r]
                inv_l = 1.0 / l if l > 0.0 else 0.0   # rows that saw no key give 0
                for j in range(RD):
                    c = tx + TN * j
                    if c < head_dim:
                        o[b, row, h, c] = from_acc(acc[i, j] * inv_l)
        if tid < BM and m0 + tid < seqlen_q:
            l = l_row[tid]
            m = m_row[tid]
            lse[b, h, m0 + tid] = (m * scale_log2 + math.log2(l)) * LN2 if l != 0.0 else NEG_INF

    return forward
