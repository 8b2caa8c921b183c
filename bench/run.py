"""Benchmarks of procqueue against the pools a user would pick instead, side by side.

    python bench/run.py                        # everything, 3 repeats, 2 workers
    python bench/run.py --workloads tiny,uneven --systems procqueue,mp --repeat 5

Every (workload, system, api) cell runs in a fresh subprocess (`--one`), so no pool's state
leaks into another's figures; a cell reports its wall time, the parent process's CPU time
(all its threads: the supervisor's cost per task) and the peak RSS of the process tree.  The
table keeps the median of the repeats; ratios are taken between cells of the same run only,
because this machine is shared and noisy.  Results: bench/results/latest.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from workloads import WORKLOADS, Workload  # noqa: E402

SYSTEMS: dict[str, list[str]] = {  # system -> the APIs measured
    "serial": ["loop"],
    "procqueue": ["map", "imap", "imap_unordered", "submit"],
    "mp": ["map", "imap"],
    "ppe": ["map", "submit"],
    "loky": ["map", "submit"],
    "mpire": ["map", "imap_unordered"],
    "joblib": ["parallel"],
}
SUBMIT_TASK_CAP = 20_000  # submit-style APIs get at most this many tiny tasks (peers are slow)
SAMPLE_RSS_EVERY_S = 0.02
WARM_UP_TASKS = 20  # run through each pool before timing: workers started, functions loaded


# ---- one cell, in its own process -------------------------------------------------------------

def run_cell(workload: Workload, system: str, api: str, workers: int) -> dict[str, Any]:
    inputs = workload.inputs()
    if api in ("submit", "parallel") and workload.name == "tiny":
        inputs = inputs[:SUBMIT_TASK_CAP]
    sampler = RssSampler()
    sampler.start()
    cpu0 = _cpu_s()
    if workload.name == "startup":
        started = time.perf_counter()
        for _ in range(workload.repeat_inside):
            _startup(system, workers, workload.fn)
        wall = (time.perf_counter() - started) / workload.repeat_inside
    else:
        driver = Driver(system, api, workers)
        driver.open(workload.fn, inputs[:WARM_UP_TASKS])
        cpu0 = _cpu_s()  # the call's CPU, not the pool's start-up
        started = time.perf_counter()
        results = driver.call(workload.fn, inputs)
        wall = time.perf_counter() - started
        cpu = _cpu_s() - cpu0
        driver.close()
        workload.check(inputs, results)
        cpu0 = _cpu_s() - cpu
    cpu = _cpu_s() - cpu0
    sampler.stop()
    return {"workload": workload.name, "system": system, "api": api, "tasks": len(inputs),
            "wall_s": wall, "parent_cpu_s": cpu, "peak_rss_mb": sampler.peak / 2**20}


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class RssSampler(threading.Thread):
    """Peak RSS of this process and all its descendants."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop_event.wait(SAMPLE_RSS_EVERY_S):
            total = 0
            for proc in [me] + me.children(recursive=True):
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


