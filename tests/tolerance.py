"""The accuracy rule, in one place.

For each output: max |nbflash - exact| <= 2 * max |naive - exact| + atol, where exact
is the float64 reference and naive is plain attention computed in the input dtype
(``reference.naive_attention``), as a user would write it.

atol covers what the naive baseline does not: a different, equally valid order of
summation. Summing n terms in another order moves the result by about sqrt(n) units
of the accumulator's rounding (float32, or float64 for float64 inputs) relative to
its magnitude; for float32 inputs the naive baseline is itself nearly exactly
rounded, so without this term the rule would demand bitwise agreement with one
particular order. atol = 4 * eps(accumulator) * sqrt(n) * max(1, max |exact|): for
float16/bfloat16 outputs it is about 1e-5, far below the inputs' own rounding.
"""
import math

import numpy as np

ACCUMULATOR_EPS = {"float16": np.finfo(np.float32).eps, "bfloat16": np.finfo(np.float32).eps,
                   "float32": np.finfo(np.float32).eps, "float64": np.finfo(np.float64).eps}


def to_numpy64(x):
    if hasattr(x, "get"):
        x = x.get()
    return np.asarray(x).astype(np.float64)


def atol(dtype_name, exact, n):
    scale = max(1.0, float(np.max(np.abs(exact[np.isfinite(exact)]), initial=0.0)))
    return 4 * ACCUMULATOR_EPS[dtype_name] * math.sqrt(max(n, 1)) * scale


def assert_accurate(name, got, exact, naive, dtype_name, n):
    """Checks one output against the rule; -inf must match -inf exactly (lse of rows
    that see no key), and every element must have been written (no NaN)."""
    got = to_numpy64(got)
    exact = np.asarray(exact, dtype=np.float64)
    naive = to_numpy64(naive)
    assert got.shape == exact.shape, f"{name}: shape {got.shape} != {exact.shape}"
    assert not np.isnan(got).any(), f"{name}: {np.isnan(got).sum()} NaN (unwritten or bad)"
    inf = np.isinf(exact)
    assert np.array_equal(got[inf], exact[inf]), f"{name}: infinities differ"
    assert np.isfinite(got[~inf]).all(), f"{name}: inf where exact is finite"
    err = float(np.max(np.abs(got[~inf] - exact[~inf]), initial=0.0))
    naive_err = float(np.max(np.abs(naive[~inf] - exact[~inf]), initial=0.0))
    bound = 2 * naive_err + atol(dtype_name, exact, n)
    assert err <= bound, (f"{name}: max error {err:.3g} > 2 * naive error {naive_err:.3g} "
                          f"+ atol {atol(dtype_name, exact, n):.3g}")
