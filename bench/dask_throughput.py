"""The Dask backend's throughput against the local pool, on this machine (issue #7).

    python bench/dask_throughput.py            # ~1.5 min on 2 cores; writes bench/results/dask.*

Two workers on each side: the local procqueue.Pool(2), and Pool(2, backend="dask"), which starts
a LocalCluster of 2 single-threaded worker processes (its start is timed apart, never inside a
measurement).  Workloads, each through pool.map, REPEATS times, medians reported:

  cpu_10ms   200 items of 10 ms of pure-Python work (a calibrated, fixed number of loop turns,
             not "spin until 10 ms": fixed work is the same work for the serial baseline and the
             pools, whoever else uses the cores); efficiency = serial time / (2 x wall time)
  tiny       20,000 calls of a function returning its argument; items per second
  chunking   tiny on Dask with adaptive chunks vs chunksize=1 (one Dask task per item; 2,000
             calls, as each costs milliseconds)

Every cell is warmed up once with the same function first (not measured): adaptive chunking
learns from the first items of a function, and a first call also pays for unpickling it.
Both pools stay up for the whole run and the repeats are interleaved (local, Dask, local...),
so a neighbour's load on this shared machine hits both sides alike; ratios are taken within
one run.  Functions live in this file: the local pool ships them by value (cloudpickle), the
Dask workers import this file as __mp_main__ (spawn), which is why distributed is imported
only under __main__.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
WORKERS = 2
REPEATS = 3
CPU_TASKS = 200
CPU_TASK_MS = 10.0
TINY_CALLS = 20_000
TINY_CHUNKSIZE_1_CALLS = 2_000
CALIBRATION_TURNS = 300_000  # loop turns timed to find how many make CPU_TASK_MS
CALIBRATION_PROBES = 20  # the fastest probe is the least disturbed one (shared machine)


def busy(turns: int) -> int:
    """Pure-Python CPU work: `turns` turns of an integer loop (holds the GIL)."""
    acc = 0
    for i in range(turns):
        acc ^= i * 7
    return acc & 0xFF


def trivial(x: int) -> int:
    return x


def calibrate_turns(task_ms: float) -> int:
    """Loop turns that take `task_ms` here, from the fastest of CALIBRATION_PROBES probes."""
    best_s = min(_timed(lambda: busy(CALIBRATION_TURNS)) for _ in range(CALIBRATION_PROBES))
    return max(1, round(CALIBRATION_TURNS * task_ms / 1000 / best_s))


def _timed(call: Callable[[], Any]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def serial_s(turns: int) -> float:
    """The cpu_10ms workload run in this process, one item after another."""
    return _timed(lambda: [busy(turns) for _ in range(CPU_TASKS)])


def map_s(pool: Any, fn: Callable[[Any], Any], inputs: list[Any],
          chunksize: int | None = None) -> float:
    """Wall time of one pool.map, its results checked (a wrong answer is no measurement)."""
    started = time.perf_counter()
    results = pool.map(fn, inputs, chunksize)
    elapsed = time.perf_counter() - started
    if len(results) != len(inputs) or results[-1] != fn(inputs[-1]):
        raise AssertionError(f"{fn.__name__}: wrong results")
    return elapsed


class Cells:
    """The measured cells: name -> (pool, function, inputs, chunksize)."""

    def __init__(self, local: Any, dask: Any, turns: int) -> None:
        cpu = [turns] * CPU_TASKS
        tiny = list(range(TINY_CALLS))
        self.cells: dict[str, tuple[Any, Callable[[Any], Any], list[Any], int | None]] = {
            "local cpu_10ms": (local, busy, cpu, None),
            "dask cpu_10ms": (dask, busy, cpu, None),
            "local tiny": (local, trivial, tiny, None),
            "dask tiny": (dask, trivial, tiny, None),
            "dask tiny chunksize=1": (dask, trivial, tiny[:TINY_CHUNKSIZE_1_CALLS], 1),
        }

    def warm_up(self) -> None:
        for pool, fn, inputs, chunksize in self.cells.values():
            map_s(pool, fn, inputs[: max(len(inputs) // 10, 20)], chunksize)

    def run_once(self) -> dict[str, float]:
        return {name: map_s(pool, fn, inputs, chunksize)
                for name, (pool, fn, inputs, chunksize) in self.cells.items()}


def start_pools() -> tuple[Any, Any, dict[str, float]]:
    """Both pools, with how long each took to start (outside every measurement)."""
    from procqueue import Pool

    started = time.perf_counter()
    local = Pool(WORKERS)
    local_start_s = time.perf_counter() - started
    started = time.perf_counter()
    dask = Pool(WORKERS, backend="dask")  # a LocalCluster of WORKERS 1-thread processes
    dask_start_s = time.perf_counter() - started
    return local, dask, {"local_pool_start_s": local_start_s,
                         "dask_local_cluster_start_s": dask_start_s}


def figures(runs: list[dict[str, float]], serial: list[float]) -> dict[str, Any]:
    """Medians over the repeats, and the figures the workloads are judged by."""
    median = {name: statistics.median(run[name] for run in runs) for name in runs[0]}
    serial_median = statistics.median(serial)
    fig: dict[str, Any] = {"median_wall_s": median, "serial_cpu_10ms_s": serial_median}
    fig["efficiency"] = {side: serial_median / (WORKERS * median[f"{side} cpu_10ms"])
                         for side in ("local", "dask")}
    fig["items_per_s"] = {
        "local tiny": TINY_CALLS / median["local tiny"],
        "dask tiny": TINY_CALLS / median["dask tiny"],
        "dask tiny chunksize=1": TINY_CHUNKSIZE_1_CALLS / median["dask tiny chunksize=1"],
        "local cpu_10ms": CPU_TASKS / median["local cpu_10ms"],
        "dask cpu_10ms": CPU_TASKS / median["dask cpu_10ms"],
    }
    rates = fig["items_per_s"]
    fig["ratios"] = {
        "cpu_10ms dask/local efficiency": fig["efficiency"]["dask"] / fig["efficiency"]["local"],
        "tiny dask/local items_per_s": rates["dask tiny"] / rates["local tiny"],
        "dask tiny adaptive/chunksize=1 items_per_s":
            rates["dask tiny"] / rates["dask tiny chunksize=1"],
    }
    return fig


def machine() -> dict[str, Any]:
    import importlib

    dask = importlib.import_module("dask")
    distributed = importlib.import_module("distributed")  # imported here only: see the top

    model = ""
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model, "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(),
        "dask": dask.__version__, "distributed": distributed.__version__,
        "procqueue_commit": _git("rev-parse", "--short", "HEAD"),
        "working_tree_dirty": bool(_git("status", "--porcelain")),
        "loadavg_1min_start": os.getloadavg()[0],
    }


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def run(repeats: int) -> dict[str, Any]:
    env = machine()
    turns = calibrate_turns(CPU_TASK_MS)
    local, dask, starts = start_pools()
    try:
        cells = Cells(local, dask, turns)
        cells.warm_up()
        runs, serial = [], []
        for _ in range(repeats):
            serial.append(serial_s(turns))
            runs.append(cells.run_once())
    finally:
        local.terminate()
        dask.terminate()
    env["loadavg_1min_end"] = os.getloadavg()[0]
    return {"command": "python bench/dask_throughput.py", "workers": WORKERS,
            "repeats": repeats, "cpu_task_turns": turns, "machine": env, "startup": starts,
            "runs": runs, "serial_runs_s": serial, **figures(runs, serial)}


EFFICIENCY_NOTE = ("Efficiency = serial time / (2 x wall time): 100% is both workers busy with "
                   "the tasks' own work all the time.  Raw runs: `dask.json` (not committed).")


def markdown(result: dict[str, Any]) -> str:
    m, rates, eff = result["machine"], result["items_per_s"], result["efficiency"]
    wall, ratios, starts = result["median_wall_s"], result["ratios"], result["startup"]
    dirty = " + uncommitted changes" if m["working_tree_dirty"] else ""
    header = (
        f"Command: `{result['command']}` (medians of {result['repeats']} interleaved repeats, "
        "each cell warmed up once first).")
    machine_notes = (
        f"Machine: {m['cpu']}, {m['usable_cpus']} usable CPUs, Python {m['python']}, "
        f"dask/distributed {m['distributed']}, procqueue {m['procqueue_commit']}{dirty}.  "
        f"Shared machine: 1-min load average {m['loadavg_1min_start']:.2f} at the start, "
        f"{m['loadavg_1min_end']:.2f} at the end.  The Dask scheduler and the client run in "
        "the benchmark process, on the same cores as the workers.")
    pools = (
        f"Both sides: {WORKERS} worker processes.  Local: `Pool({WORKERS})`, started in "
        f"{starts['local_pool_start_s']:.2f} s.  Dask: `Pool({WORKERS}, backend=\"dask\")`, a "
        f"LocalCluster of {WORKERS} single-threaded worker processes, started in "
        f"{starts['dask_local_cluster_start_s']:.2f} s (in no figure below).")
    cpu_row = (
        f"| `cpu_10ms`, {CPU_TASKS} items: efficiency (serial "
        f"{result['serial_cpu_10ms_s']:.2f} s) | {eff['local']:.0%} "
        f"({wall['local cpu_10ms']:.2f} s) | {eff['dask']:.0%} ({wall['dask cpu_10ms']:.2f} s) "
        f"| {ratios['cpu_10ms dask/local efficiency']:.2f} |")
    tiny_row = (
        f"| `tiny`, {TINY_CALLS:,} items: items/s | {rates['local tiny']:,.0f} "
        f"| {rates['dask tiny']:,.0f} | {ratios['tiny dask/local items_per_s']:.2f} |")
    adaptive_row = (
        f"| adaptive chunks, {TINY_CALLS:,} items | {rates['dask tiny']:,.0f} "
        f"| {wall['dask tiny']:.3f} s |")
    one_row = (
        f"| `chunksize=1` (one Dask task per item), {TINY_CHUNKSIZE_1_CALLS:,} items "
        f"| {rates['dask tiny chunksize=1']:,.0f} | {wall['dask tiny chunksize=1']:.3f} s |")
    ratio_row = (
        f"| adaptive / `chunksize=1` "
        f"| {ratios['dask tiny adaptive/chunksize=1 items_per_s']:,.0f}x | |")
    return "\n".join([
        "# Dask backend vs local pool: throughput on this machine", "",
        header, "", machine_notes, "", pools, "",
        "| workload | local `Pool(2)` | Dask `Pool(2, backend=\"dask\")` | Dask / local |",
        "|---|---|---|---|", cpu_row, tiny_row, "",
        "Chunking on Dask (`tiny`):", "",
        "| Dask `tiny` | items/s | wall |", "|---|---|---|", adaptive_row, one_row, ratio_row, "",
        EFFICIENCY_NOTE, "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = run(args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dask.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "dask.md").write_text(markdown(result))
    sys.stdout.write(markdown(result))


if __name__ == "__main__":
    main()
