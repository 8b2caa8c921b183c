"""The run journal (procqueue/journal.py): one test per promise of issue 8.

The pool is not wired to the journal yet, so `run_journaled` below does what that wiring
will do: look every input up, replay the journaled ones, run the rest through
`pool.imap_outcomes` and report them through a JournalingSink.  The SIGKILL test runs the
same loop in a child process (this file, run as a script) and kills it at random points.
"""
from __future__ import annotations

import io
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import pytest

from procqueue.errors import ProcqueueError, RemoteError, RemoteTraceback
from procqueue.journal import (Journal, JournalBusyError, JournalFormatError, JournalingSink,
                               JournalMismatchError, StoredTask, function_identity)

HERE = Path(__file__).resolve()


# ---- the emulated wiring ----------------------------------------------------------------

class Collector:
    """An inner sink that records what was reported, and when."""

    def __init__(self, on_deliver: Any = None) -> None:
        self.reported: dict[int, tuple[bool, Any]] = {}
        self.order: list[int] = []
        self.on_deliver = on_deliver

    def starting(self, task: Any) -> bool:
        return True

    def deliver(self, task: Any, ok: bool, value: Any) -> None:
        if self.on_deliver is not None:
            self.on_deliver(task, ok, value)
        assert task.index not in self.reported, f"input {task.index} reported twice"
        self.reported[task.index] = (ok, value)
        self.order.append(task.index)


def run_journaled(pool: Any, fn: Any, items: list[Any], journal: Journal, inner: Any) -> int:
    """What Pool(journal=...) will do for one call; returns how many inputs ran."""
    keys = [Journal.key_of(item) for item in items]
    sink = JournalingSink(inner, journal, key_of_task=lambda task: keys[task.index])
    to_run = []
    for i, (item, key) in enumerate(zip(items, keys)):
        stored = journal.lookup(key)
        if stored is None:
            to_run.append(i)
        else:
            sink.replay(i, item, stored)
    journal.set_total(len(items))
    for outcome in pool.imap_outcomes(fn, [items[i] for i in to_run], ordered=False):
        i = to_run[outcome.index]  # imap_outcomes numbers the inputs it was given
        task = StoredTask(i, outcome.input, outcome.attempts, outcome.seconds, outcome.pid)
        sink.deliver(task, outcome.ok, outcome.value if outcome.ok else outcome.error)
    sink.close()
    return len(to_run)


def square_logged(x: int, calls: str) -> int:
    """The task of the end-to-end tests: count its calls in a file, fail on some inputs."""
    with open(calls, "a") as f:  # one short O_APPEND write: atomic between workers
        f.write(f"{x}\n")
    time.sleep(0.001 + (x % 5) * 0.001)
    if x % 50 == 7:
        raise ValueError(f"input {x} is bad")
    return x * x


class SquareLogged:
    def __init__(self, calls: str) -> None:
        self.calls = calls

    def __call__(self, x: int) -> int:
        return square_logged(x, self.calls)


def expected(x: int) -> tuple[bool, Any]:
    return (False, ValueError) if x % 50 == 7 else (True, x * x)


def calls_in(path: Path) -> Counter[int]:
    if not path.exists():
        return Counter()
    return Counter(int(line) for line in path.read_text().split())


def outcome_of(task_index: int, ok: bool, value: Any, attempts: int = 1, seconds: float = 0.01,
               pid: int | None = 123, item: Any = None) -> tuple[StoredTask, bool, Any]:
    item = task_index if item is None else item
    return StoredTask(task_index, item, attempts, seconds, pid), ok, value


def deliver_all(journal: Journal, outcomes: list[tuple[StoredTask, bool, Any]],
                inner: Any = None) -> Collector:
    inner = inner or Collector()
    sink = JournalingSink(inner, journal)
    for task, ok, value in outcomes:
        sink.deliver(task, ok, value)
    sink.close()
    return inner


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "run.db")


# ---- the journal on its own ----------------------------------------------------------------

