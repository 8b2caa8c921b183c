"""Shared test fixtures.

Every test runs under pytest-timeout (pyproject: timeout=60, method=thread, which dumps every
thread's stack on a hang, like CPython's _fail_on_deadlock), and every test is checked for
stray processes: after the test, the test process must have no children left.

Queue-store tests take ``store_target`` and so run twice: on an SQLite file and on a fresh
database of a real PostgreSQL server (pgserver), which is started once, the first time a test
needs it, and stopped and deleted when the session ends.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator

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


def inputs_then_wait(inputs: list, release) -> Iterator:
    """A generator that gives `inputs`, then waits for `release` (an input that never comes
    in time: stdin still open), then gives "late"."""
    yield from inputs
    release.wait(30)
    yield "late"


def cancel_after(outcomes, n: int) -> tuple[list, list, float]:
    """The values of an imap_outcomes call's first `n` outcomes, then cancel it: (those
    values, the outcomes that still came, seconds the rest took)."""
    first = [next(outcomes).value for _ in range(n)]
    outcomes.cancel()
    began = time.monotonic()
    rest = list(outcomes)
    return first, rest, time.monotonic() - began


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


# ---- stores: an SQLite file, or a database on a real PostgreSQL server ---------------------

# Settings for a throwaway test server: no fsync (its data dies with the session).
_TEST_SERVER_SETTINGS = ("fsync = off", "synchronous_commit = off", "full_page_writes = off")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[object]:
    """A PostgreSQL server (pgserver) in a private temp directory, started the first time a
    test asks for it, stopped and deleted at the end of the session."""
    import psycopg

    with warnings.catch_warnings():  # platformdirs warns, at import, of an unset XDG_RUNTIME_DIR
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
        import pgserver  # only when a PostgreSQL test runs

    # Not under pytest's basetemp: pgserver (as root) opens the data folder's parents to its
    # own system user, and pytest's folders are private.
    folder = tempfile.mkdtemp(prefix="procqueue-pg-")
    server = pgserver.get_server(os.path.join(folder, "data"), cleanup_mode="stop")
    try:
        with psycopg.connect(server.get_uri(), autocommit=True) as conn:
            for setting in _TEST_SERVER_SETTINGS:
                conn.execute(f"ALTER SYSTEM SET {setting}")
            conn.execute("SELECT pg_reload_conf()")
        yield server
    finally:
        server.cleanup()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server) -> Iterator[str]:
    """The URL of a new, empty database on the session's server, dropped after the test
    (with its sessions: a test that failed half-way may leave connections open)."""
    import psycopg

    name = f"pq_{uuid.uuid4().hex[:16]}"
    admin = postgres_server.get_uri()
    with psycopg.connect(admin, autocommit=True) as conn:
        # FILE_COPY: with fsync off, copying template0's files is the quickest way (~50 ms)
        conn.execute(f"CREATE DATABASE {name} TEMPLATE template0 STRATEGY FILE_COPY")
    try:
        yield postgres_server.get_uri(database=name)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(params=["sqlite", "postgres"])
def store_target(request, tmp_path) -> str:
    """Where a queue store lives, once per kind: an SQLite file's path, a PostgreSQL URL."""
    if request.param == "sqlite":
        return str(tmp_path / "queue.db")
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium driven over the DevTools protocol (tests/cdp_browser.py), for the
    dashboard's tests; CI installs it (.ci/install-browser), elsewhere its absence skips."""
    from cdp_browser import CHROMIUM, Browser

    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/install-browser should have done it")
        pytest.skip("needs headless Chromium: run .ci/install-browser (as root)")
    with Browser(str(tmp_path / "profile")) as b:
        yield b
