"""GPU implementations of nbflash's low-level operations, as Numba intrinsics.

The tensor-core operations are inline PTX (PTX ISA 8.x, sections 9.7.13 "Warp Level
Matrix Multiply-Accumulate Instructions" and 9.7.9.25 "cp.async"). Register layouts
of the mma fragments (g = lane >> 2, t = lane & 3; each 32-bit register holds two
16-bit values, the lower index in the low half):

    A (16x16, row major)  a0: A[g][2t:2t+2]    a1: A[g+8][2t:2t+2]
                          a2: A[g][2t+8:2t+10] a3: A[g+8][2t+8:2t+10]
    B (16x8, "col")       b0: B[2t:2t+2][g]    b1: B[2t+8:2t+10][g]
    C, D (16x8, float32)  c0, c1: C[g][2t], C[g][2t+1]   c2, c3: C[g+8][2t], C[g+8][2t+1]

and of the tf32 shape m16n8k8 (one tf32 value, a float32 whose low 13 bits are
ignored, per register; C and D as above):

    A (16x8, row major)   a0: A[g][t]  a1: A[g+8][t]  a2: A[g][t+4]  a3: A[g+8][t+4]
    B (8x8, "col")        b0: B[t][g]  b1: B[t+4][g]

Instructions with no outputs are marked side-effecting (NVVM deletes them
otherwise); loads and copies also clobber memory so that nothing moves across a
barrier. Pure value instructions (mma, cvt, ex2) stay pure.
"""
from llvmlite import ir
from numba import cuda, types
from numba.cuda import cgutils
from numba.cuda.extending import intrinsic
from numba.cuda.np.arrayobj import make_array, populate_array

__all__ = ["smem_view2d", "f32_as_u32", "u32_as_f32", "smem_addr", "global_addr",
           "ldmatrix_x4", "ldmatrix_x4_trans", "mma_f16", "mma_bf16", "pack_f16x2",
           "pack_bf16x2", "unpack_f16x2", "unpack_bf16x2", "ex2", "cp_async_16",
           "cp_async_16_or_zero", "cp_async_commit", "cp_async_wait", "shfl_xor",
           "st_shared_u32", "ld_shared_u32", "st_global_u32", "red_add_f32x2", "red_add_f32x4",
           "mma_tf32", "to_tf32", "to_tf32_rn", "ld_global_nc_v4_u32", "st_global_v4_u32"]

_i32 = ir.IntType(32)
_i64 = ir.IntType(64)
_f32 = ir.FloatType()


def _asm(builder, ret, args, text, constraints, side_effect=False):
    fnty = ir.FunctionType(ret, [a.type for a in args])
    return builder.call(ir.InlineAsm(fnty, text, constraints, side_effect=side_effect), args)


def _as_tuple(context, builder, sig, struct, n):
    return context.make_tuple(builder, sig.return_type,
                              [builder.extract_value(struct, i) for i in range(n)])


@intrinsic
def smem_view2d(typingctx, arr, offset, rows, cols):
    """A C-ordered ``(rows, cols)`` view of a 1-D array starting at element ``offset``.

    Dynamic shared memory is a single 1-D array in Numba; ``reshape`` on it calls a
    runtime helper through local memory, so the 2-D tile views are built here with
    compile-time shapes and strides instead. ``rows`` and ``cols`` must be
    compile-time integer constants.
    """
    if not (isinstance(arr, types.Array) and arr.ndim == 1
            and isinstance(offset, types.Integer)
            and isinstance(rows, types.IntegerLiteral)
            and isinstance(cols, types.IntegerLiteral)):
        return None
    n_rows, n_cols = rows.literal_value, cols.literal_value
    view_type = types.Array(arr.dtype, 2, "C")
    sig = view_type(arr, offset, rows, cols)

    def codegen(context, builder, sig, args):
        src = make_array(sig.args[0])(context, builder, args[0])
        start = context.cast(builder, args[1], sig.args[1], types.intp)
        intp = context.get_value_type(types.intp)
        itemsize = context.get_abi_sizeof(context.get_data_type(arr.dtype))
        out = make_array(view_type)(context, builder)
        populate_array(
            out,
            data=builder.gep(src.data, [start]),
            shape=[ir.Constant(intp, n_rows), ir.Constant(intp, n_cols)],
            strides=[ir.Constant(intp, n_cols * itemsize), ir.Constant(intp, itemsize)],
            itemsize=ir.Constant(intp, itemsize),
            meminfo=None,
        )
        return out._getvalue()

    return sig, codegen


