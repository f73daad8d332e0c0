"""The low-level operations of nbflash/ops against NumPy, in one warp.

Runs the GPU intrinsics on a GPU and their Python twins under the simulator, with
the same kernel: cp.async into shared memory, ldmatrix (plain and transposed) into
mma fragments, mma.sync for A K^T and A V, shuffles, packing, unpacking and ex2.
"""
import ml_dtypes
import numpy as np
import pytest
from numba import cuda, from_dtype

from nbflash import ops
from nbflash.interface import xp
from reference import tf32_round

# On a GPU these run with the GPU suite (``pytest -m gpu``), which deselected them
# while they carried no marker.
pytestmark = [pytest.mark.simulator if ops.SIMULATOR else pytest.mark.gpu]
U16, F32 = from_dtype(np.uint16), from_dtype(np.float32)   # the simulator needs Numba types
KINDS = {"float16": (np.float16, ops.mma_f16, ops.pack_f16x2, ops.unpack_f16x2),
         "bfloat16": (ml_dtypes.bfloat16, ops.mma_bf16, ops.pack_bf16x2, ops.unpack_bf16x2)}


@cuda.jit(device=True)
def copy_rows_async(dst, src, rows, chunk, lane):
    """cp.async of ``rows`` rows of 32 bytes, src[0, :rows, 0, :] (two 16-byte chunks
    of ``chunk`` elements each, one per lane), to the shared address ``dst``."""
    if lane < 2 * rows:
        row = lane >> 1
        half = lane & 1
        ops.cp_async_16(dst + 32 * row + 16 * half,
                        ops.global_addr(src, 0, row, 0, half * chunk), np.uint32(16))


def make_kernel(kind):
    _, mma, pack, unpack = KINDS[kind]

    @cuda.jit
    def kernel(a, k, v, ak, av, rowsum, packed, unpacked, powers):
        lane = cuda.threadIdx.x
        smem = cuda.shared.array(0, U16)
        base = ops.smem_addr(smem, 0)
        # Three 16x16 tiles of 16-bit elements, row-major: 32 chunks of 16 bytes each.
        for t, src in enumerate((a, k, v)):
            copy_rows_async(base + 512 * t, src, 16, 8, lane)
        ops.cp_async_commit()
        ops.cp_async_wait(0)
        cuda.syncthreads()
        mat = lane >> 3
        r8 = lane & 7
        fa = ops.ldmatrix_x4(base + 2 * (((mat & 1) * 8 + r8) * 16 + (mat >> 1) * 8))
        fk = ops.ldmatrix_x4(base + 2 * (256 + ((mat >> 1) * 8 + r8) * 16 + (mat & 1) * 8))
        fv = ops.ldmatrix_x4_trans(base + 2 * (512 + ((mat & 1) * 8 + r8) * 16
                                               + (mat >> 1) * 8))
        g = lane >> 2
        t = lane & 3
        zero = np.float32(0.0)
        for half in range(2):
            ck = mma(fa[0], fa[1], fa[2], fa[3], fk[2 * half], fk[2 * half + 1],
                     zero, zero, zero, zero)
            cv = mma(fa[0], fa[1], fa[2], fa[3], fv[2 * half], fv[2 * half + 1],
                     zero, zero, zero, zero)
            for i in range(4):
                r = g + 8 * (i >> 1)
                c = half * 8 + 2 * t + (i & 1)
                ak[r, c] = ck[i]
                av[r, c] = cv[i]
        # Row sums of A K^T over the quad that holds each row.
        total = ak[g, 2 * t] + ak[g, 2 * t + 1] + ak[g, 8 + 2 * t] + ak[g, 9 + 2 * t]
        total += ops.shfl_xor(total, 1)
        total += ops.shfl_xor(total, 2)
        if t == 0:
            rowsum[g] = total
        word = pack(np.float32(ak[g, 2 * t]), np.float32(ak[g, 2 * t + 1]))
        packed[lane] = word
        lo, hi = unpack(word)
        unpacked[lane, 0] = lo
        unpacked[lane, 1] = hi
        powers[lane] = ops.ex2(np.float32(lane) * np.float32(0.37) - np.float32(5.0))

    return kernel


