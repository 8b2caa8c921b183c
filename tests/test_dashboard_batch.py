"""The batch dashboard (`procqueue map ... --dashboard`, Dashboard.for_batch): per worker its
pid, running task and for how long, RSS and restarts; the timeline of recent attempts; the
failures; figures that agree with the pool's own; bounded memory however long the batch."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from procqueue import Dashboard, Pool, TaskEvent, utilisation
from procqueue.dashboard.batch_view import (FAILURES_KEPT, THROUGHPUT_BUCKET_S, THROUGHPUT_WINDOW_S,
                                           TIMELINE_EVENTS, BatchView)

pytestmark = pytest.mark.timeout(180)

BATCH = '''
import os
import time

def process(x):
    x = int(x)
    time.sleep(0.3)
    if x % 10 == 3:
        raise ValueError(f"no good: {x}")
    return x
'''


def nap(x):
    time.sleep(0.2)
    if x == 5:
        raise KeyError(x)
    return x


def test_pool_stats_name_each_workers_running_input_and_how_long():
    with Pool(2) as pool:
        result = pool.map_async(time.sleep, [0.6, 0.6])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            workers = pool.stats().workers
            if all(w.task is not None for w in workers):
                break
            time.sleep(0.02)
        assert sorted(w.task for w in workers) == ["0.6", "0.6"]
        assert all(0 <= w.task_s < 10 for w in workers)
        result.get(timeout=10)
        assert all(w.task is None and w.task_s is None for w in pool.stats().workers)


def test_the_batch_page_agrees_with_the_pool_and_refuses_actions():
    events: list[TaskEvent] = []
    dash = Dashboard.for_batch(total=12, title="naps")

    def both(event: TaskEvent) -> None:
        events.append(event)
        dash.on_event(event)

    with Pool(2, on_event=both) as pool, dash.watching(pool):
        pool.map(nap, range(12), return_exceptions=True)
        snapshot = dash.source.snapshot()
        base = f"http://127.0.0.1:{dash.port}"
        request = urllib.request.Request(f"{base}/api/retry?token={dash.token}", b'{"ids":[1]}',
                                         {"Origin": base}, method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 404  # a batch has no actions
    batch = snapshot["batch"]
    assert (batch["done"], batch["total"], batch["failed"], batch["workers"]) == (12, 12, 1, 2)
    assert batch["efficiency"] == pytest.approx(utilisation(events).efficiency)
    assert [f["error"] for f in snapshot["failures"]] == ["KeyError: 5"]
    assert len(snapshot["timeline"]["events"]) == 12 and snapshot["timeline"]["slots"] == [0, 1]
    assert sum(ok + failed for _, ok, failed in snapshot["throughput"]["series"]) == 12
    assert {w["pid"] for w in snapshot["workers"]} == {e.pid for e in events}


def test_a_long_batch_keeps_bounded_buffers():
    view = BatchView(total=None)
    t0 = time.time() - 3600
    for i in range(20_000):  # an hour of attempts, 1 in 10 failing
        start = t0 + i * 0.18
        view.on_event(TaskEvent(1, i, str(i), i % 4, 100 + i % 4, 1, start, start + 0.17,
                                "error" if i % 10 == 0 else "ok",
                                "ValueError: x" if i % 10 == 0 else None))
    snapshot = view.snapshot()
    assert len(view._recent) == TIMELINE_EVENTS and len(view._failures) == FAILURES_KEPT
    assert len(snapshot["throughput"]["series"]) <= THROUGHPUT_WINDOW_S / THROUGHPUT_BUCKET_S + 1
    assert len(snapshot["failures"]) == FAILURES_KEPT
    assert snapshot["failures"][0]["input"] == "19990"  # newest first


def test_map_dashboard_shows_workers_their_tasks_and_the_timeline_live(tmp_path: Path, browser):
    (tmp_path / "batch.py").write_text(BATCH)
    run = subprocess.Popen(
        [sys.executable, "-c", "from procqueue.cli import main; main()", "map", "batch.py",
         "-j", "2", "--dashboard", "-q", ":::", *map(str, range(80))],  # 80 x 0.3 s: ~12 s,
        # four updates of the page (every 3 s)
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert run.stderr is not None
        line = ""
        for line in run.stderr:
            if "?token=" in line:
                break
        url = line.strip()
        assert url.startswith("http://127.0.0.1:"), line
        page = browser.open(url)
        # each worker row: a pid, the input it runs now and for how long, its memory
        rows = page.wait_for(
            "(() => { const rows = [...document.querySelectorAll('#workers tbody tr')]"
            ".map(r => [...r.cells].map(c => c.textContent));"
            " return rows.length === 2 && rows.every(r => /^'\\d+'$/.test(r[2])) && rows; })()")
        for row in rows:
            assert row[0].startswith("worker ") and int(row[1]) > 0
            assert row[3].endswith("ms") or row[3].endswith(" s")
            assert row[5].endswith("MiB") and row[7] == "0"
        bars = "+(document.querySelector('#timeline canvas')?.dataset.bars ?? 0)"
        first = page.wait_for(bars)
        assert page.wait_for(f"{bars} > {first}")  # the timeline grows while the batch runs
        # pointing at a failed attempt's bar tells what it was (bars move as time passes: a
        # redraw between finding the bar and pointing at it is tried again)
        tip = None
        for _ in range(20):
            point = page.wait_for(
                "(() => { const c = document.querySelector('#timeline canvas');"
                " c.scrollIntoView({block: 'center'});"
                " const b = (c.bars || []).find(b => b.outcome === 'error'); if (!b) return null;"
                " const r = c.getBoundingClientRect();"
                " return [r.left + b.x + Math.min(b.w, 4) / 2, r.top + b.y + b.h / 2]; })()")
            page.hover(*point)
            tip = page.evaluate("(() => { const t = document.querySelector('#timeline .tip');"
                                " return !t.hidden && t.textContent; })()")
            if tip:
                break
            page.hover(0, 0)
        assert tip and "ValueError: no good:" in tip and "attempt 1, error" in tip
        failures = page.wait_for("[...document.querySelectorAll('#failures tbody "
                                 "tr[data-outcome]')].map(r => r.cells[4].textContent)")
        assert "ValueError: no good: 3" in failures  # input 3 failed first: still listed
        done = page.wait_for("document.querySelector('[data-total=\"done\"] b').textContent")
        assert done.endswith("/ 80") and int(done.split("/")[0]) < 80
        worker_pids = {int(p) for p in page.evaluate(
            "[...document.querySelectorAll('#workers tbody tr td:nth-child(2)')]"
            ".map(c => c.textContent)")}
        out, _ = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert run.returncode == 1  # 8 inputs failed
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) == 80 and {r["worker"] for r in records} == worker_pids
