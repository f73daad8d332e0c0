"""Simulator twins of ``_gpu.py``: same names, signatures and results, in NumPy.

Numba's CUDA simulator runs every CUDA thread as an OS thread and has no warp-level
operations. Warp-collective twins (ldmatrix, mma, shuffles) meet at a per-warp
exchange: each of the 32 lanes deposits its operands, waits for the others, and
computes its own result from all 32 deposits, with the register layouts of
``_gpu.py``. Shared and global "addresses" are host addresses, so kernel address
arithmetic (swizzles included) runs unchanged. cp.async is a synchronous copy, so
the simulator cannot catch a missing wait; the GPU tests do.
"""
import ctypes
import math
import threading
import weakref

import numpy as np

__all__ = ["smem_view2d", "f32_as_u32", "u32_as_f32", "smem_addr", "global_addr",
           "ldmatrix_x4", "ldmatrix_x4_trans", "mma_f16", "mma_bf16", "pack_f16x2",
           "pack_bf16x2", "unpack_f16x2", "unpack_bf16x2", "ex2", "cp_async_16",
           "cp_async_16_or_zero", "cp_async_commit", "cp_async_wait", "shfl_xor",
           "st_shared_u32", "ld_shared_u32", "st_global_u32", "red_add_f32x2", "red_add_f32x4",
           "mma_tf32", "to_tf32", "to_tf32_rn", "ld_global_nc_v4_u32", "st_global_v4_u32"]


def smem_view2d(arr, offset, rows, cols):
    flat = np.asarray(arr)
    return flat[offset:offset + rows * cols].reshape(rows, cols)


def f32_as_u32(x):
    return np.float32(x).view(np.uint32)


def u32_as_f32(u):
    return np.uint32(u).view(np.float32)


# ---- addresses

def _host(a):
    """The NumPy array behind a simulator kernel argument or shared array."""
    item = getattr(a, "_item", None)
    if item is not None:
        return item._ary
    return np.asarray(a)


def smem_addr(arr, idx):
    a = _host(arr)
    return a.ctypes.data + int(idx) * a.strides[0]


def global_addr(arr, i0, i1, i2, i3):
    a = _host(arr)
    return a.ctypes.data + sum(int(i) * s for i, s in zip((i0, i1, i2, i3), a.strides))


def cp_async_16(dst, src, src_bytes):
    n, dst, src = int(src_bytes), int(dst), int(src)
    if n:
        ctypes.memmove(dst, src, n)
    if n < 16:
        ctypes.memset(dst + n, 0, 16 - n)


def cp_async_16_or_zero(dst, src, copy):
    if copy:
        ctypes.memmove(int(dst), int(src), 16)
    else:
        ctypes.memset(int(dst), 0, 16)


def ld_shared_u32(addr):
    return np.uint32(_u32_at(int(addr)))


def st_shared_u32(addr, value):
    ctypes.c_uint32.from_address(int(addr)).value = int(value)


def st_global_u32(addr, value):
    addr = int(addr)
    assert addr % 4 == 0, "st.global.u32 needs a 4-byte aligned address"
    ctypes.c_uint32.from_address(addr).value = int(value)


def ld_global_nc_v4_u32(addr):
    addr = int(addr)
    assert addr % 16 == 0, "ld.global.v4.u32 needs a 16-byte aligned address"
    return tuple(np.uint32(_u32_at(addr + 4 * i)) for i in range(4))


def st_global_v4_u32(addr, w0, w1, w2, w3):
    addr = int(addr)
    assert addr % 16 == 0, "st.global.v4.u32 needs a 16-byte aligned address"
    for i, w in enumerate((w0, w1, w2, w3)):
        ctypes.c_uint32.from_address(addr + 4 * i).value = int(w)


_red_lock = threading.Lock()


def red_add_f32x2(addr, lo, hi):
    addr = int(addr)
    assert addr % 8 == 0, "red.global.add.v2.f32 needs an 8-byte aligned address"
    with _red_lock:
        for i, x in enumerate((lo, hi)):
            cell = ctypes.c_float.from_address(addr + 4 * i)
            cell.value = np.float32(cell.value) + np.float32(x)


def red_add_f32x4(addr, x0, x1, x2, x3):
    addr = int(addr)
    assert addr % 16 == 0, "red.global.add.v4.f32 needs a 16-byte aligned address"
    with _red_lock:
        for i, x in enumerate((x0, x1, x2, x3)):
            cell = ctypes.c_float.from_address(addr + 4 * i)
            cell.value = np.float32(cell.value) + np.float32(x)


def cp_async_commit():
    pass


def cp_async_wait(n):
    pass


# ---- warp exchange

_lock = threading.Lock()
_exchanges = weakref.WeakKeyDictionary()     # block manager -> {warp: (barrier, slots)}


def _warp_all(value):
    """(lane, values of all 32 lanes); every lane of the warp must call it.

    One barrier per exchange: the slots alternate between two lists, call by call. A
    lane that has passed call n's barrier writes call n + 1's list, which nobody
    reads any more (every lane reached call n's barrier after reading call n - 1's,
    the same list), and cannot pass call n + 1's barrier before all lanes have read
    call n's."""
    th = threading.current_thread()
    warp, lane = divmod(th.thread_id, 32)
    with _lock:
        per_block = _exchanges.setdefault(th._manager, {})
        if warp not in per_block:
            n_threads = int(np.prod(th._manager._block_dim))
            per_block[warp] = (threading.Barrier(min(32, n_threads - 32 * warp), timeout=120),
                               ([None] * 32, [None] * 32))
    barrier, both = per_block[warp]
    parity = getattr(th, "_nbflash_exchanges", 0)
    th._nbflash_exchanges = parity ^ 1
    slots = both[parity]
    slots[lane] = value
    barrier.wait()
    return lane, list(slots)


