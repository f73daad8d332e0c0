"""GPU implementations of nbflash's low-level operations, as Numba intrinsics."""
from llvmlite import ir
from numba import types
from numba.cuda.extending import intrinsic
from numba.cuda.np.arrayobj import make_array, populate_array

__all__ = ["smem_view2d", "f32_as_u32", "u32_as_f32"]

_i32 = ir.IntType(32)


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
