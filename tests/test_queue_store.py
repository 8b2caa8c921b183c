"""The durable queue store's promises (procqueue/store), each checked on both stores: an
SQLite file and a database on a real PostgreSQL server (conftest's ``store_target``).

Each test asserts from what the store recorded (statuses, attempts, start times, the counts it
reports), never from how long something took.  Where time must pass (a lease running out, a
rate window sliding, a deadline going by), the store's periods are made short with monkeypatch
and every wait is bounded by wait_for().
"""
from __future__ import annotations

import importlib
import multiprocessing
import os
import select
import sqlite3
import stat
import threading
import time
import types
from collections.abc import Callable, Iterator

import psycopg
import pytest

import procqueue.store.sql as store_sql
from procqueue.limits import START_SKEW_MARGIN_S
from procqueue.errors import StoreError, StoreFormatError, StoreUnsafeError, TaskFailed
from procqueue.store import (Claim, ClaimedTask, Finished, NewTask, QueueSpec, SqlStore,
                             StoredError, TaskStatus, open_store)
from procqueue.store.sqlite_file import open_store_file

pytestmark = pytest.mark.timeout(60)

WAIT_S = 5.0  # the longest any wait for the store to change may take


# ---- helpers -----------------------------------------------------------------------------------

@pytest.fixture
def stores(store_target) -> Iterator[Callable[[], SqlStore]]:
    """Opens store objects on the test's store (each a service's or a client's own), closed
    after the test."""
    opened: list[SqlStore] = []

    def open_one() -> SqlStore:
        store = open_store(store_target)
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        store.close()


@pytest.fixture
def store(stores) -> SqlStore:
    return stores()


def new_task(label: str, queue: str = "q", **options) -> NewTask:
    return NewTask(queue, "tests.jobs:work", b"payload " + label.encode(), label, **options)


def succeeded(task: ClaimedTask, result: bytes = b"result") -> Finished:
    return Finished(task.id, task.attempt, result, None, seconds=0.01, pid=os.getpid())


def crashed(task: ClaimedTask) -> Finished:
    """A worker crash: the outcome a service reports as retryable."""
    error = StoredError("procqueue.errors.WorkerCrashedError", "worker died", "", None)
    return Finished(task.id, task.attempt, None, error, retryable=True)


def raised(task: ClaimedTask, type_name: str = "ValueError") -> Finished:
    error = StoredError(type_name, "bad input", "Traceback ...", None)
    return Finished(task.id, task.attempt, None, error)


def labels(claim: Claim) -> list[str]:
    return [task.label for task in claim.tasks]


def running(store: SqlStore, queue: str = "q") -> int:
    return sum(counts.running for counts in store.counts() if counts.spec.name == queue)


