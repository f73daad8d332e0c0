"""The program compute-sanitizer runs: nbflash forward + backward over a matrix of
configurations, in one process (kernels compile once per process).

    compute-sanitizer --tool memcheck --error-exitcode 1 \
        python3 tests/gpu/sanitize_cases.py --tool memcheck [--shard 0/2]

``tests/gpu/sanitize.py`` runs it for every tool and summarises. The matrix
(``--list`` prints it) covers every dtype (float16, bfloat16, float32, float64),
head dims 1, 17, 32, 64, 80, 96, 128, 256, causal and not, GQA and MQA,
seqlen_q != seqlen_k, seqlens 1, 37, 129, 130 (no multiple of any tile), rows that
see no key, strided layouts, and the deterministic backward; batch 1, at most 4
heads. memcheck gets the most cases, synccheck and initcheck one shape per (dtype,
head dim, causal), racecheck (the slowest) one shape per kernel family (tensor-core,
SIMT float32, SIMT float64), head-dim bucket and causal, plus the deterministic
backward per family.

For each case every output is checked: written in full (nbflash's allocations are
poisoned with NaN first, as the tests' ``poison`` fixture does; not under initcheck,
where the poison would hide reads of unwritten memory and where reading the outputs
back flags any element the kernels did not write), and accurate against the
float64 reference by the rule of ``tests/tolerance.py``. CuPy's memory pool is
turned off so that each array is its own allocation and memcheck sees
out-of-bounds accesses between arrays.

Prints ``CASE i name`` before and ``RESULT i ok|FAIL ...`` after each case; the exit
status is 1 if any case failed. ``--smoke`` shrinks the matrix to run under the
CUDA simulator (a check of this script, not of the kernels' memory safety).
"""
import argparse
import itertools
import os
import pathlib
import sys
import time
import traceback
import zlib
from dataclasses import dataclass

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")
DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64")
HEAD_DIMS = (1, 17, 32, 64, 80, 96, 128, 256)
SHAPES = (  # (seqlen_q, seqlen_k, nheads, nheads_k)
    (1, 129, 2, 1),      # one query row, MQA
    (37, 129, 4, 2),     # seqlen_q < seqlen_k, GQA
    (129, 37, 2, 1),     # seqlen_q > seqlen_k: with causal, 92 rows see no key
    (130, 130, 1, 1),
    (37, 1, 4, 4),       # one key: with causal, 36 rows see no key
)
LAYOUTS = ("contiguous", "padded", "heads_major")


@dataclass(frozen=True)
class Case:
    dtype: str
    head_dim: int
    causal: bool
    seqlen_q: int
    seqlen_k: int
    nheads: int
    nheads_k: int
    layout: str
    deterministic: bool = False     # attention_backward(deterministic=...)
    allow_tf32: bool = False        # attention(allow_tf32=...), float32 only

    @property
    def name(self):
        return (f"{self.dtype}-d{self.head_dim}-{'causal' if self.causal else 'full'}-"
                f"q{self.seqlen_q}-k{self.seqlen_k}-h{self.nheads}/{self.nheads_k}-"
                f"{self.layout}" + ("-det" if self.deterministic else "")
                + ("-tf32" if self.allow_tf32 else ""))