@intrinsic
def f32_as_u32(typingctx, x):
    """The bits of a float32, as uint32 (no conversion)."""
    if not isinstance(x, types.Float):
        return None
    sig = types.uint32(types.float32)

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], _i32)

    return sig, codegen


@intrinsic
def u32_as_f32(typingctx, u):
    """The float32 whose bits are ``u`` (no conversion)."""
    if not isinstance(u, types.Integer):
        return None
    sig = types.float32(types.uint32)

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def smem_addr(typingctx, arr, idx):
    """32-bit shared-memory address of ``arr[idx]`` (``arr`` a 1-D shared array)."""
    if not (isinstance(arr, types.Array) and arr.ndim == 1 and isinstance(idx, types.Integer)):
        return None
    sig = types.uint32(arr, idx)

    def codegen(context, builder, sig, args):
        ary = make_array(sig.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, sig.args[0], ary,
                                       [context.cast(builder, args[1], sig.args[1], types.intp)])
        shared = builder.addrspacecast(ptr, ir.PointerType(ptr.type.pointee, 3))
        return builder.ptrtoint(shared, _i32)

    return sig, codegen


@intrinsic
def global_addr(typingctx, arr, i0, i1, i2, i3):
    """64-bit global address of ``arr[i0, i1, i2, i3]`` (any strides)."""
    if not (isinstance(arr, types.Array) and arr.ndim == 4
            and all(isinstance(i, types.Integer) for i in (i0, i1, i2, i3))):
        return None
    sig = types.uint64(arr, i0, i1, i2, i3)

    def codegen(context, builder, sig, args):
        ary = make_array(sig.args[0])(context, builder, args[0])
        idx = [context.cast(builder, a, t, types.intp) for a, t in zip(args[1:], sig.args[1:])]
        ptr = cgutils.get_item_pointer(context, builder, sig.args[0], ary, idx)
        glob = builder.addrspacecast(ptr, ir.PointerType(ptr.type.pointee, 1))
        return builder.ptrtoint(glob, _i64)

    return sig, codegen


def _make_ldmatrix(trans):
    text = ("ldmatrix.sync.aligned.m8n8.x4%s.shared.b16 {$0,$1,$2,$3}, [$4];"
            % (".trans" if trans else ""))

    @intrinsic
    def ldmatrix(typingctx, addr):
        sig = types.UniTuple(types.uint32, 4)(types.uint32)

        def codegen(context, builder, sig, args):
            st = _asm(builder, ir.LiteralStructType([_i32] * 4), [args[0]], text,
                      "=r,=r,=r,=r,r,~{memory}", side_effect=True)
            return _as_tuple(context, builder, sig, st, 4)

        return sig, codegen

    return ldmatrix


#: Four 8x8 b16 matrices from shared memory: lane l gives the address of row l & 7 of
#: matrix l >> 3; register m receives matrix m, row l >> 2, columns 2(l & 3), +1.
ldmatrix_x4 = _make_ldmatrix(False)
#: The same, transposed: register m holds (row 2(l & 3), col l >> 2) and the next row.
ldmatrix_x4_trans = _make_ldmatrix(True)


