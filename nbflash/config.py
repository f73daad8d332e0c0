"""Kernel configurations, as data.

A configuration fixes everything that is compiled into a kernel: tile sizes,
threads per block, the head-dim bucket and the element type. ``select_*`` pick one
for a call; the tables record the choice per head-dim bucket. Shared-memory use is
computed here, from the same layout the kernels use, so that a table entry that does
not fit is caught before any compile (``check_fits``).
"""
from dataclasses import dataclass

import numpy as np

#: Head dims are rounded up to one of these; the kernels zero-pad the rest.
HEAD_DIM_BUCKETS = (32, 64, 96, 128, 256)
MAX_HEAD_DIM = HEAD_DIM_BUCKETS[-1]

#: Opt-in shared-memory limit per block on sm_80/sm_90 (H100: 232448 bytes).
MAX_SHARED_BYTES = 232448
DEFAULT_SHARED_BYTES = 48 * 1024

#: Storage type the kernels see for each supported input dtype name, and the type
#: they accumulate in. bfloat16 travels as its raw 16 bits.
STORAGE = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32,
           "float64": np.float64}
ACCUMULATOR = {"float16": np.float32, "bfloat16": np.float32, "float32": np.float32,
               "float64": np.float64}


@dataclass(frozen=True)
class TileConfig:
    """Compile-time shape of one kernel.

    ``block_m`` query rows and ``block_n`` keys per tile; ``threads`` per block,
    arranged as ``threads // thread_cols`` rows by ``thread_cols`` columns when a
    block computes a tile; ``head_dim`` is the head-dim bucket (padded size).
    """
    block_m: int
    block_n: int
    head_dim: int
    threads: int
    thread_cols: int = 16

    @property
    def thread_rows(self):
        return self.threads // self.thread_cols

    def check(self):
        tm = self.thread_rows
        if self.threads % self.thread_cols or self.threads > 1024:
            raise ValueError(f"bad thread layout in {self}")
        for size, per in ((self.block_m, tm), (self.block_n, tm), (self.block_n, self.thread_cols),
                          (self.head_dim, self.thread_cols)):
            if size % per:
                raise ValueError(f"{size} is not divisible by {per} in {self}")
        if self.block_m > self.threads:
            raise ValueError(f"one thread per query row needs block_m <= threads in {self}")


# Padded row strides: one extra element per row keeps threads of a warp that read a
# column of a tile in distinct shared-memory banks.
def padded(n):
    return n + 1


def forward_shared_elements(cfg):
    """Elements of shared memory the SIMT forward kernel uses (see kernels/forward.py)."""
    row = padded(cfg.head_dim)
    return (cfg.block_m * row + 2 * cfg.block_n * row
            + cfg.block_m * padded(cfg.block_n) + 3 * cfg.block_m)


def backward_shared_elements(cfg):
    """Elements of shared memory the SIMT backward kernel uses (see kernels/backward.py)."""
    row = padded(cfg.head_dim)
    return (2 * cfg.block_n * row + 2 * cfg.block_m * row
            + 2 * cfg.block_m * padded(cfg.block_n) + 2 * cfg.block_m)


# SIMT tiles per head-dim bucket, for 4-byte and 8-byte accumulators. Chosen to keep
# per-thread accumulators at <= 64 values and shared memory under the opt-in limit.
FORWARD_TILES = {
    4: {32: TileConfig(64, 64, 32, 128), 64: TileConfig(64, 64, 64, 128),
        96: TileConfig(64, 32, 96, 128), 128: TileConfig(64, 32, 128, 128),
        256: TileConfig(32, 32, 256, 128)},
    8: {32: TileConfig(64, 64, 32, 128), 64: TileConfig(64, 32, 64, 128),
        96: TileConfig(32, 32, 96, 128), 128: TileConfig(32, 32, 128, 128),
        256: TileConfig(32, 32, 256, 128)},
}
BACKWARD_TILES = {
    4: {32: TileConfig(64, 64, 32, 128), 64: TileConfig(64, 64, 64, 128),
        96: TileConfig(32, 64, 96, 256), 128: TileConfig(32, 64, 128, 256),
        256: TileConfig(32, 32, 256, 256)},
    8: {32: TileConfig(64, 64, 32, 128), 64: TileConfig(32, 64, 64, 128),
        96: TileConfig(32, 32, 96, 256), 128: TileConfig(32, 32, 128, 256),
        256: TileConfig(16, 16, 256, 256)},
}

