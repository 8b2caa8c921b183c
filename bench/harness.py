"""Shared helpers of the benchmark suite (bench/suite.py): timing, CPU and memory accounting,
fresh-process cells, repeat statistics, calibration and the run's environment.

How one figure is made:

    suite.py (orchestrator)                         cell (fresh `python bench/suite.py --cell`)
    -----------------------                         -------------------------------------------
    calibrate busy loop once (cached)   ──args──►   import system, build inputs (untimed)
    for round in 1..R (cells shuffled,              open pool + warm-up (untimed)
      same seed ⇒ same order):                      snapshot: perf_counter, rusage(SELF),
        run every cell once           ◄──JSON──       per-thread CPU clocks, RSS sampler
    ratios computed inside each round,              timed call ─► results checked
    then median / min over rounds                   snapshot again, close pool

Each cell is its own interpreter, so no pool's workers, caches or threads leak into another
system's figures, and every system starts from the same state.  The parent's CPU time is
`getrusage(RUSAGE_SELF)` (all threads of the calling process: caller, supervisor, feeders,
result handlers) minus the RSS sampler's own thread CPU; the supervisor's share is read from
its thread's CPU clock (`time.pthread_getcpuclockid`), so per-task supervisor cost is exact.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RSS_SAMPLE_INTERVAL_S = 0.02  # peak RSS sampling period of the process tree
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
CELL_TIMEOUT_S = 600.0  # a cell that runs longer than this is reported as an error
# Environment of every cell: bench/ importable in the workers whatever the start method, hash
# seed fixed, BLAS single-threaded (big_args sums must not spawn threads on 2 cores).
CELL_ENV = {"PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}


# ---- clocks ---------------------------------------------------------------------------------

def process_cpu_s() -> float:
    """CPU seconds (user + system) of this process, all its threads, children excluded: the
    same total as getrusage(RUSAGE_SELF), read from CLOCK_PROCESS_CPUTIME_ID (ns resolution,
    where ru_utime/ru_stime are split by tick sampling)."""
    return time.process_time()


def rusage_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def thread_cpu_s(thread: threading.Thread) -> float | None:
    """CPU seconds of one live thread of this process (Linux: its pthread CPU clock)."""
    if thread.ident is None or not thread.is_alive():
        return None
    try:
        return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
    except (OSError, AttributeError, OverflowError):
        return None


def named_threads_cpu_s(prefix: str) -> dict[str, float]:
    """CPU seconds of each live thread whose name starts with `prefix`, by name."""
    found = {}
    for thread in threading.enumerate():
        if thread.name.startswith(prefix):
            seconds = thread_cpu_s(thread)
            if seconds is not None:
                found[thread.name] = seconds
    return found


# ---- memory ---------------------------------------------------------------------------------

def tree_pids_by_proc(root: int) -> list[int]:
    """`root` and its descendants, from /proc/PID/task/TID/children (Linux): a process is
    listed under the thread that forked it, so every thread of each process is read."""
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                    todo.extend(int(child) for child in f.read().split())
        except (OSError, ValueError):
            pass  # it (or that thread) exited while we looked
    return pids


class TreeRssSampler(threading.Thread):
    """Peak resident memory of this process plus all its descendants (workers, fork servers,
    resource trackers), sampled every RSS_SAMPLE_INTERVAL_S.  Its own CPU (cpu_s) is read on
    its thread clock so the caller can subtract it from the parent's CPU.

    On Linux the tree is walked through /proc/PID/task/TID/children and each RSS read from
    /proc/PID/statm: ~0.1 ms a sample.  psutil's children(recursive=True) reads the parent of
    every process on the machine, ~1.1 ms a sample here with ~70 processes: at one sample per
    20 ms that took ~6% of a CPU from the workers of the cell being timed (on 2 cores, ~3%
    of every system's efficiency)."""

    def __init__(self, interval_s: float = RSS_SAMPLE_INTERVAL_S) -> None:
        super().__init__(name="bench-rss-sampler", daemon=True)
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop_event = threading.Event()
        self._by_proc = os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")

    def sample(self) -> int:
        total = self._tree_rss_proc() if self._by_proc else self._tree_rss_psutil()
        self.peak_bytes = max(self.peak_bytes, total)
        return total

    @staticmethod
    def _tree_rss_proc() -> int:
        total = 0
        for pid in tree_pids_by_proc(os.getpid()):
            try:
                with open(f"/proc/{pid}/statm", "rb") as f:
                    total += int(f.read().split()[1]) * PAGE_SIZE
            except (OSError, ValueError, IndexError):
                pass  # it exited after it was listed
        return total

    @staticmethod
    def _tree_rss_psutil() -> int:
        import psutil

        me = psutil.Process()
        total = 0
        try:
            procs = [me] + me.children(recursive=True)
        except psutil.Error:
            procs = [me]
        for proc in procs:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass  # it exited between listing and reading
        return total

    def run(self) -> None:
        self.sample()
        while not self._stop_event.wait(self.interval_s):
            self.sample()

    def cpu_s(self) -> float:
        """This sampler thread's CPU so far (0 when it is not running)."""
        return thread_cpu_s(self) or 0.0

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


# ---- one timed call -------------------------------------------------------------------------

@dataclass
class Measurement:
    wall_s: float = 0.0
    parent_cpu_s: float = 0.0  # the calling process, all threads, minus the RSS sampler
    caller_cpu_s: float = 0.0  # the thread that made the call (main thread)
    supervisor_cpu_s: float | None = None  # procqueue's supervisor thread, when there is one
    peak_rss_bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def measure_call(call: Callable[[], Any], supervisor_prefix: str | None = None,
                 sample_rss: bool = True) -> tuple[Any, Measurement]:
    """Run `call()` once under every clock; returns (its result, the measurement)."""
    sampler = TreeRssSampler() if sample_rss else None
    if sampler is not None:
        sampler.start()
        time.sleep(2 * RSS_SAMPLE_INTERVAL_S)  # its first sample (psutil import) is not timed
    sup0 = named_threads_cpu_s(supervisor_prefix) if supervisor_prefix else {}
    samp0 = sampler.cpu_s() if sampler else 0.0
    cpu0, caller0 = process_cpu_s(), time.thread_time()
    t0 = time.perf_counter()
    result = call()
    wall = time.perf_counter() - t0
    cpu1, caller1 = process_cpu_s(), time.thread_time()
    samp1 = sampler.cpu_s() if sampler else 0.0
    sup1 = named_threads_cpu_s(supervisor_prefix) if supervisor_prefix else {}
    if sampler is not None:
        sampler.stop()
    m = Measurement(wall_s=wall, caller_cpu_s=caller1 - caller0,
                    peak_rss_bytes=sampler.peak_bytes if sampler else 0)
    m.parent_cpu_s = (cpu1 - cpu0) - (samp1 - samp0)
    if supervisor_prefix and sup1:
        m.supervisor_cpu_s = sum(v - sup0.get(k, 0.0) for k, v in sup1.items())
    return result, m


# ---- fresh-process cells --------------------------------------------------------------------

def run_in_fresh_process(argv: list[str], timeout_s: float = CELL_TIMEOUT_S) -> dict[str, Any]:
    """Run `python argv...` in a new interpreter whose last stdout line is a JSON object.
    Returns that object, or {"error": ...}.  The child leads its own process group, killed
    entirely on timeout so no worker outlives its cell."""
    env = {**os.environ, **CELL_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        proc.communicate()
        return {"error": f"timed out after {timeout_s:.0f} s"}
    finally:
        _kill_group(proc.pid)  # anything the cell left behind (it should leave nothing)
    if proc.returncode != 0:
        last = err.strip().splitlines()[-1] if err.strip() else f"exit code {proc.returncode}"
        return {"error": last[:300]}
    try:
        return dict(json.loads(out.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        return {"error": f"no JSON on stdout: {out[-200:]!r} {err[-200:]!r}"}


def _kill_group(pid: int) -> None:
    import signal

    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def cell_arguments(parser: Any, *, workers: list[int], rounds: int, ideal_s: float,
                   out: Path) -> None:
    """The options of the scripts whose cells are (system, API, N workers): many_workers.py,
    scaling.py."""
    parser.add_argument("--workers", type=int, nargs="+", default=workers)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--ideal-s", type=float, default=ideal_s)
    parser.add_argument("--only", nargs="*", default=None, help="system:api cells to run")
    parser.add_argument("--cell", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=out)


def save_results(out: Path, raw: dict[str, Any], report: str) -> None:
    """The report at `out` (markdown, printed too) and the raw rows beside it (.json)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1))
    out.write_text(report)
    print(report)


def failed_cells(rows: list[dict[str, Any]], describe: Callable[[dict[str, Any]], str]
                 ) -> str | None:
    """The report's line naming the cells that failed (`describe` names one), or None."""
    errors = [r for r in rows if "error" in r]
    if not errors:
        return None
    return "Cells that failed: " + "; ".join(f"{describe(r)}: {r['error']}" for r in errors)


# ---- statistics over repeats ----------------------------------------------------------------

def spread(values: Iterable[float]) -> dict[str, float]:
    """median, min, max and count of repeated figures."""
    xs = [v for v in values if v is not None]
    if not xs:
        return {}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


# ---- calibration ----------------------------------------------------------------------------

def calibrate_iterations_per_ms(busy: Callable[[int], Any], probe_iterations: int = 200_000,
                                trials: int = 15) -> int:
    """Iterations of `busy` that take 1 ms of CPU on this machine.  The fastest of `trials`
    probes is used: interference only ever slows a probe down, so the minimum is the machine's
    speed and the figure is stable from run to run (measured on the thread's CPU clock)."""
    best = float("inf")
    busy(probe_iterations // 10)  # warm up
    for _ in range(trials):
        t0 = time.thread_time()
        busy(probe_iterations)
        best = min(best, time.thread_time() - t0)
    return max(1, round(probe_iterations / (best * 1000)))


def load_or_calibrate(path: Path, busy: Callable[[int], Any], recalibrate: bool) -> dict[str, Any]:
    """The calibration is cached per machine and Python so that repeated runs of the suite
    (the lead's before/after comparisons) do exactly the same work per task."""
    key = f"{platform.node()}|{platform.python_version()}|{platform.machine()}"
    if path.exists() and not recalibrate:
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return dict(saved)
    calibration = {"key": key, "iterations_per_ms": calibrate_iterations_per_ms(busy),
                   "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(calibration, indent=1))
    return calibration


# ---- the run's environment ------------------------------------------------------------------

def compile_procqueue() -> None:
    """Write procqueue's bytecode before timing anything.  An installed package has it (pip
    compiles on install), but an editable checkout under PYTHONDONTWRITEBYTECODE=1 (this
    machine's default) would recompile every module in every fresh interpreter: ~60 ms more
    per `startup` cell and per `procqueue` command, a cost users do not pay."""
    import compileall

    for folder in ("procqueue", "cli"):
        compileall.compile_dir(str(HERE.parent / folder), quiet=1)


def environment() -> dict[str, Any]:
    """What a reader needs to reproduce or discount a figure."""
    versions = {}
    for name in ("procqueue", "loky", "mpire", "joblib", "numpy", "psutil", "cloudpickle"):
        try:
            from importlib.metadata import version

            versions[name] = version(name)
        except Exception:  # noqa: BLE001 - not installed
            versions[name] = None
    commit = _git("rev-parse", "--short", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--", "procqueue"))
    return {"python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
            "loadavg_start": os.getloadavg(), "versions": versions,
            "procqueue_commit": commit, "procqueue_dirty": dirty,
            "when": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=HERE.parent, capture_output=True, text=True,
                              timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
