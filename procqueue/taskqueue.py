"""Durable task queues: enqueue from any process, worker services run the tasks, a handle
fetches the result later, from any process.

    tq = TaskQueue("jobs.db")                    # SQLite file (created 0600), or a PostgreSQL URL
    tq.define("render", concurrency=10, worker_concurrency=2, rate=Rate(50, per=30),
              key_concurrency=1, retries=2)
    h = tq.enqueue(score, path, queue="render", key=user, timeout=30, dedup_id=None, priority=0)
    h.id, h.status(), h.get_result(timeout=None)
    TaskQueue("jobs.db").handle(h.id).get_result()    # elsewhere, later
    tq.cancel(h.id); tq.retry(h.id)
    with Pool(8) as pool:
        pool.serve(tq, queues=["render"])            # a worker service (procqueue/service.py)

The store (procqueue/store/) keeps every task and decides who runs what; this module turns
calls into stored tasks and stored outcomes back into results and exceptions.  Functions are
stored by reference (procqueue/stored_call.py), arguments and results as pickles: a store is
code the services will run, so only its owner may write it.
"""

from __future__ import annotations

import os
import pickle
import time
from typing import Any, Callable, Iterable, Sequence

from .errors import TaskCancelledError, TaskFailed, argument_error
from .limits import Rate
from .store import (NewTask, QueueCounts, QueueSpec, ServiceRecord, SqlStore, TaskRecord,
                    TimelineEntry, TaskStatus, open_store, redacted)
from .store.codec import rebuild_error, short_repr
from .stored_call import FunctionRef, pack_arguments

DEFAULT_QUEUE = "default"
LABEL_MAX_CHARS = 200
WAIT_FIRST_S = 0.002  # get_result polls the store, from this interval...
WAIT_MAX_S = 0.1  # ...doubling up to this one

_ENQUEUE_OPTIONS = ("queue", "key", "timeout", "dedup_id", "priority", "retries")


class TaskHandle:
    """One stored task: its status, record and result, from any process."""

    def __init__(self, queue: "TaskQueue", task_id: int) -> None:
        self.queue = queue
        self.id = task_id

    def __repr__(self) -> str:
        return f"<TaskHandle {self.id} of {self.queue.shown}>"

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, TaskHandle) and other.id == self.id
                and other.queue.target == self.queue.target)

    def __hash__(self) -> int:
        return hash((self.queue.target, self.id))

    def record(self) -> TaskRecord:
        record = self.queue.store.get(self.id)
        if record is None:
            raise KeyError(f"no task {self.id} in {self.queue.shown} (pruned?)")
        return record

    def status(self) -> TaskStatus:
        return self.record().status

    def done(self) -> bool:
        return self.status().final

    def wait(self, timeout: float | None = None) -> TaskRecord:
        """The task's record once it has ended; TimeoutError if it has not within timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = WAIT_FIRST_S
        while True:
            record = self.record()
            if record.status.final:
                return record
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"task {self.id} is still {record.status} after {timeout} s")
            left = pause if deadline is None else min(pause, deadline - time.monotonic())
            time.sleep(max(left, 0.0))
            pause = min(pause * 2, WAIT_MAX_S)

    def get_result(self, timeout: float | None = None) -> Any:
        """The task's result; raises its exception (original type when it unpickles here,
        else RemoteError; the remote traceback as __cause__), TaskCancelledError, or
        TimeoutError if it has not ended within timeout."""
        return result_of(self.wait(timeout))


def result_of(record: TaskRecord) -> Any:
    """A finished task's result, or its exception raised (see TaskHandle.get_result)."""
    if record.status is TaskStatus.SUCCEEDED:
        return pickle.loads(record.result) if record.result is not None else None
    if record.status is TaskStatus.CANCELLED:
        raise TaskCancelledError("cancelled", index=record.id, input_repr=record.label)
    if record.status is TaskStatus.FAILED and record.error is not None:
        e = record.error
        error = rebuild_error(e.type_name, e.message, e.traceback, e.pickled)
        if isinstance(error, TaskFailed) and error.index is None:  # written by the store (SQL)
            error.index, error.input_repr = record.id, record.label
        raise error
    raise ValueError(f"task {record.id} has not ended: {record.status}")