# The CUDA simulator runs one OS thread per CUDA thread: small tiles and few threads
# keep CI fast, and small tiles exercise the multi-tile and partial-tile paths at the
# tiny sizes the simulator can afford.
SIMULATOR_TILE = {d: TileConfig(16, 16, d, 32) for d in HEAD_DIM_BUCKETS}


def tile_row(width, element_bytes):
    """Elements allocated per row of a tensor-core kernel's shared tile of rows
    ``width`` elements wide: rows of more than 128 bytes are rounded up to whole
    128-byte lines (head dim 96 in 16 bits: 192 -> 256 bytes), so that every row
    starts a line and the XOR swizzle of ``kernels.forward_mma.make_mma_tile_ops``
    stays within lines; shorter rows (32 or 64 bytes) share a line."""
    row_bytes = width * element_bytes
    if row_bytes > 128:
        row_bytes = -(-row_bytes // 128) * 128
    return row_bytes // element_bytes


@dataclass(frozen=True)
class MmaConfig:
    """Compile-time shape of a tensor-core (mma.sync m16n8k16, or m16n8k8 for tf32) kernel.

    ``block_m`` query rows per block, split evenly over ``warps`` warps in 16-row
    m-tiles; ``block_n`` keys per K/V tile; ``head_dim`` the head-dim bucket.
    """
    block_m: int
    block_n: int
    head_dim: int
    warps: int
    q_in_registers: bool = True
    #: 2 for float16/bfloat16 tiles, 4 for float32 tiles on tf32 tensor cores.
    element_bytes: int = 2

    @property
    def threads(self):
        return 32 * self.warps

    @property
    def m_tiles(self):
        return self.block_m // (16 * self.warps)

    @property
    def row(self):
        """Elements per row of a shared head-dim tile (see ``tile_row``)."""
        return tile_row(self.head_dim, self.element_bytes)

    @property
    def forward_shared_bytes(self):
        """Q and two stages of the K and V tiles."""
        return (self.block_m + 4 * self.block_n) * self.row * self.element_bytes

    def check(self):
        """The forward's shape: each warp owns whole 16-row m-tiles of the query tile."""
        if self.block_m % (16 * self.warps) or self.block_n % 16 or self.head_dim % 16:
            raise ValueError(f"tiles must be multiples of 16 rows per warp in {self}")
        _check_copies_and_shared(self, self.forward_shared_bytes)


def _check_copies_and_shared(cfg, shared_bytes):
    """Tiles' 16-byte chunks split evenly over the threads, and shared memory fits."""
    chunks = cfg.head_dim * cfg.element_bytes // 16
    for rows in (cfg.block_m, cfg.block_n):
        if (rows * chunks) % cfg.threads:
            raise ValueError(f"{rows}-row tiles do not split evenly over threads in {cfg}")
    if shared_bytes > MAX_SHARED_BYTES:
        raise ValueError(f"{cfg} needs {shared_bytes} bytes of shared memory")


@dataclass(frozen=True)
class BackwardMmaConfig:
    """Compile-time shape of the tensor-core backward (kernels/backward_mma.py).

    One block per tile of ``block_n`` keys walks the query tiles of ``block_m`` rows
    that see it. Each of its five products splits over the ``warps`` warps in a grid
    of its own (FlashAttention-2's atom layouts), given by the warps along its first
    axis: ``sdp_warps_m`` along the queries for S = Q K^T and dP = dO V^T (the rest
    along the keys), ``dkv_warps_n`` along the keys for dV = P^T dO and dK = dS^T Q
    (the rest along the head dim), ``dq_warps_m`` along the queries for dQ = dS K
    (the rest along the head dim). Every warp's share is whole 16 x 16 blocks.
    """
    block_m: int
    block_n: int
    head_dim: int
    warps: int
    sdp_warps_m: int
    dkv_warps_n: int
    dq_warps_m: int
    element_bytes: int = 2

    @property
    def threads(self):
        return 32 * self.warps

    @property
    def row(self):
        """Elements per row of a shared head-dim tile (see ``tile_row``)."""
        return tile_row(self.head_dim, self.element_bytes)

    @property
    def grids(self):
        """(warps along the first axis, along the second, first-axis size,
        second-axis size) of the S/dP, dK/dV and dQ products."""
        w, bm, bn, d = self.warps, self.block_m, self.block_n, self.head_dim
        return {"sdp": (self.sdp_warps_m, w // self.sdp_warps_m, bm, bn),
                "dkv": (self.dkv_warps_n, w // self.dkv_warps_n, bn, d),
                "dq": (self.dq_warps_m, w // self.dq_warps_m, bm, d)}

    @property
    def backward_shared_bytes(self):
        """K, V (block_n rows), two stages of Q, dO (block_m rows) and of their two
        float32 row statistics, and P and dS (block_m rows of block_n keys; 16-bit, or
        float32 for tf32)."""
        es = self.element_bytes
        return ((2 * self.block_n + 4 * self.block_m) * self.row * es
                + 2 * self.block_m * tile_row(self.block_n, es) * es + 4 * self.block_m * 4)

    def check_backward(self):
        for name, (w1, w2, n1, n2) in self.grids.items():
            if w1 * w2 != self.warps or n1 % (16 * w1) or n2 % (16 * w2):
                raise ValueError(f"the {name} product's {w1} x {w2} warps do not split "
                                 f"{n1} x {n2} into 16 x 16 blocks in {self}")
        _check_copies_and_shared(self, self.backward_shared_bytes)


#: Tensor-core forward tiles per head-dim bucket (float16 and bfloat16). 128 query rows
#: over 4 warps give each warp two 16-row m-tiles: every K/V fragment loaded from
#: shared memory feeds two mma. Measured on the H100 with swizzled tiles (fp16, seqlen
#: 4096, hidden 2048, torch flash in the same run; .gpu/dev_s9.py, benchmarks/NOTES.md),
#: TFLOP/s full / causal: d128 128x64 348 / 279 against 128x32 316 / 267 (64-key tiles
#: halve the output rescale and the per-tile copy and barrier work per key; they spill
#: 112 bytes, values reloaded at the loop top and around P V); d96 128x64 326 / 283 against 128x32 249 / 248
#: (88 bytes of spills); d256 64x32 268 / 211 against 64x64 252 / 213; d64 128x64 qreg
#: 314 / 263; d32 128x64 236 / 179 (128x128: 231 / 200, but 40 bytes of spills).
FORWARD_MMA_TILES = {
    32: MmaConfig(128, 64, 32, 4),
    64: MmaConfig(128, 64, 64, 4),
    96: MmaConfig(128, 64, 96, 4, q_in_registers=False),
    128: MmaConfig(128, 64, 128, 4, q_in_registers=False),
    256: MmaConfig(64, 32, 256, 4, q_in_registers=False),
}
#: Causal overrides per head-dim bucket (none now). Until the tile copies' offsets were
#: made 32-bit, Q in registers spilled at head dim 64 when causal and d64 causal ran
#: with Q reloaded from shared memory; qreg now compiles spill-free there and measured
#: 263 TFLOP/s (0.98x torch flash) at seqlen 4096, where the grid had measured 0.90x
#: for the reloading tile.
FORWARD_MMA_TILES_CAUSAL = {}
#: Tensor-core backward tiles per head-dim bucket, in FlashAttention-2's warp grids
#: (BackwardMmaConfig; 128 keys per block where registers allow, which halves the dQ
#: atomics per flop against 64). Measured on the H100 (fp16, hidden 2048, backward
#: alone, torch flash's backward in the same run; ``python -m benchmarks backward``,
#: benchmarks/NOTES.md), ms at seqlen 4096 full / causal: d128 64x128x8w grids 2/4/2
#: 5.09 / 2.89, 2/2/2 5.06 / 2.93, 64x64x4w 5.73 / 3.19 (torch 4.55 / 2.48); d64
#: 128x128x8w 2/4/4 5.54 / 3.12, 64x128x8w 2/4/2 6.14 / 3.41, 64x64x4w 6.17 / 3.38
#: (torch 4.90 / 2.78). Head dims 32, 96 and 256 take FlashAttention-2's sm80 shapes
#: where they compile, not measured against alternatives.
BACKWARD_MMA_TILES = {
    32: BackwardMmaConfig(64, 64, 32, 4, 2, 2, 2),
    64: BackwardMmaConfig(128, 128, 64, 8, 2, 4, 4),
    96: BackwardMmaConfig(64, 128, 96, 8, 2, 4, 4),
    128: BackwardMmaConfig(64, 128, 128, 8, 2, 4, 2),
    256: BackwardMmaConfig(64, 64, 256, 8, 4, 2, 2),
}
#: Under the simulator: one warp, so each warp-collective costs one exchange.
SIMULATOR_MMA_TILE = {d: MmaConfig(16, 16, d, 1) for d in HEAD_DIM_BUCKETS}
SIMULATOR_BACKWARD_MMA_TILE = {d: BackwardMmaConfig(16, 16, d, 1, 1, 1, 1)
                               for d in HEAD_DIM_BUCKETS}
#: Input dtypes that run on tensor cores.
MMA_DTYPES = ("float16", "bfloat16")

#: float32 forward tiles on tf32 tensor cores (mma.sync m16n8k8), per head-dim bucket:
#: the float16 tables' shapes (128 query rows over 4 warps), which compile without
#: spills for one tf32 product (tests/ptx_check.py).
FORWARD_TF32_TILES = {
    32: MmaConfig(128, 64, 32, 4, element_bytes=4),
    64: MmaConfig(128, 64, 64, 4, q_in_registers=False, element_bytes=4),
    96: MmaConfig(128, 32, 96, 4, q_in_registers=False, element_bytes=4),
    128: MmaConfig(128, 32, 128, 4, q_in_registers=False, element_bytes=4),
    256: MmaConfig(64, 32, 256, 4, q_in_registers=False, element_bytes=4),
}
#: Overrides for 3xTF32 (three products, split operands in registers): 128x32 tiles
#: spill at head dims 96 and 128 (28-92 bytes), 16-key tiles do not. Measured on the
#: H100 (float32 d128, seqlen 4096, hidden 2048; .gpu/dev_var6.py), TFLOP/s full /
#: causal: 64x32x4w 32.2 / 29.6, 128x16x4w 41.9 / 36.5, 64x64x4w 28.3.
FORWARD_TF32X3_TILES = {
    96: MmaConfig(128, 16, 96, 4, q_in_registers=False, element_bytes=4),
    128: MmaConfig(128, 16, 128, 4, q_in_registers=False, element_bytes=4),
}
SIMULATOR_TF32_TILE = {d: MmaConfig(16, 16, d, 1, element_bytes=4) for d in HEAD_DIM_BUCKETS}
#: float32 backward tiles on tf32 tensor cores, float32 tiles in shared memory (twice
#: the bytes of the 16-bit tables' tiles, so 64 queries and mostly 64 keys where those
#: take 128; head dim 128 uses 225 KB of the 227 KB a block may have). Head dim 256
#: has no shape that fits: its float32 K and V alone are 128 KB at 64 keys, and it runs
#: the SIMT backward. First shapes that fit and compile spill-free for 3xTF32 (nvJitLink
#: 13.5, sm_90: 250-255 registers), not yet measured against alternatives
#: (``python -m benchmarks backward --dtype float32`` compares them); on the H100 they
#: gave float32 forward + backward 1.52-2.01x of torch's efficient backend
#: (README, thirteenth session).
BACKWARD_TF32_TILES = {
    32: BackwardMmaConfig(64, 64, 32, 4, 2, 2, 2, element_bytes=4),
    64: BackwardMmaConfig(64, 128, 64, 8, 2, 4, 2, element_bytes=4),
    96: BackwardMmaConfig(64, 64, 96, 8, 2, 4, 4, element_bytes=4),
    128: BackwardMmaConfig(64, 64, 128, 8, 2, 4, 2, element_bytes=4),
}
SIMULATOR_BACKWARD_TF32_TILE = {d: BackwardMmaConfig(16, 16, d, 1, 1, 1, 1, element_bytes=4)
                                for d in HEAD_DIM_BUCKETS}
#: tf32 products per float32 product in the float32 forward. 3 splits each operand
#: x = big + small into two tf32 values and sums big*big + big*small + small*big
#: (the small*small term is below float32's rounding): float32 accuracy on tensor
#: cores, the "3xTF32" of CUTLASS and of PyTorch's memory-efficient backend.
#: ``attention(..., allow_tf32=True)`` takes 1: one tf32 product, 10-bit operands.
FLOAT32_PASSES = 3


def select_backward_mma(head_dim, simulator=False, tf32=False):
    """The tensor-core backward's configuration (a BackwardMmaConfig): float16 and
    bfloat16, or float32 on tf32 products with ``tf32``; None where float32 has no
    tensor-core backward (head dim 256: see BACKWARD_TF32_TILES)."""
    bucket = head_dim_bucket(head_dim)
    if tf32:
        return (SIMULATOR_BACKWARD_TF32_TILE if simulator else BACKWARD_TF32_TILES).get(bucket)
    return (SIMULATOR_BACKWARD_MMA_TILE if simulator else BACKWARD_MMA_TILES)[bucket]


def select_forward_mma(head_dim, simulator=False, causal=False, tf32_passes=0):
    """Tensor-core forward tiles: float16/bfloat16, or float32 on tf32 products when
    ``tf32_passes`` (1 or 3) is given."""
    bucket = head_dim_bucket(head_dim)
    if tf32_passes:
        if simulator:
            return SIMULATOR_TF32_TILE[bucket]
        if tf32_passes == 3 and bucket in FORWARD_TF32X3_TILES:
            return FORWARD_TF32X3_TILES[bucket]
        return FORWARD_TF32_TILES[bucket]
    if simulator:
        return SIMULATOR_MMA_TILE[bucket]
    if causal and bucket in FORWARD_MMA_TILES_CAUSAL:
        return FORWARD_MMA_TILES_CAUSAL[bucket]
    return FORWARD_MMA_TILES[bucket]


def head_dim_bucket(head_dim):
    for bucket in HEAD_DIM_BUCKETS:
        if head_dim <= bucket:
            return bucket
    raise ValueError(f"head_dim {head_dim} is over {MAX_HEAD_DIM}")


def select_forward(dtype_name, head_dim, simulator=False):
    bucket = head_dim_bucket(head_dim)
    if simulator:
        return SIMULATOR_TILE[bucket]
    return FORWARD_TILES[np.dtype(ACCUMULATOR[dtype_name]).itemsize][bucket]


def select_backward(dtype_name, head_dim, simulator=False):
    bucket = head_dim_bucket(head_dim)
    if simulator:
        return SIMULATOR_TILE[bucket]
    return BACKWARD_TILES[np.dtype(ACCUMULATOR[dtype_name]).itemsize][bucket]


def shared_bytes(elements, dtype_name):
    return elements * np.dtype(ACCUMULATOR[dtype_name]).itemsize


def check_fits(cfg, elements, dtype_name):
    """Raise if ``cfg`` is malformed or needs more shared memory than a block can have."""
    cfg.check()
    nbytes = shared_bytes(elements, dtype_name)
    if nbytes > MAX_SHARED_BYTES:
        raise ValueError(f"{cfg} needs {nbytes} bytes of shared memory for {dtype_name}, "
                         f"over {MAX_SHARED_BYTES}")
    return nbytes
