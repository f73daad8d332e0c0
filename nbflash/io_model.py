"""How many bytes attention moves to and from GPU memory: a model you can check.

The FlashAttention paper (Dao et al. 2022, Theorem 2) counts HBM accesses: with
sequence length N, head dim d and an SRAM of M elements, standard attention makes
Theta(N d + N^2) of them and FlashAttention Theta(N^2 d^2 / M). This module counts
them exactly, in bytes, for a given shape and tiling, at two levels of a GPU's memory:

``sram`` (the paper's model: everything off-chip counts)
    One thread block per query tile of ``block_m`` rows reads its Q tile once, reads
    every K and V tile it visits (with causal masking, tiles above the diagonal are
    skipped), and writes its output tile and lse once. On a GPU all of it passes
    between L2 and the SMs: compare with Nsight Compute's ``lts__t_bytes.sum``.
``dram`` (with L2 reuse)
    All query tiles of one (batch, head) read the same K and V at about the same
    time. When the K and V of the heads in flight fit in L2 (50 MiB on an H100,
    shared by all resident blocks), each is read from DRAM once, so DRAM sees Q, K,
    V read once and O, lse written once. When they do not fit, the blocks are taken
    to run in waves of ``blocks_in_flight`` that walk the K, V tiles together, so K
    and V come from DRAM once per wave for each head the wave holds. Compare with
    ``dram__bytes_read.sum`` and ``dram__bytes_write.sum``.

Standard attention is counted kernel by kernel, each reading or writing whole
seqlen_q x seqlen_k matrices, far larger than L2, so that one count serves both
levels: the paper's Algorithm 0 (``standard_attention_io``) or what
``nbflash/_naive.py`` launches with CuPy (``naive_kernels``, ``naive_attention_io``).

Tile sizes default to the ones nbflash's forward kernel uses (``nbflash.config``),
or can be given, or derived from an SRAM budget as in the paper's Algorithm 1.
Pure Python and NumPy: no GPU needed.
"""
from dataclasses import dataclass, replace

import numpy as np

from . import config
from .block_info import key_tile_range


@dataclass(frozen=True)
class Traffic:
    """Bytes read from and written to one level of memory."""
    read: int
    write: int

    @property
    def total(self):
        return self.read + self.write

    def __add__(self, other):
        return Traffic(self.read + other.read, self.write + other.write)


@dataclass(frozen=True)
class Gpu:
    """What the DRAM-level model needs to know about a GPU."""
    sms: int
    l2_bytes: int
    shared_bytes_per_sm: int
    max_threads_per_sm: int
    shared_bytes_reserved_per_block: int = 1024


H100 = Gpu(sms=132, l2_bytes=50 * 2**20, shared_bytes_per_sm=228 * 1024,
           max_threads_per_sm=2048)


@dataclass(frozen=True)
class FlashIO:
    """Predicted traffic of one FlashAttention forward call."""
    sram: Traffic
    dram: Traffic
    block_m: int
    block_n: int
    kv_fits_l2: bool


