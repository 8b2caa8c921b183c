"""Where efficiency goes on `cpu_*` and `uneven` (issue #6), from the workers' own clocks.

    python bench/worker_gaps.py [--jobs 2] [--repeat 3] [--out bench/results/suite]

The suite's efficiency is serial time / (workers x wall), with the serial loop timed in its
own cell.  It mixes two things: what procqueue loses (workers idle between tasks, at the
start, at the tail) and what the machine does to the tasks themselves when N run at once
(shared caches, frequency, neighbours on a shared VM).  Here each task reports its worker's pid
and its own start and end time, so the two are told apart:

  * task time / (workers x wall)   procqueue's own share: 1.0 means no worker was ever idle;
  * task time / serial             how much slower the tasks ran N at a time (the machine);
  * gap (median, total)            a worker's idle time between two consecutive tasks;
  * end spread                     how far apart the workers finished (the tail's balance).

Workloads as in the suite at --scale 0.5: 200 x 10 ms, 2,000 x 1 ms (map, imap, submit) and
`uneven` (default map).  Writes <out>/worker_gaps.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# E402 is expected: bench/ must be on sys.path (just above) before its own modules import
import harness  # noqa: E402
from cases import busy, make_uneven, warm  # noqa: E402


def timed_busy(iterations: int) -> tuple[int, float, float]:
    """A task that says where and when it ran (wall clock: comparable across processes)."""
    started = time.time()
    busy(iterations)
    return os.getpid(), started, time.time()


def run_once(pool: Any, api: str, xs: list[int]) -> tuple[list[tuple[int, float, float]], float]:
    started = time.time()
    if api == "map":
        rows = pool.map(timed_busy, xs)
    elif api == "imap":
        rows = list(pool.imap(timed_busy, xs))
    else:
        rows = [f.result() for f in [pool.submit(timed_busy, x) for x in xs]]
    return rows, time.time() - started


def analyse(rows: list[tuple[int, float, float]], wall: float, serial: float,
            jobs: int) -> dict[str, float]:
    by_worker: dict[int, list[tuple[float, float]]] = {}
    for pid, start, end in rows:
        by_worker.setdefault(pid, []).append((start, end))
    task_time = sum(end - start for _, start, end in rows)
    gaps: list[float] = []
    ends = []
    for spans in by_worker.values():
        spans.sort()
        gaps += [b[0] - a[1] for a, b in zip(spans, spans[1:])]
        ends.append(spans[-1][1])
    return {"own": task_time / (jobs * wall), "slowdown": task_time / serial,
            "suite": serial / (jobs * wall), "gap_median_us": statistics.median(gaps) * 1e6,
            "gaps_ms": sum(gaps) * 1e3 / len(by_worker),
            "end_spread_ms": (max(ends) - min(ends)) * 1e3}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", type=Path, default=HERE / "results" / "suite")
    args = p.parse_args()
    harness.compile_procqueue()
    import procqueue

    per_ms = harness.load_or_calibrate(args.out / "calibration.json", busy,
                                       False)["iterations_per_ms"]  # the suite's, if it ran
    workloads = {"cpu_10ms": ([10 * per_ms] * 200, ("map", "imap", "submit")),
                 "cpu_1ms": ([per_ms] * 2000, ("map", "imap", "submit")),
                 "uneven": (make_uneven(0.5, per_ms).inputs, ("map",))}
    lines = ["# Worker-side efficiency (`python bench/worker_gaps.py`)", "",
             f"{time.strftime('%Y-%m-%d %H:%M')}, {args.jobs} workers, medians of {args.repeat} "
             "runs (serial loop timed just before each run).  own = task time / (workers x "
             "wall); slowdown = task time / serial; suite = serial / (workers x wall).", "",
             "| workload | api | own | slowdown | suite | gap median us | gaps per worker ms "
             "| end spread ms |", "|---|---|---|---|---|---|---|---|"]
    for name, (xs, apis) in workloads.items():
        for api in apis:
            runs = []
            for _ in range(args.repeat):
                started = time.perf_counter()
                for x in xs:
                    busy(x)
                serial = time.perf_counter() - started
                with procqueue.Pool(args.jobs) as pool:
                    pool.map(warm, range(100))
                    rows, wall = run_once(pool, api, xs)
                runs.append(analyse(rows, wall, serial, args.jobs))
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            line = (f"| {name} | {api} | {med['own']:.3f} | {med['slowdown']:.3f} | "
                    f"{med['suite']:.3f} | {med['gap_median_us']:.0f} | {med['gaps_ms']:.1f} | "
                    f"{med['end_spread_ms']:.1f} |")
            print(line, flush=True)
            lines.append(line)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "worker_gaps.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
