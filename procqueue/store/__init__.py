"""Durable storage: the queue store (SQLite file or PostgreSQL database) and what the batch
journal shares with it (opening SQLite files safely, keeping outcomes).

    open_store("jobs.db")                       SqliteStore (created on first use, mode 0600)
    open_store("postgresql://user@host/db")     PostgresStore (psycopg 3)
"""

from __future__ import annotations

import importlib
import os
from typing import cast

from ..errors import StoreError
from .records import (Claim, ClaimedTask, Finished, NewTask, QueueCounts, QueueSpec,
                      ServiceRecord, StoredError, TaskRecord, TaskStatus, TimelineEntry,
                      error_line)
from .sql import HEARTBEAT_S, LEASE_S, SqlStore

__all__ = ["open_store", "SqlStore", "Claim", "ClaimedTask", "Finished", "NewTask",
           "QueueCounts", "QueueSpec", "ServiceRecord", "StoredError", "TaskRecord",
           "TaskStatus", "TimelineEntry", "error_line", "HEARTBEAT_S", "LEASE_S"]


def is_postgres_url(target: str) -> bool:
    return target.startswith(("postgresql://", "postgres://"))


def open_store(target: str | os.PathLike[str], *, durable: bool = False,
               create: bool = True) -> SqlStore:
    """The store at ``target``: a PostgreSQL URL, or the path of an SQLite file (created
    unless create=False: then a missing file is a StoreError)."""
    text = os.fspath(target)
    if is_postgres_url(text):
        # imported here: psycopg is needed only for PostgreSQL
        module = importlib.import_module(".postgres", __package__)
        return cast(SqlStore, module.PostgresStore(text))
    if not create and not os.path.exists(text):
        raise StoreError(f"no such store: {text}")
    from .sqlite import SqliteStore
    return SqliteStore(text, durable=durable)
