"""Checks that processes have ended, safe against the process ending while it is looked at.

A pid can disappear between `psutil.pid_exists` and reading its status; these helpers treat
that as gone instead of raising NoSuchProcess (which once failed a CI run).
"""
from __future__ import annotations

import time
from typing import Iterable, Optional

import psutil


def is_gone(pid: int) -> bool:
    """True when the process has exited (a zombie has exited: only its parent's wait is left)."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def living(pids: Iterable[Optional[int]]) -> list[int]:
    return [pid for pid in pids if pid is not None and not is_gone(pid)]


def wait_gone(pids: Iterable[Optional[int]], timeout_s: float) -> list[int]:
    """Wait until every process has exited; return those still running at the deadline."""
    pids = list(pids)
    deadline = time.monotonic() + timeout_s
    while True:
        alive = living(pids)
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.02)