def wait_for(condition: Callable[[], object], what: str, timeout_s: float = WAIT_S) -> object:
    """condition()'s first true value, polled until timeout_s (then the test fails)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        time.sleep(0.01)


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(exc.value)
    assert text and "\n" not in text, f"not one line: {text!r}"
    return text


# ---- order -------------------------------------------------------------------------------------

def test_higher_priority_first_then_enqueue_order(store):
    store.enqueue([new_task("a0"), new_task("b0", priority=5), new_task("a1"),
                   new_task("c0", priority=-1), new_task("b1", priority=5), new_task("a2")])
    store.register_service("A", ["q"], 8)
    one_at_a_time = [labels(store.claim("A", {"q": 1})) for _ in range(6)]
    assert one_at_a_time == [["b0"], ["b1"], ["a0"], ["a1"], ["a2"], ["c0"]]


def test_one_claim_takes_tasks_in_priority_then_fifo_order(store):
    store.enqueue([new_task(f"t{i}", priority=i % 3) for i in range(9)])
    store.register_service("A", ["q"], 9)
    assert labels(store.claim("A", {"q": 9})) == ["t2", "t5", "t8", "t1", "t4", "t7",
                                                  "t0", "t3", "t6"]


def test_concurrency_one_runs_strictly_in_enqueue_order(stores):
    a, b = stores(), stores()
    a.define(QueueSpec("q", concurrency=1))
    a.enqueue([new_task(f"t{i}") for i in range(5)])
    a.register_service("A", ["q"], 4)
    b.register_service("B", ["q"], 4)
    order = []
    for turn in range(5):
        service, other = (a, b) if turn % 2 == 0 else (b, a)
        me, them = ("A", "B") if turn % 2 == 0 else ("B", "A")
        claim = service.claim(me, {"q": 4})
        assert len(claim.tasks) == 1
        assert other.claim(them, {"q": 4}).tasks == []  # the one permit is taken
        order += labels(claim)
        assert service.record(me, [succeeded(claim.tasks[0])]) == 1
    assert order == [f"t{i}" for i in range(5)]


# ---- limits across services --------------------------------------------------------------------

def test_concurrency_holds_across_two_services_taking_turns(stores):
    a, b = stores(), stores()
    a.define(QueueSpec("q", concurrency=2))
    a.enqueue([new_task(f"t{i}") for i in range(5)])
    a.register_service("A", ["q"], 5)
    b.register_service("B", ["q"], 5)

    held_a = a.claim("A", {"q": 5}).tasks
    assert len(held_a) == 2
    assert b.claim("B", {"q": 5}).tasks == []
    assert a.record("A", [succeeded(held_a.pop())]) == 1
    held_b = b.claim("B", {"q": 5}).tasks
    assert len(held_b) == 1
    assert a.claim("A", {"q": 5}).tasks == []
    assert running(a) == 2
    assert [s.running for s in a.services()] == [1, 1]


def _claim_and_finish(store: SqlStore, service_id: str, seen: list[int],
                      claimed_ids: list[int], errors: list[BaseException]) -> None:
    """A service's loop: claim, look at the store's running count while holding the tasks,
    record them; until the queue is empty."""
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            claim = store.claim(service_id, {"q": 2})
            if claim.tasks:
                seen.append(running(store))
                claimed_ids.extend(task.id for task in claim.tasks)
                assert store.record(service_id, [succeeded(t) for t in claim.tasks]) == \
                    len(claim.tasks)
            elif not store.ids(TaskStatus.PENDING, "q", limit=1):
                return
        raise AssertionError(f"{service_id} still claiming after 30 s")
    except BaseException as exc:  # reported by the test's thread
        errors.append(exc)


def test_concurrency_holds_across_services_claiming_at_once(stores):
    limit, tasks = 3, 60
    first = stores()
    first.define(QueueSpec("q", concurrency=limit))
    ids = first.enqueue([new_task(f"t{i}") for i in range(tasks)])
    services = {"A": first, "B": stores()}
    for service_id, store in services.items():
        store.register_service(service_id, ["q"], 4)
    seen: list[int] = []
    claimed_ids: list[int] = []
    errors: list[BaseException] = []
    sampled: list[int] = []
    done, watching = threading.Event(), threading.Event()

    def watch() -> None:  # a third party reading the store meanwhile
        try:
            watcher = stores()
            running(watcher)  # its connection open (under load, that can take a while)...
            watching.set()  # ...before the claims start, so that it samples while they run
            while not done.is_set():
                sampled.append(running(watcher))
                time.sleep(0.001)
        except BaseException as exc:  # reported by the test's thread
            errors.append(exc)
            watching.set()

    threads = [threading.Thread(target=_claim_and_finish,
                                args=(store, service_id, seen, claimed_ids, errors))
               for service_id, store in services.items() for _ in range(2)]
    watcher = threading.Thread(target=watch)
    watcher.start()
    assert watching.wait(30), "the watcher could not read the store"
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(40)
    done.set()
    watcher.join(10)
    assert not errors, errors
    assert sorted(claimed_ids) == sorted(ids)  # each task claimed once
    assert seen and max(seen) <= limit
    assert sampled and max(sampled) <= limit
    records = [first.get(task_id) for task_id in ids]
    assert {r.status for r in records} == {TaskStatus.SUCCEEDED}
    assert {r.attempts for r in records} == {1}


def _pause_after_first_lock(store: SqlStore, both_locked: threading.Barrier) -> None:
    """Make the store's claims wait, after locking their first queue, until the other claim
    has locked its own first queue too (or 0.5 s went by: it could not)."""
    lock_queue = store._lock_queue
    locked: list[str] = []

    def lock_then_wait(cursor, queue: str) -> None:
        lock_queue(cursor, queue)
        locked.append(queue)
        if len(locked) == 1:
            try:
                both_locked.wait(0.5)
            except threading.BrokenBarrierError:
                pass
    store._lock_queue = lock_then_wait  # type: ignore[method-assign]


def test_claims_naming_queues_in_opposite_orders_do_not_deadlock(stores):
    a, b = stores(), stores()
    ids = a.enqueue([new_task(f"{queue}-{i}", queue=queue)
                     for queue in ("q1", "q2") for i in range(2)])
    both_locked = threading.Barrier(2)
    claimed: list[int] = []
    errors: list[BaseException] = []

    def claim(store: SqlStore, service_id: str, wants: dict[str, int]) -> None:
        _pause_after_first_lock(store, both_locked)
        try:
            claimed.extend(t.id for t in store.claim(service_id, wants).tasks)
        except BaseException as exc:
            errors.append(exc)

    # Had each locked its first-named queue, each would wait for the other's lock forever
    # (PostgreSQL fails one with a deadlock error); queues are locked in name order instead.
    threads = [threading.Thread(target=claim, args=(a, "A", {"q1": 1, "q2": 1})),
               threading.Thread(target=claim, args=(b, "B", {"q2": 1, "q1": 1}))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors, errors
    assert sorted(claimed) == ids


def test_worker_concurrency_limits_each_service(stores):
    a, b = stores(), stores()
    a.define(QueueSpec("q", worker_concurrency=2))
    a.enqueue([new_task(f"t{i}") for i in range(6)])
    a.register_service("A", ["q"], 8)
    b.register_service("B", ["q"], 8)
    held = a.claim("A", {"q": 8}).tasks
    assert len(held) == 2
    assert a.claim("A", {"q": 8}).tasks == []
    assert len(b.claim("B", {"q": 8}).tasks) == 2
    a.record("A", [succeeded(held[0])])
    assert len(a.claim("A", {"q": 8}).tasks) == 1


def test_key_concurrency_limits_running_tasks_per_key(stores):
    a, b = stores(), stores()
    a.define(QueueSpec("q", key_concurrency=1))
    a.enqueue([new_task("a1", key="a"), new_task("a2", key="a"), new_task("b1", key="b"),
               new_task("n1"), new_task("b2", key="b"), new_task("n2")])
    a.register_service("A", ["q"], 10)
    b.register_service("B", ["q"], 10)
    first = a.claim("A", {"q": 10})
    assert labels(first) == ["a1", "b1", "n1", "n2"]  # keyless tasks are not limited
    assert b.claim("B", {"q": 10}).tasks == []  # a and b each run once already
    a1 = next(t for t in first.tasks if t.label == "a1")
    assert a.record("A", [succeeded(a1)]) == 1
    assert labels(b.claim("B", {"q": 10})) == ["a2"]
    assert b.claim("B", {"q": 10}).tasks == []


def test_rate_limit_starts_at_most_l_per_period(stores):
    limit, per = 3, 0.3
    a, b = stores(), stores()
    a.define(QueueSpec("q", rate_limit=limit, rate_per=per))
    ids = a.enqueue([new_task(f"t{i}") for i in range(8)])
    a.register_service("A", ["q"], 8)
    b.register_service("B", ["q"], 8)

    first = a.claim("A", {"q": 8})
    assert len(first.tasks) == limit
    started = a.get(first.tasks[0].id).started_at
    # when the oldest start leaves the window (widened for the tasks' own start, a bit later)
    assert first.retry_at == pytest.approx(started + per + START_SKEW_MARGIN_S, abs=1e-6)
    a.record("A", [succeeded(t) for t in first.tasks])
    assert b.claim("B", {"q": 8}).tasks == []  # the window is full whoever asks

    turn = 0
    deadline = time.monotonic() + 10
    while a.ids(TaskStatus.PENDING, "q", limit=1):
        assert time.monotonic() < deadline, "the rate-limited queue never drained"
        store, me = ((a, "A"), (b, "B"))[turn % 2]
        turn += 1
        claim = store.claim(me, {"q": 8})
        assert len(claim.tasks) <= limit
        store.record(me, [succeeded(t) for t in claim.tasks])
        if a.ids(TaskStatus.PENDING, "q", limit=1):
            assert claim.retry_at is not None, "held back without saying until when"
            assert claim.retry_at <= time.time() + per + START_SKEW_MARGIN_S
            while time.time() < claim.retry_at:
                time.sleep(0.01)

    starts = sorted(a.get(task_id).started_at for task_id in ids)
    for start in starts:  # the window (start - per, start] holds at most `limit` starts
        assert sum(1 for s in starts if start - per < s <= start) <= limit
    rate = next(c for c in a.counts() if c.spec.name == "q")
    assert rate.starts_in_window is not None and rate.starts_in_window <= limit


def test_a_rate_window_is_widened_for_the_tasks_own_start(store, monkeypatch):
    # A start is counted at its claim and the task starts a few ms later in the service's
    # pool: with the bare window, the tasks' own clocks saw 6-7 starts within 2 s at 4 per 2 s.
    clock = [1000.0]
    monkeypatch.setattr(store_sql, "time", types.SimpleNamespace(time=lambda: clock[0]))
    store.define(QueueSpec("q", rate_limit=1, rate_per=1.0))
    store.enqueue([new_task(f"t{i}") for i in range(2)])
    store.register_service("A", ["q"], 2)
    assert len(store.claim("A", {"q": 2}).tasks) == 1
    clock[0] = 1000.0 + 1.0 + START_SKEW_MARGIN_S / 2  # a period on, but within the margin
    held = store.claim("A", {"q": 2})
    assert held.tasks == [] and held.retry_at == pytest.approx(1001.0 + START_SKEW_MARGIN_S)
    clock[0] = held.retry_at + 0.001
    assert len(store.claim("A", {"q": 2}).tasks) == 1


# ---- dedup and fencing -------------------------------------------------------------------------

def test_dedup_id_gives_the_same_task_until_it_finished(stores):
    a = stores()
    a.register_service("A", ["q"], 1)
    [first] = a.enqueue([new_task("x", dedup_id="job-1")])
    assert stores().enqueue([new_task("x", dedup_id="job-1")]) == [first]  # pending
    assert a.enqueue([new_task("x", dedup_id="job-1", queue="other")]) != [first]
    [claimed] = a.claim("A", {"q": 1}).tasks
    assert a.enqueue([new_task("x", dedup_id="job-1")]) == [first]  # running
    a.record("A", [succeeded(claimed)])
    [second] = a.enqueue([new_task("x", dedup_id="job-1")])  # finished: a new task
    assert second != first
    assert a.get(first).status is TaskStatus.SUCCEEDED
    assert a.get(second).status is TaskStatus.PENDING
    both = a.enqueue([new_task("y", dedup_id="job-2"), new_task("y", dedup_id="job-2")])
    assert both[0] == both[1]  # within one enqueue, too


def test_an_outcome_from_another_service_or_a_stale_attempt_is_dropped(store):
    [task_id] = store.enqueue([new_task("t")])
    store.register_service("A", ["q"], 1)
    [task] = store.claim("A", {"q": 1}).tasks
    assert task.attempt == 1
    assert store.record("B", [succeeded(task)]) == 0  # not B's
    stale = Finished(task.id, task.attempt + 1, b"r", None)
    assert store.record("A", [stale]) == 0  # not this attempt
    assert store.get(task_id).status is TaskStatus.RUNNING
    assert store.record("A", [succeeded(task, b"mine")]) == 1
    assert store.record("A", [succeeded(task, b"again")]) == 0  # recorded once
    record = store.get(task_id)
    assert (record.status, record.result) == (TaskStatus.SUCCEEDED, b"mine")


# ---- lost services -----------------------------------------------------------------------------

def reclaim(store: SqlStore, service_id: str) -> Callable[[], list]:
    """A service's loop step for wait_for: heartbeat (so that it stays alive), claim (which
    first puts back the tasks of services found dead)."""
    def step() -> list:
        assert store.heartbeat(service_id)
        return store.claim(service_id, {"q": 1}).tasks
    return step


def test_a_service_whose_heartbeat_stops_has_its_tasks_requeued(stores, monkeypatch):
    monkeypatch.setattr(store_sql, "LEASE_S", 0.2)
    a, b = stores(), stores()
    [task_id] = a.enqueue([new_task("t")])
    a.register_service("A", ["q"], 1)
    b.register_service("B", ["q"], 1)
    [lost] = a.claim("A", {"q": 1}).tasks
    assert a.heartbeat("A")  # A beats with the task in hand (so its loss counts), then
    # stops heartbeating (paused, partitioned); B's claims put the task back, then take it
    [again] = wait_for(reclaim(b, "B"), "B takes over the task of A")
    assert (again.id, again.attempt) == (task_id, 2)
    record = b.get(task_id)
    assert (record.status, record.service, record.lost) == (TaskStatus.RUNNING, "B", 1)
    assert [s.id for s in b.services()] == ["B"]
    assert a.heartbeat("A") is False  # A learns it was declared dead
    assert a.record("A", [succeeded(lost)]) == 0  # and what it finishes late is dropped
    assert b.record("B", [succeeded(again)]) == 1
    assert b.get(task_id).attempts == 2


def _dies_silently(service: SqlStore, watcher: SqlStore, task_id: int, what: str) -> None:
    """`service` stops beating without a word; wait until the watcher's claims have found it
    dead and put `task_id` back (or failed it), then close its connections."""
    wait_for(lambda: watcher.claim("watcher", {}).tasks == [] and
             watcher.get(task_id).status is not TaskStatus.RUNNING, what)
    service.close()


def test_a_task_whose_service_dies_max_losses_times_fails_with_service_lost(stores,
                                                                            monkeypatch):
    monkeypatch.setattr(store_sql, "LEASE_S", 0.1)
    watcher = stores()  # claims nothing, but each claim looks for dead services
    [task_id] = watcher.enqueue([new_task("t")])
    for loss in range(1, store_sql.MAX_LOSSES + 1):
        service = stores()
        service.register_service(f"S{loss}", ["q"], 1)
        [task] = service.claim(f"S{loss}", {"q": 1}).tasks
        assert (task.id, task.attempt) == (task_id, loss)
        assert service.heartbeat(f"S{loss}")  # it beat with the task in hand (a loss counts)
        _dies_silently(service, watcher, task_id, f"loss {loss} noticed")
    record = watcher.get(task_id)
    assert (record.status, record.attempts, record.lost) == (
        TaskStatus.FAILED, store_sql.MAX_LOSSES, store_sql.MAX_LOSSES)
    assert record.error is not None
    assert record.error.type_name == "procqueue.errors.ServiceLostError"
    module, _, name = record.error.type_name.rpartition(".")
    assert issubclass(getattr(importlib.import_module(module), name), TaskFailed)
    assert str(store_sql.MAX_LOSSES) in record.error.message


def test_tasks_a_dying_service_claimed_since_its_last_heartbeat_count_no_loss(stores,
                                                                              monkeypatch):
    """A service that dies before beating again after a claim (a crash-looping restart whose
    first claim took the put-back tasks) most likely never started them: no loss counts,
    so no task fails with ServiceLostError however often that happens."""
    monkeypatch.setattr(store_sql, "LEASE_S", 0.1)
    watcher = stores()
    [task_id] = watcher.enqueue([new_task("t")])
    for attempt in range(1, store_sql.MAX_LOSSES + 2):
        service = stores()
        service.register_service(f"S{attempt}", ["q"], 1)
        [task] = service.claim(f"S{attempt}", {"q": 1}).tasks
        assert (task.id, task.attempt) == (task_id, attempt)
        _dies_silently(service, watcher, task_id, f"the death of S{attempt} noticed")
    record = watcher.get(task_id)
    assert (record.status, record.attempts, record.lost) == (
        TaskStatus.PENDING, store_sql.MAX_LOSSES + 1, 0)


def test_a_dead_services_loss_is_charged_to_the_tasks_its_report_showed_running(stores,
                                                                                 monkeypatch):
    """A service reports its workers with each heartbeat: when it dies, only the tasks that
    were running in a worker count a loss; those queued in its pool had no part in it."""
    monkeypatch.setattr(store_sql, "LEASE_S", 0.1)
    watcher = stores()
    running_id, queued_id = watcher.enqueue([new_task("t"), new_task("u")])
    for loss in (1, 2):
        service = stores()
        service.register_service(f"S{loss}", ["q"], 2)
        claimed = {t.id for t in service.claim(f"S{loss}", {"q": 2}).tasks}
        assert claimed == {running_id, queued_id}
        assert service.heartbeat(f"S{loss}", [{"slot": 0, "pid": 1, "task": running_id},
                                              {"slot": 1, "pid": 2, "task": None}])
        _dies_silently(service, watcher, running_id, f"the death of S{loss} noticed")
        assert (watcher.get(running_id).lost, watcher.get(queued_id).lost) == (loss, 0)
    # a report with nothing running charges nothing, even for tasks claimed before the beat
    service = stores()
    service.register_service("S3", ["q"], 2)
    assert len(service.claim("S3", {"q": 2}).tasks) == 2
    assert service.heartbeat("S3", [{"slot": 0, "pid": 1, "task": None}])
    _dies_silently(service, watcher, running_id, "the death of S3 noticed")
    assert (watcher.get(running_id).lost, watcher.get(queued_id).lost) == (2, 0)


def _claim_and_vanish(target: str) -> None:
    """In a child: a service that claims a task, beats once, and dies without a word."""
    store = open_store(target)
    store.register_service("child", ["q"], 1)
    assert len(store.claim("child", {"q": 1}).tasks) == 1
    assert store.heartbeat("child")
    os._exit(0)


def test_a_dead_service_on_this_host_is_found_by_its_pid_before_its_lease_ends(
        stores, store_target, monkeypatch):
    monkeypatch.setattr(store_sql, "LOCAL_CHECK_AFTER_S", 0.05)
    store = stores()
    [task_id] = store.enqueue([new_task("t")])
    child = multiprocessing.get_context("fork").Process(target=_claim_and_vanish,
                                                        args=(store_target,))
    child.start()
    child.join(WAIT_S)
    assert child.exitcode == 0
    assert store.get(task_id).service == "child"
    store.register_service("me", ["q"], 1)
    # bounded well under LEASE_S (5 s): only the pid check can have found it
    [task] = wait_for(reclaim(store, "me"), "the dead child's task comes back",
                      timeout_s=store_sql.LEASE_S / 2)
    assert (task.id, task.attempt) == (task_id, 2)
    assert store.get(task_id).lost == 1


def _use_inherited_store(store: SqlStore) -> None:
    """In a forked child: use the parent's store object, close it, exit at once."""
    [task_id] = store.enqueue([new_task("from the child", queue="c")])
    store.register_service("child", ["c"], 1)
    assert [t.id for t in store.claim("child", {"c": 1}).tasks] == [task_id]
    store.deregister_service("child", release=[(task_id, 1)])
    store.close()
    os._exit(0)  # no clean-up: an enqueue is stored when it returns


