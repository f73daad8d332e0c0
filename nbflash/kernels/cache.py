"""Numba's on-disk kernel cache, keyed on what actually determines a kernel.

Numba keys a cached kernel on its signature, the GPU and a hash of the pickled
values its closure holds. For nbflash's kernels that last part is both unstable
and incomplete:

- unstable: a closure holds device functions and Numba types whose pickled form
  changes once they have been compiled (a Numba type caches its ``str``), so a
  kernel was saved under one key and looked up under another; the first kernel
  each new process asked for always missed and recompiled (tens of seconds);
- incomplete: device functions from other modules (``block_info``) pickle by
  reference, so editing them would not invalidate a cached kernel.

A kernel here is determined by its factory's arguments (tile configuration,
dtype, flags) and by the source of the modules it is built from; that is its key.
"""
import functools
import hashlib
import pathlib

from .. import ops

_PACKAGE = pathlib.Path(__file__).resolve().parents[1]
#: The modules kernels are built from; editing any of them invalidates the cache.
SOURCES = ("ops/*.py", "kernels/*.py", "block_info.py", "config.py")


def _source_hash():
    h = hashlib.sha256()
    for pattern in SOURCES:
        for path in sorted(_PACKAGE.glob(pattern)):
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()


SOURCE_HASH = _source_hash()


def keyed(dispatcher, key):
    """Makes ``dispatcher`` (a ``cuda.jit(cache=True)`` kernel) use the disk-cache key
    (signature, GPU, numba-cuda version, ``repr(key)``, kernel bytecode, source hash).
    ``key`` must hold every argument of the factory that built the kernel. Returns
    the dispatcher; without a GPU, or with a numba-cuda whose cache differs from
    0.30's, it is returned as it is.
    """
    if ops.SIMULATOR:
        return dispatcher
    try:
        from numba.cuda.dispatcher import CUDACache
    except ImportError:
        return dispatcher
    if not isinstance(getattr(dispatcher, "_cache", None), CUDACache):
        return dispatcher
    code = hashlib.sha256(dispatcher.py_func.__code__.co_code).hexdigest()
    dispatcher._cache = _keyed_cache_class()(dispatcher.py_func, (repr(key), code, SOURCE_HASH))
    return dispatcher


@functools.cache
def _keyed_cache_class():
    """A subclass of numba-cuda's ``CUDACache`` (private API, 0.30) with our key."""
    from numba.cuda.dispatcher import CUDACache

    class KeyedCache(CUDACache):
        def __init__(self, py_func, key):
            super().__init__(py_func)
            self._nbflash_key = key

        def _index_key(self, sig, codegen):
            import numba_cuda
            key = (sig, codegen.magic_tuple(), numba_cuda.__version__, self._nbflash_key)
            launch_config = getattr(self, "_launch_config_key", None)
            if launch_config is not None:
                key += (("launch_config", launch_config),)
            return key

    return KeyedCache
