"""Timing on the GPU: CUDA events around back-to-back calls, and host wall clock.

All work runs on the legacy default stream, which CuPy, nbflash (CuPy's current
stream) and torch (its default stream) share, so one pair of CUDA events brackets
any peer's call.
"""
import math
import statistics
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Timing:
    """Per-call GPU time of ``calls`` timed calls, in milliseconds."""
    median_ms: float
    min_ms: float
    max_ms: float
    calls: int


def input_sets_needed(set_bytes, l2_bytes, most=8):
    """How many input sets to rotate through so that the ones a call reads were last
    touched at least two L2-fulls ago (at least 2, at most ``most``)."""
    return max(2, min(most, math.ceil(2 * l2_bytes / max(set_bytes, 1)) + 1))


def calls_within(probe_ms, repeats, budget_s):
    """Timed calls to make: ``repeats``, fewer when they would take over ``budget_s``
    at ``probe_ms`` each, never fewer than one."""
    return max(1, min(repeats, int(budget_s * 1e3 / max(probe_ms, 1e-3))))


def event_times_ms(fn, arg_sets, calls):
    """Runs ``fn(*arg_sets[i % len(arg_sets)])`` for i < calls back to back, with a CUDA
    event recorded between calls; returns the milliseconds between events."""
    import cupy
    events = [cupy.cuda.Event() for _ in range(calls + 1)]
    events[0].record()
    for i, event in enumerate(events[1:]):
        fn(*arg_sets[i % len(arg_sets)])
        event.record()
    events[-1].synchronize()
    return [cupy.cuda.get_elapsed_time(a, b) for a, b in zip(events, events[1:])]


def time_calls(fn, arg_sets, repeats, budget_s, warmup=1):
    """GPU time per call of ``fn`` over rotating ``arg_sets``, after ``warmup`` calls
    (which also compile). One probe call sets how many of ``repeats`` fit ``budget_s``."""
    for i in range(warmup):
        fn(*arg_sets[i % len(arg_sets)])
    probe = event_times_ms(fn, arg_sets[-1:], 1)[0]
    times = event_times_ms(fn, arg_sets, calls_within(probe, repeats, budget_s))
    return Timing(statistics.median(times), min(times), max(times), len(times))


_SPIN_SOURCE = r"""
extern "C" __global__ void nbflash_spin(long long cycles) {
    long long start = clock64();
    while (clock64() - start < cycles) {}
}"""


def gpu_us_per_call(fn, calls, host_us, clock_ghz=2.0):
    """GPU microseconds per call of ``fn``, host cost excluded: a spinning kernel holds
    the GPU while the host queues ``calls`` calls (``host_us`` each) behind it, so the
    events around them see only the GPU's work."""
    import cupy
    import numpy as np
    spin = cupy.RawKernel(_SPIN_SOURCE, "nbflash_spin")
    spin_ms = max(20.0, 3 * calls * host_us / 1e3)
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    fn()
    cupy.cuda.Device().synchronize()
    spin((1,), (1,), (np.int64(spin_ms * 1e6 * clock_ghz),))
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return cupy.cuda.get_elapsed_time(start, end) * 1e3 / calls


def host_us_per_call(fn, calls, warmup=20):
    """Wall-clock microseconds per call over ``calls`` back-to-back calls and one final
    synchronisation: the host's launch cost when the GPU work per call is shorter."""
    import cupy
    for _ in range(warmup):
        fn()
    cupy.cuda.Device().synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    cupy.cuda.Device().synchronize()
    return (time.perf_counter() - start) / calls * 1e6