@pytest.mark.timeout(20)
def test_reopened_journal_returns_the_results_of_the_closed_run(db: str) -> None:
    with Journal.open(db, function_identity="f:1") as journal:
        deliver_all(journal, [outcome_of(i, True, {"square": i * i}) for i in range(10)])
    with Journal.open(db, function_identity="f:1") as journal:
        for i in range(10):
            stored = journal.lookup(Journal.key_of(i))
            assert stored is not None and stored.ok and stored.value == {"square": i * i}
            assert (stored.index, stored.attempts, stored.pid) == (i, 1, 123)
        assert journal.lookup(Journal.key_of(10)) is None


@pytest.mark.timeout(20)
def test_changed_function_is_refused_unless_forced(db: str) -> None:
    with Journal.open(db, function_identity="score:aaaa") as journal:
        deliver_all(journal, [outcome_of(0, True, 0)])
    with pytest.raises(JournalMismatchError) as info:
        Journal.open(db, function_identity="score:bbbb")
    assert isinstance(info.value, ProcqueueError)
    assert "score:aaaa" in str(info.value) and "force" in str(info.value)
    assert (info.value.stored_identity, info.value.identity) == ("score:aaaa", "score:bbbb")
    # A refused open leaves the journal free and unchanged.
    with Journal.open(db, function_identity="score:bbbb", force=True) as journal:
        assert journal.lookup(Journal.key_of(0)) is not None  # force keeps the results
    with Journal.open(db, function_identity="score:bbbb"):  # ...and adopts the identity
        pass


@pytest.mark.timeout(20)
def test_second_open_in_one_process_is_refused_as_busy(db: str) -> None:
    with Journal.open(db, function_identity="f:1"):
        with pytest.raises(JournalBusyError) as info:
            Journal.open(db, function_identity="f:1")
        assert info.value.holder_pid == os.getpid()
        assert db in str(info.value) and str(os.getpid()) in str(info.value)
    Journal.open(db, function_identity="f:1").close()  # free again after close


