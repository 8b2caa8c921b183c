"""When a running task times out: its absolute timeout, or a multiple of the median run time
of its call's successes so far (GNU parallel's --timeout 300%), counted from when its worker
marked it started, or, for a task sent but never marked started, from UNSTARTED_GRACE_S after
it was sent (a worker stuck before reaching it); a worker still loading the task's function has
FUNCTION_LOAD_GRACE_S more.  Reads slots and their tasks and changes nothing of them; the
supervisor asks for the deadlines (TimedSlots keeps its readings between turns) and kills what
is past them.  A block's inputs are timed as tasks are: its worker marks each input's start."""

from __future__ import annotations

import time
from collections import deque
from typing import Iterator, NamedTuple

from .tasks import Job, Task
from .worker_slots import Batch, Slot, SlotPhase

MIN_DURATIONS_FOR_RELATIVE = 3  # successes needed before a relative timeout applies
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
    """Seconds a task may run (its call's: see call_timeout)."""
    return call_timeout(task.job)


def call_timeout(job: Job) -> float | None:
    """Seconds any input of the call `job` may run: its absolute timeout, or a multiple of
    the median run time of the call so far (once MIN_DURATIONS_FOR_RELATIVE are known; never
    under MIN_RELATIVE_TIMEOUT_S, so scheduling noise never kills a healthy short task)."""
    if job.timeout_s is not None:
        return job.timeout_s
    if job.timeout_factor is None or job.durations is None \
            or len(job.durations) < MIN_DURATIONS_FOR_RELATIVE:
        return None
    return max(MIN_RELATIVE_TIMEOUT_S, job.timeout_factor * _median(job.durations))


class Timing(NamedTuple):
    """What is timed on a slot: a task, or an input of a block that has no Task (the block's
    id stands for the input running; outcomes.on_timeout makes it a Task when it times out)."""

    job: Job
    item_id: int  # the task's id, or the block's
    started: float  # when its clock started (monotonic)
    batch: Batch
    marked: bool  # the worker marked it started (else its clock is a guess: see timing_of)


def timing_of(slot: Slot) -> Timing | None:
    """What is timed on `slot`: the task or block input the worker marked started, in
    whichever of the slot's batches it is (an earlier batch may still look pending while its
    results wait in the pipe), else the first batch's first item, from UNSTARTED_GRACE_S after
    the batch's send (a worker stuck before reaching it); None if the slot runs nothing."""
    if not slot.batches or slot.phase not in (SlotPhase.READY, SlotPhase.RETIRING):
        return None
    running = slot.current_task()
    if running is not None:
        for candidate in slot.batches:
            if running[0] in candidate.pending or _runs_unexploded(candidate, running[0]):
                return Timing(candidate.job, running[0], max(running[1], candidate.sent_at),
                              candidate, True)
    batch = slot.batches[0]
    unstarted = batch.sent_at + UNSTARTED_GRACE_S
    first = next(iter(batch.pending.values()), None)
    if first is not None:
        return Timing(batch.job, first.id, unstarted, batch, False)
    block = batch.unexploded_block()
    return None if block is None else Timing(batch.job, block.id, unstarted, batch, False)


def _runs_unexploded(batch: Batch, item_id: int) -> bool:
    block = batch.unexploded_block()
    return block is not None and block.id == item_id


def task_deadline(slot: Slot) -> float | None:
    """The monotonic time the task `slot` runs (or is stuck before) times out; None if it
    has no timeout or the slot runs nothing."""
    return wake_times(slot)[0]


def wake_times(slot: Slot) -> tuple[float | None, float | None]:
    """(the task's deadline, when to look at the slot again before it) in one reading of the
    slot: the supervisor asks for both on every turn of its loop, for every slot."""
    if not slot.timed_batches:
        return None, None  # the common case, asked for every slot at every turn: no reads
    timing = timing_of(slot)
    if timing is None:
        return None, None
    timeout_s = call_timeout(timing.job)
    if timeout_s is None:
        return None, None
    loading = slot.loading_function()
    if loading:  # (a warm-up, or the task's own function first)
        timeout_s += FUNCTION_LOAD_GRACE_S  # its clock starts once its function is loaded
    marked = timing.marked and not loading
    # Not marked started (or loading): nothing wakes the supervisor when its clock starts
    # (the worker says nothing until the task finishes), so it looks again soon.  A block's
    # next input starts unannounced too, but later: the deadline of the input running now is
    # the soonest the block can have, and at it the supervisor reads the slot again.
    return timing.started + timeout_s, None if marked else time.monotonic() + LOOK_AGAIN_S


def look_again_at(slot: Slot) -> float | None:
    """When to look at a slot again whose task with a timeout has no clock of its own yet (its
    worker loads its function, or has not marked it started); None if it needs no look."""
    return wake_times(slot)[1]


class _Reading(NamedTuple):
    times: tuple[float | None, float | None]  # wake_times of the slot
    reread_at: float  # when to read the slot again at the latest
    batch_changes: int  # the slot's, as it was read (a change: read it again)


class TimedSlots:
    """The supervisor's reading of each slot that runs a call with a timeout: its wake
    times.  Reading a slot (its shared state, its batches: ~5 us) at each of the loop's
    hundreds of turns a second was most of a timed call's cost in the supervisor with many
    workers, so a reading is kept until one of its times comes, the slot's batches change, or
    REREAD_S passes.  A deadline that comes sooner without any of those (a relative timeout
    whose median shrank) is seen within REREAD_S, at a turn of the loop.  A task that started
    since the reading has a later deadline than the one read."""

    REREAD_S = 0.05

    def __init__(self) -> None:
        self._readings: dict[Slot, _Reading] = {}

    def read(self, slots: list[Slot], now: float) -> None:
        """At the start of a turn: read again what is due (see the class)."""
        readings: dict[Slot, _Reading] = {}
        for slot in slots:
            if not slot.timed_batches:
                continue
            kept = self._readings.get(slot)
            if kept is None or now >= kept.reread_at or kept.batch_changes != slot.batch_changes:
                times = wake_times(slot)
                reread_at = min(due for due in (*times, now + self.REREAD_S) if due is not None)
                kept = _Reading(times, reread_at, slot.batch_changes)
            readings[slot] = kept
        self._readings = readings

    def wake_times(self) -> Iterator[float]:
        for reading in self._readings.values():
            yield from (due for due in reading.times if due is not None)

    def deadline_of(self, slot: Slot) -> float | None:
        reading = self._readings.get(slot)
        return None if reading is None else reading.times[0]


def _median(values: "deque[float]") -> float:
    """statistics.median, without importing statistics (and fractions, decimal) at start-up."""
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
