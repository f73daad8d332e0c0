"""Test set-up: pick the GPU or the CUDA simulator, hypothesis profiles, markers.

Without a CUDA driver the whole suite runs under Numba's CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``, set here before Numba is imported): the same kernel
source runs at tiny sizes on NumPy arrays. Tests marked ``gpu`` need a real GPU and
are skipped there; tests marked ``simulator`` run only under the simulator.
"""
import ctypes
import os
import sys

import pytest
from hypothesis import HealthCheck, settings


def _has_cuda_driver():
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


if os.environ.get("PYTEST_XDIST_WORKER"):
    # One BLAS thread per pytest-xdist worker: 16 workers each starting 16 OpenBLAS
    # threads made the GPU's long hypothesis run about 5x slower (the references are
    # NumPy matrix products). Effective when NumPy is not loaded yet; the README's
    # GPU command also sets these in the environment.
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

if "NUMBA_ENABLE_CUDASIM" not in os.environ and not _has_cuda_driver():
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
os.environ.setdefault("NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS", "0")
SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")

if SIMULATOR:
    # The simulator runs one OS thread per CUDA thread and they poll each other;
    # a short switch interval makes that several times faster.
    sys.setswitchinterval(5e-4)

_common = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture])
settings.register_profile("simulator", max_examples=5, **_common)
settings.register_profile("gpu", max_examples=300, **_common)
settings.register_profile("gpu-long", max_examples=2000, **_common)
settings.register_profile("dev", max_examples=20, **_common)
settings.load_profile(os.environ.get("NBFLASH_HYPOTHESIS_PROFILE",
                                     "simulator" if SIMULATOR else "gpu"))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped under the simulator)")
    config.addinivalue_line("markers", "simulator: runs only under the CUDA simulator")
    config.addinivalue_line("markers", "slow: long-running")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (running under the simulator)")
    skip_sim = pytest.mark.skip(reason="simulator-only test (a GPU is present)")
    for item in items:
        if SIMULATOR and "gpu" in item.keywords:
            item.add_marker(skip_gpu)
        if not SIMULATOR and "simulator" in item.keywords:
            item.add_marker(skip_sim)


@pytest.fixture
def poison(monkeypatch):
    """Makes every array nbflash allocates start as NaN, so unwritten elements show."""
    import numpy as np

    from nbflash import interface

    def empty_nan(shape, dtype):
        a = interface.xp.empty(shape, dtype)
        if np.issubdtype(np.dtype(dtype), np.integer):
            a.fill(0x7FC0)
        else:
            a.fill(np.nan)
        return a

    monkeypatch.setattr(interface, "_empty", empty_nan)