def test_a_forked_child_uses_connections_of_its_own(store):
    [before] = store.enqueue([new_task("from the parent")])  # the parent's connection is open
    child = multiprocessing.get_context("fork").Process(target=_use_inherited_store,
                                                        args=(store,))
    child.start()
    child.join(WAIT_S)
    assert child.exitcode == 0
    # the parent's connection still works: the child neither used nor closed it
    ids = store.ids(TaskStatus.PENDING)
    assert ids[0] == before and len(ids) == 2
    child_task = store.get(ids[1])
    assert (child_task.label, child_task.attempts) == ("from the child", 0)
    assert store.services() == []


# ---- outcomes: crashes, deadlines ---------------------------------------------------------------

def test_a_crash_is_retried_per_retries_then_fails(store):
    store.define(QueueSpec("q", retries=2))
    [task_id, no_retry] = store.enqueue([new_task("t"), new_task("once", retries=0)])
    store.register_service("A", ["q"], 2)
    statuses = []
    for attempt in (1, 2, 3):
        claim = store.claim("A", {"q": 2})
        task = next(t for t in claim.tasks if t.id == task_id)
        assert task.attempt == attempt
        store.record("A", [crashed(t) for t in claim.tasks])
        statuses.append(store.get(task_id).status)
    assert statuses == [TaskStatus.PENDING, TaskStatus.PENDING, TaskStatus.FAILED]
    record = store.get(task_id)
    assert record.attempts == 3
    assert record.error.type_name == "procqueue.errors.WorkerCrashedError"
    assert store.get(no_retry).status is TaskStatus.FAILED  # its own retries=0
    assert store.get(no_retry).attempts == 1


