"""FlashAttention backward pass on tensor cores (float16 and bfloat16).

The algorithm of ``backward.py`` (and ``reference/tiled.py::flash_backward``) in the
FlashAttention-2 arrangement. One thread block per (key tile, kv head, batch) keeps
K_j and V_j in shared memory and dK_j, dV_j in registers; each warp owns 16 keys.
For every query head of the GQA group and every query tile i that sees the keys:

    S^T  = K_j Q_i^T                      (keys are the mma's M dimension, so each
    P^T  = exp2(S^T c - lse_i log2 e)      warp's rows of P^T and dS^T are its keys
    dP^T = V_j dO_i^T                      and stay in registers)
    dS^T = P^T * (dP^T - Delta_i) * scale  (the gradient of the logits)
    dV_j += P^T dO_i                      (P^T's accumulators are an A-fragment)
    dK_j += dS^T Q_i
    dQ_i += dS K_j                        (dS^T goes through shared memory, each warp
                                           sums all keys for 16 query rows and some
                                           columns, float32 atomic adds of column
                                           pairs into the dQ accumulator)

with c = softmax_scale * log2(e). P^T and dP^T are both float32 when dS^T is formed,
as in FlashAttention-2; P^T is rounded to 16 bits only as the A operand of dV's product.
softmax_scale is applied to dS before it is rounded to 16 bits for the dK and dQ
products: dP alone can exceed the float16 range when the
values are large (|dP| ~ |dO| |V| sqrt(d)), while scale * dS is the gradient of the
logits, bounded by the outputs' size.

Q_i, dO_i and the rows' statistics stream through two stages of shared memory:
tile i+1's are copied with cp.async during all of tile i's work. The statistics come
from the pre-pass as one float32 buffer ``stats[b, h, 0 | 1, row]`` = (lse log2 e,
Delta), padded to whole query tiles, so that they travel by cp.async like the tiles;
query rows past seqlen_q and rows that see no key carry lse log2 e = +inf there, so
their P is exp2(-inf) = 0 without a special case.
"""
import functools

import numpy as np
from numba import cuda, from_dtype

from .. import ops
from ..config import MmaConfig, tile_row
from .common import (NEG_INF, config_name, device, element_codec, kernel,
                     make_key_tile_schedule, query_tile_range, static_loop, tile_needs_mask)
from .forward_mma import make_mma_tile_ops