HOLDER = """
import sys, time
from procqueue.journal import Journal
j = Journal.open(sys.argv[1], function_identity="f:1")
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.timeout(30)
def test_journal_held_by_another_process_is_busy_until_that_process_is_killed(db: str) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, db], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        with pytest.raises(JournalBusyError) as info:
            Journal.open(db, function_identity="f:1")
        assert info.value.holder_pid == holder.pid
        assert f"pid {holder.pid}" in str(info.value)
    finally:
        holder.kill()  # SIGKILL: no chance to release anything itself
        holder.wait()
    Journal.open(db, function_identity="f:1").close()  # the kernel dropped the flock


@pytest.mark.timeout(20)
def test_forked_child_does_not_keep_the_journal_locked(db: str) -> None:
    journal = Journal.open(db, function_identity="f:1")
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.write(ready_w, b"x")  # the at-fork hook has run by the time fork() returned here
        time.sleep(30)
        os._exit(0)
    try:
        os.close(ready_w)
        assert os.read(ready_r, 1) == b"x"  # wait until the child runs: no race with its hook
        os.close(ready_r)
        journal.close()
        Journal.open(db, function_identity="f:1").close()
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


@pytest.mark.timeout(20)
def test_failed_inputs_come_back_as_failures_unless_retry_failed(db: str) -> None:
    with Journal.open(db, function_identity="f:1") as journal:
        error = ValueError("bad input 3")
        error.__cause__ = RemoteTraceback("Traceback (most recent call last):\n  ...\n"
                                          "ValueError: bad input 3\n")
        deliver_all(journal, [outcome_of(3, False, error, attempts=2)])
    with Journal.open(db, function_identity="f:1") as journal:
        stored = journal.lookup(Journal.key_of(3))
        assert stored is not None and not stored.ok and stored.attempts == 2
        assert isinstance(stored.error, ValueError) and str(stored.error) == "bad input 3"
        assert isinstance(stored.error.__cause__, RemoteTraceback)
        assert "ValueError: bad input 3" in stored.error.__cause__.tb_text
    with Journal.open(db, function_identity="f:1", retry_failed=True) as journal:
        assert journal.lookup(Journal.key_of(3)) is None  # it runs again
        deliver_all(journal, [outcome_of(3, True, 9)])  # ...and its success replaces it
    with Journal.open(db, function_identity="f:1") as journal:
        stored = journal.lookup(Journal.key_of(3))
        assert stored is not None and stored.ok and stored.value == 9


class Unpicklable(Exception):
    def __reduce__(self) -> Any:
        raise TypeError("no pickling")


@pytest.mark.timeout(20)
def test_exception_that_does_not_pickle_comes_back_as_remote_error(db: str) -> None:
    with Journal.open(db, function_identity="f:1") as journal:
        deliver_all(journal, [outcome_of(0, False, Unpicklable("odd"))])
        stored = journal.lookup(Journal.key_of(0))
    assert stored is not None and isinstance(stored.error, RemoteError)
    assert "Unpicklable" in stored.error.type_name and stored.error.remote_message == "odd"


@pytest.mark.timeout(20)
def test_result_that_does_not_pickle_is_reported_flagged_and_runs_again(db: str) -> None:
    lock = threading.Lock()
    with Journal.open(db, function_identity="f:1") as journal:
        inner = deliver_all(journal, [outcome_of(0, True, lock), outcome_of(1, True, 1)])
        assert inner.reported[0] == (True, lock)  # reported all the same
        assert journal.lookup(Journal.key_of(0)) is None  # only its repr was kept
        summary = journal.summary()
        assert (summary.done, summary.unstored) == (2, 1)
        out = io.StringIO()
        journal.export_jsonl(out)
    first = json.loads(out.getvalue().splitlines()[0])
    assert first["ok"] and "lock" in first["result"]


@pytest.mark.timeout(20)
def test_a_result_is_committed_before_it_is_reported(db: str) -> None:
    seen_in_journal = []

    def check(task: Any, ok: bool, value: Any) -> None:
        # Another connection, as after a SIGKILL right now, must see it already.
        other = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        row = other.execute("SELECT state FROM outcomes WHERE key = ?",
                            (Journal.key_of(task.input),)).fetchone()
        other.close()
        seen_in_journal.append(row is not None)

    with Journal.open(db, function_identity="f:1") as journal:
        deliver_all(journal, [outcome_of(i, True, i) for i in range(50)], Collector(check))
    assert seen_in_journal == [True] * 50


@pytest.mark.timeout(20)
def test_commits_of_tiny_tasks_are_batched(db: str) -> None:
    with Journal.open(db, function_identity="f:1", flush_interval_s=0.2) as journal:
        sink = JournalingSink(Collector(), journal)
        for i in range(1000):  # 1 us each: 1 ms of compute in all, under FLUSH_COMPUTE_S
            task, ok, value = outcome_of(i, True, i, seconds=1e-6)
            sink.deliver(task, ok, value)
        sink.close()
        stats = journal.statistics()
    assert stats.outcomes_committed == 1000
    assert stats.commits <= 3, stats  # 1000 outcomes delivered well within 0.2 s


@pytest.mark.timeout(20)
def test_outcome_is_reported_within_the_flush_interval_without_flush(db: str) -> None:
    reported = threading.Event()
    with Journal.open(db, function_identity="f:1", flush_interval_s=0.05) as journal:
        sink = JournalingSink(Collector(lambda *a: reported.set()), journal)
        task, ok, value = outcome_of(0, True, 0)
        sink.deliver(task, ok, value)
        assert reported.wait(5.0)


@pytest.mark.timeout(20)
def test_a_commit_follows_as_soon_as_one_worker_finished_enough_compute(db: str) -> None:
    reported = threading.Event()
    # A flush interval of 60 s: only the compute of the outcomes can make the commit now.
    with Journal.open(db, function_identity="f:1", flush_interval_s=60.0,
                      flush_compute_s=0.005) as journal:
        sink = JournalingSink(Collector(lambda task, *_: task.index == 1 and reported.set()),
                              journal)
        sink.deliver(*outcome_of(0, True, 0, seconds=0.003, pid=7))
        sink.deliver(*outcome_of(1, True, 1, seconds=0.003, pid=7))  # 6 ms of worker 7's
        assert reported.wait(10.0)
        assert journal.statistics().outcomes_committed == 2


@pytest.mark.timeout(20)
def test_close_flushes_is_idempotent_and_later_outcomes_are_still_reported(db: str) -> None:
    journal = Journal.open(db, function_identity="f:1", flush_interval_s=10.0)
    inner = Collector()
    sink = JournalingSink(inner, journal)
    for i in range(5):
        sink.deliver(*outcome_of(i, True, i))
    journal.close()  # flushes although the interval is 10 s
    journal.close()
    assert sorted(inner.reported) == [0, 1, 2, 3, 4]
    sink.deliver(*outcome_of(5, True, 5))  # after close: reported, not journaled
    sink.close()
    assert 5 in inner.reported and journal.statistics().unrecorded == 1
    with Journal.read(db) as reader:
        assert reader.summary().done == 5


@pytest.mark.timeout(20)
def test_a_failure_never_overwrites_a_success_of_the_same_input(db: str) -> None:
    with Journal.open(db, function_identity="f:1") as journal:
        deliver_all(journal, [outcome_of(0, True, "first")])
        deliver_all(journal, [outcome_of(0, False, ValueError("later"))])
        stored = journal.lookup(Journal.key_of(0))
    assert stored is not None and stored.ok and stored.value == "first"


@pytest.mark.timeout(20)
def test_summary_counts_pending_and_lists_the_slowest(db: str) -> None:
    with Journal.open(db, function_identity="f:1") as journal:
        journal.set_total(10)
        deliver_all(journal, [outcome_of(i, i != 2, i if i != 2 else ValueError("x"),
                                         seconds=i / 10) for i in range(6)])
        summary = journal.summary(slowest=2)
    assert (summary.done, summary.failed, summary.total, summary.pending) == (5, 1, 10, 4)
    assert [(s.index, s.seconds) for s in summary.slowest] == [(5, 0.5), (4, 0.4)]
    text = str(summary)
    assert "done: 5" in text and "failed: 1" in text and "pending: 4" in text


@pytest.mark.timeout(20)
def test_export_writes_one_json_line_per_input_in_index_order(db: str) -> None:
    with Journal.open(db, function_identity="f:1") as journal:
        outcomes = [outcome_of(i, True, [i, "x"], item=f"in-{i}") for i in (4, 0, 3, 1)]
        outcomes.append(outcome_of(2, False, KeyError("k"), item="in-2"))
        outcomes.append(outcome_of(5, True, {1, 2}, item="in-5"))  # a set: not JSON
        deliver_all(journal, outcomes)
    out = io.StringIO()
    with Journal.read(db) as reader:  # read-only: what `procqueue journal` uses
        assert reader.export_jsonl(out) == 6
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2, 3, 4, 5]
    assert records[0] == {"index": 0, "input": "in-0", "ok": True, "result": [0, "x"],
                          "error": None, "attempts": 1, "seconds": 0.01, "pid": 123}
    assert records[2]["ok"] is False and records[2]["error"]["type"] == "KeyError"
    assert records[5]["result"] == "{1, 2}"


@pytest.mark.timeout(20)
def test_outcomes_give_every_input_as_given_with_its_result_or_error(db: str) -> None:
    from procqueue import TaskOutcome

    with Journal.open(db, function_identity="f:1") as journal:
        deliver_all(journal, [outcome_of(1, False, KeyError("k"), item=("b", 2)),
                              outcome_of(0, True, {"r": 1}, item=("a", 1)),
                              outcome_of(2, True, 4, item="x" * 100_000)])  # too big to keep
    with Journal.read(db) as reader:
        outcomes = list(reader.outcomes())
    assert all(isinstance(o, TaskOutcome) for o in outcomes)
    assert [(o.index, o.input, o.ok, o.value) for o in outcomes[:2]] == [
        (0, ("a", 1), True, {"r": 1}), (1, ("b", 2), False, None)]
    assert isinstance(outcomes[1].error, KeyError) and outcomes[1].attempts == 1
    assert outcomes[2].input.startswith("'xxx") and outcomes[2].value == 4  # its repr


@pytest.mark.timeout(20)
def test_a_journal_of_format_1_gets_the_input_column_when_a_run_opens_it(db: str) -> None:
    import pickle

    version_1_journal(db, "f:1", [(Journal.key_of("a"), 0, "'a'", "done", 1, pickle.dumps(1),
                                   None)])
    with Journal.read(db) as reader:  # read-only: as it is
        assert [(o.input, o.value) for o in reader.outcomes()] == [("'a'", 1)]
    with Journal.open(db, function_identity="f:1") as journal:
        deliver_all(journal, [outcome_of(1, True, 2, item="b")])
    with Journal.read(db) as reader:
        assert [(o.input, o.value) for o in reader.outcomes()] == [("'a'", 1), ("b", 2)]
    meta = dict(sqlite3.connect(db).execute("SELECT name, value FROM meta").fetchall())
    assert meta["schema_version"] == "2"


@pytest.mark.timeout(20)
def test_read_only_journal_works_while_a_run_holds_it(db: str) -> None:
    with Journal.open(db, function_identity="f:1") as journal:
        deliver_all(journal, [outcome_of(0, True, 0)])
        with Journal.read(db) as reader:
            assert reader.summary().done == 1
            assert reader.lookup(Journal.key_of(0)) is not None


@pytest.mark.timeout(20)
def test_a_file_that_is_not_a_journal_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(JournalFormatError):
        Journal.open(str(junk), function_identity="f:1")
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(JournalFormatError):
        Journal.open(str(other), function_identity="f:1")
    with pytest.raises(JournalFormatError):
        Journal.read(str(tmp_path / "missing.db"))


# The tables a journal of procqueue before the shared store layer had: no kind row in meta.
VERSION_1_SCHEMA = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE outcomes (
    id INTEGER PRIMARY KEY, key TEXT NOT NULL, khash INTEGER NOT NULL, idx INTEGER NOT NULL,
    input_repr TEXT NOT NULL, state TEXT NOT NULL CHECK (state IN ('done', 'failed')),
    attempts INTEGER NOT NULL, result BLOB, result_repr TEXT, error_type TEXT,
    error_message TEXT, error_traceback TEXT, error BLOB, seconds REAL NOT NULL, pid INTEGER,
    finished_at REAL NOT NULL, committed_at REAL NOT NULL, runs INTEGER NOT NULL);
CREATE INDEX outcomes_by_idx ON outcomes (idx);
"""


