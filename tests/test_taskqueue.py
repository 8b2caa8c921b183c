"""Durable task queues (issue #21): what a user of TaskQueue, Pool.serve and the worker
services relies on, checked from the tasks' own records (when and where each ran)."""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from process_checks import wait_gone

import procqueue
from procqueue import Pool, TaskQueue, TaskStatus

pytestmark = pytest.mark.timeout(120)

TASKS = str(Path(__file__).with_name("queue_tasks.py"))
ROOT = str(Path(__file__).resolve().parent.parent)


def ref(name: str) -> str:
    return f"{TASKS}:{name}"


@pytest.fixture
def tq(store_target):
    """A TaskQueue on each store: an SQLite file, then a PostgreSQL database."""
    queue = TaskQueue(store_target)
    yield queue
    queue.close()


def drain(tq: TaskQueue, jobs: int = 2, **options) -> procqueue.ServiceSummary:
    with Pool(jobs) as pool:
        return pool.serve(tq, until_idle=True, **options)


def max_overlap(spans: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    running = peak = 0
    for _, step in events:  # an end sorts before a start at the same instant
        running += step
        peak = max(peak, running)
    return peak


# ---- results and errors ----------------------------------------------------------------

def test_results_come_back_by_handle_in_any_order(tq):
    handles = tq.enqueue_many(ref("square"), range(50))
    summary = drain(tq)
    assert [h.get_result(timeout=5) for h in handles] == [x * x for x in range(50)]
    assert summary.succeeded == 50 and summary.failed == 0
    assert {h.status() for h in handles} == {TaskStatus.SUCCEEDED}


def test_a_failed_task_raises_its_exception_with_the_remote_traceback(tq):
    handle = tq.enqueue(ref("fail"), 7)
    drain(tq)
    with pytest.raises(ValueError, match="^bad input 7$") as info:
        handle.get_result(timeout=5)
    cause = info.value.__cause__
    assert isinstance(cause, procqueue.RemoteTraceback)
    assert 'raise ValueError(f"bad input {x}")' in cause.tb
    assert f"stored task {handle.id} (input 7)" in cause.tb
    # the task as its user knows it, not the pool's batch index and internal call tuple
    assert (info.value.index, info.value.input_repr) == (handle.id, "7")


def test_a_procqueue_error_names_the_task_once(tq):
    handle = tq.enqueue(ref("sleep_forever"), "slow", timeout=0.5)
    drain(tq)
    with pytest.raises(procqueue.TaskTimeoutError) as info:
        handle.get_result(timeout=5)
    assert (info.value.index, info.value.input_repr) == (handle.id, "'slow'")
    assert str(info.value).count("'slow'") == 1


def test_a_crash_fails_only_its_task_naming_pid_and_exit_code(tq):
    crashed = tq.enqueue(ref("crash"), 1)
    fine = tq.enqueue_many(ref("square"), range(10))
    drain(tq)
    with pytest.raises(procqueue.WorkerCrashedError) as info:
        crashed.get_result(timeout=5)
    assert "exit code 3" in str(info.value)
    assert f"task {crashed.id}" in str(info.value) and info.value.pid
    assert [h.get_result(timeout=5) for h in fine] == [x * x for x in range(10)]


def test_a_crash_is_retried_per_the_queues_retries(tq, tmp_path):
    tq.define("flaky", retries=2)
    counter = tmp_path / "runs"
    handle = tq.enqueue(ref("crash_until"), str(counter), 2, queue="flaky")
    drain(tq)
    assert handle.get_result(timeout=5) == 3
    assert handle.record().attempts == 3


def test_a_crash_with_no_retries_left_fails(tq, tmp_path):
    tq.define("flaky", retries=1)
    handle = tq.enqueue(ref("crash_until"), str(tmp_path / "runs"), 5, queue="flaky")
    drain(tq)
    with pytest.raises(procqueue.WorkerCrashedError):
        handle.get_result(timeout=5)
    assert handle.record().attempts == 2


@pytest.mark.parametrize("function, message", [
    ("/no/such/script.py:f", "no such script"),
    (f"{TASKS}:missing", "defines nothing named 'missing'"),
    (f"{TASKS}:not_a_function", "a non-callable int"),
    ("no_such_module_xyz:f", "cannot import no_such_module_xyz"),
])
def test_an_unknown_function_fails_its_task_and_the_service_goes_on(tq, function, message):
    bad = tq.enqueue(function, 1)
    good = tq.enqueue(ref("square"), 3)
    summary = drain(tq)
    with pytest.raises(LookupError, match=message):
        bad.get_result(timeout=5)
    assert good.get_result(timeout=5) == 9
    assert summary.failed == 1


def test_an_unpicklable_result_fails_its_task_clearly(tq):
    handle = tq.enqueue(ref("unpicklable_result"), 1)
    drain(tq)
    with pytest.raises(TypeError, match="cannot be stored: it does not pickle"):
        handle.get_result(timeout=5)


def test_a_result_of_a_class_the_script_defines_comes_back(tq, tmp_path):
    # the worker pickles it by the script's private module name; the handle's process, which
    # never ran the script, imports it by that name on demand
    script = tmp_path / "shapes.py"
    script.write_text("import dataclasses\n\n@dataclasses.dataclass\nclass Point:\n"
                      "    x: int\n    y: int\n\ndef point(x):\n    return Point(x, -x)\n")
    handle = tq.enqueue(f"{script}:point", 3)
    drain(tq)
    got = handle.get_result(timeout=5)
    assert type(got).__name__ == "Point" and (got.x, got.y) == (3, -3)


def test_a_lambda_cannot_be_enqueued(tq):
    with pytest.raises(ValueError, match="top level of a module or script"):
        tq.enqueue(lambda x: x, 1)


def test_an_argument_that_does_not_pickle_is_named_and_nothing_is_stored(tq):
    with pytest.raises(procqueue.ArgumentSerializationError,
                       match=r"square: its keyword argument 'x' cannot be pickled") as info:
        tq.enqueue(ref("square"), x=threading.Lock())
    assert isinstance(info.value, TypeError)  # as multiprocessing raises it
    with pytest.raises(procqueue.ArgumentSerializationError,
                       match=r"square: its argument 1 of item 1 cannot be pickled"):
        tq.enqueue_many(ref("square"), [1, threading.Lock(), 3])
    assert tq.ids() == []


def test_a_handle_reads_the_result_from_another_process(tq):
    handle = tq.enqueue(ref("square"), 12)
    drain(tq)
    code = ("import procqueue, sys; tq = procqueue.TaskQueue(sys.argv[1]); "
            "print(tq.handle(int(sys.argv[2])).get_result(timeout=5))")
    out = subprocess.run([sys.executable, "-c", code, tq.target, str(handle.id)],
                         capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "144"


# ---- order and limits ------------------------------------------------------------------

def test_concurrency_one_runs_in_enqueue_order_then_priority(tq):
    tq.define("serial", concurrency=1)
    low = tq.enqueue_many(ref("span"), range(6), queue="serial")
    high = tq.enqueue_many(ref("span"), range(6, 12), queue="serial", priority=5)
    drain(tq, jobs=3)
    starts = {h.id: h.get_result(timeout=5)[1] for h in low + high}
    order = sorted(starts, key=starts.get)
    assert order == [h.id for h in high] + [h.id for h in low]
    spans = [tuple(h.get_result()[1:3]) for h in low + high]
    assert max_overlap(spans) == 1


def test_key_concurrency_holds_per_key_while_keys_run_side_by_side(tq):
    tq.define("tenants", key_concurrency=1)
    handles = tq.enqueue_many(ref("span"), [f"{k}{i}" for k in "abc" for i in range(4)],
                              queue="tenants", key=lambda item: item[0])
    drain(tq, jobs=3)
    results = [h.get_result(timeout=5) for h in handles]
    for key in "abc":
        assert max_overlap([(s, e) for x, s, e, _ in results if x[0] == key]) == 1
    assert max_overlap([(s, e) for _, s, e, _ in results]) > 1


def test_rate_holds_in_every_window_of_the_stored_starts(tq):
    tq.define("metered", rate="4/1s")
    handles = tq.enqueue_many(ref("square"), range(10), queue="metered")
    drain(tq)
    starts = sorted(h.record().started_at for h in handles)
    assert all(h.get_result(timeout=5) is not None for h in handles)
    for i, start in enumerate(starts):
        assert sum(1 for s in starts[i:] if s < start + 1.0) <= 4


def test_rate_holds_for_the_real_starts_beside_another_queues_task(tq):
    # A service with one free worker claimed a task of each queue it serves: the metered one
    # waited in the pool behind the other's, started later than its claim (the start the
    # rate counts), and next to the following claim's: real starts 0.1 s apart at 1 a second.
    tq.define("bulk")
    tq.define("metered", rate="1/1s")
    tq.enqueue_many(ref("span"), [(0, 0.6)], star=True, queue="bulk")
    metered = tq.enqueue_many(ref("span"), [(i, 0.01) for i in range(3)], star=True,
                              queue="metered")
    drain(tq, jobs=1)
    starts = sorted(h.get_result(timeout=5)[1] for h in metered)
    assert all(later - first > 0.9 for first, later in zip(starts, starts[1:])), starts


def test_worker_concurrency_holds_per_service(tq):
    tq.define("narrow", worker_concurrency=1)
    handles = tq.enqueue_many(ref("span"), range(6), queue="narrow")
    drain(tq, jobs=3)
    assert max_overlap([tuple(h.get_result(timeout=5)[1:3]) for h in handles]) == 1


def _start_service(store: str, jobs: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", "from procqueue.cli import main; main()", "worker", store,
         "-j", str(jobs)], stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": ROOT})


def _stop(services: list[subprocess.Popen]) -> None:
    for service in services:
        if service.poll() is None:
            service.send_signal(signal.SIGTERM)
    for service in services:
        try:
            service.wait(timeout=30)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait()


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_limits_hold_across_two_worker_services(tq):
    tq.define("shared", concurrency=3, worker_concurrency=2)
    services = [_start_service(tq.target, 3) for _ in range(2)]
    try:
        _wait_for(lambda: len(tq.services()) == 2, 60, "two services to register")
        handles = tq.enqueue_many(ref("span"), [(i, 0.1) for i in range(24)], star=True,
                                  queue="shared")
        results = [h.get_result(timeout=60) for h in handles]
        records = [h.record() for h in handles]
    finally:
        _stop(services)
    assert max_overlap([(s, e) for _, s, e, _ in results]) <= 3
    by_service: dict[str, list[tuple[float, float]]] = {}
    for record, (_, s, e, _) in zip(records, results):
        by_service.setdefault(record.service, []).append((s, e))
    assert len(by_service) == 2, "both services ran tasks"
    assert all(max_overlap(spans) <= 2 for spans in by_service.values())
    assert all(service.returncode == 0 for service in services)
    assert tq.services() == []


# ---- timeouts, dedup, cancel, retry, stop ------------------------------------------------

def test_a_timeout_kills_the_task_and_fails_it(tq):
    handle = tq.enqueue(ref("sleep_forever"), 1, timeout=0.5)
    after = tq.enqueue(ref("square"), 2)
    started = time.monotonic()
    drain(tq)
    assert time.monotonic() - started < 30
    with pytest.raises(procqueue.TaskTimeoutError):
        handle.get_result(timeout=5)
    assert after.get_result(timeout=5) == 4


def test_dedup_id_returns_the_live_task_then_a_new_one(tq):
    first = tq.enqueue(ref("square"), 2, dedup_id="report-42")
    again = tq.enqueue(ref("square"), 3, dedup_id="report-42")
    assert again == first
    drain(tq)
    assert first.get_result(timeout=5) == 4
    later = tq.enqueue(ref("square"), 5, dedup_id="report-42")
    assert later.id != first.id


def test_cancel_a_pending_task_and_retry_it(tq):
    handle = tq.enqueue(ref("square"), 6)
    assert tq.cancel(handle) == [handle.id]
    drain(tq)
    with pytest.raises(procqueue.TaskCancelledError) as info:
        handle.get_result(timeout=5)
    assert str(info.value) == f"cancelled (task {handle.id}, input 6)"
    assert (info.value.index, info.value.input_repr) == (handle.id, "6")
    assert tq.retry(handle) == [handle.id]
    drain(tq)
    assert handle.get_result(timeout=5) == 36


def test_retry_refuses_a_task_that_succeeded(tq):
    handle = tq.enqueue(ref("square"), 6)
    drain(tq)
    assert tq.retry(handle) == [] and handle.get_result() == 36


def test_a_stopped_service_puts_its_unfinished_tasks_back(tq):
    handles = tq.enqueue_many(ref("span"), [(i, 30) for i in range(2)], star=True)
    stop = threading.Event()
    with Pool(2) as pool:
        timer = threading.Timer(1.0, stop.set)
        timer.start()
        started = time.monotonic()
        pool.serve(tq, stop=stop)
        timer.cancel()
    assert time.monotonic() - started < 20
    assert [h.record().status for h in handles] == [TaskStatus.PENDING] * 2
    assert [h.record().attempts for h in handles] == [0, 0]
    assert tq.services() == []


def test_a_stopped_service_puts_a_running_task_back_only_once_it_no_longer_runs(tq, tmp_path):
    # Put back while its killed copy still ran (a task deaf to SIGTERM runs the kill's 0.5 s
    # grace), the task was started by another service beside it: a queue's concurrency of 1
    # seen as 2 (audit: 5 of 9 services stopped with Ctrl-C, even without the deafness).
    beats = tmp_path / "beats"

    def beats_by_pid() -> dict[int, list[float]]:
        found: dict[int, list[float]] = {}
        for line in beats.read_text().splitlines() if beats.exists() else []:
            pid, at = line.split()
            found.setdefault(int(pid), []).append(float(at))
        return found

    tq.define("one", concurrency=1)
    tq.enqueue(ref("beat_deaf_to_sigterm"), str(beats), queue="one")
    stops = [threading.Event(), threading.Event()]
    with Pool(1) as first, Pool(1) as second:
        services = [threading.Thread(target=pool.serve, args=(tq,), kwargs={"stop": stop})
                    for pool, stop in zip((first, second), stops)]
        services[0].start()
        _wait_for(lambda: len(beats_by_pid()) == 1, 30, "the task's start")
        services[1].start()
        _wait_for(lambda: len(tq.services()) == 2, 30, "the second service")
        stops[0].set()  # the first stops: the task goes back, the second takes it
        _wait_for(lambda: len(beats_by_pid()) == 2, 30, "the task's second start")
        stops[1].set()
        for service in services:
            service.join(30)
    (old, _), (new, _) = sorted(beats_by_pid().items(), key=lambda item: item[1][0])
    assert max(beats_by_pid()[old]) < min(beats_by_pid()[new])


def test_get_result_times_out_on_a_pending_task(tq):
    handle = tq.enqueue(ref("square"), 1)
    with pytest.raises(TimeoutError, match="still pending"):
        handle.get_result(timeout=0.2)


def test_prune_deletes_only_tasks_that_ended(tq):
    done = tq.enqueue(ref("square"), 1)
    drain(tq)
    waiting = tq.enqueue(ref("square"), 2)
    assert tq.prune(0) == 1
    with pytest.raises(KeyError):
        done.record()
    assert waiting.status() is TaskStatus.PENDING


# ---- the store file ----------------------------------------------------------------------

def test_a_new_store_is_private_to_its_owner(tmp_path):
    with TaskQueue(tmp_path / "new.db"):
        pass
    assert (tmp_path / "new.db").stat().st_mode & 0o777 == 0o600


def test_a_store_others_can_write_is_refused(tmp_path):
    path = tmp_path / "shared.db"
    TaskQueue(path).close()
    path.chmod(0o666)
    with pytest.raises(procqueue.StoreUnsafeError, match="writable by other users"):
        TaskQueue(path)


def test_a_file_that_is_not_a_store_is_refused(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a database at all, just some text that is long enough" * 20)
    path.chmod(0o600)
    with pytest.raises(procqueue.StoreFormatError, match="not a procqueue store"):
        TaskQueue(path)


@pytest.mark.parametrize("target", ["mysql://user@host/jobs", "sqlite:///tmp/jobs.db"])
def test_a_url_of_another_database_is_refused_naming_the_accepted_forms(target, tmp_path,
                                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)  # read as a relative path, it would make or look for a file
    with pytest.raises(procqueue.StoreError) as info:
        TaskQueue(target)
    text = str(info.value)
    assert "\n" not in text and target in text
    assert "postgresql://" in text and "SQLite file" in text
    assert list(tmp_path.iterdir()) == []


def test_results_are_stored_as_pickles_of_the_value(tq):
    handle = tq.enqueue(ref("square"), 9)
    drain(tq)
    assert pickle.loads(handle.record().result) == 81


@contextlib.contextmanager
def serving(tq: TaskQueue, jobs: int = 2) -> Iterator[Pool]:
    """A worker service of `tq` on a pool of `jobs`, in a thread, stopped on leaving."""
    stop = threading.Event()
    with Pool(jobs) as pool:
        service = threading.Thread(target=pool.serve, args=(tq,), kwargs={"stop": stop})
        service.start()
        try:
            yield pool
        finally:
            stop.set()
            service.join(30)


def _pid_once_running(pid_file: Path) -> int:
    """The pid a write_pid_then_sleep task wrote, once it runs."""
    _wait_for(lambda: pid_file.exists() and pid_file.read_text(), 60, "the task to run")
    return int(pid_file.read_text())


def test_cancelling_a_running_task_kills_its_process_and_the_service_goes_on(tq, tmp_path):
    pid_file = tmp_path / "pid"
    handle = tq.enqueue(ref("write_pid_then_sleep"), str(pid_file))
    with serving(tq):
        pid = _pid_once_running(pid_file)
        assert tq.cancel(handle) == [handle.id]
        assert wait_gone([pid], 10) == [], "the cancelled task's process is alive"
        after = tq.enqueue(ref("square"), 4)
        assert after.get_result(timeout=30) == 16
    assert handle.status() is TaskStatus.CANCELLED
    with pytest.raises(procqueue.TaskCancelledError):
        handle.get_result()


def test_a_cancelled_running_task_keeps_its_place_until_its_process_is_gone(tq, tmp_path):
    # Cancelling freed the place at once: on a concurrency=1 queue the next task started
    # while the cancelled one (deaf to SIGTERM, so it runs the kill's 0.5 s grace) still ran.
    beats = tmp_path / "beats"
    tq.define("one", concurrency=1)
    cancelled = tq.enqueue(ref("beat_deaf_to_sigterm"), str(beats), queue="one")
    after = tq.enqueue(ref("span"), 1, queue="one")
    with serving(tq):
        _wait_for(lambda: beats.exists() and beats.read_text(), 60, "the task's start")
        assert tq.cancel(cancelled) == [cancelled.id]
        _, started, _, _ = after.get_result(timeout=60)
    last_beat = max(float(line.split()[1]) for line in beats.read_text().splitlines())
    assert started > last_beat, "the next task started while the cancelled one still ran"
    assert cancelled.status() is TaskStatus.CANCELLED


# ---- what dashboards read: the services' workers, the timeline ------------------------------

def test_a_service_reports_each_worker_and_the_stored_task_it_runs(tq, tmp_path):
    pid_file = tmp_path / "pid"
    handle = tq.enqueue(ref("write_pid_then_sleep"), str(pid_file))

    def running_report():
        return next((w for s in tq.services() for w in s.workers if w["task"] == handle.id),
                    None)
    with serving(tq) as pool:
        pid = _pid_once_running(pid_file)
        _wait_for(running_report, 10, "a report naming the running task")
        report = running_report()
        (record,) = tq.services()
        assert report["pid"] == pid and record.pid == os.getpid()
        assert str(pid_file) in report["label"]
        assert report["task_started_at"] <= time.time()
        assert report["rss_bytes"] > 0 and report["restarts"] == 0
        assert sorted(w["slot"] for w in record.workers) == [0, 1]
        assert {w["pid"] for w in record.workers} == {w.pid for w in pool.stats().workers}
        tq.cancel(handle)
        _wait_for(lambda: running_report() is None, 10, "the report to show it gone")
    assert tq.services() == []


def test_the_timeline_has_each_finished_attempt_where_and_when_it_ran(tq):
    since = time.time()
    handles = tq.enqueue_many(ref("span"), [(i, 0.1) for i in range(6)], star=True)
    failing = tq.enqueue(ref("fail"), 7)
    drain(tq)
    entries = {e.id: e for e in tq.timeline(since)}
    assert set(entries) == {h.id for h in handles} | {failing.id}
    for h in handles:
        _, start, end, pid = h.get_result(timeout=5)
        e = entries[h.id]
        assert e.pid == pid and e.status is TaskStatus.SUCCEEDED and e.error is None
        # its bar covers the task's own run; the pool's run time of a stored call also holds
        # the call's unpickling (and, first in each worker, the import of its module)
        run_s = e.finished_at - e.started_at
        assert e.finished_at >= end and end - start - 0.005 <= run_s <= end - start + 2.0
    assert entries[failing.id].error == "ValueError: bad input 7"
    assert entries[failing.id].error_type == "ValueError"
    assert [e.id for e in tq.timeline(since, limit=2)] == \
        [e.id for e in sorted(entries.values(), key=lambda e: (-e.finished_at, -e.id))][:2]


def test_a_store_made_before_the_workers_report_is_brought_up_to_date(tq):
    tq.close()
    _drop_services_column(tq.target, "workers")
    with TaskQueue(tq.target) as reopened:  # opening adds the column back
        reopened.store.register_service("s1", [], 2)
        assert reopened.store.heartbeat("s1", [{"slot": 0, "pid": 1, "task": None}])
        (record,) = reopened.services()
        assert record.workers == ({"slot": 0, "pid": 1, "task": None},)


def test_a_store_made_before_the_cancelled_tasks_index_gets_it(tq):
    # without it a claim on a limited queue would read every cancelled row (a full scan)
    tq.close()
    _run_sql(tq.target, "DROP INDEX {schema}tasks_cancelled_held")
    TaskQueue(tq.target).close()  # opening adds it back
    _run_sql(tq.target, "DROP INDEX {schema}tasks_cancelled_held")  # fails if it is missing


def _run_sql(target: str, statement: str) -> None:
    if target.startswith("postgresql://"):
        import psycopg
        with psycopg.connect(target, autocommit=True) as conn:
            conn.execute(statement.format(schema="procqueue."))
    else:
        import sqlite3
        conn = sqlite3.connect(target)
        try:
            conn.execute(statement.format(schema=""))
            conn.commit()
        finally:
            conn.close()


def _drop_services_column(target: str, column: str) -> None:
    if target.startswith("postgresql://"):
        import psycopg
        with psycopg.connect(target, autocommit=True) as conn:
            conn.execute(f"ALTER TABLE procqueue.services DROP COLUMN {column}")
    else:
        import sqlite3
        conn = sqlite3.connect(target)
        try:
            conn.execute(f"ALTER TABLE services DROP COLUMN {column}")
            conn.commit()
        finally:
            conn.close()


def test_a_store_that_fails_for_a_while_loses_no_outcome(tq, monkeypatch, capfd):
    handles = tq.enqueue_many(ref("square"), range(20))
    record, failures = tq.store.record, []

    def flaky_record(service_id, outcomes):
        if len(failures) < 2:
            failures.append(len(outcomes))
            raise OSError("disk I/O error (simulated)")
        return record(service_id, outcomes)

    monkeypatch.setattr(tq.store, "record", flaky_record)
    summary = drain(tq)
    assert len(failures) == 2
    assert [h.get_result(timeout=5) for h in handles] == [x * x for x in range(20)]
    assert summary.succeeded == 20
    assert "the store failed (OSError: disk I/O error (simulated))" in capfd.readouterr().err
