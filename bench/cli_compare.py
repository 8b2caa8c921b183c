"""Issue #3's comparison: `procqueue map` against GNU parallel and xargs on the same batch.

    python bench/cli_compare.py [--files 2000] [--ms 2] [--jobs 2] [--repeat 3]
                                [--per-file-repeat 1]

A batch of small files and a script doing a fixed ~2 ms of pure-Python CPU per file (the
calibrated loop of cases.busy: fixed work, so a busy neighbour cannot make a form look faster
by letting it do less), timed as:

  procqueue map script.py inputs -j N       one interpreter per worker, a JSON record per file
  parallel -j N PY script.py ::: files      one interpreter per file (GNU parallel)
  xargs -P N -n 1 PY script.py              one interpreter per file
  parallel -m -j N PY script.py ::: files   batching: many files per interpreter
  xargs -P N -n 100 PY script.py            batching: 100 files per interpreter
  ideal (serial loop / N)                   the same function in a serial in-process loop / N
  ideal (N concurrent in-process loops)     N interpreters each looping over 1/N of the files
                                            at once (the cores' contention included)
  procqueue map, 1 file                     the command's fixed cost: start, one task, stop

PY is this interpreter's real path (sys.executable), not a `python3` shim, for every form:
pyenv's shim alone costs a fraction of a second per start, which is the machine's, not the
tool's.  Rounds run every form once (per-file forms only in the first --per-file-repeat rounds:
they take ~a minute each); ratios are computed within each round, then median/min.  If the
`procqueue` command is not installed (or `procqueue --help` fails) its row is skipped, and the
report says so.  Writes <out>/cli_compare.md and .json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# E402 is expected: bench/ must be on sys.path (just above) before its own modules import
import harness  # noqa: E402
from cases import busy  # noqa: E402

SCRIPT = '''\
import sys

ITERATIONS = {iterations}  # ~{ms} ms of pure-Python CPU on the benchmark machine


def process(path):
    with open(path) as f:
        text = f.read()
    acc = 0
    for i in range(ITERATIONS):
        acc ^= i * 7
    return {{"chars": len(text), "acc": acc & 0xFF}}


if __name__ == "__main__":  # how the per-file and batching forms run it
    for path in sys.argv[1:]:
        print(path, process(path)["chars"])
'''


# The ideal with the hardware's own contention: N interpreters, started together, each runs
# its 1/N share of the files in an in-process loop from an agreed moment; the slowest
# loop's seconds.  On this machine two busy cores run each loop ~10% slower than one busy
# core does, which the ideal (one serial loop / N) does not see.
CONCURRENT_LOOPS = '''\
import sys, time
import script
start_at, files = float(sys.argv[1]), sys.argv[2:]
time.sleep(max(0.0, start_at - time.time()))
started = time.perf_counter()
for path in files:
    script.process(path)
print(time.perf_counter() - started)
'''


def concurrent_loops_s(py: str, work: Path, files: list[str], jobs: int) -> float:
    start_at = time.time() + 1.0  # every interpreter is up and has imported the script
    shares = [files[i::jobs] for i in range(jobs)]
    procs = [subprocess.Popen([py, "-c", CONCURRENT_LOOPS, str(start_at), *share], cwd=work,
                              stdout=subprocess.PIPE, text=True) for share in shares]
    return max(float(proc.communicate()[0]) for proc in procs)


def procqueue_command() -> str | None:
    beside = Path(sys.executable).parent / "procqueue"
    exe = str(beside) if beside.exists() else shutil.which("procqueue")
    if exe is None:
        return None
    ok = subprocess.run([exe, "--help"], capture_output=True, timeout=60,
                        check=False).returncode == 0
    return exe if ok else None


def timed(cmd: str, cwd: Path, out: Path) -> tuple[float, int]:
    """Wall seconds of a shell command, and the lines it wrote to stdout (records)."""
    started = time.perf_counter()
    with open(out, "wb") as stdout:
        run = subprocess.run(cmd, shell=True, cwd=cwd, stdout=stdout,
                             stderr=subprocess.DEVNULL, check=False)
    wall = time.perf_counter() - started
    if run.returncode != 0:
        raise RuntimeError(f"{cmd!r} exited with {run.returncode}")
    with open(out, "rb") as f:
        return wall, sum(1 for _ in f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=2000)
    p.add_argument("--ms", type=float, default=2.0)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--per-file-repeat", type=int, default=1)
    p.add_argument("--out", type=Path, default=HERE / "results" / "suite")
    args = p.parse_args()
    harness.compile_procqueue()
    calibration = harness.load_or_calibrate(args.out / "calibration.json", busy, False)
    iterations = round(calibration["iterations_per_ms"] * args.ms)
    work = Path(tempfile.mkdtemp(prefix="pq-cli-compare-"))
    try:
        report = run_all(args, work, iterations)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cli_compare.json").write_text(json.dumps(report, indent=1))
    text = markdown(report, args)
    (args.out / "cli_compare.md").write_text(text)
    print(text)


def run_all(args: argparse.Namespace, work: Path, iterations: int) -> dict:
    inputs = work / "inputs"
    inputs.mkdir()
    for i in range(args.files):
        (inputs / f"f{i:05d}.txt").write_text(f"file {i}\n" * 20)
    (work / "script.py").write_text(SCRIPT.format(iterations=iterations, ms=args.ms))
    py, j = sys.executable, args.jobs
    pq = procqueue_command()
    have_parallel = shutil.which("parallel") is not None
    forms: dict[str, tuple[str, bool]] = {}  # name -> (command, per-file form)
    if pq:
        forms["procqueue map -j N"] = (f"{pq} map script.py inputs -j {j} -q", False)
    if have_parallel:
        forms["parallel -m (batching)"] = (
            f"parallel --will-cite -m -j {j} {py} script.py ::: inputs/*", False)
        forms["parallel (per file)"] = (
            f"parallel --will-cite -j {j} {py} script.py ::: inputs/*", True)
    forms["xargs -n 100 (batching)"] = (
        f"ls inputs/* | xargs -P {j} -n 100 {py} script.py", False)
    forms["xargs -n 1 (per file)"] = (f"ls inputs/* | xargs -P {j} -n 1 {py} script.py", True)

    sys.path.insert(0, str(work))
    import script  # type: ignore[import-not-found]

    files = sorted(str(p) for p in inputs.iterdir())
    rounds = []
    for round_ in range(args.repeat):
        row: dict[str, dict] = {}
        started = time.perf_counter()
        for path in files:
            script.process(path)
        row["ideal (serial loop / N)"] = {"wall_s": (time.perf_counter() - started) / j,
                                          "records": len(files)}
        row["ideal (N concurrent in-process loops)"] = {
            "wall_s": concurrent_loops_s(py, work, files, j), "records": len(files)}
        if pq:
            wall, records = timed(f"{pq} map script.py {files[0]} -j {j} -q", work,
                                  work / "out.txt")
            row["procqueue map, 1 file (fixed cost)"] = {"wall_s": wall, "records": records}
        for name, (cmd, per_file) in forms.items():
            if per_file and round_ >= args.per_file_repeat:
                continue
            wall, records = timed(cmd, work, work / "out.txt")
            row[name] = {"wall_s": wall, "records": records}
            print(f"[{round_ + 1}/{args.repeat}] {name:28s} {wall:7.2f} s  {records} records",
                  file=sys.stderr, flush=True)
        rounds.append(row)
    return {"rounds": rounds, "files": args.files, "ms": args.ms, "jobs": j,
            "iterations": iterations, "procqueue_cli": pq, "gnu_parallel": have_parallel,
            "environment": harness.environment()}


def markdown(report: dict, args: argparse.Namespace) -> str:
    rounds = report["rounds"]
    names = sorted({n for r in rounds for n in r},
                   key=lambda n: statistics.median(r[n]["wall_s"] for r in rounds if n in r))
    pq = "procqueue map -j N"
    title = (f"# procqueue map vs GNU parallel and xargs ({report['files']} files, "
             f"~{report['ms']:g} ms of CPU each, {report['jobs']} jobs, "
             f"{len(rounds)} rounds, {report['environment']['when']})")
    lines = [title, "",
             "| command | seconds, median (min) | records | time / procqueue's (same round) |",
             "|---|---|---|---|"]
    for n in names:
        walls = [r[n]["wall_s"] for r in rounds if n in r]
        ratios = [r[n]["wall_s"] / r[pq]["wall_s"] for r in rounds if n in r and pq in r]
        ratio = (f"{statistics.median(ratios):.2f}x ({min(ratios):.2f})" if ratios else "")
        records = rounds[0][n]["records"] if n in rounds[0] else ""
        lines.append(f"| {n} | {statistics.median(walls):.2f} ({min(walls):.2f}) | {records} "
                     f"| {ratio} |")
    lines.append("")
    if report["procqueue_cli"] is None:
        lines.append("**The `procqueue` command is not installed (or `procqueue --help` failed): "
                     "its row was skipped.**")
    if not report["gnu_parallel"]:
        lines.append("GNU parallel is not installed (`apt-get install -y parallel`): its rows "
                     "were skipped.")
    lines.append("Records: lines written to stdout (procqueue: one JSON record per file; the "
                 "script's own forms: one line per file; a batching form loses every line of "
                 "a batch when one file of it fails).  Ratio: form's time / procqueue's time.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
