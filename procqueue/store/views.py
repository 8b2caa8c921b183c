"""The read-only views of a queue store: what handles, the CLI and the dashboard read.

Every view is one statement (connections.py ``_read``), bounded whatever the store holds: a
page of records leaves out their results and tracebacks, and counts are grouped in the
database.  What changes tasks is in changes.py (their users) and sql.py (the services).
"""

from __future__ import annotations

import json
import time
from typing import Any, Sequence

from .connections import SqlConnections, chunks
from .records import (QueueCounts, QueueSpec, ServiceRecord, StoredError, TaskRecord,
                      TaskStatus, TimelineEntry, error_line)

_TASK_COLUMNS = ("id, queue, function, label, key, priority, dedup_id, status, attempts, lost, "
                 "timeout_s, retries, enqueued_at, started_at, finished_at, service, seconds, "
                 "pid, result, error_type, error_message, error_traceback, error")
# the same columns for a page of records: no result, traceback or pickled error, which can
# be large (a page of them would be megabytes)
_SUMMARY_COLUMNS = ("id, queue, function, label, key, priority, dedup_id, status, attempts, "
                    "lost, timeout_s, retries, enqueued_at, started_at, finished_at, service, "
                    "seconds, pid, NULL, error_type, error_message, NULL, NULL")
_SEARCHED_COLUMNS = ("label", "function", "error_type", "error_message")