@functools.lru_cache(maxsize=None)
def build_backward_mma(cfg: MmaConfig, dtype_name: str, causal: bool,
                       deterministic: bool = False):
    """The tensor-core backward kernel
    ``(q, k, v, dout, stats, dq_accum, dk, dv, scale, scale_log2)``.

    q, k, v, dout are uint16 views; dk, dv in their storage type; stats float32
    (batch, nheads, 2, seqlen_q rounded up to block_m), see ``build_stats``; dq_accum
    float32 like q, or (splits * batch, ...) for
    the deterministic mode (grid x = splits, see kernels/backward.py), its head dim
    rounded up to a multiple of 8. ``cfg.block_m`` is the query
    tile, ``cfg.block_n`` the key tile (16 keys per warp). Launch with grid
    ``(ceil(seqlen_k / block_n), nheads_k, batch)``, ``cfg.threads`` threads and
    ``cfg.backward_shared_bytes`` bytes of dynamic shared memory.
    """
    BM, BN, D, NT = cfg.block_m, cfg.block_n, cfg.head_dim, cfg.threads
    NW = cfg.warps
    assert BN == 16 * NW, cfg
    assert BM % 16 == 0 and BM <= 16 * NW, cfg
    KS = D // 16          # k-steps over the head dim
    NQ = BM // 8          # 8-query n-tiles of S^T
    KQ = BM // 16         # k-steps of 16 over the queries
    DT = D // 8           # 8-column n-tiles of dK, dV, dQ
    KK = BN // 16         # k-steps of 16 over the keys (dQ = dS K)
    # Two column passes at large head dims keep dQ's accumulator small; with more
    # warps than 16-row blocks they give the spare warps work.
    DQ_PASSES = 2 if D >= 128 or BM // 16 < NW else 1
    DTP = DT // DQ_PASSES  # dQ column n-tiles per pass
    # dQ's work units: 16 query rows by one pass's columns, dealt round-robin to the
    # warps (64 x 128 tiles over 8 warps: 4 row blocks x 2 passes, one unit per warp).
    DQ_UNITS = (BM // 16) * DQ_PASSES
    CAUSAL = causal
    key_tiles = make_key_tile_schedule(deterministic, BN)
    ZERO = np.float32(0.0)
    MINUS_INF = np.float32(NEG_INF)

    # Shared memory, in 16-bit elements: K, V, two stages of (Q, dO), dS^T, then two
    # stages of the float32 rows (lse log2 e, then Delta). Stage s of Q is at
    # OFF_Q + s * QSTAGE, its dO at OFF_DO + s * QSTAGE, its rows at float s * RSTAGE.
    # Tiles are swizzled (forward_mma.make_mma_tile_ops), rows of cfg.row elements.
    ROW = cfg.row
    QSTAGE = 2 * BM * ROW
    RSTAGE = 2 * BM
    OFF_K = 0
    OFF_V = OFF_K + BN * ROW
    OFF_Q = OFF_V + BN * ROW
    OFF_DO = OFF_Q + BM * ROW
    OFF_DS = OFF_Q + 2 * QSTAGE       # dS^T: BN rows (keys) of BM queries
    OFF_ROWS = OFF_DS + BN * tile_row(BM, 2)
    assert OFF_ROWS * 2 + 2 * RSTAGE * 4 == cfg.backward_shared_bytes
    ROW_CHUNKS = BM // 4              # 16-byte chunks of one statistic's rows
    assert 2 * ROW_CHUNKS <= NT, cfg

    make_loader, make_offset, mma, pack, _ = make_mma_tile_ops(cfg, dtype_name)
    load_kv = make_loader(BN)
    load_q = make_loader(BM)
    kv_offset = q_offset = make_offset(D)
    ds_offset = make_offset(BM)
    _, from_acc = element_codec(dtype_name)
    F32 = from_dtype(np.float32)

    def load_query_tile(smem_base, stage, q, dout, stats, b, h, m0, seqlen_q, head_dim, tid):
        """cp.async of Q_i, dO_i and the rows' (lse log2 e, Delta) into ``stage``."""
        qs = stage * QSTAGE
        load_q(smem_base, OFF_Q + qs, q, b, m0, seqlen_q, h, head_dim, tid)
        load_q(smem_base, OFF_DO + qs, dout, b, m0, seqlen_q, h, head_dim, tid)
        if tid < 2 * ROW_CHUNKS:
            which = tid // ROW_CHUNKS          # 0: lse log2 e, 1: Delta
            chunk = tid - which * ROW_CHUNKS
            dst = smem_base + 2 * OFF_ROWS + 4 * (stage * RSTAGE + which * BM + 4 * chunk)
            ops.cp_async_16(dst, ops.global_addr(stats, b, h, which, m0 + 4 * chunk),
                            np.uint32(16))

    def keys_by_queries(kk, nq2, acc, slot, a_off, b_off, smem_base, warp, lane):
        """One 16-dim by 16-query step of acc = A B^T for this warp's 16 keys, with A a
        key tile (K or V) and B a query tile (Q or dO) in shared memory: query n-tiles
        2 nq2 and 2 nq2 + 1 go to acc[slot] and acc[slot + 1]."""
        mat = lane >> 3
        r8 = lane & 7
        a = ops.ldmatrix_x4(smem_base + 2 * (a_off + kv_offset(
            warp * 16 + (mat & 1) * 8 + r8, kk * 16 + (mat >> 1) * 8)))
        bq = ops.ldmatrix_x4(smem_base + 2 * (b_off + q_offset(
            nq2 * 16 + (mat >> 1) * 8 + r8, kk * 16 + (mat & 1) * 8)))
        for half in range(2):
            c = mma(a[0], a[1], a[2], a[3], bq[2 * half], bq[2 * half + 1],
                    acc[slot + half, 0], acc[slot + half, 1], acc[slot + half, 2],
                    acc[slot + half, 3])
            for i in range(4):
                acc[slot + half, i] = c[i]

    keys_by_queries_d = device(keys_by_queries)

    def st_step(step, st, qs, smem_base, warp, lane):
        kk = step // (NQ // 2)
        nq2 = step - kk * (NQ // 2)
        keys_by_queries_d(kk, nq2, st, 2 * nq2, OFF_K, OFF_Q + qs, smem_base, warp, lane)

    st_steps = static_loop(KS * NQ // 2, device(st_step))       # S^T = K Q^T

    def dpt_step(kk, acc, nq2, b_off, smem_base, warp, lane):
        keys_by_queries_d(kk, nq2, acc, 0, OFF_V, b_off, smem_base, warp, lane)

    dpt_steps = static_loop(KS, device(dpt_step))

    def ds_step(nq2, frag, pt, rows_f32, rs, qs, scale, smem_base, warp, lane):
        """dS^T = scale P^T (dP^T - Delta) for queries [16 nq2, 16 nq2 + 16), packed into
        frag[nq2] as the A-fragment of dK's product.

        dP^T is computed here 16 queries at a time, so that only 8 of its accumulators
        are live beside P^T's. P^T is taken in float32, as FlashAttention-2 does: P
        rounded to 16 bits (as dV's product takes it) would add its rounding to dS's
        and double dQ's error."""
        t = lane & 3
        dpt = cuda.local.array((2, 4), np.float32)
        for half in range(2):
            for i in range(4):
                dpt[half, i] = ZERO
        dpt_steps(dpt, nq2, OFF_DO + qs, smem_base, warp, lane)
        ds = cuda.local.array((2, 4), np.float32)
        for half in range(2):
            nq = 2 * nq2 + half
            delta0 = rows_f32[rs + BM + nq * 8 + 2 * t]
            delta1 = rows_f32[rs + BM + nq * 8 + 2 * t + 1]
            for rh in range(2):
                ds[half, 2 * rh] = (pt[nq, 2 * rh] * scale) * (dpt[half, 2 * rh] - delta0)
                ds[half, 2 * rh + 1] = ((pt[nq, 2 * rh + 1] * scale)
                                        * (dpt[half, 2 * rh + 1] - delta1))
        frag[nq2, 0] = pack(ds[0, 0], ds[0, 1])
        frag[nq2, 1] = pack(ds[0, 2], ds[0, 3])
        frag[nq2, 2] = pack(ds[1, 0], ds[1, 1])
        frag[nq2, 3] = pack(ds[1, 2], ds[1, 3])

    ds_steps = static_loop(KQ, device(ds_step))

    def probabilities(st, rows_f32, rs, n0, m0, seqlen_q, seqlen_k, masked, scale_log2, warp,
                      lane):
        """st: S^T -> P^T = exp2(S^T c - lse log2 e), 0 where masked."""
        g = lane >> 2
        t = lane & 3
        for nq in range(NQ):
            for i in range(4):
                col = nq * 8 + 2 * t + (i & 1)            # query within the tile
                x = cuda.fma(st[nq, i], scale_log2, -rows_f32[rs + col])
                if masked:
                    key = n0 + warp * 16 + g + 8 * (i >> 1)
                    query = m0 + col
                    if key >= seqlen_k or (CAUSAL and key > query + seqlen_k - seqlen_q):
                        x = MINUS_INF
                st[nq, i] = ops.ex2(x)

    def grad_step(step, acc, frag, b_off, smem_base, lane):
        """One 16-query by 16-column step of acc += A B, A a P^T or dS^T fragment held
        in registers, B a query tile (dO or Q) in shared memory."""
        kq = step // (DT // 2)
        dt2 = step - kq * (DT // 2)
        mat = lane >> 3
        bq = ops.ldmatrix_x4_trans(smem_base + 2 * (b_off + q_offset(
            kq * 16 + (mat & 1) * 8 + (lane & 7), dt2 * 16 + (mat >> 1) * 8)))
        for half in range(2):
            dt = 2 * dt2 + half
            c = mma(frag[kq, 0], frag[kq, 1], frag[kq, 2], frag[kq, 3],
                    bq[2 * half], bq[2 * half + 1],
                    acc[dt, 0], acc[dt, 1], acc[dt, 2], acc[dt, 3])
            for i in range(4):
                acc[dt, i] = c[i]

    grad_steps = static_loop(KQ * DT // 2, device(grad_step))

    def pack_step(kq, frag, x):
        frag[kq, 0] = pack(x[2 * kq, 0], x[2 * kq, 1])
        frag[kq, 1] = pack(x[2 * kq, 2], x[2 * kq, 3])
        frag[kq, 2] = pack(x[2 * kq + 1, 0], x[2 * kq + 1, 1])
        frag[kq, 3] = pack(x[2 * kq + 1, 2], x[2 * kq + 1, 3])

    pack_steps = static_loop(KQ, device(pack_step))

    def store_ds(step, frag, smem_base, warp, lane):
        """dS^T (already packed to 16 bits) into shared memory, rows = keys."""
        g = lane >> 2
        t = lane & 3
        kq = step
        for half in range(2):
            nq = 2 * kq + half
            for rh in range(2):
                off = OFF_DS + ds_offset(warp * 16 + g + 8 * rh, nq * 8 + 2 * t)
                ops.st_shared_u32(smem_base + 2 * off, frag[kq, 2 * half + rh])

    store_ds_steps = static_loop(KQ, device(store_ds))

    def make_dq_pass(pass_index):
        """dQ_i += dS K_j (dS is already scaled) for this warp's 16 query rows and the
        pass's DTP column n-tiles, added into the float32 accumulator with atomics, two
        columns per reduction: the L2's atomic units were the backward's bottleneck
        (79% busy with scalar atomics, ncu on the H100).
        Large head dims take the columns in two passes to keep the dQ accumulator's
        registers down."""
        COL0 = pass_index * DTP * 8

        def dq_step(step, acc, smem_base, rows, lane):
            kk = step // (DTP // 2)
            dt2 = step - kk * (DTP // 2)
            mat = lane >> 3
            r8 = lane & 7
            # A = dS (queries x keys) is the transpose of the stored dS^T: ldmatrix.trans.
            a = ops.ldmatrix_x4_trans(smem_base + 2 * (OFF_DS + ds_offset(
                kk * 16 + (mat >> 1) * 8 + r8, rows * 16 + (mat & 1) * 8)))
            kb = ops.ldmatrix_x4_trans(smem_base + 2 * (OFF_K + kv_offset(
                kk * 16 + (mat & 1) * 8 + r8, COL0 + dt2 * 16 + (mat >> 1) * 8)))
            for half in range(2):
                dt = 2 * dt2 + half
                c = mma(a[0], a[1], a[2], a[3], kb[2 * half], kb[2 * half + 1],
                        acc[dt, 0], acc[dt, 1], acc[dt, 2], acc[dt, 3])
                for i in range(4):
                    acc[dt, i] = c[i]

        steps = static_loop(KK * DTP // 2, device(dq_step))

        def dq_pass(dq, dq_accum, smem_base, b, h, m0, seqlen_q, rows, lane):
            g = lane >> 2
            t = lane & 3
            for dt in range(DTP):
                for i in range(4):
                    dq[dt, i] = ZERO
            steps(dq, smem_base, rows, lane)
            for half in range(2):
                row = m0 + rows * 16 + g + 8 * half
                if row < seqlen_q:
                    # One address per row; each pair's offset is a constant plus 8 t.
                    # dq_accum's head dim is a multiple of 8, so a pair is inside whole
                    # or not at all, and 8-byte aligned.
                    base = ops.global_addr(dq_accum, b, row, h, 0) + np.uint64(8 * t)
                    for dt in range(DTP):
                        col = COL0 + dt * 8 + 2 * t
                        if col < dq_accum.shape[3]:
                            ops.red_add_f32x2(base + np.uint64(4 * (COL0 + dt * 8)),
                                              dq[dt, 2 * half], dq[dt, 2 * half + 1])

        return device(dq_pass)

    dq_first = make_dq_pass(0)
    dq_second = make_dq_pass(1) if DQ_PASSES == 2 else dq_first

    def zero_step(dt, acc):
        for i in range(4):
            acc[dt, i] = ZERO

    zero_acc = static_loop(NQ, device(zero_step))

    def store_step(dt, dk, dv, dk_acc, dv_acc, b, h_kv, key0, seqlen_k, t):
        """dK and dV for n-tile dt of this thread's two key rows."""
        for half in range(2):
            key = key0 + 8 * half
            for j in range(2):
                col = dt * 8 + 2 * t + j
                if key < seqlen_k and col < dk.shape[3]:
                    dk[b, key, h_kv, col] = from_acc(dk_acc[dt, 2 * half + j])
                    dv[b, key, h_kv, col] = from_acc(dv_acc[dt, 2 * half + j])

    # Loops over the DT n-tiles of dK and dV: NVVM does not unroll them on its own at
    # head dim 128, and one rolled loop sends both accumulators to local memory.
    zero_steps = static_loop(DT, device(zero_step))
    store_steps = static_loop(DT, device(store_step))
    load_query_tile_d = device(load_query_tile)
    probabilities_d = device(probabilities)
    U16 = from_dtype(np.uint16)

    @kernel(f"backward_mma_{dtype_name}_{config_name(cfg)}_{'causal' if causal else 'full'}"
            + ("_deterministic" if deterministic else ""),
            (cfg, dtype_name, causal, deterministic), lineinfo=True)
    def backward_mma(q, k, v, dout, stats, dq_accum, dk, dv, scale, scale_log2):
        h_kv = cuda.blockIdx.y
        b = cuda.blockIdx.z
        tid = cuda.threadIdx.x
        warp = tid >> 5
        lane = tid & 31
        g = lane >> 2
        t = lane & 3
        seqlen_q = q.shape[1]
        seqlen_k = k.shape[1]
        head_dim = q.shape[3]
        group = q.shape[2] // k.shape[2]
        # One key tile per block, or, deterministic, a strided share of them and a
        # dQ accumulator slice of its own: see DETERMINISM in kernels/backward.py.
        split, stop, step, dq_b = key_tiles(b, q.shape[0], seqlen_k)

        smem = cuda.shared.array(0, U16)
        smem_base = ops.smem_addr(smem, 0)
        rows_f32 = cuda.shared.array(0, F32)[OFF_ROWS // 2:OFF_ROWS // 2 + 2 * RSTAGE]

        dk_acc = cuda.local.array((DT, 4), np.float32)
        dv_acc = cuda.local.array((DT, 4), np.float32)
        pt = cuda.local.array((NQ, 4), np.float32)
        frag = cuda.local.array((KQ, 4), np.uint32)
        dq = cuda.local.array((DTP, 4), np.float32)
        for n_block in range(split, stop, step):
            n0 = n_block * BN
            cuda.syncthreads()         # the previous key tile's K, V and dS^T are free
            zero_steps(dk_acc)
            zero_steps(dv_acc)

            # ---- Prologue: K_j, V_j stay; the first query tile into stage 0
            m_start, m_end = query_tile_range(n_block, BM, BN, seqlen_q, seqlen_k, CAUSAL)
            total = group * (m_end - m_start)
            load_kv(smem_base, OFF_K, k, b, n0, seqlen_k, h_kv, head_dim, tid)
            load_kv(smem_base, OFF_V, v, b, n0, seqlen_k, h_kv, head_dim, tid)
            h = h_kv * group
            m_block = m_start
            if total > 0:
                load_query_tile_d(smem_base, 0, q, dout, stats, b, h, m_block * BM, seqlen_q,
                                  head_dim, tid)
            ops.cp_async_commit()

            # ---- Mainloop over the group's query heads and the query tiles that see K_j;
            # tile it is in stage it % 2. Counters, not it // n_tiles: 64-bit divisions
            # cost more than the bookkeeping they replace.
            for it in range(total):
                m0 = m_block * BM
                stage = it & 1
                qs = stage * QSTAGE
                rs = stage * RSTAGE
                ops.cp_async_wait(0)
                cuda.syncthreads()         # tile it has landed; tile it-1's stage is free
                h_next = h
                m_next = m_block + 1
                if m_next == m_end:
                    m_next = m_start
                    h_next = h + 1
                if it + 1 < total:         # tile it+1 is copied during all of tile it
                    load_query_tile_d(smem_base, 1 - stage, q, dout, stats, b, h_next,
                                      m_next * BM, seqlen_q, head_dim, tid)
                    ops.cp_async_commit()

                # pt holds S^T, then P^T in float32; frag the 16-bit A-fragments of
                # P^T, then of dS^T.
                zero_acc(pt)
                st_steps(pt, qs, smem_base, warp, lane)               # S^T = K Q^T
                masked = tile_needs_mask(m_block, n_block, BM, BN, seqlen_q, seqlen_k, CAUSAL)
                probabilities_d(pt, rows_f32, rs, n0, m0, seqlen_q, seqlen_k, masked,
                                scale_log2, warp, lane)
                pack_steps(frag, pt)
                grad_steps(dv_acc, frag, OFF_DO + qs, smem_base, lane)  # dV += P^T dO
                ds_steps(frag, pt, rows_f32, rs, qs, scale, smem_base, warp, lane)  # dS^T
                grad_steps(dk_acc, frag, OFF_Q + qs, smem_base, lane)   # dK += dS^T Q
                store_ds_steps(frag, smem_base, warp, lane)
                cuda.syncthreads()         # dS^T is visible

                # dQ_i += dS K_j: each unit sums all BN keys for its 16 rows and columns.
                for unit in range(warp, DQ_UNITS, NW):
                    rows = unit // DQ_PASSES
                    if unit % DQ_PASSES == 0:
                        dq_first(dq, dq_accum, smem_base, dq_b, h, m0, seqlen_q, rows, lane)
                    else:
                        dq_second(dq, dq_accum, smem_base, dq_b, h, m0, seqlen_q, rows, lane)
                h = h_next
                m_block = m_next

            # ---- Epilogue: dK_j, dV_j are complete; written once
            ops.cp_async_wait(0)
            store_steps(dk, dv, dk_acc, dv_acc, b, h_kv, n0 + warp * 16 + g, seqlen_k, t)

    return backward_mma