def test_a_task_error_is_not_retried(store):
    store.define(QueueSpec("q", retries=3))
    [task_id] = store.enqueue([new_task("t")])
    store.register_service("A", ["q"], 1)
    [task] = store.claim("A", {"q": 1}).tasks
    store.record("A", [raised(task)])
    record = store.get(task_id)
    assert (record.status, record.attempts) == (TaskStatus.FAILED, 1)
    assert (record.error.type_name, record.error.message) == ("ValueError", "bad input")


def test_a_claim_past_the_stored_deadline_comes_back_expired(store):
    store.define(QueueSpec("q", retries=1))
    [task_id] = store.enqueue([new_task("t", timeout_s=0.001)])
    store.register_service("A", ["q"], 1)
    [task] = store.claim("A", {"q": 1}).tasks
    assert 0 < task.time_left_s <= 0.0011
    store.record("A", [crashed(task)])  # re-run: the deadline is kept from the first start
    deadline = store.get(task_id).started_at + 0.001
    wait_for(lambda: time.time() > deadline, "the deadline passes")
    claim = store.claim("A", {"q": 1})
    assert claim.tasks == []
    [expired] = claim.expired
    assert (expired.id, expired.attempt) == (task_id, 2) and expired.time_left_s <= 0
    assert store.record("A", [raised(expired, "procqueue.errors.TaskTimeoutError")]) == 1
    assert store.get(task_id).status is TaskStatus.FAILED


