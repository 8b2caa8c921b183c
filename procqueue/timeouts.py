"""When a running task times out: its absolute timeout, or a multiple of the median run time
of its call so far (GNU parallel's --timeout 300%), counted from when its worker marked it
started, or, for a task sent but never marked started, from UNSTARTED_GRACE_S after it was
sent (a worker stuck before reaching it); a worker still loading the task's function has
FUNCTION_LOAD_GRACE_S more.  Pure: reads a slot and its tasks, changes nothing; the supervisor asks
for the deadlines and kills what is past them."""

from __future__ import annotations

import time
from collections import deque

from .tasks import Task
from .worker_slots import Slot, SlotPhase

MIN_DURATIONS_FOR_RELATIVE = 3  # finished tasks needed before a relative timeout applies
MIN_RELATIVE_TIMEOUT_S = 1.0  # a relative timeout never kills a task younger than this
# A worker loading a task's function (an import) gets this long before the task's own timeout
# starts: a hung import is still caught, a slow one on a loaded machine is not a timeout.
FUNCTION_LOAD_GRACE_S = 30.0
# A task sent but not marked started yet: its clock starts this long after the send.  Only a
# worker stuck before reaching it needs the send's clock; a worker starting up, or not
# scheduled for a while on a loaded machine, must not make a waiting task time out.
UNSTARTED_GRACE_S = 5.0
LOOK_AGAIN_S = 0.05  # a task's clock not started yet: the supervisor looks again this often


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


def timing_task(slot: Slot) -> "tuple[Task, float] | None":
    """The task whose timeout runs on `slot` and when its clock started: the task the worker
    marked started, in whichever of the slot's batches it is (an earlier batch may still look
    pending while its results wait in the pipe), else the first batch's first task, from
    UNSTARTED_GRACE_S after the batch's send (a worker stuck before reaching it); None if the
    slot runs nothing."""
    if not slot.batches or slot.phase not in (SlotPhase.READY, SlotPhase.RETIRING):
        return None
    running = slot.current_task()
    batch = slot.batches[0]
    if running is not None:
        for candidate in slot.batches:
            task = candidate.pending.get(running[0])
            if task is not None:
                return task, max(running[1], candidate.sent_at)
    first = next(iter(batch.pending.values()), None)
    return None if first is None else (first, batch.sent_at + UNSTARTED_GRACE_S)


def task_deadline(slot: Slot) -> float | None:
    """The monotonic time the task `slot` runs (or is stuck before) times out; None if it
    has no timeout or the slot runs nothing."""
    return wake_times(slot)[0]


def wake_times(slot: Slot) -> tuple[float | None, float | None]:
    """(the task's deadline, when to look at the slot again before it) in one reading of the
    slot: the supervisor asks for both on every turn of its loop, for every slot."""
    if not slot.timed_batches:
        return None, None  # the common case, asked for every slot at every turn: no reads
    timing = timing_task(slot)
    if timing is None:
        return None, None
    task, started = timing
    timeout_s = timeout_of(task)
    if timeout_s is None:
        return None, None
    loading = slot.loading_function()
    if loading:  # (a warm-up, or the task's own function first)
        timeout_s += FUNCTION_LOAD_GRACE_S  # its clock starts once its function is loaded
    running = slot.current_task()
    marked = running is not None and running[0] == task.id and not loading
    # Not marked started (or loading): nothing wakes the supervisor when its clock starts
    # (the worker says nothing until the task finishes), so it looks again soon.
    return started + timeout_s, None if marked else time.monotonic() + LOOK_AGAIN_S


def look_again_at(slot: Slot) -> float | None:
    """When to look at a slot again whose task with a timeout has no clock of its own yet (its
    worker loads its function, or has not marked it started); None if it needs no look."""
    return wake_times(slot)[1]


def _median(values: "deque[float]") -> float:
    """statistics.median, without importing statistics (and fractions, decimal) at start-up."""
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
