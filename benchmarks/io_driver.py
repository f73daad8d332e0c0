"""Runs attention forwards for Nsight Compute to count their memory traffic.

    python -m benchmarks.io_driver --batch 4 --heads 16 --seqlen 4096 --headdim 128

runs exactly one nbflash forward, one naive CuPy forward and one PyTorch flash
forward (when torch can) at that shape; ``--jobs FILE`` runs a JSON list of jobs
instead (``{"impl", "batch", "nheads", "seqlen", "headdim", "dtype", "causal",
"block_m", "block_n"}``), which is how ``python -m benchmarks io`` profiles a whole
sweep in one ``ncu`` process.

Inputs are made and each job is warmed up (compiled) at a tiny size while the
profiler is off; each job then runs between ``cudaProfilerStart`` and
``cudaProfilerStop`` (profile with ``ncu --profile-from-start off``), right after an
empty marker kernel ``nbflash_io_mark_<i>``: the kernels of job ``i`` are the ones
between marker ``i`` and the next marker. ``--manifest FILE`` receives the jobs with
their status ('ok' or why the job did not run).

``block_m`` / ``block_n`` run nbflash with other tile sizes: this process replaces
the tile selectors of ``nbflash.config`` (nbflash's files are not touched).
"""
import argparse
import contextlib
import ctypes
import dataclasses
import json
import sys

MARK = "nbflash_io_mark_"
IMPLS = ("nbflash", "naive", "torch-flash")


@contextlib.contextmanager
def tile_sizes(dtype_name, block_m=None, block_n=None):
    """Inside the block, nbflash's forward uses ``block_m`` x ``block_n`` tiles: the
    selectors in ``nbflash.config`` return the usual configuration with those sizes."""
    from nbflash import config
    from nbflash.io_model import with_tiles
    if not (block_m or block_n):
        yield
        return
    names = [n for n in ("select_forward", "select_forward_mma") if hasattr(config, n)]
    saved = {n: getattr(config, n) for n in names}

    def retiled(select):
        return lambda *a, **kw: with_tiles(select(*a, **kw), dtype_name, block_m, block_n)

    try:
        for name in names:
            setattr(config, name, retiled(saved[name]))
        yield
    finally:
        for name, select in saved.items():
            setattr(config, name, select)


def profiler(on):
    """cudaProfilerStart / Stop, through CuPy or else the driver API."""
    import cupy
    try:
        (cupy.cuda.profiler.start if on else cupy.cuda.profiler.stop)()
    except AttributeError:
        lib = ctypes.CDLL("libcuda.so.1")
        (lib.cuProfilerStart if on else lib.cuProfilerStop)()


def markers(count):
    """``count`` empty kernels named ``nbflash_io_mark_<i>``, compiled together."""
    import cupy
    source = "\n".join(f'extern "C" __global__ void {MARK}{i}() {{}}' for i in range(count))
    module = cupy.RawModule(code=source)
    return [module.get_function(f"{MARK}{i}") for i in range(count)]


def problem_of(job, tiny=False):
    from .peers import Problem
    p = Problem(job["batch"], job["seqlen"], job["nheads"], job["headdim"],
                job.get("dtype", "float16"), job.get("causal", False))
    return dataclasses.replace(p, batch=1, nheads=1, seqlen=min(p.seqlen, 128)) if tiny else p


def runner(job, inputs):
    """A function running ``job``'s forward once on ``inputs`` (q, k, v, dout)."""
    import cupy

    import nbflash
    from nbflash._naive import naive_attention
    from .peers import TorchPeer
    q, k, v, _ = inputs
    causal = job.get("causal", False)
    if job["impl"] == "nbflash":
        def run():
            with tile_sizes(job.get("dtype", "float16"), job.get("block_m"), job.get("block_n")):
                return nbflash.attention(q, k, v, causal=causal, return_lse=True)
        return run
    if job["impl"] == "naive":
        return lambda: naive_attention(cupy, q, k, v, causal)
    peer = TorchPeer(problem_of(job), "torch-flash")
    args = peer.prepare(*inputs, grad=False)

    def run():
        with peer.context():
            return peer.forward(*args)
    return run


def run_jobs(jobs):
    """Runs each job once under the profiler, after its marker; returns the manifest."""
    import cupy

    from .common import free_gpu_memory
    from .peers import random_inputs
    marks = markers(len(jobs))
    manifest = []
    for i, job in enumerate(jobs):
        status = "ok"
        try:
            runner(job, random_inputs(problem_of(job, tiny=True), 0))()   # compile, load
            fn = runner(job, random_inputs(problem_of(job), 0))
            cupy.cuda.Device().synchronize()
            profiler(True)
            marks[i]((1,), (1,), ())
            result = fn()
            cupy.cuda.Device().synchronize()
            profiler(False)
            del result
        except Exception as e:  # out of memory, a tile size nbflash refuses, no torch ...
            profiler(False)
            status = f"{type(e).__name__}: {str(e).strip()[:200]}"
        free_gpu_memory()
        manifest.append({"index": i, "job": job, "status": status})
        print(f"io_driver: job {i} {job['impl']} s{job['seqlen']}: {status}", file=sys.stderr)
    return manifest


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.io_driver",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", help="JSON file with a list of jobs (overrides the shape options)")
    ap.add_argument("--manifest", help="write the jobs and their status here (JSON)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=4096)
    ap.add_argument("--headdim", type=int, default=128)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--block-m", type=int)
    ap.add_argument("--block-n", type=int)
    ap.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.jobs:
        with open(args.jobs) as f:
            jobs = json.load(f)
    else:
        shape = {"batch": args.batch, "nheads": args.heads, "seqlen": args.seqlen,
                 "headdim": args.headdim, "dtype": args.dtype, "causal": args.causal}
        tiles = {"block_m": args.block_m, "block_n": args.block_n}
        jobs = [{"impl": impl, **shape, **(tiles if impl == "nbflash" else {})}
                for impl in args.impls]
    manifest = run_jobs(jobs)
    text = json.dumps(manifest, indent=1)
    if args.manifest:
        with open(args.manifest, "w") as f:
            f.write(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