def version_1_journal(path: str, identity: str, rows: list[tuple[Any, ...]]) -> None:
    """A journal file as procqueue wrote it before the store layer; rows are
    (key, idx, input_repr, state, attempts, result pickle, error_type)."""
    db = sqlite3.connect(path)
    db.executescript(VERSION_1_SCHEMA)
    db.executemany("INSERT INTO meta VALUES (?, ?)", [
        ("schema_version", "1"), ("function_identity", identity), ("created_at", "0.0")])
    for n, (key, idx, input_repr, state, attempts, result, error_type) in enumerate(rows, 1):
        db.execute("INSERT INTO outcomes VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, ?, ?, NULL, "
                   "0.5, 99, 1.0, 1.0, 1)",
                   (n, key, int(key[:15], 16), idx, input_repr, state, attempts, result,
                    error_type, None if error_type is None else "message",
                    None if error_type is None else "Traceback ...\n"))
    db.commit()
    db.close()
    os.chmod(path, 0o644)


@pytest.mark.timeout(20)
def test_a_journal_of_before_the_store_layer_still_opens(db: str) -> None:
    import pickle

    version_1_journal(db, "f:1", [(Journal.key_of(7), 0, "7", "done", 1, pickle.dumps(49),
                                   None)])
    with Journal.read(db) as reader:
        assert reader.summary().done == 1
    with Journal.open(db, function_identity="f:1") as journal:
        stored = journal.lookup(Journal.key_of(7))
        assert stored is not None and stored.ok and stored.value == 49
        deliver_all(journal, [outcome_of(8, True, 64)])
    with Journal.read(db) as reader:
        assert reader.summary().done == 2


