"""``python -m benchmarks io``: bytes moved to and from GPU memory, predicted and measured.

Predicted by ``nbflash/io_model.py`` (FlashAttention paper, Theorem 2, counted
exactly for nbflash's tiles) at two levels: between L2 and the SMs (the paper's
"HBM" traffic: every K, V tile a query tile visits) and from DRAM (K, V of a head read
once while they fit in L2). Measured with Nsight Compute on a driver process
(``benchmarks/io_driver.py``) that runs one forward per job:

    ncu --clock-control none --metrics dram__bytes_read.sum,dram__bytes_write.sum,\
        lts__t_bytes.sum,lts__t_sectors_srcunit_tex_op_read.sum,\
        lts__t_sectors_srcunit_tex_op_write.sum,gpu__time_duration.sum --csv ...

summing the counters over each job's kernels (L2 counts 32-byte sectors: a request
that uses part of a sector counts all of it, so measured L2 traffic exceeds the model
where accesses do not use whole sectors). Two sweeps, float16, 16 heads, headdim
128: seqlen at batch * seqlen = 16384 tokens for nbflash, naive CuPy attention and
PyTorch's flash backend (plus the paper's standard attention, predicted only); and
nbflash's tile sizes at seqlen 4096, batch 4 (the paper's Figure 2 experiment;
nbflash runs with other tiles by swapping its config selector inside the driver
process). In nbflash's loop order (FlashAttention-2: one block per query tile) the K, V
re-reads scale with 1 / block_m; block_n changes how often the loop runs, not how much
it reads.

Without a GPU, or without ``ncu``, the predictions alone are printed. Writes
``io.json``, ``io_seqlen.png`` and ``io_tiles.png`` under
``benchmarks/results/<gpu-name>/`` and prints markdown tables.
"""
import argparse
import csv
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from io import StringIO
from pathlib import Path

from nbflash import io_model

from . import common
from .io_driver import MARK

METRICS = ("dram__bytes_read.sum", "dram__bytes_write.sum", "lts__t_bytes.sum",
           "lts__t_sectors_srcunit_tex_op_read.sum", "lts__t_sectors_srcunit_tex_op_write.sum",
           "gpu__time_duration.sum")
SECTOR = 32   # bytes; L2 counts whole sectors, however few of their bytes a request uses
UNITS = {"byte": 1, "kbyte": 1e3, "mbyte": 1e6, "gbyte": 1e9, "tbyte": 1e12,
         "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
         "nsecond": 1, "usecond": 1e3, "msecond": 1e6, "second": 1e9,
         "ns": 1, "us": 1e3, "ms": 1e6, "s": 1e9}
#: PyTorch's flash forward (FlashAttention-2) on sm90 with headdim <= 128: query tiles
#: of 128 rows (K, V re-reads scale with 1 / block_m; block_n does not matter here).
TORCH_FLASH_TILES = (128, 64)
TORCH_FLASH_BLOCKS_IN_FLIGHT = 2 * io_model.H100.sms
SHAPE = {"nheads": 16, "headdim": 128, "dtype": "float16", "causal": False}
QUICK = {"seqlens": [1024, 4096, 16384], "block_ms": [32, 64, 128], "block_ns": [32, 64, 128]}