@pytest.mark.parametrize("put_back", ["released", "lost unstarted", "lost while running"])
def test_a_task_put_back_unrun_gives_back_the_deadline_its_claim_set(stores, monkeypatch,
                                                                      put_back):
    # Timeouts are start-to-completion: a task a service claimed and put back without running
    # it (Ctrl-C, SIGTERM: released; a death before it started: lost, uncounted) has not
    # started.  It kept the deadline of that claim and failed "passed its stored deadline"
    # without ever running.  One lost while running keeps it (README: a re-run keeps it).
    monkeypatch.setattr(store_sql, "LEASE_S", 0.1)
    watcher = stores()
    service = stores()
    [task_id] = watcher.enqueue([new_task("t", timeout_s=0.2)])
    service.register_service("A", ["q"], 1)
    [task] = service.claim("A", {"q": 1}).tasks
    if put_back == "released":
        service.release("A", [(task.id, task.attempt)])
    else:
        if put_back == "lost while running":
            assert service.heartbeat("A", workers=[{"pid": 1, "task": task_id}])
        _dies_silently(service, watcher, task_id, "the service's death noticed")
    wait_for(lambda: time.time() > watcher.get(task_id).started_at + 0.3, "0.3 s pass")
    watcher.register_service("B", ["q"], 1)
    claim = watcher.claim("B", {"q": 1})
    if put_back == "lost while running":
        assert [t.id for t in claim.expired] == [task_id] and claim.tasks == []
    else:
        [again] = claim.tasks
        assert again.id == task_id and claim.expired == []
        assert 0.15 < again.time_left_s <= 0.201  # its own, full timeout


