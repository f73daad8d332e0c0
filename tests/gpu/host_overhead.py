"""Host time per call of nbflash, side by side with torch SDPA (GPU).

    python3 tests/gpu/host_overhead.py [--calls 2000] [--seqlen 128] [--headdim 64]
                                       [--dtype float16] [--no-profile]

At batch 1, 1 head (by default seqlen 128, head dim 64, float16) the kernels take a
few microseconds, so a call's cost is the host's: validation, configuration,
allocation and the launch. Each row times ``--calls`` calls with time.perf_counter,
in batches of 100 calls that are not synchronised (the GPU is synchronised between
batches, outside the clock, so that the launch queue never fills up); it prints the
median and the best batch per call. Rows: nbflash.attention (plain, return_lse),
nbflash.attention_backward, and when PyTorch with CUDA is importable, torch's
scaled_dot_product_attention with the flash backend on the same data (through
torch.from_dlpack), its ATen flash ops, and its autograd forward + backward. Then a
cProfile of ``--calls`` nbflash forward calls, top 20 by tottime.

The issue's target: nbflash's forward at most 30 us, and at most 1.5x torch SDPA's.
Without a GPU (or CuPy) it prints one line and exits 0. Under a minute, most of it
compiling the kernels when the Numba cache is cold.
"""
import argparse
import cProfile
import io
import pathlib
import pstats
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

BATCH = 100
TARGET_US, TARGET_RATIO = 30.0, 1.5


def gpu_or_reason():
    """None when CuPy sees a GPU, else why not (one line)."""
    try:
        import cupy
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001 - any failure means no usable GPU
        return f"{type(e).__name__}: {e}".splitlines()[0]
    return None if n > 0 else "no CUDA device"