def _cdiv(a, b):
    return -(-a // b)


def itemsize(dtype_name):
    """Bytes per element of an input dtype name ('float16', 'bfloat16', ...)."""
    return 2 if dtype_name == "bfloat16" else np.dtype(dtype_name).itemsize


def lse_itemsize(dtype_name):
    """Bytes per element of the lse nbflash returns (its accumulator type)."""
    return np.dtype(config.ACCUMULATOR[dtype_name]).itemsize


def forward_config(dtype_name, head_dim):
    """The tile configuration nbflash's forward kernel uses for this dtype and head dim:
    the tensor-core one for 16-bit inputs where nbflash has it, else the SIMT one."""
    if dtype_name in getattr(config, "MMA_DTYPES", ()):
        return config.select_forward_mma(head_dim)
    return config.select_forward(dtype_name, head_dim)


def with_tiles(cfg, dtype_name, block_m=None, block_n=None):
    """``cfg`` with other tile sizes; for a tensor-core config, with fewer warps when
    ``block_m`` is too small to give each warp 16 rows. Raises ValueError if nbflash's
    kernels cannot run the result."""
    changes = {k: v for k, v in (("block_m", block_m), ("block_n", block_n)) if v}
    if hasattr(cfg, "warps") and block_m:
        changes["warps"] = max(1, min(cfg.warps, block_m // 16))
    new = replace(cfg, **changes)
    new.check()
    if not hasattr(new, "forward_shared_bytes"):
        config.check_fits(new, config.forward_shared_elements(new), dtype_name)
    return new


def shared_bytes_per_block(cfg, dtype_name):
    """Shared memory one block of the forward kernel with ``cfg`` uses."""
    if hasattr(cfg, "forward_shared_bytes"):
        return cfg.forward_shared_bytes
    return config.shared_bytes(config.forward_shared_elements(cfg), dtype_name)


def resident_blocks(cfg, dtype_name, gpu=H100):
    """Blocks of the forward kernel resident at once, limited by threads and shared
    memory (registers are not known before compiling, so this is an upper bound)."""
    by_threads = gpu.max_threads_per_sm // cfg.threads
    per_block = shared_bytes_per_block(cfg, dtype_name) + gpu.shared_bytes_reserved_per_block
    by_shared = gpu.shared_bytes_per_sm // per_block
    return gpu.sms * max(1, min(by_threads, by_shared, 32))


def paper_block_sizes(sram_bytes, head_dim, element_bytes):
    """(block_m, block_n) from an SRAM budget, as in the paper's Algorithm 1:
    B_c = ceil(M / 4d) key rows and B_r = min(B_c, d) query rows, M in elements."""
    m_elements = sram_bytes // element_bytes
    block_n = _cdiv(m_elements, 4 * head_dim)
    return min(block_n, head_dim), block_n


def key_rows_read(seqlen_q, seqlen_k, block_m, block_n, causal):
    """Rows of K (and of V) read by each query tile, as an int array over query tiles.

    Tile ``i`` visits key tiles ``[0, n_end)`` (``nbflash.block_info``); rows past
    seqlen_k are not read (the kernels load them as zeros without reading memory).
    """
    ends = [key_tile_range(i, block_m, block_n, seqlen_q, seqlen_k, causal)[1]
            for i in range(_cdiv(seqlen_q, block_m))]
    return np.minimum(np.asarray(ends, dtype=np.int64) * block_n, seqlen_k)


def resolve_tiles(dtype_name, head_dim, block_m=None, block_n=None, sram_bytes=None):
    """(block_m, block_n): those given, else from ``sram_bytes`` as in the paper, else
    nbflash's own configuration for this dtype and head dim."""
    if block_m and block_n:
        return block_m, block_n
    if sram_bytes is not None:
        return paper_block_sizes(sram_bytes, head_dim, itemsize(dtype_name))
    cfg = forward_config(dtype_name, head_dim)
    return block_m or cfg.block_m, block_n or cfg.block_n


def _key_rows_per_wave(key_rows, heads, group, wave):
    """K rows read from DRAM when blocks run in waves of ``wave`` blocks, in grid order
    (query tile fastest, then head), and the blocks of one wave that share a kv head
    read each of its rows once: the most any of them reads."""
    n_tiles = len(key_rows)
    block = np.arange(heads * n_tiles)
    rows = np.tile(key_rows, heads)
    segment = (block // wave) * heads + block // (n_tiles * group)   # (wave, kv head)
    starts = np.flatnonzero(np.diff(segment, prepend=-1))
    return int(np.maximum.reduceat(rows, starts).sum())


def _blocks_in_flight(dtype_name, head_dim, block_m, block_n, gpu):
    cfg = forward_config(dtype_name, head_dim)
    try:
        cfg = with_tiles(cfg, dtype_name, block_m, block_n)
    except ValueError:
        pass   # tiles nbflash cannot run (from an SRAM budget, say): its own occupancy
    return resident_blocks(cfg, dtype_name, gpu)


def flash_forward_io(batch, nheads, seqlen_q, seqlen_k, head_dim, *, dtype_name="float16",
                     nheads_k=None, causal=False, block_m=None, block_n=None,
                     sram_bytes=None, blocks_in_flight=None, gpu=H100):
    """Predicted bytes moved by one FlashAttention forward call (nbflash's tiling).

    Tiles come from ``resolve_tiles``: ``block_m`` and ``block_n`` if given, else from
    ``sram_bytes``, else nbflash's own configuration for ``dtype_name`` and ``head_dim``.
    ``blocks_in_flight`` (default ``resident_blocks``) sets how many heads' K and V
    compete for L2 at once.
    """
    nheads_k = nheads_k or nheads
    group = nheads // nheads_k
    isz, lsz = itemsize(dtype_name), lse_itemsize(dtype_name)
    block_m, block_n = resolve_tiles(dtype_name, head_dim, block_m, block_n, sram_bytes)
    if blocks_in_flight is None:
        blocks_in_flight = _blocks_in_flight(dtype_name, head_dim, block_m, block_n, gpu)

    row = head_dim * isz                               # bytes of one row of Q, K, V or O
    q_bytes = batch * nheads * seqlen_q * row
    o_bytes = q_bytes + batch * nheads * seqlen_q * lsz
    kv_per_head = 2 * seqlen_k * row                   # K and V of one (batch, kv head)
    key_rows = key_rows_read(seqlen_q, seqlen_k, block_m, block_n, causal)
    kv_tiles = 2 * int(key_rows.sum()) * row            # per (batch, query head)
    sram = Traffic(q_bytes + batch * nheads * kv_tiles, o_bytes)

    n_query_tiles = _cdiv(seqlen_q, block_m)
    heads_in_flight = min(batch * nheads, _cdiv(blocks_in_flight, n_query_tiles) + 1)
    kv_in_flight = min(batch * nheads_k, _cdiv(heads_in_flight, group))
    fits = kv_in_flight * kv_per_head <= gpu.l2_bytes
    if fits:
        kv_dram = batch * nheads_k * kv_per_head
    else:
        kv_dram = 2 * row * _key_rows_per_wave(key_rows, batch * nheads, group,
                                               blocks_in_flight)
    dram = Traffic(q_bytes + kv_dram, o_bytes)
    return FlashIO(sram, dram, block_m, block_n, fits)


def standard_attention_io(batch, nheads, seqlen_q, seqlen_k, head_dim, *,
                          dtype_name="float16", nheads_k=None):
    """Bytes moved by the paper's standard attention (Algorithm 0): read Q, K, write
    S = Q K^T; read S, write P = softmax(S); read P, V, write O."""
    nheads_k = nheads_k or nheads
    isz = itemsize(dtype_name)
    q = batch * nheads * seqlen_q * head_dim * isz          # Q, and O
    kv = batch * nheads_k * seqlen_k * head_dim * isz       # K, and V
    scores = batch * nheads * seqlen_q * seqlen_k * isz
    return Traffic(2 * scores + q + 2 * kv, 2 * scores + q)


def naive_kernels(batch, nheads, seqlen_q, seqlen_k, head_dim, *, dtype_name="float16",
                  nheads_k=None, causal=False, gpu=H100):
    """The kernels ``nbflash._naive.naive_attention`` launches with CuPy, in order, as
    ``(what, Traffic)`` in DRAM bytes.

    CuPy's N-d ``matmul`` copies its operands to contiguous arrays and multiplies
    float16 in float32, then copies the float32 product to float16
    (``cupy/_core/_routines_linalg.pyx``), so for float16 inputs S and P each make a
    round trip through float32. The causal mask is read once per (batch, head) when it
    does not fit in half of L2. Row statistics (max, sum, lse: seqlen_q values per
    head) are left out.
    """
    nheads_k = nheads_k or nheads
    isz = itemsize(dtype_name)
    wide = 2 if dtype_name == "float16" else 1              # float32 / input element
    q = batch * nheads * seqlen_q * head_dim * isz           # Q, and O
    kv = batch * nheads_k * seqlen_k * head_dim * isz        # K, and V
    kv_rep = kv * (nheads // nheads_k)                       # repeated to every query head
    s = batch * nheads * seqlen_q * seqlen_k * isz           # one score-sized matrix
    kernels = [("astype copies of q, k, v", Traffic(q + 2 * kv, q + 2 * kv)),
               ("repeat k, v over query heads", Traffic(2 * kv, 2 * kv_rep)),
               ("matmul operands Q, K^T made contiguous", Traffic(q + kv_rep, wide * (q + kv_rep))),
               ("S = Q K^T", Traffic(wide * (q + kv_rep), wide * s))]
    if wide > 1:
        kernels.append(("S float32 -> float16", Traffic(wide * s, s)))
    kernels.append(("S * scale", Traffic(s, s)))
    if causal:
        mask = seqlen_q * seqlen_k
        mask_reads = mask if 2 * mask <= gpu.l2_bytes else mask * batch * nheads
        kernels += [("causal mask", Traffic(0, mask)),
                    ("where(mask, S, -inf)", Traffic(s + mask_reads, s))]
    kernels += [("row max", Traffic(s, 0)), ("S - max", Traffic(s, s)), ("exp", Traffic(s, s)),
                ("row sum", Traffic(s, 0)), ("P / sum", Traffic(s, s))]
    if wide > 1:
        kernels.append(("P, V -> float32", Traffic(s + kv_rep, wide * (s + kv_rep))))
    kernels.append(("O = P V", Traffic(wide * (s + kv_rep), wide * q)))
    if wide > 1:
        kernels.append(("O float32 -> float16", Traffic(wide * q, q)))
    return kernels


def naive_attention_io(batch, nheads, seqlen_q, seqlen_k, head_dim, **kw):
    """Bytes moved by ``nbflash._naive.naive_attention``: the sum of ``naive_kernels``."""
    return sum((t for _, t in naive_kernels(batch, nheads, seqlen_q, seqlen_k, head_dim, **kw)),
               Traffic(0, 0))
