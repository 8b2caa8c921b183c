"""When a running task times out (procqueue/timeouts.py), read off a slot with no process:
an absolute timeout from the task's start, a relative one only once enough of its call has
finished and never under a second, and a task sent but never marked started from a grace
after its send."""
from __future__ import annotations

import time
from collections import deque

import pytest

from procqueue.chunking import ChunkSizer
from procqueue.protocol import CallKind
from procqueue.tasks import Job, OutcomeSink, Task, TaskState, new_id
from procqueue.timeouts import (MIN_RELATIVE_TIMEOUT_S, UNSTARTED_GRACE_S, task_deadline,
                                timeout_of)
from procqueue.worker import CURRENT_TASK, IDLE, STARTED_NS
from procqueue.worker_slots import Batch, Slot, SlotPhase


def make_task(timeout_s: float | None = None, factor: float | None = None,
              durations: list[float] | None = None) -> Task:
    job = Job(new_id(), 1, b"", CallKind.ONE, OutcomeSink(), timeout_s=timeout_s,
              sizer=ChunkSizer(1, 1))
    job.timeout_factor = factor
    job.durations = deque(durations) if durations is not None else None
    return Task(new_id(), job, 0, b"", 0)


def ready_slot_running(task: Task, *, started: bool, started_at: float = 0.0) -> tuple[Slot,
                                                                                        Batch]:
    slot = Slot(0, ())
    slot.move(SlotPhase.STARTING)
    slot.move(SlotPhase.READY)
    task.move(TaskState.DISPATCHED)
    batch = Batch(1, task.job, [task])
    slot.add_batch(batch)
    slot.state[CURRENT_TASK] = task.id if started else IDLE
    slot.state[STARTED_NS] = int(started_at * 1e9)
    return slot, batch


@pytest.mark.parametrize("task, seconds", [
    (make_task(timeout_s=2.5), 2.5),
    (make_task(), None),  # no timeout at all
    (make_task(factor=3.0, durations=[1.0, 2.0]), None),  # too few finished to know a median
    (make_task(factor=3.0, durations=[1.0, 2.0, 4.0]), 6.0),  # 300% of the median 2 s
    (make_task(factor=3.0, durations=[0.01, 0.02, 0.03, 0.04]), MIN_RELATIVE_TIMEOUT_S),
])
def test_how_long_a_task_may_run(task: Task, seconds: float | None) -> None:
    assert timeout_of(task) == seconds


def test_a_started_task_times_out_its_timeout_after_its_start() -> None:
    task = make_task(timeout_s=2.0)
    now = time.monotonic()
    slot, batch = ready_slot_running(task, started=True, started_at=now + 1.0)
    assert task_deadline(slot) == pytest.approx(now + 3.0, abs=1e-6)
    batch.sent_at = now + 5.0  # a start the worker reports from before the send: the send
    assert task_deadline(slot) == pytest.approx(now + 7.0, abs=1e-6)


def test_a_task_never_marked_started_times_out_its_timeout_after_its_send_and_a_grace() -> None:
    # a worker stuck before the task is caught; one slow to reach it is not a timeout
    task = make_task(timeout_s=2.0)
    slot, batch = ready_slot_running(task, started=False)
    assert task_deadline(slot) == pytest.approx(batch.sent_at + UNSTARTED_GRACE_S + 2.0)


@pytest.mark.parametrize("phase", [SlotPhase.KILLING, SlotPhase.STARTING])
def test_a_slot_that_runs_nothing_now_has_no_deadline(phase: SlotPhase) -> None:
    task = make_task(timeout_s=2.0)
    slot, _ = ready_slot_running(task, started=True, started_at=time.monotonic())
    slot.phase = phase  # (set directly: the test is about reading the phase)
    assert task_deadline(slot) is None


def test_no_deadline_for_a_task_without_a_timeout_or_a_slot_without_batches() -> None:
    slot, _ = ready_slot_running(make_task(), started=True, started_at=time.monotonic())
    assert task_deadline(slot) is None
    slot.drop_batches()
    assert task_deadline(slot) is None


def test_a_task_whose_worker_is_loading_its_function_has_a_grace_first() -> None:
    # worker.py marks the first task with a negated start while it imports the function:
    # a slow import on a loaded machine is not the task's run time.
    from procqueue.timeouts import FUNCTION_LOAD_GRACE_S

    task = make_task(timeout_s=0.5)
    now = time.monotonic()
    slot, batch = ready_slot_running(task, started=True)
    slot.state[STARTED_NS] = -int(now * 1e9)
    batch.sent_at = now
    assert slot.current_task() == (task.id, pytest.approx(now, abs=1e-6))
    assert task_deadline(slot) == pytest.approx(now + 0.5 + FUNCTION_LOAD_GRACE_S, abs=1e-6)
    slot.state[STARTED_NS] = int((now + 2.0) * 1e9)  # loaded: the task's own clock
    assert task_deadline(slot) == pytest.approx(now + 2.5, abs=1e-6)


def test_the_supervisor_looks_again_until_a_tasks_clock_has_started() -> None:
    # Nothing wakes the supervisor when a worker marks a task started, so while a task with a
    # timeout is unmarked (or its function loading) it looks again soon; then not any more.
    from procqueue.timeouts import LOOK_AGAIN_S, look_again_at

    task = make_task(timeout_s=0.5)
    slot, _ = ready_slot_running(task, started=False)
    before = time.monotonic()
    look = look_again_at(slot)
    assert look is not None and before + LOOK_AGAIN_S <= look <= time.monotonic() + LOOK_AGAIN_S
    slot.state[CURRENT_TASK] = task.id
    slot.state[STARTED_NS] = -int(before * 1e9)  # loading its function
    assert look_again_at(slot) is not None
    slot.state[STARTED_NS] = int(before * 1e9)  # running: its own deadline wakes it
    assert look_again_at(slot) is None
    assert look_again_at(ready_slot_running(make_task(), started=False)[0]) is None