class TaskQueue:
    """Named durable queues in one store; see the module docstring."""

    def __init__(self, target: str | os.PathLike[str], *, durable: bool = False,
                 create: bool = True) -> None:
        """``target``: an SQLite file (created, mode 0600, unless create=False) or a
        PostgreSQL URL.  ``durable=True``: SQLite fsyncs every commit (power-loss safe)."""
        self.target = os.fspath(target)
        self.shown = self.shown_target(self.target)
        self.store: SqlStore = open_store(self.target, durable=durable, create=create)

    @staticmethod
    def shown_target(target: str | os.PathLike[str]) -> str:
        """A store's target as messages show it: a PostgreSQL URL without its password."""
        return redacted(os.fspath(target))

    def __repr__(self) -> str:
        return f"<TaskQueue {self.shown}>"

    def __enter__(self) -> "TaskQueue":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.store.close()

    # ---- queues -----------------------------------------------------------------------------

    def define(self, name: str, *, concurrency: int | None = None,
               worker_concurrency: int | None = None, rate: Rate | str | None = None,
               key_concurrency: int | None = None, retries: int = 0) -> QueueSpec:
        """Create or change a named queue's limits; they hold across every service."""
        for option, value in (("concurrency", concurrency),
                              ("worker_concurrency", worker_concurrency),
                              ("key_concurrency", key_concurrency)):
            _check_positive(option, value)
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an int >= 0, not {retries!r}")
        parsed = Rate.parse(rate) if isinstance(rate, str) else rate
        if parsed is not None and not isinstance(parsed, Rate):
            raise TypeError(f"rate must be a procqueue.Rate or a string like '50/30s', "
                            f"not {rate!r}")
        spec = QueueSpec(name, concurrency, worker_concurrency,
                         None if parsed is None else parsed.limit,
                         None if parsed is None else parsed.period_s, key_concurrency, retries)
        self.store.define(spec)
        return spec

    def queues(self) -> dict[str, QueueSpec]:
        return self.store.queue_specs()

    # ---- enqueue ----------------------------------------------------------------------------

    def enqueue(self, fn: Callable[..., Any] | str, /, *args: Any, **kwargs: Any) -> TaskHandle:
        """Store fn(*args, **kwargs) as a task; durable when this returns.  The keywords queue,
        key, timeout, dedup_id, priority and retries are options, not fn's arguments."""
        options = {name: kwargs.pop(name) for name in _ENQUEUE_OPTIONS if name in kwargs}
        task = self._new_task(str(FunctionRef.of(fn)), args, kwargs, **options)
        return TaskHandle(self, self.store.enqueue([task])[0])

    def enqueue_many(self, fn: Callable[..., Any] | str, items: Iterable[Any], *,
                     star: bool = False, queue: str = DEFAULT_QUEUE,
                     key: Callable[[Any], Any] | None = None, timeout: float | None = None,
                     priority: int = 0, retries: int | None = None) -> list[TaskHandle]:
        """One task per item, fn(item) (or fn(*item) with star=True), in one transaction;
        ``key`` maps an item to its concurrency key."""
        ref = str(FunctionRef.of(fn))
        t = self._new_task(ref, (), {}, queue=queue, timeout=timeout, priority=priority,
                           retries=retries)  # checks the options once
        tasks: list[NewTask] = []
        for item in items:  # (NewTask directly: dataclasses.replace costs ~10 us an item)
            args = tuple(item) if star else (item,)
            tasks.append(NewTask(t.queue, t.function,
                                 _packed(t.function, args, {}, item_index=len(tasks)),
                                 _label(args, {}), None if key is None else str(key(item)),
                                 t.priority, None, t.timeout_s, t.retries))
        return [TaskHandle(self, task_id) for task_id in self.store.enqueue(tasks)]

    def _new_task(self, function: str, args: tuple[Any, ...], kwargs: dict[str, Any], *,
                  queue: str = DEFAULT_QUEUE, key: Any = None, timeout: float | None = None,
                  dedup_id: str | None = None, priority: int = 0,
                  retries: int | None = None) -> NewTask:
        if not isinstance(queue, str) or not queue:
            raise ValueError(f"queue must be a non-empty name, not {queue!r}")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(
                timeout, (int, float)) or timeout <= 0):
            raise ValueError(f"timeout must be > 0 seconds, not {timeout!r}")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ValueError(f"priority must be an int, not {priority!r}")
        if retries is not None and (isinstance(retries, bool) or not isinstance(retries, int)
                                    or retries < 0):
            raise ValueError(f"retries must be an int >= 0, not {retries!r}")
        return NewTask(queue, function, _packed(function, args, kwargs), _label(args, kwargs),
                       None if key is None else str(key), priority,
                       None if dedup_id is None else str(dedup_id),
                       None if timeout is None else float(timeout), retries)

    # ---- handles and changes ----------------------------------------------------------------

    def handle(self, task_id: int) -> TaskHandle:
        return TaskHandle(self, int(task_id))

    def cancel(self, *ids: int | TaskHandle) -> list[int]:
        """Cancel pending or running tasks; the ids that were (a finished task stays)."""
        return self.store.cancel(_ids(ids))

    def retry(self, *ids: int | TaskHandle) -> list[int]:
        """Run failed or cancelled tasks again from scratch; the ids that were."""
        return self.store.retry(_ids(ids))

    def prune(self, older_than_s: float) -> int:
        """Delete tasks that ended more than older_than_s seconds ago; how many."""
        return self.store.prune(older_than_s)

    def ids(self, status: TaskStatus | str | None = None, queue: str | None = None,
            limit: int | None = None) -> list[int]:
        """The ids of the store's tasks (of one status, one queue), oldest first."""
        return self.store.ids(None if status is None else TaskStatus(status), queue,
                              limit if limit is not None else 2**62)

    def records(self, status: TaskStatus | str | None = None, queue: str | None = None,
                search: str | None = None, before: int | None = None,
                limit: int = 50) -> list[TaskRecord]:
        """A page of task records, newest first: ids below ``before`` (the previous page's
        last id), of one status, one queue, whose input, function or error contains
        ``search``.  Without results and tracebacks: handle(id).record() has them."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be an int >= 1, not {limit!r}")
        return self.store.page(None if status is None else TaskStatus(status), queue,
                               search or None, before, limit)

    def throughput(self, since: float, bucket_s: float = 10.0) -> list[tuple[float, int, int]]:
        """(bucket start, succeeded, failed) of the tasks that ended since ``since`` (epoch
        seconds), per ``bucket_s`` seconds, oldest first; empty buckets left out."""
        if not bucket_s > 0:
            raise ValueError(f"bucket_s must be > 0, not {bucket_s!r}")
        return self.store.throughput(since, bucket_s)

    def timeline(self, since: float, limit: int = 1000) -> list[TimelineEntry]:
        """The last ``limit`` task attempts that ended since ``since`` (epoch seconds) in a
        worker process, newest first, with when and in which process each ran."""
        return self.store.timeline(since, limit)

    def busy_keys(self, queue: str, limit: int = 5) -> list[tuple[str, int]]:
        """The keys of ``queue`` with the most running tasks: (key, running), most first."""
        return self.store.busy_keys(queue, limit)

    def counts(self) -> list[QueueCounts]:
        return self.store.counts()

    def services(self) -> list[ServiceRecord]:
        return self.store.services()


def _label(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    return short_repr(args[0] if len(args) == 1 and not kwargs else (args, kwargs),
                      LABEL_MAX_CHARS)


def _packed(function: str, args: tuple[Any, ...], kwargs: dict[str, Any], *,
            item_index: int | None = None) -> bytes:
    """The arguments' pickle; an ArgumentSerializationError naming the function and the
    argument (and enqueue_many's item) that does not pickle, as a Pool's call would."""
    try:
        return pack_arguments(args, kwargs)
    except Exception as exc:
        which, cause = _unpicklable_argument(args, kwargs, exc)
        item = "" if item_index is None else f" of item {item_index}"
        raise argument_error(f"cannot enqueue {function}: its {which}{item} cannot be "
                             f"pickled ({type(cause).__name__}: {cause}); make sure every "
                             f"argument is picklable", cause,
                             input_repr=_label(args, kwargs)) from None


def _unpicklable_argument(args: tuple[Any, ...], kwargs: dict[str, Any], error: Exception
                          ) -> tuple[str, Exception]:
    """Which argument does not pickle (tried one by one: only once pickling failed), and
    its error; the arguments as a whole where each pickles alone."""
    named = [(f"argument {i + 1}", value) for i, value in enumerate(args)]
    named += [(f"keyword argument {name!r}", value) for name, value in kwargs.items()]
    for which, value in named:
        try:
            pack_arguments((value,), {})
        except Exception as exc:
            return which, exc
    return "arguments", error


def _ids(ids: Sequence[int | TaskHandle]) -> list[int]:
    return [item.id if isinstance(item, TaskHandle) else int(item) for item in ids]


def _check_positive(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or value < 1):
        raise ValueError(f"{name} must be an int >= 1, not {value!r}")
