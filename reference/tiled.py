"""FlashAttention-2 in NumPy, tile by tile.

Written to be read next to the paper (Tri Dao, "FlashAttention-2: Faster
Attention with Better Parallelism and Work Partitioning", 2023; Algorithm 1 =
forward, Algorithm 2 = backward) and next to GPU kernels that follow it. Each
loop iteration over (batch, head, tile) corresponds to what one thread block
(CTA) does on the GPU; the arithmetic inside a tile is vectorised.

Working precision is float64 so that results can be compared to the exact
reference (``reference.attention``) at ~1e-12. Layouts and semantics are the
same as there:

    q (B, Sq, H, D), k/v (B, Sk, Hk, D), out (B, Sq, H, D), lse (B, H, Sq)
    query head h reads kv head h // (H // Hk)
    causal: key j visible to query i iff j <= i + Sk - Sq (bottom-right)
    lse: natural-log log-sum-exp of the scaled logits; -inf on fully masked rows

Tiles are padded to full size with zeros, as GPU predicated loads do; keys
beyond seqlen_k are masked with -inf and rows beyond seqlen_q are discarded
on write-out.
"""

import math

import numpy as np

__all__ = ["key_tile_range", "query_tile_range", "flash_forward", "flash_backward"]

LOG2E = math.log2(math.e)   # log2(e):  exp(x) = exp2(x * log2(e))
LN2 = math.log(2.0)         # ln(2):    log(x) = log2(x) * ln(2)