# ---- cancel, retry, prune ------------------------------------------------------------------------

def test_cancel_takes_pending_and_running_tasks_only(store):
    ids = store.enqueue([new_task(f"t{i}") for i in range(3)])
    store.register_service("A", ["q"], 2)
    done, held = store.claim("A", {"q": 2}).tasks
    store.record("A", [succeeded(done)])
    pending = ids[2]
    assert store.cancel([pending, held.id, done.id]) == [pending, held.id]
    assert store.statuses(ids) == {done.id: TaskStatus.SUCCEEDED,
                                   held.id: TaskStatus.CANCELLED,
                                   pending: TaskStatus.CANCELLED}
    assert store.still_held("A", [held.id]) == set()  # the service sees it must drop it
    assert store.record("A", [succeeded(held)]) == 0  # and its late outcome is dropped
    assert store.claim("A", {"q": 2}).tasks == []
    assert store.get(held.id).finished_at is not None


@pytest.mark.parametrize("limit", [{"concurrency": 1}, {"worker_concurrency": 1},
                                   {"key_concurrency": 1}])
def test_a_task_cancelled_while_running_still_holds_its_place(store, limit):
    # The service kills a cancelled task's process only when it notices (a heartbeat), plus a
    # kill grace: until then the task still runs, and a place freed at the cancel let a
    # concurrency=1 queue run two tasks at once.
    store.define(QueueSpec("q", **limit))
    store.enqueue([new_task("cancelled", key="k"), new_task("next", key="k")])
    store.register_service("A", ["q"], 2)
    [task] = store.claim("A", {"q": 1}).tasks
    assert store.cancel([task.id]) == [task.id]
    assert store.claim("A", {"q": 2}).tasks == []
    store.release("A", [], ended=[task.id])  # the service saw its process end
    assert labels(store.claim("A", {"q": 2})) == ["next"]
    assert store.get(task.id).status is TaskStatus.CANCELLED


@pytest.mark.parametrize("ended_by", ["its outcome", "deregistering", "its service's death",
                                      "age"])
def test_a_task_cancelled_while_running_gives_its_place_back_once_its_run_ended(
        stores, monkeypatch, ended_by):
    store, other = stores(), stores()
    store.define(QueueSpec("q", concurrency=1))
    store.enqueue([new_task("cancelled"), new_task("next")])
    store.register_service("A", ["q"], 2)
    other.register_service("B", ["q"], 2)
    [task] = store.claim("A", {"q": 2}).tasks
    store.cancel([task.id])
    assert other.claim("B", {"q": 2}).tasks == []
    if ended_by == "its outcome":
        assert store.record("A", [succeeded(task)]) == 0  # dropped, but its process is done
    elif ended_by == "deregistering":
        store.deregister_service("A")
    elif ended_by == "its service's death":
        monkeypatch.setattr(store_sql, "LEASE_S", 0.2)
        wait_for(lambda: other.heartbeat("B") and other.claim("B", {}).tasks == [] and
                 "A" not in {s.id for s in other.services()}, "A found dead")
    else:  # a row cancelled while running by an earlier procqueue, which never clears it
        monkeypatch.setattr(store_sql, "CANCELLED_HOLD_S", 0.2)
        wait_for(lambda: time.time() > store.get(task.id).finished_at + 0.2, "time passes")
    assert labels(other.claim("B", {"q": 2})) == ["next"]


def test_a_retry_of_a_task_cancelled_while_running_waits_until_its_run_ended(stores):
    # Put back at once, it could start beside its dying copy (its own service would claim it
    # again while still killing the other): the retry waits for the service's word
    store, service_side = stores(), stores()
    store.define(QueueSpec("q", concurrency=1))
    [task_id] = store.enqueue([new_task("cancelled")])
    service_side.register_service("A", ["q"], 2)
    [task] = service_side.claim("A", {"q": 1}).tasks
    store.cancel([task_id])
    ended_at: list[float] = []

    def end_its_run() -> None:
        time.sleep(0.5)
        ended_at.append(time.monotonic())
        service_side.release("A", [], ended=[task.id])

    ender = threading.Thread(target=end_its_run)
    ender.start()
    try:
        assert store.retry([task_id]) == [task_id]
        retried_at = time.monotonic()
    finally:
        ender.join()
    assert ended_at and retried_at >= ended_at[0]
    assert store.get(task_id).status is TaskStatus.PENDING
    assert labels(service_side.claim("A", {"q": 1})) == ["cancelled"]