class Driver:
    """One system's pool: opened and warmed up before the timed call, closed after it, so the
    figures are the call's (startup has its own workload)."""

    def __init__(self, system: str, api: str, workers: int) -> None:
        self.system, self.api, self.workers = system, api, workers
        self.pool: Any = None

    def open(self, fn: Callable[[Any], Any], warm_up: list[Any]) -> None:
        s, n = self.system, self.workers
        if s == "procqueue":
            from procqueue import Pool

            self.pool = Pool(n)
        elif s == "mp":
            import multiprocessing

            self.pool = multiprocessing.get_context("forkserver").Pool(n)
        elif s == "ppe":
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(n)
        elif s == "loky":
            from loky import get_reusable_executor

            self.pool = get_reusable_executor(max_workers=n)
        elif s == "mpire":
            from mpire import WorkerPool

            self.pool = WorkerPool(n_jobs=n, start_method="forkserver", keep_alive=True)
        elif s == "joblib":
            from joblib import Parallel

            self.pool = Parallel(n_jobs=n)
            self.pool.__enter__()  # keeps its workers between calls
        if warm_up:
            self.call(fn, warm_up)

    def call(self, fn: Callable[[Any], Any], xs: list[Any]) -> list[Any]:
        s, api, pool = self.system, self.api, self.pool
        if s == "serial":
            return [fn(x) for x in xs]
        if api == "submit":
            return [f.result() for f in [pool.submit(fn, x) for x in xs]]
        if s == "procqueue":
            result = getattr(pool, api)(fn, xs)
            return sorted(result) if api == "imap_unordered" else list(result)
        if s == "mp":
            return pool.map(fn, xs) if api == "map" else list(pool.imap(fn, xs))
        if s in ("ppe", "loky"):
            return list(pool.map(fn, xs))
        if s == "mpire":
            args = [(x,) for x in xs]
            return pool.map(fn, args) if api == "map" else sorted(pool.imap_unordered(fn, args))
        if s == "joblib":
            from joblib import delayed

            return list(pool(delayed(fn)(x) for x in xs))
        raise ValueError(s)

    def close(self) -> None:
        s, pool = self.system, self.pool
        if pool is None:
            return
        if s in ("procqueue", "mp"):
            pool.terminate()
            pool.join()
        elif s == "ppe":
            pool.shutdown(wait=True)
        elif s == "loky":
            pool.shutdown(wait=True, kill_workers=True)
        elif s == "mpire":
            pool.terminate()
        elif s == "joblib":
            pool.__exit__(None, None, None)


def _startup(system: str, n: int, fn: Any) -> None:
    if system == "serial":
        fn(1)
    elif system == "procqueue":
        from procqueue import Pool

        with Pool(n) as pool:
            pool.apply(fn, (1,))
    elif system == "mp":
        import multiprocessing

        with multiprocessing.get_context("forkserver").Pool(n) as pool:
            pool.apply(fn, (1,))
    elif system in ("ppe", "loky"):
        if system == "ppe":
            from concurrent.futures import ProcessPoolExecutor as Executor

            with Executor(n) as ex:
                ex.submit(fn, 1).result()
        else:
            from loky import get_reusable_executor

            ex = get_reusable_executor(max_workers=n)
            ex.submit(fn, 1).result()
            ex.shutdown(wait=True, kill_workers=True)
    elif system == "mpire":
        from mpire import WorkerPool

        with WorkerPool(n_jobs=n, start_method="forkserver") as pool:
            pool.map(fn, [(1,)])
    elif system == "joblib":
        from joblib import Parallel, delayed

        Parallel(n_jobs=n)(delayed(fn)(1) for _ in range(1))


# ---- the driver -------------------------------------------------------------------------------

