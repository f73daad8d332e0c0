"""``python -m benchmarks backward``: the backward pass alone, per kernel configuration.

Times ``nbflash.attention_backward`` (its pre-pass, main kernel and dQ conversion)
with the tensor-core backward's table configuration (``config.BACKWARD_MMA_TILES``,
or ``BACKWARD_TF32_TILES`` for float32; labelled "table") and the alternatives in
``CANDIDATES`` (or given with ``--configs``), beside the backward of PyTorch's
FlashAttention-2 SDPA backend (its memory-efficient backend for float32;
``torch.autograd.grad`` of its output), in one process on the same inputs: the
measurement behind the tables' choices.

Shapes as in ``speed`` (batch x seqlen = 16384 tokens, hidden 2048). Each
configuration's outputs are checked as ``speed`` checks them (``speed.check_nbflash``)
before it is timed. TFLOP/s counts the backward's five products, 2.5 times
the forward's 4 b h s^2 d (halved when causal).
"""
import argparse
import contextlib
import os
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

from . import common, timing
from .peers import Problem, TorchPeer, torch_available
from .speed import HIDDEN, TOKENS, _reason, check_nbflash, input_sets, problem_flops

#: Alternatives to the table's configuration per head-dim bucket, as
#: (block_m, block_n, warps, sdp_warps_m, dkv_warps_n, dq_warps_m). Offline (sm_90,
#: nvJitLink): d64 64x128x8w no spill; d128 64x64x4w 112-128 bytes of spills, 64x128
#: with grids 2/2/2 128-152.
CANDIDATES = {
    64: [(64, 128, 8, 2, 4, 2), (64, 64, 4, 2, 2, 2)],
    128: [(64, 64, 4, 2, 2, 2), (64, 128, 8, 2, 2, 2)],
}
#: The same for float32 (3xTF32 by default, or ``--tf32``: one product), whose tiles
#: take twice the shared memory.
CANDIDATES_TF32 = {
    64: [(64, 64, 4, 2, 2, 2), (64, 64, 8, 2, 4, 2)],
    128: [(64, 64, 4, 2, 2, 2), (32, 64, 4, 2, 4, 2)],
}


def _tables(dtype_name):
    from nbflash import config
    return config.BACKWARD_TF32_TILES if dtype_name == "float32" else config.BACKWARD_MMA_TILES


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m benchmarks backward",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqlens", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--headdims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--tf32", action="store_true",
                    help="float32 with allow_tf32=True (one tf32 product per product)")
    ap.add_argument("--causal", nargs="+", choices=["false", "true"], default=["false", "true"])
    ap.add_argument("--configs", nargs="*", default=None, metavar="BM,BN,W,S,KV,Q",
                    help="alternatives for every head dim (default: CANDIDATES)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--budget", type=float, default=1.0, help="seconds per point and peer")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                    help="processes compiling the configurations before timing (a kernel "
                         "takes tens of seconds to compile; 0: compile on first use)")
    return ap.parse_args(argv)


def configurations(headdim, specs, dtype_name="float16"):
    """(label, configuration) for the table's choice and the alternatives."""
    from nbflash import config
    bucket = config.head_dim_bucket(headdim)
    table = _tables(dtype_name)[bucket]
    out = [("table", table)]
    candidates = CANDIDATES_TF32 if dtype_name == "float32" else CANDIDATES
    for spec in specs if specs is not None else candidates.get(bucket, []):
        bm, bn, w, s, kv, q = (int(x) for x in spec.split(",")) if isinstance(spec, str) else spec
        cfg = config.BackwardMmaConfig(bm, bn, bucket, w, s, kv, q, table.element_bytes)
        if cfg != table:
            out.append((f"{bm}x{bn}x{w}w_{s}{kv}{q}", cfg))
    return out


@contextlib.contextmanager
def selected(cfg):
    """attention_backward runs ``cfg`` for its head-dim bucket (and element size)
    while inside."""
    tables = _tables("float32" if cfg.element_bytes == 4 else "float16")
    saved = tables[cfg.head_dim]
    tables[cfg.head_dim] = cfg
    try:
        yield
    finally:
        tables[cfg.head_dim] = saved


def _compile_one(job):
    """Compiles (or loads) one configuration's backward kernels into the disk cache, in a
    fresh process, as ``nbflash.precompile`` does for the table's; returns
    ``(label, seconds)``."""
    from nbflash.precompile import compile_one
    label, cfg, dtype_name, causal, tf32 = job
    with selected(cfg):
        _, seconds = compile_one(("backward_tf32" if tf32 else "backward", dtype_name,
                                  cfg.head_dim, causal, False))
    return f"{label} d{cfg.head_dim} causal={causal}", seconds


