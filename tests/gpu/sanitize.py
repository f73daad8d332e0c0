"""Run nbflash's kernels under every compute-sanitizer tool and summarise (GPU).

    source .gpu/env.sh && python3 tests/gpu/sanitize.py [--tools memcheck racecheck ...]
        [--shards 4] [--jobs 16] [--cache-dir DIR] [--log-dir DIR] [-- driver args]

For each tool T of memcheck, racecheck, synccheck, initcheck it runs

    compute-sanitizer --tool T --error-exitcode 1 --report-api-errors no \
        python3 tests/gpu/sanitize_cases.py --tool T

(``sanitize_cases.py`` holds the configuration matrix and checks every output), split
into ``--shards`` processes per tool, each taking whole (dtype, causal, head dim)
groups so that it compiles only its share of the kernels. Up to ``--jobs`` processes
run at once (default: all). All processes share Numba's disk cache (nbflash locks each
kernel's cache entry while compiling it), so a kernel compiles once for all tools,
and not at all after ``python -m nbflash.precompile``; ``--cache-dir DIR`` uses DIR
instead of the default cache. Logs go to ``<log-dir>/<tool>-<shard>.log``.

Prints a table tool x (cases, failed cases, sanitizer errors and warnings, exit
status, time), then every failing configuration with its reason. Sanitizer
reports are attributed to the case that was running when they were printed
(the driver synchronises after each case). Exit status 1 on any error.

Arguments after ``--`` go to every driver, e.g. ``-- --filter float16 --max-cases 5``.
"""
import argparse
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DRIVER = HERE / "sanitize_cases.py"
TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")

CASE_RE = re.compile(r"^CASE (\d+) (\S+)")
RESULT_RE = re.compile(r"^RESULT (\d+) (ok|FAIL) (\S+) (\S+?)(?:: (.*))?$")
SUMMARY_RE = re.compile(r"^========= ERROR SUMMARY: (\d+) errors?")
RACE_SUMMARY_RE = re.compile(r"^========= RACECHECK SUMMARY: .*\((\d+) errors?, (\d+) warnings?\)")
# A sanitizer report starts with "========= " and a word; continuation lines are
# indented further; the banner and the summaries are not reports.
REPORT_RE = re.compile(r"^========= (?! )(?!COMPUTE-SANITIZER)(?!ERROR SUMMARY)"
                       r"(?!RACECHECK SUMMARY)(?!LEAK SUMMARY)(?!Target application)"
                       r"(?!Saved host backtrace)(?!Host Frame)(?!Device Frame)(\S.*)")


def find_sanitizer(given):
    if given:
        return given
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for base in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if base and (pathlib.Path(base) / "bin/compute-sanitizer").exists():
            return str(pathlib.Path(base) / "bin/compute-sanitizer")
    sys.exit("compute-sanitizer not found: put it on PATH or pass --sanitizer")


def parse_log(text):
    """Per-log summary: cases, failed cases, reports attributed to cases."""
    cases, failed, reports = {}, [], []
    current = None
    total_errors = race_errors = race_warnings = None
    for line in text.splitlines():
        m = CASE_RE.match(line)
        if m:
            current = m.group(2)
            cases[current] = None
            continue
        m = RESULT_RE.match(line)
        if m:
            name = m.group(4)
            cases[name] = m.group(2)
            if m.group(2) == "FAIL":
                failed.append((name, m.group(5) or ""))
            continue
        m = SUMMARY_RE.match(line)
        if m:
            total_errors = int(m.group(1))
            continue
        m = RACE_SUMMARY_RE.match(line)
        if m:
            race_errors, race_warnings = int(m.group(1)), int(m.group(2))
            continue
        m = REPORT_RE.match(line)
        if m:
            kind = "warning" if m.group(1).lower().startswith("warn") else "error"
            reports.append((current or "(before the first case)", kind, m.group(1)))
    crashed = [name for name, status in cases.items() if status is None]
    return dict(cases=len(cases), failed=failed, crashed=crashed, reports=reports,
                total_errors=total_errors, race_errors=race_errors,
                race_warnings=race_warnings)