def measure(workload: str, system: str, api: str, workers: int, scale: float) -> dict[str, Any]:
    cmd = [sys.executable, str(HERE / "run.py"), "--one", workload, system, api,
           "--jobs", str(workers), "--scale", str(scale)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if run.returncode != 0:
        return {"workload": workload, "system": system, "api": api,
                "error": run.stderr.strip().splitlines()[-1] if run.stderr.strip() else "failed"}
    return json.loads(run.stdout.strip().splitlines()[-1])


def summarise(rows: list[dict[str, Any]], workers: int) -> list[dict[str, Any]]:
    """Median of the repeats per cell, plus the figure each workload is judged by."""
    cells: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        cells.setdefault((row["workload"], row["system"], row["api"]), []).append(row)
    serial = {w: statistics.median(r["wall_s"] for r in rs if "wall_s" in r)
              for (w, s, _), rs in cells.items() if s == "serial" and any("wall_s" in r for r in rs)}
    table = []
    for (workload, system, api), runs in cells.items():
        ok = [r for r in runs if "wall_s" in r]
        if not ok:
            table.append({"workload": workload, "system": system, "api": api,
                          "error": runs[0].get("error", "failed")})
            continue
        wall = statistics.median(r["wall_s"] for r in ok)
        tasks = ok[0]["tasks"]
        row = {"workload": workload, "system": system, "api": api, "tasks": tasks,
               "wall_s": wall, "tasks_per_s": tasks / wall if wall else 0.0,
               "parent_cpu_us_per_task": statistics.median(r["parent_cpu_s"] for r in ok)
               / max(tasks, 1) * 1e6,
               "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in ok)}
        base = serial.get(workload)
        if base and workload in ("cpu_1ms", "cpu_10ms", "uneven"):
            row["efficiency"] = base / (workers * wall)
        if base and workload == "big_args":
            row["x_serial_time"] = wall / base
        table.append(row)
    return table


def markdown(table: list[dict[str, Any]], workers: int, repeat: int) -> str:
    lines = [f"# procqueue benchmarks ({workers} workers, median of {repeat}, "
             f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs)", "",
             "| workload | system | api | tasks | wall s | tasks/s | efficiency | x serial | "
             "parent CPU us/task | peak RSS MB |", "|" + "---|" * 10]
    for r in sorted(table, key=lambda r: (r["workload"], r["system"] != "procqueue", r["system"],
                                          r["api"])):
        if "error" in r:
            lines.append(f"| {r['workload']} | {r['system']} | {r['api']} | error: "
                         f"{r['error'][:60]} | | | | | | |")
            continue
        lines.append(
            f"| {r['workload']} | {r['system']} | {r['api']} | {r['tasks']} | {r['wall_s']:.3f} | "
            f"{r['tasks_per_s']:,.0f} | {_fmt(r.get('efficiency'))} | {_fmt(r.get('x_serial_time'))} "
            f"| {r['parent_cpu_us_per_task']:.1f} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def plot(table: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("tiny", "tasks_per_s", "tiny: tasks/s (higher is better)"),
              ("cpu_1ms", "efficiency", "cpu_1ms: efficiency"),
              ("cpu_10ms", "efficiency", "cpu_10ms: efficiency"),
              ("uneven", "efficiency", "uneven: efficiency"),
              ("big_args", "x_serial_time", "big_args: x serial time (lower is better)"),
              ("startup", "wall_s", "startup: seconds (lower is better)")]
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    for ax, (workload, key, title) in zip(axes.flat, panels):
        rows = [r for r in table if r["workload"] == workload and key in r and r["system"] != "serial"]
        rows.sort(key=lambda r: r[key])
        labels = [f"{r['system']}.{r['api']}" for r in rows]
        colours = ["#2b6cb0" if r["system"] == "procqueue" else "#a0aec0" for r in rows]
        ax.barh(labels, [r[key] for r in rows], color=colours)
        if workload == "tiny":
            ax.set_xscale("log")  # mp.map's big chunks would flatten every other bar
        ax.set_title(title, fontsize=10)
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", nargs=3, metavar=("WORKLOAD", "SYSTEM", "API"))
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1.0, help="shrink/grow the task counts")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if args.one:
        workload, system, api = args.one
        print(json.dumps(run_cell(WORKLOADS[workload](args.scale), system, api, args.jobs)))
        return
    rows = []
    cells = [(w, s, a) for w in args.workloads.split(",") for s in args.systems.split(",")
             for a in SYSTEMS[s]]
    for round_ in range(args.repeat):
        random.shuffle(cells)  # spread the machine's noise over every system
        for w, s, a in cells:
            row = measure(w, s, a, args.jobs, args.scale)
            rows.append(row)
            print(f"[{round_ + 1}/{args.repeat}] {w:9s} {s:10s} {a:15s} "
                  f"{row.get('wall_s', float('nan')):8.3f} s  {row.get('error', '')}", flush=True)
    table = summarise(rows, args.jobs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps({"rows": rows, "table": table}, indent=1))
    (args.out / "latest.md").write_text(markdown(table, args.jobs, args.repeat))
    try:
        plot(table, args.out / "latest.png")
    except ImportError:
        print("matplotlib missing: no plot (pip install -e .[bench])", file=sys.stderr)
    print(markdown(table, args.jobs, args.repeat))


if __name__ == "__main__":
    main()
