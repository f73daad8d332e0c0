"""FlashAttention forward pass on tensor cores (float16 and bfloat16 on m16n8k16;
float32 on tf32 m16n8k8, with one product or three: see ``build_forward_mma``).

The same algorithm as ``forward.py`` (and ``reference/tiled.py::flash_forward``), in
the FlashAttention-2 arrangement:

- one thread block per (query tile, head, batch); each warp owns ``16 * M_TILES``
  query rows, so warps never exchange data and no shared memory holds S or P;
- Q is copied to shared memory once; its mma A-fragments are kept in registers
  (head dims up to 64) or reloaded per k-step (larger head dims, short of registers);
- K and V tiles stream through two stages of shared memory with ``cp.async``: K_{j+1}
  and V_{j+1} are copied during all of tile j's work, one barrier per tile. (With one
  stage, V_j copied during S = Q K_j^T and K_{j+1} during P V_j, ncu on the H100 put
  26% of the head-dim-128 stall samples on waits for the copies; two stages measured
  no faster, since those waits are set by the L2's request throughput, but need one
  barrier per tile instead of two.)
- S lives in registers as mma accumulators; the softmax runs on them (row max and
  sum over the 4 lanes of a quad with shuffles), in the exp2 domain with
  c = softmax_scale * log2(e) folded into one fused multiply-add per score;
- P is rounded to 16 bits and reused directly as the A operand of P V: the
  accumulator layout of two 16x8 tiles is the A-fragment layout of one 16x16 tile;
- the output accumulator is rescaled only for rows whose running max changed;
- causal tiles above the diagonal are skipped, only the diagonal (and the last,
  partial) tiles are masked.

Shared-memory tiles are row-major and XOR-swizzled (see ``make_mma_tile_ops``).
"""
import functools
import math

import numpy as np
from numba import cuda, from_dtype

from .. import ops
from ..config import MmaConfig, tile_row
from .common import (LN2, NEG_INF, config_name, device, element_codec, kernel,
                     key_tile_range, make_query_tile_order, static_loop,
                     tf32_split_rounding, tile_needs_mask)


