"""``python -m benchmarks memory``: peak extra GPU memory, nbflash versus naive CuPy
attention, forward and forward + backward, versus seqlen (batch 1, 16 heads,
headdim 128, float16 by default, seqlen 1024 to 65536).

Extra memory is what a call allocates beyond its inputs: outputs, workspaces and (for
the naive version) the seqlen x seqlen score and probability matrices. It is read
from a fresh CuPy memory pool, which keeps every block it handed out until
``free_all_blocks``, so the pool's total after the call is the call's high-water mark.
Naive attention that runs out of memory is recorded as such, not crashed on, and
marked on the plot. Writes ``memory.json`` and ``memory.png`` under
``benchmarks/results/<gpu-name>/`` and prints a markdown table.
"""
import argparse

from . import common
from .peers import naive_forward_backward

GIB = common.GIB
SEQLENS = [1024, 2048, 4096, 8192, 16384, 32768, 65536]
CALLS = ("nbflash_fwd", "nbflash_fwd_bwd", "naive_fwd", "naive_fwd_bwd")


def _calls(q, k, v, do, causal):
    """(name, function) of each measured call, named as in ``CALLS``."""
    import cupy

    import nbflash
    from nbflash._naive import naive_attention

    def nbflash_fwd_bwd():
        out, lse = nbflash.attention(q, k, v, causal=causal, return_lse=True)
        return nbflash.attention_backward(do, q, k, v, out, lse, causal=causal)

    return [("nbflash_fwd", lambda: nbflash.attention(q, k, v, causal=causal)),
            ("nbflash_fwd_bwd", nbflash_fwd_bwd),
            ("naive_fwd", lambda: naive_attention(cupy, q, k, v, causal)),
            ("naive_fwd_bwd", lambda: naive_forward_backward(cupy, q, k, v, do, causal))]


def peak_extra_bytes(fn, inputs_bytes):
    """(peak extra bytes, None) or (None, 'out of memory')."""
    import cupy
    pool = cupy.get_default_memory_pool()
    cupy.cuda.Device().synchronize()
    pool.free_all_blocks()
    try:
        result = fn()
        cupy.cuda.Device().synchronize()
        peak = pool.total_bytes() - inputs_bytes
        del result
        return peak, None
    except cupy.cuda.memory.OutOfMemoryError:
        return None, "out of memory"
    finally:
        pool.free_all_blocks()


def run(seqlens, batch=1, heads=16, head_dim=128, dtype="float16", causal=False):
    """One row per seqlen: peak extra bytes (or 'out of memory') of each of ``CALLS``."""
    import cupy

    from .peers import Problem, random_inputs
    rows = []
    for n in common.progress(seqlens, "memory"):
        inputs = random_inputs(Problem(batch, n, heads, head_dim, dtype, causal), n)
        row = {"seqlen": n}
        for name, fn in _calls(*inputs, causal):
            peak, err = peak_extra_bytes(fn, sum(x.nbytes for x in inputs))
            row[name] = peak if err is None else err
        rows.append(row)
        del inputs
        cupy.get_default_memory_pool().free_all_blocks()
    return rows


def fmt(x):
    return f"{x / GIB:9.3f}" if isinstance(x, (int, float)) else f"{x:>9}"


def table(rows):
    return common.markdown_table(
        ["seqlen", "nbflash fwd", "nbflash fwd+bwd", "naive fwd", "naive fwd+bwd"],
        [[r["seqlen"]] + [fmt(r[c]).strip() for c in CALLS] for r in rows])


def plot(rows, path, label):
    """Memory versus seqlen (log-log), forward and forward + backward side by side;
    the first seqlen where naive attention ran out of memory is marked."""
    from .plots import facet_lines
    seqlens = [r["seqlen"] for r in rows]
    panels, vlines = [], []
    for suffix, title in (("fwd", "forward"), ("fwd_bwd", "forward + backward")):
        series = {impl: (seqlens, [r[f"{impl}_{suffix}"] / GIB
                                   if isinstance(r[f"{impl}_{suffix}"], (int, float)) else None
                                   for r in rows])
                  for impl in ("nbflash", "naive")}
        panels.append((title, series))
        oom = [r["seqlen"] for r in rows if r[f"naive_{suffix}"] == "out of memory"]
        vlines.append([(oom[0], "naive: out of memory")] if oom else [])
    return facet_lines(path, panels, title=f"peak extra GPU memory ({label})", xlabel="seqlen",
                       ylabel="GiB", logy=True, vlines=vlines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks memory",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqlens", type=int, nargs="+", default=SEQLENS)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--out", help="results folder (default benchmarks/results/<gpu-name>)")
    args = ap.parse_args(argv)
    if common.exit_without_gpu("memory"):
        return []
    rows = run(args.seqlens, args.batch, args.heads, args.head_dim, args.dtype, args.causal)
    label = (f"batch {args.batch}, {args.heads} heads, headdim {args.head_dim}, {args.dtype}"
             f"{', causal' if args.causal else ''}")
    print(f"peak extra GPU memory, GiB ({label})")
    print(table(rows))
    outdir = common.results_dir(args.out)
    payload = {"config": vars(args), "rows": rows}
    for path in filter(None, (outdir / "memory.json", args.json)):
        print(f"wrote {common.write_json(path, payload)}")
    print(f"wrote {plot(rows, outdir / 'memory.png', label)}")
    return rows
