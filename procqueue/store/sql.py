"""The durable queue store's logic in SQL, shared by the SQLite and PostgreSQL stores.

Every change is one transaction; the dialects differ only in how a write transaction begins
(SQLite: BEGIN IMMEDIATE, one writer at a time; PostgreSQL: the claimed queues' rows locked
FOR UPDATE, pending rows taken with SKIP LOCKED), in placeholders and column types, and in how
a service is woken (a socket beside the SQLite file; LISTEN/NOTIFY).

Where each promise is kept:
- limits across services (``concurrency``, ``key_concurrency``, ``rate``): ``_claim_queue``
  counts the queue's running tasks and its recent starts inside the claim's transaction, which
  is serialised per queue, so two services never both take the last permit; a task cancelled
  while running counts as running until its service has seen its process end;
- a dead service's tasks run again: ``_requeue_lost`` (every claim) puts back the running tasks
  of services whose heartbeat is older than LEASE_S, or whose process is gone on this host;
- no outcome recorded twice: ``record`` updates a task only while it is running, held by the
  reporting service, at the reported attempt (records.py: the fencing token).

SqlStore is the services' side: they register, heartbeat, claim and record here, and a dead
one's tasks are put back.  The rest it inherits from the modules beneath it: QueueChanges
(changes.py) defines queues and enqueues, cancels, retries and prunes tasks; QueueViews
(views.py) is what handles and the dashboard read; SqlConnections (connections.py) keeps a
connection per thread and runs the transactions.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any, Sequence

import psutil

from ..limits import START_SKEW_MARGIN_S
from .changes import CANCELLED_HOLD_S, QueueChanges
from .connections import chunks
from .records import Claim, ClaimedTask, Finished, QueueSpec
from .views import QueueViews

SCHEMA_VERSION = 1  # additions a version-1 reader ignores (a new column) keep the version
# Columns added to the first format, which opening an older store adds: (name, type) by table.
ADDED_COLUMNS = {"services": (("workers", "TEXT"),)}
HEARTBEAT_S = 0.5  # a service refreshes its heartbeat this often...
LEASE_S = 5.0  # ...and holds its tasks while the last one is younger than this
LOCAL_CHECK_AFTER_S = 1.0  # a silent service on this host is checked by pid after this long
MAX_LOSSES = 3  # a task whose service died this many times while running it fails
CANDIDATES_PER_PICK = 4  # with per-key limits, scan this many pending rows per task wanted
# A task's stored deadline is set by the claim that first starts it (_start: claim time plus
# its timeout) and kept across re-runs.  A task put back unrun (released, or lost with a
# service that had not started it) gives back the deadline its claim set, and only that one:
# the claim set it if it equals that claim's start plus the timeout (the same sum, in SQL).
_DEADLINE_UNLESS_SET_BY_CLAIM = \
    "CASE WHEN deadline = started_at + timeout_s THEN NULL ELSE deadline END"


class SqlStore(QueueChanges, QueueViews):
    """A durable queue store (see records.py for the task's life): the services' side here,
    the users' changes and the views inherited.  Thread-safe: each thread gets its own
    connection; a forked child opens new ones (connections.py)."""

    def __init__(self, target: str) -> None:
        super().__init__(target)
        self.host = socket.gethostname()

    # ---- dialect hooks ----------------------------------------------------------------------

    def _lock_queue(self, cursor: Any, queue: str) -> None:
        """Serialise claims of one queue (SQLite: the write lock already does)."""

    def _skip_locked(self) -> str:
        return ""

    def waker(self, service_id: str) -> Any:
        """An object with fileno(), drain() and close() that wakes a service's loop."""
        raise NotImplementedError

    # ---- services ---------------------------------------------------------------------------

    def register_service(self, service_id: str, queues: Sequence[str], jobs: int) -> None:
        now = time.time()
        started = psutil.Process().create_time()
        with self._write() as c:
            self._x(c, "INSERT INTO services (id, host, pid, proc_started, started_at, "
                       "heartbeat_at, queues, jobs) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (service_id, self.host, os.getpid(), started, now, now, ",".join(queues),
                     jobs))

    def heartbeat(self, service_id: str, workers: Sequence[dict[str, Any]] | None = None
                  ) -> bool:
        """Refresh the lease with the service's report of its workers now (see
        ServiceRecord.workers; None: not known, a pool without per-worker statistics); False
        if the service was declared dead (its tasks re-queued).  If it dies, the tasks the
        report shows running are the ones charged a loss (see _put_back_lost)."""
        report = None if workers is None else json.dumps(list(workers))
        with self._write() as c:
            c2 = self._x(c, "UPDATE services SET heartbeat_at = ?, workers = ? WHERE id = ?",
                         (time.time(), report, service_id))
            return bool(c2.rowcount)

    def deregister_service(self, service_id: str, release: Sequence[tuple[int, int]] = ()
                           ) -> None:
        """Remove the service; put back the (id, attempt) tasks it still held, unrun.  Tasks
        it still ran and did not release are put back as lost (as if it had died): once it is
        gone, no lease check would ever find them."""
        with self._write() as c:
            self._release(c, service_id, release)
            lost = self._put_back_lost(c, service_id, time.time())
            self._x(c, "DELETE FROM services WHERE id = ?", (service_id,))
        if release or lost:
            self.notify()

    def release(self, service_id: str, tasks: Sequence[tuple[int, int]],
                ended: Sequence[int] = ()) -> None:
        """Put back (id, attempt) tasks this service held without finishing them, and free
        the places of the `ended` tasks: cancelled while it ran them, their processes are
        gone now."""
        if not tasks and not ended:
            return
        with self._write() as c:
            self._release(c, service_id, tasks)
            self._cancelled_ended(c, service_id, ended)
        self.notify()

    def _release(self, c: Any, service_id: str, tasks: Sequence[tuple[int, int]]) -> None:
        self._many(c, "UPDATE tasks SET status = 'pending', service = NULL, "
                      f"attempts = attempts - 1, deadline = {_DEADLINE_UNLESS_SET_BY_CLAIM} "
                      "WHERE id = ? AND attempts = ? AND service = ? AND status = 'running'",
                   [(task_id, attempt, service_id)
                    for task_id, attempt in sorted(tasks)])  # id order: see changes.py _change

    def _cancelled_ended(self, c: Any, service_id: str, ids: Sequence[int]) -> None:
        """These tasks, cancelled while this service ran them, no longer hold their places
        (see _cancelled_holding): their processes ended."""
        self._many(c, "UPDATE tasks SET service = NULL WHERE id = ? AND service = ? AND "
                      "status = 'cancelled'", [(task_id, service_id) for task_id in sorted(ids)])

    def still_held(self, service_id: str, held: Sequence[int]) -> set[int]:
        """Which of these task ids are still running under this service (not cancelled)."""
        if not held:
            return set()
        found: set[int] = set()
        for chunk in chunks(list(held), 500):
            marks = ", ".join("?" * len(chunk))
            found.update(row[0] for row in self._read(
                f"SELECT id FROM tasks WHERE id IN ({marks}) AND service = ? "
                f"AND status = 'running'", (*chunk, service_id)))
        return found

    # ---- claim and record -------------------------------------------------------------------

    def claim(self, service_id: str, wants: dict[str, int], total: int | None = None
              ) -> Claim:
        """Take up to wants[queue] pending tasks of each queue for this service, in the order
        of `wants`, and at most `total` in all; within every queue's limits, highest priority
        first, then in enqueue order."""
        claimed: list[ClaimedTask] = []
        expired: list[ClaimedTask] = []
        retry_at: float | None = None
        with self._write() as c:
            self._requeue_lost(c, time.time())
            specs = {row[0]: QueueSpec(*row) for row in self._x(
                c, "SELECT name, concurrency, worker_concurrency, rate_limit, rate_per, "
                   "key_concurrency, retries FROM queues").fetchall()}
            queues = [queue for queue, want in wants.items() if want > 0 and queue in specs]
            # queues locked in name order: two PostgreSQL claims never wait for each other's
            # locks in a cycle (a deadlock, which the server ends by failing one)
            for queue in sorted(queues):
                self._lock_queue(c, queue)
            left = total
            for queue in queues:
                spec = specs[queue]
                want = wants[queue] if left is None else min(wants[queue], left)
                if want <= 0:
                    break
                # read after the lock: start times then grow in the order claims commit, so
                # the starts a later claim counts in its rate window are all there
                now = time.time()
                ids, wait_until = self._claim_queue(c, service_id, spec, want, now)
                if wait_until is not None:
                    retry_at = wait_until if retry_at is None else min(retry_at, wait_until)
                if ids:
                    got = self._start(c, spec, service_id, ids, now)
                    claimed += [t for t in got if t.time_left_s is None or t.time_left_s > 0]
                    expired += [t for t in got if t.time_left_s is not None
                                and t.time_left_s <= 0]
                    if left is not None:
                        left -= len(got)
        return Claim(claimed, expired, retry_at)

    def _claim_queue(self, c: Any, service_id: str, spec: QueueSpec, want: int, now: float
                     ) -> tuple[list[int], float | None]:
        dying: list[tuple[str, str | None]] = []
        if spec.limited_by_places:
            dying = self._cancelled_holding(c, spec.name, now)
        if spec.worker_concurrency is not None:
            mine = self._x(c, "SELECT COUNT(*) FROM tasks WHERE queue = ? AND service = ? AND "
                              "status = 'running'", (spec.name, service_id)).fetchone()[0]
            mine += sum(1 for service, _ in dying if service == service_id)
            want = min(want, spec.worker_concurrency - mine)
        if spec.concurrency is not None:
            running = self._x(c, "SELECT COUNT(*) FROM tasks WHERE queue = ? AND "
                                 "status = 'running'", (spec.name,)).fetchone()[0]
            want = min(want, spec.concurrency - running - len(dying))
        wait_until = None
        if spec.rate_limit is not None and spec.rate_per is not None:
            # A start is counted at its claim, and the task starts a few ms later in the
            # service's pool: the window is widened as a local pool's is, so that "at most L
            # starts in any P seconds" holds for the starts the tasks themselves see.
            per = spec.rate_per + START_SKEW_MARGIN_S
            since = now - per
            self._x(c, "DELETE FROM starts WHERE queue = ? AND at <= ?", (spec.name, since))
            starts = [row[0] for row in self._x(
                c, "SELECT at FROM starts WHERE queue = ? ORDER BY at",
                (spec.name,)).fetchall()]
            room = spec.rate_limit - len(starts)
            if room < want:  # a place opens when the oldest start leaves the window
                wait_until = (starts[0] if starts else now) + per
            want = min(want, room)
        if want <= 0:
            return [], wait_until
        if spec.key_concurrency is None:
            rows = self._x(c, "SELECT id FROM tasks WHERE queue = ? AND status = 'pending' "
                              "ORDER BY priority DESC, id LIMIT ?" + self._skip_locked(),
                           (spec.name, want)).fetchall()
            return [row[0] for row in rows], wait_until
        return self._pick_by_key(c, spec, want, dying), wait_until

    def _cancelled_holding(self, c: Any, queue: str, now: float
                           ) -> list[tuple[str, str | None]]:
        """(service, key) of the queue's tasks cancelled while running whose processes may
        still run: their services have not yet seen them end.  They count as running under
        the limits, or a concurrency=1 queue would start its next task beside a cancelled
        one that is still being killed.  The partial index on cancelled rows with a service
        keeps this to the few cancelled in the last CANCELLED_HOLD_S."""
        return [(row[0], row[1]) for row in self._x(
            c, "SELECT service, key FROM tasks WHERE status = 'cancelled' AND service IS NOT "
               "NULL AND finished_at > ? AND queue = ?",
            (now - CANCELLED_HOLD_S, queue)).fetchall()]

    def _pick_by_key(self, c: Any, spec: QueueSpec, want: int,
                     dying: list[tuple[str, str | None]]) -> list[int]:
        limit = spec.key_concurrency or 1
        busy: dict[str | None, int] = {row[0]: row[1] for row in self._x(
            c, "SELECT key, COUNT(*) FROM tasks WHERE queue = ? AND status = 'running' "
               "AND key IS NOT NULL GROUP BY key", (spec.name,)).fetchall()}
        for _, key in dying:
            if key is not None:
                busy[key] = busy.get(key, 0) + 1
        picked: list[int] = []
        after: tuple[int, int] | None = None
        page = max(64, want * CANDIDATES_PER_PICK)
        while len(picked) < want:
            # SKIP LOCKED (PostgreSQL): the rows a cancel is changing are passed over, and
            # those picked stay locked until the claim commits
            if after is None:
                rows = self._x(c, "SELECT id, key, priority FROM tasks WHERE queue = ? AND "
                                  "status = 'pending' ORDER BY priority DESC, id LIMIT ?"
                               + self._skip_locked(), (spec.name, page)).fetchall()
            else:
                rows = self._x(c, "SELECT id, key, priority FROM tasks WHERE queue = ? AND "
                                  "status = 'pending' AND (priority < ? OR (priority = ? AND "
                                  "id > ?)) ORDER BY priority DESC, id LIMIT ?"
                               + self._skip_locked(),
                               (spec.name, after[0], after[0], after[1], page)).fetchall()
            for task_id, key, priority in rows:
                if key is None or busy.get(key, 0) < limit:
                    picked.append(task_id)
                    if key is not None:
                        busy[key] = busy.get(key, 0) + 1
                    if len(picked) == want:
                        break
            if len(rows) < page:
                break
            after = (rows[-1][2], rows[-1][0])
        return picked

    def _start(self, c: Any, spec: QueueSpec, service_id: str, ids: list[int], now: float
               ) -> list[ClaimedTask]:
        # only still-pending rows start: the picks lock them in PostgreSQL, and this guard keeps
        # the promise whatever a future pick does
        got: list[ClaimedTask] = []
        for chunk in chunks(ids, 500):
            marks = ", ".join("?" * len(chunk))
            self._x(c, f"UPDATE tasks SET status = 'running', service = ?, "
                       f"attempts = attempts + 1, started_at = ?, "
                       f"deadline = COALESCE(deadline, ? + timeout_s) WHERE id IN ({marks}) "
                       f"AND status = 'pending'", (service_id, now, now, *chunk))
            for row in self._x(c, f"SELECT id, queue, function, payload, label, key, attempts, "
                                  f"deadline FROM tasks WHERE id IN ({marks}) AND "
                                  f"status = 'running' AND service = ? AND started_at = ? "
                                  f"ORDER BY priority DESC, id",
                               (*chunk, service_id, now)).fetchall():
                deadline = row[7]
                got.append(ClaimedTask(row[0], row[1], row[2], bytes(row[3]), row[4], row[5],
                                       row[6], None if deadline is None else deadline - now))
        if spec.rate_limit is not None:
            self._many(c, "INSERT INTO starts (queue, at) VALUES (?, ?)",
                       [(spec.name, now)] * len(got))
        return got

    def _requeue_lost(self, c: Any, now: float) -> None:
        # SKIP LOCKED (PostgreSQL): a dead service is put away by one claim; another claim
        # doing the same at once skips it instead of counting its tasks' loss twice
        dead = [row[0] for row in self._x(
            c, "SELECT id FROM services WHERE heartbeat_at < ?" + self._skip_locked(),
            (now - LEASE_S,)).fetchall()]
        for service_id, pid, started in self._x(
                c, "SELECT id, pid, proc_started FROM services WHERE host = ? AND "
                   "heartbeat_at < ? AND heartbeat_at >= ?" + self._skip_locked(),
                (self.host, now - LOCAL_CHECK_AFTER_S, now - LEASE_S)).fetchall():
            if not _process_alive(pid, started):
                dead.append(service_id)
        if not dead:
            return
        for service_id in dead:
            self._put_back_lost(c, service_id, now, died=True)

    def _put_back_lost(self, c: Any, service_id: str, now: float, *, died: bool = False
                       ) -> int:
        """Remove a service; its running tasks go back to pending, one loss more each, or
        fail with ServiceLostError at MAX_LOSSES; how many went back.

        Of a service that died, a loss counts only against the tasks its last heartbeat
        reported running in a worker: the others it held were queued in its pool, unstarted,
        and had no part in its death.  After a death the first claim, often a restarted
        service's, takes the put-back tasks first, so charging every held task failed tasks
        that had never run once a few services in a row were killed
        (tests/test_queue_durability.py).  A service whose report is not known (a pool
        without per-worker statistics) charges the tasks it heartbeat after claiming."""
        counts = "1 = 1"  # a deregistering service ran what it did not release: all count
        params: list[Any] = []
        if died:
            counts, params = self._lost_with(c, service_id)
        self._x(c, f"UPDATE tasks SET status = 'failed', service = NULL, finished_at = ?, "
                   f"lost = lost + 1, error_type = 'procqueue.errors.ServiceLostError', "
                   f"error_message = ?, error_traceback = '', error = NULL "
                   f"WHERE service = ? AND status = 'running' AND lost + 1 >= ? AND {counts}",
                (now, f"the worker service running it died {MAX_LOSSES} times",
                 service_id, MAX_LOSSES, *params))
        requeued = self._x(c, f"UPDATE tasks SET status = 'pending', service = NULL, "
                              f"lost = lost + CASE WHEN {counts} THEN 1 ELSE 0 END, "
                              f"deadline = CASE WHEN {counts} THEN deadline "
                              f"ELSE {_DEADLINE_UNLESS_SET_BY_CLAIM} END "
                              f"WHERE service = ? AND status = 'running'",
                           (*params, *params, service_id)).rowcount
        # its cancelled tasks' processes are gone (it ended) or past caring for (it died)
        self._x(c, "UPDATE tasks SET service = NULL WHERE status = 'cancelled' AND service = ? "
                   "AND finished_at > ?", (service_id, now - CANCELLED_HOLD_S))
        self._x(c, "DELETE FROM services WHERE id = ?", (service_id,))
        return max(int(requeued), 0)

    def _lost_with(self, c: Any, service_id: str) -> tuple[str, list[Any]]:
        """The condition (and its parameters) picking the tasks of a dead service charged a
        loss: those its last report showed running, else those claimed before its last beat."""
        row = self._x(c, "SELECT workers FROM services WHERE id = ?", (service_id,)).fetchone()
        if row is None or row[0] is None:
            return "started_at < (SELECT heartbeat_at FROM services WHERE id = ?)", [service_id]
        running = sorted({w["task"] for w in json.loads(row[0]) if w.get("task") is not None})
        if not running:
            return "1 = 0", []
        return f"id IN ({', '.join('?' * len(running))})", running

    def record(self, service_id: str, outcomes: Sequence[Finished]) -> int:
        """Record finished attempts in one transaction; how many were still this service's
        to record (the others were cancelled or taken over meanwhile, and are dropped)."""
        now = time.time()
        successes = [f for f in outcomes if f.error is None]
        failures = [f for f in outcomes if f.error is not None]
        with self._write() as c:
            successes.sort(key=lambda f: f.id)  # in id order: see changes.py _change
            failures.sort(key=lambda f: f.id)
            applied = self._many(
                c, "UPDATE tasks SET status = 'succeeded', result = ?, finished_at = ?, "
                   "seconds = ?, pid = ?, attempts = attempts + ? WHERE id = ? AND "
                   "service = ? AND attempts = ? AND status = 'running'",
                [(f.result, now, f.seconds, f.pid, f.runs - 1, f.id, service_id, f.attempt)
                 for f in successes])
            if failures:
                retries = self._retries_left(c, [f for f in failures if f.retryable])
                applied += self._many(
                    c, "UPDATE tasks SET status = ?, finished_at = ?, seconds = ?, pid = ?, "
                       "attempts = attempts + ?, error_type = ?, error_message = ?, "
                       "error_traceback = ?, error = ? WHERE id = ? AND service = ? "
                       "AND attempts = ? AND status = 'running'",
                    [_failure_row(f, f.id in retries, now, service_id) for f in failures])
            if applied < len(outcomes):  # some were cancelled meanwhile: their runs are over
                self._cancelled_ended(c, service_id, [f.id for f in outcomes])
        return applied

    def _retries_left(self, c: Any, crashed: list[Finished]) -> set[int]:
        """The crashed tasks that may run again (runs so far <= their retries)."""
        left: set[int] = set()
        for f in crashed:
            row = self._x(c, "SELECT COALESCE(t.retries, q.retries, 0) FROM tasks t JOIN "
                             "queues q ON q.name = t.queue WHERE t.id = ?", (f.id,)).fetchone()
            if row is not None and f.attempt + f.runs - 1 <= row[0]:
                left.add(f.id)
        return left

def _failure_row(f: Finished, again: bool, now: float, service_id: str) -> tuple[Any, ...]:
    e = f.error
    assert e is not None
    return ("pending" if again else "failed", None if again else now, f.seconds, f.pid,
            f.runs - 1, e.type_name, e.message, e.traceback, e.pickled, f.id, service_id, f.attempt)


def _process_alive(pid: int, started: float) -> bool:
    try:
        return bool(abs(psutil.Process(pid).create_time() - started) < 0.01)
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.Error:
        return True  # cannot tell: wait for the lease
