"""Pool(trace=...) writes the Chrome trace-event format: valid JSON, one complete event per
task attempt, times consistent with the run."""
from __future__ import annotations

import json
import os
import time

import pytest

from procqueue import Pool, load_trace


def work(args):
    x, marker = args
    if x == 3:
        raise ValueError("three")
    if x == 5 and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(9)
    time.sleep(0.01)
    return x


@pytest.mark.timeout(60)
def test_one_complete_event_per_attempt(tmp_path):
    path = tmp_path / "run.json"
    marker = str(tmp_path / "crashed")
    started = time.time()
    with Pool(2, trace=str(path), retries=1) as pool:
        pool.map(work, [(x, marker) for x in range(8)], return_exceptions=True)
    finished = time.time()
    document = json.loads(path.read_text())
    complete = [e for e in document["traceEvents"] if e["ph"] == "X"]
    assert len(complete) == 9  # 8 inputs + the crashed attempt of input 5
    by_index = {}
    for event in complete:
        by_index.setdefault(event["args"]["index"], []).append(event)
        assert event["dur"] >= 0
        assert started - 1 <= event["ts"] / 1e6 <= finished + 1
        assert event["tid"] in (0, 1)
    assert sorted(by_index) == list(range(8))
    assert [e["args"]["outcome"] for e in by_index[5]] == ["crash", "ok"]
    assert [e["args"]["attempt"] for e in by_index[5]] == [1, 2]
    assert by_index[3][0]["args"]["outcome"] == "error"
    assert "three" in by_index[3][0]["args"]["error"]
    names = {e["args"]["name"] for e in document["traceEvents"] if e["name"] == "thread_name"}
    assert names == {"worker 0", "worker 1"}
    assert len(load_trace(path)) == 9


@pytest.mark.timeout(60)
def test_trace_is_written_after_close_and_join(tmp_path):
    path = tmp_path / "run.json"
    pool = Pool(1, trace=str(path))
    pool.map(work, [(0, ""), (1, "")])
    pool.close()
    pool.join()
    assert len(load_trace(path)) == 2
