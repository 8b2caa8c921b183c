"""Issue #21's performance part: procqueue's durable task queue against huey and DBOS, side by
side in one run.

    python bench/queue_bench.py                        # every row, 3 rounds (~13 min on 2 cores)
    python bench/queue_bench.py --n 2000 --dbos-n 200 --samples 50 --cpu-tasks 100 --repeat 1
    python bench/queue_bench.py --rows tiny --systems procqueue-sqlite,huey

Rows (2 workers everywhere, --jobs):

1. tiny: enqueue N `now` tasks with no service running (timed: enqueue), then start the
   service and drain them (timed from the first task's own start to the moment the bench sees
   all N results in the store: drain).  end to end = N / (enqueue + drain); the service's
   start-up (start -> first task) is reported apart, not in either figure.
2. latency: an idle, warmed-up service; `samples` sequential tasks, each enqueued after a
   random 5-25 ms pause; latency = the task's own time.time() - time.time() just before
   enqueue().  Median and p99.
3. cpu: `cpu-tasks` tasks of 10 ms of fixed work (the suite's calibrated loop): a procqueue
   queue (enqueue_many + Pool(2).serve(until_idle=True)), procqueue.Pool(2).map and
   multiprocessing.Pool(2).map on warmed pools; efficiency = serial time / (2 x wall), the
   serial loop timed in the same round.

Every cell runs in a fresh interpreter leading its own process group (services are children in
that group); the group is killed when the cell ends, whatever happened, and any process the
cell failed to stop itself is reported.  PostgreSQL is one `pgserver` server for the run, a
fresh database per cell, stopped at the end (also on error and Ctrl-C).  Writes
<out>/queue_bench.md and queue_bench.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import harness  # noqa: E402 - bench/ first on sys.path
from cases import busy  # noqa: E402

DEFAULT_OUT = HERE / "results"
QUEUE_SYSTEMS = ["procqueue-sqlite", "procqueue-sqlite-fsync", "procqueue-pg", "huey", "dbos"]
LATENCY_SYSTEMS = ["procqueue-sqlite", "procqueue-pg", "huey", "dbos"]
CPU_SYSTEMS = ["serial", "procqueue-queue", "procqueue-map", "mp-map"]
ROWS = ["tiny", "latency", "cpu"]
WARM_UP_TASKS = 5  # latency: tasks run (untimed) before measuring, service start included
PAUSE_S = (0.005, 0.025)  # latency: random pause before each enqueue
CELL_TIMEOUT_S = 900.0
LEFTOVER_GRACE_S = 2.0  # a cell's processes still alive this long after it exited are reported
TARGETS = {"tiny_e2e_tasks_per_s": 10_000, "cpu_efficiency_gap": 0.03, "latency_median_ms": 10.0}


# ==== cells (each in its own interpreter) ====================================================

def run_cell(spec: dict[str, Any]) -> dict[str, Any]:
    cell = {"tiny": tiny_cell, "latency": latency_cell, "cpu": cpu_cell}[spec["row"]]
    return cell(spec)


def make_driver(spec: dict[str, Any]) -> Any:
    from queue_systems import DRIVERS

    return DRIVERS[spec["system"]](Path(spec["workdir"]), spec["jobs"], spec.get("target"))


def tiny_cell(spec: dict[str, Any]) -> dict[str, Any]:
    n = spec["n"]
    driver = make_driver(spec)
    try:
        driver.prepare()
        t0 = time.perf_counter()
        driver.enqueue_all(list(range(n)))
        enqueue_s = time.perf_counter() - t0
        driver.start_service()
        all_done_at = wait_all_done(driver, n, spec["timeout_s"])
        values = driver.values()
    finally:
        driver.close()
    if len(values) != n or any(not isinstance(v, float) for v in values):
        raise AssertionError(f"{len(values)} results for {n} tasks")
    first = min(values)
    drain_s = all_done_at - first
    return {"tasks": n, "enqueue_s": enqueue_s, "drain_s": drain_s,
            "startup_s": first - driver.service.started_at,
            "enqueue_per_s": n / enqueue_s, "drain_per_s": n / drain_s,
            "e2e_per_s": n / (enqueue_s + drain_s)}


def wait_all_done(driver: Any, n: int, timeout_s: float) -> float:
    """The time.time() at which the store first shows n finished tasks.  Polls more often as
    the end nears (a quarter of the expected time left, 2-100 ms), so the polls cost little
    and the end is seen within a few ms."""
    start = time.time()
    while True:
        done, now = driver.done_count(), time.time()
        if done >= n:
            return now
        if now - start > timeout_s:
            raise TimeoutError(f"{done} of {n} tasks done after {timeout_s:.0f} s")
        driver.service.check_alive()
        left_s = (n - done) * (now - start) / done if done else 0.4
        time.sleep(min(max(left_s / 4, 0.002), 0.1))


def latency_cell(spec: dict[str, Any]) -> dict[str, Any]:
    driver = make_driver(spec)
    rng = random.Random(21)
    latencies = []
    try:
        driver.prepare()
        driver.start_service()
        for i in range(WARM_UP_TASKS):
            driver.run_one(-i, timeout_s=120.0)
        for i in range(spec["samples"]):
            time.sleep(rng.uniform(*PAUSE_S))
            before = time.time()
            latencies.append(driver.run_one(i, timeout_s=60.0) - before)
    finally:
        driver.close()
    ms = sorted(x * 1000 for x in latencies)
    return {"samples": len(ms), "median_ms": statistics.median(ms), "p99_ms": percentile(ms, 99),
            "max_ms": ms[-1], "min_ms": ms[0]}


def percentile(sorted_xs: list[float], q: float) -> float:
    """The q-th percentile, linear between closest ranks (numpy's default)."""
    pos = (len(sorted_xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def cpu_cell(spec: dict[str, Any]) -> dict[str, Any]:
    import queue_tasks

    xs = [spec["iterations"]] * spec["tasks"]
    run = {"serial": cpu_serial, "procqueue-queue": cpu_queue, "procqueue-map": cpu_pq_map,
           "mp-map": cpu_mp_map}[spec["system"]]
    wall, results = run(spec, queue_tasks, xs)
    if results != [queue_tasks.spin(xs[0])] * len(xs):
        raise AssertionError("wrong results")
    return {"tasks": len(xs), "wall_s": wall}


def cpu_serial(spec: dict[str, Any], tasks: Any, xs: list[int]) -> tuple[float, list[Any]]:
    t0 = time.perf_counter()
    results = [tasks.spin(x) for x in xs]
    return time.perf_counter() - t0, results


def cpu_pq_map(spec: dict[str, Any], tasks: Any, xs: list[int]) -> tuple[float, list[Any]]:
    from procqueue import Pool

    with Pool(spec["jobs"]) as pool:
        pool.map(tasks.warm, range(4 * spec["jobs"]))
        t0 = time.perf_counter()
        results = pool.map(tasks.spin, xs)
        return time.perf_counter() - t0, results


def cpu_mp_map(spec: dict[str, Any], tasks: Any, xs: list[int]) -> tuple[float, list[Any]]:
    import multiprocessing

    with multiprocessing.Pool(spec["jobs"]) as pool:
        pool.map(tasks.warm, range(4 * spec["jobs"]))
        t0 = time.perf_counter()
        results = pool.map(tasks.spin, xs)
        wall = time.perf_counter() - t0
        pool.close()
        pool.join()
    return wall, results


def cpu_queue(spec: dict[str, Any], tasks: Any, xs: list[int]) -> tuple[float, list[Any]]:
    """Enqueue and drain, both timed: the queue's counterpart of one map call."""
    from procqueue import Pool, TaskQueue

    with TaskQueue(str(Path(spec["workdir"]) / "cpu.db")) as tq, Pool(spec["jobs"]) as pool:
        tq.define("bench")
        pool.map(tasks.warm, range(4 * spec["jobs"]))
        t0 = time.perf_counter()
        handles = tq.enqueue_many(tasks.spin, xs, queue="bench")
        pool.serve(tq, queues=["bench"], until_idle=True)
        wall = time.perf_counter() - t0
        return wall, [h.get_result(timeout=0) for h in handles]


# ==== the orchestrator =======================================================================

def cell_specs(args: argparse.Namespace, iterations: int) -> list[dict[str, Any]]:
    base = {"jobs": args.jobs, "timeout_s": args.cell_timeout}
    specs = []
    if "tiny" in args.rows:
        for s in (x for x in QUEUE_SYSTEMS if x in args.systems):
            specs.append({**base, "row": "tiny", "system": s,
                          "n": args.dbos_n if s == "dbos" else args.n})
    if "latency" in args.rows:
        for s in (x for x in LATENCY_SYSTEMS if x in args.systems):
            specs.append({**base, "row": "latency", "system": s, "samples": args.samples})
    if "cpu" in args.rows:
        for s in CPU_SYSTEMS:
            specs.append({**base, "row": "cpu", "system": s, "tasks": args.cpu_tasks,
                          "iterations": iterations, "task_ms": args.cpu_ms})
    return specs


@contextlib.contextmanager
def postgres(needed: bool) -> Iterator[str | None]:
    """One pgserver PostgreSQL for the run (its URI), stopped and deleted on the way out."""
    if not needed:
        yield None
        return
    import pgserver

    pgdata = Path(tempfile.mkdtemp(prefix="qbench-pg-"))
    server = None
    try:
        server = pgserver.get_server(pgdata / "data", cleanup_mode="stop")
        yield str(server.get_uri())
    finally:
        if server is not None:
            server.cleanup()
        shutil.rmtree(pgdata, ignore_errors=True)


@contextlib.contextmanager
def pg_database(server_uri: str, name: str) -> Iterator[str]:
    """A fresh database on the run's server (its URI), dropped afterwards."""
    import psycopg

    with psycopg.connect(server_uri, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    parts = urlsplit(server_uri)
    try:
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(server_uri, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run_spec(spec: dict[str, Any], pg_uri: str | None, index: int) -> dict[str, Any]:
    """One cell with its own scratch folder (and database): the row, or {"error": ...}."""
    workdir = Path(tempfile.mkdtemp(prefix="qbench-"))
    try:
        with contextlib.ExitStack() as stack:
            cell = {**spec, "workdir": str(workdir)}
            if spec["system"] == "procqueue-pg":
                assert pg_uri is not None
                cell["target"] = stack.enter_context(
                    pg_database(pg_uri, f"qbench_{spec['round']}_{index}"))
            return {**spec, **fresh_process([__file__, "--cell", json.dumps(cell)],
                                            spec["timeout_s"] + 60)}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def fresh_process(argv: list[str], timeout_s: float) -> dict[str, Any]:
    """`python argv` in a new interpreter leading its own process group; its last stdout line
    is a JSON object.  The group is killed when it ends (timeout, error, Ctrl-C included);
    processes it left behind are counted in the result first."""
    env = {**os.environ, **harness.CELL_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), str(HERE.parent),
                                                      env.get("PYTHONPATH")]))
    proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    left: list[str] = []
    try:
        out, err = proc.communicate(timeout=timeout_s)
        left = stragglers(proc.pid)
    except subprocess.TimeoutExpired:
        kill_group(proc.pid)
        proc.communicate()
        return {"error": f"timed out after {timeout_s:.0f} s"}
    finally:
        kill_group(proc.pid)
    result = parse_cell_output(proc.returncode, out, err)
    if left:
        result["left_behind"] = left
    return result


def stragglers(pgid: int, grace_s: float = LEFTOVER_GRACE_S) -> list[str]:
    """The command lines of group pgid's processes still alive grace_s after its leader
    exited (a pool's helper process may take a moment to see its parent gone)."""
    deadline = time.monotonic() + grace_s
    while True:
        members = group_members(pgid)
        if not members or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return [command_line(pid) for pid in members]


def command_line(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return f"pid {pid}"
    return f"pid {pid}: " + raw.replace(b"\0", b" ").decode(errors="replace").strip()[:160]


def parse_cell_output(returncode: int, out: str, err: str) -> dict[str, Any]:
    if returncode != 0:
        lines = err.strip().splitlines()
        return {"error": (lines[-1] if lines else f"exit code {returncode}")[:300]}
    try:
        return dict(json.loads(out.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        return {"error": f"no JSON on stdout: {out[-200:]!r} {err[-200:]!r}"}


def group_members(pgid: int) -> list[int]:
    """Live processes in process group pgid (Linux /proc)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry))
    return members


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def run_rounds(args: argparse.Namespace, iterations: int, pg_uri: str | None
               ) -> list[dict[str, Any]]:
    """Every cell once per round (the cpu cells --cpu-repeat times), row after row, the cells
    of a row in an order shuffled with a fixed seed: the cells whose figures are compared run
    seconds apart, not minutes."""
    rows = []
    specs = cell_specs(args, iterations)
    index = 0
    for round_no in range(1, args.repeat + 1):
        for group in row_groups(specs, args.cpu_repeat):
            random.Random(round_no * 100 + index).shuffle(group)
            for spec in group:
                index += 1
                row = run_spec({**spec, "round": round_no}, pg_uri, index)
                row["loadavg_1min"] = os.getloadavg()[0]
                print(progress_line(row), file=sys.stderr, flush=True)
                rows.append(row)
    return rows


def row_groups(specs: list[dict[str, Any]], cpu_repeat: int) -> list[list[dict[str, Any]]]:
    """The specs of each row, in ROWS order; the cpu row's cells as cpu_repeat groups."""
    groups = []
    for name in ROWS:
        mine = [s for s in specs if s["row"] == name]
        if not mine:
            continue
        for rep in range(cpu_repeat if name == "cpu" else 1):
            groups.append([{**s, "rep": rep} for s in mine])
    return groups


def progress_line(row: dict[str, Any]) -> str:
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
             if k not in ("jobs", "timeout_s", "iterations")}
    return json.dumps(shown)


# ==== summary and report =====================================================================

def spread(rows: list[dict[str, Any]], row: str, system: str, key: str) -> dict[str, float]:
    return harness.spread(r.get(key) for r in rows
                          if r["row"] == row and r["system"] == system and "error" not in r)


def derive_cpu(rows: list[dict[str, Any]], jobs: int) -> None:
    """Each cpu cell's efficiency (its tasks' calibrated time / (workers x wall)), and the
    queue's against each map of the same group (cells seconds apart): the ratio of their
    walls, which no baseline's noise enters."""
    groups: dict[tuple[int, int], dict[str, dict[str, Any]]] = {}
    for r in rows:
        if r["row"] == "cpu" and "wall_s" in r:
            work_s = r["tasks"] * r["task_ms"] / 1000
            r["efficiency"] = work_s / ((1 if r["system"] == "serial" else jobs) * r["wall_s"])
            groups.setdefault((r["round"], r.get("rep", 0)), {})[r["system"]] = r
    for cells in groups.values():
        queue = cells.get("procqueue-queue")
        for peer in ("procqueue-map", "mp-map"):
            if queue and peer in cells:
                queue[f"vs_{peer}"] = cells[peer]["wall_s"] / queue["wall_s"]


def fmt(stats: dict[str, float], digits: int = 0, scale: float = 1.0) -> str:
    if not stats:
        return "error"
    med = f"{stats['median'] * scale:,.{digits}f}"
    if stats["n"] < 2:
        return med
    return f"{med} ({stats['min'] * scale:,.{digits}f}-{stats['max'] * scale:,.{digits}f})"


def errors_of(rows: list[dict[str, Any]]) -> list[str]:
    notes = []
    for r in rows:
        if "error" in r:
            notes.append(f"- {r['row']} / {r['system']} round {r['round']}: {r['error']}")
        for straggler in r.get("left_behind", []):
            notes.append(f"- {r['row']} / {r['system']} round {r['round']}: left behind "
                         f"(killed): `{straggler}`")
    return notes


def tiny_table(rows: list[dict[str, Any]], systems: list[str]) -> list[str]:
    from queue_systems import LABELS

    out = ["| system | tasks | enqueue tasks/s | drain tasks/s | end to end tasks/s | "
           "procqueue SQLite e2e is x this | service start -> first task s |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    ours = spread(rows, "tiny", "procqueue-sqlite", "e2e_per_s").get("median")
    for s in (x for x in QUEUE_SYSTEMS if x in systems):
        e2e = spread(rows, "tiny", s, "e2e_per_s")
        tasks = next((r["tasks"] for r in rows if r["row"] == "tiny" and r["system"] == s
                      and "tasks" in r), None)
        times = f"{ours / e2e['median']:.1f}x" if ours and e2e else ""
        enqueue, drain = (fmt(spread(rows, "tiny", s, k)) for k in ("enqueue_per_s", "drain_per_s"))
        startup = fmt(spread(rows, "tiny", s, "startup_s"), 2)
        out.append(f"| {LABELS[s]} | {tasks or ''} | {enqueue} | {drain} | {fmt(e2e)} | {times} | "
                   f"{startup} |")
    return out


def latency_table(rows: list[dict[str, Any]], systems: list[str]) -> list[str]:
    from queue_systems import LABELS

    out = ["| system | samples | median ms | p99 ms | max ms |", "|---|---:|---:|---:|---:|"]
    for s in (x for x in LATENCY_SYSTEMS if x in systems):
        samples = next((r["samples"] for r in rows if r["row"] == "latency"
                        and r["system"] == s and "samples" in r), "")
        out.append(f"| {LABELS[s]} | {samples} | {fmt(spread(rows, 'latency', s, 'median_ms'), 2)}"
                   f" | {fmt(spread(rows, 'latency', s, 'p99_ms'), 2)} | "
                   f"{fmt(spread(rows, 'latency', s, 'max_ms'), 1)} |")
    return out


CPU_LABELS = {"serial": "serial loop (1 process)",
              "procqueue-queue": "procqueue queue: enqueue_many + Pool(2).serve(until_idle)",
              "procqueue-map": "procqueue.Pool(2).map", "mp-map": "multiprocessing.Pool(2).map"}


def cpu_table(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| system | tasks | wall s | efficiency | queue / this (efficiency) |",
           "|---|---:|---:|---:|---:|"]
    for s in CPU_SYSTEMS:
        tasks = next((r["tasks"] for r in rows if r["row"] == "cpu" and r["system"] == s
                      and "tasks" in r), "")
        vs = spread(rows, "cpu", "procqueue-queue", f"vs_{s}")
        out.append(f"| {CPU_LABELS[s]} | {tasks} | {fmt(spread(rows, 'cpu', s, 'wall_s'), 3)} | "
                   f"{fmt(spread(rows, 'cpu', s, 'efficiency'), 3)} | {fmt(vs, 3) if vs else ''} |")
    return out


def targets(rows: list[dict[str, Any]]) -> list[str]:
    e2e = spread(rows, "tiny", "procqueue-sqlite", "e2e_per_s").get("median")
    lat = spread(rows, "latency", "procqueue-sqlite", "median_ms").get("median")
    gaps = [spread(rows, "cpu", "procqueue-queue", f"vs_{p}").get("median")
            for p in ("procqueue-map", "mp-map")]
    checks = [(f"tiny, SQLite, end to end >= {TARGETS['tiny_e2e_tasks_per_s']:,} tasks/s",
               e2e, e2e is not None and e2e >= TARGETS["tiny_e2e_tasks_per_s"], f"{e2e or 0:,.0f}"),
              (f"latency median on SQLite <= {TARGETS['latency_median_ms']:.0f} ms", lat,
               lat is not None and lat <= TARGETS["latency_median_ms"], f"{lat or 0:.2f} ms")]
    for peer, gap in zip(("procqueue.Pool.map", "multiprocessing.Pool.map"), gaps):
        checks.append((f"10 ms tasks: queue efficiency within 3% of {peer}", gap,
                       gap is not None and gap >= 1 - TARGETS["cpu_efficiency_gap"],
                       f"{gap or 0:.3f}x"))
    return [f"- {'met' if ok else 'NOT met'}: {what} ({shown})"
            for what, value, ok, shown in checks if value is not None]


def report(rows: list[dict[str, Any]], env: dict[str, Any], args: argparse.Namespace) -> str:
    dirty = " (+ local changes in procqueue/)" if env["procqueue_dirty"] else ""
    lines = ["# Durable task queues (issue #21): procqueue vs huey and DBOS, side by side",
             "", f"`{env['command']}` on {env['when']}, procqueue commit "
             f"{env['procqueue_commit']}{dirty}, "
             f"{args.jobs} workers on {env['usable_cpus']} CPUs, {args.repeat} round(s): medians "
             "(min-max over rounds).",
             f"Load: `{env['uptime_start']}` at the start, `{env['uptime_end']}` at the end.",
             f"Versions: {', '.join(f'{k} {v}' for k, v in env['versions'].items() if v)}.", ""]
    if "tiny" in args.rows:
        lines += ["## Tiny tasks: enqueue all, then drain", "", *tiny_table(rows, args.systems), "",
                  f"DBOS runs {args.dbos_n:,} tasks, the others {args.n:,} (DBOS polls its queue: "
                  "its rate does not depend on N). enqueue = the client's calls (procqueue: one "
                  "`enqueue_many`, one transaction; huey and DBOS: one call and one commit per "
                  "task, they have no batch enqueue); drain = the first task's start to the bench "
                  "seeing every result in the store; end to end = N / (enqueue + drain). "
                  "Durability: procqueue commits in WAL with synchronous=NORMAL (a result survives "
                  "any process death, not a power cut) unless durable=True (fsync per commit, its "
                  "own row); huey (WAL) and DBOS (rollback journal) keep SQLite's default "
                  "synchronous=FULL: an fsync per commit.", ""]
    if "latency" in args.rows:
        lines += ["## Enqueue-to-start latency, idle service", "",
                  *latency_table(rows, args.systems), "",
                  f"{args.samples} sequential tasks after {WARM_UP_TASKS} warm-up ones, each "
                  f"enqueued after a random {PAUSE_S[0] * 1000:.0f}-{PAUSE_S[1] * 1000:.0f} ms "
                  "pause: the task's own time.time() minus time.time() just before enqueue(). "
                  "huey's consumer polls with a back-off from 1 ms (-d 0.001, x1.15 per empty "
                  "poll); DBOS polls every 10 ms.", ""]
    if "cpu" in args.rows:
        lines += [f"## CPU-bound {args.cpu_ms} ms tasks", "", *cpu_table(rows), "",
                  f"{args.cpu_repeat} groups of cells per round, each group's cells run one "
                  "after the other in a shuffled order. efficiency = tasks x "
                  f"{args.cpu_ms} ms / (workers x wall), {args.cpu_ms} ms being the fixed work's "
                  "time on an idle core (the suite's calibration: the fastest of 15 probes); the "
                  "serial loop's 'efficiency' is how fast the machine ran that work meanwhile "
                  "(1 process). queue / this = this wall / the queue's wall in the same group. "
                  "The queue's wall covers `enqueue_many` and `serve(until_idle=True)` on a pool "
                  "already warmed up (as the maps' pools are).", ""]
    lines += ["## Issue #21's targets (medians of this run)", "", *targets(rows), ""]
    problems = errors_of(rows)
    if problems:
        lines += ["## Errors", "", *problems, ""]
    return "\n".join(lines)


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def run_environment() -> dict[str, Any]:
    env = harness.environment()
    from importlib.metadata import PackageNotFoundError, version

    for name in ("huey", "dbos", "pgserver", "psycopg"):
        try:
            env["versions"][name] = version(name)
        except PackageNotFoundError:
            env["versions"][name] = None
    env["command"] = "python bench/queue_bench.py " + " ".join(sys.argv[1:])
    env["uptime_start"] = uptime()
    return env


# ==== command line ===========================================================================

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20_000, help="tiny tasks per system (20,000)")
    p.add_argument("--dbos-n", type=int, default=1_000, help="tiny tasks for DBOS (1,000)")
    p.add_argument("--samples", type=int, default=200, help="latency samples per system")
    p.add_argument("--cpu-tasks", type=int, default=400)
    p.add_argument("--cpu-ms", type=int, default=10)
    p.add_argument("--cpu-repeat", type=int, default=2, help="cpu cells per round (2)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3, help="rounds (3)")
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--systems", default=",".join(QUEUE_SYSTEMS))
    p.add_argument("--cell-timeout", type=float, default=CELL_TIMEOUT_S)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--recalibrate", action="store_true")
    p.add_argument("--cell", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.rows = args.rows.split(",")
    args.systems = args.systems.split(",")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.cell:
        print(json.dumps(run_cell(json.loads(args.cell))), flush=True)
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: cells, PostgreSQL
    harness.compile_procqueue()
    calibration = harness.load_or_calibrate(HERE / "results" / "suite" / "calibration.json",
                                            busy, args.recalibrate)
    iterations = args.cpu_ms * int(calibration["iterations_per_ms"])
    env = run_environment()
    with postgres("procqueue-pg" in args.systems and args.rows != ["cpu"]) as pg_uri:
        rows = run_rounds(args, iterations, pg_uri)
    env["uptime_end"] = uptime()
    derive_cpu(rows, args.jobs)
    text = report(rows, env, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "queue_bench.md").write_text(text)
    (args.out / "queue_bench.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
