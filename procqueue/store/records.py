"""The values a durable queue store takes and gives back (no I/O here).

A stored task's life, each move made in one transaction of the store:

    pending ──claim──► running ──record──► succeeded | failed
       ▲                  │  └── crash, retries left ──► pending
       │                  └── its service's lease lapsed ──► pending (again, once per loss)
       └──── retry ◄──── failed | cancelled          pending | running ──cancel──► cancelled

``attempt`` (the number of claims) is the fencing token: an outcome is recorded only if the
task is still running, held by the service that reports it, at that attempt; a service that
lost its lease (paused, partitioned) cannot overwrite what another service did since.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from .codec import json_or_repr


class TaskStatus(str, enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class QueueSpec:
    """A named queue's limits, stored so that they hold across every service on the store."""

    name: str
    concurrency: int | None = None  # running at once, across all services
    worker_concurrency: int | None = None  # running at once in one service
    rate_limit: int | None = None  # at most rate_limit starts in any rate_per seconds
    rate_per: float | None = None
    key_concurrency: int | None = None  # running at once per key
    retries: int = 0  # re-runs after a worker crash

    @property
    def limited(self) -> bool:
        """Whether claiming ahead of free workers would take tasks other services could run."""
        return any(v is not None for v in (self.concurrency, self.worker_concurrency,
                                          self.rate_limit, self.key_concurrency))

    @property
    def limited_by_places(self) -> bool:
        """Whether running tasks take places (every limit but the rate)."""
        return any(v is not None for v in (self.concurrency, self.worker_concurrency,
                                          self.key_concurrency))


@dataclass(frozen=True)
class NewTask:
    queue: str
    function: str  # a FunctionRef's text: "module:name" or "/abs/script.py:name"
    payload: bytes  # pickle of (args, kwargs)
    label: str  # a short repr of the arguments, for people
    key: str | None = None
    priority: int = 0  # higher runs first; FIFO among equals
    dedup_id: str | None = None
    timeout_s: float | None = None  # start-to-completion, kept across re-runs
    retries: int | None = None  # None: the queue's


@dataclass(frozen=True)
class ClaimedTask:
    id: int
    queue: str
    function: str
    payload: bytes
    label: str
    key: str | None
    attempt: int
    time_left_s: float | None  # until the stored deadline; None: no timeout


@dataclass(frozen=True)
class StoredError:
    type_name: str
    message: str
    traceback: str
    pickled: bytes | None


@dataclass(frozen=True)
class Finished:
    """One attempt's outcome, reported by the service that claimed it."""

    id: int
    attempt: int
    result: bytes | None  # the result's pickle when it succeeded
    error: StoredError | None  # else the error
    retryable: bool = False  # a worker crash: re-run while retries last
    seconds: float = 0.0
    pid: int | None = None
    runs: int = 1  # runs of this attempt (a pool re-runs a crash itself: Pool(retries=))


@dataclass(frozen=True)
class TaskRecord:
    id: int
    queue: str
    function: str
    label: str
    key: str | None
    priority: int
    dedup_id: str | None
    status: TaskStatus
    attempts: int
    lost: int  # times its service died while running it
    timeout_s: float | None
    retries: int | None
    enqueued_at: float
    started_at: float | None
    finished_at: float | None
    service: str | None  # the service that holds it, or that ran its last attempt
    seconds: float | None
    pid: int | None
    result: bytes | None = field(repr=False, default=None)
    error: StoredError | None = None

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON holds it (`procqueue result`): the result itself when JSON can
        hold it, else its repr; the error as type, message and traceback text."""
        error = None if self.error is None else {
            "type": self.error.type_name, "message": self.error.message,
            "traceback": self.error.traceback}
        return {"id": self.id, "queue": self.queue, "function": self.function,
                "input": self.label, "key": self.key, "status": str(self.status),
                "ok": self.status is TaskStatus.SUCCEEDED,
                "result": json_or_repr(self.result, None), "error": error,
                "attempts": self.attempts, "seconds": self.seconds, "pid": self.pid,
                "enqueued_at": self.enqueued_at, "started_at": self.started_at,
                "finished_at": self.finished_at, "priority": self.priority,
                "dedup_id": self.dedup_id}


@dataclass(frozen=True)
class ServiceRecord:
    id: str
    host: str
    pid: int
    started_at: float
    heartbeat_at: float
    queues: str  # comma-separated, "" for all
    jobs: int
    running: int
    # its workers as it last reported them (every heartbeat): dicts with slot, pid, task
    # (the stored task's id, None: idle), task_started_at (epoch seconds), cpu_percent,
    # rss_bytes, tasks_done, restarts, last_exit; empty until its first report
    workers: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class TimelineEntry:
    """A finished task attempt as a timeline draws it."""
    id: int
    service: str | None
    pid: int  # the worker process that ran it
    started_at: float  # when it started in that process (its end less its run time)
    finished_at: float
    status: TaskStatus  # succeeded, failed, or pending again (a failure to be retried)
    label: str
    attempts: int
    error: str | None  # "Type: message" of a failure
    error_type: str | None  # the failure's type, with its module


@dataclass(frozen=True)
class QueueCounts:
    spec: QueueSpec
    pending: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    starts_in_window: int | None = None  # rate-limited queues: starts in the last rate_per s


@dataclass(frozen=True)
class Claim:
    tasks: list[ClaimedTask]
    expired: list[ClaimedTask]  # past their stored deadline: the service fails them unrun
    retry_at: float | None  # a rate limit held some back: claim again at this time


def error_line(type_name: str, message: str) -> str:
    """A stored error in one line, "Type: message" (the type without its module)."""
    short = type_name.rsplit(".", 1)[-1]
    return f"{short}: {message}" if message else short
