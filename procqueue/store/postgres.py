"""The durable queue store on a PostgreSQL database (psycopg 3), for services on several
machines: ``open_store("postgresql://user@host/db")``.

Its tables live in the schema ``procqueue`` (each connection's search_path), stamped in
``procqueue.meta`` with the kind "queue" and a schema version; a ``procqueue`` schema holding
anything else, or of a newer version, is refused.  Processes creating the schema at once take
turns on an advisory lock.

Transactions run at READ COMMITTED, where each statement sees everything committed before it
began.  A claim locks its queues' rows (FOR UPDATE), so claims of one queue take turns and
each counts the running tasks and recent starts its predecessors committed; pending rows are
taken FOR UPDATE SKIP LOCKED, passing over rows another transaction is changing.  An enqueue
wakes the services with NOTIFY; each service LISTENs on a connection of its own, whose socket
becomes readable when a notification arrives.

Connections are autocommit (SqlStore issues BEGIN/COMMIT itself), one per thread, and a
forked child opens its own (SqlStore checks the pid).
"""

from __future__ import annotations

import functools
import select
from typing import Any

import psycopg

from ..errors import StoreError, StoreFormatError
from . import redacted
from .records import NewTask
from .sql import ADDED_COLUMNS, SCHEMA_VERSION, SqlStore

KIND = "queue"
SCHEMA = "procqueue"
TABLES = {"meta", "queues", "tasks", "services", "starts"}
CHANNEL = "procqueue_wake"
CONNECT_TIMEOUT_S = 10
DRAIN_ROUNDS = 8  # reads of a waker's socket per drain(), at most (a flood of NOTIFYs)
# pg_advisory_xact_lock key held while the schema is checked or created: any constant, the
# same in every procqueue ("pq" "sc" in ASCII)
SCHEMA_LOCK_KEY = 0x7071_7363

# Added after the first format: a schema made before gets it on opening (_add_missing_indexes).
CANCELLED_HELD_INDEX = ("CREATE INDEX IF NOT EXISTS tasks_cancelled_held ON tasks (finished_at) "
                        "WHERE status = 'cancelled' AND service IS NOT NULL")
ADDED_INDEXES = {"tasks_cancelled_held": CANCELLED_HELD_INDEX}

