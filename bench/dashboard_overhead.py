"""What a live dashboard costs the batch it watches (issue #23): `cpu_10ms` (200 x 10 ms of
calibrated pure-Python work, as in issue 6) on 2 workers, with and without the dashboard.

    python bench/dashboard_overhead.py [--workers 2] [--rounds 5] [--tasks 200]

Variants, interleaved in each round so that drift hits them alike:

- `off`: a plain Pool;
- `served`: Pool(on_event=dash.on_event) with the dashboard serving (Dashboard.for_batch,
  watching the pool) but no page open: the event feed's cost alone (the sampler sleeps);
- `page open`: the same with the page open in headless Chromium on this machine (a snapshot
  per update, drawn): everything a user watching the run costs it.  The browser's start-up
  work (a second or two of CPU after the page loads) is let settle before timing.

Efficiency, as bench/suite.py defines it: serial time of the tasks / (workers x wall time),
the serial time measured in the same round.  Prints and writes
bench/results/dashboard_overhead.md: each variant's median (min-max) efficiency and its ratio
to `off` per round.  The browser is started and the page loaded before the timed map, and the
page must show the pool's workers (it is live) before timing starts.
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
os.environ["PYTHONPATH"] = os.pathsep.join(  # the workers import cases.busy by reference
    [str(HERE), str(HERE.parent)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent / "tests")]

import harness  # noqa: E402
import psutil  # noqa: E402
from cases import busy  # noqa: E402
from cdp_browser import Browser  # noqa: E402  (the tests' DevTools driver)

import procqueue  # noqa: E402
from procqueue import TaskEvent  # noqa: E402
from procqueue.dashboard.batch_view import BatchView  # noqa: E402

VARIANTS = ("off", "served", "page open")
SETTLED_CPU_S = 0.05  # the browser has settled once a second costs it less CPU than this


class Run:
    """One timed map: its wall time and the CPU the dashboard took meanwhile (its threads in
    this process, and the browser's processes)."""

    def __init__(self, wall_s: float, dashboard_cpu_s: float = 0.0,
                 browser_cpu_s: float = 0.0) -> None:
        self.wall_s = wall_s
        self.dashboard_cpu_s = dashboard_cpu_s
        self.browser_cpu_s = browser_cpu_s


def timed_map(pool: Any, xs: list[int], browser_pid: int | None = None) -> Run:
    dash0 = sum(harness.named_threads_cpu_s("procqueue-dashboard").values())
    browser0 = tree_cpu_s(browser_pid) if browser_pid else 0.0
    started = time.perf_counter()
    pool.map(busy, xs)
    wall_s = time.perf_counter() - started
    dash1 = sum(harness.named_threads_cpu_s("procqueue-dashboard").values())
    browser1 = tree_cpu_s(browser_pid) if browser_pid else 0.0
    return Run(wall_s, max(dash1 - dash0, 0.0), max(browser1 - browser0, 0.0))


def run_off(jobs: int, xs: list[int]) -> Run:
    with procqueue.Pool(jobs) as pool:
        pool.map(busy, xs[:jobs * 2])  # warm: workers started, function loaded
        return timed_map(pool, xs)


def run_served(jobs: int, xs: list[int], with_page: bool, refresh_s: float) -> Run:
    dash = procqueue.Dashboard.for_batch(total=len(xs), title="cpu_10ms", refresh_s=refresh_s)
    with procqueue.Pool(jobs, on_event=dash.on_event) as pool, dash.watching(pool):
        pool.map(busy, xs[:jobs * 2])
        if not with_page:
            return timed_map(pool, xs)
        with tempfile.TemporaryDirectory() as profile, Browser(profile) as browser:
            page = browser.open(dash.url)
            page.wait_for(f"document.querySelectorAll('#workers tbody tr').length === {jobs}")
            settle(browser.proc.pid)
            return timed_map(pool, xs, browser.proc.pid)


def feed_cost_us(events: int = 100_000) -> float:
    """What on_event costs the pool's supervisor thread per task attempt, in microseconds."""
    view = BatchView(total=events)
    now = time.time()
    event = TaskEvent(1, 0, "0", 0, 1, 1, now - 0.01, now, "ok", None)
    started = time.perf_counter()
    for _ in range(events):
        view.on_event(event)
    return (time.perf_counter() - started) / events * 1e6


def settle(pid: int, quiet_cpu_s: float = SETTLED_CPU_S, give_up_s: float = 30.0) -> None:
    """Wait until the browser has done its start-up work (a second or two of CPU after the
    page loads): a user watching a batch pays that once, not for every second of the run."""
    deadline = time.monotonic() + give_up_s
    while time.monotonic() < deadline:
        before = tree_cpu_s(pid)
        time.sleep(1.0)
        if tree_cpu_s(pid) - before < quiet_cpu_s:
            return


def tree_cpu_s(pid: int) -> float:
    """CPU time of a process and its children (the browser's renderer, GPU, network...)."""
    total = 0.0
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return total
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def serial(xs: list[int]) -> float:
    started = time.perf_counter()
    for x in xs:
        busy(x)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--refresh", type=float, default=None,
                        help="seconds between the page's updates [default: the dashboard's]")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "dashboard_overhead.md")
    args = parser.parse_args()
    harness.compile_procqueue()
    per_ms = harness.load_or_calibrate(HERE / "results" / "suite" / "calibration.json", busy,
                                       False)["iterations_per_ms"]
    xs = [10 * per_ms] * args.tasks
    env = harness.environment()
    refresh_s = args.refresh if args.refresh is not None else inspect.signature(
        procqueue.Dashboard.for_batch).parameters["refresh_s"].default
    args.refresh = refresh_s
    runs: dict[str, Callable[[], Run]] = {
        "off": lambda: run_off(args.workers, xs),
        "served": lambda: run_served(args.workers, xs, False, refresh_s),
        "page open": lambda: run_served(args.workers, xs, True, refresh_s)}
    results: dict[str, list[tuple[float, Run]]] = {v: [] for v in VARIANTS}  # (serial s, run)
    for round_no in range(args.rounds):
        serial_s = serial(xs)
        order = VARIANTS if round_no % 2 == 0 else tuple(reversed(VARIANTS))
        for variant in order:
            results[variant].append((serial_s, runs[variant]()))
        print(f"round {round_no + 1}: " + ", ".join(
            f"{v} {_efficiency(*results[v][-1], args.workers):.3f}" for v in VARIANTS),
            flush=True)
    report = _report(results, args, env, os.getloadavg(), feed_cost_us())
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)


