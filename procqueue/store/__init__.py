"""Durable storage: the queue store (SQLite file or PostgreSQL database) and what the batch
journal shares with it (opening SQLite files safely, keeping outcomes).

    open_store("jobs.db")                       SqliteStore (created on first use, mode 0600)
    open_store("postgresql://user@host/db")     PostgresStore (psycopg 3)
"""

from __future__ import annotations

import importlib
import os
import re
from typing import cast

from ..errors import StoreError
from .records import (Claim, ClaimedTask, Finished, NewTask, QueueCounts, QueueSpec,
                      ServiceRecord, StoredError, TaskRecord, TaskStatus, TimelineEntry,
                      error_line)
from .connections import redacted
from .sql import HEARTBEAT_S, LEASE_S, SqlStore

__all__ = ["open_store", "SqlStore", "Claim", "ClaimedTask", "Finished", "NewTask",
           "QueueCounts", "QueueSpec", "ServiceRecord", "StoredError", "TaskRecord",
           "TaskStatus", "TimelineEntry", "error_line", "HEARTBEAT_S", "LEASE_S", "redacted"]


_URL_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def is_postgres_url(target: str) -> bool:
    return target.startswith(("postgresql://", "postgres://"))




def open_store(target: str | os.PathLike[str], *, durable: bool = False,
               create: bool = True) -> SqlStore:
    """The store at ``target``: a PostgreSQL URL, or the path of an SQLite file (created
    unless create=False: then a missing file is a StoreError).  A URL of any other scheme
    is a StoreError naming the two accepted forms."""
    text = os.fspath(target)
    scheme = _URL_SCHEME.match(text)
    if scheme and not is_postgres_url(text):
        # else read as a relative path ('mysql:/x/y'): a FileNotFoundError naming no URL
        raise StoreError(f"{text}: a {scheme.group(1)} URL is not a store procqueue opens; "
                         f"give a postgresql://user@host/db URL or an SQLite file's path")
    if is_postgres_url(text):
        # imported here: psycopg is needed only for PostgreSQL
        module = importlib.import_module(".postgres", __package__)
        return cast(SqlStore, module.PostgresStore(text))
    if not create and not os.path.exists(text):
        raise StoreError(f"no such store: {text}")
    from .sqlite import SqliteStore
    return SqliteStore(text, durable=durable)
