"""Compile every nbflash kernel for sm_90 on the CPU and report its resources.

Run as a script (``python tests/ptx_check.py``), never under the simulator: it
builds PTX with ``numba.cuda.compile_ptx`` and links it with nvJitLink, which needs
``numba-cuda[cu13]`` but no GPU or driver. Prints one JSON line per kernel:
name, registers, spill bytes, and which instructions the PTX holds.
"""
import json
import os
import re
import sys

os.environ["NUMBA_ENABLE_CUDASIM"] = "0"

import numba.cuda.dispatcher as _dispatcher  # noqa: E402


class _SM90:
    compute_capability = (9, 0)


# compile_ptx asks the (absent) current device for its compute capability when a
# kernel calls device functions; answer for it. Only ever done in this script.
_dispatcher.get_current_device = lambda: _SM90()

from numba import cuda  # noqa: E402


def link_log(ptx):
    from cuda.bindings import nvjitlink
    h = nvjitlink.create(2, ["-arch=sm_90", "-verbose"])
    data = ptx.encode()
    nvjitlink.add_data(h, nvjitlink.InputType.PTX, data, len(data), "kernel.ptx")
    nvjitlink.complete(h)
    buf = bytearray(nvjitlink.get_info_log_size(h))
    nvjitlink.get_info_log(h, buf)
    nvjitlink.destroy(h)
    return buf.decode(errors="replace")


def resources(log):
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_store_bytes": int(spills.group(1)) if spills else None,
            "spill_load_bytes": int(spills.group(2)) if spills else None,
            "stack_bytes": int(stack.group(1)) if stack else None}


def kernels():
    """(name, dispatcher, signature) for every kernel configuration nbflash selects."""
    from nbflash import config
    from nbflash._launch import array_type
    from nbflash.kernels.backward_mma import build_backward_mma
    from nbflash.kernels.forward_mma import build_forward_mma
    from numba import types
    f32 = types.float32
    for dtype in config.MMA_DTYPES:
        for bucket in config.HEAD_DIM_BUCKETS:
            for causal in (False, True):
                cfg = config.select_forward_mma(bucket, causal=causal)
                sig = ([array_type("uint16", 4)] * 3
                       + [array_type(config.STORAGE[dtype], 4), array_type("float32", 3), f32])
                yield (f"forward_mma {dtype} d{bucket} {'causal' if causal else 'full'} "
                       f"{cfg.block_m}x{cfg.block_n}x{cfg.warps}w",
                       build_forward_mma(cfg, dtype, causal), tuple(sig))
                store = config.STORAGE[dtype]
                sig = ([array_type("uint16", 4)] * 4 + [array_type("float32", 4)] * 2
                       + [array_type(store, 4)] * 2 + [f32, f32])
                bcfg = config.select_backward_mma(bucket)
                yield (f"backward_mma {dtype} d{bucket} {'causal' if causal else 'full'} "
                       f"{bcfg.block_m}x{bcfg.block_n}x{bcfg.warps}w",
                       build_backward_mma(bcfg, dtype, causal), tuple(sig))
    from nbflash.kernels.backward import build_convert, build_stats
    for dtype in config.MMA_DTYPES + ("float32",):
        tile = "float32" if dtype == "float32" else "uint16"
        tiled = dtype != "float32"      # the 16-bit accumulator is in fragment order
        yield (f"stats {dtype}", build_stats(dtype, tiled),
               tuple([array_type(tile, 4)] * 2 + [array_type("float32", 3)]
                     + [array_type("float32", 4)] * 2 + [f32]))
        yield (f"convert_wide {dtype}", build_convert(dtype, True, tiled),
               (array_type("float32", 4), array_type(config.STORAGE[dtype], 4)))
    for bucket in config.HEAD_DIM_BUCKETS:
        for causal in (False, True):
            sig = [array_type("float32", 4)] * 4 + [array_type("float32", 3), f32]
            for passes in (1, 3):
                cfg = config.select_forward_mma(bucket, causal=causal, tf32_passes=passes)
                yield (f"forward_mma float32 tf32x{passes} d{bucket} "
                       f"{'causal' if causal else 'full'} "
                       f"{cfg.block_m}x{cfg.block_n}x{cfg.warps}w",
                       build_forward_mma(cfg, "float32", causal, passes), tuple(sig))
                bcfg = config.select_backward_mma(bucket, tf32=True)
                if bcfg is None:
                    continue
                bsig = [array_type("float32", 4)] * 8 + [f32, f32]
                yield (f"backward_mma float32 tf32x{passes} d{bucket} "
                       f"{'causal' if causal else 'full'} "
                       f"{bcfg.block_m}x{bcfg.block_n}x{bcfg.warps}w",
                       build_backward_mma(bcfg, "float32", causal, False, passes), tuple(bsig))