@pytest.mark.timeout(20)
def test_inputs_an_older_journal_kept_failed_without_running_are_pending_again(db: str) -> None:
    version_1_journal(db, "f:1", [
        (Journal.key_of(1), 0, "1", "failed", 0, None, "procqueue.errors.TaskCancelledError"),
        (Journal.key_of(2), 1, "2", "failed", 1, None, "ValueError"),
        (Journal.key_of(3), 2, "3", "failed", 1, None, "procqueue.errors.InitializerError")])
    with Journal.open(db, function_identity="f:1") as journal:
        assert journal.lookup(Journal.key_of(1)) is None  # it never ran: run it
        assert journal.lookup(Journal.key_of(3)) is None  # the script did not load: run it
        stored = journal.lookup(Journal.key_of(2))
        assert stored is not None and not stored.ok  # a real failure stays one


@pytest.mark.timeout(20)
def test_the_journal_is_a_private_file_of_the_store_layer(db: str) -> None:
    from procqueue.errors import StoreFormatError, StoreUnsafeError
    from procqueue.journal import JournalError

    Journal.open(db, function_identity="f:1").close()
    assert os.stat(db).st_mode & 0o777 == 0o600  # its pickles are code we would run
    meta = dict(sqlite3.connect(db).execute("SELECT name, value FROM meta").fetchall())
    assert meta["kind"] == "journal"
    os.chmod(db, 0o666)
    with pytest.raises(JournalError) as info:  # what the CLI and existing callers catch
        Journal.open(db, function_identity="f:1")
    assert isinstance(info.value, StoreUnsafeError) and "chmod go-w" in str(info.value)
    junk = Path(db + ".junk")
    junk.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(StoreFormatError):  # a journal's format error is a store's
        Journal.open(str(junk), function_identity="f:1")


