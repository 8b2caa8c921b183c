"""Pure decisions, no I/O: which queued tasks form the next batch, and what follows a failure.

Calls are served FIFO (the oldest call with queued tasks first, tasks FIFO inside a call);
a task coming back from its retry backoff goes to the front of its call's queue, so a retry
does not wait behind the whole remaining batch.  Time is passed in (`now`), never read here.
"""

from __future__ import annotations

import enum
import heapq
import random
from collections import OrderedDict, deque
from dataclasses import dataclass

from .tasks import Job, Task, TaskState


class FailureKind(enum.Enum):
    CRASH = "crash"  # the worker died while running it
    TIMEOUT = "timeout"  # it ran past its timeout
    EXCEPTION = "exception"  # it raised


@dataclass(frozen=True)
class RetryPolicy:
    retries: int  # extra attempts after the first
    retry_on: tuple[type[BaseException], ...]  # exception types that are retried
    backoff_s: float  # delay before the first retry
    backoff_max_s: float
    retry_timeouts: bool

    def should_retry(self, task: Task, kind: FailureKind, error: BaseException | None) -> bool:
        if task.attempts > self.retries:
            return False
        if kind is FailureKind.CRASH:
            return True
        if kind is FailureKind.TIMEOUT:
            return self.retry_timeouts
        return error is not None and isinstance(error, self.retry_on)

    def backoff(self, attempts: int) -> float:
        """Exponential backoff with full jitter (attempts >= 1 runs so far)."""
        ceiling = min(self.backoff_max_s, self.backoff_s * (2 ** max(attempts - 1, 0)))
        return ceiling / 2 + random.uniform(0, ceiling / 2)


class Scheduler:
    def __init__(self) -> None:
        self._queues: OrderedDict[int, tuple[Job, deque[Task]]] = OrderedDict()
        self._retry_heap: list[tuple[float, int, Task]] = []
        self._queued_by_fn: dict[int, int] = {}  # fn_id -> queued tasks (guided chunk share)
        self.queued = 0  # tasks in QUEUED state held in the queues

    def enqueue(self, task: Task, *, front: bool = False) -> None:
        job = task.job
        entry = self._queues.get(job.id)
        if entry is None:
            entry = (job, deque())
            self._queues[job.id] = entry
            if front:  # a retried task's call goes first, so the retry does not wait
                self._queues.move_to_end(job.id, last=False)
        if front:
            entry[1].appendleft(task)
        else:
            entry[1].append(task)
        self.queued += 1
        self._queued_by_fn[job.fn_id] = self._queued_by_fn.get(job.fn_id, 0) + 1

    def queued_for(self, job: Job) -> int:
        entry = self._queues.get(job.id)
        return len(entry[1]) if entry else 0

    def next_batch(self, max_tasks: int) -> list[Task]:
        """Take the next batch of at most `max_tasks` queued tasks: FIFO, from the oldest
        call on, and across consecutive calls of the same function (many submit() calls of
        one function travel together, like the items of one map)."""
        while self._queues:
            first = next(iter(self._queues.values()))[0]
            size = min(first.sizer.next_size(self._queued_by_fn.get(first.fn_id, 0)), max_tasks)
            batch: list[Task] = []
            emptied: list[int] = []
            for job_id, (job, queue) in self._queues.items():  # stops early: not O(calls)
                if not _same_batch(first, job):
                    break
                self._take(job, queue, batch, size)
                if not queue:
                    emptied.append(job_id)
                if len(batch) >= size:
                    break
            for job_id in emptied:
                del self._queues[job_id]
            if batch:
                return batch
        return []

    def _take(self, job: Job, queue: deque[Task], batch: list[Task], size: int) -> None:
        taken = 0
        while queue and len(batch) < size:
            task = queue.popleft()
            taken += 1
            if task.state is TaskState.QUEUED:  # skip ones cancelled while queued
                batch.append(task)
        self.queued -= taken
        self._queued_by_fn[job.fn_id] -= taken
        if not self._queued_by_fn[job.fn_id]:
            del self._queued_by_fn[job.fn_id]

    def drop_cancelled(self, job: Job) -> list[Task]:
        """Remove and return every queued task of `job`."""
        entry = self._queues.pop(job.id, None)
        if entry is None:
            return []
        tasks = list(entry[1])
        self.queued -= len(tasks)
        self._queued_by_fn[job.fn_id] -= len(tasks)
        if not self._queued_by_fn[job.fn_id]:
            del self._queued_by_fn[job.fn_id]
        return [t for t in tasks if t.state is TaskState.QUEUED]

    def all_queued(self) -> list[Task]:
        tasks = [t for _, q in self._queues.values() for t in q if t.state is TaskState.QUEUED]
        self._queues.clear()
        self._queued_by_fn.clear()
        self.queued = 0
        return tasks

    def wait_for_retry(self, task: Task, not_before: float) -> None:
        task.not_before = not_before
        heapq.heappush(self._retry_heap, (not_before, task.id, task))

    def release_due_retries(self, now: float) -> list[Task]:
        due = []
        while self._retry_heap and self._retry_heap[0][0] <= now:
            _, _, task = heapq.heappop(self._retry_heap)
            if task.state is TaskState.RETRY_WAIT:
                due.append(task)
        return due

    def all_retry_waiting(self) -> list[Task]:
        tasks = [t for _, _, t in self._retry_heap if t.state is TaskState.RETRY_WAIT]
        self._retry_heap.clear()
        return tasks

    def next_retry_at(self) -> float | None:
        return self._retry_heap[0][0] if self._retry_heap else None


def _same_batch(first: Job, other: Job) -> bool:
    """Tasks of two calls may share a batch: one function, called the same way."""
    return other is first or (other.fn_id == first.fn_id and other.kind == first.kind
                              and other.sizer is first.sizer)
