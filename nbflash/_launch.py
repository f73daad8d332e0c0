"""Compiling kernels for given argument types and launching them.

On a GPU, a Numba dispatcher call with CuPy arrays costs 160-240 us of host time
(argument typing and DLPack export per array, every call). nbflash validates its
arguments itself, so it compiles each kernel once for explicit argument types and
launches the compiled function through ``cuda.core.launch`` with the arguments
flattened into Numba's kernel ABI: a few microseconds per launch.

``ArgTemplate`` goes one step further for callers that launch one kernel many times
with arrays of one layout (``interface.attention``'s launch plans): the flattened
arguments are computed once, and each launch fills in only the data pointers.

Under the simulator the dispatcher is simply called.
"""
import contextlib
import functools
import math
import os
import threading

try:
    import fcntl
except ImportError:     # Windows: no cross-process compile lock
    fcntl = None

import numpy as np
from numba import cuda, types

from . import ops
from .config import DEFAULT_SHARED_BYTES

_NUMBA_TYPES = {
    np.dtype(np.float16): types.float16, np.dtype(np.uint16): types.uint16,
    np.dtype(np.float32): types.float32, np.dtype(np.float64): types.float64,
    np.dtype(np.uint32): types.uint32, np.dtype(np.complex64): types.complex64,
}


def array_type(dtype, ndim):
    """The Numba type nbflash compiles array arguments as: any strides ('A' layout)."""
    return types.Array(_NUMBA_TYPES[np.dtype(dtype)], ndim, "A")


def scalar_type(value):
    return {np.float32: types.float32, np.float64: types.float64}[type(value)]


#: Launch configurations a Kernel keeps (one per grid and block it was launched with).
_MAX_CONFIGS = 1024


class Kernel:
    """One compiled kernel: ``kernel(grid, block, args)`` launches it on the current
    CuPy stream (GPU) or runs it in the simulator.

    ``args`` are arrays (CuPy on a GPU, NumPy in the simulator) and NumPy scalars,
    in the kernel's parameter order; their types must match ``signature``. On a GPU
    they may also come already flattened (``ArgTemplate.fill``).
    """

    def __init__(self, dispatcher, signature, shared_bytes):
        self.dispatcher = dispatcher
        self.shared_bytes = int(shared_bytes)
        if ops.SIMULATOR:
            return
        with _compile_lock(dispatcher):
            compiled = dispatcher.compile(tuple(signature))
        # Private numba-cuda API (0.30): the CUfunction of the compiled kernel.
        cufunc = compiled._codelibrary.get_cufunc()
        if self.shared_bytes > DEFAULT_SHARED_BYTES:
            _allow_dynamic_shared(cufunc, self.shared_bytes)
        self.compiled = compiled
        self._cukernel = cufunc.kernel
        from cuda.core import launch
        self._cuda_launch = launch
        self._configs = {}

    def __call__(self, grid, block, args):
        """Launches a ``grid`` (tuple) of blocks of ``block`` (tuple) threads."""
        if ops.SIMULATOR:
            # Wrapping the arrays makes the simulator use them in place: it would
            # otherwise copy each one, and it cannot copy non-contiguous views.
            from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
            args = [FakeCUDAArray(a) if isinstance(a, np.ndarray) else a for a in args]
            self.dispatcher[grid, block, 0, self.shared_bytes](*args)
            return
        flat = args if type(args) is Flattened else flatten(args)
        self._cuda_launch(_current_stream(), self._launch_config(grid, block),
                          self._cukernel, *flat)

    def _launch_config(self, grid, block):
        """The ``cuda.core.LaunchConfig`` for (grid, block), made once: one object serves
        any number of launches, from any thread."""
        config = self._configs.get((grid, block))
        if config is None:
            from cuda.core import LaunchConfig
            config = LaunchConfig(grid=grid, block=block, shmem_size=self.shared_bytes)
            if len(self._configs) >= _MAX_CONFIGS:
                self._configs.clear()
            self._configs[grid, block] = config
        return config

    def resources(self):
        """Registers and local (spill) bytes per thread, shared bytes per block."""
        c = self.compiled
        return {"registers": c.regs_per_thread, "local_bytes": c.local_mem_per_thread,
                "static_shared_bytes": c.shared_mem_per_block,
                "dynamic_shared_bytes": self.shared_bytes}


def _array_abi(size, itemsize, data, shape, strides):
    """Numba's ABI for one array argument: meminfo, parent, nitems, itemsize, data,
    shape..., strides (bytes)..."""
    return [0, 0, size, itemsize, data, *shape, *strides]


class Flattened(list):
    """Kernel arguments already in Numba's flattened ABI."""
    __slots__ = ()


def flatten(args):
    """``args`` (CuPy arrays and NumPy scalars) in Numba's flattened kernel ABI.

    A view of a 16-bit array as uint16 (how the kernels see float16 and bfloat16)
    flattens like the array itself: the ABI carries the itemsize, not the dtype.
    """
    flat = Flattened()
    for a in args:
        if isinstance(a, np.generic):
            flat.append(a)
        else:
            flat += _array_abi(a.size, a.itemsize, a.data.ptr, a.shape, a.strides)
    return flat