def precompile(args):
    """Every configuration of the sweep compiled in ``args.jobs`` processes, so that the
    timed process loads them from the disk cache instead of compiling one at a time."""
    jobs = [(label, cfg, args.dtype, c == "true", args.tf32) for headdim in args.headdims
            for label, cfg in configurations(headdim, args.configs, args.dtype)
            for c in args.causal]
    start = time.perf_counter()
    with ProcessPoolExecutor(min(args.jobs, len(jobs)), mp_context=get_context("spawn")) as pool:
        for name, seconds in pool.map(_compile_one, jobs):
            print(f"compiled {name} in {seconds:.1f} s", flush=True)
    print(f"{len(jobs)} configurations compiled or loaded in {time.perf_counter() - start:.1f} s",
          flush=True)


def sweep(args, report=lambda row: None):
    """Rows of the sweep; ``report`` sees each row as soon as it is measured."""
    import nbflash
    rows = []
    for headdim in args.headdims:
        for seqlen in args.seqlens:
            for causal in (c == "true" for c in args.causal):
                p = Problem(TOKENS // seqlen, seqlen, HIDDEN // headdim, headdim, args.dtype,
                            causal)
                flops = problem_flops(p, "bwd")
                sets = input_sets(p)
                with_out = []
                for q, k, v, dout in sets:
                    out, lse = nbflash.attention(q, k, v, causal=causal, return_lse=True)
                    with_out.append((q, k, v, dout, out, lse))
                base = dict(headdim=headdim, seqlen=seqlen, causal=causal, dtype=args.dtype)

                def run(q, k, v, dout, out, lse):
                    return nbflash.attention_backward(dout, q, k, v, out, lse, causal=causal,
                                                      allow_tf32=args.tf32)

                for label, cfg in configurations(headdim, args.configs, args.dtype):
                    with selected(cfg):
                        try:
                            ok, errors = check_nbflash(p, *sets[0], ["fwd_bwd"])
                            t = (timing.time_calls(run, with_out, args.repeats, args.budget)
                                 if ok else None)
                        except Exception as e:          # a candidate that cannot run
                            rows.append({**base, "peer": label, "config": repr(cfg),
                                         "error": _reason(e)})
                            report(rows[-1])
                            continue
                    rows.append({**base, "peer": label, "config": repr(cfg), "ok": ok,
                                 "relative_error": errors, "ms": t and t.median_ms,
                                 "tflops": t and flops / t.median_ms / 1e9})
                    report(rows[-1])
                torch_name = "torch-efficient" if args.dtype == "float32" else "torch-flash"
                if torch_available():
                    peer = TorchPeer(p, torch_name)
                    with peer.context():
                        prepared = [peer.prepare(q, k, v, dout, True) for q, k, v, dout in sets]
                        outs = [(peer.forward(*x), x) for x in prepared]

                        def torch_run(out, x):
                            return peer.torch.autograd.grad(out, x[:3], x[3].transpose(1, 2),
                                                            retain_graph=True)

                        t = timing.time_calls(torch_run, outs, args.repeats, args.budget)
                    rows.append({**base, "peer": torch_name, "ms": t.median_ms,
                                 "tflops": flops / t.median_ms / 1e9})
                    report(rows[-1])
                del sets, with_out
                common.free_gpu_memory()
    return rows


def _failure(row):
    """Why a configuration's row has no time: the error, or its gradients' errors."""
    return row.get("error") or f"wrong: {row.get('relative_error')}"


def table(rows):
    """Markdown: TFLOP/s per configuration and point, with the ratio to torch flash."""
    torch_ms = {(r["headdim"], r["causal"], r["seqlen"]): r["ms"]
                for r in rows if r["peer"].startswith("torch-")}
    out = []
    for r in rows:
        key = (r["headdim"], r["causal"], r["seqlen"])
        if r.get("ms"):
            ratio = torch_ms[key] / r["ms"] if key in torch_ms else float("nan")
            cell = f"{r['tflops']:.0f} ({ratio:.2f}x)"
        else:
            cell = _failure(r)
        out.append([f"d{key[0]}", "causal" if key[1] else "full", str(key[2]), r["peer"], cell])
    return common.markdown_table(["head dim", "mask", "seqlen", "peer", "TFLOP/s (vs torch)"],
                                 out)


def main(argv=None):
    args = parse_args(argv)
    if common.exit_without_gpu("backward"):
        return 0
    if args.jobs > 0:
        precompile(args)

    def report(row):
        cell = (f"{row['ms']:.3f} ms, {row['tflops']:.0f} TFLOP/s" if row.get("ms")
                else _failure(row))
        print(f"  d{row['headdim']} {'causal' if row['causal'] else 'full'} s{row['seqlen']} "
              f"{row['peer']}: {cell}", flush=True)

    rows = sweep(args, report)
    print(table(rows))
    if args.json:
        print(f"wrote {common.write_json(args.json, {'config': vars(args), 'rows': rows})}")
    return 0
