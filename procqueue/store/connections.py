"""Connections and transactions of the SQL queue stores, beneath the queue logic (sql.py) and
its read-only views (views.py).

Each thread gets a connection of its own, opened on first use; a forked child opens new ones
rather than share its parent's.  A write is one transaction (``_write``: the dialect begins
it, a failure rolls it back); a read is one statement (``_read``).  Statements are written
with ``?`` placeholders, which a dialect rewrites (``_sql``).
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import urllib.parse
from typing import Any, Iterable, Iterator, Self, Sequence

from ..errors import StoreError


class SqlConnections:
    """The store's connections, one per thread and process, and its transactions.  A dialect
    says how to connect, how a write transaction begins and how a read ends."""

    dialect = "sql"

    def __init__(self, target: str) -> None:
        self.target = target
        self._local = threading.local()
        self._all_connections: list[tuple[int, Any]] = []  # (pid that opened it, connection)
        self._lock = threading.Lock()
        self._closed = False

    # ---- dialect hooks ----------------------------------------------------------------------

    def _connect(self) -> Any:
        raise NotImplementedError

    def _begin_write(self, cursor: Any) -> None:
        raise NotImplementedError

    def _sql(self, text: str) -> str:
        return text

    def _end_read(self, conn: Any) -> None:
        """PostgreSQL ends the read's implicit transaction; SQLite autocommits."""

    # ---- connections and transactions ------------------------------------------------------

    def _connection(self) -> Any:
        if self._closed:
            raise StoreError(f"the store {redacted(self.target)} is closed")
        conn = getattr(self._local, "conn", None)
        if conn is None or getattr(self._local, "pid", None) != os.getpid():
            conn = self._connect()
            self._local.conn, self._local.pid = conn, os.getpid()
            with self._lock:
                self._all_connections.append((os.getpid(), conn))
        return conn

    @contextlib.contextmanager
    def _write(self) -> Iterator[Any]:
        conn = self._connection()
        cursor = conn.cursor()
        self._begin_write(cursor)
        try:
            yield cursor
        except BaseException:
            # the error is what matters; a failed ROLLBACK (a broken connection, a transaction
            # SQLite already rolled back) would only hide it
            with contextlib.suppress(Exception):
                cursor.execute("ROLLBACK")
            raise
        cursor.execute("COMMIT")

    def _x(self, cursor: Any, text: str, params: Sequence[Any] = ()) -> Any:
        cursor.execute(self._sql(text), params)
        return cursor

    def _many(self, cursor: Any, text: str, rows: Iterable[Sequence[Any]]) -> int:
        """executemany; the number of rows it changed."""
        params = list(rows)
        if not params:
            return 0
        cursor.executemany(self._sql(text), params)
        return max(int(cursor.rowcount), 0)

    def _read(self, text: str, params: Sequence[Any] = ()) -> list[Any]:
        conn = self._connection()
        cursor = conn.cursor()
        try:
            return list(self._x(cursor, text, params).fetchall())
        finally:
            self._end_read(conn)

    def close(self) -> None:
        self._closed = True
        with self._lock:
            connections, self._all_connections = self._all_connections, []
        for pid, conn in connections:
            # A forked child must not close what it inherited: closing a PostgreSQL
            # connection tells the server to end the session the parent is still using.
            if pid == os.getpid():
                with contextlib.suppress(Exception):
                    conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    """``items`` in lists of at most ``size`` (an IN list's parameters per statement)."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


_PASSWORD_PARAMETER = re.compile(r"(?i)(^|&)(password=)[^&]*")


def redacted(target: str) -> str:
    """A store's target as messages show it: a URL without its password (in its user part or
    as a password= parameter)."""
    if "://" not in target:
        return target
    parts = urllib.parse.urlsplit(target)
    if parts.password:
        host = parts.netloc.rpartition("@")[2]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
    if parts.query:
        parts = parts._replace(query=_PASSWORD_PARAMETER.sub(r"\1\2***", parts.query))
    return urllib.parse.urlunsplit(parts)
