"""The workloads of issue #6, for bench/suite.py.

Task functions are module-level in this module (importable in every worker: the harness puts
bench/ on PYTHONPATH), so every pool pickles them by reference and none pays for shipping code.

CPU work is a *calibrated* pure-Python loop: a fixed number of iterations (1 ms worth on this
machine, measured once and cached), not "spin until the clock says 1 ms".  A clock-based spin
hides contention: when a neighbour steals the core, the task still ends on time having done
less work, and efficiency looks better than it is.  Fixed work makes the serial baseline and
the pools do exactly the same computation, and makes runs comparable across days.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

BIG_ARG_BYTES = 2**20  # big_args: one argument is a 1 MiB float64 array
BIG_ARG_DISTINCT = 64  # distinct arrays cycled through the inputs (64 MiB, not 2 GiB, in RAM)
STARTUP_TASKS = 1


def trivial(x: Any) -> Any:
    return x


def nap_1ms(x: Any) -> Any:
    """1 ms of waiting and almost no CPU (bench/many_workers.py: what limits many workers
    running it is the parent's cost per task)."""
    time.sleep(0.001)
    return x


def warm(x: Any) -> Any:
    """The warm-up function: not the measured one, so no adaptive chunking learns from it."""
    return x


def busy(iterations: int) -> int:
    """Pure-Python CPU work: `iterations` turns of an integer loop (holds the GIL)."""
    acc = 0
    for i in range(iterations):
        acc ^= i * 7
    return acc & 0xFF


def busy_timed(iterations: int) -> tuple[int, float]:
    """busy() and the seconds it took inside the worker (bench/scaling.py: the share of the
    workers' time spent in the task, whatever speed the machine's cores run at)."""
    t0 = time.perf_counter()
    result = busy(iterations)
    return result, time.perf_counter() - t0


def array_sum(a: Any) -> float:
    return float(a.sum())


@dataclass
class Workload:
    name: str
    fn: Callable[[Any], Any]
    inputs: list[Any]
    figure: str  # the figure the workload is judged by: tasks_per_s | efficiency | wall_s
    meta: dict[str, Any] = field(default_factory=dict)

    def expected(self, results: list[Any]) -> None:
        """Every system must return one right result per input, in input order."""
        if len(results) != len(self.inputs):
            raise AssertionError(f"{self.name}: {len(results)} results for {len(self.inputs)}")
        check = self.meta.get("check")
        if check is not None and results[:: max(1, len(results) // 50)] != check[:: max(
                1, len(results) // 50)]:
            raise AssertionError(f"{self.name}: wrong results")


def _n(count: int, scale: float) -> int:
    return max(1, round(count * scale))


def make_tiny(scale: float, per_ms: int) -> Workload:
    xs = list(range(_n(100_000, scale)))
    return Workload("tiny", trivial, xs, "tasks_per_s", {"check": xs})


def make_cpu(ms: int, count: int) -> Callable[[float, int], Workload]:
    def make(scale: float, per_ms: int) -> Workload:
        xs = [ms * per_ms] * _n(count, scale)
        return Workload(f"cpu_{ms}ms", busy, xs, "efficiency", {"task_ms": ms})
    return make


def make_uneven(scale: float, per_ms: int) -> Workload:
    """Most tasks 1 ms, 0.5% of them 200 ms, at seeded random positions (the same every run);
    half the serial time is in the slow ones, so a pool that parks a slow tail on one worker
    loses up to half its efficiency."""
    fast, slow = _n(2000, scale), _n(10, scale)
    xs = [1 * per_ms] * fast + [200 * per_ms] * slow
    random.Random(6).shuffle(xs)
    return Workload("uneven", busy, xs, "efficiency", {"fast": fast, "slow": slow})


def make_big_args(scale: float, per_ms: int) -> Workload:
    import numpy as np

    rng = np.random.default_rng(0)
    ring = [rng.random(BIG_ARG_BYTES // 8) for _ in range(BIG_ARG_DISTINCT)]
    count = _n(2000, scale)
    xs = [ring[i % BIG_ARG_DISTINCT] for i in range(count)]
    check = [float(a.sum()) for a in xs]
    return Workload("big_args", array_sum, xs, "wall_s", {"check": check})


def make_startup(scale: float, per_ms: int) -> Workload:
    return Workload("startup", trivial, [1] * STARTUP_TASKS, "wall_s")


WORKLOADS: dict[str, Callable[[float, int], Workload]] = {
    "tiny": make_tiny,
    "cpu_1ms": make_cpu(1, 2000),
    "cpu_10ms": make_cpu(10, 200),
    "uneven": make_uneven,
    "big_args": make_big_args,
    "startup": make_startup,
}