@pytest.mark.timeout(20)
def test_a_queue_store_is_not_taken_for_a_journal(tmp_path: Path) -> None:
    from procqueue.store import open_store

    path = str(tmp_path / "jobs.db")
    open_store(path).close()
    with pytest.raises(JournalFormatError) as info:
        Journal.open(path, function_identity="f:1")
    assert "journal" in str(info.value)


def test_keys_depend_on_the_input_content_only() -> None:
    assert Journal.key_of((1, "a")) == Journal.key_of((1, "a"))
    assert Journal.key_of(1) != Journal.key_of(1.0) != Journal.key_of("1")
    lock = threading.Lock()  # unpicklable: keyed by its repr
    assert Journal.key_of(lock) == Journal.key_of(lock)
    assert len(Journal.key_of(lock)) == 64


def test_every_occurrence_of_a_repeated_input_has_a_key_of_its_own() -> None:
    keys = Journal.keys_of(["a", "b", "a", "a", "b"])
    assert len(set(keys)) == 5
    assert keys[0] == Journal.key_of("a") and keys[1] == Journal.key_of("b")
    assert Journal.keys_of(["b", "a", "a"]) == [keys[1], keys[0], keys[2]]  # k-th with k-th


SCRATCH = """
LIMIT = {limit}

def clip(x):
    return min(x, LIMIT)

def process(x):
    return clip(x) * 2
"""


def scratch_function(source: str) -> Any:
    """`process` of a module that is not importable (cloudpickle copies it by value)."""
    namespace: dict[str, Any] = {"__name__": "procqueue_scratch_module"}
    exec(compile(source, "scratch.py", "exec"), namespace)
    return namespace["process"]


def test_function_identity_is_the_code_not_comments_or_lines() -> None:
    base = function_identity(scratch_function(SCRATCH.format(limit=10)))
    commented = "# a comment\n\n\n" + SCRATCH.format(limit=10).replace(
        "def clip(x):", "# why we clip\ndef clip(x):  # see above")
    assert function_identity(scratch_function(commented)) == base
    assert function_identity(scratch_function(SCRATCH.format(limit=11))) != base  # a global
    changed_helper = SCRATCH.format(limit=10).replace("min(x, LIMIT)", "max(x, LIMIT)")
    assert function_identity(scratch_function(changed_helper)) != base


def test_function_identity_changes_with_the_code() -> None:
    def f(x: int) -> int:
        return x + 1

    def g(x: int) -> int:
        return x + 2

    assert function_identity(f) == function_identity(f)
    assert function_identity(f) != function_identity(g)
    assert function_identity(f).startswith(f"{__name__}.")


# ---- end to end with a real pool ---------------------------------------------------------

