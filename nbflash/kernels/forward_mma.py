"""FlashAttention forward pass on tensor cores (float16 and bfloat16).

The same algorithm as ``forward.py`` (and ``reference/tiled.py::flash_forward``), in
the FlashAttention-2 arrangement:

- one thread block per (query tile, head, batch); each warp owns ``16 * M_TILES``
  query rows, so warps never exchange data and no shared memory holds S or P;
- Q is copied to shared memory once and kept in registers as mma A-fragments;
- K and V tiles stream through shared memory with ``cp.async``: V_j is copied while
  S = Q K_j^T is computed, K_{j+1} while the softmax and P V_j run;
- S lives in registers as mma accumulators; the softmax runs on them (row max and
  sum over the 4 lanes of a quad with shuffles), in the exp2 domain with
  c = softmax_scale * log2(e) folded into one fused multiply-add per score;
- P is rounded to 16 bits and reused directly as the A operand of P V: the
  accumulator layout of two 16x8 tiles is the A-fragment layout of one 16x16 tile;
- the output accumulator is rescaled only for rows whose running max changed;
- causal tiles above the diagonal are skipped, only the diagonal (and the last,
  partial) tiles are masked.

Shared memory tiles are 16-bit elements, row-major, with the 16-byte chunks of each
row XOR-swizzled by the row index so that the 8 rows an ``ldmatrix`` reads at once
fall in 8 different bank groups.
"""
import functools
import math

import numpy as np
from numba import cuda, from_dtype

from .. import ops
from ..config import MmaConfig
from .common import (LN2, NEG_INF, device, element_codec, key_tile_range,
                     tile_needs_mask)


def swizzle_params(head_dim):
    """(shift, mask) of the chunk swizzle ``chunk ^ ((row >> shift) & mask)``.

    A row holds ``head_dim / 8`` chunks of 16 bytes; 128 bytes (8 chunks) span all
    32 banks. Rows of at least 8 chunks XOR with the row's low 3 bits; narrower rows
    share a 128-byte line with their neighbours, so higher row bits are used.
    """
    chunks = head_dim // 8
    mask = min(chunks, 8) - 1
    shift = {8: 0, 4: 1, 2: 2, 1: 3}[min(chunks, 8)]
    return shift, mask


