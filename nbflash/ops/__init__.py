"""Low-level operations the kernels call, in one of two implementations.

On a GPU these are Numba ``@intrinsic`` functions that emit LLVM IR or inline PTX
(``_gpu.py``). Under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``), which
cannot run intrinsics, they are plain-Python twins with the same names, signatures
and results (``_sim.py``). Kernels only ever call ``ops.<name>``, so one kernel
source runs in both places. The choice is made once, at import time.
"""
from numba.cuda import config as _config

SIMULATOR = bool(_config.ENABLE_CUDASIM)

if SIMULATOR:
    from ._sim import *  # noqa: F401,F403
else:
    from ._gpu import *  # noqa: F401,F403


def jit_options(**options):
    """Keyword options for ``cuda.jit`` that the simulator does not accept.

    The simulator's ``cuda.jit`` rejects ``cache``, ``fastmath``, ``lineinfo`` and
    friends, so they are dropped there.
    """
    return {} if SIMULATOR else options
