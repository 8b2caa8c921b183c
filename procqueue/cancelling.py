"""Ending tasks on request: a cancelled future, a cancelled or halted call, terminate().

What waits in the queue is ended by the task book alone.  What a worker holds needs the
worker: a task waiting in its pipe is revoked (its batch comes back as skipped), a running
task's worker is killed, and a task that finished but whose result is still in the pipe is
read first (computed results are kept, not killed).
"""

from __future__ import annotations

import time
from typing import Callable

from .errors import PoolBrokenError, TaskCancelledError
from .blocks import explode_slot
from .outcomes import TaskEvents, started_ids
from .task_book import TaskBook
from .tasks import Job, Task, TaskState
from .worker_slots import Slot, WorkerSlots


class Canceller:
    def __init__(self, book: TaskBook, workers: WorkerSlots, events: TaskEvents,
                 kill_grace_s: float, read_sent_results: Callable[[Slot], None]) -> None:
        """`read_sent_results(slot)`: apply what the worker has sent so far (the loop's)."""
        self.book = book
        self.workers = workers
        self.events = events
        self.kill_grace_s = kill_grace_s
        self.read_sent_results = read_sent_results

    def cancel_task(self, task: Task, running: bool) -> None:
        """A future was cancelled (it already shows it): no outcome is delivered."""
        if task.state is not TaskState.DISPATCHED or not running:
            self.book.cancel_queued(task, notify=False)
            return
        for slot in self.workers.slots:
            batch = next((b for b in slot.batches if task.id in b.pending), None)
            if batch is None:
                continue
            del batch.pending[task.id]
            current = slot.current_task()
            if current is not None and current[0] == task.id:
                task.attempts += 1
                now = time.monotonic()
                self.events.emit(task, slot, current[1], now, "cancelled", None)
                self.workers.kill(slot, "cancelled", self.kill_grace_s, now)
            else:
                # It waits in the worker's pipe: revoke its batch so it does not start; the
                # batch's other unstarted tasks come back as skipped and are queued again.
                slot.revoke(batch)
            self.book.finish(task, TaskState.CANCELLED, False, None)
            return

    def cancel_job(self, job: Job, kill_running: bool) -> None:
        job.cancelled = True
        self.book.cancel_waiting(job)
        for slot in self.workers.slots:
            explode_slot(self.book, slot, job)
            if kill_running:
                self._kill_tasks_of(slot, job)
            else:
                # Running tasks finish; those sent to a worker behind them must not start.
                for batch in slot.batches:
                    if batch.job is job and batch.pending:
                        slot.revoke(batch)

    def _kill_tasks_of(self, slot: Slot, job: Job) -> None:
        if not _held_of(slot, job):
            return
        self.read_sent_results(slot)  # computed results are kept, not killed
        started = started_ids(slot, slot.current_task())
        for task in _held_of(slot, job):
            if task.id not in started:
                _drop(slot, task)
                self.book.end_unstarted(task)
        # A started task is left to the worker's death: the one running may have returned
        # since its slot said so, and the SIGTERM has the worker send what it finished
        # (worker._send_unsent_then_die).  A result that arrives is kept; a task still without
        # one when the worker is gone is ended by WorkerOutcomes.on_death, cancelled.
        self.workers.kill(slot, "cancelled", self.kill_grace_s, time.monotonic())

    def fail_everything(self, error: BaseException) -> None:
        """terminate() or a broken pool: every task without an outcome gets `error` (a copy)."""
        for slot in self.workers.slots:
            explode_slot(self.book, slot)
        self.book.tasks_of(self.book.scheduler.all_queued())  # registers blocks' inputs as tasks
        running = {current[0] for current in (s.current_task() for s in self.workers.slots)
                   if current is not None}
        for task in list(self.book.tasks.values()):
            if task.state.terminal:
                continue
            if task.id in running and task.state is TaskState.DISPATCHED:
                task.attempts += 1  # it was running: an attempt, cut short
            for slot in self.workers.slots:
                _drop(slot, task)
            if task.state is TaskState.QUEUED or task.state is TaskState.RETRY_WAIT:
                self.book.cancel_with(task, _copy_error(error))
            else:
                self.book.fail(task, _copy_error(error))
        self.book.scheduler.all_retry_waiting()


def _held_of(slot: Slot, job: Job) -> list[Task]:
    return [t for b in slot.batches for t in b.pending.values() if t.job is job]


def _drop(slot: Slot, task: Task) -> None:
    """The slot no longer waits for `task`'s result."""
    for batch in slot.batches:
        batch.pending.pop(task.id, None)


def _copy_error(error: BaseException) -> BaseException:
    """One exception object per task (each gets its own index/input attributes)."""
    if isinstance(error, TaskCancelledError):
        return TaskCancelledError(error.message)
    if isinstance(error, PoolBrokenError):
        copy = type(error)(str(error))
        copy.__cause__ = error.__cause__
        return copy
    return error