def _cdiv(a, b):
    return -(-a // b)


# --------------------------------------------------------------------------
# tile ranges
# --------------------------------------------------------------------------

def key_tile_range(m_block, block_m, block_n, seqlen_q, seqlen_k, causal):
    """Key/value tiles that query tile `m_block` must visit: (n_block_start, n_block_end).

    Non-causal: all ceil(seqlen_k / block_n) tiles. Causal: the last row of the
    query tile, i = m0 + block_m - 1, sees keys j <= i + seqlen_k - seqlen_q,
    so keys j < min(seqlen_k, (m0 + block_m) + seqlen_k - seqlen_q) are needed
    and tiles entirely above the diagonal are skipped. (If that last row lies
    beyond seqlen_q the bound exceeds seqlen_k and the min gives seqlen_k,
    which is what row seqlen_q - 1 needs anyway.) An empty range (end <= 0)
    means every row of the tile is fully masked.
    """
    n_block_start = 0
    key_end = seqlen_k
    if causal:
        m0 = m_block * block_m
        key_end = min(seqlen_k, (m0 + block_m) + seqlen_k - seqlen_q)
    n_block_end = _cdiv(max(key_end, 0), block_n)
    return n_block_start, n_block_end


def query_tile_range(n_block, block_m, block_n, seqlen_q, seqlen_k, causal):
    """Query tiles that key tile `n_block` contributes to: (m_block_start, m_block_end).

    A tile is included iff it contains at least one visible (i, j) pair.
    Non-causal: all ceil(seqlen_q / block_m) tiles. Causal: the first query
    row that sees key j is i = j - (seqlen_k - seqlen_q); the smallest key of
    the tile, j = n0, gives the first row that sees any key of it, and every
    later row sees key n0 too. The range is empty when no query sees the tile.
    """
    m_block_end = _cdiv(seqlen_q, block_m)
    m_block_start = 0
    if causal:
        n0 = n_block * block_n
        first_row = max(0, n0 - (seqlen_k - seqlen_q))
        m_block_start = min(first_row // block_m, m_block_end)
    return m_block_start, m_block_end


# --------------------------------------------------------------------------
# tile helpers
# --------------------------------------------------------------------------

def _load_tile(x, start, size):
    """Rows [start, start + size) of a (S, D) array, zero-padded past the end."""
    tile = np.zeros((size, x.shape[-1]), dtype=np.float64)
    rows = x[start:start + size]
    tile[: rows.shape[0]] = rows
    return tile


def _load_row_vector(x, start, size, fill):
    """Entries [start, start + size) of a 1-D array, padded with `fill`."""
    vec = np.full(size, fill, dtype=np.float64)
    part = x[start:start + size]
    vec[: part.shape[0]] = part
    return vec


def _apply_masks(s, m0, n0, block_m, block_n, seqlen_q, seqlen_k, causal):
    """Set logits of invisible (i, j) pairs in a (block_m, block_n) tile to -inf.

    Only tiles that need it are masked: the last key tile when seqlen_k is not
    a multiple of block_n, and causal tiles that straddle the diagonal, i.e.
    where the tile's top-right pair (m0, n0 + block_n - 1) is masked.
    """
    cols = n0 + np.arange(block_n)[None, :]
    rows = m0 + np.arange(block_m)[:, None]
    visible = np.ones((block_m, block_n), dtype=bool)
    if n0 + block_n > seqlen_k:                                       # partial key tile
        visible &= cols < seqlen_k
    if causal and n0 + block_n - 1 > m0 + seqlen_k - seqlen_q:       # straddles diagonal
        visible &= cols <= rows + (seqlen_k - seqlen_q)
    if visible.all():
        return s
    return np.where(visible, s, -np.inf)


# --------------------------------------------------------------------------
# forward (Algorithm 1)
# --------------------------------------------------------------------------

def flash_forward(q, k, v, *, causal=False, softmax_scale=None, block_m=64, block_n=64):
    """FlashAttention-2 forward pass (float64). Returns (out, lse) like ``attention``.

    For each (batch, query head, query tile Q_i of block_m rows), keep Q_i and
    stream the key/value tiles K_j, V_j of block_n rows, maintaining per row
    (in the base-2 domain, logits pre-multiplied by scale * log2(e)):
        m    running max of the logits seen so far
        l    running sum of exp2(logit - m)
        acc  running sum of exp2(logit - m) * v          (unnormalised output)
    When the max grows from m_old to m_new, the old l and acc were computed
    relative to m_old, so both are rescaled by alpha = exp2(m_old - m_new).
    Finally out = acc / l and lse = (m + log2(l)) * ln(2).
    """
    batch, seqlen_q, nheads, headdim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    group = nheads // nheads_k
    scale = 1.0 / math.sqrt(headdim) if softmax_scale is None else float(softmax_scale)
    scale_log2 = scale * LOG2E

    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    out = np.zeros((batch, seqlen_q, nheads, headdim), dtype=np.float64)
    lse = np.zeros((batch, nheads, seqlen_q), dtype=np.float64)

    for b in range(batch):
        for h in range(nheads):
            hk = h // group                                           # GQA: shared kv head
            for m_block in range(_cdiv(seqlen_q, block_m)):          # one CTA on the GPU
                m0 = m_block * block_m
                q_i = _load_tile(q[b, :, h], m0, block_m)             # (block_m, D), kept
                m = np.full(block_m, -np.inf)
                l = np.zeros(block_m)
                acc = np.zeros((block_m, headdim))

                n_start, n_end = key_tile_range(m_block, block_m, block_n,
                                                seqlen_q, seqlen_k, causal)
                for n_block in range(n_start, n_end):
                    n0 = n_block * block_n
                    k_j = _load_tile(k[b, :, hk], n0, block_n)        # (block_n, D)
                    v_j = _load_tile(v[b, :, hk], n0, block_n)

                    # S = Q_i K_j^T, in log2 units
                    s = (q_i @ k_j.T) * scale_log2                    # (block_m, block_n)
                    s = _apply_masks(s, m0, n0, block_m, block_n, seqlen_q, seqlen_k, causal)

                    # online softmax
                    m_new = np.maximum(m, s.max(axis=1))
                    # A row that has seen only masked keys keeps m = -inf; use 0 as
                    # its reference point so that -inf - (-inf) never appears
                    # (its p and alpha are then exp2(-inf) = 0, exp2(-inf - 0) = 0).
                    m_ref = np.where(np.isneginf(m_new), 0.0, m_new)
                    alpha = np.exp2(m - m_ref)                        # rescale old l, acc
                    p = np.exp2(s - m_ref[:, None])                   # (block_m, block_n)
                    l = alpha * l + p.sum(axis=1)
                    acc = alpha[:, None] * acc + p @ v_j
                    m = m_new

                # epilogue: normalise, and lse in natural log. l == 0 only for
                # fully masked rows: output 0 and lse -inf.
                valid = min(block_m, seqlen_q - m0)
                o_i = np.zeros_like(acc)
                np.divide(acc, l[:, None], out=o_i, where=l[:, None] > 0)
                log2_l = np.full(block_m, -np.inf)
                np.log2(l, out=log2_l, where=l > 0)
                lse_i = (m + log2_l) * LN2                            # -inf + -inf = -inf
                out[b, m0:m0 + valid, h] = o_i[:valid]
                lse[b, h, m0:m0 + valid] = lse_i[:valid]
    return out, lse


# --------------------------------------------------------------------------
# backward (Algorithm 2)
# --------------------------------------------------------------------------

def flash_backward(dout, q, k, v, out, lse, *, causal=False, softmax_scale=None,
                   block_m=64, block_n=64):
    """FlashAttention-2 backward pass (float64). Returns (dq, dk, dv).

    Math. With S = scale * Q K^T, P = softmax(S) row-wise, O = P V and
    upstream gradient dO:
        dV = P^T dO,   dP = dO V^T,
        dS_ij = P_ij (dP_ij - sum_l P_il dP_il)        (softmax Jacobian)
        dQ = scale * dS K,   dK = scale * dS^T Q.
    The row term sum_l P_il dP_il would need a whole row of P, but
        sum_l P_il dP_il = sum_l P_il sum_d dO_id V_ld
                         = sum_d dO_id sum_l P_il V_ld = sum_d dO_id O_id,
    so Delta_i = rowsum(dO * O) is computed once in a pre-pass from O and dO.
    P itself is recomputed tile by tile from the saved lse:
        P_ij = exp(S_ij - lse_i) = exp2(S_ij * log2(e) - lse_i * log2(e)).

    Parallelisation as on the GPU: one CTA per (batch, kv head, key tile K_j,
    V_j) keeps dK_j, dV_j in registers while looping over the query heads of
    its GQA group and over the query tiles that see K_j; dQ_i receives a
    contribution from every key tile, which the GPU adds with float32 atomics
    into a workspace (dq_accum) -- here a float64 array accumulated with +=.
    """
    batch, seqlen_q, nheads, headdim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    group = nheads // nheads_k
    scale = 1.0 / math.sqrt(headdim) if softmax_scale is None else float(softmax_scale)
    scale_log2 = scale * LOG2E

    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    dout = np.asarray(dout, dtype=np.float64)
    out = np.asarray(out, dtype=np.float64)
    lse = np.asarray(lse, dtype=np.float64)

    # Pre-pass: Delta_i = sum_d dO_id O_id  -> (B, H, Sq)
    delta = np.sum(dout * out, axis=-1).transpose(0, 2, 1)
    # Fully masked rows have lse = -inf; S - lse would be -inf - (-inf) = NaN on
    # masked entries and +inf elsewhere. Storing +inf instead (as the FA2 kernel
    # does) makes exp2(S - inf) = 0: P = 0 for those rows with no special case.
    lse_log2 = np.where(np.isneginf(lse), np.inf, lse) * LOG2E

    dq_accum = np.zeros((batch, seqlen_q, nheads, headdim), dtype=np.float64)
    dk = np.zeros((batch, seqlen_k, nheads_k, headdim), dtype=np.float64)
    dv = np.zeros((batch, seqlen_k, nheads_k, headdim), dtype=np.float64)

    for b in range(batch):
        for hk in range(nheads_k):
            for n_block in range(_cdiv(seqlen_k, block_n)):          # one CTA on the GPU
                n0 = n_block * block_n
                k_j = _load_tile(k[b, :, hk], n0, block_n)            # (block_n, D), kept
                v_j = _load_tile(v[b, :, hk], n0, block_n)
                dk_j = np.zeros((block_n, headdim))
                dv_j = np.zeros((block_n, headdim))

                m_start, m_end = query_tile_range(n_block, block_m, block_n,
                                                  seqlen_q, seqlen_k, causal)
                for h in range(hk * group, (hk + 1) * group):        # GQA group
                    for m_block in range(m_start, m_end):
                        m0 = m_block * block_m
                        q_i = _load_tile(q[b, :, h], m0, block_m)
                        do_i = _load_tile(dout[b, :, h], m0, block_m)
                        # padded rows: lse = +inf gives P = 0 there
                        lse_i = _load_row_vector(lse_log2[b, h], m0, block_m, np.inf)
                        delta_i = _load_row_vector(delta[b, h], m0, block_m, 0.0)

                        # recompute P_ij = exp2(S * scale * log2e - lse * log2e)
                        s = (q_i @ k_j.T) * scale_log2
                        s = _apply_masks(s, m0, n0, block_m, block_n,
                                         seqlen_q, seqlen_k, causal)
                        p = np.exp2(s - lse_i[:, None])               # 0 where masked

                        dv_j += p.T @ do_i                            # dV_j += P^T dO_i
                        dp = do_i @ v_j.T                             # dP = dO_i V_j^T
                        ds = p * (dp - delta_i[:, None])              # dS = P (dP - Delta)
                        dk_j += scale * (ds.T @ q_i)                  # dK_j += scale dS^T Q_i
                        # dQ_i += scale dS K_j   ("atomicAdd" into the workspace)
                        valid_m = min(block_m, seqlen_q - m0)
                        dq_accum[b, m0:m0 + valid_m, h] += scale * (ds @ k_j)[:valid_m]

                valid_n = min(block_n, seqlen_k - n0)
                dk[b, n0:n0 + valid_n, hk] = dk_j[:valid_n]
                dv[b, n0:n0 + valid_n, hk] = dv_j[:valid_n]

    return dq_accum, dk, dv