@pytest.mark.timeout(60)
def test_resumed_run_recomputes_nothing_that_was_done(db: str, tmp_path: Path) -> None:
    import procqueue

    calls = tmp_path / "calls"
    fn = SquareLogged(str(calls))
    items = list(range(120))
    with procqueue.Pool(2) as pool:
        with Journal.open(db, function_identity="square:1") as journal:
            assert run_journaled(pool, fn, items[:70], journal, Collector()) == 70
        with Journal.open(db, function_identity="square:1") as journal:
            inner = Collector()
            assert run_journaled(pool, fn, items, journal, inner) == 50
    assert calls_in(calls) == Counter(items)  # every input ran exactly once in all
    for x in items:
        ok, value = inner.reported[x]
        want_ok, want = expected(x)
        assert ok == want_ok and (value == want if ok else isinstance(value, want))


KILLED_RUN = """
import sys
sys.path.insert(0, sys.argv[1])
import procqueue
from procqueue.journal import Journal
from test_journal import Collector, SquareLogged, run_journaled

def report(task, ok, value):
    print(task.index, int(ok), value if ok else type(value).__name__, flush=True)

db, calls, n = sys.argv[2], sys.argv[3], int(sys.argv[4])
with procqueue.Pool(2) as pool, Journal.open(db, function_identity="square:1") as journal:
    run_journaled(pool, SquareLogged(calls), list(range(n)), journal, Collector(report))
"""


def run_until_killed(db: str, calls: Path, n: int, rng: random.Random) -> set[int]:
    """Start the batch in a child process, SIGKILL it after a random number of reported
    results plus a random delay; return the inputs it reported."""
    args = [sys.executable, "-c", KILLED_RUN, str(HERE.parent), db, str(calls), str(n)]
    child = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    reported: set[int] = set()
    kill_after = rng.randint(1, n // 2)
    descendants: list[psutil.Process] = []
    try:
        while len(reported) < kill_after:
            line = child.stdout.readline()
            assert line, "the run ended before it was killed"
            reported.add(int(line.split()[0]))
        descendants = psutil.Process(child.pid).children(recursive=True)
        time.sleep(rng.uniform(0, 0.03))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    # Whatever it printed before it died was reported, too.
    reported |= {int(line.split()[0]) for line in child.stdout.read().splitlines()}
    child.stdout.close()
    # Its workers and fork server die with it (they are no longer our children to check).
    _, alive = psutil.wait_procs(descendants, timeout=10)
    assert not alive, f"left behind by the killed run: {alive}"
    return reported


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", range(4))
def test_sigkilled_run_resumes_with_one_correct_result_per_input(db: str, tmp_path: Path,
                                                                 seed: int) -> None:
    n = 200
    calls = tmp_path / "calls"
    rng = random.Random(seed)
    reported_before_kill = run_until_killed(db, calls, n, rng)

    with Journal.read(db) as reader:
        committed = {x for x in range(n) if reader.lookup(Journal.key_of(x)) is not None}
    assert reported_before_kill <= committed, "a reported result was lost by the kill"
    calls_before = calls_in(calls)

    rerun = subprocess.run([sys.executable, "-c", KILLED_RUN, str(HERE.parent), db,
                            str(calls), str(n)], capture_output=True, text=True, timeout=60)
    assert rerun.returncode == 0, rerun.stderr
    lines = [line.split() for line in rerun.stdout.splitlines()]

    # Every input reported once by the resumed run, correctly (journaled ones replayed).
    assert sorted(int(index) for index, _, _ in lines) == list(range(n))
    for index, ok, value in lines:
        want_ok, want = expected(int(index))
        assert bool(int(ok)) == want_ok
        assert value == (str(want) if want_ok else "ValueError")
    # Inputs done before the kill were not computed again; the others ran at least once.
    calls_after = calls_in(calls)
    for x in range(n):
        if x in committed:
            assert calls_after[x] == calls_before[x] == 1, x
        else:
            assert calls_after[x] >= 1
    # Exactly one stored outcome per input, all correct.
    with Journal.read(db) as reader:
        summary = reader.summary()
        assert summary.done + summary.failed == n and summary.pending == 0
        for x in range(n):
            stored = reader.lookup(Journal.key_of(x))
            assert stored is not None and stored.index == x
            want_ok, want = expected(x)
            assert stored.ok == want_ok
            assert stored.value == want if want_ok else isinstance(stored.error, want)
    rows = sqlite3.connect(db).execute("SELECT idx, COUNT(*) FROM outcomes GROUP BY idx")
    assert dict(rows.fetchall()) == {x: 1 for x in range(n)}
