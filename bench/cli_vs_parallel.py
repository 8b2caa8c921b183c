"""`procqueue map` against GNU parallel and xargs on the same batch (issue #3).

    python bench/cli_vs_parallel.py [--files 2000] [--ms 2] [--jobs 2]

2,000 small files, a script doing ~2 ms of CPU per file.  Compared, in one run:
  * per-file forms: `parallel -j N python3 script.py ::: files`, `xargs -P N -n 1 python3 ...`
    (one interpreter per file, a record per file)
  * batching forms: `parallel -m`, `xargs -n 100` (one interpreter per 100 files; an error
    in one file loses its batch's attribution)
  * the ideal: a serial in-process loop divided by the worker count
  * `procqueue map script.py dir -j N` (one interpreter per worker, a JSON record per file)
Writes bench/results/cli_vs_parallel.md.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

SCRIPT = '''
import sys, time

def process(path):
    with open(path) as f:
        text = f.read()
    end = time.perf_counter() + {seconds}
    n = 0
    while time.perf_counter() < end:   # ~{ms} ms of CPU per file
        n += 1
    return len(text)

if __name__ == "__main__":                # the per-file and batching forms run it like this
    for path in sys.argv[1:]:
        print(path, process(path))
'''


def timed(cmd: str, cwd: Path) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, shell=True, cwd=cwd, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--ms", type=float, default=2.0)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "cli_vs_parallel.md")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pq-cli-bench-"))
    inputs = work / "inputs"
    inputs.mkdir()
    for i in range(args.files):
        (inputs / f"f{i:05d}.txt").write_text(f"file {i}\n" * 20)
    (work / "script.py").write_text(SCRIPT.format(seconds=args.ms / 1000, ms=args.ms))
    py, j = sys.executable, args.jobs
    results: dict[str, float] = {}

    sys.path.insert(0, str(work))
    import script  # the ideal: the same work in one process, divided by the worker count

    files = sorted(str(p) for p in inputs.iterdir())
    started = time.perf_counter()
    for path in files:
        script.process(path)
    results["ideal (serial loop / jobs)"] = (time.perf_counter() - started) / j

    # The console script next to this interpreter, not a version manager's shim (pyenv's
    # costs ~0.2 s per call: that is the machine's, not procqueue's).
    beside = Path(sys.executable).parent / "procqueue"
    procqueue = str(beside) if beside.exists() else shutil.which("procqueue")
    results["procqueue map -j N"] = timed(f"{procqueue} map script.py inputs -j {j} -q "
                                          f"> out.jsonl", work)
    if shutil.which("parallel"):
        results["parallel -m (batching)"] = timed(
            f"ls inputs/* | parallel -m -j {j} {py} script.py", work)
        results["parallel (per file)"] = timed(
            f"ls inputs/* | parallel -j {j} {py} script.py", work)
    results["xargs -n 100 (batching)"] = timed(f"ls inputs/* | xargs -P {j} -n 100 {py} script.py",
                                               work)
    results["xargs -n 1 (per file)"] = timed(f"ls inputs/* | xargs -P {j} -n 1 {py} script.py",
                                             work)
    records = sum(1 for _ in open(work / "out.jsonl"))
    base = results["procqueue map -j N"]
    lines = [f"# procqueue map vs GNU parallel and xargs ({args.files} files, ~{args.ms:g} ms of "
             f"CPU each, {j} jobs, one run, {time.strftime('%Y-%m-%d')})", "",
             "| command | seconds | x procqueue's time |", "|---|---|---|"]
    for name, seconds in sorted(results.items(), key=lambda kv: kv[1]):
        lines.append(f"| {name} | {seconds:.2f} | {seconds / base:.2f} |")
    lines += ["", f"procqueue wrote {records} JSON records (one per file); "
              f"procqueue / ideal = {base / results['ideal (serial loop / jobs)']:.2f}."]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