def make_mma_tile_ops(cfg: MmaConfig, dtype_name: str):
    """Device functions shared by the tensor-core kernels for one configuration:
    ``(make_loader, make_offset, mma, pack, make_steps)``.

    Shared-memory tiles are row-major and XOR-swizzled in 16-byte chunks: within
    each 128-byte line, chunk slot s holds chunk ``s ^ key`` with ``key`` the row's
    line number modulo 8 (the row modulo 8 for rows of whole lines). Eight
    consecutive threads copy 128 contiguous bytes of global memory, one L2 request
    of whole sectors, into one 128-byte line of shared memory; the 8 rows that one
    ``ldmatrix`` matrix reads, 16 bytes each at the same columns, fall in 8
    different bank groups. A lane's address for the next 16 rows is a compile-time
    constant away, for the next 16 columns one XOR with a constant.

    (Two layouts measured worse on the H100, ncu of the d128 forward at seqlen
    4096. Chunk-major tiles, chunk c of row r at slot ``c * rows + r``, had eight
    threads copy one chunk of eight rows: every 16-byte read was its own one-sector
    L2 request and every sector was read twice, 245M requests for 245M sectors
    against FlashAttention-2's 31M for 124M; 2.68 ms. Rows padded by 16 bytes put
    each 128-byte copy across two lines of shared memory: 89M requests for 202M
    sectors; 1.91 ms.)
    """
    D, NT = cfg.head_dim, cfg.threads
    ES = 4 if dtype_name == "float32" else 2     # bytes per element
    assert ES == cfg.element_bytes, (cfg, dtype_name)
    EC = 16 // ES                                # elements per 16-byte chunk
    CHUNKS = D // EC
    SHIFT = EC.bit_length() - 1
    mma = {"float16": ops.mma_f16, "bfloat16": ops.mma_bf16, "float32": ops.mma_tf32}[dtype_name]
    pack = ops.pack_f16x2 if dtype_name == "float16" else ops.pack_bf16x2

    def swizzled(width):
        """Element offset of (row, col) in a tile of rows ``width`` elements wide
        (``config.tile_row(width)`` allocated per row), as a plain function."""
        ROW = tile_row(width, ES)
        ROWS_PER_LINE = max(1, 128 // (ROW * ES))
        LINE_SHIFT = ROWS_PER_LINE.bit_length() - 1

        def offset(row, col):
            key = (row >> LINE_SHIFT) & 7
            return (row * ROW + col) ^ (key << SHIFT)

        return offset

    def make_offset(width):
        """``offset(row, col)``, the device function of ``swizzled(width)``."""
        return device(swizzled(width))

    def make_steps(width, lane_rows, lane_cols, steps):
        """Splits the byte offsets of an access pattern into a lane part and
        compile-time parts.

        A lane reads (l + R, c + C) for its own row l in ``lane_rows`` and column c in
        ``lane_cols``, at each compile-time step (R, C) of ``steps``. Returns
        ``(lane_offset, HI, LO)``: the device function ``lane_offset(l, c)`` (bytes)
        and tuples such that, for a tile at a multiple of 128 bytes ``t``, the step-i
        offset is ``((t + lane_offset(l, c)) ^ LO[i]) + HI[i]``. The swizzle's XOR
        acts on bits 4-6 only, so a step costs one XOR with a constant, where the
        whole offset took four to six instructions per ldmatrix. Checked here, at
        build time, for every lane and step.
        """
        f = swizzled(width)
        his, los = [], []
        for R, C in steps:
            v = f(R, C) * ES
            for l in lane_rows:
                for c in lane_cols:
                    assert f(l + R, c + C) * ES == ((f(l, c) * ES) ^ (v & 127)) + (v & ~127), \
                        (width, l, c, R, C)
            his.append(v & ~127)
            los.append(v & 127)
        offset = make_offset(width)

        @device
        def lane_offset(row, col):
            return offset(row, col) * ES

        return lane_offset, tuple(his), tuple(los)

    tile_offset = make_offset(D)

    def chunk_and_row(it, tid):
        """The chunk column and tile row of a thread's copy number ``it``: copies are
        numbered row by row, so consecutive threads take consecutive chunks."""
        if NT % CHUNKS == 0:             # a thread keeps its chunk column
            return tid % CHUNKS, it * (NT // CHUNKS) + tid // CHUNKS
        if CHUNKS % NT == 0:             # a row takes several copies per thread
            return (it % (CHUNKS // NT)) * NT + tid, it // (CHUNKS // NT)
        flat = it * NT + tid             # head dim 96: 12 chunks over 128 threads
        return flat % CHUNKS, flat // CHUNKS

    chunk_and_row_d = device(chunk_and_row)

    def make_loader(rows):
        assert rows % 8 == 0 and (rows * CHUNKS) % NT == 0, (rows, CHUNKS, NT)
        passes = rows * CHUNKS // NT
        if NT % CHUNKS:
            return make_general_loader(passes)
        # Each thread keeps one chunk column and copies every RS-th row: copy i's
        # source is a multiple of the row step away from the first, and its
        # destination a compile-time constant away (make_steps).
        RS = NT // CHUNKS
        dst_lane, DST_HI, DST_LO = make_steps(
            D, range(RS), [c * EC for c in range(CHUNKS)], [(i * RS, 0) for i in range(passes)])

        def copy_step(i, smem_base, dst, origin, step, rows_left, col_inside):
            inside = col_inside and np.int32(i * RS) < rows_left
            ops.cp_async_16_or_zero(smem_base + ((dst ^ DST_LO[i]) + DST_HI[i]),
                                    np.uint64(origin + np.int64(np.int32(i) * step)),
                                    np.uint32(1) if inside else np.uint32(0))

        copies = static_loop(passes, device(copy_step))

        def load_tile_async(smem_base, base, src, b, row0, n_rows, head, head_dim, tid):
            """cp.async of rows [row0, row0 + rows) of src[b, :, head, :] into the tile at
            ``base``; rows past n_rows and chunks past head_dim are zero-filled.

            Offsets within a tile are 32-bit (the host copies tensors whose row stride
            is over ``MAX_ROW_STRIDE`` bytes); a copy that is not made zero-fills with
            its source ignored, so that address need not be valid. With 64-bit
            per-copy offsets and a valid-address select, which LLVM hoisted out of the
            main loop and ptxas spilled, a K and a V tile of the head-dim-128 forward
            (128x64) took 204 SASS instructions, 28 of them spill reloads; now 147."""
            row_stride = np.int32(src.strides[1])        # bytes; may be negative
            ch = tid % CHUNKS
            r0 = tid // CHUNKS
            origin = (np.int64(ops.global_addr(src, b, row0, head, 0))
                      + np.int64(np.int32(r0) * row_stride + np.int32(ch * 16)))
            copies(smem_base, ES * base + dst_lane(r0, ch * EC), origin,
                   np.int32(RS) * row_stride, np.int32(n_rows) - np.int32(row0) - np.int32(r0),
                   np.int32(ch * EC) < np.int32(head_dim))

        return device(load_tile_async)

    def make_general_loader(passes):
        """Any thread layout (head dim 96: 12 chunks per row over 128 threads)."""
        def load_tile_async(smem_base, base, src, b, row0, n_rows, head, head_dim, tid):
            row_stride = np.int32(src.strides[1])
            tile_origin = np.int64(ops.global_addr(src, b, row0, head, 0))
            rows_left = np.int32(n_rows - row0)
            for it in range(passes):
                ch, r = chunk_and_row_d(it, tid)
                inside = np.int32(r) < rows_left and np.int32(ch * EC) < np.int32(head_dim)
                dst = smem_base + ES * (base + tile_offset(r, ch * EC))
                ops.cp_async_16_or_zero(
                    dst, np.uint64(tile_origin + np.int64(np.int32(r) * row_stride + np.int32(ch * 16))),
                    np.uint32(1) if inside else np.uint32(0))

        return device(load_tile_async)

    return make_loader, make_offset, mma, pack, make_steps


@functools.lru_cache(maxsize=None)
def build_forward_mma(cfg: MmaConfig, dtype_name: str, causal: bool, passes: int = 1):
    """The tensor-core forward kernel ``(q, k, v, o, lse, scale_log2)``.

    q, k, v are the inputs viewed as uint16 (float32 for ``dtype_name`` float32); o is
    in its storage type. Launch with grid ``(ceil(seqlen_q / block_m), nheads, batch)``,
    ``cfg.threads`` threads and ``cfg.forward_shared_bytes`` bytes of dynamic shared
    memory.

    float32 runs on tf32 tensor cores (m16n8k8), the same algorithm with a k-step of
    8: with ``passes=1`` every operand is rounded to tf32; with ``passes=3`` each is
    split into a tf32 ``big`` and the tf32 rounding of its remainder ``small``, and
    a product is ``small*big + big*small + big*big`` (3xTF32, float32 accuracy).
    """
    BM, BN, D, NT = cfg.block_m, cfg.block_n, cfg.head_dim, cfg.threads
    TF32 = dtype_name == "float32"
    assert passes in ((1, 3) if TF32 else (1,)), (dtype_name, passes)
    SPLIT = passes == 3
    ES = cfg.element_bytes                 # bytes per element in shared memory
    KW = 8 if TF32 else 16                 # the mma's k: 8 tf32 or 16 16-bit values
    MT = cfg.m_tiles                       # 16-row m-tiles per warp
    WM = 16 * MT                           # query rows per warp
    KS = D // KW                           # k-steps over the head dim (S = Q K^T)
    NS = BN // 8                           # 8-key n-tiles of S
    KP = BN // KW                          # k-steps over the keys (O += P V)
    DT = D // 8                            # 8-column n-tiles of O
    Q_IN_REGS = cfg.q_in_registers
    QF_STEPS = KS if Q_IN_REGS else 1      # k-steps of Q fragments held at once
    CAUSAL = causal
    query_tile = make_query_tile_order(causal)
    # Typed constants: a bare Python float is a float64 to Numba and drags the
    # softmax into double precision and conversions.
    ZERO = np.float32(0.0)
    ONE = np.float32(1.0)
    MINUS_INF = np.float32(NEG_INF)
    LN2_32 = np.float32(LN2)

    # Shared memory in elements: Q, then two stages of K, then two of V, every tile
    # of cfg.row elements per row. Stage st's tiles are at OFF_K + st * KV_STAGE and
    # OFF_V + st * KV_STAGE.
    KV_STAGE = BN * cfg.row
    OFF_Q = 0
    OFF_K = OFF_Q + BM * cfg.row
    OFF_V = OFF_K + 2 * KV_STAGE
    assert (OFF_V + 2 * KV_STAGE) * ES == cfg.forward_shared_bytes
    assert (OFF_K * ES) % 128 == 0 and (KV_STAGE * ES) % 128 == 0, cfg   # see make_steps

    make_loader, make_offset, mma, pack, make_steps = make_mma_tile_ops(cfg, dtype_name)
    load_q = make_loader(BM)
    load_kv = make_loader(BN)
    # Compile-time parts of the ldmatrix addresses (make_steps), in the order of the
    # static loops below: Q by (k-step, m-tile), K by (k-step, 16-key block), V by
    # (16-key block, 16-column block), or (8-key block, 8-column block) for tf32.
    q_lane, Q_HI, Q_LO = make_steps(
        D, [w * WM + r for w in range(cfg.warps) for r in range(16)], [0, KW // 2],
        [(mt * 16, kk * KW) for kk in range(KS) for mt in range(MT)])
    k_lane, K_HI, K_LO = make_steps(
        D, range(16), [0, KW // 2], [(nt2 * 16, kk * KW) for kk in range(KS) for nt2 in range(NS // 2)])
    if TF32:
        v_lane, V_HI, V_LO = make_steps(
            D, range(8), range(8), [(kk * 8, dt * 8) for kk in range(KP) for dt in range(DT)])
    else:
        v_lane, V_HI, V_LO = make_steps(
            D, range(16), [0, 8], [(kk * 16, dt2 * 16) for kk in range(KP) for dt2 in range(DT // 2)])
    _, from_acc = element_codec(dtype_name)

    # One product rounds as documented (ties away, as reference.tf32_round); the
    # 3xTF32 split may round any way, and takes the native instruction where there is
    # one (common.tf32_split_rounding).
    to_tf32 = tf32_split_rounding() if SPLIT else ops.to_tf32

    @device
    def operand(bits):
        """One register of an mma operand from raw loaded bits: tf32-rounded for float32
        (16-bit values are used as loaded)."""
        return to_tf32(ops.u32_as_f32(bits)) if TF32 else bits

    @device
    def remainder(bits, big):
        """The tf32 rounding of (value - big): the 3xTF32 split's small part."""
        return to_tf32(ops.u32_as_f32(bits) - ops.u32_as_f32(big))

    def load_q_fragment(qf, ql, kk, smem_base, warp, lane):
        """Q's A-fragments for k-step kk (KW head-dim columns) of this warp's rows (and
        their small parts ``ql`` when split)."""
        mat = lane >> 3
        lane_q = ES * OFF_Q + q_lane(warp * WM + (mat & 1) * 8 + (lane & 7), (mat >> 1) * (KW // 2))
        slot = kk if Q_IN_REGS else 0
        for mt in range(MT):
            step = kk * MT + mt
            a = ops.ldmatrix_x4(smem_base + ((lane_q ^ Q_LO[step]) + Q_HI[step]))
            for i in range(4):
                big = operand(a[i])
                qf[mt, slot, i] = big
                if SPLIT:
                    ql[mt, slot, i] = remainder(a[i], big)

    load_q_fragment_d = device(load_q_fragment)

    def load_q_step(kk, qf, ql, smem_base, warp, lane):
        load_q_fragment_d(qf, ql, kk, smem_base, warp, lane)

    load_q_fragments = static_loop(KS, device(load_q_step))

    def qk_step(step, s, qf, ql, smem_base, k_off, warp, lane):
        """One KW-dim by 16-key step of S = Q K_j^T: an ldmatrix of K, two mma per m-tile
        (three each when split).

        s[mt, nt] holds rows g, g+8 and keys 2t, 2t+1 of the 16x8 tile (mt, nt). With
        Q_IN_REGS the Q fragments were loaded once per block; otherwise (large head
        dims, where registers are short) each k-step reloads its fragment from shared
        memory, FlashAttention-2's choice for head dim 128 and up."""
        kk = step // (NS // 2)
        nt2 = step - kk * (NS // 2)
        if not Q_IN_REGS and nt2 == 0:
            load_q_fragment_d(qf, ql, kk, smem_base, warp, lane)
        q_kk = kk if Q_IN_REGS else 0
        mat = lane >> 3
        lane_k = k_off + k_lane((mat >> 1) * 8 + (lane & 7), (mat & 1) * (KW // 2))
        b = ops.ldmatrix_x4(smem_base + ((lane_k ^ K_LO[step]) + K_HI[step]))
        kb = cuda.local.array(4, np.uint32)
        kl = cuda.local.array(4, np.uint32)
        for i in range(4):
            kb[i] = operand(b[i])
            if SPLIT:
                kl[i] = remainder(b[i], kb[i])
        for mt in range(MT):
            for half in range(2):
                nt = 2 * nt2 + half
                c = (s[mt, nt, 0], s[mt, nt, 1], s[mt, nt, 2], s[mt, nt, 3])
                if SPLIT:       # the small terms first, while the sum is small
                    c = mma(ql[mt, q_kk, 0], ql[mt, q_kk, 1], ql[mt, q_kk, 2],
                            ql[mt, q_kk, 3], kb[2 * half], kb[2 * half + 1],
                            c[0], c[1], c[2], c[3])
                    c = mma(qf[mt, q_kk, 0], qf[mt, q_kk, 1], qf[mt, q_kk, 2],
                            qf[mt, q_kk, 3], kl[2 * half], kl[2 * half + 1],
                            c[0], c[1], c[2], c[3])
                c = mma(qf[mt, q_kk, 0], qf[mt, q_kk, 1], qf[mt, q_kk, 2], qf[mt, q_kk, 3],
                        kb[2 * half], kb[2 * half + 1], c[0], c[1], c[2], c[3])
                for i in range(4):
                    s[mt, nt, i] = c[i]

    qk_steps = static_loop(NS // 2 * KS, device(qk_step))

    def scores(s, qf, ql, smem_base, k_off, warp, lane):
        """s = Q K_j^T as mma accumulators; K_j's tile is ``k_off`` bytes into shared
        memory."""
        for mt in range(MT):
            for nt in range(NS):
                for i in range(4):
                    s[mt, nt, i] = ZERO
        qk_steps(s, qf, ql, smem_base, k_off, warp, lane)

    def apply_mask(s, row0, n0, seqlen_q, seqlen_k, lane):
        """-inf for keys past seqlen_k and, when causal, above the diagonal."""
        # In 32 bits, relative to this thread's first key: the 64-bit compares cost
        # registers the head-dim-128 causal kernel did not have.
        g = lane >> 2
        t = lane & 3
        key0 = np.int32(n0 + 2 * t)
        keys_left = np.int32(seqlen_k) - key0              # keys key0, key0 + 1, ... exist
        diagonal = np.int32(row0 + g + seqlen_k - seqlen_q) - key0
        for mt in range(MT):
            for i in range(4):
                last = diagonal + np.int32(mt * 16 + 8 * (i >> 1))  # last key this row sees
                for nt in range(NS):
                    k = np.int32(nt * 8 + (i & 1))
                    if k >= keys_left or (CAUSAL and k > last):
                        s[mt, nt, i] = MINUS_INF

    def rescale_step(dt, o, mt, half, alpha):
        o[mt, dt, 2 * half] *= alpha
        o[mt, dt, 2 * half + 1] *= alpha

    def zero_step(dt, o):
        for mt in range(MT):
            for i in range(4):
                o[mt, dt, i] = ZERO

    # Loops over the DT n-tiles of O, spelled out: one rolled loop (head dim 256)
    # sends the whole accumulator to local memory.
    rescale_rows = static_loop(DT, device(rescale_step))
    zero_o = static_loop(DT, device(zero_step))

    def online_softmax(s, o, m, l, scale_log2):
        """Turns s into P = exp2(S c - m_new c) in place, updates the running max m and
        this thread's partial row sums l, and rescales o by exp2((m_old - m_new) c).

        Each phase runs over all of the thread's 2 MT rows before the next, so that
        their shuffles and exp2 overlap, and the rescale is unconditional (a multiply
        by 1 when the max is unchanged): a branch per row kept each row's shuffle
        latency exposed (ncu: the softmax was a quarter of the forward's stalls)."""
        mx = cuda.local.array((MT, 2), np.float32)
        for mt in range(MT):
            for half in range(2):
                m_new = m[mt, half]
                for nt in range(NS):
                    m_new = max(m_new, max(s[mt, nt, 2 * half], s[mt, nt, 2 * half + 1]))
                mx[mt, half] = m_new
        # A row lives in the 4 lanes of a quad.
        for mt in range(MT):
            for half in range(2):
                mx[mt, half] = max(mx[mt, half], ops.shfl_xor(mx[mt, half], 1))
        for mt in range(MT):
            for half in range(2):
                mx[mt, half] = max(mx[mt, half], ops.shfl_xor(mx[mt, half], 2))
        for mt in range(MT):
            for half in range(2):
                m_new = mx[mt, half]
                # A row that has seen no key keeps m = -inf; shift by 0 so that
                # exp2(-inf - 0) = 0 and no inf - inf is formed.
                m_scaled = m_new * scale_log2 if m_new != MINUS_INF else ZERO
                alpha = ops.ex2(m[mt, half] * scale_log2 - m_scaled)  # 0 when m_old = -inf
                m[mt, half] = m_new
                row_sum = ZERO
                for nt in range(NS):
                    for j in range(2):
                        p = ops.ex2(cuda.fma(s[mt, nt, 2 * half + j], scale_log2, -m_scaled))
                        s[mt, nt, 2 * half + j] = p
                        row_sum += p
                l[mt, half] = l[mt, half] * alpha + row_sum
                rescale_rows(o, mt, half, alpha)

    def pack_p(step, pf, pl, s):
        """P's A-fragments for keys [16 step, 16 step + 16): the accumulators of n-tiles
        2 step and 2 step + 1, rounded to 16 bits, are exactly that layout. (``pl``,
        the tf32 split's small parts, has no 16-bit use.)"""
        for mt in range(MT):
            pf[mt, step, 0] = pack(s[mt, 2 * step, 0], s[mt, 2 * step, 1])
            pf[mt, step, 1] = pack(s[mt, 2 * step, 2], s[mt, 2 * step, 3])
            pf[mt, step, 2] = pack(s[mt, 2 * step + 1, 0], s[mt, 2 * step + 1, 1])
            pf[mt, step, 3] = pack(s[mt, 2 * step + 1, 2], s[mt, 2 * step + 1, 3])

    def pv_step(step, o, pf, pl, smem_base, v_off, lane):
        """One 16-key by 16-column step of O += P V_j: an ldmatrix.trans of V, two mma
        per m-tile."""
        kk = step // (DT // 2)
        dt2 = step - kk * (DT // 2)
        mat = lane >> 3
        lane_v = v_off + v_lane((mat & 1) * 8 + (lane & 7), (mat >> 1) * 8)
        vb = ops.ldmatrix_x4_trans(smem_base + ((lane_v ^ V_LO[step]) + V_HI[step]))
        for mt in range(MT):
            for half in range(2):
                dt = 2 * dt2 + half
                c = mma(pf[mt, kk, 0], pf[mt, kk, 1], pf[mt, kk, 2], pf[mt, kk, 3],
                        vb[2 * half], vb[2 * half + 1],
                        o[mt, dt, 0], o[mt, dt, 1], o[mt, dt, 2], o[mt, dt, 3])
                for i in range(4):
                    o[mt, dt, i] = c[i]

    # tf32: the k-step of P V is 8 keys, one n-tile of S. Its accumulators hold keys
    # 2t and 2t + 1 of rows g and g + 8, where an A-fragment wants keys t and t + 4;
    # P V sums over keys in any order, so key 2t is taken as the fragment's key t and
    # 2t + 1 as t + 4, and V's B operand reads V rows 2t and 2t + 1 to match.
    P_SLOT = (0, 2, 1, 3)       # A register i <- accumulator P_SLOT[i]

    def split_p(step, pf, pl, s):
        """P's tf32 A-fragments for keys [8 step, 8 step + 8), and small parts."""
        for mt in range(MT):
            for i in range(4):
                bits = ops.f32_as_u32(s[mt, step, P_SLOT[i]])
                big = operand(bits)
                pf[mt, step, i] = big
                if SPLIT:
                    pl[mt, step, i] = remainder(bits, big)

    def pv_step_tf32(step, o, pf, pl, smem_base, v_off, lane):
        """One 8-key by 8-column step of O += P V_j: two 32-bit loads of V, one mma per
        m-tile (three when split)."""
        kk = step // DT
        dt = step - kk * DT
        lane_v0 = v_off + v_lane(2 * (lane & 3), lane >> 2)
        lane_v1 = v_off + v_lane(2 * (lane & 3) + 1, lane >> 2)
        v0 = ops.ld_shared_u32(smem_base + ((lane_v0 ^ V_LO[step]) + V_HI[step]))
        v1 = ops.ld_shared_u32(smem_base + ((lane_v1 ^ V_LO[step]) + V_HI[step]))
        vb0, vb1 = operand(v0), operand(v1)
        vl0, vl1 = (remainder(v0, vb0), remainder(v1, vb1)) if SPLIT else (vb0, vb1)
        for mt in range(MT):
            c = (o[mt, dt, 0], o[mt, dt, 1], o[mt, dt, 2], o[mt, dt, 3])
            if SPLIT:
                c = mma(pl[mt, kk, 0], pl[mt, kk, 1], pl[mt, kk, 2], pl[mt, kk, 3],
                        vb0, vb1, c[0], c[1], c[2], c[3])
                c = mma(pf[mt, kk, 0], pf[mt, kk, 1], pf[mt, kk, 2], pf[mt, kk, 3],
                        vl0, vl1, c[0], c[1], c[2], c[3])
            c = mma(pf[mt, kk, 0], pf[mt, kk, 1], pf[mt, kk, 2], pf[mt, kk, 3],
                    vb0, vb1, c[0], c[1], c[2], c[3])
            for i in range(4):
                o[mt, dt, i] = c[i]

    if TF32:
        pack_p_steps = static_loop(KP, device(split_p))
        pv_steps = static_loop(KP * DT, device(pv_step_tf32))
    else:
        pack_p_steps = static_loop(KP, device(pack_p))
        pv_steps = static_loop(KP * DT // 2, device(pv_step))

    def accumulate_pv(o, s, smem_base, v_off, lane):
        """o += P V_j with P taken from the score accumulators."""
        pf = cuda.local.array((MT, KP, 4), np.uint32)
        pl = cuda.local.array((MT, KP if SPLIT else 1, 4), np.uint32)
        pack_p_steps(pf, pl, s)
        pv_steps(o, pf, pl, smem_base, v_off, lane)

    def store_step(dt, out, o, mt, half, inv, b, row, h, head_dim, t):
        for j in range(2):
            col = dt * 8 + 2 * t + j
            if col < head_dim:
                out[b, row, h, col] = from_acc(o[mt, dt, 2 * half + j] * inv)

    store_row = static_loop(DT, device(store_step))

    def store_pair_step(dt, at, o, mt, half, inv):
        ops.st_global_u32(at + np.uint64(16 * dt),
                          pack(o[mt, dt, 2 * half] * inv, o[mt, dt, 2 * half + 1] * inv))

    store_row_pairs = static_loop(DT, device(store_pair_step))

    def write_row(step, out, lse, o, m, l, b, h, row0, seqlen_q, head_dim, scale_log2, lane):
        """Row g + 8 half of m-tile mt (step = 2 mt + half) of this thread's rows."""
        mt = step >> 1
        half = step & 1
        g = lane >> 2
        t = lane & 3
        row = row0 + mt * 16 + g + 8 * half
        total = l[mt, half]
        total += ops.shfl_xor(total, 1)
        total += ops.shfl_xor(total, 2)
        inv = ONE / total if total > ZERO else ZERO   # rows that saw no key give 0
        if row < seqlen_q:
            if not TF32 and head_dim == D:
                # Packed pairs at constant offsets from one address per row: element
                # stores cost a 64-bit address each (see ops.st_global_u32).
                at = ops.global_addr(out, b, row, h, 0) + np.uint64(4 * t)
                store_row_pairs(at, o, mt, half, inv)
            else:
                store_row(out, o, mt, half, inv, b, row, h, head_dim, t)
            if t == 0:
                lse[b, h, row] = ((m[mt, half] * scale_log2 + math.log2(total)) * LN2_32
                                  if total != ZERO else MINUS_INF)

    # O = o / l and lse = (m c + log2 l) ln 2 for this thread's rows, one row per
    # compile-time step: with bfloat16's longer rounding code NVVM left a rolled loop
    # over the rows here, and o, indexed by its counter, went to local memory for
    # the whole kernel (544 bytes of stack at head dim 128).
    write_output_d = static_loop(2 * MT, device(write_row))

    scores_d = device(scores)
    apply_mask_d = device(apply_mask)
    online_softmax_d = device(online_softmax)
    accumulate_pv_d = device(accumulate_pv)
    U16 = from_dtype(np.uint16)

    precision = f"_tf32x{passes}" if TF32 else ""
    @kernel(f"forward_mma_{dtype_name}{precision}_{config_name(cfg)}_"
            f"{'causal' if causal else 'full'}", (cfg, dtype_name, causal, passes),
            lineinfo=True)
    def forward_mma(q, k, v, out, lse, scale_log2):
        m_block = query_tile()
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        tid = cuda.threadIdx.x
        warp = tid >> 5
        lane = tid & 31
        seqlen_q = q.shape[1]
        seqlen_k = k.shape[1]
        head_dim = q.shape[3]
        h_kv = h // (q.shape[2] // k.shape[2])
        m0 = m_block * BM
        row0 = m0 + warp * WM

        smem = cuda.shared.array(0, U16)
        smem_base = ops.smem_addr(smem, 0)   # 32-bit shared address; tiles are offsets
        qf = cuda.local.array((MT, QF_STEPS, 4), np.uint32)
        ql = cuda.local.array((MT, QF_STEPS if SPLIT else 1, 4), np.uint32)
        s = cuda.local.array((MT, NS, 4), np.float32)
        o = cuda.local.array((MT, DT, 4), np.float32)
        m = cuda.local.array((MT, 2), np.float32)
        l = cuda.local.array((MT, 2), np.float32)
        zero_o(o)
        for mt in range(MT):
            for half in range(2):
                m[mt, half] = MINUS_INF
                l[mt, half] = ZERO

        # ---- Prologue: Q and the first K, V tiles (stage 0); Q into registers
        n_start, n_end = key_tile_range(m_block, BM, BN, seqlen_q, seqlen_k, CAUSAL)
        if n_start < n_end:
            load_q(smem_base, OFF_Q, q, b, m0, seqlen_q, h, head_dim, tid)
            load_kv(smem_base, OFF_K, k, b, n_start * BN, seqlen_k, h_kv, head_dim, tid)
            load_kv(smem_base, OFF_V, v, b, n_start * BN, seqlen_k, h_kv, head_dim, tid)
            ops.cp_async_commit()
            ops.cp_async_wait(0)
            cuda.syncthreads()
            if Q_IN_REGS:
                load_q_fragments(qf, ql, smem_base, warp, lane)

        # ---- Mainloop over key/value tiles; tile j is in stage (j - n_start) % 2
        for n_block in range(n_start, n_end):
            n0 = n_block * BN
            stage = (n_block - n_start) & 1
            ops.cp_async_wait(0)
            cuda.syncthreads()              # K_j, V_j have landed; tile j-1's stage is free
            if n_block + 1 < n_end:
                other = 1 - stage
                load_kv(smem_base, OFF_K + other * KV_STAGE, k, b, n0 + BN, seqlen_k, h_kv,
                        head_dim, tid)
                load_kv(smem_base, OFF_V + other * KV_STAGE, v, b, n0 + BN, seqlen_k, h_kv,
                        head_dim, tid)
                ops.cp_async_commit()
            k_off = ES * (OFF_K + stage * KV_STAGE)
            v_off = ES * (OFF_V + stage * KV_STAGE)
            scores_d(s, qf, ql, smem_base, k_off, warp, lane)
            if tile_needs_mask(m_block, n_block, BM, BN, seqlen_q, seqlen_k, CAUSAL):
                apply_mask_d(s, row0, n0, seqlen_q, seqlen_k, lane)
            online_softmax_d(s, o, m, l, scale_log2)
            accumulate_pv_d(o, s, smem_base, v_off, lane)

        # ---- Epilogue
        # The inputs' head dim may be zero-padded to a multiple of 8; the output's is not.
        write_output_d(out, lse, o, m, l, b, h, row0, seqlen_q, out.shape[3], scale_log2,
                       lane)

    return forward_mma