def device_name(cupy):
    name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def per_call_us(fn, calls, sync):
    """(median, best) host microseconds per call over batches of BATCH calls."""
    per = []
    for _ in range(max(1, calls // BATCH)):
        sync()
        t0 = time.perf_counter()
        for _ in range(BATCH):
            fn()
        per.append((time.perf_counter() - t0) / BATCH * 1e6)
    sync()
    return statistics.median(per), min(per)


def torch_rows(q, k, v, do, causal, nb_out):
    """(name, fn) rows for torch SDPA on q, k, v, or [] with a note when unavailable."""
    try:
        import torch
        import torch.nn.functional as F
        if not torch.cuda.is_available():
            return [], "torch is installed but sees no GPU"
    except Exception as e:  # noqa: BLE001
        return [], f"torch not importable ({type(e).__name__}: {e})"
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        flash_only = sdpa_kernel(SDPBackend.FLASH_ATTENTION)
    except Exception:  # noqa: BLE001 - torch < 2.3
        flash_only = torch.backends.cuda.sdp_kernel(enable_flash=True, enable_math=False,
                                                    enable_mem_efficient=False)
    # SDPA takes (batch, heads, seqlen, headdim): the same memory seen transposed.
    tq, tk, tv, tdo = (torch.from_dlpack(x).transpose(1, 2) for x in (q, k, v, do))
    flash_only.__enter__()      # for the rest of the process: F.sdpa runs flash or fails
    rows = [("torch F.scaled_dot_product_attention (flash)",
             lambda: F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal))]
    ref = F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
    ref = ref.transpose(1, 2).float().cpu().numpy()
    diff = float(abs(ref - nb_out.get().astype("float32")).max())
    note = f"max |nbflash - torch| on out: {diff:.2e}"
    aten = torch.ops.aten
    try:
        fwd = aten._scaled_dot_product_flash_attention
        res = fwd(tq, tk, tv, 0.0, causal)
        out, lse, cq, ck, mq, mk, rng_state, unused = res[:8]
        bwd = aten._scaled_dot_product_flash_attention_backward
        bwd(tdo, tq, tk, tv, out, lse, cq, ck, mq, mk, 0.0, causal, rng_state, unused)
        rows += [("torch aten flash forward op", lambda: fwd(tq, tk, tv, 0.0, causal)),
                 ("torch aten flash backward op",
                  lambda: bwd(tdo, tq, tk, tv, out, lse, cq, ck, mq, mk, 0.0, causal,
                              rng_state, unused))]
    except Exception as e:  # noqa: BLE001 - private ops change between versions
        note += f"; aten flash ops skipped ({type(e).__name__}: {str(e)[:120]})"
    gq, gk, gv = (x.detach().clone().requires_grad_() for x in (tq, tk, tv))

    def autograd_step():
        F.scaled_dot_product_attention(gq, gk, gv, is_causal=causal).backward(tdo)

    rows.append(("torch SDPA forward + autograd backward", autograd_step))
    return rows, note


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--headdim", type=int, default=64)
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--warmup", type=int, default=50, help="untimed calls before each row")
    args = ap.parse_args(argv)

    reason = gpu_or_reason()
    if reason is not None:
        print(f"host_overhead: skipped, no GPU ({reason})")
        return 0

    import cupy
    import numpy as np
    t_start = time.perf_counter()
    import nbflash
    from nbflash import _launch, interface

    if args.dtype == "bfloat16":
        import ml_dtypes
        dt = ml_dtypes.bfloat16
    else:
        dt = np.dtype(args.dtype)
    rng = np.random.default_rng(0)
    shape = (1, args.seqlen, 1, args.headdim)
    q, k, v, do = (cupy.asarray(rng.standard_normal(shape).astype(dt)) for _ in range(4))
    causal = args.causal
    sync = cupy.cuda.Device().synchronize

    out, lse = nbflash.attention(q, k, v, causal=causal, return_lse=True)   # compiles
    nbflash.attention_backward(do, q, k, v, out, lse, causal=causal)
    sync()
    t_compiled = time.perf_counter()
    again = nbflash.attention(q, k, v, causal=causal)
    same = bool((again.view(np.uint16) == out.view(np.uint16)).all()) if out.itemsize == 2 \
        else bool((again == out).all())

    rows = [
        ("nbflash.attention", lambda: nbflash.attention(q, k, v, causal=causal)),
        ("nbflash.attention return_lse=True",
         lambda: nbflash.attention(q, k, v, causal=causal, return_lse=True)),
        ("nbflash.attention_backward",
         lambda: nbflash.attention_backward(do, q, k, v, out, lse, causal=causal)),
    ]

    def nb_both():
        o, m = nbflash.attention(q, k, v, causal=causal, return_lse=True)
        nbflash.attention_backward(do, q, k, v, o, m, causal=causal)

    rows.append(("nbflash forward + backward", nb_both))
    if args.dtype == "float32":
        t_rows, note = [], "torch's flash SDPA takes float16 or bfloat16 only"
    else:
        try:
            t_rows, note = torch_rows(q, k, v, do, causal, out)
        except Exception as e:  # noqa: BLE001 - the nbflash rows still count
            t_rows, note = [], f"torch rows skipped ({type(e).__name__}: {str(e)[:160]})"
    rows += t_rows

    print(f"host time per call, batch 1, 1 head, seqlen {args.seqlen}, headdim "
          f"{args.headdim}, {args.dtype}, causal={causal}; {args.calls} calls in batches "
          f"of {BATCH} without synchronising; device: {device_name(cupy)}")
    print(f"{'':46}{'median us':>11}{'best us':>10}")
    results = {}
    for name, fn in rows:
        for _ in range(args.warmup):
            fn()                  # allocator pools, torch's first calls
        med, best = per_call_us(fn, args.calls, sync)
        results[name] = med
        print(f"{name:46}{med:>11.1f}{best:>10.1f}")
    print(f"planned call equals the first call bitwise: {same}")
    if note:
        print(note)

    fwd = results["nbflash.attention"]
    torch_fwd = results.get("torch F.scaled_dot_product_attention (flash)")
    verdict = f"target: nbflash.attention <= {TARGET_US:.0f} us: " + \
        ("met" if fwd <= TARGET_US else "MISSED") + f" ({fwd:.1f} us)"
    if torch_fwd:
        ratio = fwd / torch_fwd
        verdict += f"; <= {TARGET_RATIO}x torch SDPA: " + \
            ("met" if ratio <= TARGET_RATIO else "MISSED") + f" ({ratio:.2f}x)"
    print(verdict)
    print(f"plans: {len(interface._plans)}, kernels: {len(_launch._kernels)}, streams: "
          f"{len(_launch._streams)}; compile + first calls {t_compiled - t_start:.1f} s")

    if not args.no_profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.calls):
            nbflash.attention(q, k, v, causal=causal)
        prof.disable()
        sync()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(20)
        print(f"\ncProfile of {args.calls} nbflash.attention calls, top 20 by tottime:")
        print(s.getvalue().strip())
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