class QueueViews(SqlConnections):
    """What a queue store shows of its queues, tasks and services, without changing them."""

    # ---- queues, services and tasks ---------------------------------------------------------

    def queue_specs(self) -> dict[str, QueueSpec]:
        rows = self._read("SELECT name, concurrency, worker_concurrency, rate_limit, rate_per, "
                          "key_concurrency, retries FROM queues ORDER BY name")
        return {row[0]: QueueSpec(*row) for row in rows}

    def services(self) -> list[ServiceRecord]:
        rows = self._read(
            "SELECT s.id, s.host, s.pid, s.started_at, s.heartbeat_at, s.queues, s.jobs, "
            "(SELECT COUNT(*) FROM tasks t WHERE t.service = s.id AND t.status = 'running'), "
            "s.workers FROM services s ORDER BY s.started_at")
        return [ServiceRecord(id_, host, pid, started, beat, queues, jobs, running,
                              tuple(json.loads(workers or "[]")))
                for id_, host, pid, started, beat, queues, jobs, running, workers in rows]

    def get(self, task_id: int) -> TaskRecord | None:
        rows = self._read(f"SELECT {_TASK_COLUMNS} FROM tasks WHERE id = ?", (task_id,))
        return _task_record(rows[0]) if rows else None

    def statuses(self, ids: Sequence[int]) -> dict[int, TaskStatus]:
        found: dict[int, TaskStatus] = {}
        for chunk in chunks(list(ids), 500):
            marks = ", ".join("?" * len(chunk))
            found.update((row[0], TaskStatus(row[1])) for row in self._read(
                f"SELECT id, status FROM tasks WHERE id IN ({marks})", chunk))
        return found

    def counts(self) -> list[QueueCounts]:
        specs = self.queue_specs()
        by_queue: dict[str, dict[str, int]] = {name: {} for name in specs}
        for queue, status, n in self._read("SELECT queue, status, COUNT(*) FROM tasks "
                                           "GROUP BY queue, status"):
            by_queue.setdefault(queue, {})[status] = n
        now = time.time()
        result = []
        for name, counts in sorted(by_queue.items()):
            spec = specs.get(name, QueueSpec(name))
            starts = None
            if spec.rate_per is not None:
                starts = self._read("SELECT COUNT(*) FROM starts WHERE queue = ? AND at > ?",
                                    (name, now - spec.rate_per))[0][0]
            result.append(QueueCounts(spec, **counts, starts_in_window=starts))
        return result

    def ids(self, status: TaskStatus | None = None, queue: str | None = None,
            limit: int = 1000) -> list[int]:
        where, params = self._task_filter(status, queue, None)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        return [row[0] for row in self._read(f"SELECT id FROM tasks{clause} ORDER BY id "
                                             f"LIMIT ?", (*params, limit))]

    # ---- views for people (the dashboard): bounded reads, whatever the store holds -------

    def page(self, status: TaskStatus | None = None, queue: str | None = None,
             search: str | None = None, before: int | None = None,
             limit: int = 50) -> list[TaskRecord]:
        """At most ``limit`` tasks, newest first, with ids below ``before`` (the last id of
        the previous page: keyset paging, so a page costs the same at any depth), of one
        status, one queue, and whose input, function or error contains ``search`` (any case).
        Records without their result and traceback (get() has them): a page stays small."""
        where, params = self._task_filter(status, queue, search)
        if before is not None:
            where.append("id < ?")
            params.append(before)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        rows = self._read(f"SELECT {_SUMMARY_COLUMNS} FROM tasks{clause} ORDER BY id DESC "
                          f"LIMIT ?", (*params, limit))
        return [_task_record(row) for row in rows]

    def _task_filter(self, status: TaskStatus | None, queue: str | None,
                     search: str | None) -> tuple[list[str], list[Any]]:
        where: list[str] = []
        params: list[Any] = []
        if status is not None:
            where.append("status = ?")
            params.append(str(status))
        if queue is not None:
            where.append("queue = ?")
            params.append(queue)
        if search:
            # LOWER on both sides: SQLite's LIKE ignores ASCII case, PostgreSQL's does not
            pattern = "%" + _like_escaped(search.lower()) + "%"
            where.append("(" + " OR ".join(
                f"LOWER(COALESCE({column}, '')) LIKE ? ESCAPE '\\'"
                for column in _SEARCHED_COLUMNS) + ")")
            params += [pattern] * len(_SEARCHED_COLUMNS)
        return where, params

    def throughput(self, since: float, bucket_s: float) -> list[tuple[float, int, int]]:
        """(bucket start, succeeded, failed) for the tasks that ended since ``since``, in
        buckets of ``bucket_s`` seconds aligned on the epoch, oldest first (empty buckets
        left out).  Tasks put back by retry() no longer count: they have not ended."""
        bucket_ms = max(int(bucket_s * 1000), 1)
        # integer milliseconds divided by an integer: floor in both dialects (a cast of a
        # float rounds in PostgreSQL but truncates in SQLite)
        rows = self._read("SELECT CAST(finished_at * 1000 AS BIGINT) / CAST(? AS BIGINT), "
                          "status, COUNT(*) FROM tasks WHERE finished_at >= ? AND "
                          "status IN ('succeeded', 'failed') GROUP BY 1, status",
                          (bucket_ms, since))
        buckets: dict[int, list[int]] = {}
        for bucket, status, n in rows:
            buckets.setdefault(int(bucket), [0, 0])[status == "failed"] += int(n)
        return [(bucket * bucket_ms / 1000, ok, failed)
                for bucket, (ok, failed) in sorted(buckets.items())]

    def timeline(self, since: float, limit: int) -> list[TimelineEntry]:
        """The last ``limit`` attempts that ended since ``since`` in a worker process,
        newest first: a timeline of the recent past (the tasks running now are in the
        services' reports of their workers, ServiceRecord.workers)."""
        rows = self._read(
            "SELECT id, service, pid, finished_at - seconds, finished_at, status, label, "
            "attempts, error_type, error_message FROM tasks WHERE finished_at >= ? AND "
            "pid IS NOT NULL AND seconds IS NOT NULL ORDER BY finished_at DESC, id DESC "
            "LIMIT ?",
            (since, limit))
        return [TimelineEntry(row[0], row[1], row[2], row[3], row[4], TaskStatus(row[5]),
                              row[6], row[7],
                              None if row[8] is None else error_line(row[8], row[9] or ""),
                              row[8])
                for row in rows]

    def busy_keys(self, queue: str, limit: int = 5) -> list[tuple[str, int]]:
        """The keys with the most running tasks in ``queue``: (key, running), most first."""
        rows = self._read("SELECT key, COUNT(*) FROM tasks WHERE queue = ? AND "
                          "status = 'running' AND key IS NOT NULL GROUP BY key "
                          "ORDER BY 2 DESC, key LIMIT ?", (queue, limit))
        return [(row[0], int(row[1])) for row in rows]


def _task_record(row: Sequence[Any]) -> TaskRecord:
    (task_id, queue, function, label, key, priority, dedup_id, status, attempts, lost,
     timeout_s, retries, enqueued_at, started_at, finished_at, service, seconds, pid, result,
     error_type, error_message, error_traceback, error) = row
    stored_error = None
    if error_type is not None:
        stored_error = StoredError(error_type, error_message or "", error_traceback or "",
                                   None if error is None else bytes(error))
    return TaskRecord(task_id, queue, function, label, key, priority, dedup_id,
                      TaskStatus(status), attempts, lost, timeout_s, retries, enqueued_at,
                      started_at, finished_at, service, seconds, pid,
                      None if result is None else bytes(result), stored_error)


def _like_escaped(text: str) -> str:
    """``text`` matched literally by LIKE ... ESCAPE '\\'."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
