"""The Dask backend's task model is the local pool's (issue #20): an item is a procqueue Task
and a call a Job, so Task.move's state machine, and its guarantee of exactly one terminal
state per task, hold on the Dask side too.

The driver is stepped by hand in this thread against a stand-in client (no cluster, no
distributed): every state an item passes through can be read between two steps.
"""
from __future__ import annotations

import pickle
import threading
import time
from typing import Any

import pytest

from procqueue.backends.dask.driver import _Driver
from procqueue.backends.dask.items import DaskJob, _ChunkDone, _make_item, _Submit
from procqueue.backends.dask.worker_side import ChunkReport
from procqueue.chunking import ChunkSizer
from procqueue.protocol import CallKind, capture_exception
from procqueue.tasks import IllegalTransition, Job, OutcomeSink, Task, TaskState


class _Recorder(OutcomeSink):
    def __init__(self) -> None:
        self.outcomes: list[tuple[int, bool, Any]] = []

    def deliver(self, task: Task, ok: bool, value: Any) -> None:
        self.outcomes.append((task.index, ok, value))


class _Future:
    """What the driver reads of a Dask future; the test sets how it ended."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.status = "pending"
        self.report: ChunkReport | None = None

    def result(self) -> ChunkReport | None:
        return self.report

    def add_done_callback(self, callback: Any) -> None:
        pass  # the test posts the chunk's end itself, when it chooses

    def release(self) -> None:
        pass


class _Client:
    def __init__(self) -> None:
        self.futures: list[_Future] = []

    def nthreads(self) -> dict[str, int]:
        return {"tcp://worker": 1}

    def submit(self, *args: Any, key: str, pure: bool) -> _Future:
        self.futures.append(_Future(key))
        return self.futures[-1]


def _driver_and_job() -> tuple[_Driver, _Client, DaskJob, _Recorder]:
    client = _Client()
    driver = _Driver(client, "test", retries=0, retry_on=(), allowed_failures=0)
    sink = _Recorder()
    job = DaskJob(1, 0, b"", CallKind.ONE, sink, timeout_s=None, semaphores=(),
                  sizer=ChunkSizer(1, 10))
    return driver, client, job, sink


def _dispatch(driver: _Driver) -> None:
    driver.chunks.fill(drop=lambda item: pytest.fail(f"{item} dropped"))


def _row(ok: bool, value: Any) -> tuple[bool, bytes, float, float]:
    data = pickle.dumps(value) if ok else capture_exception(value)
    return ok, data, 0.01, time.time()


def test_a_dask_item_is_a_procqueue_task_that_reaches_exactly_one_terminal_state() -> None:
    driver, client, job, sink = _driver_and_job()
    items = [_make_item(job, i, value) for i, value in enumerate([2, threading.Lock(), 3])]
    assert isinstance(job, Job) and all(isinstance(item, Task) for item in items)
    driver._apply(_Submit(job, items))
    # an input that cannot be pickled fails at once, without being dispatched
    assert [item.state for item in items] == [TaskState.QUEUED, TaskState.FAILED,
                                              TaskState.QUEUED]
    _dispatch(driver)
    assert [items[0].state, items[2].state] == [TaskState.DISPATCHED] * 2
    client.futures[0].status = "lost"  # the worker left: its items go back to the queue
    driver._apply(_ChunkDone(client.futures[0]))
    assert [items[0].state, items[2].state] == [TaskState.QUEUED] * 2
    _dispatch(driver)
    second = client.futures[1]
    second.status = "finished"
    second.report = ChunkReport(123, "tcp://worker", 1, [_row(True, 4), _row(False, KeyError(3))])
    driver._apply(_ChunkDone(second))
    assert [item.state for item in items] == [TaskState.DONE, TaskState.FAILED,
                                              TaskState.FAILED]
    assert sorted(index for index, _, _ in sink.outcomes) == [0, 1, 2]
    assert job.finished and not driver.calls
    for item in items:
        driver._finish(item, True, "again")  # a second outcome is never delivered
        for state in TaskState:
            with pytest.raises(IllegalTransition):
                item.move(state)
    assert len(sink.outcomes) == 3


def test_the_driver_cannot_deliver_a_result_to_an_item_never_dispatched() -> None:
    driver, _, job, sink = _driver_and_job()
    item = _make_item(job, 0, 1)
    driver._apply(_Submit(job, [item]))
    with pytest.raises(IllegalTransition):
        driver._finish(item, True, 1)  # QUEUED -> DONE: not an edge of the state machine
    assert item.state is TaskState.QUEUED and sink.outcomes == []
