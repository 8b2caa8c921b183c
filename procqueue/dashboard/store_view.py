"""What a dashboard shows of a task-queue store, and the actions it takes on it.

Every read is bounded, so the page stays responsive with 100,000 tasks in the store: counts
are aggregates, task tables are pages of PAGE_ROWS (keyset paging: TaskQueue.records), the
throughput is counted per bucket in SQL.

All store reads run on one thread of this view, the actions (Retry, Cancel) on another: the
store keeps a connection per thread, and the HTTP server starts a thread per request; calling
the store from those would open (and keep) a connection per request.  One reader also means
the dashboard queries the store one query at a time, however many pages are open.
"""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any, Callable, TypeVar

from ..report import COLOURS
from ..store import (QueueCounts, ServiceRecord, TaskRecord, TaskStatus, TimelineEntry,
                     error_line)
from ..taskqueue import TaskQueue

PAGE_ROWS = 50
MAX_PAGE_ROWS = 500
THROUGHPUT_WINDOW_S = 600.0  # the throughput chart covers the last ten minutes...
THROUGHPUT_BUCKET_S = 10.0  # ...in bars of ten seconds
BUSIEST_KEYS = 5  # per-key limits: the keys with the most running tasks shown
TIMELINE_WINDOW_S = 60.0  # the timeline shows the attempts of the last minute...
TIMELINE_ATTEMPTS = 1000  # ...at most this many (the last ones)
TIMELINE_COLOURS = {**COLOURS, "running": "#5b8def"}
# stored error types drawn as the batch timeline draws a crash and a timeout
_OUTCOME_OF_ERROR = {"procqueue.errors.WorkerCrashedError": "crash",
                     "procqueue.errors.WorkerExitedError": "crash",
                     "procqueue.errors.TaskTimeoutError": "timeout"}
MAX_ACTION_IDS = 1000  # ids one Retry or Cancel may name
RESULT_MAX_CHARS = 10_000  # a task's result as the page shows it
CALL_TIMEOUT_S = 60.0

T = TypeVar("T")


class StoreView:
    kind = "store"

    def __init__(self, queue: TaskQueue | str) -> None:
        """``queue``: a TaskQueue, or a store's target (opened here, and closed with the
        view; a missing SQLite file is an error, not a new store)."""
        self._reader = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="procqueue-dashboard-store")
        # Retry and Cancel on a thread of their own: a retry of a task cancelled while running
        # waits (seconds) for its service to see it end, and the page must go on refreshing
        self._actor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="procqueue-dashboard-actions")
        if isinstance(queue, TaskQueue):
            self.tq, self._own = queue, False  # the caller's: closed by the caller
        else:
            target = queue
            self._own = True
            try:
                self.tq = self._call(lambda: TaskQueue(target, create=False))
            except BaseException:
                self._reader.shutdown()
                self._actor.shutdown()
                raise
        # a PostgreSQL URL is shown without its password
        self.title = str(getattr(self.tq.store, "shown", self.tq.target))

    def close(self) -> None:
        self._actor.shutdown()  # first: an action under way ends on an open store
        if self._own:
            # on the reader thread: an SQLite connection is closed by the thread that made it
            self._call(self.tq.close)
        self._reader.shutdown()

    def _call(self, fn: Callable[[], T]) -> T:
        return self._reader.submit(fn).result(CALL_TIMEOUT_S)

    def _act(self, fn: Callable[[], T]) -> T:
        return self._actor.submit(fn).result(CALL_TIMEOUT_S)

    # ---- the live snapshot ------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return self._call(self._snapshot)

    def _snapshot(self) -> dict[str, Any]:
        now = time.time()
        counts = self.tq.counts()
        services = self.tq.services()
        since = now - THROUGHPUT_WINDOW_S
        return {"kind": self.kind, "title": self.title, "now": now,
                "queues": [self._queue(c) for c in counts],
                "services": [_service(s, now) for s in services],
                "workers": [_worker(s, w, now) for s in services for w in s.workers],
                "throughput": {"bucket_s": THROUGHPUT_BUCKET_S, "window_s": THROUGHPUT_WINDOW_S,
                               "series": [list(b) for b in self.tq.throughput(
                                   since, THROUGHPUT_BUCKET_S)]},
                "timeline": _timeline(self.tq.timeline(now - TIMELINE_WINDOW_S,
                                                       TIMELINE_ATTEMPTS), services, now)}

    def _queue(self, c: QueueCounts) -> dict[str, Any]:
        spec = c.spec
        limits: list[dict[str, Any]] = []
        if spec.concurrency is not None:
            limits.append({"kind": "concurrency", "used": c.running, "of": spec.concurrency})
        if spec.worker_concurrency is not None:
            limits.append({"kind": "worker_concurrency", "of": spec.worker_concurrency})
        if spec.rate_limit is not None:
            limits.append({"kind": "rate", "used": c.starts_in_window, "of": spec.rate_limit,
                           "per_s": spec.rate_per})
        if spec.key_concurrency is not None:
            limits.append({"kind": "key_concurrency", "of": spec.key_concurrency,
                           "busiest": self.tq.busy_keys(spec.name, BUSIEST_KEYS)})
        return {"name": spec.name, "pending": c.pending, "running": c.running,
                "succeeded": c.succeeded, "failed": c.failed, "cancelled": c.cancelled,
                "retries": spec.retries, "limits": limits}

    # ---- tables and details -----------------------------------------------------------------

    def tasks(self, status: str | None, queue: str | None, search: str | None,
              before: int | None, limit: int = PAGE_ROWS) -> dict[str, Any]:
        """One page of the task table, newest first; ``next`` is the ``before`` of the
        following page (None on the last)."""
        limit = min(max(limit, 1), MAX_PAGE_ROWS)
        parsed = None if not status else TaskStatus(status)
        records = self._call(lambda: self.tq.records(parsed, queue or None, search or None,
                                                     before, limit))
        return {"tasks": [_row(r) for r in records],
                "next": records[-1].id if len(records) == limit else None}

    def task(self, task_id: int) -> dict[str, Any] | None:
        """One task in full: its input, result or error with the traceback."""
        def read() -> dict[str, Any] | None:
            try:
                record = self.tq.handle(task_id).record()
            except KeyError:
                return None
            return _detail(record)
        return self._call(read)

    # ---- actions ----------------------------------------------------------------------------

    def act(self, action: str, ids: list[int]) -> list[int]:
        """Retry (failed, cancelled) or cancel (pending, running) these tasks; the ids that
        changed."""
        if len(ids) > MAX_ACTION_IDS:
            raise ValueError(f"at most {MAX_ACTION_IDS} tasks at a time")
        if action == "retry":
            return self._act(lambda: self.tq.retry(*ids))
        if action == "cancel":
            return self._act(lambda: self.tq.cancel(*ids))
        raise ValueError(f"unknown action {action!r}")


