"""The changes a queue's users make (a TaskQueue, its handles, the CLI): queues defined, tasks
enqueued, cancelled, retried and pruned.  Each call is one transaction; what the services do
with the tasks (claims, records, leases) is in sql.py.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

from ..errors import StoreError
from .connections import SqlConnections, chunks
from .records import NewTask, QueueSpec


# A task cancelled while running keeps its service (and its place under the queue's limits)
# until that service has seen its process end: it notices within a heartbeat (sql.py) and waits
# at most CANCEL_WAIT_S (service.py, 5 s) for the kill.  Past this age the place counts free
# whatever the service said: a row cancelled while running by an earlier procqueue, which never
# clears its service, must not hold a place for ever.  (Twice sql.py's LEASE_S.)
CANCELLED_HOLD_S = 10.0
RETRY_POLL_S = 0.05  # a retry of a task still held after its cancel looks again this often


class QueueChanges(SqlConnections):
    """Queues and tasks as their users change them; the services are woken (``notify``) when
    there is new work."""

    # ---- dialect hooks ----------------------------------------------------------------------

    def _insert_task(self, cursor: Any, task: NewTask, now: float) -> int | None:
        """Insert; the new id, or None when a pending/running task has its dedup_id."""
        raise NotImplementedError

    def notify(self) -> None:
        """Wake the services waiting for work (after an enqueue or a retry committed)."""

    # ---- queues -----------------------------------------------------------------------------

    def define(self, spec: QueueSpec) -> None:
        # An upsert, not DELETE + INSERT: PostgreSQL claims lock the queue's row, and a claim
        # waiting for a row that is deleted meanwhile goes on without any lock.
        with self._write() as c:
            self._x(c, "INSERT INTO queues (name, concurrency, worker_concurrency, rate_limit, "
                       "rate_per, key_concurrency, retries) VALUES (?, ?, ?, ?, ?, ?, ?) "
                       "ON CONFLICT (name) DO UPDATE SET concurrency = excluded.concurrency, "
                       "worker_concurrency = excluded.worker_concurrency, "
                       "rate_limit = excluded.rate_limit, rate_per = excluded.rate_per, "
                       "key_concurrency = excluded.key_concurrency, retries = excluded.retries",
                    (spec.name, spec.concurrency, spec.worker_concurrency, spec.rate_limit,
                     spec.rate_per, spec.key_concurrency, spec.retries))

    # ---- enqueue ----------------------------------------------------------------------------

    def enqueue(self, tasks: Sequence[NewTask]) -> list[int]:
        """Store the tasks in one transaction (durable when this returns); their ids.  A task
        whose dedup_id a pending or running task of its queue has gets that task's id."""
        now = time.time()
        with self._write() as c:
            # in one order everywhere: two PostgreSQL enqueues creating the same new queues
            # would otherwise each wait for the other's row
            for queue in sorted({t.queue for t in tasks}):
                self._x(c, "INSERT INTO queues (name) VALUES (?) ON CONFLICT DO NOTHING",
                        (queue,))
            if not any(task.dedup_id for task in tasks):
                ids = self._insert_many(c, tasks, now)
            else:
                ids = [self._insert_or_find(c, task, now) for task in tasks]
        self.notify()
        return ids

    def _insert_or_find(self, c: Any, task: NewTask, now: float) -> int:
        """The new task's id, or that of the pending/running task holding its dedup_id."""
        # In PostgreSQL (read committed) the task holding the dedup_id may finish between the
        # refused insert and the look-up: then the insert is tried again.
        for _ in range(3):
            new_id = self._insert_task(c, task, now)
            if new_id is not None:
                return int(new_id)
            row = self._x(c, "SELECT id FROM tasks WHERE queue = ? AND dedup_id = ? "
                             "AND status IN ('pending', 'running')",
                          (task.queue, task.dedup_id)).fetchone()
            if row is not None:
                return int(row[0])
        raise StoreError(f"dedup_id {task.dedup_id!r} conflicts with no task")

    def _insert_many(self, c: Any, tasks: Sequence[NewTask], now: float) -> list[int]:
        """Insert tasks without dedup_ids (none can conflict); their ids in order."""
        return [self._insert_or_find(c, task, now) for task in tasks]

    # ---- cancelling, retrying, pruning ------------------------------------------------------

    def cancel(self, ids: Sequence[int]) -> list[int]:
        """Cancel pending or running tasks; the ids that were.  A running task's service drops
        it (and its process) when it next looks (within sql.py's HEARTBEAT_S); the task keeps
        its service, and so its place under the queue's limits, until that service has seen
        its process end (sql.py _cancelled_holding)."""
        return self._change(ids, "UPDATE tasks SET status = 'cancelled', finished_at = ? "
                                 "WHERE id = ? AND status IN ('pending', 'running')",
                            with_time=True)

    def retry(self, ids: Sequence[int]) -> list[int]:
        """Put failed or cancelled tasks back to pending (a fresh start: attempts, deadline and
        error cleared); the ids that were.  A task cancelled while running goes back once its
        service has seen its process end (within CANCELLED_HOLD_S): put back at once, it could
        start beside its dying copy, even in the same service."""
        changed = set(self._retry_unheld(ids))
        deadline = time.monotonic() + CANCELLED_HOLD_S
        held = self._held_after_cancel([i for i in ids if i not in changed])
        while held and time.monotonic() < deadline:
            time.sleep(RETRY_POLL_S)
            changed.update(self._retry_unheld(held))
            held = self._held_after_cancel([i for i in held if i not in changed])
        if changed:
            self.notify()
        return [task_id for task_id in dict.fromkeys(ids) if task_id in changed]

    def _retry_unheld(self, ids: Sequence[int]) -> list[int]:
        return self._change(ids, "UPDATE tasks SET status = 'pending', attempts = 0, lost = 0, "
                                 "service = NULL, started_at = NULL, finished_at = NULL, "
                                 "deadline = NULL, error_type = NULL, error_message = NULL, "
                                 "error_traceback = NULL, error = NULL, seconds = NULL, "
                                 "pid = NULL WHERE (status = 'failed' OR (status = "
                                 "'cancelled' AND (service IS NULL OR finished_at <= ?))) "
                                 "AND id = ?",
                            with_time=True, at=time.time() - CANCELLED_HOLD_S)

    def _held_after_cancel(self, ids: Sequence[int]) -> list[int]:
        """Which of these tasks were cancelled while running and still hold their place."""
        if not ids:
            return []
        since = time.time() - CANCELLED_HOLD_S
        found: set[int] = set()
        for chunk in chunks(list(dict.fromkeys(ids)), 500):  # one query per 500, not per id
            marks = ", ".join("?" * len(chunk))
            found.update(row[0] for row in self._read(
                f"SELECT id FROM tasks WHERE id IN ({marks}) AND status = 'cancelled' AND "
                f"service IS NOT NULL AND finished_at > ?", (*chunk, since)))
        return [task_id for task_id in ids if task_id in found]

    def _change(self, ids: Sequence[int], text: str, *, with_time: bool,
                at: float | None = None) -> list[int]:
        """Run `text` for each id: (time, id) its parameters with_time (now, or `at`), else
        (id,); the ids it changed."""
        now = time.time() if at is None else at
        changed: set[int] = set()
        with self._write() as c:
            # rows changed in id order, as record (sql.py) changes them: in PostgreSQL a cancel
            # and a record locking the same rows in opposite orders would deadlock
            for task_id in sorted(set(ids)):
                params = (now, task_id) if with_time else (task_id,)
                if self._x(c, text, params).rowcount:
                    changed.add(task_id)
        return [task_id for task_id in dict.fromkeys(ids) if task_id in changed]

    def prune(self, older_than_s: float) -> int:
        """Delete finished tasks that ended more than older_than_s ago; how many."""
        with self._write() as c:
            return int(self._x(c, "DELETE FROM tasks WHERE status IN ('succeeded', 'failed', "
                                  "'cancelled') AND finished_at < ?",
                               (time.time() - older_than_s,)).rowcount)
