"""Opening a procqueue SQLite file: the one place that creates, checks and configures one.

Both the batch journal and the durable queue store are SQLite files holding pickles, which
are code the process reading them will run.  So every file is:

- created with mode 0600 (before SQLite touches it) and refused, with one line saying why,
  when another user could write it (group/other write bits, or another owner than us or root);
- stamped in a ``meta`` table with its kind ("journal", "queue") and a schema version; a file
  of another kind, not SQLite at all, or of a newer version is refused (StoreFormatError);
- run in WAL mode with synchronous=NORMAL: a commit is an append to the WAL without fsync,
  durable against the death of any process (the data is in the page cache); a power loss can
  only roll back the last commits, never corrupt the file (``durable=True``: fsync each commit).
"""

from __future__ import annotations

import os
import sqlite3
import stat
import time

from ..errors import StoreFormatError, StoreUnsafeError

BUSY_TIMEOUT_MS = 10_000  # writers queue behind each other (BEGIN IMMEDIATE) this long at most
UNSAFE_BITS = stat.S_IWGRP | stat.S_IWOTH

_META = "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)"


def check_not_writable_by_others(path: str) -> None:
    """Refuse a store another user could write: its pickles run in our processes."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if st.st_mode & UNSAFE_BITS:
        raise StoreUnsafeError(
            f"{path} is writable by other users (mode {stat.S_IMODE(st.st_mode):04o}); its "
            f"pickles are code procqueue would run: chmod go-w {path}")
    if st.st_uid not in (os.geteuid(), 0):
        raise StoreUnsafeError(
            f"{path} belongs to another user (uid {st.st_uid}); its pickles are code "
            f"procqueue would run: use a store you own")


def create_private(path: str) -> None:
    """Create an empty file with mode 0600 unless one exists (O_EXCL: no race with others)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.close(fd)


def connect(path: str, *, readonly: bool = False, durable: bool = False,
            check_same_thread: bool = False) -> sqlite3.Connection:
    """A connection in autocommit mode (callers BEGIN/COMMIT themselves), WAL, busy timeout.
    Raises StoreFormatError if the file is not an SQLite database."""
    try:
        if readonly:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None,
                                 check_same_thread=check_same_thread)
        else:
            db = sqlite3.connect(path, isolation_level=None,
                                 check_same_thread=check_same_thread)
        db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        if not readonly:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
    except sqlite3.DatabaseError as exc:
        raise StoreFormatError(f"{path} is not a procqueue store: {exc}") from exc
    return db


def open_store_file(path: str | os.PathLike[str], *, kind: str, version: int,
                    schema: str, tables: set[str], readonly: bool = False,
                    durable: bool = False) -> sqlite3.Connection:
    """Open (creating if need be, unless readonly) a procqueue SQLite file of this kind.

    ``schema``: CREATE ... IF NOT EXISTS statements of the kind's tables; ``tables``: the
    names a file of this kind must have.  The meta table gets ``kind``, ``schema_version``
    and ``created_at`` on creation; a file of another kind or a newer version is refused."""
    path = os.fspath(path)
    if readonly and not os.path.exists(path):
        raise FileNotFoundError(f"no such {kind}: {path}")
    if not readonly:
        create_private(path)
    check_not_writable_by_others(path)
    db = connect(path, readonly=readonly, durable=durable)
    try:
        _check_kind(db, path, kind, version, tables)
        if not readonly:
            db.executescript(_META + ";\n" + schema)
            _stamp(db, kind, version)
    except BaseException:
        db.close()
        raise
    return db


def read_meta(db: sqlite3.Connection, path: str) -> dict[str, str]:
    try:
        return dict(db.execute("SELECT name, value FROM meta").fetchall())
    except sqlite3.DatabaseError as exc:
        raise StoreFormatError(f"{path} is not a procqueue store: {exc}") from exc


def _check_kind(db: sqlite3.Connection, path: str, kind: str, version: int,
                tables: set[str]) -> None:
    present = {name for (name,) in db.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not present:
        return  # a new, empty file
    if "meta" not in present:
        raise StoreFormatError(f"{path} is an SQLite file but not a procqueue {kind} "
                               f"(tables: {', '.join(sorted(present))})")
    meta = read_meta(db, path)
    stored_kind = meta.get("kind", kind)  # files of before the kind stamp are of their kind
    # the kind first: a journal opened as a queue is named so, not listed by its tables
    if stored_kind != kind:
        raise StoreFormatError(f"{path} is a procqueue {stored_kind}, not a {kind}")
    if not tables <= present:
        raise StoreFormatError(f"{path} is an SQLite file but not a procqueue {kind} "
                               f"(tables: {', '.join(sorted(present))})")
    stored_version = int(meta.get("schema_version", version))
    if stored_version > version:
        raise StoreFormatError(f"{path} has format {stored_version}, newer than this "
                               f"procqueue's {version}: upgrade procqueue")


def _stamp(db: sqlite3.Connection, kind: str, version: int) -> None:
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute("INSERT OR IGNORE INTO meta VALUES ('kind', ?)", (kind,))
        db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(version),))
        db.execute("INSERT OR IGNORE INTO meta VALUES ('created_at', ?)", (repr(time.time()),))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