def main(names=None):
    results = []
    for name, dispatcher, sig in kernels():
        if names and not any(n in name for n in names):
            continue
        ptx, _ = cuda.compile_ptx(dispatcher.py_func, sig, cc=(9, 0), lineinfo=False)
        info = {"kernel": name, **resources(link_log(ptx)),
                "mma_sync": ptx.count("mma.sync.aligned"), "ldmatrix": ptx.count("ldmatrix"),
                "cp_async": ptx.count("cp.async.cg"), "local_ld_st": len(re.findall(r"\b(ld|st)\.local", ptx))}
        print(json.dumps(info), flush=True)
        results.append(info)
    return results


def every_dispatcher():
    """Every kernel dispatcher nbflash can select: all dtypes, head-dim buckets,
    causal or not, deterministic or not, and the backward's row kernels."""
    from nbflash import config
    from nbflash.kernels.backward import build_backward, build_convert, build_preprocess, build_stats
    from nbflash.kernels.backward_mma import build_backward_mma
    from nbflash.kernels.forward import build_forward
    from nbflash.kernels.forward_mma import build_forward_mma
    for dt in ("float16", "bfloat16", "float32", "float64"):
        yield build_preprocess(dt)
        yield build_convert(dt)
        if dt in config.MMA_DTYPES or dt == "float32":
            tiled = dt != "float32"
            yield build_stats(dt, tiled)
            yield build_convert(dt, True, tiled)
            if tiled:
                yield build_convert(dt, False, True)
        for d in config.HEAD_DIM_BUCKETS:
            for causal in (False, True):
                if dt in config.MMA_DTYPES:
                    yield build_forward_mma(config.select_forward_mma(d, causal=causal), dt, causal)
                    for det in (False, True):
                        yield build_backward_mma(config.select_backward_mma(d), dt, causal, det)
                else:
                    if dt == "float32":
                        for passes in {1, config.FLOAT32_PASSES} - {0}:
                            cfg = config.select_forward_mma(d, causal=causal,
                                                            tf32_passes=passes)
                            yield build_forward_mma(cfg, dt, causal, passes)
                    if dt == "float64" or not config.FLOAT32_PASSES:
                        yield build_forward(config.select_forward(dt, d), dt, causal)
                    tf32_cfg = config.select_backward_mma(d, tf32=True) if dt == "float32" else None
                    for det in (False, True):
                        if tf32_cfg is None:
                            yield build_backward(config.select_backward(dt, d), dt, causal, det)
                            continue
                        for passes in {1, config.FLOAT32_PASSES}:
                            yield build_backward_mma(tf32_cfg, dt, causal, det, passes)


class _Codegen:
    """Stands in for the GPU's codegen: the (CUDA runtime, compute capability) pair."""
    def magic_tuple(self):
        return ((13, 0), (9, 0))


def cache_keys(compile_first=None):
    """{kernel name: hash of the key its disk-cache entry is saved and looked up
    under}. ``compile_first``: compile the kernels whose names contain it first,
    then take every key."""
    import hashlib
    import pickle
    dispatchers = list(every_dispatcher())
    for name, dispatcher, sig in kernels():
        if compile_first and compile_first in name:
            cuda.compile_ptx(dispatcher.py_func, sig, cc=(9, 0))
    keys = {}
    for dispatcher in dispatchers:
        name = dispatcher.py_func.__name__
        if name in keys:
            raise SystemExit(f"two kernels are named {name}")
        key = dispatcher._cache._index_key((), _Codegen())
        keys[name] = hashlib.sha256(pickle.dumps(key)).hexdigest()
    return keys


if __name__ == "__main__":
    if sys.argv[1:2] == ["--cache-keys"]:
        print(json.dumps(cache_keys(*sys.argv[2:3])))
    else:
        main(sys.argv[1:])