CREATE_STATEMENTS = (
    f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}",
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS queues (
        name               TEXT PRIMARY KEY,
        concurrency        INTEGER,
        worker_concurrency INTEGER,
        rate_limit         INTEGER,
        rate_per           DOUBLE PRECISION,
        key_concurrency    INTEGER,
        retries            INTEGER NOT NULL DEFAULT 0)""",
    """CREATE TABLE IF NOT EXISTS tasks (
        id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        queue           TEXT NOT NULL,
        function        TEXT NOT NULL,
        payload         BYTEA NOT NULL,
        label           TEXT NOT NULL,
        key             TEXT,
        priority        INTEGER NOT NULL DEFAULT 0,
        dedup_id        TEXT,
        timeout_s       DOUBLE PRECISION,
        retries         INTEGER,
        status          TEXT NOT NULL DEFAULT 'pending',
        attempts        INTEGER NOT NULL DEFAULT 0,
        lost            INTEGER NOT NULL DEFAULT 0,
        enqueued_at     DOUBLE PRECISION NOT NULL,
        started_at      DOUBLE PRECISION,
        deadline        DOUBLE PRECISION,
        finished_at     DOUBLE PRECISION,
        service         TEXT,
        seconds         DOUBLE PRECISION,
        pid             INTEGER,
        result          BYTEA,
        error_type      TEXT,
        error_message   TEXT,
        error_traceback TEXT,
        error           BYTEA)""",
    "CREATE INDEX IF NOT EXISTS tasks_pending ON tasks (queue, priority DESC, id) "
    "WHERE status = 'pending'",
    "CREATE INDEX IF NOT EXISTS tasks_running ON tasks (service, queue, key) "
    "WHERE status = 'running'",
    "CREATE INDEX IF NOT EXISTS tasks_running_by_queue ON tasks (queue, key) "
    "WHERE status = 'running'",
    "CREATE UNIQUE INDEX IF NOT EXISTS tasks_dedup ON tasks (queue, dedup_id) "
    "WHERE dedup_id IS NOT NULL AND status IN ('pending', 'running')",
    "CREATE INDEX IF NOT EXISTS tasks_finished ON tasks (finished_at) "
    "WHERE finished_at IS NOT NULL",
    CANCELLED_HELD_INDEX,
    """CREATE TABLE IF NOT EXISTS services (
        id           TEXT PRIMARY KEY,
        host         TEXT NOT NULL,
        pid          INTEGER NOT NULL,
        proc_started DOUBLE PRECISION NOT NULL,
        started_at   DOUBLE PRECISION NOT NULL,
        heartbeat_at DOUBLE PRECISION NOT NULL,
        queues       TEXT NOT NULL,
        jobs         INTEGER NOT NULL,
        workers      TEXT)""",
    "CREATE TABLE IF NOT EXISTS starts (queue TEXT NOT NULL, at DOUBLE PRECISION NOT NULL)",
    "CREATE INDEX IF NOT EXISTS starts_by_queue ON starts (queue, at)",
)

_INSERT_TASK = ("INSERT INTO tasks (queue, function, payload, label, key, priority, dedup_id, "
                "timeout_s, retries, enqueued_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, "
                "%s) ON CONFLICT DO NOTHING RETURNING id")


class PostgresStore(SqlStore):
    dialect = "postgresql"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.shown = redacted(url)  # the URL as messages show it: without its password
        # Checked (or created) here, so a wrong database fails the constructor with one line.
        try:
            self._prepare_schema()
        except psycopg.Error as exc:
            self.close()
            raise StoreError(f"{self.shown}: cannot open the store: {first_line(exc)}") from exc
        except BaseException:
            self.close()
            raise

    # ---- connections ----------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection[Any]:
        return connect(self.target, self.shown)

    def _connection(self) -> Any:
        conn = super()._connection()
        if conn.broken:  # the server restarted or the network failed: open a fresh one
            self._local.conn = None
            conn = super()._connection()
        return conn

    # ---- the schema -------------------------------------------------------------------------

    def _prepare_schema(self) -> None:
        with self._write() as c:
            c.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
            present = {row[0] for row in c.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
                (SCHEMA,)).fetchall()}
            if present:
                self._check_schema(c, present)
                self._add_missing_columns(c)
                self._add_missing_indexes(c)
            else:  # no schema, or an empty one (made for us by an administrator)
                for statement in CREATE_STATEMENTS:
                    c.execute(statement)
                self._stamp(c)

    def _check_schema(self, c: Any, present: set[str]) -> None:
        if "meta" not in present:
            raise StoreFormatError(
                f"{self.shown}: the schema {SCHEMA} is not a procqueue store's "
                f"(tables: {', '.join(sorted(present))})")
        meta = dict(c.execute("SELECT name, value FROM meta").fetchall())
        stored_kind = meta.get("kind")
        if stored_kind != KIND:
            raise StoreFormatError(f"{self.shown}: the schema {SCHEMA} holds a procqueue "
                                   f"{stored_kind or 'store of unknown kind'}, not a {KIND}")
        stored_version = int(meta.get("schema_version", SCHEMA_VERSION))
        if stored_version > SCHEMA_VERSION:
            raise StoreFormatError(
                f"{self.shown}: the schema {SCHEMA} has format {stored_version}, newer than "
                f"this procqueue's {SCHEMA_VERSION}: upgrade procqueue")
        if not TABLES <= present:
            raise StoreFormatError(f"{self.shown}: the schema {SCHEMA} lacks the tables "
                                   f"{', '.join(sorted(TABLES - present))}")

    def _add_missing_columns(self, c: Any) -> None:
        """A schema made by an earlier procqueue gets the columns added since (checked first:
        ALTER TABLE locks the table even when it changes nothing)."""
        for table, added in ADDED_COLUMNS.items():
            present = {row[0] for row in c.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = %s "
                "AND table_name = %s", (SCHEMA, table)).fetchall()}
            for name, kind in added:
                if name not in present:
                    c.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {name} {kind}")

    def _add_missing_indexes(self, c: Any) -> None:
        """Likewise the indexes (checked first: CREATE INDEX locks the table's writes)."""
        present = {row[0] for row in c.execute(
            "SELECT indexname FROM pg_indexes WHERE schemaname = %s", (SCHEMA,)).fetchall()}
        for name, statement in ADDED_INDEXES.items():
            if name not in present:
                c.execute(statement)

    def _stamp(self, c: Any) -> None:
        for name, value in (("kind", KIND), ("schema_version", str(SCHEMA_VERSION))):
            c.execute("INSERT INTO meta VALUES (%s, %s) ON CONFLICT DO NOTHING", (name, value))
        c.execute("INSERT INTO meta VALUES ('created_at', "
                  "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS TEXT)) ON CONFLICT DO NOTHING")

    # ---- the dialect --------------------------------------------------------------------------

    def _begin_write(self, cursor: Any) -> None:
        # explicit: a server whose default is stricter would fail claims with serialization
        # errors instead of making them wait for the queue's lock
        cursor.execute("BEGIN ISOLATION LEVEL READ COMMITTED")

    def _lock_queue(self, cursor: Any, queue: str) -> None:
        cursor.execute("SELECT 1 FROM queues WHERE name = %s FOR UPDATE", (queue,))

    def _sql(self, text: str) -> str:
        return placeholders(text)

    def _skip_locked(self) -> str:
        return " FOR UPDATE SKIP LOCKED"

    def _insert_task(self, cursor: Any, task: NewTask, now: float) -> int | None:
        row = cursor.execute(_INSERT_TASK, (
            task.queue, task.function, task.payload, task.label, task.key, task.priority,
            task.dedup_id, task.timeout_s, task.retries, now)).fetchone()
        return None if row is None else int(row[0])

    # ---- waking services ------------------------------------------------------------------

    def notify(self) -> None:
        # After the commit, best effort: the tasks are stored whatever happens here, and a
        # service polls anyway; an error would make the caller think the enqueue failed.
        try:
            self._connection().execute(f"NOTIFY {CHANNEL}")
        except psycopg.Error:
            pass

    def waker(self, service_id: str) -> "NotifyWaker":
        return NotifyWaker(self.target, self.shown)


class NotifyWaker:
    """A service's end of the wake-up: a connection of its own that LISTENs; its socket
    becomes readable when an enqueue's NOTIFY arrives.  fileno() may change after drain()
    (a lost connection is opened again), so read it each time before waiting."""

    def __init__(self, url: str, shown: str) -> None:
        self._url, self._shown = url, shown
        self._conn = self._listen()

    def _listen(self) -> psycopg.Connection[Any]:
        conn = connect(self._url, self._shown)
        conn.execute(f"LISTEN {CHANNEL}")
        return conn

    def fileno(self) -> int:
        return self._conn.fileno()

    def drain(self) -> None:
        """Consume what arrived (without waiting for more), so that the socket is quiet until
        the next notification."""
        pgconn = self._conn.pgconn
        try:
            # Until the socket is quiet: a server that hangs up first sends its farewell
            # message, and only the next read finds the end of the connection.
            for _ in range(DRAIN_ROUNDS):
                pgconn.consume_input()
                while pgconn.notifies() is not None:
                    pass
                if not select.select([pgconn.socket], [], [], 0)[0]:
                    return
        except psycopg.OperationalError:
            # the connection is gone, so its socket would stay readable forever: listen anew
            self._conn.close()
            self._conn = self._listen()

    def close(self) -> None:
        self._conn.close()


def connect(url: str, shown: str) -> psycopg.Connection[Any]:
    """An autocommit connection whose search_path is the procqueue schema."""
    try:
        conn = psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                               application_name="procqueue")
        conn.execute(f"SET search_path TO {SCHEMA}")
    except psycopg.Error as exc:
        raise StoreError(f"{shown}: cannot connect: {first_line(exc)}") from exc
    return conn


@functools.lru_cache(maxsize=512)
def placeholders(text: str) -> str:
    """SqlStore's ``?`` placeholders as psycopg's ``%s`` (a literal % doubled)."""
    return text.replace("%", "%%").replace("?", "%s")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
