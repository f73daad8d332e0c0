"""``python -m benchmarks speed``: nbflash against naive attention and PyTorch's SDPA.

The standard FlashAttention grid: batch * seqlen = 16384 tokens, hidden size 2048
(nheads = 2048 / headdim), seqlen 512 to 16384, headdim 64 and 128, causal and not,
float16 and bfloat16, forward and forward + backward. At each point every peer
(``benchmarks/peers.py``: nbflash, naive CuPy attention, each torch SDPA backend) runs
in this process on the same CuPy inputs, shared with torch through DLPack. A peer that
cannot run a point (a backend that refuses the shape, or out of memory) is recorded
with its reason.

Before timing a point, nbflash's outputs (out, and dq, dk, dv when the backward is
timed) are checked against attention computed in float32 on one batch element and two
kv heads; a point that fails is reported and not timed.

Timing: CUDA events around back-to-back calls after a warm-up call, median of up to
``--repeats`` calls (fewer when they would take over ``--budget`` seconds), inputs
rotated over enough sets that L2 (50 MB on an H100) never holds the next call's.
TFLOP/s counts 4 * batch * nheads * seqlen^2 * headdim for the forward (halved when
causal); the backward does 2.5 times that, forward + backward 3.5 times.

Host overhead: microseconds per forward call at batch 1, 1 head, seqlen 128, headdim
64 by wall clock over many back-to-back calls (then one synchronisation), next to each
peer's, and the GPU time per call measured with the host's cost hidden (calls queued
behind a spinning kernel). Wall time well above GPU time is the host's launch cost.

Writes ``speed.json`` and PNG plots under ``benchmarks/results/<gpu-name>/`` and
prints markdown tables.
"""
import argparse
import dataclasses
import itertools

from . import common, timing
from .peers import PEERS, Problem, make_peers, random_inputs, to_float32

HIDDEN = 2048
TOKENS = 16384
SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
PASSES = ("fwd", "fwd_bwd")
PASS_LABEL = {"fwd": "forward", "fwd_bwd": "forward + backward"}
#: Work of each timed pass relative to the forward: the backward's five matrix
#: products against the forward's two make it 2.5 times, forward + backward 3.5.
PASS_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}
#: Largest relative error (max |nbflash - reference| / max |reference|) accepted by
#: the check; a wrong kernel is off by O(1).
TOLERANCE = {"float16": 2e-2, "bfloat16": 6e-2, "float32": 1e-3, "float64": 1e-8}
L2_BYTES = 50 * 2**20
QUICK = {"seqlens": [512, 2048, 8192], "dtypes": ["float16"], "repeats": 5, "budget": 1.0,
         "overhead_calls": 300}


def attention_flops(batch, nheads, seqlen_q, seqlen_k, headdim, causal, which):
    """FLOPs of pass ``which`` ('fwd', 'bwd' or 'fwd_bwd'): 4 b h sq sk d for the
    forward's two matrix products, halved when causal, times ``PASS_FLOP_FACTOR``."""
    forward = 4 * batch * nheads * seqlen_q * seqlen_k * headdim
    return forward * (0.5 if causal else 1.0) * PASS_FLOP_FACTOR[which]


def problem_flops(problem, which):
    p = problem
    return attention_flops(p.batch, p.nheads, p.seqlen, p.seqlen, p.headdim, p.causal, which)


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m benchmarks speed",
                                 description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlens", type=int, nargs="+", default=list(SEQLENS))
    ap.add_argument("--headdims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    ap.add_argument("--causal", nargs="+", choices=["false", "true"], default=["false", "true"])
    ap.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES))
    ap.add_argument("--peers", nargs="+", choices=PEERS, default=list(PEERS),
                    help="nbflash is always timed")
    ap.add_argument("--tokens", type=int, default=TOKENS, help="batch * seqlen")
    ap.add_argument("--hidden", type=int, default=HIDDEN, help="nheads * headdim")
    ap.add_argument("--kv-heads", type=int, default=0,
                    help="kv heads (grouped-query attention); default: as many as query heads")
    ap.add_argument("--repeats", type=int, default=20, help="timed calls per point, at most")
    ap.add_argument("--budget", type=float, default=5.0,
                    help="seconds of timed calls per point and peer, at most")
    ap.add_argument("--overhead-calls", type=int, default=2000,
                    help="calls for the host-overhead measurement (0: skip it)")
    common.add_quick_option(ap, QUICK, "grid")
    ap.add_argument("--out", help="results folder (default benchmarks/results/<gpu-name>)")
    ap.add_argument("--merge", action="store_true",
                    help="add this run's points to the folder's speed.json (a point run "
                         "again replaces the old one), so a grid can be run in parts")
    args = common.apply_quick(ap, ap.parse_args(argv), QUICK)
    if "nbflash" not in args.peers:
        args.peers = ["nbflash", *args.peers]
    return args