def test_retry_puts_back_failed_or_cancelled_tasks_with_fresh_attempts(store):
    ids = store.enqueue([new_task(f"t{i}") for i in range(4)])
    store.register_service("A", ["q"], 4)
    claim = store.claim("A", {"q": 3}).tasks
    store.record("A", [raised(claim[0]), succeeded(claim[1])])
    store.cancel([claim[2].id])
    store.release("A", [], ended=[claim[2].id])  # its service saw its process end
    failed, ok, cancelled, pending = ids
    assert store.retry(ids) == [failed, cancelled]
    for task_id in (failed, cancelled):
        record = store.get(task_id)
        assert (record.status, record.attempts, record.error, record.finished_at) == (
            TaskStatus.PENDING, 0, None, None)
    assert store.get(ok).status is TaskStatus.SUCCEEDED
    again = store.claim("A", {"q": 4}).tasks
    assert sorted((t.id, t.attempt) for t in again) == [(failed, 1), (cancelled, 1),
                                                         (pending, 1)]


def test_prune_deletes_finished_tasks_older_than_the_age(store):
    ids = store.enqueue([new_task(f"t{i}") for i in range(3)])
    store.register_service("A", ["q"], 2)
    tasks = store.claim("A", {"q": 2}).tasks
    store.record("A", [succeeded(tasks[0]), raised(tasks[1])])
    assert store.prune(3600) == 0
    last = max(store.get(t.id).finished_at for t in tasks)
    wait_for(lambda: time.time() > last, "time passes")
    assert store.prune(0) == 2
    assert store.get(ids[0]) is None and store.get(ids[1]) is None
    assert store.get(ids[2]).status is TaskStatus.PENDING


# ---- what the store reports ----------------------------------------------------------------------

def test_counts_per_queue_and_status(store):
    store.define(QueueSpec("limited", rate_limit=5, rate_per=60))
    store.enqueue([new_task(f"q{i}") for i in range(4)] +
                  [new_task(f"l{i}", queue="limited") for i in range(2)])
    store.register_service("A", ["q", "limited"], 10)
    claim = store.claim("A", {"q": 3, "limited": 1})
    q_tasks = [t for t in claim.tasks if t.queue == "q"]
    store.record("A", [succeeded(q_tasks[0]), raised(q_tasks[1])])
    counts = {c.spec.name: c for c in store.counts()}
    q, limited = counts["q"], counts["limited"]
    assert (q.pending, q.running, q.succeeded, q.failed, q.cancelled) == (1, 1, 1, 1, 0)
    assert q.starts_in_window is None  # not rate-limited
    assert (limited.pending, limited.running, limited.starts_in_window) == (1, 1, 1)
    assert limited.spec == QueueSpec("limited", rate_limit=5, rate_per=60)
    assert store.ids(TaskStatus.PENDING, "q") == [t for t in store.ids(queue="q")
                                                  if store.get(t).status is TaskStatus.PENDING]
    assert len(store.ids(limit=2)) == 2


def test_define_replaces_a_queue_s_limits(store):
    store.define(QueueSpec("q", concurrency=1, retries=2))
    store.define(QueueSpec("q", concurrency=3))
    assert store.queue_specs()["q"] == QueueSpec("q", concurrency=3)


def test_services_lists_each_service_with_its_running_tasks(stores):
    a, b = stores(), stores()
    a.enqueue([new_task(f"t{i}") for i in range(3)])
    a.register_service("A", ["q", "r"], 4)
    b.register_service("B", [], 2)
    a.claim("A", {"q": 2})
    listed = {s.id: s for s in b.services()}
    assert set(listed) == {"A", "B"}
    assert (listed["A"].queues, listed["A"].jobs, listed["A"].running) == ("q,r", 4, 2)
    assert (listed["B"].queues, listed["B"].running, listed["B"].pid) == ("", 0, os.getpid())
    b.deregister_service("B")
    assert [s.id for s in a.services()] == ["A"]


def test_deregister_releases_unstarted_tasks_and_puts_back_the_rest(store):
    ids = store.enqueue([new_task(f"t{i}") for i in range(3)])
    store.register_service("A", ["q"], 3)
    held = store.claim("A", {"q": 3}).tasks
    unstarted, wrong_attempt, unfinished = held
    store.deregister_service("A", release=[(unstarted.id, 1), (wrong_attempt.id, 7)])
    assert store.services() == []
    record = store.get(unstarted.id)
    assert (record.status, record.attempts, record.lost) == (TaskStatus.PENDING, 0, 0)
    for task in (wrong_attempt, unfinished):  # it ran them: back as lost
        record = store.get(task.id)
        assert (record.status, record.attempts, record.lost) == (TaskStatus.PENDING, 1, 1)
    store.register_service("B", ["q"], 3)
    assert sorted(t.id for t in store.claim("B", {"q": 3}).tasks) == ids


# ---- waking a service ----------------------------------------------------------------------------

def test_an_enqueue_wakes_a_waiting_service_within_a_second(stores):
    service, client = stores(), stores()
    waker = service.waker("A")
    try:
        assert select.select([waker], [], [], 0)[0] == []
        client.enqueue([new_task("t")])
        assert select.select([waker], [], [], 1.0)[0] == [waker]
        waker.drain()
        assert select.select([waker], [], [], 0)[0] == []  # drained: waits again
        client.retry(client.cancel(client.ids()))  # a retry wakes it too
        assert select.select([waker], [], [], 1.0)[0] == [waker]
    finally:
        waker.close()


