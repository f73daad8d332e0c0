"""``python -m benchmarks resources``: registers, shared and local (spill) memory of
every compiled kernel configuration."""
import itertools

import numpy as np


def kernels():
    """Compiles every kernel a call can select; yields (label, nbflash Kernel)."""
    from nbflash import config, interface
    from nbflash._launch import _kernels
    import cupy
    rng = np.random.default_rng(0)
    for dtype, bucket, causal in itertools.product(config.STORAGE, config.HEAD_DIM_BUCKETS,
                                                   (False, True)):
        host_dtype = {"bfloat16": "bfloat16"}.get(dtype, dtype)
        import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy)
        shape = (1, 8, 1, bucket)
        q, k, v, do = (cupy.asarray(rng.standard_normal(shape).astype(np.float32)).astype(
            np.dtype(host_dtype)) for _ in range(4))
        out, lse = interface.attention(q, k, v, causal=causal, return_lse=True)
        interface.attention_backward(do, q, k, v, out, lse, causal=causal)
    cupy.cuda.Device().synchronize()
    for key, kern in sorted(_kernels.items(), key=lambda kv: str(kv[0])):
        yield key[1], kern


def main(argv=None):
    print("| kernel | dtype | tile (m, n, d, threads) | causal | registers | local bytes "
          "| dynamic shared bytes |")
    print("|---|---|---|---|---:|---:|---:|")
    for key, kern in kernels():
        r = kern.resources()
        kind = key[0]
        cfg = next((x for x in key if hasattr(x, "block_m")), None)
        tile = (f"{cfg.block_m}, {cfg.block_n}, {cfg.head_dim}, {cfg.threads}" if cfg else "-")
        dtype = next(x for x in key if isinstance(x, str) and x != kind)
        causal = key[-1] if isinstance(key[-1], bool) else "-"
        print(f"| {kind} | {dtype} | {tile} | {causal} | {r['registers']} | "
              f"{r['local_bytes']} | {r['dynamic_shared_bytes']} |")
