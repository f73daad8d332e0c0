"""Argument checks for the public API.

Every check raises ``TypeError`` or ``ValueError`` naming the argument and the
expected form, before anything is allocated or launched. No numba, no cupy: the
array module is passed in.
"""
import math
import numbers

import numpy as np

from .config import MAX_HEAD_DIM, STORAGE

SUPPORTED_DTYPES = tuple(STORAGE)
#: CUDA limits grid dimensions y and z to 65535; heads and batch go there.
MAX_GRID_YZ = 65535


def dtype_name(dtype):
    return np.dtype(dtype).name


def check_array(name, x, array_type, expected_shape_text, on_gpu):
    """``x`` must be an array of the library's array type, with 4 dims for q/k/v."""
    if not isinstance(x, array_type):
        if on_gpu and isinstance(x, np.ndarray):
            raise TypeError(
                f"{name} is a NumPy array in host memory; nbflash runs on the GPU: "
                f"pass cupy.asarray({name})")
        kind = "cupy.ndarray" if on_gpu else "numpy.ndarray (CUDA simulator)"
        raise TypeError(f"{name} must be a {kind} of shape {expected_shape_text}, "
                        f"got {type(x).__module__}.{type(x).__name__}")


def check_dtype(name, x):
    if dtype_name(x.dtype) not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {x.dtype}; supported: "
                        f"{', '.join(SUPPORTED_DTYPES)}")


def check_ndim(name, x, ndim, shape_text):
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions {shape_text}, "
                         f"got shape {tuple(x.shape)}")


def check_same_device(arrays):
    devices = {name: getattr(x, "device", None) for name, x in arrays}
    ids = {name: getattr(d, "id", d) for name, d in devices.items()}
    if len(set(ids.values())) > 1:
        listing = ", ".join(f"{n} on device {i}" for n, i in ids.items())
        raise ValueError(f"all arrays must be on one GPU; got {listing}")


def check_qkv(q, k, v, array_type, on_gpu):
    """Checks q, k, v; returns (batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim)."""
    shapes = {"q": "(batch, seqlen_q, nheads, headdim)",
              "k": "(batch, seqlen_k, nheads_k, headdim)",
              "v": "(batch, seqlen_k, nheads_k, headdim)"}
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_array(name, x, array_type, shapes[name], on_gpu)
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_dtype(name, x)
        check_ndim(name, x, 4, shapes[name])
    if on_gpu:
        check_same_device((("q", q), ("k", k), ("v", v)))
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype; got q {q.dtype}, k {k.dtype}, "
                        f"v {v.dtype}")
    batch, seqlen_q, nheads, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape (batch, seqlen_k, nheads_k, "
                         f"headdim); got k {tuple(k.shape)}, v {tuple(v.shape)}")
    batch_k, seqlen_k, nheads_k, head_dim_k = k.shape
    if batch_k != batch:
        raise ValueError(f"k and v must have q's batch size {batch}; got {batch_k}")
    if head_dim_k != head_dim:
        raise ValueError(f"k and v must have q's headdim {head_dim}; got {head_dim_k}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"headdim (last axis of q, k, v) must be between 1 and "
                         f"{MAX_HEAD_DIM}; got {head_dim}")
    if nheads_k == 0 and nheads > 0:
        raise ValueError("k and v must have at least one head (nheads_k >= 1)")
    if nheads_k and nheads % nheads_k:
        raise ValueError(f"nheads of q ({nheads}) must be a multiple of nheads_k of k and v "
                         f"({nheads_k}) for grouped-query attention")
    if nheads > MAX_GRID_YZ or batch > MAX_GRID_YZ:
        raise ValueError(f"batch and nheads must each be at most {MAX_GRID_YZ}; got batch "
                         f"{batch}, nheads {nheads}")
    return batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim


def check_flag(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def softmax_scale_or_default(softmax_scale, head_dim, accumulator):
    """The scale as a float: ``1/sqrt(headdim)`` when None, else a finite positive number
    that stays finite and nonzero in the kernels' ``accumulator`` type."""
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(softmax_scale, (bool, np.bool_)) or not isinstance(softmax_scale, numbers.Real):
        raise TypeError(f"softmax_scale must be a real number or None, got {softmax_scale!r}")
    try:
        scale = float(softmax_scale)
    except OverflowError:
        scale = math.inf
    if not math.isfinite(scale) or scale <= 0.0:
        raise ValueError(f"softmax_scale must be finite and positive, got {softmax_scale!r}")
    # The kernels work with scale and scale * log2(e) in the accumulator type.
    with np.errstate(over="ignore", under="ignore"):
        in_acc = (accumulator(scale), accumulator(scale * math.log2(math.e)))
    if not all(np.isfinite(x) and x > 0 for x in in_acc):
        raise ValueError(f"softmax_scale {softmax_scale!r} is outside the range of "
                         f"{np.dtype(accumulator).name}, which the kernels compute in")
    return scale


def check_like(name, x, ref_name, ref, array_type, on_gpu):
    """``x`` (dout, out) must match ``ref`` (q) in shape and dtype."""
    check_array(name, x, array_type, f"{tuple(ref.shape)} like {ref_name}", on_gpu)
    if tuple(x.shape) != tuple(ref.shape):
        raise ValueError(f"{name} must have {ref_name}'s shape {tuple(ref.shape)}, "
                         f"got {tuple(x.shape)}")
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} must have {ref_name}'s dtype {ref.dtype}, got {x.dtype}")


def check_lse(lse, shape, dtype, array_type, on_gpu):
    check_array("lse", lse, array_type, f"{shape} (batch, nheads, seqlen_q)", on_gpu)
    if tuple(lse.shape) != tuple(shape):
        raise ValueError(f"lse must have shape (batch, nheads, seqlen_q) = {tuple(shape)}, "
                         f"got {tuple(lse.shape)}")
    if np.dtype(lse.dtype) != np.dtype(dtype):
        raise TypeError(f"lse must have dtype {np.dtype(dtype).name} (as attention returns "
                        f"it), got {lse.dtype}")
