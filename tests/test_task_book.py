"""The task book as a unit: no processes, no pipes; fake sinks record what they are told.

Each test states a promise the pool relies on: every task ends exactly once, a failure is
retried or failed by the policy, a refused call is cancelled whole, a halted call stops."""
from __future__ import annotations

from typing import Any

import pytest

from procqueue.chunking import ChunkSizer
from procqueue.errors import TaskCancelledError, WorkerCrashedError, is_retry_stopped
from procqueue.protocol import CallKind
from procqueue.retry import FailureKind, RetryPolicy
from procqueue.scheduler import HaltPolicy, Scheduler
from procqueue.task_book import TaskBook
from procqueue.tasks import Block, Job, Task, TaskState, new_id


class RecordingSink:
    """A call's sink that records every outcome it is given."""

    def __init__(self, *, runs: bool = False) -> None:
        self.outcomes: list[tuple[int, bool, Any]] = []
        self.batches = 0
        if runs:
            self.deliver_all = self._deliver_all

    def starting(self, task: Task) -> bool:
        return True

    def deliver(self, task: Task, ok: bool, value: Any) -> None:
        self.outcomes.append((task.index, ok, value))

    def _deliver_all(self, succeeded: list[tuple[Task, Any]]) -> None:
        self.batches += 1
        self.outcomes += [(task.index, True, value) for task, value in succeeded]


def make_book(retries: int = 0, retry_on: tuple[type[BaseException], ...] = ()
              ) -> tuple[TaskBook, list[Job]]:
    halted: list[Job] = []
    policy = RetryPolicy(retries, retry_on, 0.0, 0.0)
    return TaskBook(Scheduler(), policy, halted.append), halted


def make_job(sink: Any, halt: str | None = None) -> Job:
    job = Job(new_id(), 1, b"", CallKind.ONE, sink, timeout_s=None,
              sizer=ChunkSizer(1, fixed=1))
    job.halt = HaltPolicy.parse(halt) if halt else None
    return job


def make_tasks(job: Job, n: int) -> list[Task]:
    return [Task(new_id(), job, i, b"", i) for i in range(n)]


def dispatch(task: Task, pid: int = 42) -> None:
    """What the dispatcher does when it sends a task to a worker (no attempt yet: that is
    counted when the start is observed, see ran())."""
    task.move(TaskState.DISPATCHED)
    task.pid = pid


def ran(task: Task) -> None:
    """What WorkerOutcomes does when a result, crash or timeout shows the task started."""
    task.attempts += 1


def running(book: TaskBook, job: Job, n: int) -> list[Task]:
    """n tasks of `job`, accepted by `book`, taken from its queue and sent to a worker."""
    tasks = make_tasks(job, n)
    book.accept(list(tasks), {})
    book.scheduler.next_batch(n)
    for task in tasks:
        dispatch(task)
    return tasks


def test_accepted_tasks_are_queued_and_counted() -> None:
    book, _ = make_book()
    sink = RecordingSink()
    tasks = make_tasks(make_job(sink), 3)
    book.accept(list(tasks), {})
    assert book.submitted == 3 and book.scheduler.queued == 3 and book.work_left()
    assert sink.outcomes == [] and all(t.state is TaskState.QUEUED for t in tasks)


def test_a_task_whose_argument_failed_fails_at_once_naming_its_input() -> None:
    book, _ = make_book()
    sink = RecordingSink()
    tasks = make_tasks(make_job(sink), 2)
    error = TypeError("cannot pickle")
    book.accept(list(tasks), {tasks[1].id: error})
    assert sink.outcomes == [(1, False, error)]
    assert (error.index, error.input_repr) == (1, "1")  # type: ignore[attr-defined]
    assert book.failed == 1 and book.scheduler.queued == 1


def test_a_refused_call_is_cancelled_whole_blocks_included() -> None:
    book, _ = make_book()
    sink = RecordingSink()
    job = make_job(sink)
    refusal = TaskCancelledError("the pool was terminated")
    book.accept([*make_tasks(job, 2), Block(new_id(), job, 2, ["a", "b"])], {}, refusal)
    assert sorted(index for index, _, _ in sink.outcomes) == [0, 1, 2, 3]
    assert all(not ok and value is refusal for _, ok, value in sink.outcomes)
    assert book.cancelled == 4 and not book.work_left()


def test_each_task_ends_once_and_the_book_refuses_a_second_end() -> None:
    book, _ = make_book()
    sink = RecordingSink()
    (task,) = make_tasks(make_job(sink), 1)
    book.accept([task], {})
    book.scheduler.next_batch(1)
    dispatch(task)
    book.finish(task, TaskState.DONE, True, 7)
    assert sink.outcomes == [(0, True, 7)] and book.succeeded == 1 and not book.work_left()
    with pytest.raises(Exception):
        book.finish(task, TaskState.FAILED, False, ValueError("late"))
    assert sink.outcomes == [(0, True, 7)]


def test_a_cancelled_futures_task_is_ended_without_a_delivery() -> None:
    book, _ = make_book()
    sink = RecordingSink()
    (task,) = make_tasks(make_job(sink), 1)
    book.accept([task], {})
    book.cancel_queued(task, notify=False)
    assert sink.outcomes == [] and book.cancelled == 1 and task.state is TaskState.CANCELLED