def _service(s: ServiceRecord, now: float) -> dict[str, Any]:
    return {"id": s.id, "host": s.host, "pid": s.pid, "jobs": s.jobs, "running": s.running,
            "queues": s.queues.split(",") if s.queues else [], "started_at": s.started_at,
            "heartbeat_age_s": round(max(now - s.heartbeat_at, 0.0), 2)}


def _worker(s: ServiceRecord, w: dict[str, Any], now: float) -> dict[str, Any]:
    """A worker of a service, as the batch page's workers table shows one."""
    since = w.get("task_started_at")
    task = None if w.get("task") is None else f"#{w['task']} {w.get('label') or ''}".strip()
    return {"slot": w.get("slot"), "name": f"{s.host} · {s.pid} · worker {w.get('slot')}",
            "service": s.id, "pid": w.get("pid"), "task": task,
            "task_s": None if since is None else max(now - since, 0.0),
            "cpu_percent": w.get("cpu_percent"), "rss_bytes": w.get("rss_bytes"),
            "tasks_done": w.get("tasks_done"), "restarts": w.get("restarts"),
            "last_exit": w.get("last_exit")}


def _timeline(finished: list[TimelineEntry], services: list[ServiceRecord], now: float
              ) -> dict[str, Any]:
    """The batch page's timeline, one row per worker process: the attempts that ended in the
    last TIMELINE_WINDOW_S, and what each live worker runs now (from its service's report)."""
    start = now - TIMELINE_WINDOW_S
    events: list[list[Any]] = []
    for e in finished:
        outcome = "ok" if e.error_type is None else _OUTCOME_OF_ERROR.get(e.error_type, "error")
        if e.status is TaskStatus.CANCELLED:
            outcome = "cancelled"
        events.append([e.pid, e.started_at, e.finished_at, outcome, f"#{e.id} {e.label}",
                       e.attempts, e.pid, e.error])
    rows: dict[int, str] = {}
    for s in services:
        for w in s.workers:
            if w.get("pid") is None:
                continue
            rows[w["pid"]] = f"pid {w['pid']}"
            if w.get("task") is not None and w.get("task_started_at") is not None:
                events.append([w["pid"], w["task_started_at"], now, "running",
                               f"#{w['task']} {w.get('label') or ''}", None, w["pid"], None])
    for e in finished:
        rows.setdefault(e.pid, f"pid {e.pid}")  # a worker since replaced, or of a gone service
    if events:
        start = max(start, min(event[1] for event in events))
    return {"start": start, "end": now, "colours": TIMELINE_COLOURS,
            "slots": sorted(rows), "labels": {str(pid): label for pid, label in rows.items()},
            "events": events}


def _row(r: TaskRecord) -> dict[str, Any]:
    return {"id": r.id, "queue": r.queue, "function": r.function, "input": r.label,
            "key": r.key, "status": str(r.status), "attempts": r.attempts,
            "enqueued_at": r.enqueued_at, "started_at": r.started_at,
            "finished_at": r.finished_at, "seconds": r.seconds, "pid": r.pid,
            "error": None if r.error is None else error_line(r.error.type_name,
                                                               r.error.message)}


def _detail(record: TaskRecord) -> dict[str, Any]:
    data = record.to_dict()
    result = data.get("result")
    if result is not None and len(text := repr(result)) > RESULT_MAX_CHARS:
        data["result"] = text[:RESULT_MAX_CHARS] + "..."
    data["error_line"] = None if record.error is None else error_line(
        record.error.type_name, record.error.message)
    return data
