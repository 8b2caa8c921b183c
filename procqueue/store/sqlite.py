"""The durable queue store on one SQLite file (WAL): nothing to install, and every service
on the machine that opens the file shares its queues and limits.

Writers take turns (BEGIN IMMEDIATE), which is what makes a claim's count of running tasks
and recent starts exact across services.  A service waits for work on a unix datagram socket
in ``<file>.wake/``; an enqueue sends one byte to each socket there after it commits, so an
idle service starts a task within a millisecond or two instead of at its next poll.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import sqlite3
import tempfile
from typing import Any, Sequence

from ..errors import StoreUnsafeError

from .records import NewTask
from .sql import ADDED_COLUMNS, SCHEMA_VERSION, SqlStore
from .sqlite_file import open_store_file

KIND = "queue"
TABLES = {"queues", "tasks", "services", "starts"}
MAX_SOCKET_PATH = 107

SCHEMA = """
CREATE TABLE IF NOT EXISTS queues (
    name               TEXT PRIMARY KEY,
    concurrency        INTEGER,
    worker_concurrency INTEGER,
    rate_limit         INTEGER,
    rate_per           REAL,
    key_concurrency    INTEGER,
    retries            INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS tasks (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    queue           TEXT NOT NULL,
    function        TEXT NOT NULL,
    payload         BLOB NOT NULL,
    label           TEXT NOT NULL,
    key             TEXT,
    priority        INTEGER NOT NULL DEFAULT 0,
    dedup_id        TEXT,
    timeout_s       REAL,
    retries         INTEGER,
    status          TEXT NOT NULL DEFAULT 'pending',
    attempts        INTEGER NOT NULL DEFAULT 0,
    lost            INTEGER NOT NULL DEFAULT 0,
    enqueued_at     REAL NOT NULL,
    started_at      REAL,
    deadline        REAL,
    finished_at     REAL,
    service         TEXT,
    seconds         REAL,
    pid             INTEGER,
    result          BLOB,
    error_type      TEXT,
    error_message   TEXT,
    error_traceback TEXT,
    error           BLOB
);
CREATE INDEX IF NOT EXISTS tasks_pending ON tasks (queue, priority DESC, id)
    WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS tasks_running ON tasks (queue, key, service)
    WHERE status = 'running';
CREATE UNIQUE INDEX IF NOT EXISTS tasks_dedup ON tasks (queue, dedup_id)
    WHERE dedup_id IS NOT NULL AND status IN ('pending', 'running');
CREATE INDEX IF NOT EXISTS tasks_cancelled_held ON tasks (finished_at)
    WHERE status = 'cancelled' AND service IS NOT NULL;
CREATE TABLE IF NOT EXISTS services (
    id           TEXT PRIMARY KEY,
    host         TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    proc_started REAL NOT NULL,
    started_at   REAL NOT NULL,
    heartbeat_at REAL NOT NULL,
    queues       TEXT NOT NULL,
    jobs         INTEGER NOT NULL,
    workers      TEXT
);
CREATE TABLE IF NOT EXISTS starts (
    queue TEXT NOT NULL,
    at    REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS starts_by_queue ON starts (queue, at);
"""

# Each index costs every claim and record (~5 us per task each): only the claim's lookups
# have one; prune and the status counts scan the table.
_INSERT = ("INSERT INTO tasks (queue, function, payload, label, key, priority, dedup_id, "
           "timeout_s, retries, enqueued_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
           "ON CONFLICT DO NOTHING")


class SqliteStore(SqlStore):
    dialect = "sqlite"

    def __init__(self, path: str | os.PathLike[str], *, durable: bool = False) -> None:
        super().__init__(os.path.abspath(os.fspath(path)))
        self.durable = durable
        self.wake_dir = wake_directory(self.target)
        # Open once here: creates the file (0600) and checks kind, version and permissions,
        # so a bad store fails the constructor with one line, not the first call.
        self._connection()

    def _connect(self) -> sqlite3.Connection:
        db = open_store_file(self.target, kind=KIND, version=SCHEMA_VERSION, schema=SCHEMA,
                             tables=TABLES, durable=self.durable)
        try:
            _add_missing_columns(db)
        except BaseException:
            db.close()
            raise
        return db

    def _begin_write(self, cursor: Any) -> None:
        cursor.execute("BEGIN IMMEDIATE")

    def _insert_task(self, cursor: Any, task: NewTask, now: float) -> int | None:
        cursor.execute(_INSERT, (task.queue, task.function, task.payload, task.label, task.key,
                                 task.priority, task.dedup_id, task.timeout_s, task.retries,
                                 now))
        return cursor.lastrowid if cursor.rowcount else None

    def _insert_many(self, cursor: Any, tasks: Sequence[NewTask], now: float) -> list[int]:
        # AUTOINCREMENT numbers rows max+1 in insertion order, and we hold the write lock:
        # the new ids are the n numbers after the sequence's value before the insert.
        row = cursor.execute("SELECT seq FROM sqlite_sequence WHERE name = 'tasks'").fetchone()
        first = (row[0] if row else 0) + 1
        cursor.executemany(_INSERT, [(t.queue, t.function, t.payload, t.label, t.key,
                                      t.priority, None, t.timeout_s, t.retries, now)
                                     for t in tasks])
        return list(range(first, first + len(tasks)))

    def notify(self) -> None:
        try:
            names = os.listdir(self.wake_dir)
        except FileNotFoundError:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.setblocking(False)
            for name in names:
                path = os.path.join(self.wake_dir, name)
                try:
                    sender.sendto(b"!", path)
                except BlockingIOError:
                    pass  # its buffer is full of wake-ups already: it will wake
                except (ConnectionRefusedError, FileNotFoundError):
                    with contextlib.suppress(OSError):
                        os.unlink(path)  # a service that died without closing its socket
                except OSError:
                    pass

    def waker(self, service_id: str) -> "SocketWaker":
        return SocketWaker(self.wake_dir, service_id)


def wake_directory(path: str) -> str:
    """``<file>.wake`` beside the store, or, where that path is too long for a unix socket's
    address (108 bytes), a private directory named after the store under /tmp."""
    beside = path + ".wake"
    if len(beside) + len("/0123456789ab.sock") < MAX_SOCKET_PATH:
        return beside
    digest = hashlib.sha256(path.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"procqueue-{os.geteuid()}", f"wake-{digest}")


class SocketWaker:
    """A service's end of the wake-up: a datagram socket in the store's .wake directory."""

    def __init__(self, directory: str, service_id: str) -> None:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        if os.stat(directory).st_uid != os.geteuid():
            raise StoreUnsafeError(f"{directory} (wake-up sockets) belongs to another user")
        self.path = os.path.join(directory, f"{service_id}.sock")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._sock.bind(self.path)

    def fileno(self) -> int:
        return self._sock.fileno()

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while True:
                self._sock.recv(64)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        self._sock.close()


def _add_missing_columns(db: sqlite3.Connection) -> None:
    """A store made by an earlier procqueue gets the columns added since (CREATE TABLE IF NOT
    EXISTS leaves an existing table as it is)."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(services)")}
    for name, kind in ADDED_COLUMNS["services"]:
        if name not in columns:
            with contextlib.suppress(sqlite3.OperationalError):  # another process added it
                db.execute(f"ALTER TABLE services ADD COLUMN {name} {kind}")
