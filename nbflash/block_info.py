"""Which tiles a thread block visits: all loop-bound arithmetic in one place.

Plain Python integer functions, so they can be tested without a GPU;
``nbflash.kernels.common`` compiles the same functions as device functions.

Causal masking is aligned to the bottom-right corner (FlashAttention 2.1+): query
row i may see key j iff ``j <= i + seqlen_k - seqlen_q``.
"""


def key_tile_range(m_block, block_m, block_n, seqlen_q, seqlen_k, causal):
    """Key tiles ``[start, end)`` that query tile ``m_block`` must visit.

    With ``causal``, tiles entirely above the diagonal (no key visible to any row of
    the query tile) are left out rather than masked.
    """
    key_end = seqlen_k
    if causal:
        # The tile's last row, m_block * block_m + block_m - 1, sees keys up to
        # that row + (seqlen_k - seqlen_q).
        key_end = min(seqlen_k, (m_block + 1) * block_m + seqlen_k - seqlen_q)
    if key_end <= 0:
        return 0, 0
    return 0, (key_end + block_n - 1) // block_n


def query_tile_range(n_block, block_m, block_n, seqlen_q, seqlen_k, causal):
    """Query tiles ``[start, end)`` that see at least one key of key tile ``n_block``."""
    end = (seqlen_q + block_m - 1) // block_m
    if not causal:
        return 0, end
    # Key j is first visible to query row j - (seqlen_k - seqlen_q).
    first_row = max(0, n_block * block_n - (seqlen_k - seqlen_q))
    start = first_row // block_m
    if start >= end:
        return 0, 0
    return start, end


def tile_needs_mask(m_block, n_block, block_m, block_n, seqlen_q, seqlen_k, causal):
    """Whether any (row, key) pair of this tile pair is masked.

    True for the last, partial key tile and for tiles that straddle the causal
    diagonal; every other tile runs without per-element masking.
    """
    n_last = (n_block + 1) * block_n - 1
    if n_last >= seqlen_k:
        return True
    if causal:
        # The tile's first row sees keys up to m_block * block_m + seqlen_k - seqlen_q.
        return n_last > m_block * block_m + seqlen_k - seqlen_q
    return False