class ArraySpec:
    """What the kernel ABI needs of an array besides its data pointer."""
    __slots__ = ("shape", "strides", "itemsize")

    def __init__(self, shape, strides, itemsize):
        self.shape, self.strides, self.itemsize = tuple(shape), tuple(strides), itemsize

    @classmethod
    def of(cls, x):
        return cls(x.shape, x.strides, x.itemsize)

    @classmethod
    def contiguous(cls, shape, itemsize):
        """The spec of ``xp.empty(shape)``: C-contiguous. CuPy and NumPy agree on the
        strides when no dimension is 0, the only shapes this is used for."""
        strides, step = [], itemsize
        for n in reversed(shape):
            strides.append(step)
            step *= n
        return cls(shape, reversed(strides), itemsize)


class ArgTemplate:
    """A launch's arguments in Numba's flattened ABI with the arrays' data pointers
    left blank: ``fill(pointers)`` gives what ``flatten`` would give for arrays of
    these specs at those addresses, in a fraction of the time.

    ``args`` are ``ArraySpec`` for arrays and NumPy scalars (fixed values).
    """
    __slots__ = ("_flat", "_slots")

    def __init__(self, args):
        flat, slots = [], []
        for a in args:
            if isinstance(a, np.generic):
                flat.append(a)
            else:
                slots.append(len(flat) + 4)
                flat += _array_abi(math.prod(a.shape), a.itemsize, 0, a.shape, a.strides)
        self._flat, self._slots = flat, tuple(slots)

    def fill(self, pointers):
        """The flattened arguments with the arrays at ``pointers`` (one per array, in
        order); a new list each call, so concurrent launches do not share one."""
        if len(pointers) != len(self._slots):
            raise ValueError(f"{len(self._slots)} pointers needed, got {len(pointers)}")
        flat = Flattened(self._flat)
        for slot, pointer in zip(self._slots, pointers):
            flat[slot] = pointer
        return flat


@contextlib.contextmanager
def _compile_lock(dispatcher):
    """Holds an exclusive lock on the kernel's disk-cache index while it compiles
    (or loads) it, so that processes starting together on a cold cache (training
    ranks, test workers) do not interleave their index and data writes, which
    Numba's cache does not guard against. One lock per kernel name: different
    configurations still compile in parallel. Without ``fcntl``, or when the
    cache directory is not writable, no lock is taken.
    """
    # Private numba-cuda API (0.30): the dispatcher's CUDACache and its index path.
    cache_file = getattr(getattr(dispatcher, "_cache", None), "_cache_file", None)
    index = getattr(cache_file, "_index_path", None)
    handle = None
    if fcntl is not None and index is not None:
        try:
            os.makedirs(os.path.dirname(index), exist_ok=True)
            handle = open(index + ".lock", "a+b")
        except OSError:
            handle = None
    if handle is None:
        yield
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        handle.close()   # closing releases the lock


def _allow_dynamic_shared(cufunc, nbytes):
    from numba.cuda.cudadrv.driver import binding, driver
    attr = binding.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    driver.cuKernelSetAttribute(attr, nbytes, cufunc.handle, cufunc.device.id)


_streams = {}
_streams_lock = threading.Lock()


@functools.cache
def _cupy_api():
    """CuPy's current-stream and current-device functions, imported on first use."""
    import cupy
    return cupy.cuda.get_current_stream, cupy.cuda.runtime.getDevice


def _current_stream():
    """CuPy's current stream of this thread, as a ``cuda.core`` Stream."""
    ptr = _cupy_api()[0]().ptr
    stream = _streams.get(ptr)
    if stream is None:
        from cuda.core import Stream
        with _streams_lock:
            stream = _streams.setdefault(ptr, Stream.from_handle(ptr))
    return stream


def current_device_id():
    """The current CUDA device's ordinal, the number Numba gives it
    (``cuda.get_current_device().id``).

    Read from CuPy (cudaGetDevice, a fraction of a microsecond) when CuPy is there:
    Numba looks the device up through its context stack, several microseconds.
    """
    try:
        get_device = _cupy_api()[1]
    except ImportError:
        return cuda.get_current_device().id
    return get_device()


_kernels = {}
_kernels_lock = threading.Lock()


def get_kernel(key, build, signature, shared_bytes):
    """The ``Kernel`` for ``key`` on the current device, built on first use.

    ``build()`` returns the dispatcher. Thread-safe: concurrent first calls build once.
    """
    if not ops.SIMULATOR:
        key = (current_device_id(), key)
    kernel = _kernels.get(key)
    if kernel is None:
        with _kernels_lock:
            kernel = _kernels.get(key)
            if kernel is None:
                kernel = Kernel(build(), signature, shared_bytes)
                _kernels[key] = kernel
    return kernel