def shfl_xor(value, lane_mask):
    lane, values = _warp_all(value)
    return values[lane ^ lane_mask]


def _u32_at(addr):
    return ctypes.c_uint32.from_address(addr).value


def _u16_at(addr):
    return ctypes.c_uint16.from_address(addr).value


def ldmatrix_x4(addr):
    lane, rows = _warp_all(int(addr))
    return tuple(np.uint32(_u32_at(rows[8 * m + (lane >> 2)] + 4 * (lane & 3)))
                 for m in range(4))


def ldmatrix_x4_trans(addr):
    lane, rows = _warp_all(int(addr))
    out = []
    for m in range(4):
        r = 8 * m + 2 * (lane & 3)
        col = 2 * (lane >> 2)
        out.append(np.uint32(_u16_at(rows[r] + col) | (_u16_at(rows[r + 1] + col) << 16)))
    return tuple(out)


# ---- arithmetic

def _lane_result(d, lane, c0, c1, c2, c3):
    """This lane's accumulator registers of D = A B + C (the 16x8 C layout), in float32."""
    g, t = lane >> 2, lane & 3
    f = np.float32
    return (f(d[g, 2 * t] + c0), f(d[g, 2 * t + 1] + c1),
            f(d[g + 8, 2 * t] + c2), f(d[g + 8, 2 * t + 1] + c3))


# Fragment positions, lane by lane: lane (g, t) = (lane >> 2, lane & 3).
_G = np.arange(32) >> 2
_T = np.arange(32) & 3


def _halves_all(u, kind):
    """The two 16-bit values of each uint32 in ``u``, as float64 (..., 2): low first."""
    u = u.astype(np.uint32)
    halves = np.stack([u & 0xFFFF, u >> 16], axis=-1)
    if kind == "f16":
        return halves.astype(np.uint16).view(np.float16).astype(np.float64)
    return (halves << 16).astype(np.uint32).view(np.float32).astype(np.float64)


def _make_mma(kind):
    def mma(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        lane, regs = _warp_all((a0, a1, a2, a3, b0, b1))
        h = _halves_all(np.array(regs, dtype=np.uint64), kind)     # (32 lanes, 6, 2)
        a = np.zeros((16, 16))
        b = np.zeros((16, 8))
        for j in range(2):
            a[_G, 2 * _T + j] = h[:, 0, j]
            a[_G + 8, 2 * _T + j] = h[:, 1, j]
            a[_G, 2 * _T + 8 + j] = h[:, 2, j]
            a[_G + 8, 2 * _T + 8 + j] = h[:, 3, j]
            b[2 * _T + j, _G] = h[:, 4, j]
            b[2 * _T + 8 + j, _G] = h[:, 5, j]
        return _lane_result(a @ b, lane, c0, c1, c2, c3)
    return mma


mma_f16 = _make_mma("f16")
mma_bf16 = _make_mma("bf16")


def mma_tf32(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
    lane, regs = _warp_all((a0, a1, a2, a3, b0, b1))
    # What the tensor core reads of each tf32 register: its upper 19 bits.
    r = (np.array(regs, dtype=np.uint64) & 0xFFFFE000).astype(np.uint32).view(np.float32)
    r = r.astype(np.float64)                                         # (32 lanes, 6)
    a = np.zeros((16, 8))
    b = np.zeros((8, 8))
    a[_G, _T], a[_G + 8, _T] = r[:, 0], r[:, 1]
    a[_G, _T + 4], a[_G + 8, _T + 4] = r[:, 2], r[:, 3]
    b[_T, _G], b[_T + 4, _G] = r[:, 4], r[:, 5]
    return _lane_result(a @ b, lane, c0, c1, c2, c3)


def to_tf32(x):
    u = int(np.float32(x).view(np.uint32))
    if (u & 0x7F800000) == 0x7F800000:       # inf and NaN keep their bits
        return np.uint32(u)
    return np.uint32(((u + 0x1000) & 0xFFFFE000) & 0xFFFFFFFF)


def to_tf32_rn(x):
    u = int(np.float32(x).view(np.uint32))
    if (u & 0x7F800000) == 0x7F800000:
        return np.uint32(u)
    odd = (u >> 13) & 1                       # ties go to the even neighbour
    return np.uint32(((u + 0xFFF + odd) & 0xFFFFE000) & 0xFFFFFFFF)


def pack_f16x2(lo, hi):
    bits = np.array([lo, hi], dtype=np.float32).astype(np.float16).view(np.uint16)
    return np.uint32(int(bits[0]) | (int(bits[1]) << 16))


def _bf16_bits(x):
    u = int(np.float32(x).view(np.uint32))
    if (u & 0x7FFFFFFF) > 0x7F800000:
        return (u >> 16) | 0x40
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF


def pack_bf16x2(lo, hi):
    return np.uint32(_bf16_bits(lo) | (_bf16_bits(hi) << 16))


def unpack_f16x2(u):
    halves = np.array([int(u) & 0xFFFF, int(u) >> 16], dtype=np.uint16).view(np.float16)
    return np.float32(halves[0]), np.float32(halves[1])


def unpack_bf16x2(u):
    u = int(u)
    return (np.uint32((u & 0xFFFF) << 16).view(np.float32),
            np.uint32(u & 0xFFFF0000).view(np.float32))


def ex2(x):
    x = float(x)
    if math.isnan(x):
        return np.float32(np.nan)
    return np.float32(np.exp2(np.float32(x)))
