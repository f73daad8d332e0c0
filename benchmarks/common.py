"""What every benchmark command shares: the GPU check, where results go and what
they record about the machine, markdown tables, progress bars.

Nothing here imports CuPy or torch at module level, so that ``python -m benchmarks``
can explain itself on a machine without a GPU.
"""
import ctypes
import datetime
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
GIB = 2.0**30

#: Distribution names whose versions a result records (first one installed wins).
PACKAGES = {"numpy": ("numpy",), "numba": ("numba",),
            "numba-cuda": ("numba-cuda",), "cupy": ("cupy-cuda13x", "cupy-cuda12x", "cupy"),
            "cuda-core": ("cuda-core",), "torch": ("torch",), "ml_dtypes": ("ml_dtypes",),
            "matplotlib": ("matplotlib",)}


def gpu_unavailable():
    """Why the GPU benchmarks cannot run here, in one line; None when they can."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
        return "NUMBA_ENABLE_CUDASIM is set; the benchmarks time real kernels on a GPU"
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no CUDA driver (libcuda.so.1) on this machine"
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed (pip install -e '.[cuda13]')"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as e:
        return f"no usable CUDA GPU ({e})"
    return None if count else "no CUDA GPU"


def exit_without_gpu(command):
    """Prints the one-line reason and returns True when ``command`` cannot run here."""
    reason = gpu_unavailable()
    if reason:
        print(f"python -m benchmarks {command}: skipped, {reason}")
    return reason is not None


def gpu_name():
    import cupy
    name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
    return name.decode() if isinstance(name, bytes) else name


def slug(text):
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def results_dir(out=None, name=None):
    """``out``, or ``benchmarks/results/<gpu-name>/`` (``name`` overrides the GPU's);
    created if needed."""
    path = Path(out) if out else RESULTS / slug(name or gpu_name())
    path.mkdir(parents=True, exist_ok=True)
    return path


def package_versions():
    """Versions of ``PACKAGES`` that are installed; nbflash's from the package itself."""
    import nbflash
    versions = {"nbflash": nbflash.__version__}
    for key, dists in PACKAGES.items():
        for dist in dists:
            try:
                versions[key] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return versions


def git_commit():
    """NBFLASH_GIT_COMMIT when set (copies of the tree, whose .git may be missing or
    stale), else HEAD of the repository, '+dirty' when it has local changes, else
    'unknown'."""
    if os.environ.get("NBFLASH_GIT_COMMIT"):
        return os.environ["NBFLASH_GIT_COMMIT"]

    def git(*args):
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("NBFLASH_GIT_COMMIT", "unknown")


def gpu_info():
    """Name, memory, L2, SM count, compute capability, driver and CUDA versions."""
    import cupy
    rt = cupy.cuda.runtime
    props = rt.getDeviceProperties(cupy.cuda.Device().id)
    info = {"name": gpu_name(), "compute_capability": f"{props['major']}.{props['minor']}",
            "multiprocessors": props["multiProcessorCount"],
            "memory_bytes": props["totalGlobalMem"], "l2_bytes": props["l2CacheSize"],
            "cuda_driver_api": rt.driverGetVersion(), "cuda_runtime": rt.runtimeGetVersion()}
    try:
        info["driver"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=True).stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        info["driver"] = "unknown"
    return info


def environment(with_gpu=True):
    """What a result file records about where and when it was measured."""
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "git_commit": git_commit(), "python": platform.python_version(),
           "host": platform.node(), "packages": package_versions()}
    if with_gpu:
        env["gpu"] = gpu_info()
    return env


def write_json(path, payload, with_gpu=True):
    """Writes ``payload`` plus ``environment()`` to ``path``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump({"environment": environment(with_gpu), **payload}, f, indent=1,
                  default=str)
    return path


def markdown_table(header, rows, left=1):
    """A markdown table; the first ``left`` columns are left-aligned, the rest right."""
    align = ["---"] * left + ["---:"] * (len(header) - left)
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


class _PlainProgress:
    """Stands in for a tqdm bar when tqdm is not installed."""

    def __init__(self, iterable=None):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def update(self, n=1):
        pass

    def set_postfix_str(self, text):
        pass

    def close(self):
        pass


def progress(iterable=None, desc="", total=None):
    """A tqdm progress bar on stderr over ``iterable`` (or updated by hand); a silent
    stand-in when tqdm is missing. Away from a terminal it redraws every 10 s."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _PlainProgress(iterable)
    tty = sys.stderr.isatty()
    return tqdm(iterable, desc=desc, total=total, file=sys.stderr, dynamic_ncols=True,
                mininterval=0.1 if tty else 10.0, ascii=not tty)


def say(text):
    """Prints a line without breaking a progress bar."""
    try:
        from tqdm import tqdm
        tqdm.write(text, file=sys.stdout)
    except ImportError:
        print(text)


def fmt_bytes(n):
    """1.23 GB style (decimal units, as Nsight Compute reports)."""
    if n is None:
        return "-"
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def free_gpu_memory():
    """Returns cached blocks of CuPy's pool and torch's allocator to the driver."""
    import cupy
    cupy.cuda.Device().synchronize()
    cupy.get_default_memory_pool().free_all_blocks()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def add_quick_option(parser, quick, what):
    """``--quick``: the defaults in ``quick`` (a dict of option names to values)."""
    parser.add_argument("--quick", action="store_true",
                        help=f"a small {what}: " + ", ".join(f"{k}={v}" for k, v in quick.items()))


def apply_quick(parser, args, quick):
    """With ``--quick``, options left at their defaults take the values in ``quick``."""
    if args.quick:
        for key, value in quick.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    return args
