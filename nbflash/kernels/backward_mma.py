"""FlashAttention backward pass on tensor cores, in warp grids: float16 and bfloat16
on m16n8k16, float32 on tf32 m16n8k8 (one product, or three for float32 accuracy:
see TF32 in ``build_backward_mma``).

The algorithm of ``backward.py`` (and ``reference/tiled.py::flash_backward``) in the
FlashAttention-2 arrangement. One thread block per (key tile, kv head, batch) keeps
K_j and V_j in shared memory and dK_j, dV_j in registers. For every query head of
the GQA group and every query tile i that sees the keys:

    S   = Q_i K_j^T                     } warps in the S/dP grid (queries x keys);
    P   = exp2(S c - lse_i log2 e)      } P and dS go to shared memory as 16-bit
    dP  = dO_i V_j^T                    } values
    dS  = P * (dP - Delta_i) * scale    }
    dV_j += P^T dO_i                    } warps in the dK/dV grid (keys x head dim)
    dK_j += dS^T Q_i                    }
    dQ_i += dS K_j                      } warps in the dQ grid (queries x head dim),
                                          float32 atomic adds of whole mma results
                                          (tf32: column pairs) into the dQ
                                          accumulator, see ``add_dq``

with c = softmax_scale * log2(e). Each product has its own warp grid
(``config.BackwardMmaConfig``): a warp's share of a product is a set of whole
16 x 16 output blocks, so each fragment it loads from shared memory feeds several
mma. The earlier arrangement gave every warp 16 keys and all the queries, which
kept P^T in registers but made every warp load all of Q and dO for each of four
products: 184 ldmatrix x4 per warp and query tile at head dim 128, against 144
here (plus the stores of P and dS); its main loop compiled to 1541 SASS
instructions against 1230 here (ptxas 13.0, sm_90, head dim 128), and on the H100
this kernel's backward is 14% faster at head dim 128 (5.09 ms against 5.95 at
seqlen 4096, hidden 2048; benchmarks/NOTES.md).

Warp (w1, w2) of a W1 x W2 grid owns the blocks (w1 + W1 a, w2 + W2 b): interleaved,
so that the swizzle's XOR never carries between a warp's origin and its steps
(``make_steps``), whatever the tile widths.

P and dS are formed from float32 P, as FlashAttention-2 does (for tf32 they stay
float32 in shared memory): P rounded to 16 bits
(as dV's product takes it) would add its rounding to dS's and double dQ's error.
softmax_scale is applied to dS before it is rounded to 16 bits for the dK and dQ
products: dP alone can exceed the float16 range when the values are large
(|dP| ~ |dO| |V| sqrt(d)), while scale * dS is the gradient of the logits, bounded
by the outputs' size.

Q_i, dO_i and the rows' statistics stream through two stages of shared memory:
tile i+1's are copied with cp.async during all of tile i's work. The statistics come
from the pre-pass as one float32 buffer ``stats[b, h, 0 | 1, row]`` = (lse log2 e,
scale Delta), padded to whole query tiles, so that they travel by cp.async like the
tiles; query rows past seqlen_q and rows that see no key carry lse log2 e = +inf
there, so their P is exp2(-inf) = 0 without a special case.
"""
import functools

import numpy as np
from numba import cuda, from_dtype

from .. import ops
from ..config import BackwardMmaConfig, tile_row
from .common import (NEG_INF, config_name, device, dq_acc_place, element_codec, kernel,
                     make_key_tile_schedule,
                     query_tile_range, static_loop, tf32_split_rounding, tile_needs_mask)
from .forward_mma import make_mma_tile_ops


