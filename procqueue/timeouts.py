"""When a running task times out: its absolute timeout, or a multiple of the median run time
of its call so far (GNU parallel's --timeout 300%), counted from when its worker marked it
started, or, for a task sent but never marked started, from when it was sent (a worker stuck
before reaching it).  Pure: reads a slot and its tasks, changes nothing; the supervisor asks
for the deadlines and kills what is past them."""

from __future__ import annotations

from collections import deque

from .tasks import Task
from .worker_slots import Slot, SlotPhase

MIN_DURATIONS_FOR_RELATIVE = 3  # finished tasks needed before a relative timeout applies
MIN_RELATIVE_TIMEOUT_S = 1.0  # a relative timeout never kills a task younger than this


def timeout_of(task: Task) -> float | None:
    """Seconds a task may run: its absolute timeout, or a multiple of the median run time
    of its call so far (once MIN_DURATIONS_FOR_RELATIVE are known; never under
    MIN_RELATIVE_TIMEOUT_S, so scheduling noise never kills a healthy short task)."""
    if task.timeout_s is not None:
        return task.timeout_s
    job = task.job
    if job.timeout_factor is None or job.durations is None \
            or len(job.durations) < MIN_DURATIONS_FOR_RELATIVE:
        return None
    return max(MIN_RELATIVE_TIMEOUT_S, job.timeout_factor * _median(job.durations))


def task_deadline(slot: Slot) -> float | None:
    """The monotonic time the task `slot` runs (or is stuck before) times out; None if it
    has no timeout or the slot runs nothing."""
    if not slot.batches or slot.phase not in (SlotPhase.READY, SlotPhase.RETIRING):
        return None
    running = slot.current_task()
    batch = slot.batches[0]
    if running is not None:
        task = batch.pending.get(running[0])
        started = running[1]
    else:
        task = next(iter(batch.pending.values()), None)
        started = batch.sent_at
    if task is None:
        return None
    timeout_s = timeout_of(task)
    if timeout_s is None:
        return None
    return max(started, batch.sent_at) + timeout_s


def _median(values: "deque[float]") -> float:
    """statistics.median, without importing statistics (and fractions, decimal) at start-up."""
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
