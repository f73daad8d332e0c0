"""``python -m benchmarks resources``: registers, shared and local (spill) memory of
every compiled kernel configuration. Prints a markdown table and writes
``resources.json`` under ``benchmarks/results/<gpu-name>/``."""
import argparse
import itertools

import numpy as np

from . import common


def kernels(dtypes, head_dims):
    """Compiles every kernel a call can select for these dtypes and head dims (both
    masks, forward and backward); yields (key, nbflash Kernel)."""
    from nbflash import interface
    from nbflash._launch import _kernels
    import cupy
    from .peers import numpy_dtype
    rng = np.random.default_rng(0)
    combos = list(itertools.product(dtypes, head_dims, (False, True)))
    for dtype, head_dim, causal in common.progress(combos, "compiling"):
        shape = (1, 8, 1, head_dim)
        q, k, v, do = (cupy.asarray(rng.standard_normal(shape).astype(np.float32)).astype(
            numpy_dtype(dtype)) for _ in range(4))
        out, lse = interface.attention(q, k, v, causal=causal, return_lse=True)
        interface.attention_backward(do, q, k, v, out, lse, causal=causal)
    cupy.cuda.Device().synchronize()
    for key, kern in sorted(_kernels.items(), key=lambda kv: str(kv[0])):
        yield key[1], kern


def describe(key, kern):
    """One row: kernel kind, dtype, tile, causal and the compiled resources."""
    kind = key[0]
    cfg = next((x for x in key if hasattr(x, "block_m")), None)
    threads = getattr(cfg, "threads", None)
    return {"kernel": kind, "dtype": next(x for x in key if isinstance(x, str) and x != kind),
            "tile": (f"{cfg.block_m}, {cfg.block_n}, {cfg.head_dim}, {threads}" if cfg else "-"),
            # (kind, cfg, dtype, causal, ...): the backward's keys end with the
            # deterministic flag, the tensor-core forward's with its tf32 passes.
            "causal": key[3] if len(key) > 3 and isinstance(key[3], bool) else "-",
            **kern.resources()}


def main(argv=None):
    from nbflash import config
    ap = argparse.ArgumentParser(prog="python -m benchmarks resources",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", nargs="+", default=list(config.STORAGE))
    ap.add_argument("--head-dims", type=int, nargs="+", default=list(config.HEAD_DIM_BUCKETS))
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--out", help="results folder (default benchmarks/results/<gpu-name>)")
    args = ap.parse_args(argv)
    if common.exit_without_gpu("resources"):
        return []
    rows = [describe(key, kern) for key, kern in kernels(args.dtypes, args.head_dims)]
    print(common.markdown_table(
        ["kernel", "dtype", "tile (m, n, d, threads)", "causal", "registers", "local bytes",
         "dynamic shared bytes"],
        [[r["kernel"], r["dtype"], r["tile"], r["causal"], r["registers"], r["local_bytes"],
          r["dynamic_shared_bytes"]] for r in rows], left=4))
    payload = {"config": vars(args), "rows": rows}
    for path in filter(None, (common.results_dir(args.out) / "resources.json", args.json)):
        print(f"wrote {common.write_json(path, payload)}")
    return rows
