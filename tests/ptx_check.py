"""Compile every nbflash kernel for sm_90 on the CPU and report its resources.

Run as a script (``python tests/ptx_check.py``), never under the simulator: it
builds PTX with ``numba.cuda.compile_ptx`` and links it with nvJitLink, which needs
``numba-cuda[cu13]`` but no GPU or driver. Prints one JSON line per kernel:
name, registers, spill bytes, and which instructions the PTX holds; with nvdisasm at
hand (the ``nvidia-cuda-nvdisasm`` wheel of the ``ptx`` extra, or on PATH) also the
machine code's (SASS) tensor-core, ldmatrix, async-copy and local-memory instructions.

``python tests/ptx_check.py --sass "backward_mma float16 d128 full"`` prints the
SASS instruction mix of the first kernel whose name holds the text, per line of the
kernel source (with line info: device functions count at their call's line), and
writes the SASS beside it to ``/tmp/nbflash-sass/``. Static counts: code in a branch
counts whether or not it runs.
"""
import collections
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

os.environ["NUMBA_ENABLE_CUDASIM"] = "0"

import numba.cuda.dispatcher as _dispatcher  # noqa: E402


class _SM90:
    compute_capability = (9, 0)


# compile_ptx asks the (absent) current device for its compute capability when a
# kernel calls device functions; answer for it. Only ever done in this script.
_dispatcher.get_current_device = lambda: _SM90()

from numba import cuda  # noqa: E402


def link(ptx, lineinfo=False):
    """``(log, cubin)``: ptxas's verbose log and the sm_90 machine code of ``ptx``."""
    from cuda.bindings import nvjitlink
    options = ["-arch=sm_90", "-verbose"] + (["-lineinfo"] if lineinfo else [])
    h = nvjitlink.create(len(options), options)
    data = ptx.encode()
    nvjitlink.add_data(h, nvjitlink.InputType.PTX, data, len(data), "kernel.ptx")
    nvjitlink.complete(h)
    buf = bytearray(nvjitlink.get_info_log_size(h))
    nvjitlink.get_info_log(h, buf)
    cubin = bytearray(nvjitlink.get_linked_cubin_size(h))
    nvjitlink.get_linked_cubin(h, cubin)
    nvjitlink.destroy(h)
    return buf.decode(errors="replace"), bytes(cubin)


def link_log(ptx):
    return link(ptx)[0]


def nvdisasm_path():
    """nvdisasm from the nvidia-cuda-nvdisasm wheel or PATH, or None."""
    try:
        import nvidia.cu13
        wheel = pathlib.Path(list(nvidia.cu13.__path__)[0]) / "bin" / "nvdisasm"
        if wheel.exists():
            return str(wheel)
    except ImportError:
        pass
    return shutil.which("nvdisasm")


def disassemble(nvdisasm, cubin, lineinfo=False):
    """The SASS text of ``cubin`` (``-g`` adds source-line comments). The cubin goes
    through a private temporary file, so that runs side by side do not share one."""
    with tempfile.TemporaryDirectory() as folder:
        path = pathlib.Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        done = subprocess.run([nvdisasm, "-c"] + (["-g"] if lineinfo else []) + [str(path)],
                              capture_output=True, text=True, check=True)
    return done.stdout


#: One SASS instruction: its address comment, an optional predicate, the opcode.
SASS_OP = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")
SASS_LINE = re.compile(r'//## File "([^"]+)", line (\d+)')


def sass_ops(sass):
    """[(source file name or None, line or None, opcode)] for each instruction."""
    where, out = (None, None), []
    for text in sass.splitlines():
        m = SASS_LINE.search(text)
        if m:
            where = (os.path.basename(m.group(1)), int(m.group(2)))
            continue
        m = SASS_OP.search(text)
        if m:
            out.append((*where, m.group(1)))
    return out


def sass_counts(sass):
    """Counts of the instructions the tensor-core kernels are meant to use, and of
    local-memory ones (spills)."""
    ops = collections.Counter(op for _, _, op in sass_ops(sass))
    return {"sass_hmma": ops["HMMA"], "sass_ldsm": ops["LDSM"], "sass_ldgsts": ops["LDGSTS"],
            "sass_local": ops["LDL"] + ops["STL"], "sass_total": sum(ops.values())}


def sass_report(name_part):
    """Prints the SASS instruction mix per kernel-source line of the first kernel whose
    name holds ``name_part``."""
    for name, dispatcher, sig in kernels():
        if name_part in name:
            break
    else:
        raise SystemExit(f"no kernel named like {name_part!r}")
    nvdisasm = nvdisasm_path()
    if nvdisasm is None:
        raise SystemExit("no nvdisasm: pip install nvidia-cuda-nvdisasm (the ptx extra)")
    ptx, _ = cuda.compile_ptx(dispatcher.py_func, sig, cc=(9, 0), lineinfo=True)
    log, cubin = link(ptx, lineinfo=True)
    sass = disassemble(nvdisasm, cubin, lineinfo=True)
    out = pathlib.Path("/tmp/nbflash-sass")
    out.mkdir(exist_ok=True)
    out /= re.sub(r"\W+", "_", name) + ".sass"
    out.write_text(sass)
    print(name, json.dumps({**resources(log), **sass_counts(sass)}))
    print(f"SASS: {out}")
    per_line = collections.defaultdict(collections.Counter)
    for file, line, op in sass_ops(sass):
        per_line[file, line][op] += 1
    for (file, line), ops in sorted(per_line.items(), key=lambda x: (str(x[0][0]), x[0][1] or 0)):
        top = ", ".join(f"{op} {n}" for op, n in ops.most_common(6))
        print(f"{file}:{line}  {sum(ops.values()):5d}  {top}")


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
    nvdisasm = nvdisasm_path()
    for name, dispatcher, sig in kernels():
        if names and not any(n in name for n in names):
            continue
        ptx, _ = cuda.compile_ptx(dispatcher.py_func, sig, cc=(9, 0), lineinfo=False)
        log, cubin = link(ptx)
        info = {"kernel": name, **resources(log),
                "mma_sync": ptx.count("mma.sync.aligned"), "ldmatrix": ptx.count("ldmatrix"),
                "cp_async": ptx.count("cp.async.cg"),
                "local_ld_st": len(re.findall(r"\b(ld|st)\.local", ptx))}
        if nvdisasm:
            info.update(sass_counts(disassemble(nvdisasm, cubin)))
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
    elif sys.argv[1:2] == ["--sass"]:
        sass_report(sys.argv[2])
    else:
        main(sys.argv[1:])
