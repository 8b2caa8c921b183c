"""Where many workers sit idle (issue #24): N workers run 1 ms `time.sleep` tasks, each task
records its worker, start and end, and the workers' idle time is split by when it happens.

    python bench/worker_idle.py [--workers 16 64] [--rounds 2] [--ideal-s 1.0]
                                [--only procqueue:map mp:map ...] [--out FILE]

Shares of N x wall (they add up to 1 with `busy`, the tasks' own run time):

  * start    from the call to each worker's first task (pool wake-up, first batches);
  * ramp     gaps between tasks in the first 10% of the wall time (batches of one task
             until the function is measured, then sized ones);
  * steady   gaps between tasks in the middle (batch boundaries, a busy parent);
  * tail     gaps between tasks in the last 10% (shrinking batches, no prefetch);
  * end      from each worker's last task to the call's end (the tail's balance, results).

And how late the tasks' own sleeps ended (part of `busy`): `late` is the time each task took
beyond its 1 ms, `late_tail` the part of it in tasks that started in the last 10%.  With
more workers than cores, a sleeping worker's wake-up waits while its core runs someone
else's burst of CPU (a batch's report and the next batch's set-up in a worker, a supervisor
turn), so the pool's own CPU shows up as late tasks, not as idle time.

Systems as in many_workers.py: procqueue `map`, `imap`, `imap+key` (1,024 keys of 4),
`imap+fewkeys` (N keys of 1) and multiprocessing's fork `Pool.map` (chunksize = len / (4 x
N)).  Not run unless named: `mp:map+burst`, multiprocessing's `map` whose workers spin
BURST_S of CPU before every BURST_EVERY-th input (outside the task's stamps), as a
procqueue worker does at each block boundary at N=64 on 2 cores: what such bursts cost
the other workers' tasks.  Each cell runs in a fresh interpreter, its pool warmed up
first; cells are interleaved round by round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

CELLS = ("procqueue:map", "procqueue:imap", "procqueue:imap+key", "procqueue:imap+fewkeys",
         "mp:map")
PARTS = ("start", "ramp", "steady", "tail", "end")
LATENESS = ("late", "late_tail")
EDGE_SHARE = 0.10  # the ramp and the tail: the first and last 10% of the wall time
TASK_S = 0.001  # what each task asks for: time.sleep(0.001)
# mp:map+burst: a procqueue worker's CPU around each block at N=64 on 2 cores, ~70-84
# inputs (thread_time inside a worker, bench/README.md 2026-12-05: 170-290 us)
BURST_S = 0.0002
BURST_EVERY = 75
_inputs_run = 0


def stamped_nap(x: int) -> tuple[int, float, float]:
    """1 ms of sleep that says where and when it ran (perf_counter: one clock per machine)."""
    started = time.perf_counter()
    time.sleep(0.001)
    return os.getpid(), started, time.perf_counter()


def bursty_stamped_nap(x: int) -> tuple[int, float, float]:
    """stamped_nap, with BURST_S of CPU before every BURST_EVERY-th input of this worker."""
    global _inputs_run
    _inputs_run += 1
    if _inputs_run % BURST_EVERY == 0:
        spin_until = time.perf_counter() + BURST_S
        while time.perf_counter() < spin_until:
            pass
    return stamped_nap(x)


def warm(x: int) -> int:
    return x


def key_of(x: int) -> int:
    return x % 1024


def run_cell(cell: str, jobs: int, tasks: int) -> dict[str, Any]:
    system, api = cell.split(":")
    xs = list(range(tasks))
    if system == "mp":
        import multiprocessing

        pool: Any = multiprocessing.get_context("fork").Pool(jobs)
    else:
        from procqueue import Pool

        pool = Pool(jobs)
    try:
        pool.map(warm, range(4 * jobs))
        began = time.perf_counter()
        if api == "map":
            stamps = pool.map(stamped_nap, xs)
        elif api == "map+burst":
            stamps = pool.map(bursty_stamped_nap, xs)
        elif api == "imap":
            stamps = list(pool.imap(stamped_nap, xs))
        elif api == "imap+key":
            stamps = list(pool.imap(stamped_nap, xs, key=key_of, key_concurrency=4))
        else:  # few keys: N keys of one at once, exactly the places N workers need
            stamps = list(pool.imap(stamped_nap, xs, key=lambda x: x % jobs, key_concurrency=1))
        ended = time.perf_counter()
    finally:
        pool.terminate()
        pool.join()
    return {"cell": cell, "jobs": jobs, "tasks": tasks,
            **idle_parts(stamps, began, ended, jobs)}


def idle_parts(stamps: list[tuple[int, float, float]], began: float, ended: float,
               jobs: int, task_s: float = TASK_S) -> dict[str, float]:
    """The shares of jobs x wall: busy, and idle split by when it happened (see PARTS);
    and the tasks' time beyond `task_s` (see LATENESS)."""
    wall = ended - began
    ramp_end, tail_start = began + EDGE_SHARE * wall, ended - EDGE_SHARE * wall
    by_worker: dict[int, list[tuple[float, float]]] = {}
    for pid, start, end in stamps:
        by_worker.setdefault(pid, []).append((start, end))
    parts = dict.fromkeys(PARTS + LATENESS, 0.0)
    busy = 0.0
    for spans in by_worker.values():
        spans.sort()
        busy += sum(end - start for start, end in spans)
        for start, end in spans:
            late = max(0.0, end - start - task_s)
            parts["late"] += late
            if start >= tail_start:
                parts["late_tail"] += late
        parts["start"] += spans[0][0] - began
        parts["end"] += ended - spans[-1][1]
        for (_, end), (start, _) in zip(spans, spans[1:]):
            gap = max(0.0, start - end)
            where = "ramp" if end < ramp_end else "tail" if end >= tail_start else "steady"
            parts[where] += gap
    # a worker that ran no task was idle all along
    parts["start"] += (jobs - len(by_worker)) * wall
    capacity = jobs * wall
    return {"wall_s": wall, "busy": busy / capacity,
            **{part: seconds / capacity for part, seconds in parts.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ideal-s", type=float, default=1.0)
    parser.add_argument("--only", nargs="+", default=list(CELLS))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--cell", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        spec = json.loads(args.cell)
        print(json.dumps(run_cell(spec["cell"], spec["jobs"], spec["tasks"])))
        return
    rows: list[dict[str, Any]] = []
    for round_no in range(args.rounds):
        order = args.only if round_no % 2 == 0 else list(reversed(args.only))
        for jobs in args.workers:
            for cell in order:
                spec = {"cell": cell, "jobs": jobs, "tasks": int(jobs * args.ideal_s / 0.001)}
                out = subprocess.run([sys.executable, __file__, "--cell", json.dumps(spec)],
                                     capture_output=True, text=True, timeout=300, check=True)
                row = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"round {round_no + 1} N={jobs:<4} {cell:20} busy {row['busy']:.3f} " +
                      " ".join(f"{p} {row[p]:.3f}" for p in PARTS + LATENESS) +
                      f" wall {row['wall_s']:.3f} s", flush=True)
    columns = ("busy", *PARTS, *LATENESS)
    lines = ["| N | cell | " + " | ".join(columns) + " | tasks/s |",
             "|---|---|" + "---|" * (len(columns) + 1)]
    for jobs in args.workers:
        for cell in args.only:
            mine = [r for r in rows if r["cell"] == cell and r["jobs"] == jobs]
            figures = [statistics.median(r[p] for r in mine) for p in columns]
            figures.append(statistics.median(r["tasks"] / r["wall_s"] for r in mine))
            lines.append(f"| {jobs} | {cell} | " + " | ".join(f"{f:.3f}" for f in figures[:-1])
                         + f" | {figures[-1]:,.0f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(f"Medians of {args.rounds} rounds, {os.cpu_count()} CPUs\n\n"
                            f"{table}\n")


if __name__ == "__main__":
    main()
