"""What the run journal (procqueue/journal.py) costs: the same batch with and without it.

    python bench/journal_overhead.py [--workers 2] [--repeat 5] [--workload cpu_1ms tiny]

Workloads (as in issue 6): `cpu_1ms`, pure-Python work of about 1 ms per task; `tiny`,
100,000 calls of a trivial function (pure overhead).  Each is run through
`pool.imap_outcomes(..., ordered=False)`:

- `plain`: the outcomes are handed to a sink, no journal;
- `journal`: the loop Pool(journal=...) will run: key every input (sha256 of its pickle),
  look it up, report the outcomes through a JournalingSink (commit first, then report), on a
  fresh journal each repeat;
- `resume`: the same call again on the complete journal: every input is replayed from it and
  nothing runs (how fast a resumed run catches up).

Prints the median wall time of each, and the journal's overhead = journal / plain - 1.
The pool and its workers are started once and warmed up; repeats alternate the variants so
drift hits both alike.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import procqueue  # noqa: E402
from procqueue.journal import Journal, JournalingSink, StoredTask  # noqa: E402


def cpu_1ms(x: int) -> int:
    """About 1 ms of pure-Python arithmetic (calibrated at import: see CPU_1MS_LOOPS)."""
    total = 0
    for i in range(CPU_1MS_LOOPS):
        total += (i * x) % 7
    return total


def tiny(x: int) -> int:
    return x + 1


def _calibrate() -> int:
    loops = 10_000
    while True:
        start = time.perf_counter()
        total = 0
        for i in range(loops):
            total += (i * 3) % 7
        elapsed = time.perf_counter() - start
        if elapsed > 0.02:
            return max(1, int(loops * 0.001 / elapsed))
        loops *= 2


CPU_1MS_LOOPS = int(os.environ.get("CPU_1MS_LOOPS") or _calibrate())
os.environ["CPU_1MS_LOOPS"] = str(CPU_1MS_LOOPS)  # workers (forkserver) calibrate alike

WORKLOADS: dict[str, tuple[Callable[[int], int], int]] = {
    "cpu_1ms": (cpu_1ms, 4_000),
    "tiny": (tiny, 100_000),
}


class CountingSink:
    def __init__(self) -> None:
        self.count = 0

    def starting(self, task: Any) -> bool:
        return True

    def deliver(self, task: Any, ok: bool, value: Any) -> None:
        self.count += 1


def run_plain(pool: Any, fn: Callable[[int], int], items: list[int]) -> int:
    sink = CountingSink()
    for outcome in pool.imap_outcomes(fn, items, ordered=False):
        sink.deliver(outcome, outcome.ok, outcome.value if outcome.ok else outcome.error)
    return sink.count


def run_journaled(pool: Any, fn: Callable[[int], int], items: list[int],
                  journal: Journal) -> int:
    """The wiring Pool(journal=...) will do (same loop as tests/test_journal.py)."""
    sink_inner = CountingSink()
    keys = [Journal.key_of(item) for item in items]
    sink = JournalingSink(sink_inner, journal, key_of_task=lambda task: keys[task.index])
    to_run = []
    for i, (item, key) in enumerate(zip(items, keys)):
        stored = journal.lookup(key)
        if stored is None:
            to_run.append(i)
        else:
            sink.replay(i, item, stored)
    journal.set_total(len(items))
    if to_run:
        for outcome in pool.imap_outcomes(fn, [items[i] for i in to_run], ordered=False):
            i = to_run[outcome.index]
            task = StoredTask(i, outcome.input, outcome.attempts, outcome.seconds, outcome.pid)
            sink.deliver(task, outcome.ok, outcome.value if outcome.ok else outcome.error)
    sink.close()
    return sink_inner.count


def timed(run: Callable[[], int], expected: int) -> float:
    start = time.perf_counter()
    count = run()
    elapsed = time.perf_counter() - start
    if count != expected:
        raise RuntimeError(f"{count} outcomes reported, expected {expected}")
    return elapsed


def bench(pool: Any, name: str, repeat: int, tmp: Path) -> dict[str, float]:
    fn, n = WORKLOADS[name]
    items = list(range(n))
    run_plain(pool, fn, items[: n // 10])  # warm-up: workers have the function, sizer learnt
    times: dict[str, list[float]] = {"plain": [], "journal": [], "resume": []}
    commits = []
    for r in range(repeat):
        path = tmp / f"{name}-{r}.db"
        times["plain"].append(timed(lambda: run_plain(pool, fn, items), n))
        with Journal.open(path, function_identity=f"{name}:1") as journal:
            times["journal"].append(timed(lambda: run_journaled(pool, fn, items, journal), n))
            commits.append(journal.statistics().commits)
        with Journal.open(path, function_identity=f"{name}:1") as journal:
            times["resume"].append(timed(lambda: run_journaled(pool, fn, items, journal), n))
    result = {k: statistics.median(v) for k, v in times.items()}
    result["overhead"] = result["journal"] / result["plain"] - 1
    result["overhead_min"] = min(times["journal"]) / min(times["plain"]) - 1
    result["commits"] = statistics.median(commits)
    result["n"] = n
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--workload", nargs="*", default=list(WORKLOADS), choices=WORKLOADS)
    args = parser.parse_args()
    print(f"workers={args.workers} repeat={args.repeat} cpus={os.cpu_count()} "
          f"python={sys.version.split()[0]}")
    print(f"{'workload':10} {'tasks':>7} {'plain s':>9} {'journal s':>10} {'overhead':>9} "
          f"{'(best)':>8} {'commits':>8} {'resume s':>9} {'replayed/s':>11}")
    with tempfile.TemporaryDirectory() as tmp, procqueue.Pool(args.workers) as pool:
        for name in args.workload:
            r = bench(pool, name, args.repeat, Path(tmp))
            print(f"{name:10} {int(r['n']):>7} {r['plain']:>9.3f} {r['journal']:>10.3f} "
                  f"{r['overhead']:>+9.1%} {r['overhead_min']:>+8.1%} {int(r['commits']):>8} "
                  f"{r['resume']:>9.3f} {r['n'] / r['resume']:>11,.0f}", flush=True)


if __name__ == "__main__":
    main()
