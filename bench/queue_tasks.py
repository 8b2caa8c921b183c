"""Task functions of bench/queue_bench.py (issue #21), importable by every queue's workers.

Queues pass functions by reference (module and name), so these live in a module on the
workers' path: the bench puts bench/ on PYTHONPATH for every process it starts.  Nothing here
imports a queue library; bench/queue_services.py wraps them for huey and DBOS.
"""

from __future__ import annotations

import time


def now(x: int) -> float:
    """The tiny task: the wall clock at the moment it runs.  Its result tells both when the
    first task of a drain started and how long after its enqueue a task began (latency)."""
    return time.time()


def noop(x: int) -> int:
    return x


def spin(iterations: int) -> int:
    """CPU-bound work: a fixed number of turns of the suite's calibrated integer loop (the
    same loop as cases.busy, so `iterations` = 10 ms x the cached iterations per ms), not
    "spin until the clock says 10 ms", which would hide contention."""
    acc = 0
    for i in range(iterations):
        acc ^= i * 7
    return acc & 0xFF


def spin_now(iterations: int) -> float:
    """spin(iterations), returning the wall clock at its start (when the task began)."""
    started = time.time()
    spin(iterations)
    return started


def warm(x: int) -> int:
    """Warm-up function (pools are warmed with another function than the measured one)."""
    return x
