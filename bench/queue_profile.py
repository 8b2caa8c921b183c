"""Where a procqueue worker service's time goes on tiny tasks (issue #21's 10,000 tasks/s),
or on tasks of a few ms of CPU (--ms: its efficiency against Pool.map):

    python bench/queue_profile.py [--n 20000] [--pg | --target jobs.db | postgresql://...]
    python bench/queue_profile.py --n 400 --ms 10

Enqueues N `queue_tasks.now` tasks in one enqueue_many, then drains them in this process with
Pool(2).serve(until_idle=True), the service loop (this thread) under cProfile, and the store's
transactions timed one by one (wall clock around claim, record and the idle check: on 2 cores
the wall time includes waiting for a CPU the workers and the pool's threads also want).  The
pool's own threads (supervisor, result collectors) are reported by CPU only: the process's
CPU minus this thread's.  Then the store alone: N tasks claimed and recorded in batches by one
thread with no workers, each SQL statement timed.  Writes
bench/results/profile/queue_tiny_<store>.md (and a .pstats file).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import io
import os
import pstats
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
for folder in (HERE.parent, HERE):  # this checkout's procqueue, not an installed one
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import queue_tasks  # noqa: E402 - bench/ first on sys.path

OUT = HERE / "results" / "profile"
TIMED = ("claim", "record", "counts", "heartbeat", "queue_specs")


class Timings:
    """Wall time, calls and items of each timed store method, and when each call began."""

    def __init__(self) -> None:
        self.calls: dict[str, list[tuple[float, int]]] = {name: [] for name in TIMED}
        self.events: list[tuple[float, float, str, int]] = []  # start, seconds, name, items
        self.t0 = time.perf_counter()

    def wrap(self, store: Any) -> None:
        for name in TIMED:
            setattr(store, name, self._timed(name, getattr(store, name)))

    def _timed(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            result = method(*args, **kwargs)
            seconds, items = time.perf_counter() - t0, items_of(name, args, result)
            self.calls[name].append((seconds, items))
            self.events.append((t0 - self.t0, seconds, name, items))
            return result
        return timed

    def table(self, tasks: int, wall_s: float) -> list[str]:
        out = ["| store call | calls | items per call (mean) | ms per call (mean, max) | "
               "total s | share of wall | us per task |", "|---|---:|---:|---:|---:|---:|---:|"]
        for name, calls in self.calls.items():
            if not calls:
                continue
            total = sum(s for s, _ in calls)
            items = sum(n for _, n in calls) / len(calls)
            out.append(f"| {name} | {len(calls)} | {items:.0f} | {total / len(calls) * 1e3:.2f}, "
                       f"{max(s for s, _ in calls) * 1e3:.1f} | {total:.3f} | "
                       f"{total / wall_s:.0%} | {total / tasks * 1e6:.1f} |")
        return out

    def timeline(self) -> list[str]:
        """Claims and records in order, each with the time the service spent since the last
        one ended: ~250 ms (POLL_S) there is the service waiting for its poll instead of a
        wake-up."""
        out, last_end = [], None
        for start, seconds, name, items in self.events:
            if name not in ("claim", "record"):
                continue
            since = ("" if last_end is None
                     else f", {(start - last_end) * 1e3:.0f} ms after the last")
            out.append(f"{start * 1e3:8.1f} ms  {name:6s} {items:5d} tasks, "
                       f"{seconds * 1e3:6.1f} ms{since}")
            last_end = start + seconds
        return out


def start_bins(starts: list[float], t0: float, wall: float, bin_s: float = 0.05) -> list[int]:
    """Task starts per bin_s from t0 (the tasks' own clocks)."""
    bins = [0] * (int(wall / bin_s) + 1)
    for s in starts:
        bins[min(len(bins) - 1, max(0, int((s - t0) / bin_s)))] += 1
    return bins


def items_of(name: str, args: tuple[Any, ...], result: Any) -> int:
    if name == "claim":
        return len(result.tasks)
    if name == "record":
        return len(args[1])
    return 0


def workers_cpu_s(pool: Any) -> dict[int, float]:
    """CPU seconds (user + system) of each worker process so far, from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    found = {}
    for w in pool.stats().workers:
        with contextlib.suppress(OSError, TypeError):
            fields = Path(f"/proc/{w.pid}/stat").read_text().rsplit(")", 1)[1].split()
            found[w.pid] = (int(fields[11]) + int(fields[12])) / ticks
    return found


def workers_busy_s(pool: Any) -> float:
    return sum(w.busy_s for w in pool.stats().workers)


def profile(target: str, n: int, jobs: int, iterations: int) -> dict[str, Any]:
    """The service's drain of n tasks: `now` (tiny), or `spin_now(iterations)` if > 0."""
    from procqueue import Pool, TaskQueue

    with TaskQueue(target) as tq, Pool(jobs) as pool:
        tq.define("bench")
        pool.map(queue_tasks.warm, range(4 * jobs))
        t0 = time.perf_counter()
        if iterations:
            handles = tq.enqueue_many(queue_tasks.spin_now, [iterations] * n, queue="bench")
        else:
            handles = tq.enqueue_many(queue_tasks.now, range(n), queue="bench")
        enqueue_s = time.perf_counter() - t0
        timings = Timings()
        timings.wrap(tq.store)
        profiler = cProfile.Profile()
        cpu0, main0 = time.process_time(), time.thread_time()
        workers0, busy0 = workers_cpu_s(pool), workers_busy_s(pool)
        timings.t0, wall0 = time.perf_counter(), time.time()
        t0 = time.perf_counter()
        profiler.enable()
        summary = pool.serve(tq, queues=["bench"], until_idle=True)
        profiler.disable()
        drain_s = time.perf_counter() - t0
        main_cpu, cpu = time.thread_time() - main0, time.process_time() - cpu0
        workers1, busy = workers_cpu_s(pool), workers_busy_s(pool) - busy0
        workers_cpu = sum(v - workers0.get(pid, 0.0) for pid, v in workers1.items())
        if len(handles) != n or summary.succeeded != n:
            raise AssertionError(f"{summary.succeeded} of {n} tasks succeeded")
        bins = start_bins([h.get_result(timeout=0) for h in handles], wall0, drain_s)
    return {"n": n, "enqueue_s": enqueue_s, "drain_s": drain_s, "main_cpu_s": main_cpu,
            "process_cpu_s": cpu, "succeeded": summary.succeeded, "timings": timings,
            "workers_cpu_s": workers_cpu, "workers_busy_s": busy, "bins": bins,
            "profiler": profiler}


def report(r: dict[str, Any], target: str, top: int, kind: str) -> str:
    n, wall = r["n"], r["drain_s"]
    stats = io.StringIO()
    pstats.Stats(r["profiler"], stream=stats).sort_stats("tottime").print_stats(top)
    lines = [f"# procqueue service on {n:,} {kind} tasks ({target_kind(target)})", "",
             f"`python bench/queue_profile.py {' '.join(sys.argv[1:])}` on "
             f"{time.strftime('%Y-%m-%dT%H:%M:%S')}; serve(until_idle=True) in the profiling "
             "process, 2 workers.", "",
             f"- enqueue_many: {r['enqueue_s']:.3f} s ({n / r['enqueue_s']:,.0f} tasks/s)",
             f"- drain (serve until idle): {wall:.3f} s ({n / wall:,.0f} tasks/s); "
             f"succeeded {r['succeeded']:,}",
             f"- end to end: {n / (wall + r['enqueue_s']):,.0f} tasks/s",
             f"- CPU during the drain: service loop thread {r['main_cpu_s']:.3f} s "
             f"({r['main_cpu_s'] / n * 1e6:.1f} us/task), the pool's other threads "
             f"{r['process_cpu_s'] - r['main_cpu_s']:.3f} s "
             f"({(r['process_cpu_s'] - r['main_cpu_s']) / n * 1e6:.1f} us/task), the "
             f"workers {r['workers_cpu_s']:.2f} s ({r['workers_cpu_s'] / n * 1e6:.1f} us/task; "
             f"{r['workers_busy_s']:.3f} s of it running tasks by their own clocks); "
             f"{jobs_note(r, wall)}", "",
             "## Store calls (wall clock, in the service loop)", "",
             *r["timings"].table(n, wall), "",
             "## Task starts per 50 ms of the drain", "",
             f"{sum(1 for b in r['bins'] if b == 0)} of {len(r['bins'])} bins without a start "
             "(the workers idle):", "", "```", " ".join(str(b) for b in r["bins"]), "```", "",
             "## Claims and records in order", "", "```", *r["timings"].timeline(), "```", "",
             f"## cProfile of the service loop thread (top {top} by own time)", "", "```",
             stats.getvalue().strip(), "```", ""]
    return "\n".join(lines)


def jobs_note(r: dict[str, Any], wall: float) -> str:
    used = r["process_cpu_s"] + r["workers_cpu_s"]
    return (f"in all {used:.2f} CPU-s of the {wall * os.cpu_count():.2f} the machine's "
            f"{os.cpu_count()} CPUs had during the drain")


# ---- the store alone: its SQL statements, one thread, no workers ---------------------------

class _Rows:
    """A SELECT's rows fetched at once (so the fetch is timed with its statement)."""

    def __init__(self, rows: list[Any]) -> None:
        self.rows = rows

    def fetchall(self) -> list[Any]:
        return self.rows

    def fetchone(self) -> Any:
        return self.rows[0] if self.rows else None

    def __iter__(self) -> Any:
        return iter(self.rows)


class StatementTimings:
    """Seconds per SQL statement (first 60 characters) and per commit of one store."""

    def __init__(self, store: Any) -> None:
        self.seconds: dict[str, float] = {}
        x, many, write = store._x, store._many, store._write

        def timed_x(cursor: Any, text: str, params: Any = ()) -> Any:
            t0 = time.perf_counter()
            result = x(cursor, text, params)
            if text.lstrip().upper().startswith("SELECT"):
                result = _Rows(result.fetchall())
            self._add(text, time.perf_counter() - t0)
            return result

        def timed_many(cursor: Any, text: str, rows: Any) -> int:
            t0 = time.perf_counter()
            changed = many(cursor, text, rows)
            self._add(text, time.perf_counter() - t0)
            return int(changed)

        @contextlib.contextmanager
        def timed_write() -> Any:
            with write() as cursor:
                yield cursor
                t0 = time.perf_counter()
            self._add("COMMIT", time.perf_counter() - t0)

        store._x, store._many, store._write = timed_x, timed_many, timed_write

    def _add(self, text: str, seconds: float) -> None:
        key = " ".join(text.split())[:60]
        self.seconds[key] = self.seconds.get(key, 0.0) + seconds


def store_alone(target: str, n: int, batch: int) -> tuple[float, float, dict[str, float]]:
    """Claim and record n tasks in batches of `batch` with no workers: (claim s, record s,
    seconds by statement)."""
    import pickle

    from procqueue import TaskQueue
    from procqueue.store import Finished

    with TaskQueue(target) as tq:
        tq.define("bench")
        tq.enqueue_many(queue_tasks.now, range(n), queue="bench")
        store = tq.store
        store.register_service("profile", ["bench"], 2)
        timings = StatementTimings(store)
        result, claim_s, record_s = pickle.dumps(1.0), 0.0, 0.0
        for _ in range(-(-n // batch)):
            t0 = time.perf_counter()
            claimed = store.claim("profile", {"bench": batch}).tasks
            t1 = time.perf_counter()
            store.record("profile", [Finished(t.id, t.attempt, result, None, seconds=1e-5, pid=1)
                                     for t in claimed])
            claim_s, record_s = claim_s + t1 - t0, record_s + time.perf_counter() - t1
        return claim_s, record_s, timings.seconds


def store_report(target: str, n: int, batch: int) -> list[str]:
    claim_s, record_s, by_statement = store_alone(target, n, batch)
    lines = ["## The store alone: claim and record in one thread, no workers", "",
             f"{n:,} tasks claimed {batch:,} at a time and recorded as succeeded right away: "
             f"claim {claim_s / n * 1e6:.1f} us/task, record {record_s / n * 1e6:.1f} us/task "
             f"(a ceiling of {n / (claim_s + record_s):,.0f} tasks/s for one service loop doing "
             "nothing else).", "", "| statement | us per task |", "|---|---:|"]
    for text, seconds in sorted(by_statement.items(), key=lambda kv: -kv[1]):
        if seconds / n * 1e6 >= 0.05:
            lines.append(f"| `{text}` | {seconds / n * 1e6:.2f} |")
    return lines + [""]


def target_kind(target: str) -> str:
    return "PostgreSQL" if target.startswith("postgres") else "SQLite"


def iterations_for(ms: int) -> int:
    """Iterations of the suite's busy loop worth `ms` on an idle core (0: tiny tasks)."""
    if not ms:
        return 0
    import harness
    from cases import busy

    calibration = harness.load_or_calibrate(HERE / "results" / "suite" / "calibration.json",
                                            busy, False)
    return ms * int(calibration["iterations_per_ms"])


def stores(args: argparse.Namespace, scratch: Path, stack: contextlib.ExitStack) -> Any:
    """The store of the service run, then the store-alone run's (fresh ones unless --target)."""
    if args.target:
        while True:
            yield args.target
    if not args.pg:
        yield str(scratch / "jobs.db")
        yield str(scratch / "alone.db")
        return
    from queue_bench import pg_database, postgres

    server = stack.enter_context(postgres(True))
    for name in ("qprofile_service", "qprofile_alone"):
        yield stack.enter_context(pg_database(server, name))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--target", help="an SQLite file or postgresql:// URL (default: a temp file)")
    p.add_argument("--pg", action="store_true",
                   help="on a PostgreSQL server started for the run (pgserver), stopped after")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--batch", type=int, default=2048, help="the store-alone claim size")
    p.add_argument("--ms", type=int, default=0,
                   help="tasks of this many ms of fixed work (calibrated) instead of tiny ones")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="qbench-profile-"))
    try:
        with contextlib.ExitStack() as stack:
            targets = stores(args, scratch, stack)
            target = next(targets)
            result = profile(target, args.n, args.jobs, iterations_for(args.ms))
            alone = [] if args.ms else store_report(next(targets), args.n, args.batch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    kind = f"{args.ms}ms" if args.ms else "tiny"
    text = report(result, target, args.top, kind.replace("ms", " ms")) + "\n" + "\n".join(alone)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"queue_{kind}_{target_kind(target).lower()}"
    (args.out / f"{name}.md").write_text(text)
    result["profiler"].dump_stats(str(args.out / f"{name}.pstats"))
    print(text)


if __name__ == "__main__":
    main()
