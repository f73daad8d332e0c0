"""FlashAttention backward pass on tensor cores (float16 and bfloat16), in strips:
each warp owns 16 keys and all the queries of a tile. nbflash's default backward on
GPUs, measured and tested on the H100; ``backward_mma.py`` is its successor in
waiting (FlashAttention-2's warp grids), see ``config.BACKWARD_KERNEL``.

The algorithm of ``backward.py`` (and ``reference/tiled.py::flash_backward``). One
thread block per (key tile, kv head, batch) keeps K_j and V_j in shared memory and
dK_j, dV_j in registers; each warp owns 16 keys.
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
scale Delta), padded to whole query tiles, so that they travel by cp.async like the tiles;
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
def build_backward_mma_strips(cfg: MmaConfig, dtype_name: str, causal: bool,
                              deterministic: bool = False):
    """The strips tensor-core backward kernel
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
    DQ_PASSES = cfg.dq_passes or (2 if D >= 128 or BM // 16 < NW else 1)
    assert DT % (2 * DQ_PASSES) == 0, cfg
    DTP = DT // DQ_PASSES  # dQ column n-tiles per pass
    # dQ's work units: 16 query rows by one pass's columns, dealt round-robin to the
    # warps (64 x 128 tiles over 8 warps: 4 row blocks x 2 passes, one unit per warp).
    DQ_UNITS = (BM // 16) * DQ_PASSES
    CAUSAL = causal
    key_tiles = make_key_tile_schedule(deterministic, BN)
    ZERO = np.float32(0.0)
    MINUS_INF = np.float32(NEG_INF)

    # Shared memory, in 16-bit elements: K, V, two stages of (Q, dO), dS^T, then two
    # stages of the float32 rows (lse log2 e, then scale Delta). Stage s of Q is at
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

    make_loader, _, mma, pack, make_steps = make_mma_tile_ops(cfg, dtype_name)
    load_kv = make_loader(BN)
    load_q = make_loader(BM)
    # Byte offsets of the tiles; make_steps wants each at a multiple of 128 bytes.
    K_AT, V_AT, Q_AT, DO_AT, DS_AT = (2 * x for x in (OFF_K, OFF_V, OFF_Q, OFF_DO, OFF_DS))
    assert all(x % 128 == 0 for x in (K_AT, V_AT, Q_AT, DO_AT, DS_AT, 2 * QSTAGE)), cfg
    # ldmatrix (and dS^T's store) addresses split by make_steps into a per-lane offset
    # and compile-time parts; lane (mat, r8) = (lane >> 3, lane & 7) of each x4:
    # - KEY_*: a key tile (K, V) as the A operand of S^T, dP^T: row 16 warp + 8 (mat & 1)
    #   + r8, column 8 (mat >> 1); step kk at (0, 16 kk).
    # - QRY_*: a query tile (Q, dO) as their B operand: row 8 (mat >> 1) + r8, column
    #   8 (mat & 1); step (kk, nq2) at (16 nq2, 16 kk).
    # - TRN_*: a D-wide tile read transposed (Q, dO as dK's and dV's B operand, K as
    #   dQ's): row 8 (mat & 1) + r8, column 8 (mat >> 1); step (r, c) at (16 r, 16 c).
    # - DSW_*: this thread's dS^T values, row 16 warp + g (+ 8), column 2 t (+ 8 nq).
    # - DSR_*: dS read transposed as dQ's A operand: row 8 (mat >> 1) + r8, column
    #   16 rows + 8 (mat & 1) for the unit's 16-row block; step kk at (16 kk, 0).
    warp_rows = [w * 16 + r for w in range(NW) for r in range(16)]
    key_lane, KEY_HI, KEY_LO = make_steps(
        D, warp_rows, [0, 8], [(0, 16 * kk) for kk in range(KS)])
    qry_lane, QRY_HI, QRY_LO = make_steps(
        D, range(16), [0, 8], [(16 * nq2, 16 * kk) for kk in range(KS) for nq2 in range(NQ // 2)])
    TRN_ROWS = max(KQ, KK)
    trn_lane, TRN_HI, TRN_LO = make_steps(
        D, range(16), [0, 8], [(16 * r, 16 * c) for r in range(TRN_ROWS) for c in range(DT // 2)])
    dsw_lane, DSW_HI, DSW_LO = make_steps(
        BM, [w * 16 + g for w in range(NW) for g in range(8)], range(0, 8, 2),
        [(8 * rh, 8 * nq) for nq in range(NQ) for rh in range(2)])
    dsr_lane, DSR_HI, DSR_LO = make_steps(
        BM, range(16), [16 * r + c for r in range(BM // 16) for c in (0, 8)],
        [(16 * kk, 0) for kk in range(KK)])
    _, from_acc = element_codec(dtype_name)
    F32 = from_dtype(np.float32)

    def load_query_tile(smem_base, stage, q, dout, stats, b, h, m0, seqlen_q, head_dim, tid):
        """cp.async of Q_i, dO_i and the rows' (lse log2 e, scale Delta) into ``stage``."""
        qs = stage * QSTAGE
        load_q(smem_base, OFF_Q + qs, q, b, m0, seqlen_q, h, head_dim, tid)
        load_q(smem_base, OFF_DO + qs, dout, b, m0, seqlen_q, h, head_dim, tid)
        if tid < 2 * ROW_CHUNKS:
            which = tid // ROW_CHUNKS          # 0: lse log2 e, 1: scale Delta
            chunk = tid - which * ROW_CHUNKS
            dst = smem_base + 2 * OFF_ROWS + 4 * (stage * RSTAGE + which * BM + 4 * chunk)
            ops.cp_async_16(dst, ops.global_addr(stats, b, h, which, m0 + 4 * chunk),
                            np.uint32(16))

    @device
    def mma_pair(acc, n, a0, a1, a2, a3, b):
        """acc[n] and acc[n + 1] += A times the two 8-column halves of an ldmatrix x4
        B fragment ``b``: the step every product of this kernel repeats."""
        for half in range(2):
            c = mma(a0, a1, a2, a3, b[2 * half], b[2 * half + 1],
                    acc[n + half, 0], acc[n + half, 1], acc[n + half, 2], acc[n + half, 3])
            for r in range(4):
                acc[n + half, r] = c[r]

    def make_keys_by_queries(pairs):
        """``product(acc, nq2_0, a_at, b_at, smem_base, warp, lane)``: acc += A B^T
        for this warp's 16 keys and queries [16 nq2_0, 16 (nq2_0 + pairs)), with A a key
        tile (K or V) ``a_at`` bytes into shared memory and B a query tile (Q or dO) at
        ``b_at``; acc's n-tile 2 j + half holds query n-tile 2 (nq2_0 + j) + half.
        k-step by k-step, A's fragment is loaded once for all the pairs of n-tiles."""
        def pair_step(j, acc, a, kk, nq2_0, b_at, smem_base, lane):
            mat = lane >> 3
            lb = b_at + qry_lane((mat >> 1) * 8 + (lane & 7), (mat & 1) * 8)
            i = kk * (NQ // 2) + nq2_0 + j
            bq = ops.ldmatrix_x4(smem_base + ((lb ^ QRY_LO[i]) + QRY_HI[i]))
            mma_pair(acc, 2 * j, a[0], a[1], a[2], a[3], bq)

        pair_steps = static_loop(pairs, device(pair_step))

        def k_step(kk, acc, nq2_0, a_at, b_at, smem_base, warp, lane):
            mat = lane >> 3
            la = a_at + key_lane(warp * 16 + (mat & 1) * 8 + (lane & 7), (mat >> 1) * 8)
            a = ops.ldmatrix_x4(smem_base + ((la ^ KEY_LO[kk]) + KEY_HI[kk]))
            pair_steps(acc, a, kk, nq2_0, b_at, smem_base, lane)

        return static_loop(KS, device(k_step))

    st_product = make_keys_by_queries(NQ // 2)          # S^T = K Q^T, all queries
    # dP^T = V dO^T, DP_PAIRS pairs of query n-tiles at a time: all of it at once would
    # keep NQ * 4 more accumulators live beside P^T's. ptxas reuses V's fragments
    # across groups anyway (the same SASS ldmatrix count for 1 and 2 pairs), and 2
    # pairs spilled 24 bytes more at head dim 128 (tests/ptx_check.py).
    DP_PAIRS = 1
    DPN = 2 * DP_PAIRS     # query n-tiles per group
    assert KQ % DP_PAIRS == 0, cfg
    dpt_product = make_keys_by_queries(DP_PAIRS)

    def ds_step(group, frag, pt, rows_f32, rs, qs, scale, smem_base, warp, lane):
        """dS^T = P^T (scale dP^T - scale Delta) for query n-tile pairs [DP_PAIRS group,
        DP_PAIRS (group + 1)), packed into frag[nq2] as A-fragments of dK's product.

        P^T is taken in float32, as FlashAttention-2 does: P rounded to 16 bits (as
        dV's product takes it) would add its rounding to dS's and double dQ's error."""
        t = lane & 3
        dpt = cuda.local.array((DPN, 4), np.float32)
        for n in range(DPN):
            for i in range(4):
                dpt[n, i] = ZERO
        nq2_0 = group * DP_PAIRS
        dpt_product(dpt, nq2_0, V_AT, DO_AT + qs, smem_base, warp, lane)
        ds = cuda.local.array((DPN, 4), np.float32)
        for n in range(DPN):
            nq = 2 * nq2_0 + n
            delta0 = rows_f32[rs + BM + nq * 8 + 2 * t]          # scale Delta
            delta1 = rows_f32[rs + BM + nq * 8 + 2 * t + 1]
            for rh in range(2):
                ds[n, 2 * rh] = pt[nq, 2 * rh] * cuda.fma(dpt[n, 2 * rh], scale, -delta0)
                ds[n, 2 * rh + 1] = pt[nq, 2 * rh + 1] * cuda.fma(dpt[n, 2 * rh + 1], scale,
                                                                  -delta1)
        for j in range(DP_PAIRS):
            frag[nq2_0 + j, 0] = pack(ds[2 * j, 0], ds[2 * j, 1])
            frag[nq2_0 + j, 1] = pack(ds[2 * j, 2], ds[2 * j, 3])
            frag[nq2_0 + j, 2] = pack(ds[2 * j + 1, 0], ds[2 * j + 1, 1])
            frag[nq2_0 + j, 3] = pack(ds[2 * j + 1, 2], ds[2 * j + 1, 3])

    ds_steps = static_loop(KQ // DP_PAIRS, device(ds_step))

    def mask_scores(st, n0, m0, seqlen_q, seqlen_k, warp, lane):
        """S^T = -inf for keys past seqlen_k and, when causal, above the diagonal.

        Called on the tiles that need it only (``tile_needs_mask``), apart from the
        exponentials: a test inside their loop was turned into 32 selects that every
        tile ran. In 32 bits, relative to this thread's first key."""
        g = lane >> 2
        t = lane & 3
        key0 = np.int32(n0 + warp * 16 + g)
        keys_left = np.int32(seqlen_k) - key0             # keys key0, key0 + 1, ... exist
        # query m0 + q sees key0 + r up to r = q + diagonal
        diagonal = np.int32(m0 + seqlen_k - seqlen_q) - key0
        for nq in range(NQ):
            for i in range(4):
                r = np.int32(8 * (i >> 1))
                q = np.int32(nq * 8 + (i & 1)) + 2 * t
                if r >= keys_left or (CAUSAL and r > q + diagonal):
                    st[nq, i] = MINUS_INF

    def probabilities(st, rows_f32, rs, scale_log2, lane):
        """st: S^T -> P^T = exp2(S^T c - lse log2 e) (masked scores are -inf: c > 0)."""
        t = lane & 3
        for nq in range(NQ):
            for i in range(4):
                col = nq * 8 + 2 * t + (i & 1)            # query within the tile
                st[nq, i] = ops.ex2(cuda.fma(st[nq, i], scale_log2, -rows_f32[rs + col]))

    def grad_step(step, acc, frag, b_at, smem_base, lane):
        """One 16-query by 16-column step of acc += A B, A a P^T or dS^T fragment held
        in registers, B a query tile (dO or Q) ``b_at`` bytes into shared memory."""
        kq = step // (DT // 2)
        dt2 = step - kq * (DT // 2)
        mat = lane >> 3
        lb = b_at + trn_lane((mat & 1) * 8 + (lane & 7), (mat >> 1) * 8)
        bq = ops.ldmatrix_x4_trans(smem_base + ((lb ^ TRN_LO[step]) + TRN_HI[step]))
        mma_pair(acc, 2 * dt2, frag[kq, 0], frag[kq, 1], frag[kq, 2], frag[kq, 3], bq)

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
        lane_at = DS_AT + dsw_lane(warp * 16 + g, 2 * t)
        for half in range(2):
            nq = 2 * kq + half
            for rh in range(2):
                i = 2 * nq + rh
                ops.st_shared_u32(smem_base + ((lane_at ^ DSW_LO[i]) + DSW_HI[i]),
                                  frag[kq, 2 * half + rh])

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
            la = DS_AT + dsr_lane((mat >> 1) * 8 + r8, rows * 16 + (mat & 1) * 8)
            lk = K_AT + trn_lane((mat & 1) * 8 + r8, (mat >> 1) * 8)
            i = kk * (DT // 2) + COL0 // 16 + dt2
            a = ops.ldmatrix_x4_trans(smem_base + ((la ^ DSR_LO[kk]) + DSR_HI[kk]))
            kb = ops.ldmatrix_x4_trans(smem_base + ((lk ^ TRN_LO[i]) + TRN_HI[i]))
            mma_pair(acc, 2 * dt2, a[0], a[1], a[2], a[3], kb)

        steps = static_loop(KK * DTP // 2, device(dq_step))

        def dq_pass(dq, dq_accum, smem_base, b, h, m0, seqlen_q, rows, lane):
            g = lane >> 2
            t = lane & 3
            for dt in range(DTP):
                for i in range(4):
                    dq[dt, i] = ZERO
            steps(dq, smem_base, rows, lane)
            # One address per thread; each pair's offset from it is a constant. dq_accum
            # is nbflash's own contiguous buffer and its head dim a multiple of 8, so a
            # pair is inside whole or not at all, and 8-byte aligned. The address of a
            # row past seqlen_q is formed but never used.
            row = m0 + rows * 16 + g
            base = ops.global_addr(dq_accum, b, row, h, 0) + np.uint64(4 * COL0 + 8 * t)
            row8 = np.uint64(8 * dq_accum.strides[1])
            if m0 + BM <= seqlen_q and dq_accum.shape[3] == D:
                # Interior tiles, at full head dims: no tests. (Each test cost a branch and
                # a reconvergence barrier per reduction in the SASS.)
                for half in range(2):
                    for dt in range(DTP):
                        ops.red_add_f32x2(base + (half * row8 + np.uint64(32 * dt)),
                                          dq[dt, 2 * half], dq[dt, 2 * half + 1])
            else:
                rows_left = np.int32(seqlen_q - row)
                cols_left = np.int32(dq_accum.shape[3]) - np.int32(COL0 + 2 * t)
                for half in range(2):
                    if np.int32(8 * half) < rows_left:
                        for dt in range(DTP):
                            if np.int32(8 * dt) < cols_left:
                                ops.red_add_f32x2(base + (half * row8 + np.uint64(32 * dt)),
                                                  dq[dt, 2 * half], dq[dt, 2 * half + 1])

        return device(dq_pass)

    def make_dq_passes(first):
        """``run(which, ...)``: pass ``which`` (at least ``first``) of the dQ columns;
        each pass is compiled for its own columns."""
        this = make_dq_pass(first)
        if first == DQ_PASSES - 1:
            def last(which, dq, dq_accum, smem_base, b, h, m0, seqlen_q, rows, lane):
                this(dq, dq_accum, smem_base, b, h, m0, seqlen_q, rows, lane)

            return device(last)
        rest = make_dq_passes(first + 1)

        def run(which, dq, dq_accum, smem_base, b, h, m0, seqlen_q, rows, lane):
            if which == first:
                this(dq, dq_accum, smem_base, b, h, m0, seqlen_q, rows, lane)
            else:
                rest(which, dq, dq_accum, smem_base, b, h, m0, seqlen_q, rows, lane)

        return device(run)

    dq_passes = make_dq_passes(0)

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

    def store_pair_step(dt, at, acc, half):
        ops.st_global_u32(at + np.uint64(16 * dt), pack(acc[dt, 2 * half], acc[dt, 2 * half + 1]))

    store_pairs = static_loop(DT, device(store_pair_step))

    def store_gradients(dk, dv, dk_acc, dv_acc, b, h_kv, key0, seqlen_k, t):
        """dK_j and dV_j for this thread's two key rows. At full head dims each row takes
        packed pairs at constant offsets from one address: element stores formed a
        64-bit address each and held its registers until issued, and took a third of
        the kernel's time at seqlen 512 (ncu, d128)."""
        if dk.shape[3] == D:
            for half in range(2):
                key = key0 + 8 * half
                if key < seqlen_k:
                    at = np.uint64(4 * t)
                    store_pairs(ops.global_addr(dk, b, key, h_kv, 0) + at, dk_acc, half)
                    store_pairs(ops.global_addr(dv, b, key, h_kv, 0) + at, dv_acc, half)
        else:
            store_steps(dk, dv, dk_acc, dv_acc, b, h_kv, key0, seqlen_k, t)

    store_gradients_d = device(store_gradients)
    load_query_tile_d = device(load_query_tile)
    probabilities_d = device(probabilities)
    mask_scores_d = device(mask_scores)
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
                qs = stage * (2 * QSTAGE)      # bytes
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
                st_product(pt, 0, K_AT, Q_AT + qs, smem_base, warp, lane)  # S^T = K Q^T
                if tile_needs_mask(m_block, n_block, BM, BN, seqlen_q, seqlen_k, CAUSAL):
                    mask_scores_d(pt, n0, m0, seqlen_q, seqlen_k, warp, lane)
                probabilities_d(pt, rows_f32, rs, scale_log2, lane)
                pack_steps(frag, pt)
                grad_steps(dv_acc, frag, DO_AT + qs, smem_base, lane)  # dV += P^T dO
                ds_steps(frag, pt, rows_f32, rs, qs, scale, smem_base, warp, lane)  # dS^T
                grad_steps(dk_acc, frag, Q_AT + qs, smem_base, lane)   # dK += dS^T Q
                store_ds_steps(frag, smem_base, warp, lane)
                cuda.syncthreads()         # dS^T is visible

                # dQ_i += dS K_j: each unit sums all BN keys for its 16 rows and columns.
                for unit in range(warp, DQ_UNITS, NW):
                    dq_passes(unit % DQ_PASSES, dq, dq_accum, smem_base, dq_b, h, m0,
                              seqlen_q, unit // DQ_PASSES, lane)
                h = h_next
                m_block = m_next

            # ---- Epilogue: dK_j, dV_j are complete; written once
            ops.cp_async_wait(0)
            store_gradients_d(dk, dv, dk_acc, dv_acc, b, h_kv, n0 + warp * 16 + g, seqlen_k, t)

    return backward_mma
