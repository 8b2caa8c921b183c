"""Caller threads step aside while a long turn of the supervisor runs (inbox.SupervisorTurn):
they wait for its end, not for a turn younger than its patience, never in the supervisor's own
thread, and at most once per turn.  Each case drives a turn from a thread standing in for the
supervisor, and would hang (and fail on its timeout) or record the wrong order if the rule
were broken."""
from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from procqueue import Pool, inbox
from procqueue.inbox import SupervisorTurn

pytestmark = pytest.mark.timeout(20)


def nap_then(x: int) -> int:
    time.sleep(0.3)  # long enough that the callback is added before the result comes
    return x


class CountingLock:
    """A Lock that counts the acquires of each thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.acquires: dict[int, int] = {}

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        ident = threading.get_ident()
        self.acquires[ident] = self.acquires.get(ident, 0) + 1
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()


class SupervisorStandIn:
    """A thread that begins a turn, then ends it when told (`finish`), noting "end" first."""

    def __init__(self, turn: SupervisorTurn, order: list[str]) -> None:
        self.turn, self.order = turn, order
        self.started = threading.Event()
        self.finish = threading.Event()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()
        assert self.started.wait(10)

    def _run(self) -> None:
        self.turn.supervisor_thread = threading.get_ident()
        self.turn.begin()
        self.started.set()
        self.finish.wait(10)
        self.order.append("end")
        self.turn.end()

    def stop(self) -> None:
        self.finish.set()
        self.thread.join(10)


@pytest.fixture
def long_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    """A caller would wait for a turn for a minute."""
    monkeypatch.setattr(inbox, "TURN_WAIT_S", 60.0)


def test_a_caller_waits_for_a_long_turn_to_end(long_waits: None) -> None:
    turn, order = SupervisorTurn(patience_s=0.0), []
    supervisor = SupervisorStandIn(turn, order)
    threading.Timer(0.2, supervisor.finish.set).start()
    turn.step_aside()
    order.append("caller went on")
    supervisor.stop()
    assert order == ["end", "caller went on"]


def test_a_caller_does_not_wait_for_a_young_turn(long_waits: None) -> None:
    turn, order = SupervisorTurn(patience_s=60.0), []
    supervisor = SupervisorStandIn(turn, order)
    turn.step_aside()  # would wait for the minute if it waited at all
    order.append("caller went on")
    supervisor.stop()
    assert order == ["caller went on", "end"]


def test_no_caller_waits_when_no_turn_runs(long_waits: None) -> None:
    turn = SupervisorTurn(patience_s=0.0)
    turn.step_aside()
    turn.begin()
    turn.end()
    turn.step_aside()  # either would wait the minute


@pytest.mark.parametrize("wait", ["step_aside", "hand_over"])
def test_the_supervisor_thread_never_waits_for_its_own_turn(long_waits: None, wait: str
                                                            ) -> None:
    turn = SupervisorTurn(patience_s=0.0)
    went_on = threading.Event()

    def supervisor() -> None:  # a done-callback that calls submit() or map() inside a turn
        turn.supervisor_thread = threading.get_ident()
        turn.begin()
        if wait == "step_aside":
            turn.step_aside()
        else:
            turn.hand_over(turn.number)
        went_on.set()
        turn.end()

    thread = threading.Thread(target=supervisor)
    thread.start()
    assert went_on.wait(10)
    thread.join(10)


def test_a_caller_waits_at_most_once_for_a_turn_that_does_not_end(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inbox, "TURN_WAIT_S", 0.05)
    turn, order = SupervisorTurn(patience_s=0.0), []
    lock = CountingLock()
    monkeypatch.setattr(turn, "_lock", lock)
    supervisor = SupervisorStandIn(turn, order)
    me = threading.get_ident()
    for _ in range(5):
        turn.step_aside()
    waits_in_first_turn = lock.acquires.get(me, 0)
    supervisor.stop()
    supervisor = SupervisorStandIn(turn, order)  # the next turn, also long: waited for once
    for _ in range(5):
        turn.step_aside()
    supervisor.stop()
    assert (waits_in_first_turn, lock.acquires[me]) == (1, 2)


def test_patience_is_two_batches_shared_by_the_workers_with_a_floor() -> None:
    """A worker holds one to two batches, and one of N workers is down to its last every
    2 batches / N."""
    assert SupervisorTurn.for_workers(2, 0.025).patience_s == pytest.approx(0.025)
    assert SupervisorTurn.for_workers(8, 0.025).patience_s == pytest.approx(0.00625)
    assert SupervisorTurn.for_workers(64, 0.025).patience_s == inbox.TURN_PATIENCE_MIN_S


def test_a_done_callback_in_the_supervisor_thread_can_submit(long_waits: None) -> None:
    """With every turn long and a caller's wait a minute, the supervisor thread must not wait
    for the turn it is in when a done-callback submits from it."""
    with Pool(2) as pool:
        pool._supervisor.turn.patience_s = 0.0
        threads: list[str] = []
        resubmitted: list[Any] = []

        def resubmit(future: Any) -> None:
            threads.append(threading.current_thread().name)
            resubmitted.append(pool.submit(abs, -future.result()))

        first = pool.submit(nap_then, 7)
        first.add_done_callback(resubmit)
        first.result(timeout=10)
        deadline = time.monotonic() + 10
        while not resubmitted and time.monotonic() < deadline:
            time.sleep(0.01)
        assert threads and threads[0] != threading.current_thread().name
        assert resubmitted[0].result(timeout=10) == 7


def square(x: int) -> int:
    return x * x


def test_threads_that_always_step_aside_get_every_result_once() -> None:
    """Every turn counts as long: four threads posting through submit(), apply_async(), a
    map and a lazy imap at once (its feeder steps aside too) get each result exactly once."""
    with Pool(4) as pool:
        pool._supervisor.turn.patience_s = 0.0
        out: dict[str, list[int]] = {}
        xs = list(range(2000))

        def by_submit() -> None:
            out["submit"] = [f.result(timeout=30) for f in [pool.submit(square, x) for x in xs]]

        def by_apply_async() -> None:
            results = [pool.apply_async(square, (x,)) for x in xs]
            out["apply_async"] = [r.get(timeout=30) for r in results]

        def by_map() -> None:
            out["map"] = pool.map(square, xs, chunksize=1)

        def by_imap() -> None:
            out["imap"] = list(pool.imap(square, iter(xs)))

        threads = [threading.Thread(target=f)
                   for f in (by_submit, by_apply_async, by_map, by_imap)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert out == {name: [x * x for x in xs]
                       for name in ("submit", "apply_async", "map", "imap")}
        stats = pool.stats()
        assert (stats.tasks_succeeded, stats.tasks_failed) == (4 * len(xs), 0)


def test_a_caller_handing_over_waits_for_the_turn_after_its_post_to_begin_and_end(
        long_waits: None) -> None:
    turn, order = SupervisorTurn(patience_s=60.0), []

    def supervisor() -> None:  # woken by the post, it gets the GIL a little later
        time.sleep(0.1)
        turn.begin()
        order.append("begin")
        time.sleep(0.1)
        order.append("end")
        turn.end()

    posted_in = turn.number
    thread = threading.Thread(target=supervisor)
    thread.start()
    turn.hand_over(posted_in)
    order.append("caller went on")
    thread.join(10)
    assert order == ["begin", "end", "caller went on"]


def test_a_caller_handing_over_to_a_supervisor_that_never_turns_gives_up(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inbox, "TURN_WAIT_S", 0.05)
    turn = SupervisorTurn(patience_s=0.0)
    turn.hand_over(turn.number)  # no turn begins: returns after TURN_WAIT_S, not never


def test_a_map_slow_to_make_starts_its_workers_before_making_the_rest(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With no patience (as a pool of many workers has little), the map's first group of
    inputs is dispatched before its second is posted, and every input has its result."""
    with Pool(2) as pool:
        pool._supervisor.turn.patience_s = 0.0
        slots = pool._supervisor.workers.slots
        pool.map(square, range(10))  # warm: the workers run
        dispatched_before_post: list[bool] = []
        post = pool._submitter.post

        def noting_post(command: Any) -> None:
            dispatched_before_post.append(any(slot.batches for slot in slots))
            post(command)

        monkeypatch.setattr(pool._submitter, "post", noting_post)
        xs = list(range(3 * 4096))
        assert pool.map(square, xs) == [x * x for x in xs]
        assert dispatched_before_post[:2] == [False, True]


def test_a_turn_lock_a_caller_never_gave_back_does_not_stop_the_supervisor(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C between a waiting caller's acquire and release leaves the lock taken: the
    supervisor's next turns still begin and end, and callers wait for them again."""
    monkeypatch.setattr(inbox, "TURN_WAIT_S", 0.05)
    turn, order = SupervisorTurn(patience_s=0.0), []
    assert turn._lock.acquire()  # taken, never released
    turns_done = threading.Event()

    def supervisor() -> None:
        turn.supervisor_thread = threading.get_ident()
        for _ in range(3):
            turn.begin()
            turn.end()
        turns_done.set()

    thread = threading.Thread(target=supervisor, daemon=True)  # stuck for good if it fails
    thread.start()
    assert turns_done.wait(10)
    thread.join(10)
    monkeypatch.setattr(inbox, "TURN_WAIT_S", 60.0)
    supervisor_ = SupervisorStandIn(turn, order)
    threading.Timer(0.02, supervisor_.finish.set).start()
    turn.step_aside()  # waits for the stand-in's turn on the fresh lock
    order.append("caller went on")
    supervisor_.stop()
    assert order == ["end", "caller went on"]
