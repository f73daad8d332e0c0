"""Simulator twins of ``_gpu.py``: same names, signatures and results, in NumPy."""
import numpy as np

__all__ = ["smem_view2d", "f32_as_u32", "u32_as_f32"]


def smem_view2d(arr, offset, rows, cols):
    flat = np.asarray(arr)
    return flat[offset:offset + rows * cols].reshape(rows, cols)


def f32_as_u32(x):
    return np.float32(x).view(np.uint32)


def u32_as_f32(u):
    return np.uint32(u).view(np.float32)
