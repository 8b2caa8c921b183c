"""The task book: every live task of one pool, registered, counted and ended in one place.

The supervisor owns processes, pipes and deadlines; the book owns the tasks' bookkeeping and
the decisions that follow an outcome: a task is accepted (or refused), finished exactly once
(`finish`, the only place a task reaches a terminal state and its outcome is delivered),
retried or failed after a failure (the retry policy), and a call is halted when its halt
policy says so (the book tells the supervisor, which alone can stop what runs).  It touches no
file descriptor and no process, so a test drives it with fake result objects.

    Supervisor / Dispatcher / WorkerOutcomes / Canceller
        │ accept, finish, fail, after_failure, on_skipped, write_off
        ▼
    TaskBook ──on_halt(job)──► the supervisor cancels the call's running tasks
        │ deliver(), once per task
        ▼
    the call's sink (AsyncResult, MapResult, future, iterator)
"""

from __future__ import annotations

import time
import traceback
from typing import Any, Callable

from .errors import TaskCancelledError, annotate, retry_stopped
from .protocol import OutOfBand, dumps_argument, short_repr
from .retry import FailureKind, RetryPolicy
from .scheduler import Scheduler
from .tasks import Block, Job, Task, TaskState, new_id


class TaskBook:
    def __init__(self, scheduler: Scheduler, policy: RetryPolicy,
                 on_halt: Callable[[Job], None]) -> None:
        self.scheduler = scheduler
        self.policy = policy
        self._on_halt = on_halt  # the call reached its halt policy: stop what runs of it
        self.tasks: dict[int, Task] = {}  # every task not yet terminal, by id
        self.block_inputs = 0  # inputs in blocks (queued or running) with no outcome yet
        self.submitted = self.succeeded = self.failed = self.cancelled = 0
        self.retries = 0

    # ---- tasks in ----------------------------------------------------------------------------

    def accept(self, entries: list[Task | Block], errors: dict[int, BaseException],
               refusal: BaseException | None = None) -> None:
        """Register a call's new tasks and blocks and queue them; a task whose argument
        already failed (`errors`, by task id) fails at once.  With `refusal` (the pool takes
        no more work: terminated or broken) every one of them is cancelled with it."""
        if refusal is not None:
            self._refuse(entries, refusal)
            return
        accepted: list[Task | Block] = []
        tasks = self.tasks
        for entry in entries:  # one pass: a run of submit() calls comes as one group
            if isinstance(entry, Block):
                self._accept_block(entry, accepted)
                continue
            task = entry
            self.submitted += 1
            task.job.submitted += 1
            tasks[task.id] = task
            if errors and task.id in errors:
                self.fail(task, errors[task.id])
            elif task.job.cancelled:
                self.finish(task, TaskState.CANCELLED, False, self.cancelled_error(task))
            else:
                accepted.append(task)
        self.scheduler.enqueue_all(accepted)

    def _refuse(self, entries: list[Task | Block], refusal: BaseException) -> None:
        """The pool takes no more work: every entry is registered and cancelled."""
        for entry in entries:
            if isinstance(entry, Block):
                self.block_inputs += len(entry)  # given back as it explodes into tasks
        for task in self.tasks_of(entries):
            self.submitted += 1
            self.tasks[task.id] = task
            self.finish(task, TaskState.CANCELLED, False, refusal)

    def _accept_block(self, block: Block, accepted: list[Task | Block]) -> None:
        self.block_inputs += len(block)
        self.submitted += len(block)
        block.job.submitted += len(block)
        if block.job.cancelled:
            for task in self.explode_queued(block):
                self.finish(task, TaskState.CANCELLED, False, self.cancelled_error(task))
        else:
            accepted.append(block)

    # ---- blocks become tasks -----------------------------------------------------------------

    def block_task(self, block: Block, position: int, running_pid: int | None = None
                   ) -> Task:
        """A registered Task for one input of a block: QUEUED, or, given the pid of the
        worker running the block, DISPATCHED in its first attempt there."""
        item = block.inputs[position]
        # Pickled again, about 1 us per input, and only for a block that is exploded (a
        # failure, crash or cancel).  A block travels as one pickled list (1,000 inputs: one
        # dumps ~20 us, one loads ~30 us); pickles per input, which an explode could slice,
        # would cost every block ~0.5 us per input each way (issue #20, measured).
        task = Task(new_id(), block.job, block.start + position, dumps_argument(item), item)
        self.tasks[task.id] = task
        if running_pid is not None:
            task.move(TaskState.DISPATCHED)
            task.pid = running_pid
        return task

    def explode_queued(self, block: Block) -> list[Task]:
        """A queued block's inputs as QUEUED tasks (to be cancelled or failed)."""
        self.block_inputs -= len(block)
        return [self.block_task(block, p) for p in range(len(block))]

    def tasks_of(self, entries: list[Task | Block]) -> list[Task]:
        """Queued entries as tasks: a block's inputs become tasks (see explode_queued)."""
        tasks: list[Task] = []
        for entry in entries:
            if isinstance(entry, Block):
                tasks += self.explode_queued(entry)
            else:
                tasks.append(entry)
        return tasks

    def block_successes(self, count: int) -> None:
        """`count` inputs of blocks succeeded and went to their sink as a run."""
        self.block_inputs -= count
        self.succeeded += count

    # ---- outcomes ----------------------------------------------------------------------------

    def finish(self, task: Task, state: TaskState, ok: bool, value: Any) -> None:
        """The only place a task reaches a terminal state and its outcome is delivered.  A
        cancelled Future's task (no value, not ok) delivers nothing: the Future knows."""
        task.move(state)
        del self.tasks[task.id]
        if isinstance(task.payload, OutOfBand):
            task.payload.finish()
        if state is TaskState.DONE:
            self.succeeded += 1
            if task.job.halt is not None:
                self.maybe_halt(task.job, successes=1)
        elif state is TaskState.FAILED:
            self.failed += 1
        else:
            self.cancelled += 1
        if value is None and not ok:
            return
        try:
            task.sink.deliver(task, ok, value)
        except Exception:
            traceback.print_exc()

    def succeed_all(self, job: Job, succeeded: list[tuple[Task, Any]]) -> None:
        """finish(task, DONE, ...) for a batch's successes, delivered to their sink at once
        (one lock and one wake-up of a waiting consumer per batch, not per task)."""
        delivered: list[tuple[Task, Any]] = []
        for pair in succeeded:
            task = pair[0]
            if task.state is not TaskState.DISPATCHED:
                continue  # given another outcome meanwhile (a halt read more results)
            task.move(TaskState.DONE)
            del self.tasks[task.id]
            if isinstance(task.payload, OutOfBand):
                task.payload.finish()
            delivered.append(pair)  # the same pair: no tuple made per task
        self.succeeded += len(delivered)
        if job.halt is not None and delivered:  # a halting call's batches are one task each
            self.maybe_halt(job, successes=len(delivered))
        # A batch of submit() calls has a sink per call: one by one, then.
        sink = job.sink
        if all(task.sink is sink for task, _ in delivered):
            try:
                sink.deliver_all(delivered)
            except Exception:
                traceback.print_exc()
            return
        for task, value in delivered:
            try:
                task.sink.deliver(task, True, value)
            except Exception:
                traceback.print_exc()

    def fail(self, task: Task, error: BaseException) -> None:
        annotate(error, index=task.index, input_repr=short_repr(task.input),
                 pid=task.pid, attempts=task.attempts)
        self.finish(task, TaskState.FAILED, False, error)
        self.maybe_halt(task.job, failures=1)

    def after_failure(self, task: Task, kind: FailureKind, error: BaseException, *,
                      may_retry: bool) -> None:
        """A task raised, timed out or crashed its worker: retried after a backoff if the
        policy says so (and `may_retry`: the pool still runs work), else failed; failed with
        retry_stopped where the policy would retry it but its call was halted or cancelled
        (or the pool is stopping): its input did not use its retries."""
        if not self.policy.should_retry(task.attempts, kind, error):
            self.fail(task, error)
        elif not may_retry or task.job.cancelled:
            self.fail(task, retry_stopped(error))
        else:
            self.retries += 1
            task.last_error = error
            task.move(TaskState.RETRY_WAIT)
            self.scheduler.wait_for_retry(
                task, time.monotonic() + self.policy.backoff(task.attempts))

    def on_skipped(self, task: Task) -> None:
        """The worker did not start the task: its batch was revoked (a cancel)."""
        if task.state is not TaskState.DISPATCHED:
            return  # already given an outcome
        if task.job.cancelled:
            self.end_unstarted(task)
        else:  # revoked for another task of its batch (a cancelled future): run it later
            self.requeue(task)

    def write_off(self, task: Task, *, started: bool) -> None:
        """Its worker died or was killed while holding it, through no fault of its own (the
        task that killed it is charged elsewhere).  `started`: it had finished in that worker,
        its result not sent yet."""
        if task.job.cancelled and started:
            task.attempts += 1  # it ran, and finished
            # Its call was halted or cancelled while the worker held it finished, its result
            # unsent (Canceller._kill_tasks_of); the killed worker did not get it out.
            self.fail(task, TaskCancelledError(
                "the task was cancelled: its worker was killed before it sent the result"))
            return
        # Not counted as an attempt: it never ran, or its run was not its fault.
        if task.job.cancelled:  # and its call wants nothing more run
            self.end_unstarted(task)
        else:
            self.requeue(task)

    def requeue(self, task: Task) -> None:
        """Back to the front of its call's queue (a worker gave it back unrun)."""
        task.move(TaskState.QUEUED)
        self.scheduler.enqueue(task, front=True)

    def maybe_halt(self, job: Job, failures: int = 0, successes: int = 0) -> None:
        """The call's halt policy: enough failures (or successes, or both), and nothing more
        of it starts."""
        job.failures += failures
        job.successes += successes
        if job.halt is not None and not job.cancelled \
                and job.halt.reached(job.failures, job.successes, job.submitted):
            self._on_halt(job)

    # ---- cancelling --------------------------------------------------------------------------

    def end_unstarted(self, task: Task) -> None:
        """End a task of a cancelled or halted call that waits to start: cancelled, unless
        it already failed and waited to be retried: then that failure is its outcome."""
        if task.last_error is not None:
            self.fail(task, retry_stopped(task.last_error))
        else:
            self.finish(task, TaskState.CANCELLED, False, self.cancelled_error(task))

    def cancel_with(self, task: Task, error: BaseException) -> None:
        """End a task that never started with `error` (terminate, a broken pool), which then
        names the task and its input, as any task's error does; a task that failed and waited
        to be retried ends with that failure instead."""
        if task.last_error is not None:
            self.fail(task, retry_stopped(task.last_error))
            return
        annotate(error, index=task.index, input_repr=short_repr(task.input), pid=None,
                 attempts=task.attempts)
        self.finish(task, TaskState.CANCELLED, False, error)

    def cancelled_error(self, task: Task) -> TaskCancelledError:
        error = TaskCancelledError("the task was cancelled before it started")
        annotate(error, index=task.index, input_repr=short_repr(task.input), pid=None,
                 attempts=task.attempts)
        return error

    def cancel_queued(self, task: Task, *, notify: bool) -> None:
        """End a task that waits (queued or in its retry backoff); `notify`: tell its sink."""
        if task.state not in (TaskState.QUEUED, TaskState.RETRY_WAIT):
            return
        if notify:
            self.end_unstarted(task)
        else:  # its future was cancelled: it shows that
            self.finish(task, TaskState.CANCELLED, False, None)

    def cancel_waiting(self, job: Job) -> None:
        """Every task of a cancelled call that waits in the queue or in its retry backoff."""
        for task in self.tasks_of(self.scheduler.drop_cancelled(job)):
            self.cancel_queued(task, notify=True)
        for task in list(self.tasks.values()):
            if task.job is job and task.state is TaskState.RETRY_WAIT:
                self.cancel_queued(task, notify=True)

    def work_left(self) -> bool:
        return bool(self.tasks) or self.block_inputs > 0