def _make_mma(ab, shape="m16n8k16"):
    text = (f"mma.sync.aligned.{shape}.row.col.f32.{ab}.{ab}.f32 "
            "{$0,$1,$2,$3}, {$4,$5,$6,$7}, {$8,$9}, {$10,$11,$12,$13};")

    @intrinsic
    def mma(typingctx, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        u, f = types.uint32, types.float32
        sig = types.UniTuple(f, 4)(u, u, u, u, u, u, f, f, f, f)

        def codegen(context, builder, sig, args):
            st = _asm(builder, ir.LiteralStructType([_f32] * 4), list(args), text,
                      "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f")
            return _as_tuple(context, builder, sig, st, 4)

        return sig, codegen

    return mma


#: D = A B + C for a 16x16 A, a 16x8 B and float32 C, D (layouts in the module doc).
mma_f16 = _make_mma("f16")
mma_bf16 = _make_mma("bf16")
#: D = A B + C for a 16x8 tf32 A, an 8x8 tf32 B and float32 C, D; the same call
#: signature as the 16-bit products (four A registers, two B registers).
mma_tf32 = _make_mma("tf32", "m16n8k8")


@intrinsic
def to_tf32(typingctx, x):
    """float32 rounded to tf32 (10 mantissa bits; to nearest, ties away from zero), as
    the bits of a float32 with the low 13 bits zero: an operand of ``mma_tf32``."""
    sig = types.uint32(types.float32)

    def codegen(context, builder, sig, args):
        return _asm(builder, _i32, [args[0]], "cvt.rna.tf32.f32 $0, $1;", "=r,f")

    return sig, codegen


@intrinsic
def to_tf32_rn(typingctx, x):
    """float32 rounded to tf32, to nearest with ties to even (sm_90 and later): one
    instruction (F2FP.TF32), where ``to_tf32``'s ties-away rounding is emulated in
    four (ptxas 13, sm_90). For the 3xTF32 split, whose rounding mode does not
    matter: 3xTF32 kernels at head dim 128 compiled to 8019 instructions per 960
    mma in the backward's main loop with ``to_tf32``, 4685 with this."""
    sig = types.uint32(types.float32)

    def codegen(context, builder, sig, args):
        return _asm(builder, _i32, [args[0]], "cvt.rn.tf32.f32 $0, $1;", "=r,f")

    return sig, codegen


def _make_pack(kind):
    # cvt puts its first source in the upper half, so pack(lo, hi) passes (hi, lo).
    text = "cvt.rn.%sx2.f32 $0, $2, $1;" % kind

    @intrinsic
    def pack(typingctx, lo, hi):
        sig = types.uint32(types.float32, types.float32)

        def codegen(context, builder, sig, args):
            return _asm(builder, _i32, list(args), text, "=r,f,f")

        return sig, codegen

    return pack


#: Two float32 rounded to nearest into one register, ``lo`` in the low 16 bits.
pack_f16x2 = _make_pack("f16")
pack_bf16x2 = _make_pack("bf16")


_UNPACK_SIG = types.UniTuple(types.float32, 2)(types.uint32)


@intrinsic
def unpack_f16x2(typingctx, u):
    """The two float16 halves of ``u`` as float32 ``(lo, hi)`` (exact)."""
    def codegen(context, builder, sig, args):
        struct = _asm(builder, ir.LiteralStructType([_f32, _f32]), [args[0]],
                      "{ .reg .f16 lo, hi; mov.b32 {lo, hi}, $2; "
                      "cvt.f32.f16 $0, lo; cvt.f32.f16 $1, hi; }", "=f,=f,r")
        return _as_tuple(context, builder, sig, struct, 2)

    return _UNPACK_SIG, codegen


@intrinsic
def unpack_bf16x2(typingctx, u):
    """The two bfloat16 halves of ``u`` as float32 ``(lo, hi)``: a bfloat16 is the upper
    half of a float32, so this is a shift and a mask."""
    def codegen(context, builder, sig, args):
        lo = builder.bitcast(builder.shl(args[0], ir.Constant(_i32, 16)), _f32)
        hi = builder.bitcast(builder.and_(args[0], ir.Constant(_i32, 0xFFFF0000)), _f32)
        return context.make_tuple(builder, sig.return_type, [lo, hi])

    return _UNPACK_SIG, codegen


@intrinsic
def ex2(typingctx, x):
    """2**x, hardware approximation (relative error about 2**-22; subnormals flush)."""
    sig = types.float32(types.float32)

    def codegen(context, builder, sig, args):
        return _asm(builder, _f32, [args[0]], "ex2.approx.ftz.f32 $0, $1;", "=f,f")

    return sig, codegen


@intrinsic
def cp_async_16(typingctx, dst, src, src_bytes):
    """Asynchronous 16-byte copy global -> shared, zero-filling past ``src_bytes``."""
    sig = types.void(types.uint32, types.uint64, types.uint32)

    def codegen(context, builder, sig, args):
        _asm(builder, ir.VoidType(), list(args),
             "cp.async.cg.shared.global [$0], [$1], 16, $2;", "r,l,r,~{memory}",
             side_effect=True)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def cp_async_16_or_zero(typingctx, dst, src, copy):
    """cp.async of 16 bytes global -> shared when ``copy`` is nonzero, else 16 zero
    bytes into ``dst`` with the source ignored (PTX's ignore-src operand: "the data
    from the source location src should be ignored completely"), so that src need
    not be a valid address then."""
    sig = types.void(types.uint32, types.uint64, types.uint32)

    def codegen(context, builder, sig, args):
        _asm(builder, ir.VoidType(), list(args),
             "{ .reg .pred p; setp.eq.u32 p, $2, 0;"
             " cp.async.cg.shared.global [$0], [$1], 16, p; }", "r,l,r,~{memory}",
             side_effect=True)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def cp_async_commit(typingctx):
    """Closes the group of cp.async issued by this thread since the last commit."""
    sig = types.void()

    def codegen(context, builder, sig, args):
        _asm(builder, ir.VoidType(), [], "cp.async.commit_group;", "~{memory}",
             side_effect=True)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def cp_async_wait(typingctx, n):
    """Waits until at most ``n`` (a compile-time constant) committed groups are pending."""
    if not isinstance(n, types.IntegerLiteral):
        return None
    sig = types.void(n)
    text = "cp.async.wait_group %d;" % n.literal_value

    def codegen(context, builder, sig, args):
        _asm(builder, ir.VoidType(), [], text, "~{memory}", side_effect=True)
        return context.get_dummy_value()

    return sig, codegen


@cuda.jit(device=True, forceinline=True)
def shfl_xor(value, lane_mask):
    """``value`` of lane ``lane ^ lane_mask`` (all 32 lanes take part)."""
    return cuda.shfl_xor_sync(0xFFFFFFFF, value, lane_mask)


@intrinsic
def st_shared_u32(typingctx, addr, value):
    """Stores a 32-bit value at a 32-bit shared-memory address."""
    sig = types.void(types.uint32, types.uint32)

    def codegen(context, builder, sig, args):
        _asm(builder, ir.VoidType(), list(args), "st.shared.u32 [$0], $1;", "r,r,~{memory}",
             side_effect=True)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def ld_shared_u32(typingctx, addr):
    """The 32-bit value at a 32-bit shared-memory address."""
    sig = types.uint32(types.uint32)

    def codegen(context, builder, sig, args):
        return _asm(builder, _i32, list(args), "ld.shared.u32 $0, [$1];", "=r,r,~{memory}",
                    side_effect=True)

    return sig, codegen


@intrinsic
def st_global_u32(typingctx, addr, value):
    """Stores a 32-bit value (two packed 16-bit elements) at the 4-byte aligned global
    address ``addr``. The kernels' epilogues form one address per row and reach each
    pair at a constant offset from it: Numba's element stores recomputed a 64-bit
    address per element, and each store then held its registers until it issued."""
    sig = types.void(types.uint64, types.uint32)

    def codegen(context, builder, sig, args):
        _asm(builder, ir.VoidType(), list(args), "st.global.u32 [$0], $1;", "l,r,~{memory}",
             side_effect=True)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def ld_global_nc_v4_u32(typingctx, addr):
    """Four 32-bit words from the 16-byte aligned global address ``addr``, by one
    16-byte load through the read-only path: the row kernels stream whole rows, and a
    16-byte load per lane keeps four times the bytes in flight of a 4-byte one. Only
    for memory that no thread of the running kernel writes."""
    sig = types.UniTuple(types.uint32, 4)(types.uint64)

    def codegen(context, builder, sig, args):
        st = _asm(builder, ir.LiteralStructType([_i32] * 4), list(args),
                  "ld.global.nc.v4.u32 {$0,$1,$2,$3}, [$4];", "=r,=r,=r,=r,l")
        return _as_tuple(context, builder, sig, st, 4)

    return sig, codegen


@intrinsic
def st_global_v4_u32(typingctx, addr, w0, w1, w2, w3):
    """Stores four 32-bit words at the 16-byte aligned global address ``addr``."""
    sig = types.void(types.uint64, types.uint32, types.uint32, types.uint32, types.uint32)

    def codegen(context, builder, sig, args):
        _asm(builder, ir.VoidType(), list(args), "st.global.v4.u32 [$0], {$1,$2,$3,$4};",
             "l,r,r,r,r,~{memory}", side_effect=True)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def red_add_f32x2(typingctx, addr, lo, hi):
    """Atomically adds (lo, hi) to the two float32 at the 8-byte aligned global
    address ``addr`` (sm_90, PTX ISA 8.1): one reduction per sector where two scalar
    atomics would each take one."""
    sig = types.void(types.uint64, types.float32, types.float32)

    def codegen(context, builder, sig, args):
        _asm(builder, ir.VoidType(), list(args), "red.global.add.v2.f32 [$0], {$1, $2};",
             "l,f,f", side_effect=True)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def red_add_f32x4(typingctx, addr, x0, x1, x2, x3):
    """Atomically adds (x0, x1, x2, x3) to the four float32 at the 16-byte aligned
    global address ``addr`` (sm_90, PTX ISA 8.1): a whole mma result fragment in one
    reduction, where ``red_add_f32x2`` takes two."""
    sig = types.void(types.uint64, types.float32, types.float32, types.float32, types.float32)

    def codegen(context, builder, sig, args):
        _asm(builder, ir.VoidType(), list(args),
             "red.global.add.v4.f32 [$0], {$1, $2, $3, $4};", "l,f,f,f,f", side_effect=True)
        return context.get_dummy_value()

    return sig, codegen