def matrix(tool):
    """The cases for ``tool`` (``none``: one case per kernel configuration)."""
    combos = list(itertools.product(DTYPE_NAMES, HEAD_DIMS, (False, True)))
    cases = []
    if tool == "memcheck":
        for c, (dt, hd, causal) in enumerate(combos):
            # The second shape of each combination runs the deterministic backward.
            for s, det in ((c % len(SHAPES), False), ((c + 2) % len(SHAPES), True)):
                cases.append(Case(dt, hd, causal, *SHAPES[s], LAYOUTS[(c + s) % 3], det))
            if dt == "float32":     # the forward's allow_tf32 kernel
                s = (c + 1) % len(SHAPES)
                cases.append(Case(dt, hd, causal, *SHAPES[s], LAYOUTS[s % 3],
                                  allow_tf32=True))
    elif tool in ("synccheck", "initcheck", "none"):
        shift = 1 if tool == "initcheck" else 0
        for c, (dt, hd, causal) in enumerate(combos):
            cases.append(Case(dt, hd, causal, *SHAPES[(c + shift) % len(SHAPES)],
                              LAYOUTS[c % 3], deterministic=c % 2 == 1))
    elif tool == "racecheck":
        # Shared-memory hazards depend on the kernel and its tile configuration:
        # tensor cores for float16/bfloat16 (bfloat16 differs only in conversions),
        # SIMT with 4-byte (float32) or 8-byte (float64) accumulators; per head-dim
        # bucket (32, 64, 128, 256) and causal. Two query tiles, several partial key
        # tiles.
        for dt, hd, causal in itertools.product(("float16", "float32", "float64"),
                                                (17, 64, 96, 256), (False, True)):
            cases.append(Case(dt, hd, causal, 70, 129, 2, 1, "contiguous"))
            if dt == "float32":
                cases.append(Case(dt, hd, causal, 70, 129, 2, 1, "contiguous",
                                  allow_tf32=True))
        for causal in (False, True):
            cases.append(Case("bfloat16", 32, causal, 70, 129, 2, 1, "contiguous"))
        # The deterministic backward: its own dQ schedule, per kernel family.
        for dt, causal in itertools.product(("float16", "float32", "float64"), (False, True)):
            cases.append(Case(dt, 64, causal, 70, 129, 2, 1, "contiguous", True))
    else:
        raise ValueError(f"unknown tool {tool!r}")
    return cases


def shard(cases, index, count):
    """Cases of one shard: whole (dtype, causal, head dim) groups, so that each
    process compiles about 1/count of the kernels."""
    groups = sorted({(c.dtype, c.causal, c.head_dim) for c in cases})
    mine = {g for i, g in enumerate(groups) if i % count == index}
    return [c for c in cases if (c.dtype, c.causal, c.head_dim) in mine]


def smoke(cases):
    """The same cases shrunk for the simulator (and deduplicated)."""
    small = []
    for c in cases:
        s = Case(c.dtype, min(c.head_dim, 16), c.causal, min(c.seqlen_q, 20),
                 min(c.seqlen_k, 19), min(c.nheads, 2), min(c.nheads_k, 2), c.layout,
                 c.deterministic, c.allow_tf32)
        if s.nheads % s.nheads_k:
            s = Case(*[getattr(s, f) for f in ("dtype", "head_dim", "causal", "seqlen_q",
                                               "seqlen_k", "nheads")], 1, s.layout,
                     s.deterministic, s.allow_tf32)
        if s not in small:
            small.append(s)
    return small


