"""What a returned chunk says, read for the driver: each row's outcome, the error of a chunk
that failed as a whole or killed its workers, and what each Dask worker ran.

Nothing here changes an item's state: the driver decides (deliver, retry, re-run alone,
fail) from what these functions read, in its own thread.
"""

from __future__ import annotations

import pickle
from typing import Any, NamedTuple

from ...errors import (RemoteError, TaskCancelledError, TaskTimeoutError, WorkerCrashedError,
                       annotate)
from ...protocol import restore_exception, short_repr, unreadable_result_error
from .items import DaskTask
from .worker_side import ChunkReport


class RowOutcome(NamedTuple):
    """One row read: its TaskEvent outcome ("ok", "error", "timeout"), the value (ok) or the
    error, and whether the error is the task's own (it may be retried under retry_on) rather
    than a result that could not be read here."""

    outcome: str
    value: Any
    task_error: bool


def read_row(ok: bool, data: bytes) -> RowOutcome:
    if not ok:
        error = restore_exception(data)
        outcome = "timeout" if isinstance(error, TaskTimeoutError) else "error"
        return RowOutcome(outcome, error, True)
    try:
        return RowOutcome("ok", pickle.loads(data), False)
    except BaseException as exc:  # noqa: BLE001 - fails only this item
        return RowOutcome("error", unreadable_result_error(exc, len(data)), False)


def chunk_failure(exc: BaseException | None) -> RemoteError:
    """The error of each item of a Dask task that failed as a whole (not one of its rows)."""
    error = RemoteError(type(exc).__name__, f"the Dask task running this item failed: "
                        f"{exc}; is procqueue installed on every Dask worker?")
    error.__cause__ = exc
    return error


def crash_error(item: DaskTask, exc: Any, worker_pids: dict[str, int],
                allowed_failures: int) -> WorkerCrashedError:
    """The error of an item that killed its Dask worker every time it ran; sets its pid."""
    address = getattr(getattr(exc, "last_worker", None), "address", "?")
    item.pid = worker_pids.get(address)
    error = WorkerCrashedError(
        f"Dask worker {address} died while running the task, {item.crash_runs} time(s) "
        f"(distributed.scheduler.allowed-failures={allowed_failures}); a SIGKILL "
        "(the OOM killer is a common cause), os._exit or a segfault", exitcode=None)
    error.__cause__ = exc
    return error


def cancelled_error(item: DaskTask, when: str) -> TaskCancelledError:
    error = TaskCancelledError(f"the task was cancelled {when}")
    annotate(error, index=item.index, input_repr=short_repr(item.input), pid=item.pid,
             attempts=item.attempts)
    return error


def is_killed_worker(exc: Any) -> bool:
    """Whether Dask gave up on a task because its workers kept dying (allowed-failures)."""
    try:
        from distributed.scheduler import KilledWorker
    except ImportError:
        return False
    return isinstance(exc, KilledWorker)


class WorkerTally:
    """What each Dask worker ran for this pool, by address: its pid as its chunks reported
    it, and (items run, busy seconds), for stats()."""

    def __init__(self) -> None:
        self.pids: dict[str, int] = {}
        self.work: dict[str, tuple[int, float]] = {}

    def record(self, report: ChunkReport, busy_s: float) -> None:
        if not report.address:
            return
        self.pids[report.address] = report.pid
        done, busy = self.work.get(report.address, (0, 0.0))
        self.work[report.address] = (done + len(report.rows), busy + busy_s)