@functools.lru_cache(maxsize=None)
def build_backward_mma(cfg: BackwardMmaConfig, dtype_name: str, causal: bool,
                       deterministic: bool = False, passes: int = 1):
    """The tensor-core backward kernel
    ``(q, k, v, dout, stats, dq_accum, dk, dv, scale, scale_log2)``.

    q, k, v, dout are uint16 views (float32 for ``dtype_name`` float32, which runs
    on tf32 products with ``passes`` 1 or 3 as ``build_forward_mma``; see TF32 below);
    dk, dv in their storage type; stats float32
    (batch, nheads, 2, seqlen_q rounded up to block_m), see ``build_stats``; dq_accum
    float32 (batch, rows, nheads, cols), or (splits * batch, ...) for the
    deterministic mode (grid x = splits, see kernels/backward.py), with the head
    dim rounded up to a multiple of 8: for tf32 row-major like q (rows seqlen_q,
    cols the head dim), for 16 bits in fragment order (``dq_acc_place``: rows
    seqlen_q rounded up to block_m, halved, cols twice the head dim).
    Launch with grid ``(ceil(seqlen_k / block_n), nheads_k, batch)``, ``cfg.threads``
    threads and ``cfg.backward_shared_bytes`` bytes of dynamic shared memory.
    """
    cfg.check_backward()
    TF32 = dtype_name == "float32"
    assert passes in ((1, 3) if TF32 else (1,)), (dtype_name, passes)
    assert cfg.element_bytes == (4 if TF32 else 2), (cfg, dtype_name)
    SPLIT = passes == 3
    ES = cfg.element_bytes           # bytes per element of every shared tile
    EC = 16 // ES                    # elements per 16 bytes: one ldmatrix row
    KW = 2 * EC                      # the mma's k: 16 16-bit values or 8 tf32
    BM, BN, D, NT = cfg.block_m, cfg.block_n, cfg.head_dim, cfg.threads
    KD = D // KW                     # k-steps over the head dim (S, dP)
    KQ = BM // KW                    # k-steps over the queries (dV, dK)
    KK = BN // KW                    # k-steps over the keys (dQ)
    CAUSAL = causal
    key_tiles = make_key_tile_schedule(deterministic, BN)
    ZERO = np.float32(0.0)
    MINUS_INF = np.float32(NEG_INF)

    # Warp grids: W1 x W2 warps; each warp owns A1 x A2 blocks of 16 x 16.
    SW1, SW2, _, _ = cfg.grids["sdp"]
    KW1, KW2, _, _ = cfg.grids["dkv"]
    QW1, QW2, _, _ = cfg.grids["dq"]
    SA1, SA2 = BM // (16 * SW1), BN // (16 * SW2)      # queries, keys
    KA1, KA2 = BN // (16 * KW1), D // (16 * KW2)       # keys, head dim
    QA1, QA2 = BM // (16 * QW1), D // (16 * QW2)       # queries, head dim
    SN, KN, QN = 2 * SA2, 2 * KA2, 2 * QA2             # their 8-column n-tiles

    # Shared memory, in elements of ES bytes: K, V, two stages of (Q, dO), P, dS, then
    # two stages of the float32 rows (lse log2 e, then scale Delta). Stage s of Q is at
    # OFF_Q + s * QSTAGE, its dO at OFF_DO + s * QSTAGE, its rows at float s * RSTAGE.
    # Tiles are swizzled (forward_mma.make_mma_tile_ops): K, V, Q, dO rows of
    # cfg.row elements, P and dS rows (queries) of PROW elements (keys).
    ROW = cfg.row
    PROW = tile_row(BN, ES)
    QSTAGE = 2 * BM * ROW
    RSTAGE = 2 * BM
    OFF_K = 0
    OFF_V = OFF_K + BN * ROW
    OFF_Q = OFF_V + BN * ROW
    OFF_DO = OFF_Q + BM * ROW
    OFF_P = OFF_Q + 2 * QSTAGE
    OFF_DS = OFF_P + BM * PROW
    OFF_ROWS = OFF_DS + BM * PROW
    assert OFF_ROWS * ES + 2 * RSTAGE * 4 == cfg.backward_shared_bytes
    ROW_CHUNKS = BM // 4              # 16-byte chunks of one statistic's rows
    assert 2 * ROW_CHUNKS <= NT, cfg

    make_loader, _, mma, pack, make_steps = make_mma_tile_ops(cfg, dtype_name)
    load_kv = make_loader(BN)
    load_q = make_loader(BM)
    # Byte offsets of the tiles; make_steps wants each at a multiple of 128 bytes.
    K_AT, V_AT, Q_AT, DO_AT, P_AT, DS_AT = (
        ES * x for x in (OFF_K, OFF_V, OFF_Q, OFF_DO, OFF_P, OFF_DS))
    assert all(x % 128 == 0 for x in (K_AT, V_AT, Q_AT, DO_AT, P_AT, DS_AT, ES * QSTAGE)), cfg

    # TF32. An ldmatrix x4 reads four 8 x 16-byte matrices, whatever the element
    # size: of a float32 tile stored (m or n rows) x (k columns), that is exactly a
    # tf32 A fragment (16 x 8) or the B fragments of two n-tiles, so the operands
    # read in their stored orientation (S, dP, and dQ's dS) load as in 16 bits, with
    # 16-byte column steps of 4 elements. ldmatrix's transposing form moves 16-bit
    # values and cannot transpose 32-bit ones: the operands read across their
    # stored orientation (P^T, dS^T, dO, Q and dQ's K) take one 32-bit load per
    # register (``load_across``). A sum over k may take its k values in any order
    # as long as A and B agree: these loads take k slots t and t + 4 (t = lane % 4)
    # from rows 2t and 2t + 1, whose swizzled addresses fall in 32 different banks
    # (rows t and t + 4 share banks two by two). For dQ = dS K, whose dS is read
    # along its rows by ldmatrix, P and dS are stored with each 8 keys' columns in
    # the order 0 2 4 6 1 3 5 7 (``key_slot``), so that ldmatrix's k slots t, t + 4
    # are keys 2t, 2t + 1 too.
    def slot_in_8(r):
        """Stored column, within its 8, of the 8 keys' key r (tf32): 2t -> t, 2t + 1 -> t + 4."""
        return (r >> 1) + 4 * (r & 1)

    slot_in_8_d = device(slot_in_8)

    def key_slot(key):
        """Column of ``key`` in the stored P and dS tiles (tf32; 16-bit: itself)."""
        if not TF32:
            return key
        r = key % 8
        return key - r + slot_in_8(r)

    def operand(width, rows, cols, w1s, w2s):
        """make_steps for an ldmatrix x4 operand pattern (see ``lane_rc``): the
        warp's origin is (16 w1, 16 w2) for w1 in ``w1s``, w2 in ``w2s``; ``rows`` and
        ``cols`` list the steps' (row, column) offsets."""
        lane_rows = [16 * w + 8 * x + r for w in w1s for x in (0, 1) for r in range(8)]
        lane_cols = [16 * w + EC * x for w in w2s for x in (0, 1)]
        return make_steps(width, lane_rows, lane_cols, list(zip(rows, cols)))

    def across(width, rows, cols, w2s, slots):
        """make_steps for ``load_across``: the lane reads row 2t of k-step 0 and
        column slot(16 w2 + g) of n-block 0; step (kk, block, j, dc) adds rows
        KW kk + j and columns ``cols`` + dc, j, dc/8 in {0, 1}."""
        lane_rows = [2 * t for t in range(4)]
        lane_cols = [slots(16 * w + g) for w in w2s for g in range(8)]
        return make_steps(width, lane_rows, lane_cols,
                          [(R + j, C + dc) for R, C in zip(rows, cols)
                           for j in (0, 1) for dc in (0, 8)])

    @device
    def lane_rc(lane, w1, w2):
        """(row, column) of this lane's first ldmatrix x4 address in a block at
        (16 w1, 16 w2): lane (mat, r8) = (lane >> 3, lane & 7) reads row 8 (mat & 1) + r8,
        column EC (mat >> 1). Those are the A fragment's four 8 x 16-byte matrices of
        a row-major tile, and the B fragments of two 8-column n-tiles of a tile
        stored k-major (read transposed, 16 bits only)."""
        mat = lane >> 3
        return 16 * w1 + 8 * (mat & 1) + (lane & 7), 16 * w2 + EC * (mat >> 1)

    @device
    def lane_rc_swapped(lane, w1, w2):
        """The other order, row 8 (mat >> 1) + r8, column EC (mat & 1): the B fragments
        of two n-tiles of a tile stored n-major, and the A fragment of a tile stored
        k-major (read transposed, 16 bits only)."""
        mat = lane >> 3
        return 16 * w1 + 8 * (mat >> 1) + (lane & 7), 16 * w2 + EC * (mat & 1)

    @device
    def lane_across(lane, w2, slotted):
        """(row, column) of this lane's first ``load_across`` address: row 2t,
        column slot(16 w2 + g) (the key slot for P and dS, else the column)."""
        g = lane >> 2
        col = 16 * w2 + g
        if slotted:
            col = col - g + slot_in_8_d(g)
        return 2 * (lane & 3), col

    # Steps are numbered (k-step, block): index kk * A + a.
    # S = Q K^T, dP = dO V^T. A: Q rows (queries) by head-dim columns; B: K rows (keys).
    s_a = operand(D, [16 * SW1 * a for kk in range(KD) for a in range(SA1)],
                  [KW * kk for kk in range(KD) for a in range(SA1)], range(SW1), [0])
    s_b = operand(D, [16 * SW2 * b for kk in range(KD) for b in range(SA2)],
                  [KW * kk for kk in range(KD) for b in range(SA2)], range(SW2), [0])
    # dV = P^T dO, dK = dS^T Q. A: P^T read transposed from P (rows queries, columns
    # keys); B: dO (rows queries, head-dim columns) read transposed.
    kv_rows_a = [KW * kk for kk in range(KQ) for a in range(KA1)]
    kv_cols_a = [16 * KW1 * a for kk in range(KQ) for a in range(KA1)]
    kv_rows_b = [KW * kk for kk in range(KQ) for b in range(KA2)]
    kv_cols_b = [16 * KW2 * b for kk in range(KQ) for b in range(KA2)]
    # dQ = dS K. A: dS (rows queries, columns keys); B: K (rows keys) read transposed.
    q_a = operand(BN, [16 * QW1 * a for kk in range(KK) for a in range(QA1)],
                  [KW * kk for kk in range(KK) for a in range(QA1)], range(QW1), [0])
    q_rows_b = [KW * kk for kk in range(KK) for b in range(QA2)]
    q_cols_b = [16 * QW2 * b for kk in range(KK) for b in range(QA2)]
    if TF32:
        kv_a = across(BN, kv_rows_a, kv_cols_a, range(KW1), key_slot)
        kv_b = across(D, kv_rows_b, kv_cols_b, range(KW2), lambda c: c)
        q_b = across(D, q_rows_b, q_cols_b, range(QW2), lambda c: c)
    else:
        kv_a = operand(BN, kv_rows_a, kv_cols_a, [0], range(KW1))
        kv_b = operand(D, kv_rows_b, kv_cols_b, [0], range(KW2))
        q_b = operand(D, q_rows_b, q_cols_b, [0], range(QW2))
    s_a_lane_at, s_b_lane_at, kv_a_lane_at, kv_b_lane_at, q_a_lane_at, q_b_lane_at = (
        x[0] for x in (s_a, s_b, kv_a, kv_b, q_a, q_b))
    # P and dS stores: this thread's pair (row g + 8 rh, columns 2t, 2t + 1) of n-tile
    # 2 b + half of block (a, b), numbered ((a * A2 + b) * 2 + half) * 2 + rh; for
    # tf32 each value apart, at its key slot (columns t and t + 4 of the 8), numbered
    # (((a * A2 + b) * 2 + half) * 2 + rh) * 2 + j.
    ST_COLS = 1 if TF32 else 2       # columns between lanes t and t + 1 of a stored row
    st_lane, ST_HI, ST_LO = make_steps(
        BN, [16 * w + g for w in range(SW1) for g in range(8)],
        [16 * w + ST_COLS * t for w in range(SW2) for t in range(4)],
        [(16 * SW1 * a + 8 * rh, 16 * SW2 * b + 8 * half + 4 * j)
         for a in range(SA1) for b in range(SA2) for half in range(2) for rh in range(2)
         for j in ((0, 1) if TF32 else (0,))])
    _, from_acc = element_codec(dtype_name)
    F32 = from_dtype(np.float32)

    # One product rounds as documented (ties away, as reference.tf32_round); the
    # split may round any way, and takes the native instruction where there is one.
    to_tf32 = tf32_split_rounding() if SPLIT else ops.to_tf32

    @device
    def tf32_split(bits):
        """A float32 operand's tf32 value (``big``) and, for 3xTF32, the tf32 rounding
        of its remainder (``small``; else big again)."""
        big = to_tf32(ops.u32_as_f32(bits))
        if SPLIT:
            return big, to_tf32(ops.u32_as_f32(bits) - ops.u32_as_f32(big))
        return big, big

    def make_load(trans, HI, LO):
        """``load(lane_at, i, smem_base)``: four registers of step i, by one ldmatrix
        x4 or, across a tf32 tile, four 32-bit loads at (row, column) + (j, 8 dc)
        into register 2 j + dc. That is the A fragment's order (a0..a3: rows g, g + 8
        at k slot t, then at t + 4); a B block wants (n-tile 0's b0, b1, n-tile 1's),
        see B_ORDER."""
        if TF32 and trans:
            def load(lane_at, i, smem_base):
                return (ops.ld_shared_u32(smem_base + ((lane_at ^ LO[4 * i]) + HI[4 * i])),
                        ops.ld_shared_u32(smem_base + ((lane_at ^ LO[4 * i + 1]) + HI[4 * i + 1])),
                        ops.ld_shared_u32(smem_base + ((lane_at ^ LO[4 * i + 2]) + HI[4 * i + 2])),
                        ops.ld_shared_u32(smem_base + ((lane_at ^ LO[4 * i + 3]) + HI[4 * i + 3])))
        elif trans:
            def load(lane_at, i, smem_base):
                return ops.ldmatrix_x4_trans(smem_base + ((lane_at ^ LO[i]) + HI[i]))
        else:
            def load(lane_at, i, smem_base):
                return ops.ldmatrix_x4(smem_base + ((lane_at ^ LO[i]) + HI[i]))
        return device(load)

    def make_product(A1, A2, KSTEPS, a_ops, b_ops, a_trans, b_trans):
        """``product(acc, a_lane, b_lane, smem_base)``: acc[a, 2 b + half] += the
        warp's blocks of A B over KSTEPS k-steps of KW. ``a_lane`` and ``b_lane`` are
        the lane's byte offsets of its first A and B fragments (tile included); A is
        loaded for all A1 blocks and B for all A2 blocks of a k-step before its
        A1 x A2 x 2 mma (three each for 3xTF32: small A x big B, big A x small B,
        then big x big, the small terms first while the sum is small)."""
        load_a = make_load(a_trans, *a_ops[1:])
        load_b = make_load(b_trans, *b_ops[1:])
        # B registers in the order the mma takes them (n-tile 0's b0, b1, then n-tile
        # 1's): ldmatrix gives that order, load_across gives (j, dc) order.
        B_ORDER = (0, 2, 1, 3) if TF32 and b_trans else (0, 1, 2, 3)

        def make_fragment_steps(load, count, order):
            """``steps(kk, hi, lo, lane, smem_base)``: the fragments of the ``count``
            blocks of k-step kk into hi (for 3xTF32 big parts in hi, small in lo),
            registers in ``order``."""
            def step(i, kk, hi, lo, lane_at, smem_base):
                x = load(lane_at, kk * count + i, smem_base)
                for r in range(4):
                    if TF32:
                        big, small = tf32_split(x[order[r]])
                        hi[i, r] = big
                        if SPLIT:
                            lo[i, r] = small
                    else:
                        hi[i, r] = x[order[r]]

            return static_loop(count, device(step))

        def mma_step(ab, acc, af, al, bf, bl):
            a = ab // A2
            b = ab - a * A2
            for half in range(2):
                n = 2 * b + half
                c = (acc[a, n, 0], acc[a, n, 1], acc[a, n, 2], acc[a, n, 3])
                if SPLIT:
                    c = mma(al[a, 0], al[a, 1], al[a, 2], al[a, 3], bf[b, 2 * half],
                            bf[b, 2 * half + 1], c[0], c[1], c[2], c[3])
                    c = mma(af[a, 0], af[a, 1], af[a, 2], af[a, 3], bl[b, 2 * half],
                            bl[b, 2 * half + 1], c[0], c[1], c[2], c[3])
                c = mma(af[a, 0], af[a, 1], af[a, 2], af[a, 3], bf[b, 2 * half],
                        bf[b, 2 * half + 1], c[0], c[1], c[2], c[3])
                for r in range(4):
                    acc[a, n, r] = c[r]

        a_steps = make_fragment_steps(load_a, A1, (0, 1, 2, 3))
        b_steps = make_fragment_steps(load_b, A2, B_ORDER)
        mma_steps = static_loop(A1 * A2, device(mma_step))

        def k_step(kk, acc, a_lane, b_lane, smem_base):
            af = cuda.local.array((A1, 4), np.uint32)
            bf = cuda.local.array((A2, 4), np.uint32)
            al = cuda.local.array((A1 if SPLIT else 1, 4), np.uint32)
            bl = cuda.local.array((A2 if SPLIT else 1, 4), np.uint32)
            a_steps(kk, af, al, a_lane, smem_base)
            b_steps(kk, bf, bl, b_lane, smem_base)
            mma_steps(acc, af, al, bf, bl)

        return static_loop(KSTEPS, device(k_step))

    sdp_product = make_product(SA1, SA2, KD, s_a, s_b, False, False)
    kv_product = make_product(KA1, KA2, KQ, kv_a, kv_b, True, True)
    dq_product = make_product(QA1, QA2, KK, q_a, q_b, False, True)

    def make_zero(A1, N):
        def zero_step(an, acc):
            for r in range(4):
                acc[an // N, an % N, r] = ZERO
        return static_loop(A1 * N, device(zero_step))

    zero_s = make_zero(SA1, SN)
    zero_kv = make_zero(KA1, KN)
    zero_q = make_zero(QA1, QN)

    def load_query_tile(smem_base, stage, q, dout, stats, b, h, m0, seqlen_q, head_dim, tid):
        """cp.async of Q_i, dO_i and the rows' (lse log2 e, scale Delta) into ``stage``."""
        qs = stage * QSTAGE
        load_q(smem_base, OFF_Q + qs, q, b, m0, seqlen_q, h, head_dim, tid)
        load_q(smem_base, OFF_DO + qs, dout, b, m0, seqlen_q, h, head_dim, tid)
        if tid < 2 * ROW_CHUNKS:
            which = tid // ROW_CHUNKS          # 0: lse log2 e, 1: scale Delta
            chunk = tid - which * ROW_CHUNKS
            dst = smem_base + ES * OFF_ROWS + 4 * (stage * RSTAGE + which * BM + 4 * chunk)
            ops.cp_async_16(dst, ops.global_addr(stats, b, h, which, m0 + 4 * chunk),
                            np.uint32(16))

    def mask_step(an, s, keys_left, diagonal):
        """S = -inf in n-tile (a, n) for keys past seqlen_k and, when causal, above the
        diagonal; in 32 bits, relative to this thread's first query and key."""
        a = an // SN
        n = an % SN
        for r in range(4):
            dq_ = np.int32(16 * SW1 * a + 8 * (r >> 1))                   # query - first
            dk_ = np.int32(16 * SW2 * (n >> 1) + 8 * (n & 1) + (r & 1))   # key - first
            if dk_ >= keys_left or (CAUSAL and dk_ > dq_ + diagonal):
                s[a, n, r] = MINUS_INF

    mask_steps = static_loop(SA1 * SN, device(mask_step))

    def mask_scores(s, n0, m0, seqlen_q, seqlen_k, w1, w2, lane):
        """Called on the tiles that need it only (``tile_needs_mask``)."""
        g = lane >> 2
        t = lane & 3
        query0 = np.int32(m0 + 16 * w1 + g)
        key0 = np.int32(n0 + 16 * w2 + 2 * t)
        keys_left = np.int32(seqlen_k) - key0
        # query0 + dq sees key0 + dk up to dk = dq + diagonal
        diagonal = query0 + np.int32(seqlen_k - seqlen_q) - key0
        mask_steps(s, keys_left, diagonal)

    def rows_step(a, rows, rows_f32, at, w1, lane):
        """This thread's query rows' statistic at ``at`` floats into the stage."""
        g = lane >> 2
        for rh in range(2):
            rows[a, rh] = rows_f32[at + 16 * (w1 + SW1 * a) + g + 8 * rh]

    load_rows = static_loop(SA1, device(rows_step))

    def exp_step(an, s, lse, scale_log2):
        """S -> P = exp2(S c - lse log2 e) (masked scores are -inf: c > 0)."""
        a = an // SN
        n = an % SN
        for r in range(4):
            s[a, n, r] = ops.ex2(cuda.fma(s[a, n, r], scale_log2, -lse[a, r >> 1]))

    exp_steps = static_loop(SA1 * SN, device(exp_step))

    def ds_step(an, dp, p, delta, scale):
        """dP -> dS = P (dP scale - scale Delta)."""
        a = an // SN
        n = an % SN
        for r in range(4):
            dp[a, n, r] = p[a, n, r] * cuda.fma(dp[a, n, r], scale, -delta[a, r >> 1])

    ds_steps = static_loop(SA1 * SN, device(ds_step))

    def store_step(ab, x, at, smem_base):
        """Block (a, b) of x, rounded to 16 bits (tf32: float32, at the key slots),
        into a P-shaped tile."""
        a = ab // SA2
        b = ab - a * SA2
        for half in range(2):
            n = 2 * b + half
            for rh in range(2):
                i = (ab * 2 + half) * 2 + rh
                if TF32:
                    for j in range(2):
                        ops.st_shared_u32(
                            smem_base + ((at ^ ST_LO[2 * i + j]) + ST_HI[2 * i + j]),
                            ops.f32_as_u32(x[a, n, 2 * rh + j]))
                else:
                    ops.st_shared_u32(smem_base + ((at ^ ST_LO[i]) + ST_HI[i]),
                                      pack(x[a, n, 2 * rh], x[a, n, 2 * rh + 1]))

    store_tile = static_loop(SA1 * SA2, device(store_step))

    if TF32:
        def red_step(ab, dq, base, row8, rows_left, cols_left, checked):
            """dq's block (a, b) added into the row-major accumulator, two columns
            per reduction."""
            a = ab // QA2
            b = ab - a * QA2
            for half in range(2):
                n = 2 * b + half
                col = np.int32(16 * QW2 * b + 8 * half)
                for rh in range(2):
                    row = np.int32(16 * QW1 * a + 8 * rh)
                    at = base + (np.uint64(2 * QW1 * a + rh) * row8 + np.uint64(4 * col))
                    if not checked or (row < rows_left and col < cols_left):
                        ops.red_add_f32x2(at, dq[a, n, 2 * rh], dq[a, n, 2 * rh + 1])
    else:
        def red_step(ab, dq, base, row8, rows_left, cols_left, checked):
            """dq's block (a, b) added into the accumulator in fragment order
            (``dq_acc_place``): a whole m16n8 result per reduction, its 8 columns at
            16 of the accumulator's. Its rows are padded to whole query tiles:
            only columns need a test."""
            a = ab // QA2
            b = ab - a * QA2
            for half in range(2):
                n = 2 * b + half
                col = np.int32(16 * QW2 * b + 8 * half)
                at = base + (np.uint64(QW1 * a) * row8 + np.uint64(8 * col))
                if not checked or col < cols_left:
                    ops.red_add_f32x4(at, dq[a, n, 0], dq[a, n, 1], dq[a, n, 2], dq[a, n, 3])

    red_steps = static_loop(QA1 * QA2, device(red_step))
    acc_place = device(dq_acc_place)
    ACC_COLS = 1 if TF32 else 2          # accumulator columns per dQ column

    def add_dq(dq, dq_accum, b, h, m0, seqlen_q, w1, w2, lane):
        """dQ_i's share of this warp into the float32 accumulator with atomics, whole
        fragments (16-bit; tf32: column pairs) per reduction: the L2's atomic units
        were the backward's bottleneck (79% busy with scalar atomics, ncu on the
        H100), and the vector reductions halved and then halved again their count.

        One address per thread; each reduction's offset from it is a constant times
        the row stride or a constant. dq_accum is nbflash's own contiguous buffer and
        its head dim a multiple of 8, so a vector is inside whole or not at all, and
        aligned. Addresses of rows past seqlen_q are formed but, in the unpadded
        tf32 layout, never used."""
        g = lane >> 2
        t = lane & 3
        row = m0 + 16 * w1 + g
        col = 16 * w2 + 2 * t
        if TF32:
            acc_row, acc_col = row, col
        else:
            acc_row, acc_col = acc_place(row, col)
        base = ops.global_addr(dq_accum, b, acc_row, h, acc_col)
        row8 = np.uint64(8 * dq_accum.strides[1])
        rows_left = np.int32(seqlen_q - row)
        cols_left = np.int32(dq_accum.shape[3] // ACC_COLS - col)
        # Interior tiles at full head dims need no tests; each cost a branch and a
        # reconvergence barrier per reduction in the SASS.
        interior = (not TF32 or m0 + BM <= seqlen_q) and dq_accum.shape[3] == ACC_COLS * D
        if interior:
            red_steps(dq, base, row8, rows_left, cols_left, False)
        else:
            red_steps(dq, base, row8, rows_left, cols_left, True)

    def store_pair_step(ab, acc, base, row8, keys_left):
        a = ab // KA2
        b = ab - a * KA2
        for rh in range(2):
            if np.int32(16 * KW1 * a + 8 * rh) < keys_left:
                at = base + np.uint64(2 * KW1 * a + rh) * row8
                for half in range(2):
                    n = 2 * b + half
                    ops.st_global_u32(at + np.uint64(2 * (16 * KW2 * b + 8 * half)),
                                      pack(acc[a, n, 2 * rh], acc[a, n, 2 * rh + 1]))

    store_pairs = static_loop(KA1 * KA2, device(store_pair_step))

    def store_element_step(ab, out, acc, b_, h_kv, key0, col0, seqlen_k):
        a = ab // KA2
        b = ab - a * KA2
        for rh in range(2):
            key = key0 + 16 * KW1 * a + 8 * rh
            for half in range(2):
                n = 2 * b + half
                for j in range(2):
                    col = col0 + 16 * KW2 * b + 8 * half + j
                    if key < seqlen_k and col < out.shape[3]:
                        out[b_, key, h_kv, col] = from_acc(acc[a, n, 2 * rh + j])

    store_elements = static_loop(KA1 * KA2, device(store_element_step))

    def store_gradient(out, acc, b, h_kv, n0, seqlen_k, w1, w2, lane):
        """dK_j or dV_j: this warp's blocks, written once. At full head dims each row
        takes packed pairs at constant offsets from one address per thread: element
        stores formed a 64-bit address each and held its registers until issued
        (a third of the kernel's time at seqlen 512, ncu, d128)."""
        g = lane >> 2
        t = lane & 3
        key0 = n0 + 16 * w1 + g
        col0 = 16 * w2 + 2 * t
        if not TF32 and out.shape[3] == D:
            base = ops.global_addr(out, b, key0, h_kv, 0) + np.uint64(2 * col0)
            store_pairs(acc, base, np.uint64(8 * out.strides[1]),
                        np.int32(seqlen_k) - np.int32(key0))
        else:
            store_elements(out, acc, b, h_kv, key0, col0, seqlen_k)

    store_gradient_d = device(store_gradient)
    add_dq_d = device(add_dq)
    load_query_tile_d = device(load_query_tile)
    mask_scores_d = device(mask_scores)
    U16 = from_dtype(np.uint16)

    precision = f"_tf32x{passes}" if TF32 else ""
    @kernel(f"backward_mma_{dtype_name}{precision}_{config_name(cfg)}_"
            f"{'causal' if causal else 'full'}" + ("_deterministic" if deterministic else ""),
            (cfg, dtype_name, causal, deterministic, passes), lineinfo=True)
    def backward_mma(q, k, v, dout, stats, dq_accum, dk, dv, scale, scale_log2):
        h_kv = cuda.blockIdx.y
        b = cuda.blockIdx.z
        tid = cuda.threadIdx.x
        warp = tid >> 5
        lane = tid & 31
        seqlen_q = q.shape[1]
        seqlen_k = k.shape[1]
        head_dim = q.shape[3]
        group = q.shape[2] // k.shape[2]
        # One key tile per block, or, deterministic, a strided share of them and a
        # dQ accumulator slice of its own: see DETERMINISM in kernels/backward.py.
        split, stop, step, dq_b = key_tiles(b, q.shape[0], seqlen_k)
        # This warp's place in each product's grid.
        s1 = warp // SW2
        s2 = warp - s1 * SW2
        k1 = warp // KW2
        k2 = warp - k1 * KW2
        q1 = warp // QW2
        q2 = warp - q1 * QW2
        # Lane offsets (bytes) of the first fragments, tiles at stage 0.
        r, c = lane_rc(lane, s1, 0)
        s_a_lane = s_a_lane_at(r, c)
        r, c = lane_rc_swapped(lane, s2, 0)
        s_b_lane = s_b_lane_at(r, c)
        if TF32:
            r, c = lane_across(lane, k1, True)
            kv_a_lane = kv_a_lane_at(r, c)
            r, c = lane_across(lane, k2, False)
            kv_b_lane = kv_b_lane_at(r, c)
            r, c = lane_across(lane, q2, False)
            q_b_lane = q_b_lane_at(r, c)
        else:
            r, c = lane_rc_swapped(lane, 0, k1)
            kv_a_lane = kv_a_lane_at(r, c)
            r, c = lane_rc(lane, 0, k2)
            kv_b_lane = kv_b_lane_at(r, c)
            r, c = lane_rc(lane, 0, q2)
            q_b_lane = q_b_lane_at(r, c)
        r, c = lane_rc(lane, q1, 0)
        q_a_lane = q_a_lane_at(r, c)
        st_at = st_lane(16 * s1 + (lane >> 2), 16 * s2 + ST_COLS * (lane & 3))

        smem = cuda.shared.array(0, U16)
        smem_base = ops.smem_addr(smem, 0)
        rows_f32 = cuda.shared.array(0, F32)[OFF_ROWS * ES // 4:OFF_ROWS * ES // 4 + 2 * RSTAGE]

        dk_acc = cuda.local.array((KA1, KN, 4), np.float32)
        dv_acc = cuda.local.array((KA1, KN, 4), np.float32)
        s = cuda.local.array((SA1, SN, 4), np.float32)
        dp = cuda.local.array((SA1, SN, 4), np.float32)
        lse = cuda.local.array((SA1, 2), np.float32)
        delta = cuda.local.array((SA1, 2), np.float32)
        dq = cuda.local.array((QA1, QN, 4), np.float32)
        for n_block in range(split, stop, step):
            n0 = n_block * BN
            cuda.syncthreads()         # the previous key tile's K, V, P and dS are free
            zero_kv(dk_acc)
            zero_kv(dv_acc)

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
                qs = stage * (ES * QSTAGE)     # bytes
                rs = stage * RSTAGE
                ops.cp_async_wait(0)
                cuda.syncthreads()         # tile it has landed; tile it-1's stage, P, dS are free
                h_next = h
                m_next = m_block + 1
                if m_next == m_end:
                    m_next = m_start
                    h_next = h + 1
                if it + 1 < total:         # tile it+1 is copied during all of tile it
                    load_query_tile_d(smem_base, 1 - stage, q, dout, stats, b, h_next,
                                      m_next * BM, seqlen_q, head_dim, tid)
                    ops.cp_async_commit()

                # S = Q K^T, P = exp2(S c - lse log2 e), into shared memory as 16 bits
                zero_s(s)
                sdp_product(s, Q_AT + qs + s_a_lane, K_AT + s_b_lane, smem_base)
                if tile_needs_mask(m_block, n_block, BM, BN, seqlen_q, seqlen_k, CAUSAL):
                    mask_scores_d(s, n0, m0, seqlen_q, seqlen_k, s1, s2, lane)
                load_rows(lse, rows_f32, rs, s1, lane)
                exp_steps(s, lse, scale_log2)
                store_tile(s, P_AT + st_at, smem_base)
                # dP = dO V^T, dS = P (dP scale - scale Delta), into shared memory
                zero_s(dp)
                sdp_product(dp, DO_AT + qs + s_a_lane, V_AT + s_b_lane, smem_base)
                load_rows(delta, rows_f32, rs + BM, s1, lane)
                ds_steps(dp, s, delta, scale)
                store_tile(dp, DS_AT + st_at, smem_base)
                cuda.syncthreads()         # P and dS are visible

                # dQ between dV and dK, as FlashAttention-2 orders them: its reductions
                # drain while dK's products run, not while the block waits at the
                # next barrier.
                kv_product(dv_acc, P_AT + kv_a_lane, DO_AT + qs + kv_b_lane, smem_base)
                zero_q(dq)
                dq_product(dq, DS_AT + q_a_lane, K_AT + q_b_lane, smem_base)
                add_dq_d(dq, dq_accum, dq_b, h, m0, seqlen_q, q1, q2, lane)
                kv_product(dk_acc, DS_AT + kv_a_lane, Q_AT + qs + kv_b_lane, smem_base)
                h = h_next
                m_block = m_next

            # ---- Epilogue: dK_j, dV_j are complete; written once
            ops.cp_async_wait(0)
            store_gradient_d(dk, dk_acc, b, h_kv, n0, seqlen_k, k1, k2, lane)
            store_gradient_d(dv, dv_acc, b, h_kv, n0, seqlen_k, k1, k2, lane)

    return backward_mma
