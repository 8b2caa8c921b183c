"""How many 1 ms workers one supervisor feeds (issue #24, part 1), without a machine that has
as many cores: N workers run `time.sleep(0.001)` tasks, which need almost no CPU, so what
limits the run is the parent's cost per task (dispatching, reading results), the cost a
64- or 192-core machine with 1 ms tasks would meet.

    python bench/many_workers.py [--workers 8 32 64 128] [--rounds 2] [--ideal-s 1.5]

Each cell (a system's API at one N) runs in a fresh interpreter, its pool opened and warmed
up (every worker started, the function loaded) before the timed call.  A cell gets
N x ideal_s / 1 ms tasks (about `--ideal-s` of wall time if every worker were busy all along),
the APIs that manage a few thousand tasks a second at most SLOW_API_TASKS.

Efficiency = tasks x (one task's measured run time) / (N x wall): 1.0 when every worker was
busy all along.  The task's run time is measured in each cell (time.sleep(0.001) takes a
little more than 1 ms), so it is not counted against the pool.  Each cell's line also gives
the CPU per task of the parent and of the workers (their sum, over 2 cores here, is what the
sleeping workers' wake-ups compete with).  Prints a table and writes
bench/results/many_workers.md (and .json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import harness  # noqa: E402
from cases import nap_1ms, warm  # noqa: E402

SLOW_API_TASKS = 20_000
# (system, api) -> what the cell calls.  Per-task options: a timeout on each task (its inputs
# still travel in blocks: a timed block marks each input's start); a concurrency cap and a
# key (gates and keys count each start: every input is a Task of its own); few keys: N keys
# of one task at once each, exactly the places N workers need.
APIS: list[tuple[str, str]] = [
    ("procqueue", "map"), ("procqueue", "map+unpinned"), ("procqueue", "imap"),
    ("procqueue", "submit"),
    ("procqueue", "imap+timeout"), ("procqueue", "imap+concurrency"), ("procqueue", "imap+key"),
    ("procqueue", "imap+fewkeys"),
    ("mp", "map"), ("mp", "imap"), ("joblib", "parallel"),
    ("ppe", "submit"), ("loky", "submit")]
# procqueue's submit() gets the full count, as in issue #24's own table (100,000 tasks): at
# 20,000 an N=64 cell lasts 0.3 s, and the first tasks' start and the last ones' tail weigh
# five times as much as in the other APIs' cells.
SLOW_APIS = {("ppe", "submit"), ("loky", "submit"), ("joblib", "parallel")}
WARM_TASKS_PER_WORKER = 4


# ---- one cell, in its own interpreter -------------------------------------------------------

def run_cell(spec: dict[str, Any]) -> dict[str, Any]:
    system_name, api, jobs = spec["system"], spec["api"], spec["jobs"]
    tasks = spec["tasks"]
    xs = list(range(tasks))
    task_s = _measured_task_s()
    system = _system(system_name)
    if api.endswith("+unpinned"):  # more workers than CPUs: the kernel places each wake-up
        system.open(jobs, pin=False)
    else:
        system.open(jobs)
    try:
        call = _caller(system, api, jobs)
        call(warm, list(range(WARM_TASKS_PER_WORKER * jobs)))  # every worker started
        workers_before = _descendants_cpu_s()
        results, m = harness.measure_call(lambda: call(nap_1ms, xs), system.supervisor_thread,
                                          sample_rss=False)
        workers_s = _descendants_cpu_s() - workers_before
    finally:
        system.close()
    if sorted(results) != xs:
        raise AssertionError(f"wrong results: {len(results)} for {tasks} inputs")
    return {**spec, "wall_s": m.wall_s, "task_s": task_s,
            "efficiency": tasks * task_s / (jobs * m.wall_s),
            "tasks_per_s": tasks / m.wall_s,
            "parent_cpu_us_per_task": m.parent_cpu_s / tasks * 1e6,
            "supervisor_cpu_us_per_task": None if m.supervisor_cpu_s is None
            else m.supervisor_cpu_s / tasks * 1e6,
            "workers_cpu_us_per_task": workers_s / tasks * 1e6,
            "loadavg_1min": os.getloadavg()[0]}


def _descendants_cpu_s() -> float:
    """CPU time so far of this process's descendants (the pool's workers and servers), from
    /proc/PID/task/*/schedstat: nanoseconds, where psutil's cpu_times counts 10 ms ticks (a
    1 ms task's few µs would round away).  A process that exits meanwhile drops out."""
    import psutil

    total_ns = 0
    for child in psutil.Process().children(recursive=True):
        try:
            for tid in os.listdir(f"/proc/{child.pid}/task"):
                with open(f"/proc/{child.pid}/task/{tid}/schedstat") as stat:
                    total_ns += int(stat.read().split()[0])
        except OSError:
            continue
    return total_ns / 1e9


def _measured_task_s(samples: int = 500) -> float:
    """What nap_1ms takes here, run alone (the median of `samples` calls)."""
    took = []
    for _ in range(samples):
        t0 = time.perf_counter()
        nap_1ms(0)
        took.append(time.perf_counter() - t0)
    return statistics.median(took)


def key_of(x: int) -> int:
    return x % 1024  # 1,024 keys, up to 4 tasks of each at once: never the bottleneck


def _system(name: str) -> Any:
    import systems

    return {"procqueue": systems.Procqueue, "mp": systems.MpPool, "joblib": systems.Joblib,
            "ppe": systems.Ppe, "loky": systems.Loky}[name]()


def _caller(system: Any, api: str, jobs: int) -> Any:
    options = {"imap+timeout": {"timeout": 60},
               "imap+concurrency": {"concurrency": jobs},  # caps nothing: costs only
               "imap+key": {"key": key_of, "key_concurrency": 4},
               "imap+fewkeys": {"key": lambda x: x % jobs, "key_concurrency": 1}}.get(api)
    if options is not None:
        view = system.pool.options(**options)
        return lambda fn, xs: list(view.imap(fn, xs))
    return lambda fn, xs: system.call(api.removesuffix("+unpinned"), fn, xs)


# ---- the run --------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.cell_arguments(parser, workers=[8, 32, 64, 128], rounds=2, ideal_s=1.5,
                           out=HERE / "results" / "many_workers.md")
    args = parser.parse_args()
    if args.cell:
        print(json.dumps(run_cell(json.loads(args.cell))))
        return
    harness.compile_procqueue()
    env = harness.environment()
    apis = [a for a in APIS if args.only is None or f"{a[0]}:{a[1]}" in args.only]
    rows: list[dict[str, Any]] = []
    for round_ in range(args.rounds):
        for jobs in args.workers:
            for system, api in apis:
                tasks = int(jobs * args.ideal_s / 0.001)
                if (system, api) in SLOW_APIS:
                    tasks = min(tasks, SLOW_API_TASKS)
                spec = {"system": system, "api": api, "jobs": jobs, "tasks": tasks,
                        "round": round_}
                row = harness.run_in_fresh_process([__file__, "--cell", json.dumps(spec)])
                row = {**spec, **row}
                rows.append(row)
                shown = row.get("error") or (f"efficiency {row['efficiency']:.3f}, "
                                             f"{row['tasks_per_s']:,.0f} tasks/s, parent "
                                             f"{row['parent_cpu_us_per_task']:.1f} us/task, "
                                             f"workers {row['workers_cpu_us_per_task']:.1f}")
                print(f"round {round_ + 1} N={jobs:<4} {system}:{api:<14} {shown}", flush=True)
    harness.save_results(args.out, {"env": env, "rows": rows}, _report(rows, env, args))


def _report(rows: list[dict[str, Any]], env: dict[str, Any], args: argparse.Namespace) -> str:
    ns = sorted({r["jobs"] for r in rows})
    lines = [
        "# Many workers, 1 ms tasks: how many one supervisor feeds (issue #24)", "",
        f"{env['when']}, Python {env['python']}, {env['usable_cpus']} usable CPUs, load "
        f"{env['loadavg_start'][0]:.2f} at start, procqueue {env['procqueue_commit']}"
        f"{' (dirty)' if env['procqueue_dirty'] else ''}.  `python bench/many_workers.py "
        f"--workers {' '.join(map(str, args.workers))} --rounds {args.rounds}`: N workers, "
        f"`time.sleep(0.001)` tasks, N x {args.ideal_s:g} s / 1 ms tasks per cell (at most "
        f"{SLOW_API_TASKS:,} for the peers' per-task APIs and joblib), each cell in a fresh "
        "interpreter; the median of the rounds.", "",
        "Efficiency: tasks x one task's run time / (N x wall), 1.0 = every worker busy all "
        "along.  Parent CPU: the pool's process (caller, supervisor and feeder threads) per "
        "task.", "",
        "| API | " + " | ".join(f"N={n} efficiency | tasks/s | parent µs/task" for n in ns)
        + " |",
        "|---|" + "---|---|---|" * len(ns)]
    for system, api in [a for a in APIS if any((r["system"], r["api"]) == a for r in rows)]:
        cells = []
        for n in ns:
            mine = [r for r in rows if (r["system"], r["api"], r["jobs"]) == (system, api, n)
                    and "efficiency" in r]
            if not mine:
                cells += ["error", "", ""]
                continue
            cells += [f"{statistics.median(r['efficiency'] for r in mine):.2f}",
                      f"{statistics.median(r['tasks_per_s'] for r in mine):,.0f}",
                      f"{statistics.median(r['parent_cpu_us_per_task'] for r in mine):.1f}"]
        lines.append(f"| {system} `{api}` | " + " | ".join(cells) + " |")
    failed = harness.failed_cells(rows, lambda r: f"{r['system']}:{r['api']} N={r['jobs']}")
    if failed:
        lines += ["", failed]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
