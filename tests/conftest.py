"""Shared test fixtures.

Every test runs under pytest-timeout (pyproject: timeout=60, method=thread, which dumps every
thread's stack on a hang, like CPython's _fail_on_deadlock), and every test is checked for
stray processes: after the test, the test process must have no children left.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import psutil
import pytest

# Child processes that are not ours: multiprocessing's forkserver and resource tracker live as
# long as the test session, by design.
_HELPER_MARKERS = ("forkserver", "resource_tracker", "semaphore_tracker")


def _is_mp_helper(proc: psutil.Process) -> bool:
    try:
        cmd = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return True
    return any(marker in cmd for marker in _HELPER_MARKERS)


def stray_children(grace_s: float = 2.0,
                   allowed: Callable[[], set[int]] = set) -> list[psutil.Process]:
    """Children of this process (recursively) still alive after `grace_s`, ignoring
    multiprocessing's own long-lived helpers, the helpers' children being torn down, and the
    pids allowed() names (re-read while waiting: a process being replaced)."""
    me = psutil.Process()
    deadline = time.monotonic() + grace_s
    while True:
        keep = allowed()
        left = []
        for child in me.children(recursive=True):
            try:
                if child.status() == psutil.STATUS_ZOMBIE or child.pid in keep:
                    continue
            except psutil.NoSuchProcess:
                continue
            if _is_mp_helper(child):
                continue
            left.append(child)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def dask_worker_pids(cluster) -> set[int]:
    """The pids of a distributed LocalCluster's worker processes (its nannies' children)."""
    pids = set()
    for nanny in list(cluster.workers.values()):  # a copy: the cluster's loop may change it
        process = getattr(getattr(nanny, "process", None), "process", None)
        if process is not None and process.pid is not None:
            pids.add(process.pid)
    return pids


@pytest.fixture(autouse=True)
def no_stray_processes():
    """A test that leaves a child process behind fails (and the child is killed)."""
    yield
    left = stray_children()
    for proc in left:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    assert not left, f"stray processes after test: {[(p.pid, p.cmdline()) for p in left]}"


@pytest.fixture
def tmp_shared(tmp_path):
    """A directory tasks in worker processes can record facts into (one file per event)."""
    d = tmp_path / "shared"
    d.mkdir()
    return d