# ---- SQLite: which files are refused -------------------------------------------------------------

@pytest.fixture
def db_path(tmp_path) -> str:
    return str(tmp_path / "queue.db")


def test_sqlite_a_new_store_file_is_private(db_path):
    open_store(db_path).close()
    assert stat.S_IMODE(os.stat(db_path).st_mode) == 0o600


def private_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def test_sqlite_refuses_a_file_that_is_not_sqlite(db_path):
    private_file(db_path, b"a text file, not a database\n" * 100)
    with pytest.raises(StoreFormatError) as exc:
        open_store(db_path)
    assert "not a procqueue store" in one_line(exc)


def test_sqlite_refuses_the_file_of_another_program(db_path):
    private_file(db_path, b"")
    with sqlite3.connect(db_path) as db:
        db.execute("CREATE TABLE songs (title TEXT)")
    db.close()
    with pytest.raises(StoreFormatError) as exc:
        open_store(db_path)
    assert "not a procqueue queue" in one_line(exc) and "songs" in str(exc.value)


def test_sqlite_refuses_a_journal(db_path):
    open_store_file(db_path, kind="journal", version=1, tables={"runs"},
                    schema="CREATE TABLE IF NOT EXISTS runs (id INTEGER)").close()
    with pytest.raises(StoreFormatError) as exc:
        open_store(db_path)
    assert "is a procqueue journal, not a queue" in one_line(exc)


def test_sqlite_refuses_a_newer_format(db_path):
    open_store(db_path).close()
    with sqlite3.connect(db_path) as db:
        db.execute("UPDATE meta SET value = ? WHERE name = 'schema_version'",
                   (str(store_sql.SCHEMA_VERSION + 1),))
    db.close()
    with pytest.raises(StoreFormatError) as exc:
        open_store(db_path)
    assert "upgrade procqueue" in one_line(exc)


@pytest.mark.parametrize("mode", [0o620, 0o602])
def test_sqlite_refuses_a_file_others_can_write(db_path, mode):
    open_store(db_path).close()
    os.chmod(db_path, mode)
    with pytest.raises(StoreUnsafeError) as exc:
        open_store(db_path)
    assert "writable by other users" in one_line(exc)


# ---- PostgreSQL: which databases are refused, creating the schema at once -----------------------

def run_sql(url: str, *statements: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def test_postgres_refuses_a_newer_format(postgres_url):
    open_store(postgres_url).close()
    run_sql(postgres_url, f"UPDATE procqueue.meta SET value = '{store_sql.SCHEMA_VERSION + 1}' "
                          f"WHERE name = 'schema_version'")
    with pytest.raises(StoreFormatError) as exc:
        open_store(postgres_url)
    assert "upgrade procqueue" in one_line(exc)


def test_postgres_refuses_a_procqueue_schema_of_another_program(postgres_url):
    run_sql(postgres_url, "CREATE SCHEMA procqueue", "CREATE TABLE procqueue.songs (t TEXT)")
    with pytest.raises(StoreFormatError) as exc:
        open_store(postgres_url)
    assert "not a procqueue store" in one_line(exc) and "songs" in str(exc.value)


def test_postgres_uses_an_empty_procqueue_schema_made_for_it(postgres_url):
    run_sql(postgres_url, "CREATE SCHEMA procqueue")
    with open_store(postgres_url) as store:
        assert store.enqueue([new_task("t")]) == [1]


def test_postgres_stores_created_at_once_all_open(postgres_url):
    opened: list[SqlStore] = []
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def open_one() -> None:
        start.wait(10)
        try:
            opened.append(open_store(postgres_url))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    try:
        assert not errors, errors
        assert len(opened) == 4
        assert opened[0].enqueue([new_task("t")]) == [1]
        assert opened[3].get(1).label == "t"
    finally:
        for store in opened:
            store.close()


def test_postgres_an_unreachable_server_is_one_line_without_the_password(tmp_path):
    url = f"postgresql://someone:s3cret@/nodb?host={tmp_path}"  # no server's socket there
    with pytest.raises(StoreError) as exc:
        open_store(url)
    text = one_line(exc)
    assert "s3cret" not in text and "cannot connect" in text


def test_postgres_a_waker_whose_connection_dropped_listens_again(postgres_url):
    with open_store(postgres_url) as store:
        waker = store.waker("A")
        try:
            run_sql(postgres_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                  "WHERE query = 'LISTEN procqueue_wake'")
            assert select.select([waker], [], [], 1.0)[0] == [waker]  # the server hung up
            waker.drain()
            assert select.select([waker], [], [], 0)[0] == []  # not readable for ever
            store.enqueue([new_task("t")])
            assert select.select([waker], [], [], 1.0)[0] == [waker]
        finally:
            waker.close()


def test_postgres_a_store_whose_session_was_ended_opens_a_new_one(postgres_url):
    with open_store(postgres_url) as store:
        [task_id] = store.enqueue([new_task("t")])
        run_sql(postgres_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE application_name = 'procqueue'")
        with pytest.raises(psycopg.OperationalError):
            store.get(task_id)  # the call that finds the session gone fails...
        assert store.get(task_id).label == "t"  # ...and the next one has a new session