@pytest.mark.parametrize("kind", list(KINDS))
def test_fragments_mma_shuffle_pack_ex2(kind):
    dtype = KINDS[kind][0]
    rng = np.random.default_rng(7)
    host = [rng.standard_normal((1, 16, 1, 16)).astype(dtype) for _ in range(3)]
    a, k, v = (xp.asarray(x.view(np.uint16)) for x in host)
    ak = xp.full((16, 16), np.nan, np.float32)
    av = xp.full((16, 16), np.nan, np.float32)
    rowsum = xp.full(8, np.nan, np.float32)
    packed = xp.zeros(32, np.uint32)
    unpacked = xp.full((32, 2), np.nan, np.float32)
    powers = xp.zeros(32, np.float32)
    make_kernel(kind)[1, 32, 0, 3 * 16 * 16 * 2](a, k, v, ak, av, rowsum, packed, unpacked,
                                                 powers)
    get = (lambda x: x.get()) if hasattr(ak, "get") else np.asarray
    A, K, V = (x[0, :, 0, :].astype(np.float64) for x in host)
    # Products of 16-bit values are exact in float32; only the float32 sums round.
    np.testing.assert_allclose(get(ak), A @ K.T, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(get(av), A @ V, rtol=1e-6, atol=1e-5)
    ak_host = get(ak)
    np.testing.assert_allclose(get(rowsum), ak_host[:8].sum(axis=1), rtol=1e-5, atol=1e-5)
    lanes = np.arange(32)
    lo = ak_host[lanes >> 2, 2 * (lanes & 3)].astype(dtype).view(np.uint16).astype(np.uint32)
    hi = ak_host[lanes >> 2, 2 * (lanes & 3) + 1].astype(dtype).view(np.uint16).astype(np.uint32)
    np.testing.assert_array_equal(get(packed), lo | (hi << 16))
    halves = np.stack([lo, hi], axis=1).astype(np.uint16).view(dtype).astype(np.float32)
    np.testing.assert_array_equal(get(unpacked), halves)       # unpack is exact
    expected = np.exp2(lanes.astype(np.float32) * np.float32(0.37) - np.float32(5.0))
    np.testing.assert_allclose(get(powers), expected, rtol=2e-6)


def test_smem_view2d_and_bit_casts():
    @cuda.jit
    def kernel(out, bits, back):
        smem = cuda.shared.array(0, F32)
        tile = ops.smem_view2d(smem, 4, 3, 5)
        i = cuda.threadIdx.x
        if i < 15:
            tile[i // 5, i % 5] = np.float32(i)
        cuda.syncthreads()
        if i < 19:
            out[i] = smem[i]
        if i == 0:
            bits[0] = ops.f32_as_u32(np.float32(1.5))
            back[0] = ops.u32_as_f32(np.uint32(0x40490FDB))

    out = xp.full(19, -1.0, np.float32)
    bits = xp.zeros(1, np.uint32)
    back = xp.zeros(1, np.float32)
    smem_init = 19 * 4
    kernel[1, 32, 0, smem_init](out, bits, back)
    get = (lambda x: x.get()) if hasattr(out, "get") else np.asarray
    assert list(get(out)[4:]) == [float(i) for i in range(15)]
    assert int(get(bits)[0]) == int(np.float32(1.5).view(np.uint32))
    assert float(get(back)[0]) == float(np.uint32(0x40490FDB).view(np.float32))


def test_cp_async_16_or_zero_copies_or_zero_fills():
    """Lanes told to copy get their row's 16 bytes; the others get zeros over poisoned
    shared memory, and their source address (16, in no allocation) is never read."""
    @cuda.jit
    def kernel(src, out):
        lane = cuda.threadIdx.x
        smem = cuda.shared.array(0, U16)
        base = ops.smem_addr(smem, 0)
        for i in range(8):
            smem[8 * lane + i] = np.uint16(0xFFFF)
        cuda.syncthreads()
        copy = lane % 3 != 0
        addr = ops.global_addr(src, 0, lane, 0, 0) if copy else np.uint64(16)
        ops.cp_async_16_or_zero(base + 16 * lane, addr, np.uint32(1) if copy else np.uint32(0))
        ops.cp_async_commit()
        ops.cp_async_wait(0)
        cuda.syncthreads()
        for i in range(8):
            out[lane, i] = smem[8 * lane + i]

    rng = np.random.default_rng(5)
    host = rng.integers(1, 60000, size=(1, 32, 1, 8)).astype(np.uint16)
    out = xp.zeros((32, 8), np.uint16)
    kernel[1, 32, 0, 32 * 16](xp.asarray(host), out)
    get = (lambda x: x.get()) if hasattr(out, "get") else np.asarray
    expected = host[0, :, 0, :].copy()
    expected[np.arange(32) % 3 == 0] = 0
    np.testing.assert_array_equal(get(out), expected)


@pytest.mark.parametrize("width", [2, 4])
def test_red_add_sums_vectors_from_every_thread(width):
    """64 threads add ``width`` floats (red_add_f32x2 or red_add_f32x4) into 4 x 4
    slots of a (1, 4, 1, 4 width) array, 4 threads per slot: every contribution must
    arrive (an atomic sum), each vector in its own ``width`` columns."""
    @cuda.jit
    def kernel(acc, values):
        i = cuda.threadIdx.x
        at = ops.global_addr(acc, 0, i % 4, 0, width * ((i // 4) % 4))
        if width == 2:
            ops.red_add_f32x2(at, values[i, 0], values[i, 1])
        else:
            ops.red_add_f32x4(at, values[i, 0], values[i, 1], values[i, 2], values[i, 3])

    rng = np.random.default_rng(3 + width)
    # Small integers: every order of the float32 sums is exact.
    values = rng.integers(-50, 50, size=(64, width)).astype(np.float32)
    start = rng.integers(-50, 50, size=(1, 4, 1, 4 * width)).astype(np.float32)
    expected = start.copy()
    acc = xp.asarray(start)          # under the simulator, start itself
    kernel[1, 64](acc, xp.asarray(values))
    for i in range(64):
        row, col = i % 4, width * ((i // 4) % 4)
        expected[0, row, 0, col:col + width] += values[i]
    get = (lambda x: x.get()) if hasattr(acc, "get") else np.asarray
    np.testing.assert_array_equal(get(acc), expected)


def test_st_global_u32_stores_packed_pairs_at_offsets_from_one_address():
    """Each lane stores two packed 16-bit words at constant offsets from its row's
    address (the epilogues' pattern); the rest of a poisoned row stays as it was."""
    @cuda.jit
    def kernel(out, words):
        lane = cuda.threadIdx.x
        row = lane >> 2
        base = ops.global_addr(out, 0, row, 0, 0) + np.uint64(4 * (lane & 3))
        for j in range(2):
            ops.st_global_u32(base + np.uint64(16 * j), words[lane, j])

    rng = np.random.default_rng(7)
    words = rng.integers(0, 2**32, size=(32, 2), dtype=np.uint64).astype(np.uint32)
    poison = np.full((1, 8, 1, 20), 0xBEEF, np.uint16)
    out = xp.asarray(poison)
    kernel[1, 32](out, xp.asarray(words))
    expected = poison.copy()
    for lane in range(32):
        for j in range(2):
            col = 8 * j + 2 * (lane & 3)
            expected[0, lane >> 2, 0, col:col + 2] = np.array([words[lane, j]]).view(np.uint16)
    get = (lambda x: x.get()) if hasattr(out, "get") else np.asarray
    np.testing.assert_array_equal(get(out), expected)


def test_v4_global_load_and_store_move_16_bytes_per_lane():
    """Each lane loads 16 bytes of row ``lane`` by one vector load and stores them,
    each word plus one, 16 bytes further along the same row of a poisoned array:
    words in order, nothing else touched."""
    @cuda.jit
    def kernel(src, dst):
        lane = cuda.threadIdx.x
        w = ops.ld_global_nc_v4_u32(ops.global_addr(src, 0, lane, 0, 4))
        one = np.uint32(1)
        ops.st_global_v4_u32(ops.global_addr(dst, 0, lane, 0, 4),
                             w[0] + one, w[1] + one, w[2] + one, w[3] + one)

    rng = np.random.default_rng(11)
    words = rng.integers(0, 2**32 - 1, size=(1, 32, 1, 12), dtype=np.uint64).astype(np.uint32)
    poison = np.full((1, 32, 1, 12), 0xDEADBEEF, np.uint32)
    dst = xp.asarray(poison)
    kernel[1, 32](xp.asarray(words), dst)
    expected = poison.copy()
    expected[..., 4:8] = words[..., 4:8] + np.uint32(1)
    get = (lambda x: x.get()) if hasattr(dst, "get") else np.asarray
    np.testing.assert_array_equal(get(dst), expected)


def test_tf32_fragments_and_mma():
    """m16n8k8 tf32: A (16x8) and two 8-key n-tiles of K by ldmatrix on float32 rows,
    V's B operand (B[t][g], B[t + 4][g]) by 32-bit shared loads; every operand rounded
    by to_tf32."""
    @cuda.jit
    def kernel(a, k, v, ak, av, rounded, samples):
        lane = cuda.threadIdx.x
        smem = cuda.shared.array(0, F32)
        base = ops.smem_addr(smem, 0)
        # A: 16 rows, K: 16 rows, V: 8 rows, each of 8 float32 (two 16-byte chunks).
        copy_rows_async(base, a, 16, 4, lane)
        copy_rows_async(base + 512, k, 16, 4, lane)
        copy_rows_async(base + 1024, v, 8, 4, lane)
        ops.cp_async_commit()
        ops.cp_async_wait(0)
        cuda.syncthreads()
        mat = lane >> 3
        r8 = lane & 7
        fa = ops.ldmatrix_x4(base + 4 * (((mat & 1) * 8 + r8) * 8 + (mat >> 1) * 4))
        fk = ops.ldmatrix_x4(base + 4 * (128 + ((mat >> 1) * 8 + r8) * 8 + (mat & 1) * 4))
        g = lane >> 2
        t = lane & 3
        qa = cuda.local.array(4, np.uint32)
        for i in range(4):
            qa[i] = ops.to_tf32(ops.u32_as_f32(fa[i]))
        v0 = ops.to_tf32(ops.u32_as_f32(ops.ld_shared_u32(base + 4 * (256 + t * 8 + g))))
        v1 = ops.to_tf32(ops.u32_as_f32(ops.ld_shared_u32(base + 4 * (256 + (t + 4) * 8 + g))))
        zero = np.float32(0.0)
        for half in range(2):
            kb0 = ops.to_tf32(ops.u32_as_f32(fk[2 * half]))
            kb1 = ops.to_tf32(ops.u32_as_f32(fk[2 * half + 1]))
            ck = ops.mma_tf32(qa[0], qa[1], qa[2], qa[3], kb0, kb1, zero, zero, zero, zero)
            for i in range(4):
                ak[g + 8 * (i >> 1), half * 8 + 2 * t + (i & 1)] = ck[i]
        cv = ops.mma_tf32(qa[0], qa[1], qa[2], qa[3], v0, v1, zero, zero, zero, zero)
        for i in range(4):
            av[g + 8 * (i >> 1), 2 * t + (i & 1)] = cv[i]
        rounded[lane] = ops.u32_as_f32(ops.to_tf32(samples[lane]))

    rng = np.random.default_rng(8)
    host = [rng.standard_normal((1, n, 1, 8)).astype(np.float32) for n in (16, 16, 8)]
    a, k, v = (xp.asarray(x) for x in host)
    ak = xp.full((16, 16), np.nan, np.float32)
    av = xp.full((16, 8), np.nan, np.float32)
    # Values a quarter, half (a tie) and three quarters of a tf32 unit above 1.5,
    # both signs, and random ones.
    one_and_half = np.float32(1.5).view(np.uint32)
    ties = np.array([one_and_half + d for d in (0x800, 0x1000, 0x1800, 0x1FFF)],
                    np.uint32).view(np.float32)
    sample_host = np.concatenate([ties, -ties, rng.standard_normal(24).astype(np.float32)])
    samples = xp.asarray(sample_host)
    rounded = xp.full(32, np.nan, np.float32)
    kernel[1, 32, 0, 40 * 8 * 4](a, k, v, ak, av, rounded, samples)
    get = (lambda x: x.get()) if hasattr(ak, "get") else np.asarray
    A, K, V = (tf32_round(x[0, :, 0, :]).astype(np.float64) for x in host)
    # tf32 products are exact in float32; only the sums round.
    np.testing.assert_allclose(get(ak), A @ K.T, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(get(av), A @ V, rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(get(rounded), tf32_round(sample_host))
    assert get(rounded)[1] == np.uint32(one_and_half + 0x2000).view(np.float32)  # tie: away


def test_to_tf32_rn_rounds_ties_to_even():
    """The 3xTF32 split's rounding (``cvt.rn.tf32.f32`` on sm_90): to nearest, ties to
    the even neighbour, low 13 bits zero; against NumPy's round-half-even on the
    value scaled by its tf32 unit. Samples: a quarter, a half (ties, after an even
    and after an odd last bit) and three quarters of a unit, both signs, and random
    values over many binades."""
    @cuda.jit
    def kernel(samples, rounded):
        i = cuda.grid(1)
        if i < samples.size:
            rounded[i] = ops.to_tf32_rn(samples[i])

    rng = np.random.default_rng(12)
    base = np.array([1.5, 1.5 + 2.0 ** -10, 3.0, 1e-3], np.float32).view(np.uint32)
    offsets = np.array([0x800, 0x1000, 0x1800, 0x1FFF, 0x0001])
    special = (base[:, None] + offsets[None, :]).ravel().astype(np.uint32).view(np.float32)
    scattered = (rng.standard_normal(200) * 2.0 ** rng.integers(-40, 40, 200)).astype(np.float32)
    host = np.concatenate([special, -special, scattered]).astype(np.float32)
    rounded = xp.full(host.size, 0xFFFFFFFF, np.uint32)
    kernel[(host.size + 63) // 64, 64](xp.asarray(host), rounded)
    get = (lambda x: x.get()) if hasattr(rounded, "get") else np.asarray
    x = host.astype(np.float64)
    unit = 2.0 ** (np.floor(np.log2(np.abs(x))) - 10)
    expected = (np.round(x / unit) * unit).astype(np.float32)
    np.testing.assert_array_equal(get(rounded), expected.view(np.uint32))
    ties = get(rounded)[:20].reshape(4, 5)[:, 1].view(np.float32)
    assert ties[0] == np.float32(1.5)                       # even last bit: down
    assert ties[1] == np.float32(1.5 + 2.0 ** -9)           # odd last bit: up


def test_dq_acc_place_is_fragment_order():
    """The 16-bit backward's dQ accumulator layout: a bijection from 16 rows by the
    head dim onto 8 rows by twice it, where lane (g, t)'s m16n8 result for n-tile j,
    (row g, cols 2t, 2t+1, row g+8, the same cols), is 16 contiguous bytes at column
    16 j + 4 t of row g: one red.global.add.v4.f32."""
    from nbflash.kernels.common import dq_acc_place
    rows, cols = 48, 24
    seen = {}
    for row in range(rows):
        for col in range(cols):
            seen[dq_acc_place(row, col)] = (row, col)
    assert sorted(seen) == [(r, c) for r in range(rows // 2) for c in range(2 * cols)]
    for block in range(rows // 16):
        for j in range(cols // 8):
            for lane in range(32):
                g, t = lane >> 2, lane & 3
                r0, c0 = 16 * block + g, 8 * j + 2 * t
                fragment = [(r0, c0), (r0, c0 + 1), (r0 + 8, c0), (r0 + 8, c0 + 1)]
                assert [dq_acc_place(r, c) for r, c in fragment] == [
                    (8 * block + g, 16 * j + 4 * t + i) for i in range(4)]