def make_mma_tile_ops(cfg: MmaConfig, dtype_name: str):
    """Device functions shared by the tensor-core kernels for one configuration:
    ``(load_tile_async, smem_offset, mma, pack)``."""
    D, NT = cfg.head_dim, cfg.threads
    CHUNKS = D // 8
    SHIFT, MASK = swizzle_params(D)
    mma = ops.mma_f16 if dtype_name == "float16" else ops.mma_bf16
    pack = ops.pack_f16x2 if dtype_name == "float16" else ops.pack_bf16x2

    def smem_offset(row, col):
        """Element offset of (row, col) in a swizzled tile of rows of D elements."""
        chunk = (col >> 3) ^ ((row >> SHIFT) & MASK)
        return row * D + (chunk << 3) + (col & 7)

    def make_loader(rows):
        assert (rows * CHUNKS) % NT == 0, (rows, CHUNKS, NT)
        per_thread = rows * CHUNKS // NT

        def load_tile_async(smem, base, src, b, row0, n_rows, head, head_dim, tid):
            """cp.async of rows [row0, row0 + rows) of src[b, :, head, :] into the tile at
            ``base``; rows past n_rows and chunks past head_dim are zero-filled."""
            for it in range(per_thread):
                idx = tid + it * NT
                r = idx // CHUNKS
                ch = idx - r * CHUNKS
                row = row0 + r
                inside = row < n_rows and ch * 8 < head_dim
                # A zero-byte copy reads nothing, but its address must still be valid.
                src_row = row if row < n_rows else n_rows - 1
                src_col = ch * 8 if inside else 0
                dst = ops.smem_addr(smem, base + smem_offset(r, ch * 8))
                ops.cp_async_16(dst, ops.global_addr(src, b, src_row, head, src_col),
                                np.uint32(16) if inside else np.uint32(0))

        return device(load_tile_async)

    return make_loader, device(smem_offset), mma, pack


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
    CAUSAL = causal
    SALT = ops.SOURCE_SALT

    OFF_Q = 0
    OFF_K = OFF_Q + BM * D
    OFF_V = OFF_K + BN * D
    assert (OFF_V + BN * D) * 2 == cfg.forward_shared_bytes

    make_loader, smem_offset, mma, pack = make_mma_tile_ops(cfg, dtype_name)
    load_q = make_loader(BM)
    load_kv = make_loader(BN)
    _, from_acc = element_codec(dtype_name)

    def load_q_fragments(qf, smem, warp, lane):
        """Q's A-fragments for this warp's rows, from the swizzled Q tile."""
        mat = lane >> 3
        r8 = lane & 7
        for mt in range(MT):
            row = warp * WM + mt * 16 + (mat & 1) * 8 + r8
            for kk in range(KS):
                col = kk * 16 + (mat >> 1) * 8
                a = ops.ldmatrix_x4(ops.smem_addr(smem, OFF_Q + smem_offset(row, col)))
                for i in range(4):
                    qf[mt, kk, i] = a[i]

    def scores(s, qf, smem, lane):
        """s = Q K_j^T as mma accumulators: s[mt, nt] holds rows g, g+8 and keys
        2t, 2t+1 of the 16x8 tile (mt, nt)."""
        mat = lane >> 3
        r8 = lane & 7
        for mt in range(MT):
            for nt in range(NS):
                for i in range(4):
                    s[mt, nt, i] = 0.0
        for nt2 in range(NS // 2):
            row = nt2 * 16 + (mat >> 1) * 8 + r8
            for kk in range(KS):
                col = kk * 16 + (mat & 1) * 8
                b = ops.ldmatrix_x4(ops.smem_addr(smem, OFF_K + smem_offset(row, col)))
                for mt in range(MT):
                    for half in range(2):
                        nt = 2 * nt2 + half
                        c = mma(qf[mt, kk, 0], qf[mt, kk, 1], qf[mt, kk, 2], qf[mt, kk, 3],
                                b[2 * half], b[2 * half + 1],
                                s[mt, nt, 0], s[mt, nt, 1], s[mt, nt, 2], s[mt, nt, 3])
                        for i in range(4):
                            s[mt, nt, i] = c[i]

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
                        s[mt, nt, i] = NEG_INF

    def online_softmax(s, o, m, l, scale_log2):
        """Turns s into P = exp2(S c - m_new c) in place, updates the running max m and
        this thread's partial row sums l, and rescales o where the max changed."""
        for mt in range(MT):
            for half in range(2):
                m_old = m[mt, half]
                m_new = m_old
                for nt in range(NS):
                    m_new = max(m_new, max(s[mt, nt, 2 * half], s[mt, nt, 2 * half + 1]))
                # A row lives in the 4 lanes of a quad.
                m_new = max(m_new, ops.shfl_xor(m_new, 1))
                m_new = max(m_new, ops.shfl_xor(m_new, 2))
                # A row that has seen no key keeps m = -inf; shift by 0 so that
                # exp2(-inf - 0) = 0 and no inf - inf is formed.
                m_scaled = m_new * scale_log2 if m_new != NEG_INF else 0.0
                row_sum = 0.0
                for nt in range(NS):
                    for j in range(2):
                        p = ops.ex2(cuda.fma(s[mt, nt, 2 * half + j], scale_log2, -m_scaled))
                        s[mt, nt, 2 * half + j] = p
                        row_sum += p
                if m_new != m_old:
                    alpha = ops.ex2(m_old * scale_log2 - m_scaled)   # 0 when m_old = -inf
                    l[mt, half] = l[mt, half] * alpha + row_sum
                    for dt in range(DT):
                        o[mt, dt, 2 * half] *= alpha
                        o[mt, dt, 2 * half + 1] *= alpha
                    m[mt, half] = m_new
                else:
                    l[mt, half] += row_sum

    def accumulate_pv(o, s, smem, lane):
        """o += P V_j with P taken from the score accumulators, rounded to 16 bits."""
        mat = lane >> 3
        r8 = lane & 7
        for kk in range(KP):
            row = kk * 16 + (mat & 1) * 8 + r8
            for dt2 in range(DT // 2):
                col = dt2 * 16 + (mat >> 1) * 8
                vb = ops.ldmatrix_x4_trans(ops.smem_addr(smem, OFF_V + smem_offset(row, col)))
                for mt in range(MT):
                    a0 = pack(s[mt, 2 * kk, 0], s[mt, 2 * kk, 1])
                    a1 = pack(s[mt, 2 * kk, 2], s[mt, 2 * kk, 3])
                    a2 = pack(s[mt, 2 * kk + 1, 0], s[mt, 2 * kk + 1, 1])
                    a3 = pack(s[mt, 2 * kk + 1, 2], s[mt, 2 * kk + 1, 3])
                    for half in range(2):
                        dt = 2 * dt2 + half
                        c = mma(a0, a1, a2, a3, vb[2 * half], vb[2 * half + 1],
                                o[mt, dt, 0], o[mt, dt, 1], o[mt, dt, 2], o[mt, dt, 3])
                        for i in range(4):
                            o[mt, dt, i] = c[i]

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
                inv = 1.0 / total if total > 0.0 else 0.0    # rows that saw no key give 0
                if row < seqlen_q:
                    for dt in range(DT):
                        for j in range(2):
                            col = dt * 8 + 2 * t + j
                            if col < head_dim:
                                out[b, row, h, col] = from_acc(o[mt, dt, 2 * half + j] * inv)
                    if t == 0:
                        lse[b, h, row] = ((m[mt, half] * scale_log2 + math.log2(total)) * LN2
                                          if total > 0.0 else NEG_INF)

    load_q_fragments_d = device(load_q_fragments)
    scores_d = device(scores)
    apply_mask_d = device(apply_mask)
    online_softmax_d = device(online_softmax)
    accumulate_pv_d = device(accumulate_pv)
    write_output_d = device(write_output)
    U16 = from_dtype(np.uint16)

    @cuda.jit(**ops.jit_options(cache=True, lineinfo=True))
    def forward_mma(q, k, v, out, lse, scale_log2):
        _ = SALT  # noqa: F841  (part of the cache key)
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
        qf = cuda.local.array((MT, KS, 4), np.uint32)
        s = cuda.local.array((MT, NS, 4), np.float32)
        o = cuda.local.array((MT, DT, 4), np.float32)
        m = cuda.local.array((MT, 2), np.float32)
        l = cuda.local.array((MT, 2), np.float32)
        for mt in range(MT):
            for dt in range(DT):
                for i in range(4):
                    o[mt, dt, i] = 0.0
            for half in range(2):
                m[mt, half] = NEG_INF
                l[mt, half] = 0.0

        # ---- Prologue: Q and the first K tile in flight; Q into registers
        n_start, n_end = key_tile_range(m_block, BM, BN, seqlen_q, seqlen_k, CAUSAL)
        if n_start < n_end:
            load_q(smem, OFF_Q, q, b, m0, seqlen_q, h, head_dim, tid)
            load_kv(smem, OFF_K, k, b, n_start * BN, seqlen_k, h_kv, head_dim, tid)
            ops.cp_async_commit()
            ops.cp_async_wait(0)
            cuda.syncthreads()
            load_q_fragments_d(qf, smem, warp, lane)

        # ---- Mainloop over key/value tiles
        for n_block in range(n_start, n_end):
            n0 = n_block * BN
            ops.cp_async_wait(0)
            cuda.syncthreads()              # K_j has landed; everyone is done with V_{j-1}
            load_kv(smem, OFF_V, v, b, n0, seqlen_k, h_kv, head_dim, tid)
            ops.cp_async_commit()
            scores_d(s, qf, smem, lane)
            if tile_needs_mask(m_block, n_block, BM, BN, seqlen_q, seqlen_k, CAUSAL):
                apply_mask_d(s, row0, n0, seqlen_q, seqlen_k, lane)
            ops.cp_async_wait(0)
            cuda.syncthreads()              # V_j has landed; everyone is done with K_j
            if n_block + 1 < n_end:
                load_kv(smem, OFF_K, k, b, n0 + BN, seqlen_k, h_kv, head_dim, tid)
                ops.cp_async_commit()
            online_softmax_d(s, o, m, l, scale_log2)
            accumulate_pv_d(o, s, smem, lane)

        # ---- Epilogue
        # The inputs' head dim may be zero-padded to a multiple of 8; the output's is not.
        write_output_d(out, lse, o, m, l, b, h, row0, seqlen_q, out.shape[3], scale_log2,
                       lane)

    return forward_mma

