"""FlashAttention forward pass on tensor cores (float16 and bfloat16).

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

Shared-memory tiles are stored chunk-major (see ``make_mma_tile_ops``).
"""
import functools
import math

import numpy as np
from numba import cuda, from_dtype

from .. import ops
from ..config import MmaConfig
from .common import (LN2, NEG_INF, config_name, device, element_codec, kernel,
                     key_tile_range, static_loop, tile_needs_mask)


def make_mma_tile_ops(cfg: MmaConfig, dtype_name: str):
    """Device functions shared by the tensor-core kernels for one configuration:
    ``(make_loader, make_offset, mma, pack)``.

    Shared-memory tiles of 16-bit elements are stored chunk-major: the 16-byte chunk
    c (8 elements) of row r sits at chunk slot ``c * rows + r``. The 8 rows that one
    ``ldmatrix`` matrix reads are then 128 contiguous bytes (no bank conflicts, no
    swizzle), and stepping to the next 16 rows or 16 columns adds a compile-time
    constant to the lane's address, which folds into the instruction: a row-major
    tile needs an XOR swizzle whose per-step addresses cost registers.
    """
    D, NT = cfg.head_dim, cfg.threads
    CHUNKS = D // 8
    mma = ops.mma_f16 if dtype_name == "float16" else ops.mma_bf16
    pack = ops.pack_f16x2 if dtype_name == "float16" else ops.pack_bf16x2

    def make_offset(rows):
        @device
        def offset(row, col):
            """Element offset of (row, col) in a chunk-major tile of ``rows`` rows."""
            return ((col >> 3) * rows + row) * 8 + (col & 7)

        return offset

    GROUPS = NT // 8             # groups of 8 threads; a group copies one chunk of 8 rows
    # How a thread walks its chunks: with one count a multiple of the other, its
    # chunk column (or its row steps) are fixed; otherwise (head dim 96: 12 chunks
    # over 16 or 32 groups) the (chunk, 8-row block) pairs are dealt out in order.
    EVEN = GROUPS % CHUNKS == 0 or CHUNKS % GROUPS == 0

    def make_loader(rows):
        assert rows % 8 == 0 and (rows * CHUNKS) % NT == 0, (rows, CHUNKS, NT)
        passes = rows * CHUNKS // NT
        offset = make_offset(rows)

        def load_tile_async(smem_base, base, src, b, row0, n_rows, head, head_dim, tid):
            """cp.async of rows [row0, row0 + rows) of src[b, :, head, :] into the tile at
            ``base``; rows past n_rows and chunks past head_dim are zero-filled.

            Eight consecutive threads copy one chunk column of eight rows: each warp
            writes 128-byte runs of shared memory and reads whole 32-byte sectors. A
            thread's chunks and rows follow a fixed pattern, so its global addresses
            are one base plus multiples of the row stride."""
            group = tid >> 3
            r8 = tid & 7
            row_stride = src.strides[1]                 # bytes; may be negative
            origin = np.int64(ops.global_addr(src, b, 0, head, 0))
            for it in range(passes):
                if not EVEN:             # pair it * GROUPS + group, chunk-fastest
                    pair = it * GROUPS + group
                    ch = pair % CHUNKS
                    r = (pair // CHUNKS) * 8 + r8
                elif GROUPS >= CHUNKS:   # each group keeps one chunk, steps over rows
                    ch = group % CHUNKS
                    r = (group // CHUNKS + it * (GROUPS // CHUNKS)) * 8 + r8
                else:                    # a group steps over chunks, then rows
                    ch = group + (it % (CHUNKS // GROUPS)) * GROUPS
                    r = (it // (CHUNKS // GROUPS)) * 8 + r8
                row = row0 + r
                inside = row < n_rows and ch * 8 < head_dim
                # A zero-byte copy reads nothing, but its address must still be valid.
                src_row = row if row < n_rows else n_rows - 1
                src_byte = ch * 16 if inside else 0
                dst = smem_base + 2 * (base + offset(r, ch * 8))
                ops.cp_async_16(dst, np.uint64(origin + src_row * row_stride + src_byte),
                                np.uint32(16) if inside else np.uint32(0))

        return device(load_tile_async)

    return make_loader, make_offset, mma, pack


@functools.lru_cache(maxsize=None)
def build_forward_mma(cfg: MmaConfig, dtype_name: str, causal: bool):
    """The tensor-core forward kernel ``(q, k, v, o, lse, scale_log2)``.

    q, k, v are the inputs viewed as uint16; o is in its storage type. Launch with grid
    ``(ceil(seqlen_q / block_m), nheads, batch)``, ``cfg.threads`` threads and
    ``cfg.forward_shared_bytes`` bytes of dynamic shared memory.
    """
    BM, BN, D, NT = cfg.block_m, cfg.block_n, cfg.head_dim, cfg.threads
    MT = cfg.m_tiles                       # 16-row m-tiles per warp
    WM = 16 * MT                           # query rows per warp
    KS = D // 16                           # k-steps of 16 over the head dim (S = Q K^T)
    NS = BN // 8                           # 8-key n-tiles of S
    KP = BN // 16                          # k-steps of 16 over the keys (O += P V)
    DT = D // 8                            # 8-column n-tiles of O
    Q_IN_REGS = cfg.q_in_registers
    QF_STEPS = KS if Q_IN_REGS else 1      # k-steps of Q fragments held at once
    CAUSAL = causal
    # Typed constants: a bare Python float is a float64 to Numba and drags the
    # softmax into double precision and conversions.
    ZERO = np.float32(0.0)
    ONE = np.float32(1.0)
    MINUS_INF = np.float32(NEG_INF)
    LN2_32 = np.float32(LN2)

    # Shared memory in 16-bit elements: Q, then two stages of K, then two of V. A
    # stage's tiles are at OFF_K + stage * STAGE and OFF_V + stage * STAGE.
    STAGE = BN * D
    OFF_Q = 0
    OFF_K = OFF_Q + BM * D
    OFF_V = OFF_K + 2 * STAGE
    assert (OFF_V + 2 * STAGE) * 2 == cfg.forward_shared_bytes

    make_loader, make_offset, mma, pack = make_mma_tile_ops(cfg, dtype_name)
    load_q = make_loader(BM)
    load_kv = make_loader(BN)
    q_offset = make_offset(BM)
    kv_offset = make_offset(BN)
    _, from_acc = element_codec(dtype_name)

    def load_q_fragment(qf, kk, smem_base, warp, lane):
        """Q's A-fragments for k-step kk (16 head-dim columns) of this warp's rows."""
        mat = lane >> 3
        col = kk * 16 + (mat >> 1) * 8
        for mt in range(MT):
            row = warp * WM + mt * 16 + (mat & 1) * 8 + (lane & 7)
            a = ops.ldmatrix_x4(smem_base + 2 * (OFF_Q + q_offset(row, col)))
            for i in range(4):
                qf[mt, kk if Q_IN_REGS else 0, i] = a[i]

    load_q_fragment_d = device(load_q_fragment)

    def load_q_step(kk, qf, smem_base, warp, lane):
        load_q_fragment_d(qf, kk, smem_base, warp, lane)

    load_q_fragments = static_loop(KS, device(load_q_step))

    def qk_step(step, s, qf, smem_base, kv_base, warp, lane):
        """One 16-dim by 16-key step of S = Q K_j^T: an ldmatrix of K, two mma per m-tile.

        s[mt, nt] holds rows g, g+8 and keys 2t, 2t+1 of the 16x8 tile (mt, nt). With
        Q_IN_REGS the Q fragments were loaded once per block; otherwise (large head
        dims, where registers are short) each k-step reloads its fragment from shared
        memory, FlashAttention-2's choice for head dim 128 and up."""
        kk = step // (NS // 2)
        nt2 = step - kk * (NS // 2)
        if not Q_IN_REGS and nt2 == 0:
            load_q_fragment_d(qf, kk, smem_base, warp, lane)
        q_kk = kk if Q_IN_REGS else 0
        mat = lane >> 3
        row = nt2 * 16 + (mat >> 1) * 8 + (lane & 7)
        col = kk * 16 + (mat & 1) * 8
        b = ops.ldmatrix_x4(kv_base + 2 * (OFF_K + kv_offset(row, col)))
        for mt in range(MT):
            for half in range(2):
                nt = 2 * nt2 + half
                c = mma(qf[mt, q_kk, 0], qf[mt, q_kk, 1], qf[mt, q_kk, 2], qf[mt, q_kk, 3],
                        b[2 * half], b[2 * half + 1],
                        s[mt, nt, 0], s[mt, nt, 1], s[mt, nt, 2], s[mt, nt, 3])
                for i in range(4):
                    s[mt, nt, i] = c[i]

    qk_steps = static_loop(NS // 2 * KS, device(qk_step))

    def scores(s, qf, smem_base, kv_base, warp, lane):
        """s = Q K_j^T as mma accumulators; K_j's stage starts at ``kv_base``."""
        for mt in range(MT):
            for nt in range(NS):
                for i in range(4):
                    s[mt, nt, i] = ZERO
        qk_steps(s, qf, smem_base, kv_base, warp, lane)

    def apply_mask(s, row0, n0, seqlen_q, seqlen_k, lane):
        """-inf for keys past seqlen_k and, when causal, above the diagonal."""
        g = lane >> 2
        t = lane & 3
        for mt in range(MT):
            for i in range(4):
                row = row0 + mt * 16 + g + 8 * (i >> 1)
                for nt in range(NS):
                    key = n0 + nt * 8 + 2 * t + (i & 1)
                    if key >= seqlen_k or (CAUSAL and key > row + seqlen_k - seqlen_q):
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

    def pack_p(step, pf, s):
        """P's A-fragments for keys [16 step, 16 step + 16): the accumulators of n-tiles
        2 step and 2 step + 1, rounded to 16 bits, are exactly that layout."""
        for mt in range(MT):
            pf[mt, step, 0] = pack(s[mt, 2 * step, 0], s[mt, 2 * step, 1])
            pf[mt, step, 1] = pack(s[mt, 2 * step, 2], s[mt, 2 * step, 3])
            pf[mt, step, 2] = pack(s[mt, 2 * step + 1, 0], s[mt, 2 * step + 1, 1])
            pf[mt, step, 3] = pack(s[mt, 2 * step + 1, 2], s[mt, 2 * step + 1, 3])

    def pv_step(step, o, pf, kv_base, lane):
        """One 16-key by 16-column step of O += P V_j: an ldmatrix.trans of V, two mma
        per m-tile."""
        kk = step // (DT // 2)
        dt2 = step - kk * (DT // 2)
        mat = lane >> 3
        row = kk * 16 + (mat & 1) * 8 + (lane & 7)
        col = dt2 * 16 + (mat >> 1) * 8
        vb = ops.ldmatrix_x4_trans(kv_base + 2 * (OFF_V + kv_offset(row, col)))
        for mt in range(MT):
            for half in range(2):
                dt = 2 * dt2 + half
                c = mma(pf[mt, kk, 0], pf[mt, kk, 1], pf[mt, kk, 2], pf[mt, kk, 3],
                        vb[2 * half], vb[2 * half + 1],
                        o[mt, dt, 0], o[mt, dt, 1], o[mt, dt, 2], o[mt, dt, 3])
                for i in range(4):
                    o[mt, dt, i] = c[i]

    pack_p_steps = static_loop(KP, device(pack_p))
    pv_steps = static_loop(KP * DT // 2, device(pv_step))

    def accumulate_pv(o, s, kv_base, lane):
        """o += P V_j with P taken from the score accumulators."""
        pf = cuda.local.array((MT, KP, 4), np.uint32)
        pack_p_steps(pf, s)
        pv_steps(o, pf, kv_base, lane)

    def store_step(dt, out, o, mt, half, inv, b, row, h, head_dim, t):
        for j in range(2):
            col = dt * 8 + 2 * t + j
            if col < head_dim:
                out[b, row, h, col] = from_acc(o[mt, dt, 2 * half + j] * inv)

    store_row = static_loop(DT, device(store_step))

    def write_output(out, lse, o, m, l, b, h, row0, seqlen_q, head_dim, scale_log2, lane):
        """O = o / l and lse = (m c + log2 l) ln 2 for this thread's rows."""
        g = lane >> 2
        t = lane & 3
        for mt in range(MT):
            for half in range(2):
                row = row0 + mt * 16 + g + 8 * half
                total = l[mt, half]
                total += ops.shfl_xor(total, 1)
                total += ops.shfl_xor(total, 2)
                inv = ONE / total if total > ZERO else ZERO   # rows that saw no key give 0
                if row < seqlen_q:
                    store_row(out, o, mt, half, inv, b, row, h, head_dim, t)
                    if t == 0:
                        lse[b, h, row] = ((m[mt, half] * scale_log2 + math.log2(total)) * LN2_32
                                          if total != ZERO else MINUS_INF)

    scores_d = device(scores)
    apply_mask_d = device(apply_mask)
    online_softmax_d = device(online_softmax)
    accumulate_pv_d = device(accumulate_pv)
    write_output_d = device(write_output)
    U16 = from_dtype(np.uint16)

    @kernel(f"forward_mma_{dtype_name}_{config_name(cfg)}_{'causal' if causal else 'full'}",
            (cfg, dtype_name, causal), lineinfo=True)
    def forward_mma(q, k, v, out, lse, scale_log2):
        m_block = cuda.blockIdx.x
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
                load_q_fragments(qf, smem_base, warp, lane)

        # ---- Mainloop over key/value tiles; tile j is in stage (j - n_start) % 2
        for n_block in range(n_start, n_end):
            n0 = n_block * BN
            stage = ((n_block - n_start) & 1) * STAGE
            ops.cp_async_wait(0)
            cuda.syncthreads()              # K_j, V_j have landed; tile j-1's stage is free
            if n_block + 1 < n_end:
                other = STAGE - stage
                load_kv(smem_base, OFF_K + other, k, b, n0 + BN, seqlen_k, h_kv, head_dim, tid)
                load_kv(smem_base, OFF_V + other, v, b, n0 + BN, seqlen_k, h_kv, head_dim, tid)
                ops.cp_async_commit()
            kv_base = smem_base + 2 * stage
            scores_d(s, qf, smem_base, kv_base, warp, lane)
            if tile_needs_mask(m_block, n_block, BM, BN, seqlen_q, seqlen_k, CAUSAL):
                apply_mask_d(s, row0, n0, seqlen_q, seqlen_k, lane)
            online_softmax_d(s, o, m, l, scale_log2)
            accumulate_pv_d(o, s, kv_base, lane)

        # ---- Epilogue
        # The inputs' head dim may be zero-padded to a multiple of 8; the output's is not.
        write_output_d(out, lse, o, m, l, b, h, row0, seqlen_q, out.shape[3], scale_log2,
                       lane)

    return forward_mma

