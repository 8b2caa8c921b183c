"""Two versions of procqueue side by side in one run: is a change slower anywhere?

    git worktree add /tmp/before <commit>       # or: git archive <commit> | tar x -C /tmp/before
    python3 bench/ab.py /tmp/before . --rounds 5

Each cell (a version x a workload) runs in a fresh interpreter whose PYTHONPATH puts that
version's tree first; cells are interleaved A, B, A, B... in every round (the order of the
pair alternates), so a neighbour stealing the CPU for a while hits both versions alike.  Per
workload it prints the median figure of each version and their ratio B/A (> 1: B better).

Workloads (2 workers, the figures of bench/suite.py): tiny imap / map / submit (tasks per
second, 50,000 trivial calls; 5,000 for submit), cpu_1ms map (efficiency = serial time /
(workers x wall time), 2,000 calibrated 1 ms tasks) and, when named, uneven_map (the same
efficiency on bench/cases.py's uneven inputs: 1 ms tasks with 0.5% of 200 ms among them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKLOADS = ("tiny_imap", "tiny_map", "tiny_submit", "cpu_1ms_map")
JOBS = 2
CELL_TIMEOUT_S = 300

CELL = r"""
import json, sys, time
sys.path.insert(0, {bench!r})
import procqueue
from cases import busy, make_uneven, trivial, warm
from harness import calibrate_iterations_per_ms

workload = {workload!r}
with procqueue.Pool({jobs}) as pool:
    pool.map(warm, range(200))
    if workload.startswith("tiny"):
        n = 5_000 if workload == "tiny_submit" else 50_000
        start = time.perf_counter()
        if workload == "tiny_imap":
            out = list(pool.imap(trivial, range(n)))
        elif workload == "tiny_map":
            out = pool.map(trivial, range(n))
        else:
            out = [f.result() for f in [pool.submit(trivial, i) for i in range(n)]]
        wall = time.perf_counter() - start
        assert out == list(range(n))
        figure = n / wall
    else:
        per_ms = calibrate_iterations_per_ms(busy)
        start = time.perf_counter()
        for _ in range(200):
            busy(per_ms)
        ms_of_work = (time.perf_counter() - start) / 200  # what 1 ms of inputs takes now
        inputs = [per_ms] * 2000 if workload == "cpu_1ms_map" else make_uneven(1.0, per_ms).inputs
        serial = ms_of_work * sum(inputs) / per_ms
        start = time.perf_counter()
        pool.map(busy, inputs)
        wall = time.perf_counter() - start
        figure = serial / ({jobs} * wall)
print(json.dumps({{"figure": figure}}))
"""


def run_cell(tree: Path, workload: str) -> float:
    code = CELL.format(bench=str(HERE), workload=workload, jobs=JOBS)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree.resolve()), str(HERE)]))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=CELL_TIMEOUT_S, cwd=tree)
    if done.returncode != 0:
        raise RuntimeError(f"{tree} {workload}: {done.stderr[-2000:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["figure"])


def compile_tree(tree: Path) -> None:
    """Write each version's bytecode first: under PYTHONDONTWRITEBYTECODE=1 (this machine's
    default) a tree unpacked from `git archive` would compile the modules a call imports
    lazily inside the timed call, in every cell (a tiny `imap` ran ~10% slower for it)."""
    import compileall

    compileall.compile_dir(str(tree / "procqueue"), quiet=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", type=Path, help="the tree of version A (before)")
    parser.add_argument("b", type=Path, help="the tree of version B (after)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    args = parser.parse_args()
    workloads = args.workloads.split(",")
    for tree in (args.a, args.b):
        compile_tree(tree)
    figures: dict[tuple[str, str], list[float]] = {}
    for round_no in range(args.rounds):
        for workload in workloads:
            pair = [("A", args.a), ("B", args.b)]
            for name, tree in (pair if round_no % 2 == 0 else pair[::-1]):
                figures.setdefault((name, workload), []).append(run_cell(tree, workload))
    print(f"| workload | A ({args.a}) | B ({args.b}) | B / A |")
    print("|---|---|---|---|")
    for workload in workloads:
        a = statistics.median(figures[("A", workload)])
        b = statistics.median(figures[("B", workload)])
        unit = "" if workload.startswith(("cpu", "uneven")) else "/s"
        shown = (lambda v: f"{v:.3f}") if not unit else (lambda v: f"{v:,.0f}{unit}")
        print(f"| {workload} | {shown(a)} | {shown(b)} | {b / a:.3f} |")


if __name__ == "__main__":
    main()
