"""The store's reads for people (TaskQueue.records, throughput, busy_keys), on both stores:
pages that cover every task once, filters, and a dashboard that stays responsive with
100,000 tasks in the store."""

from __future__ import annotations

import concurrent.futures
import json
import time
import urllib.request
from pathlib import Path

import pytest

from procqueue import Dashboard, Pool, TaskQueue, TaskStatus
from procqueue.dashboard.store_view import StoreView

pytestmark = pytest.mark.timeout(120)

TASKS = str(Path(__file__).with_name("queue_tasks.py"))


@pytest.fixture
def tq(store_target):
    with TaskQueue(store_target) as queue:
        yield queue


def set_status(tq, task_id, status, finished_at=None, error=("ValueError", "bad")):
    """Put a task in a state as a service would leave it (the claim/record path is tested
    elsewhere; here only what the reads return matters)."""
    conn = tq.store._connection()
    cur = conn.cursor()
    sql = tq.store._sql("UPDATE tasks SET status = ?, finished_at = ?, error_type = ?, "
                        "error_message = ?, error_traceback = ? WHERE id = ?")
    failed = status == "failed"
    cur.execute(sql, (status, finished_at, error[0] if failed else None,
                      error[1] if failed else None, "Traceback ..." if failed else None,
                      task_id))
    tq.store._end_read(conn)


def test_pages_cover_every_task_once_newest_first(tq):
    ids = [h.id for h in tq.enqueue_many(f"{TASKS}:square", range(23))]
    seen, before = [], None
    while True:
        page = tq.records(before=before, limit=10)
        seen += [r.id for r in page]
        if len(page) < 10:
            break
        before = page[-1].id
    assert seen == sorted(ids, reverse=True)
    assert tq.records(limit=3)[0].label == "22"


def test_records_filter_by_status_queue_and_text_in_any_case(tq):
    a = tq.enqueue_many(f"{TASKS}:square", ["alpha", "beta"], queue="q1")
    b = tq.enqueue_many(f"{TASKS}:square", ["gamma_1", "100%"], queue="q2")
    set_status(tq, a[1].id, "failed", time.time(), ("ValueError", "Disk FULL"))
    assert [r.id for r in tq.records(status="failed")] == [a[1].id]
    assert [r.id for r in tq.records(queue="q2")] == [b[1].id, b[0].id]
    assert [r.id for r in tq.records(search="disk full")] == [a[1].id]  # the error message
    assert [r.id for r in tq.records(search="ALPHA")] == [a[0].id]  # the input
    assert [r.id for r in tq.records(search="a_1")] == [b[0].id]  # _ is no wildcard
    assert [r.id for r in tq.records(search="0%")] == [b[1].id]  # nor %
    assert [r.id for r in tq.records(search="queue_tasks.py:square", queue="q1")] == [
        a[1].id, a[0].id]  # the function
    page = tq.records(status=TaskStatus.FAILED)
    assert page[0].error is not None and page[0].error.message == "Disk FULL"
    assert page[0].error.traceback == "" and page[0].result is None  # left out of pages
    assert tq.handle(a[1].id).record().error.traceback == "Traceback ..."
    with pytest.raises(ValueError):
        tq.records(limit=0)


def test_throughput_counts_ended_tasks_per_bucket(tq):
    ids = [h.id for h in tq.enqueue_many(f"{TASKS}:square", range(6))]
    base = 1_000_000_000.0  # a bucket edge for 10 s buckets
    for task_id, (status, at) in zip(ids, [("succeeded", base + 1), ("succeeded", base + 9.9),
                                           ("failed", base + 10.0), ("succeeded", base + 25),
                                           ("cancelled", base + 26), ("succeeded", base - 1)]):
        set_status(tq, task_id, status, at)
    assert tq.throughput(base, 10) == [(base, 2, 0), (base + 10, 0, 1), (base + 20, 1, 0)]
    with pytest.raises(ValueError):
        tq.throughput(base, 0)


def test_busy_keys_are_the_keys_with_most_running_tasks(tq):
    handles = tq.enqueue_many(f"{TASKS}:square", ["k1", "k1", "k2", "k3"], queue="q",
                              key=lambda item: item)
    for h in handles[:3]:
        set_status(tq, h.id, "running")
    assert tq.busy_keys("q") == [("k1", 2), ("k2", 1)]
    assert tq.busy_keys("q", limit=1) == [("k1", 2)]
    assert tq.busy_keys("other") == []


def _get(url: str) -> tuple[float, dict]:
    started = time.monotonic()
    with urllib.request.urlopen(url, timeout=60) as response:
        body = json.loads(response.read())
    return time.monotonic() - started, body