def run_one(job):
    t0 = time.perf_counter()
    with open(job["log"], "w") as log:
        log.write("$ " + " ".join(job["cmd"]) + "\n")
        log.flush()
        try:
            proc = subprocess.run(job["cmd"], env=job["env"], stdout=log, stderr=subprocess.STDOUT,
                                  cwd=str(ROOT), timeout=job["timeout"])
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    job["rc"] = rc
    job["seconds"] = time.perf_counter() - t0
    print(f"  {job['tool']} shard {job['shard']}: exit {rc} after {job['seconds']:.0f} s "
          f"({job['log']})", flush=True)
    return job


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    driver_args = []
    if "--" in argv:
        i = argv.index("--")
        argv, driver_args = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS)
    ap.add_argument("--shards", type=int, default=4,
                    help="processes per tool (default 4; 1 = one process per tool)")
    ap.add_argument("--jobs", type=int, default=0, help="processes at once (default: all)")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per process")
    ap.add_argument("--sanitizer", default=None, help="compute-sanitizer executable")
    ap.add_argument("--cache-dir", default=None,
                    help="Numba disk cache to use (default: Numba's own)")
    ap.add_argument("--log-dir", default=None,
                    help="default: $OUT/sanitize if $OUT is set, else a temporary directory")
    args = ap.parse_args(argv)

    sanitizer = find_sanitizer(args.sanitizer)
    tmp = tempfile.mkdtemp(prefix="nbflash-sanitize-")
    log_dir = pathlib.Path(args.log_dir or (os.path.join(os.environ["OUT"], "sanitize")
                                            if os.environ.get("OUT") else os.path.join(tmp, "logs")))
    log_dir.mkdir(parents=True, exist_ok=True)
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

    jobs = []
    for tool in args.tools:
        for s in range(args.shards):
            env = dict(os.environ, PYTHONUNBUFFERED="1",
                       PYTHONPATH=pythonpath, NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS="0")
            if args.cache_dir:
                env["NUMBA_CACHE_DIR"] = args.cache_dir
            # Host API errors are not reported: cuda.bindings resolves the driver's
            # entry points with cuGetProcAddress and probes some that driver 580 lacks
            # (34 INVALID_VALUE per process, all before the first kernel launch, on
            # the H100 run of 2026-11-24). Kernel memory errors are reported as ever.
            driver = [sys.executable, str(DRIVER), "--tool", tool,
                      "--shard", f"{s}/{args.shards}", *driver_args]
            # A shard left without cases (more shards than (dtype, causal, head dim)
            # groups after the filter) makes no CUDA call, and compute-sanitizer then
            # exits 255 ("Target application terminated before first instrumented API
            # call"): skip it.
            listed = subprocess.run(driver + ["--list"], env=env, cwd=str(ROOT),
                                    capture_output=True, text=True)
            if listed.returncode == 0 and not listed.stdout.strip():
                print(f"  {tool} shard {s}: no cases, not run", flush=True)
                continue
            cmd = [sanitizer, "--tool", tool, "--error-exitcode", "1",
                   "--report-api-errors", "no", *driver]
            jobs.append(dict(tool=tool, shard=s, cmd=cmd, env=env, timeout=args.timeout,
                             log=str(log_dir / f"{tool}-{s}.log")))

    print(f"sanitize: {len(jobs)} processes ({', '.join(args.tools)} x {args.shards} "
          f"shards) with {sanitizer}; logs in {log_dir}", flush=True)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.jobs or len(jobs)) as pool:
        done = list(pool.map(run_one, jobs))
    wall = time.perf_counter() - t0

    rows, failures, warnings, bad = [], [], [], False
    for tool in args.tools:
        mine = [j for j in done if j["tool"] == tool]
        agg = dict(cases=0, failed=0, crashed=0, errors=0, warnings=0, seconds=0.0, rcs=[])
        for job in mine:
            info = parse_log(pathlib.Path(job["log"]).read_text(errors="replace"))
            agg["cases"] += info["cases"]
            agg["failed"] += len(info["failed"])
            agg["crashed"] += len(info["crashed"])
            n_err = sum(1 for r in info["reports"] if r[1] == "error")
            if info["total_errors"] is not None:
                n_err = max(n_err, info["total_errors"])
            agg["errors"] += n_err
            agg["warnings"] += sum(1 for r in info["reports"] if r[1] == "warning")
            agg["seconds"] = max(agg["seconds"], job["seconds"])
            agg["rcs"].append(job["rc"])
            for name, reason in info["failed"]:
                failures.append((tool, name, reason))
            for name in info["crashed"]:
                failures.append((tool, name, f"no result: the process died or timed out "
                                             f"(exit {job['rc']}; see {job['log']})"))
            seen = set()
            for name, kind, text in info["reports"]:
                if (name, text) not in seen:
                    seen.add((name, text))
                    (failures if kind == "error" else warnings).append(
                        (tool, name, f"sanitizer {kind}: {text}"))
            if info["cases"] == 0:
                failures.append((tool, "-", f"no case ran (exit {job['rc']}; see {job['log']})"))
            if info["total_errors"] is None and info["race_errors"] is not None:
                # racecheck may end with its own summary line instead of ERROR SUMMARY.
                agg["errors"] += info["race_errors"]
            elif info["total_errors"] is None:
                failures.append((tool, "-", f"no sanitizer summary in {job['log']}"))
            if job["rc"] != 0:
                failures.append((tool, "-", f"exit {job['rc']} (see {job['log']})"))
        bad = bad or bool(agg["failed"] or agg["crashed"] or agg["errors"])
        rows.append((tool, agg))

    print(f"\n{'tool':<11}{'cases':>7}{'failed':>8}{'no result':>11}{'san. errors':>13}"
          f"{'warnings':>10}{'exit':>12}{'time':>8}")
    for tool, a in rows:
        rcs = ",".join(str(r) for r in a["rcs"])
        print(f"{tool:<11}{a['cases']:>7}{a['failed']:>8}{a['crashed']:>11}{a['errors']:>13}"
              f"{a['warnings']:>10}{rcs:>12}{a['seconds']:>7.0f}s")
    print(f"wall time {wall:.0f} s")
    if failures:
        print("\nfailing configurations:")
        for tool, name, reason in failures:
            print(f"  {tool:<10} {name}: {reason}")
    if warnings:
        print("\nsanitizer warnings (not counted as errors):")
        for tool, name, reason in warnings:
            print(f"  {tool:<10} {name}: {reason}")
    print("\nsanitize: " + ("FAILED" if bad or failures else "all clean"))
    return 1 if bad or failures else 0


if __name__ == "__main__":
    sys.exit(main())