def problems(args):
    """The grid, ordered so that points sharing inputs (causal or not) are adjacent."""
    out = []
    for dtype, headdim, seqlen in itertools.product(args.dtypes, args.headdims, args.seqlens):
        batch, nheads = max(1, args.tokens // seqlen), args.hidden // headdim
        for causal in args.causal:
            out.append(Problem(batch, seqlen, nheads, headdim, dtype, causal == "true",
                               args.kv_heads))
    return out


def check_nbflash(problem, q, k, v, dout, passes):
    """nbflash's outputs against float32 attention on batch 0 and the first two kv heads
    with their query heads; returns (ok, worst relative error per output)."""
    import cupy
    import numpy as np

    import nbflash
    from .peers import naive_forward_backward
    out, lse = nbflash.attention(q, k, v, causal=problem.causal, return_lse=True)
    got = {"out": out}
    if "fwd_bwd" in passes:
        got.update(zip(("dq", "dk", "dv"), nbflash.attention_backward(
            dout, q, k, v, out, lse, causal=problem.causal)))
    kv = min(2, problem.kv_heads)
    q_part = (slice(0, 1), slice(None), slice(0, kv * problem.nheads // problem.kv_heads))
    kv_part = (slice(0, 1), slice(None), slice(0, kv))
    part = {"out": q_part, "dq": q_part, "dk": kv_part, "dv": kv_part}
    ref = dict(zip(("out", "dq", "dk", "dv"), naive_forward_backward(
        cupy, *(to_float32(x[p]) for x, p in ((q, q_part), (k, kv_part), (v, kv_part),
                                             (dout, q_part))), problem.causal)))
    errors = {}
    for name, x in got.items():
        r = ref[name]
        errors[name] = float(abs(to_float32(x[part[name]]) - r).max() / abs(r).max())
    ok = all(np.isfinite(e) and e <= TOLERANCE[problem.dtype] for e in errors.values())
    return ok, errors


def measure(peer, problem, input_sets, which, args):
    """{'ms', 'tflops', 'calls', ...} for one peer and pass, or {'skipped': reason}."""
    try:
        with peer.context():
            prepared = [peer.prepare(*x, grad=which == "fwd_bwd") for x in input_sets]
            fn = peer.forward if which == "fwd" else peer.forward_backward
            t = timing.time_calls(fn, prepared, args.repeats, args.budget)
        result = {"ms": t.median_ms, "min_ms": t.min_ms, "max_ms": t.max_ms, "calls": t.calls,
                  "tflops": problem_flops(problem, which) / (t.median_ms * 1e-3) / 1e12}
    except Exception as e:  # a backend that refuses this point, out of memory, ...
        result = {"skipped": _reason(e)}
    # Outside the except block: the exception's frames, which may hold large arrays,
    # are gone, so their memory can be returned before the next peer runs.
    common.free_gpu_memory()
    return result


def _reason(exc):
    """First line of an exception, short enough for a table."""
    name = type(exc).__name__
    if "OutOfMemory" in name:
        return "out of memory"
    text = str(exc).strip().splitlines()
    return f"{name}: {text[0][:160] if text else ''}".strip()


def input_sets(problem):
    """Enough random input sets of ``problem`` to rotate through (see
    ``timing.input_sets_needed``)."""
    from nbflash.io_model import itemsize
    p = problem
    set_bytes = 2 * (p.batch * p.seqlen * (p.nheads + p.kv_heads) * p.headdim) * itemsize(p.dtype)
    return [random_inputs(p, seed)
            for seed in range(timing.input_sets_needed(set_bytes, L2_BYTES))]


def run_problem(problem, inputs, args):
    """Rows (one per pass) for one point of the grid, timed on ``inputs``."""
    rows = [{**dataclasses.asdict(problem), "nheads_k": problem.kv_heads, "pass": which,
             "flops": problem_flops(problem, which), "peers": {}, "speedup": {}}
            for which in args.passes]
    try:
        ok, errors = check_nbflash(problem, *inputs[0], args.passes)
    except Exception as e:
        ok, errors = False, {"error": _reason(e)}
    for row in rows:
        row["check"] = {"ok": ok, "relative_error": errors}
    if not ok:
        common.say(f"{problem.label()}: nbflash is wrong (relative errors {errors}); not timed")
        return rows
    peers, missing = make_peers(problem, args.peers)
    for row in rows:
        row["peers"].update({name: {"skipped": why} for name, why in missing.items()})
        for peer in peers:
            row["peers"][peer.name] = measure(peer, problem, inputs, row["pass"], args)
        nb = row["peers"]["nbflash"].get("ms")
        row["speedup"] = {name: r["ms"] / nb for name, r in row["peers"].items()
                          if name != "nbflash" and nb and "ms" in r}
    return rows


def sweep(args):
    """All rows of the grid; points that differ only in masking share their inputs."""
    rows = []
    grid = problems(args)
    bar = common.progress(None, "speed", total=len(grid))
    for _, group in itertools.groupby(grid, key=lambda p: dataclasses.replace(p, causal=False)):
        group = list(group)
        inputs = input_sets(group[0])
        for problem in group:
            bar.set_postfix_str(problem.label())
            rows += run_problem(problem, inputs, args)
            bar.update(1)
        del inputs
        common.free_gpu_memory()
    bar.close()
    return rows


def host_overhead(args):
    """Host and GPU microseconds per forward call at batch 1, 1 head, seqlen 128, hd 64."""
    from .timing import gpu_us_per_call, host_us_per_call
    problem = Problem(1, 128, 1, 64, "float16", False)
    inputs = random_inputs(problem, 0)
    peers, _ = make_peers(problem, args.peers)
    rows = []
    for peer in common.progress(peers, "host overhead"):
        try:
            with peer.context():
                prepared = peer.prepare(*inputs, grad=False)
                call = lambda: peer.forward(*prepared)  # noqa: E731
                host = host_us_per_call(call, args.overhead_calls)
                gpu = gpu_us_per_call(call, 20, host)
            rows.append({"peer": peer.name, "host_us": host, "gpu_us": gpu})
        except Exception as e:
            rows.append({"peer": peer.name, "skipped": _reason(e)})
    return rows


def _speed_cell(result):
    """'312.5 (1.23 ms)', a short reason for a skipped peer, or '-'."""
    if result is None:
        return "-"
    if "skipped" in result:
        reason = result["skipped"]
        return reason if len(reason) <= 24 else f"{reason.split(':')[0]} (see JSON)"
    return f"{result['tflops']:.1f} ({result['ms']:.3g} ms)"


def tables(rows, overhead):
    """Markdown: TFLOP/s per peer, speed-up of nbflash over each, host overhead."""
    out = []
    head = ["dtype", "headdim", "causal", "seqlen"]
    for which in [p for p in PASSES if any(r["pass"] == p for r in rows)]:
        sel = [r for r in rows if r["pass"] == which]
        peers = list(dict.fromkeys(p for r in sel for p in r["peers"])) or ["nbflash"]
        others = [p for p in peers if p != "nbflash"]
        key = [[r["dtype"], r["headdim"], r["causal"], r["seqlen"]] for r in sel]
        out.append(f"\n{PASS_LABEL[which]}: TFLOP/s (median time per call)")
        out.append(common.markdown_table(head + peers, [
            k + ([_speed_cell(r["peers"].get(p)) for p in peers] if r["check"]["ok"]
                 else ["nbflash output wrong, not timed"] + [""] * len(others))
            for k, r in zip(key, sel)], left=3))
        out.append(f"\n{PASS_LABEL[which]}: speed-up of nbflash (peer time / nbflash time)")
        out.append(common.markdown_table(head + others, [
            k + [f"{r['speedup'][p]:.2f}x" if p in r["speedup"] else "-" for p in others]
            for k, r in zip(key, sel)], left=3))
    if overhead:
        out.append("\nhost overhead per forward call (batch 1, 1 head, seqlen 128, headdim 64, "
                   "float16)")
        out.append(common.markdown_table(["peer", "wall us per call", "GPU us per call"], [
            [r["peer"], f"{r['host_us']:.1f}", f"{r['gpu_us']:.1f}"] if "host_us" in r
            else [r["peer"], r["skipped"], "-"] for r in overhead]))
    return "\n".join(out)


def plot(rows, outdir):
    """TFLOP/s and speed-up versus seqlen: one PNG per pass and dtype, one panel per
    (headdim, causal). Returns the paths written."""
    from .plots import facet_lines
    paths = []
    for which, dtype in sorted({(r["pass"], r["dtype"]) for r in rows}):
        sel = [r for r in rows if r["pass"] == which and r["dtype"] == dtype]
        keys = sorted({(r["headdim"], r["causal"]) for r in sel})
        tflops, speedup = [], []
        for hd, causal in keys:
            pts = sorted((r for r in sel if (r["headdim"], r["causal"]) == (hd, causal)),
                         key=lambda r: r["seqlen"])
            title = f"headdim {hd}{', causal' if causal else ''}"
            peers = list(dict.fromkeys(p for r in pts for p in r["peers"]))
            tflops.append((title, {p: ([r["seqlen"] for r in pts],
                                       [r["peers"].get(p, {}).get("tflops") for r in pts])
                                   for p in peers}))
            speedup.append((title, {f"vs {p}": ([r["seqlen"] for r in pts],
                                                [r.get("speedup", {}).get(p) for r in pts])
                                    for p in peers if p != "nbflash"}))
        name = f"{which}_{dtype}"
        paths.append(facet_lines(outdir / f"speed_tflops_{name}.png", tflops,
                                 title=f"{PASS_LABEL[which]}, {dtype}: TFLOP/s",
                                 xlabel="seqlen", ylabel="TFLOP/s", logy=True))
        paths.append(facet_lines(outdir / f"speed_speedup_{name}.png", speedup,
                                 title=f"{PASS_LABEL[which]}, {dtype}: nbflash speed-up "
                                       "(peer time / nbflash time)",
                                 xlabel="seqlen", ylabel="speed-up", logy=True, hline=1.0))
    return paths


def _point(row):
    return tuple(row[k] for k in ("dtype", "headdim", "causal", "seqlen", "batch", "nheads",
                                  "nheads_k", "pass"))


def merged(path, payload):
    """``payload`` with the rows of an earlier run's JSON at ``path`` (if any) that it
    does not measure again; the earlier runs' environments and configs are kept under
    ``earlier_runs``."""
    import json
    try:
        with open(path) as f:
            old = json.load(f)
    except FileNotFoundError:
        return payload
    new_points = {_point(r) for r in payload["rows"]}
    rows = [r for r in old.get("rows", []) if _point(r) not in new_points] + payload["rows"]
    earlier = old.pop("earlier_runs", []) + [
        {"environment": old.get("environment"), "config": old.get("config"),
         "points": len(old.get("rows", []))}]
    return {**payload, "rows": sorted(rows, key=_point),
            "host_overhead": payload["host_overhead"] or old.get("host_overhead", []),
            "earlier_runs": earlier}


def main(argv=None):
    args = parse_args(argv)
    if common.exit_without_gpu("speed"):
        return 0
    outdir = common.results_dir(args.out)
    rows = sweep(args)
    overhead = host_overhead(args) if args.overhead_calls else []
    payload = {"config": vars(args), "rows": rows, "host_overhead": overhead}
    if args.merge:
        payload = merged(outdir / "speed.json", payload)
        rows, overhead = payload["rows"], payload["host_overhead"]
    print(tables(rows, overhead))
    path = common.write_json(outdir / "speed.json", payload)
    print(f"\nwrote {path}")
    for p in plot(rows, outdir):
        print(f"wrote {p}")
    return 0