@pytest.mark.timeout(300)
def test_the_dashboard_stays_responsive_with_100000_tasks(tmp_path):
    with TaskQueue(tmp_path / "big.db") as tq:
        tq.enqueue_many(f"{TASKS}:square", range(100_000))
        for task_id in (1, 50_000, 99_999):
            set_status(tq, task_id, "failed", time.time())
        with Dashboard.for_store(tq) as dash:
            base, token = f"http://127.0.0.1:{dash.port}", f"token={dash.token}"
            took, page = _get(f"{base}/api/tasks?{token}")
            assert len(page["tasks"]) == 50 and page["tasks"][0]["id"] == 100_000
            # a deep page costs what the first does (keyset paging, no OFFSET)
            took_deep, deep = _get(f"{base}/api/tasks?{token}&before=200")
            assert [t["id"] for t in deep["tasks"]] == list(range(199, 149, -1))
            took_failed, failed = _get(f"{base}/api/tasks?{token}&status=failed")
            assert [t["id"] for t in failed["tasks"]] == [99_999, 50_000, 1]
            took_snapshot = time.monotonic()
            snapshot = dash.source.snapshot()
            took_snapshot = time.monotonic() - took_snapshot
            assert snapshot["queues"][0]["pending"] == 99_997
    # generous bounds (a loaded CI machine): what matters is that nothing reads every row
    # into Python; the snapshot's aggregates scan in SQL and pace the sampler (broadcast.py)
    assert max(took, took_deep, took_failed) < 5, (took, took_deep, took_failed)
    assert took_snapshot < 10, took_snapshot


def test_the_store_timeline_draws_each_outcome_in_its_workers_row(tq):
    ok = tq.enqueue(f"{TASKS}:square", 3)
    failed = tq.enqueue(f"{TASKS}:fail", 4)
    crashed = tq.enqueue(f"{TASKS}:crash", 5)
    timed_out = tq.enqueue(f"{TASKS}:sleep_forever", 6, timeout=0.5)
    with Pool(2, retries=0) as pool:
        pool.serve(tq, until_idle=True)
    view = StoreView(tq)
    try:
        timeline = view.snapshot()["timeline"]
    finally:
        view.close()
    outcomes = {int(e[4].split()[0][1:]): e[3] for e in timeline["events"]}
    assert outcomes == {ok.id: "ok", failed.id: "error", crashed.id: "crash",
                        timed_out.id: "timeout"}
    pids = {e[0] for e in timeline["events"]}
    assert set(timeline["slots"]) == pids  # a row per worker process that ran one
    assert all(timeline["labels"][str(pid)] == f"pid {pid}" for pid in pids)


def test_a_store_that_cannot_be_read_is_said_not_fatal(tmp_path):
    tq = TaskQueue(tmp_path / "jobs.db")
    tq.enqueue_many(f"{TASKS}:square", range(3))
    with Dashboard.for_store(tq) as dash:
        base, token = f"http://127.0.0.1:{dash.port}", f"token={dash.token}"
        assert len(_get(f"{base}/api/tasks?{token}")[1]["tasks"]) == 3
        tq.close()  # as a store that went away
        with pytest.raises(urllib.error.HTTPError) as failed:
            _get(f"{base}/api/tasks?{token}")
        assert failed.value.code == 503 and b"closed" in failed.value.read()
        with urllib.request.urlopen(f"{base}/events?{token}", timeout=30) as stream:
            assert stream.readline().startswith(b"retry:")
            stream.readline()
            data = json.loads(stream.readline().removeprefix(b"data: "))
        assert "closed" in data["error"]  # the page shows it in a banner, and keeps trying
        with urllib.request.urlopen(f"{base}/?{token}", timeout=30) as page:
            assert page.status == 200  # the page itself is still served


def test_the_page_goes_on_while_a_retry_waits_for_a_cancelled_tasks_service(tq):
    # A retry of a task cancelled while running waits until its service has seen the process
    # end: on the view's one reader thread, every page froze meanwhile (up to 10 s)
    task = tq.enqueue(f"{TASKS}:square", 3)
    tq.store.register_service("S", ["default"], 1)
    [claimed] = tq.store.claim("S", {"default": 1}).tasks
    assert tq.cancel(task.id) == [task.id]  # still held by "S", which has not let go
    view = StoreView(tq)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as clicks:
            retried = clicks.submit(view.act, "retry", [task.id])
            time.sleep(0.2)  # the retry waits for "S"
            started = time.monotonic()
            assert view.snapshot()["kind"] == "store"
            assert time.monotonic() - started < 2.0 and not retried.done()
            tq.store.release("S", [], ended=[claimed.id])  # the service saw its process end
            assert retried.result(timeout=20) == [task.id]
    finally:
        view.close()
    assert tq.handle(task.id).status() is TaskStatus.PENDING