class Runner:
    def __init__(self, poison):
        import numpy as np

        from nbflash import interface
        self.np = np
        self.interface = interface
        self.xp = interface.xp
        if interface.ON_GPU:
            import cupy
            cupy.cuda.set_allocator(None)   # each array its own cudaMalloc
        if poison:
            xp = self.xp

            def empty_nan(shape, dtype):
                a = xp.empty(shape, dtype)
                if np.issubdtype(np.dtype(dtype), np.integer):
                    a.fill(0x7FC0)
                else:
                    a.fill(np.nan)
                return a

            interface._empty = empty_nan

    def nan_count(self, x):
        xp, np = self.xp, self.np
        if x.dtype.name == "bfloat16":
            u = x.view(np.uint16)
            return int(xp.count_nonzero((u & 0x7FFF) > 0x7F80))
        return int(xp.count_nonzero(xp.isnan(x)))

    def run(self, case):
        """Returns a list of problems (empty when the case passed)."""
        import nbflash
        import reference
        from strategies import DTYPES, _layout
        from tolerance import assert_accurate, max_abs_logit, to_numpy64
        np, xp = self.np, self.xp
        rng = np.random.default_rng(zlib.crc32(case.name.encode()))
        dt = DTYPES[case.dtype]
        q = rng.standard_normal((1, case.seqlen_q, case.nheads, case.head_dim)).astype(dt)
        k = rng.standard_normal((1, case.seqlen_k, case.nheads_k, case.head_dim)).astype(dt)
        v = rng.standard_normal(k.shape).astype(dt)
        do = rng.standard_normal(q.shape).astype(dt)
        dq_, dk_, dv_ = (_layout(x, xp, case.layout, rng) for x in (q, k, v))
        ddo = xp.asarray(do)
        out, lse = nbflash.attention(dq_, dk_, dv_, causal=case.causal, return_lse=True,
                                     allow_tf32=case.allow_tf32)
        grads = nbflash.attention_backward(ddo, dq_, dk_, dv_, out, lse, causal=case.causal,
                                           deterministic=case.deterministic)
        if self.interface.ON_GPU:
            import cupy
            cupy.cuda.Device().synchronize()
        got = (out, lse) + tuple(grads)
        names = ("out", "lse", "dq", "dk", "dv")
        problems = [f"{n}: {c} unwritten (NaN)" for n, c in
                    ((n, self.nan_count(g)) for n, g in zip(names, got)) if c]
        if problems:
            return problems
        exact = reference.attention(q, k, v, causal=case.causal) + \
            reference.attention_backward(do, q, k, v, causal=case.causal,
                                         out=to_numpy64(out), lse=to_numpy64(lse))
        naive = reference.naive_attention(q, k, v, causal=case.causal,
                                          tf32=case.allow_tf32) + \
            reference.naive_attention_backward(do, q, k, v, causal=case.causal)
        logit = max_abs_logit(q, k, None)
        n_fwd = max(case.seqlen_k, case.head_dim)
        n_bwd = max(case.seqlen_q * (case.nheads // case.nheads_k), case.seqlen_k,
                    case.head_dim)
        for name, g, e, nv, n in zip(names, got, exact, naive,
                                     (n_fwd, n_fwd, n_bwd, n_bwd, n_bwd)):
            try:
                assert_accurate(name, g, e, nv, case.dtype, n, logit)
            except AssertionError as err:
                problems.append(f"inaccurate {err}")
        return problems


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tool", required=True, choices=TOOLS + ("none",),
                    help="whose matrix to run (none: one case per kernel configuration)")
    ap.add_argument("--shard", default="0/1", help="i/n: run the i-th of n shards")
    ap.add_argument("--filter", default="", help="only cases whose name contains this")
    ap.add_argument("--max-cases", type=int, default=0)
    ap.add_argument("--list", action="store_true", help="print the cases and exit")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, for the simulator")
    args = ap.parse_args(argv)

    if args.smoke:
        os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
        sys.setswitchinterval(5e-4)
    index, count = (int(x) for x in args.shard.split("/"))
    # Filter first, so that the shards split the cases the filter leaves.
    cases = shard([c for c in matrix(args.tool) if args.filter in c.name], index, count)
    if args.smoke:
        cases = smoke(cases)
    if args.max_cases:
        cases = cases[:args.max_cases]
    if args.list:
        for i, c in enumerate(cases):
            print(i, c.name)
        return 0

    import warnings
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    runner = Runner(poison=args.tool != "initcheck")
    print(f"sanitize_cases: tool {args.tool}, shard {args.shard}, {len(cases)} cases",
          flush=True)
    failed = 0
    t_start = time.perf_counter()
    for i, case in enumerate(cases):
        print(f"CASE {i} {case.name}", flush=True)
        t0 = time.perf_counter()
        try:
            problems = runner.run(case)
        except Exception:   # noqa: BLE001 -- keep going: report every case
            problems = ["exception: " + traceback.format_exc().strip().splitlines()[-1]]
            traceback.print_exc()
        dt = time.perf_counter() - t0
        if problems:
            failed += 1
            print(f"RESULT {i} FAIL {dt:.2f}s {case.name}: {'; '.join(problems)}", flush=True)
        else:
            print(f"RESULT {i} ok {dt:.2f}s {case.name}", flush=True)
    print(f"sanitize_cases: {len(cases) - failed} of {len(cases)} cases passed in "
          f"{time.perf_counter() - t_start:.1f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