def test_a_crash_is_retried_while_attempts_are_left_then_fails() -> None:
    book, _ = make_book(retries=1)
    sink = RecordingSink()
    (task,) = make_tasks(make_job(sink), 1)
    book.accept([task], {})
    book.scheduler.next_batch(1)
    dispatch(task)
    ran(task)
    book.after_failure(task, FailureKind.CRASH, WorkerCrashedError(), may_retry=True)
    assert task.state is TaskState.RETRY_WAIT and book.retries == 1 and sink.outcomes == []
    (released,) = book.scheduler.release_due_retries(float("inf"))
    book.requeue(released)
    book.scheduler.next_batch(1)
    dispatch(task)
    ran(task)
    crash = WorkerCrashedError()
    book.after_failure(task, FailureKind.CRASH, crash, may_retry=True)
    assert sink.outcomes == [(0, False, crash)] and crash.attempts == 2


@pytest.mark.parametrize("kind, error, retried", [
    (FailureKind.EXCEPTION, KeyError("k"), True),  # in retry_on
    (FailureKind.EXCEPTION, ValueError("v"), False),  # not in retry_on
    (FailureKind.TIMEOUT, TimeoutError(), False),  # timeouts are not retried by this policy
])
def test_the_policy_decides_which_failures_are_retried(kind: FailureKind, error: Exception,
                                                       retried: bool) -> None:
    book, _ = make_book(retries=2, retry_on=(KeyError,))
    (task,) = running(book, make_job(RecordingSink()), 1)
    ran(task)
    book.after_failure(task, kind, error, may_retry=True)
    assert (task.state is TaskState.RETRY_WAIT) is retried
    assert (task.state is TaskState.FAILED) is not retried


def test_nothing_is_retried_once_the_pool_takes_no_work() -> None:
    book, _ = make_book(retries=3)
    (task,) = running(book, make_job(RecordingSink()), 1)
    ran(task)
    book.after_failure(task, FailureKind.CRASH, WorkerCrashedError(), may_retry=False)
    assert task.state is TaskState.FAILED and book.retries == 0


def test_a_call_is_halted_once_its_policy_is_reached() -> None:
    book, halted = make_book()
    sink = RecordingSink()
    job = make_job(sink, halt="soon,fail=2")
    tasks = make_tasks(job, 4)
    book.accept(list(tasks), {})
    book.scheduler.next_batch(4)
    for task in tasks[:2]:
        dispatch(task)
    book.fail(tasks[0], ValueError("first"))
    assert halted == []
    book.fail(tasks[1], ValueError("second"))
    assert halted == [job]


def test_cancelling_a_call_ends_what_waits_queued_or_in_backoff() -> None:
    book, _ = make_book(retries=1)
    sink = RecordingSink()
    job = make_job(sink)
    tasks = make_tasks(job, 3)
    book.accept(list(tasks), {})
    (first,) = book.scheduler.next_batch(1)
    dispatch(first)
    ran(first)
    crash = WorkerCrashedError()
    book.after_failure(first, FailureKind.CRASH, crash, may_retry=True)
    job.cancelled = True
    book.cancel_waiting(job)
    ended = {i: v for i, _, v in sink.outcomes}
    assert sorted(ended) == [0, 1, 2]
    # the one in its backoff ends with the failure it waited to retry (not "cancelled")
    assert ended[first.index] is crash and is_retry_stopped(crash)
    assert all(isinstance(v, TaskCancelledError) and not is_retry_stopped(v)
               for i, v in ended.items() if i != first.index)
    assert not book.work_left()


def test_a_batch_of_successes_reaches_a_run_sink_in_one_delivery() -> None:
    book, _ = make_book()
    sink = RecordingSink(runs=True)
    job = make_job(sink)
    tasks = running(book, job, 3)
    tasks[1].move(TaskState.FAILED)  # given another outcome meanwhile: not delivered again
    book.tasks.pop(tasks[1].id)
    book.succeed_all(job, [(t, t.index * 10) for t in tasks])
    assert sink.batches == 1 and sink.outcomes == [(0, True, 0), (2, True, 20)]


def test_a_skipped_task_runs_later_unless_its_call_was_cancelled() -> None:
    book, _ = make_book()
    sink = RecordingSink()
    job = make_job(sink)
    tasks = running(book, job, 2)
    book.on_skipped(tasks[0])
    assert tasks[0].state is TaskState.QUEUED and tasks[0].attempts == 0
    job.cancelled = True
    book.on_skipped(tasks[1])
    assert tasks[1].state is TaskState.CANCELLED and sink.outcomes[0][0] == 1


def test_a_blocks_inputs_count_until_reported_and_become_tasks_when_needed() -> None:
    book, _ = make_book()
    job = make_job(RecordingSink())
    block = Block(new_id(), job, 10, ["a", "b", "c"])
    book.accept([block], {})
    assert book.block_inputs == 3 and book.submitted == 3 and book.work_left()
    book.block_successes(1)
    assert book.block_inputs == 2 and book.succeeded == 1
    task = book.block_task(block, 1, running_pid=99)
    assert (task.index, task.input, task.state, task.attempts, task.pid) == (
        11, "b", TaskState.DISPATCHED, 0, 99)  # an attempt once its outcome shows it ran
    assert book.tasks[task.id] is task


@pytest.mark.parametrize("cancelled, started, state, attempts", [
    (False, False, TaskState.QUEUED, 0),  # runs again, uncharged
    (True, False, TaskState.CANCELLED, 0),  # its call wants nothing more run
    (True, True, TaskState.FAILED, 1),  # finished in the killed worker, result lost
])
def test_a_task_held_by_a_dead_worker_is_written_off_by_what_its_call_wants(
        cancelled: bool, started: bool, state: TaskState, attempts: int) -> None:
    book, _ = make_book()
    sink = RecordingSink()
    job = make_job(sink)
    (task,) = running(book, job, 1)
    job.cancelled = cancelled
    book.write_off(task, started=started)
    assert (task.state, task.attempts) == (state, attempts)
    if state is not TaskState.QUEUED:
        ((index, ok, error),) = sink.outcomes
        assert not ok and isinstance(error, TaskCancelledError)
