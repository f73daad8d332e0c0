"""Compiling kernels for given argument types and launching them.

On a GPU, a Numba dispatcher call with CuPy arrays costs 160-240 us of host time
(argument typing and DLPack export per array, every call). nbflash validates its
arguments itself, so it compiles each kernel once for explicit argument types and
launches the compiled function through ``cuda.core.launch`` with the arguments
flattened into Numba's kernel ABI: a few microseconds per launch.

Under the simulator the dispatcher is simply called.
"""
import threading

import numpy as np
from numba import cuda, types

from . import ops
from .config import DEFAULT_SHARED_BYTES

_NUMBA_TYPES = {
    np.dtype(np.float16): types.float16, np.dtype(np.uint16): types.uint16,
    np.dtype(np.float32): types.float32, np.dtype(np.float64): types.float64,
}


def array_type(dtype, ndim):
    """The Numba type nbflash compiles array arguments as: any strides ('A' layout)."""
    return types.Array(_NUMBA_TYPES[np.dtype(dtype)], ndim, "A")


def scalar_type(value):
    return {np.float32: types.float32, np.float64: types.float64}[type(value)]


class Kernel:
    """One compiled kernel: ``kernel(grid, block, args)`` launches it on the current
    CuPy stream (GPU) or runs it in the simulator.

    ``args`` are arrays (CuPy on a GPU, NumPy in the simulator) and NumPy scalars,
    in the kernel's parameter order; their types must match ``signature``.
    """

    def __init__(self, dispatcher, signature, shared_bytes):
        self.dispatcher = dispatcher
        self.shared_bytes = int(shared_bytes)
        if ops.SIMULATOR:
            return
        compiled = dispatcher.compile(tuple(signature))
        # Private numba-cuda API (0.30): the CUfunction of the compiled kernel.
        cufunc = compiled._codelibrary.get_cufunc()
        if self.shared_bytes > DEFAULT_SHARED_BYTES:
            _allow_dynamic_shared(cufunc, self.shared_bytes)
        self.compiled = compiled
        self._cukernel = cufunc.kernel

    def __call__(self, grid, block, args):
        if ops.SIMULATOR:
            # Wrapping the arrays makes the simulator use them in place: it would
            # otherwise copy each one, and it cannot copy non-contiguous views.
            from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
            args = [FakeCUDAArray(a) if isinstance(a, np.ndarray) else a for a in args]
            self.dispatcher[grid, block, 0, self.shared_bytes](*args)
            return
        from cuda.core import LaunchConfig, launch
        flat = []
        for a in args:
            if isinstance(a, np.generic):
                flat.append(a)
            else:
                # Numba's ABI for an array: meminfo, parent, nitems, itemsize, data,
                # shape..., strides (bytes)...
                flat += [0, 0, a.size, a.itemsize, a.data.ptr, *a.shape, *a.strides]
        config = LaunchConfig(grid=grid, block=block, shmem_size=self.shared_bytes)
        launch(_current_stream(), config, self._cukernel, *flat)

    def resources(self):
        """Registers and local (spill) bytes per thread, shared bytes per block."""
        c = self.compiled
        return {"registers": c.regs_per_thread, "local_bytes": c.local_mem_per_thread,
                "static_shared_bytes": c.shared_mem_per_block,
                "dynamic_shared_bytes": self.shared_bytes}


def _allow_dynamic_shared(cufunc, nbytes):
    from numba.cuda.cudadrv.driver import binding, driver
    attr = binding.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    driver.cuKernelSetAttribute(attr, nbytes, cufunc.handle, cufunc.device.id)


_streams = {}
_streams_lock = threading.Lock()


def _current_stream():
    import cupy
    from cuda.core import Stream
    ptr = cupy.cuda.get_current_stream().ptr
    stream = _streams.get(ptr)
    if stream is None:
        with _streams_lock:
            stream = _streams.setdefault(ptr, Stream.from_handle(ptr))
    return stream


_kernels = {}
_kernels_lock = threading.Lock()


def get_kernel(key, build, signature, shared_bytes):
    """The ``Kernel`` for ``key`` on the current device, built on first use.

    ``build()`` returns the dispatcher. Thread-safe: concurrent first calls build once.
    """
    if not ops.SIMULATOR:
        key = (cuda.get_current_device().id, key)
    kernel = _kernels.get(key)
    if kernel is None:
        with _kernels_lock:
            kernel = _kernels.get(key)
            if kernel is None:
                kernel = Kernel(build(), signature, shared_bytes)
                _kernels[key] = kernel
    return kernel
