"""How procqueue scales from 1 to N workers on CPU-bound tasks, beside the peers (weak scaling:
the work grows with the workers, so an ideal pool keeps the wall time constant).

    python bench/scaling.py [--workers 1 2 4 8 16] [--workloads cpu_1ms cpu_10ms]
                            [--rounds 1] [--ideal-s 0.8] [--out bench/results/scaling.md]

Meant for a machine with at least as many cores as the largest N (on 2 cores, N > 2 only
measures time-sharing).  A cell (a system's API, N workers, one workload) runs in a fresh
interpreter, its pool opened and warmed up (every worker started, the function loaded) before
the timed call, on N x ideal_s / task_ms inputs of calibrated pure-Python work (cases.busy: a
fixed number of iterations, so every system does the same computation).

Utilisation = the time the tasks took inside the workers (each task times itself) / (N x
wall): 1.0 when every worker ran the function all along, whatever the pool spends dispatching,
collecting and idling lowering it.  It does not depend on how fast the cores run, which a
shared or virtual machine varies from second to second (on the 16-core machine of
bench/README, the same task took 1 to 2 times its calibrated time from cell to cell, even on
one worker), so it compares pools where wall time and tasks/s cannot.  The mean time of one
task in the cell shows what the cores did (slower when all are busy: shared caches, sibling
hyperthreads, clock).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import harness  # noqa: E402
from cases import busy, busy_timed, warm  # noqa: E402
from systems import SYSTEMS  # noqa: E402

APIS: list[tuple[str, str]] = [
    ("procqueue", "map"), ("procqueue", "imap"), ("procqueue", "submit"),
    ("mp", "map"), ("mp", "imap"), ("mpire", "map"), ("joblib", "parallel"),
    ("ppe", "submit"), ("loky", "submit")]
TASK_MS = {"cpu_1ms": 1, "cpu_10ms": 10}
WARM_TASKS_PER_WORKER = 4


# ---- one cell, in its own interpreter -------------------------------------------------------

def run_cell(spec: dict[str, Any]) -> dict[str, Any]:
    iterations = TASK_MS[spec["workload"]] * spec["per_ms"]
    xs = [iterations] * spec["tasks"]
    system = SYSTEMS[spec["system"]]()
    system.open(spec["jobs"])
    try:
        system.call(spec["api"], warm, system.prepare(spec["api"], [0] * (
            WARM_TASKS_PER_WORKER * spec["jobs"])))
        prepared = system.prepare(spec["api"], xs)
        results, m = harness.measure_call(lambda: system.call(spec["api"], busy_timed, prepared),
                                          system.supervisor_thread, sample_rss=False)
    finally:
        system.close()
    if [r for r, _ in results] != [busy(iterations)] * len(xs):
        raise AssertionError(f"wrong results: {len(results)} for {len(xs)} inputs")
    in_tasks_s = sum(took for _, took in results)
    return {"wall_s": m.wall_s, "utilisation": in_tasks_s / (spec["jobs"] * m.wall_s),
            "task_ms": in_tasks_s / len(xs) * 1e3, "tasks_per_s": len(xs) / m.wall_s,
            "parent_cpu_us_per_task": m.parent_cpu_s / len(xs) * 1e6,
            "loadavg_1min": os.getloadavg()[0]}


# ---- the run --------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.cell_arguments(parser, workers=[1, 2, 4, 8, 16], rounds=1, ideal_s=0.8,
                           out=HERE / "results" / "scaling.md")
    parser.add_argument("--workloads", nargs="+", default=list(TASK_MS), choices=list(TASK_MS))
    args = parser.parse_args()
    if args.cell:
        print(json.dumps(run_cell(json.loads(args.cell))))
        return
    harness.compile_procqueue()
    env = harness.environment()
    per_ms = harness.calibrate_iterations_per_ms(busy)
    apis = [a for a in APIS if args.only is None or f"{a[0]}:{a[1]}" in args.only]
    rows: list[dict[str, Any]] = []
    for round_ in range(args.rounds):
        for workload in args.workloads:
            for jobs in args.workers:
                for system, api in apis:
                    tasks = max(1, int(jobs * args.ideal_s * 1000 / TASK_MS[workload]))
                    spec = {"system": system, "api": api, "jobs": jobs, "workload": workload,
                            "tasks": tasks, "per_ms": per_ms, "round": round_}
                    row = {**spec, **harness.run_in_fresh_process(
                        [__file__, "--cell", json.dumps(spec)], timeout_s=120)}
                    rows.append(row)
                    shown = row.get("error") or (
                        f"utilisation {row['utilisation']:.3f}, task {row['task_ms']:.2f} ms, "
                        f"{row['tasks_per_s']:,.0f} tasks/s, parent "
                        f"{row['parent_cpu_us_per_task']:.1f} us/task")
                    print(f"round {round_ + 1} {workload} N={jobs:<3} {system}:{api:<9} {shown}",
                          flush=True)
    harness.save_results(args.out, {"env": env, "per_ms": per_ms, "rows": rows},
                         _report(rows, env, args))


def _report(rows: list[dict[str, Any]], env: dict[str, Any], args: argparse.Namespace) -> str:
    ns = sorted({r["jobs"] for r in rows})
    lines = [
        "# Scaling from 1 to N workers, CPU-bound tasks", "",
        f"{env['when']}, Python {env['python']}, {env['usable_cpus']} usable CPUs, load "
        f"{env['loadavg_start'][0]:.2f} at start.  `python bench/scaling.py --workers "
        f"{' '.join(map(str, args.workers))} --rounds {args.rounds} --ideal-s {args.ideal_s:g}`:"
        f" N x {args.ideal_s:g} s of calibrated pure-Python work per cell, each cell in a fresh "
        "interpreter; the median of the rounds.  Utilisation: the tasks' own time inside the "
        "workers / (N x wall), 1.0 = every worker in the function all along.", ""]
    for workload in [w for w in TASK_MS if any(r["workload"] == w for r in rows)]:
        lines += [f"## {workload}: utilisation of the N workers", "",
                  "| API | " + " | ".join(f"N={n}" for n in ns) + " |",
                  "|---|" + "---|" * len(ns)]
        for system, api in [a for a in APIS if any((r["system"], r["api"]) == a for r in rows)]:
            cells = []
            for n in ns:
                mine = _cells(rows, workload, n, (system, api))
                cells.append("error" if not mine else
                             f"{statistics.median(r['utilisation'] for r in mine):.2f}")
            lines.append(f"| {system} `{api}` | " + " | ".join(cells) + " |")
        task_ms = [statistics.median(r["task_ms"] for r in _cells(rows, workload, n)) for n in ns]
        lines += ["| one task's time, ms (median of the cells) | "
                  + " | ".join(f"{t:.2f}" for t in task_ms) + " |", ""]
    failed = harness.failed_cells(
        rows, lambda r: f"{r['system']}:{r['api']} {r['workload']} N={r['jobs']}")
    if failed:
        lines += [failed, ""]
    return "\n".join(lines)


def _cells(rows: list[dict[str, Any]], workload: str, jobs: int,
           api: tuple[str, str] | None = None) -> list[dict[str, Any]]:
    return [r for r in rows if r["workload"] == workload and r["jobs"] == jobs
            and "utilisation" in r and (api is None or (r["system"], r["api"]) == api)]


if __name__ == "__main__":
    main()
