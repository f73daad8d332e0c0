"""nbflash: FlashAttention written in Python, as Numba CUDA kernels.

    out = nbflash.attention(q, k, v, causal=True)
    out, lse = nbflash.attention(q, k, v, return_lse=True)
    dq, dk, dv = nbflash.attention_backward(dout, q, k, v, out, lse)

q, k, v are CuPy arrays on a GPU, or NumPy arrays under Numba's CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``).
"""
__version__ = "0.1.0"
__all__ = ["attention", "attention_backward", "__version__"]


def __getattr__(name):
    # Imported on first use, so that ``import nbflash`` (and ``python -m nbflash`` on a
    # machine without a GPU) does not need CuPy or a CUDA driver.
    if name in ("attention", "attention_backward"):
        from . import interface
        return getattr(interface, name)
    raise AttributeError(f"module 'nbflash' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