def seqlen_jobs(seqlens, tokens, impls):
    """One job per seqlen and implementation, batch * seqlen = ``tokens``."""
    return [{"impl": impl, "batch": max(1, tokens // n), "seqlen": n, **SHAPE}
            for n in seqlens for impl in impls]


def tile_jobs(seqlen, batch, block_ms, block_ns):
    """nbflash at one shape with each block_m (block_n as configured) and each block_n
    (block_m as configured); tile sizes nbflash cannot run are left out, with a note."""
    cfg = io_model.forward_config(SHAPE["dtype"], SHAPE["headdim"])
    pairs = [(m, cfg.block_n) for m in block_ms] + [(cfg.block_m, n) for n in block_ns]
    jobs = []
    for m, n in dict.fromkeys(pairs):
        try:
            io_model.with_tiles(cfg, SHAPE["dtype"], m, n)
        except ValueError as e:
            print(f"io: tiles {m} x {n} left out: {e}", file=sys.stderr)
            continue
        jobs.append({"impl": "nbflash", "batch": batch, "seqlen": seqlen, **SHAPE,
                     "block_m": m, "block_n": n, "sweep": "tiles"})
    return jobs


def predict(job):
    """{'sram', 'sram_read', 'sram_write', 'dram_read', 'dram_write'}: bytes predicted
    for one job ('sram': between L2 and the SMs)."""
    shape = (job["batch"], job["nheads"], job["seqlen"], job["seqlen"], job["headdim"])
    kw = {"dtype_name": job["dtype"], "causal": job["causal"]}
    if job["impl"] in ("naive", "paper standard"):
        t = (io_model.naive_attention_io(*shape, **kw) if job["impl"] == "naive"
             else io_model.standard_attention_io(*shape, dtype_name=job["dtype"]))
        return {"sram": t.total, "sram_read": t.read, "sram_write": t.write,
                "dram_read": t.read, "dram_write": t.write}
    if job["impl"] == "torch-flash":
        m, n = TORCH_FLASH_TILES
        kw.update(block_m=m, block_n=n, blocks_in_flight=TORCH_FLASH_BLOCKS_IN_FLIGHT)
    else:
        kw.update(block_m=job.get("block_m"), block_n=job.get("block_n"))
    f = io_model.flash_forward_io(*shape, **kw)
    return {"sram": f.sram.total, "sram_read": f.sram.read, "sram_write": f.sram.write,
            "dram_read": f.dram.read, "dram_write": f.dram.write,
            "block_m": f.block_m, "block_n": f.block_n, "kv_fits_l2": f.kv_fits_l2}


def _number(value, unit):
    """A metric value in base units (bytes, ns); NaN when ncu printed no number."""
    try:
        return float(value.replace(",", "")) * UNITS.get(unit.strip().lower(), 1.0)
    except ValueError:
        return float("nan")


def find_ncu():
    """The ncu executable: on PATH, else in the usual install folders; None if absent."""
    found = shutil.which("ncu")
    if found:
        return found
    candidates = sorted(Path("/opt/nvidia").glob("nsight-compute/*/ncu")) + [
        Path("/usr/local/cuda/bin/ncu")]
    return next((str(p) for p in reversed(candidates) if p.exists()), None)


def parse_ncu_csv(text):
    """Kernels in launch order from ``ncu --csv`` output (one row per metric):
    a list of ``{"id", "name", "metrics": {metric: value in bytes or ns}}``."""
    lines = text[text.find('"ID"'):] if '"ID"' in text else ""
    kernels = {}
    for row in csv.DictReader(StringIO(lines)):
        if not row.get("Metric Name"):
            continue
        name = row.get("Kernel Name") or row.get("Function Name") or row.get("Name") or ""
        k = kernels.setdefault(int(row["ID"]), {"id": int(row["ID"]), "name": name,
                                                 "metrics": {}})
        k["metrics"][row["Metric Name"]] = _number(row["Metric Value"], row.get("Metric Unit", ""))
    return [kernels[i] for i in sorted(kernels)]


def per_job(kernels, metrics=METRICS):
    """Sums each metric over the kernels after marker ``i`` and before the next marker:
    ``{i: {metric: total, "kernels": count}}``."""
    totals, job = {}, None
    for k in kernels:
        mark = re.search(MARK + r"(\d+)", k["name"])
        if mark:
            job = int(mark.group(1))
            totals[job] = {m: 0.0 for m in metrics} | {"kernels": 0}
        elif job is not None:
            for m in metrics:
                totals[job][m] += k["metrics"].get(m, 0.0)
            totals[job]["kernels"] += 1
    return totals


def measure(jobs, timeout):
    """Runs the driver under ncu; returns ({job index: counters}, None) or (None, why)."""
    ncu = find_ncu()
    if ncu is None:
        return None, "ncu (Nsight Compute) is not installed"
    with tempfile.TemporaryDirectory(prefix="nbflash-io-") as tmp:
        tmp = Path(tmp)
        (tmp / "jobs.json").write_text(json.dumps(jobs))
        cmd = [ncu, "--clock-control", "none", "--metrics", ",".join(METRICS), "--csv",
               "--print-units", "base", "--profile-from-start", "off",
               "--log-file", str(tmp / "ncu.csv"),
               sys.executable, "-m", "benchmarks.io_driver", "--jobs", str(tmp / "jobs.json"),
               "--manifest", str(tmp / "manifest.json")]
        returncode, tail = _run_with_progress(cmd, len(jobs), timeout)
        if returncode is None:
            return None, f"ncu did not finish within {timeout} s"
        if returncode or not (tmp / "manifest.json").exists():
            return None, "ncu failed: " + " | ".join(tail)
        manifest = json.loads((tmp / "manifest.json").read_text())
        counters = per_job(parse_ncu_csv((tmp / "ncu.csv").read_text()))
    return {m["index"]: counters.get(m["index"]) if m["status"] == "ok" else m["status"]
            for m in manifest}, None


def _run_with_progress(cmd, n_jobs, timeout):
    """Runs ``cmd`` (ncu over the driver), advancing a progress bar at each job the driver
    reports; returns (exit code, or None when killed at ``timeout``; last output lines)."""
    proc = subprocess.Popen(cmd, cwd=common.REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    bar = common.progress(None, "io (ncu)", total=n_jobs)
    tail = []
    for line in proc.stdout:
        tail = (tail + [line.strip()])[-8:]
        if line.startswith("io_driver: job"):
            bar.update(1)
    bar.close()
    returncode = proc.wait()
    killed = not timer.is_alive()
    timer.cancel()
    return (None if killed else returncode), tail


def rows_for(jobs, measured):
    """One row per job: the job, its prediction and (when measured) its counters."""
    rows = []
    for i, job in enumerate(jobs):
        row = {**job, "predicted": predict(job)}
        got = (measured or {}).get(i)
        if isinstance(got, dict):
            sectors = "lts__t_sectors_srcunit_tex_op_{}.sum"
            row["measured"] = {"sram": got["lts__t_bytes.sum"],
                               "sram_read": got[sectors.format("read")] * SECTOR,
                               "sram_write": got[sectors.format("write")] * SECTOR,
                               "dram_read": got["dram__bytes_read.sum"],
                               "dram_write": got["dram__bytes_write.sum"],
                               "ms": got["gpu__time_duration.sum"] / 1e6,
                               "kernels": got["kernels"]}
        elif got:
            row["measured"] = {"skipped": got}
        rows.append(row)
    return rows


def _ratio(row, level):
    """measured / predicted bytes at ``level``, as text."""
    got, want = _level(row.get("measured", {}), level), _level(row["predicted"], level)
    return f"{got / want:.2f}" if got is not None and want else "-"


COLUMNS = (("L2<->SM", "sram"), ("SM reads", "sram_read"), ("SM writes", "sram_write"),
           ("DRAM read", "dram_read"), ("DRAM write", "dram_write"))


def table(rows, first):
    """Markdown table of predicted against measured bytes; ``first`` names the row key
    columns ('seqlen' or 'tiles')."""
    head = ["impl", "seqlen", "batch"] if first == "seqlen" else ["block_m", "block_n"]
    head += [f"{name} {kind}" for name, _ in COLUMNS for kind in ("pred", "meas")]
    head += ["L2 meas/pred", "DRAM meas/pred", "time"]
    body = []
    for r in rows:
        p, m = r["predicted"], r.get("measured", {})
        key = ([r["impl"], r["seqlen"], r["batch"]] if first == "seqlen"
               else [p["block_m"], p["block_n"]])
        cells = [common.fmt_bytes(x) for _, level in COLUMNS
                 for x in (p[level], m.get(level))]
        if "skipped" in m:
            cells[1] = m["skipped"][:40]
        body.append(key + cells + [_ratio(r, "sram"), _ratio(r, "dram"),
                                   f"{m['ms']:.3g} ms" if "ms" in m else "-"])
    return common.markdown_table(head, body, left=1)


def _level(counts, level):
    """Bytes at ``level`` ('sram' or 'dram': read + write) of a predicted or measured dict."""
    if level == "dram":
        return counts["dram_read"] + counts["dram_write"] if "dram_read" in counts else None
    return counts.get(level)


def _series(rows, x_of, label, level, color, styles):
    """Predicted (dashed line) and measured (dots) series of ``rows`` at ``level``."""
    rows = sorted(rows, key=x_of)
    xs = [x_of(r) for r in rows]
    styles[f"{label} predicted"] = {"color": color, "marker": None, "linestyle": "--"}
    styles[f"{label} measured"] = {"color": color, "linestyle": "none"}
    return {f"{label} predicted": (xs, [_level(r["predicted"], level) for r in rows]),
            f"{label} measured": (xs, [_level(r.get("measured", {}), level) for r in rows])}


def plot(seq_rows, tile_rows, outdir):
    """Predicted (lines) against measured (dots) bytes, versus seqlen and versus tile
    size; returns the paths written."""
    from .plots import facet_lines
    styles, paths = {}, []
    if seq_rows:
        impls = list(dict.fromkeys(r["impl"] for r in seq_rows))
        panels = []
        for level, title in (("sram", "L2 <-> SM (lts__t_bytes)"), ("dram", "DRAM read + write")):
            series = {}
            for i, impl in enumerate(impls):
                series.update(_series([r for r in seq_rows if r["impl"] == impl],
                                      lambda r: r["seqlen"], impl, level, f"C{i}", styles))
            panels.append((title, series))
        paths.append(facet_lines(outdir / "io_seqlen.png", panels, styles=styles,
                                 title="attention forward, bytes moved (16384 tokens, 16 heads, "
                                       "headdim 128, float16)",
                                 xlabel="seqlen", ylabel="bytes", logy=True))
    if tile_rows:
        base = io_model.forward_config(SHAPE["dtype"], SHAPE["headdim"])
        panels = []
        for axis, fixed in (("block_m", "block_n"), ("block_n", "block_m")):
            rows = [r for r in tile_rows if r["predicted"][fixed] == getattr(base, fixed)]
            x_of = lambda r, axis=axis: r["predicted"][axis]  # noqa: E731
            series = _series(rows, x_of, "L2 <-> SM", "sram", "C0", styles)
            series.update(_series(rows, x_of, "DRAM", "dram", "C1", styles))
            panels.append((f"{axis} ({fixed} = {getattr(base, fixed)})", series))
        first = tile_rows[0]
        paths.append(facet_lines(outdir / "io_tiles.png", panels, styles=styles,
                                 title=f"nbflash forward, bytes moved versus tile size (batch "
                                       f"{first['batch']}, seqlen {first['seqlen']})",
                                 xlabel="tile rows", ylabel="bytes", logy=True))
    return paths


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m benchmarks io",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqlens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--tokens", type=int, default=16384, help="batch * seqlen of the seqlen sweep")
    ap.add_argument("--impls", nargs="+", default=["nbflash", "naive", "torch-flash"],
                    choices=["nbflash", "naive", "torch-flash"])
    ap.add_argument("--tile-seqlen", type=int, default=4096)
    ap.add_argument("--tile-batch", type=int, default=4)
    ap.add_argument("--block-ms", type=int, nargs="*", default=[16, 32, 64, 128])
    ap.add_argument("--block-ns", type=int, nargs="*", default=[16, 32, 64, 128])
    ap.add_argument("--predict-only", action="store_true", help="print the model, measure nothing")
    ap.add_argument("--timeout", type=int, default=420, help="seconds for the ncu run")
    common.add_quick_option(ap, QUICK, "sweep")
    ap.add_argument("--out", help="results folder (default benchmarks/results/<gpu-name>)")
    args = common.apply_quick(ap, ap.parse_args(argv), QUICK)
    return args


def main(argv=None):
    args = parse_args(argv)
    seq_jobs = seqlen_jobs(args.seqlens, args.tokens, args.impls)
    jobs = seq_jobs + tile_jobs(args.tile_seqlen, args.tile_batch, args.block_ms, args.block_ns)
    why = "--predict-only" if args.predict_only else common.gpu_unavailable()
    measured = None
    if why is None:
        measured, why = measure(jobs, args.timeout)
    rows = rows_for(jobs, measured)
    seq_rows = [r for r in rows if r.get("sweep") != "tiles"]
    seq_rows += rows_for(seqlen_jobs(args.seqlens, args.tokens, ["paper standard"]), None)
    tile_rows = [r for r in rows if r.get("sweep") == "tiles"]
    print("bytes moved by one forward call, versus seqlen (batch * seqlen = "
          f"{args.tokens}, 16 heads, headdim 128, float16)")
    print(table(seq_rows, "seqlen"))
    print(f"\nnbflash versus tile size (batch {args.tile_batch}, seqlen {args.tile_seqlen})")
    print(table(tile_rows, "tiles"))
    if why:
        print(f"\nio: predictions only, nothing measured: {why}")
        return 0
    outdir = common.results_dir(args.out)
    payload = {"config": vars(args), "metrics": METRICS, "seqlen_sweep": seq_rows,
               "tile_sweep": tile_rows}
    print(f"\nwrote {common.write_json(outdir / 'io.json', payload)}")
    for path in plot(seq_rows, tile_rows, outdir):
        print(f"wrote {path}")
    return 0