def _efficiency(serial_s: float, run: Run, workers: int) -> float:
    return serial_s / (workers * run.wall_s)


def _share(run: Run, workers: int) -> float:
    """The dashboard's CPU as a share of the run's capacity (workers x wall time)."""
    return (run.dashboard_cpu_s + run.browser_cpu_s) / (workers * run.wall_s)


def _spread(values: list[float], digits: int = 3) -> str:
    return (f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-"
            f"{max(values):.{digits}f})")


def _report(results: dict[str, list[tuple[float, Run]]], args: argparse.Namespace,
            env: dict[str, Any], load_end: tuple[float, ...], feed_us: float) -> str:
    w = args.workers
    lines = [
        "# The dashboard's cost to the batch it watches (issue #23)", "",
        f"{env['when']}, Python {env['python']}, {env['usable_cpus']} usable CPUs, load "
        f"{env['loadavg_start'][0]:.2f} at start and {load_end[0]:.2f} at the end, procqueue "
        f"{env['procqueue_commit']}{' (changed)' if env['procqueue_dirty'] else ''}.  "
        f"`cpu_10ms`: {args.tasks} x 10 ms on {w} workers, {args.rounds} rounds, "
        f"variants interleaved; the page updated every {args.refresh:g} s "
        "(`python bench/dashboard_overhead.py`).", "",
        "| variant | efficiency: median (min-max) | efficiency / off's, per round | "
        "dashboard CPU, % of the run's capacity | of which the browser |",
        "|---|---|---|---|---|"]
    base = [_efficiency(serial_s, run, w) for serial_s, run in results["off"]]
    for variant in VARIANTS:
        eff = [_efficiency(serial_s, run, w) for serial_s, run in results[variant]]
        ratios = [e / b for e, b in zip(eff, base)]
        shares = [100 * _share(run, w) for _, run in results[variant]]
        browser = [100 * run.browser_cpu_s / (w * run.wall_s) for _, run in results[variant]]
        lines.append(f"| {variant} | {_spread(eff)} | {_spread(ratios)} | "
                     f"{_spread(shares, 2)} | {_spread(browser, 2)} |")
    lines += [
        "", f"The event feed (`on_event`, on the pool's supervisor thread) costs {feed_us:.2f} µs "
        f"per task attempt: {feed_us * 200 / 1e3:.2f} ms per second at 200 attempts a second "
        "(2 workers x 10 ms tasks).", "",
        "Efficiency, as bench/suite.py defines it: serial time / (workers x wall time), the "
        "serial time measured in the same round.  On a shared machine its rounds spread far "
        "more than the dashboard's effect; the CPU column does not: it is the CPU time the "
        "dashboard's threads (sampler, HTTP, event stream) and the browser's processes took "
        "during the timed run, as a share of what the run had (workers x wall time).", "",
        "`served`: Pool(on_event=...) feeding the dashboard, which serves but has no page "
        "open.  `page open`: the page open in headless Chromium (software rendering) on the "
        "same machine, so the browser's own CPU use is counted against the run, as on a "
        "laptop watching its own batch; the browser's start-up work is let settle before "
        "the timed run.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
