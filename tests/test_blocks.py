"""Blocks: the primitive inputs of a plain map/imap call travel, run and report as runs of
consecutive inputs (procqueue.tasks.Block).  Whatever happens inside a block, each input still
gets exactly one outcome, and a failure is still charged to its own input only.

The calls here fix `chunksize` so that every fault lands inside a block of many inputs (the
adaptive default starts with blocks of one input until it has measured the function).
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

import pytest

import procqueue
from procqueue import errors
from procqueue.chunking import ChunkSizer
from procqueue.config import PoolConfig
from procqueue.dispatch import task_block_inputs
from procqueue.protocol import CallKind
from procqueue.results import MapResult, ResultStream
from procqueue.scheduler import Scheduler
from procqueue.tasks import Block, Job, Task, TaskState

N = 40
BAD = 17
CHUNK = 40  # one block holds every input


def _parent_only_fails(parent_pid):
    if os.getpid() == parent_pid:
        raise RuntimeError("this value cannot be rebuilt in the caller")
    return "rebuilt"


class UnreadableInCaller:
    """Pickles in the worker; unpickling it in the caller raises."""

    def __init__(self, parent_pid):
        self.parent_pid = parent_pid

    def __reduce__(self):
        return (_parent_only_fails, (self.parent_pid,))


def faulty(args):
    fault, i, parent_pid, directory = args
    Path(directory, f"ran-{i}-{os.getpid()}-{time.monotonic_ns()}").touch()
    if i != BAD:
        return i * i
    if fault == "raise":
        raise ValueError(f"bad {i}")
    if fault == "exit3":
        os._exit(3)
    if fault == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault == "sysexit":
        sys.exit(5)
    if fault == "unpicklable_result":
        return lambda: None  # plain pickle cannot send a lambda back
    if fault == "unreadable_result":
        return UnreadableInCaller(parent_pid)
    if fault == "keyboard_interrupt":
        raise KeyboardInterrupt
    raise AssertionError(fault)


EXPECTED = {
    "raise": ValueError,
    "exit3": errors.WorkerCrashedError,
    "sigkill": errors.WorkerCrashedError,
    "sysexit": errors.WorkerExitedError,
    "unpicklable_result": errors.ResultSerializationError,
    "unreadable_result": errors.ResultSerializationError,
    "keyboard_interrupt": errors.RemoteError,
}


def _outcomes(pool, api, items):
    """{index: ('ok', value) | ('error', exception)} from one call of `api`."""
    out = {}
    if api == "imap_outcomes":
        for o in pool.imap_outcomes(faulty, items, chunksize=CHUNK):
            assert o.index not in out, f"two outcomes for {o.index}"
            out[o.index] = ("ok", o.value) if o.ok else ("error", o.error)
        return out
    if api == "map":
        values = pool.map(faulty, items, chunksize=CHUNK, errors="return")
        return {i: ("error", v) if isinstance(v, BaseException) else ("ok", v)
                for i, v in enumerate(values)}
    it = getattr(pool, api)(faulty, items, chunksize=CHUNK, errors="return")
    for n, v in enumerate(it):
        i = n if api == "imap" else (v.index if isinstance(v, BaseException) else
                                     int(round(v ** 0.5)))
        assert i not in out, f"two outcomes for {i}"
        out[i] = ("error", v) if isinstance(v, BaseException) else ("ok", v)
    return out


@pytest.mark.timeout(60)
@pytest.mark.parametrize("api", ["map", "imap", "imap_unordered", "imap_outcomes"])
@pytest.mark.parametrize("fault", sorted(EXPECTED))
def test_a_fault_inside_a_block_fails_only_its_input(fault, api, tmp_path):
    items = [(fault, i, os.getpid(), str(tmp_path)) for i in range(N)]
    with procqueue.Pool(2, retries=0) as pool:
        out = _outcomes(pool, api, items)
        assert sorted(out) == list(range(N))
        assert {i: v for i, (kind, v) in out.items() if kind == "ok"} == \
            {i: i * i for i in range(N) if i != BAD}
        kind, error = out[BAD]
        assert kind == "error" and isinstance(error, EXPECTED[fault]), repr(error)
        assert error.index == BAD and error.input_repr == repr(items[BAD])
        ran_bad = [p.name for p in tmp_path.iterdir() if p.name.startswith(f"ran-{BAD}-")]
        assert len(ran_bad) == 1, ran_bad  # retries=0: the faulty input ran once
        assert error.pid == int(ran_bad[0].split("-")[2])
        if fault in ("raise", "sysexit", "keyboard_interrupt"):  # the task's own frames
            assert 'in faulty\n' in errors.remote_traceback_text(error.__cause__)
        if fault == "exit3":
            assert error.exitcode == 3 and "exit code 3" in str(error)
        if fault == "sigkill":  # not the OOM killer's (/proc/vmstat's count did not move)
            assert error.signal == "SIGKILL" and not error.oom_suspected
            assert "OOM" not in str(error)
        assert pool.map(abs, range(-5, 0)) == [5, 4, 3, 2, 1]  # the pool goes on


def flaky_once(args):
    i, directory = args
    marker = Path(directory, f"failed-{i}")
    if i == BAD and not marker.exists():
        marker.touch()
        raise ConnectionError("first attempt fails")
    return i


@pytest.mark.timeout(60)
def test_an_input_that_raises_in_a_block_is_retried_alone(tmp_path):
    items = [(i, str(tmp_path)) for i in range(N)]
    with procqueue.Pool(2, retries=2, retry_on=(ConnectionError,)) as pool:
        outcomes = list(pool.imap_outcomes(flaky_once, items, chunksize=CHUNK))
    assert [o.index for o in outcomes] == list(range(N))
    assert all(o.ok for o in outcomes), [o.error for o in outcomes if not o.ok]
    assert [o.value for o in outcomes] == list(range(N))
    assert {o.index: o.attempts for o in outcomes if o.attempts != 1} == {BAD: 2}
    assert all(o.pid is not None and o.seconds >= 0 for o in outcomes)


def crash_once(args):
    i, directory = args
    marker = Path(directory, f"crashed-{i}")
    if i == BAD and not marker.exists():
        marker.touch()
        os._exit(9)
    return i


@pytest.mark.timeout(60)
def test_a_crash_in_a_block_is_retried_and_no_input_is_lost_or_duplicated(tmp_path):
    items = [(i, str(tmp_path)) for i in range(N)]
    with procqueue.Pool(2, retries=1) as pool:
        outcomes = list(pool.imap_outcomes(crash_once, items, chunksize=CHUNK))
        stats = pool.stats()
    assert [o.index for o in outcomes] == list(range(N))
    assert [o.value for o in outcomes] == list(range(N))
    assert [o.index for o in outcomes if o.attempts == 2] == [BAD]
    assert stats.worker_restarts == 1 and stats.retries == 1


def hang_at_bad(args):
    i, directory = args
    Path(directory, f"ran-{i}-{time.monotonic_ns()}").touch()
    if i == BAD:
        time.sleep(60)
    return i


@pytest.mark.timeout(60)
@pytest.mark.parametrize("api", ["map", "imap_outcomes"])
def test_an_input_that_hangs_in_a_timed_block_times_out_alone(tmp_path, monkeypatch, api):
    # A timeout does not keep inputs out of blocks (issue #24): the block's worker marks each
    # input's start, and the one past its deadline becomes a Task then.  Inputs before it
    # keep their results (not run again), those after it run once in the next worker.
    from procqueue.dispatch import Dispatcher

    sent_blocks = []
    send_block = Dispatcher._send_block
    monkeypatch.setattr(Dispatcher, "_send_block",
                        lambda self, slot, block: (sent_blocks.append(len(block)),
                                                   send_block(self, slot, block)))
    items = [(i, str(tmp_path)) for i in range(N)]
    with procqueue.Pool(1, timeout=1, retries=0) as pool:
        if api == "map":
            values = pool.map(hang_at_bad, items, chunksize=CHUNK, errors="return")
        else:
            outcomes = list(pool.imap_outcomes(hang_at_bad, items, chunksize=CHUNK))
            assert [o.index for o in outcomes] == list(range(N))
            values = [o.value if o.ok else o.error for o in outcomes]
        assert pool.map(echo, [1, 2]) == [1, 2]  # a new worker took over
    assert sent_blocks[0] == N  # every input went in one block
    assert isinstance(values[BAD], errors.TaskTimeoutError) and values[BAD].index == BAD
    assert [v for i, v in enumerate(values) if i != BAD] == [i for i in range(N) if i != BAD]
    runs = sorted(int(f.split("-")[1]) for f in os.listdir(tmp_path))
    assert runs == list(range(N))  # each input ran exactly once


def echo(x):
    return x


@pytest.mark.timeout(60)
@pytest.mark.parametrize("api", ["map", "imap", "imap_unordered"])
def test_primitive_and_other_inputs_mixed_keep_their_places(api):
    items = []
    for i in range(300):
        items += [i, f"s{i}", (i, "t"), [i], {"k": i}, None, 1.5 * i, b"b", (i, [i])]
    with procqueue.Pool(2) as pool:
        got = getattr(pool, api)(echo, items, chunksize=37)
        got = list(got)
    if api == "imap_unordered":
        assert sorted(map(repr, got)) == sorted(map(repr, items))
    else:
        assert got == items


class ListWithOwnIteration(list):
    """A list subclass whose iteration differs from its items: iterated, never sliced."""

    def __iter__(self):
        return (x * 10 for x in list.__iter__(self))


@pytest.mark.timeout(60)
def test_a_sequence_sliced_by_the_feeder_gives_what_iterating_it_gives():
    numbers = list(range(5000)) + [[1], {"k": 2}] + list(range(5000, 10_000))
    expected = [echo(x) for x in numbers]
    with procqueue.Pool(2) as pool:
        for make in (list, tuple, iter, lambda xs: (x for x in xs)):
            assert list(pool.imap(echo, make(numbers))) == expected
            assert sorted(map(repr, pool.imap_unordered(echo, make(numbers)))) == \
                sorted(map(repr, expected))
        assert list(pool.imap(echo, range(3, 9000, 7))) == list(range(3, 9000, 7))
        assert pool.map(echo, numbers) == expected
        assert list(pool.imap(echo, ListWithOwnIteration([1, 2, 3]))) == [10, 20, 30]
        nested = [(i, (i, "x")) for i in range(3000)]  # not primitive: one Task each
        assert pool.starmap(pair, nested) == [[a, b] for a, b in nested]


def pair(a, b):
    return [a, b]


@pytest.mark.parametrize("items, primitive", [
    ([1, 2.5, True, "s", b"b", 1j, None], True),
    ([(1, "a"), (2, b"b"), ()], True),
    ([(1, (2,))], False),
    ([(1, [2])], False),
    ([1, (2, 3)], False),  # mixed: judged input by input instead
    ([[1]], False),
    (["ab", "cd"], True),
])
def test_primitive_runs_are_recognised_without_a_python_step_per_input(items, primitive):
    from procqueue import protocol

    assert protocol.primitive_run(items) is primitive
    if primitive:
        assert all(protocol.primitive(x) for x in items)


def add(a, b):
    return a + b


@pytest.mark.timeout(60)
def test_starmap_of_tuples_of_primitives():
    pairs = [(i, i + 1) for i in range(5000)]
    with procqueue.Pool(2) as pool:
        assert pool.starmap(add, pairs) == [a + b for a, b in pairs]
        assert list(pool.imap(abs, range(-3000, 0))) == list(range(3000, 0, -1))


def nap(x):
    time.sleep(0.02)
    return x


def spin(x):
    end = time.perf_counter() + 0.0006
    while time.perf_counter() < end:
        pass
    return x


# (function, inputs, chunksize, at least this many cancelled): 20 ms inputs, and 0.6 ms
# ones, which the worker checks for a revoke only once a millisecond, not before each one.
# Two blocks of 1,000 spins (0.6 s each) run at once from the start; half the inputs must be
# cancelled, so the cancel may take up to 0.3 s to reach the workers (with 0.3 ms spins a
# 0.19 s delay on a busy 2-core machine failed the test once in a full run).  2,000 inputs
# fit in an imap's window (an abandoned imap takes no more).
CANCELS = [(nap, 200, 50, 1), (spin, 2000, 1000, 1000)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fn, n, chunksize, least", CANCELS, ids=["20ms", "0.6ms"])
def test_cancel_inside_blocks_gives_every_input_one_outcome(fn, n, chunksize, least):
    with procqueue.Pool(2) as pool:
        it = pool.imap_outcomes(fn, range(n), chunksize=chunksize)
        outcomes = [next(it)]
        it.cancel()
        outcomes += list(it)
        stats = pool.stats()
    assert sorted(o.index for o in outcomes) == list(range(n))
    cancelled = [o for o in outcomes if not o.ok]
    assert len(cancelled) >= least  # the inputs not reached when the cancel came
    assert all(isinstance(o.error, errors.TaskCancelledError) for o in cancelled)
    assert all(o.value == o.index for o in outcomes if o.ok)
    assert stats.tasks_submitted == stats.tasks_succeeded + stats.tasks_failed \
        + stats.tasks_cancelled == n


def nap_failing_at_0(x):
    if x == 0:
        raise ValueError("input 0")
    return nap(x)


def spin_failing_at_0(x):
    if x == 0:
        raise ValueError("input 0")
    return spin(x)


HALTS = [(nap_failing_at_0, 200, 50, 50), (spin_failing_at_0, 2000, 1000, 1000)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fn, n, chunksize, least", HALTS, ids=["20ms", "0.6ms"])
def test_a_halt_stops_imap_inside_its_blocks(fn, n, chunksize, least):
    # imap's blocks run untimed (no clock per input): they still look for a revoke
    with procqueue.Pool(2) as pool:
        it = pool.imap(fn, range(n), chunksize=chunksize, halt="soon,fail=1")
        outcomes = []
        while True:
            try:
                outcomes.append(type(next(it)).__name__)
            except StopIteration:
                break
            except Exception as exc:  # noqa: BLE001 - each input's own outcome
                outcomes.append(type(exc).__name__)
    assert len(outcomes) == n and outcomes[0] == "ValueError"
    assert outcomes.count("TaskCancelledError") >= least


@pytest.mark.timeout(60)
@pytest.mark.parametrize("api", ["map", "imap", "imap_outcomes"])
def test_worker_busy_time_counts_every_block(api):
    # map and imap blocks report only their total run time; it still reaches the stats.
    with procqueue.Pool(2) as pool:
        call = getattr(pool, api)
        list(call(nap, range(30), chunksize=10))
        busy = sum(w.busy_s for w in pool.stats().workers)
    assert 30 * 0.02 <= busy < 30 * 0.02 + 1.0


@pytest.mark.timeout(60)
def test_results_of_plain_data_and_of_other_types_come_back_in_their_places():
    # Plain data (dicts, lists, tuples of builtins) travels as one pickle per block;
    # a value of another type as its own pickle.
    with procqueue.Pool(2) as pool:
        got = pool.map(plain_or_not, range(300), chunksize=100)
    assert got == [plain_or_not(x) for x in range(300)]
    assert [type(v) for v in got[:4]] == [dict, tuple, list, MapResultValue]


class MapResultValue:
    def __init__(self, x):
        self.x = x

    def __eq__(self, other):
        return isinstance(other, MapResultValue) and other.x == self.x


def plain_or_not(x):
    kind = x % 4
    if kind == 0:
        return {"x": x, "nested": [x, (x, None)], "s": {x}}
    if kind == 1:
        return (x, str(x), float(x), complex(x, 1), b"b")
    if kind == 2:
        return [x] * 3
    return MapResultValue(x)


@pytest.mark.timeout(60)
def test_terminate_with_blocks_running_and_queued_fails_each_input_once():
    pool = procqueue.Pool(2)
    try:
        result = pool.map_async(nap, range(400), chunksize=50)
        time.sleep(0.3)
        pool.terminate()
        with pytest.raises(errors.TaskCancelledError):
            result.get(timeout=10)
        stats = pool.stats()
        assert stats.tasks_submitted == 400
        assert stats.tasks_succeeded + stats.tasks_failed + stats.tasks_cancelled == 400
    finally:
        pool.terminate()
        pool.join()


@pytest.mark.timeout(60)
def test_close_and_join_wait_for_the_blocks_in_flight():
    pool = procqueue.Pool(2)
    result = pool.map_async(nap, range(100), chunksize=25)
    pool.close()
    pool.join()
    assert result.get(timeout=0) == list(range(100))


# ---- units ---------------------------------------------------------------------------------

def _job(sink=None, job_id=1):
    return Job(job_id, 1, b"", CallKind.ONE, sink, timeout_s=None,
               sizer=ChunkSizer(2, 10))


def test_scheduler_cuts_a_block_to_the_batch_size_and_joins_consecutive_ones():
    sched = Scheduler()
    job = _job()
    sched.enqueue_all([Block(100, job, 0, list(range(4))), Block(101, job, 4, list(range(4, 30)))])
    assert sched.queued == 30
    first = sched.next_batch(1000)
    assert isinstance(first, Block) and (first.start, first.inputs) == (0, list(range(10)))
    second = sched.next_batch(1000)
    assert (second.start, second.inputs) == (10, list(range(10, 20)))
    assert sched.queued == 10


def test_a_task_between_blocks_keeps_its_turn():
    sched = Scheduler()
    job = _job()
    task = Task(7, job, 2, b"x", [2])
    sched.enqueue_all([Block(100, job, 0, [0, 1]), task, Block(101, job, 3, [3, 4])])
    assert sched.next_batch(1000).inputs == [0, 1]  # not joined across the task
    assert sched.next_batch(1000) == [task]
    assert sched.next_batch(1000).inputs == [3, 4]
    assert sched.queued == 0 and sched.next_batch(1000) == []


def test_dropping_a_call_returns_its_blocks_and_tasks():
    sched = Scheduler()
    job = _job()
    task = Task(7, job, 2, b"x", [2])
    block = Block(100, job, 0, [0, 1])
    sched.enqueue_all([block, task])
    assert sched.drop_cancelled(job) == [block, task]
    assert sched.queued == 0


def test_map_result_takes_runs_in_any_order_and_fails_at_the_first_failure():
    result = MapResult(None, 6)
    result.deliver_run(3, [3, 4, 5], [30, 40, 50], [0.0] * 3, 1)
    assert not result.ready()
    result.deliver_run(0, [0, 1, 2], [0, 10, 20], [0.0] * 3, 1)
    assert result.get(0) == [0, 10, 20, 30, 40, 50]

    failing = MapResult(None, 4)
    failing.deliver_run(2, [2, 3], [20, 30], [0.0] * 2, 1)
    task = Task(9, _job(failing), 1, b"", 1)
    failing.deliver(task, False, ValueError("bad 1"))
    assert not failing.ready()  # input 0 may still succeed
    failing.deliver_run(0, [0], [0], [0.0], 1)
    with pytest.raises(ValueError) as info:
        failing.get(0)
    assert info.value.partial_results == {0: 0, 2: 20, 3: 30}


def test_ordered_stream_yields_runs_and_single_outcomes_in_input_order():
    stream = ResultStream(ordered=True, window=None)
    stream.deliver_run(2, ["c", "d"], ["C", "D"], [0.1, 0.2], 42)
    task = Task(9, _job(stream), 1, b"", "b")
    task.attempts, task.pid, task.seconds = 2, 43, 0.5
    task.state = TaskState.DONE
    stream.deliver(task, True, "B")
    stream.deliver_run(0, ["a"], ["A"], [0.3], 42)
    stream.input_finished(4)
    got = [stream.next_done(0) for _ in range(4)]
    assert got == [(0, "a", True, "A", 1, 0.3, 42), (1, "b", True, "B", 2, 0.5, 43),
                   (2, "c", True, "C", 1, 0.1, 42), (3, "d", True, "D", 1, 0.2, 42)]
    with pytest.raises(StopIteration):
        stream.next_done(0)


def test_runs_taken_whole_by_imap_keep_order_and_next_timeout():
    stream = ResultStream(ordered=True, window=None)
    stream.deliver_run(0, [0, 1, 2], ["A", "B", "C"], [0.0] * 3, 1)
    it = procqueue.results.IMapIterator(stream, None, lambda: None)
    assert [it.next(0), it.next(0)] == ["A", "B"]
    task = Task(9, _job(stream), 3, b"", 3)
    stream.deliver(task, False, ValueError("bad 3"))
    assert it.next(0) == "C"
    with pytest.raises(ValueError, match="bad 3"):
        it.next(0)
    with pytest.raises(multiprocessing.TimeoutError):
        it.next(0.01)  # input 4 has no outcome yet
    stream.deliver_run(4, [4], ["E"], [0.0], 1)
    stream.input_finished(5)
    assert it.next(0) == "E"
    with pytest.raises(StopIteration):
        it.next(0)


# ---- tasks sent as a block: many submit() calls, each its own outcome ----------------------

def record_run(i, directory):
    """Records each run; input BAD kills its worker on its first run only."""
    Path(directory, f"ran-{i}-{time.monotonic_ns()}").touch()
    if i == BAD and not Path(directory, "crashed").exists():
        Path(directory, "crashed").touch()
        os._exit(3)
    if i == BAD + 1:
        raise ValueError(f"bad {i}")
    return i


def _measure_record_run(pool, tmp_path):
    """A few calls first: until the pool has timed a function, its batches hold one task."""
    warm = tmp_path / "warm"
    warm.mkdir()
    assert [pool.submit(record_run, -1, str(warm)).result(timeout=30) for _ in range(3)] \
        == [-1] * 3


def _count_task_blocks(monkeypatch):
    """How many batches of tasks went to workers as blocks (Dispatcher._send_task_block)."""
    from procqueue.dispatch import Dispatcher

    sent = []
    send = Dispatcher._send_task_block

    def counting(self, slot, job, tasks, kind, inputs):
        sent.append(len(tasks))
        return send(self, slot, job, tasks, kind, inputs)

    monkeypatch.setattr(Dispatcher, "_send_task_block", counting)
    return sent


@pytest.mark.timeout(60)
def test_submit_calls_sent_as_a_block_keep_their_own_outcomes_through_a_crash(
        tmp_path, monkeypatch):
    """Submit() calls of plain arguments travel to a worker several at a time as one block.
    A crash inside it is charged to the call that was running (retried once here), an error
    to its own call; every other call gets its result.  (Calls that finished in the crashed
    worker before their results were sent run again, uncharged, as in a batch of tasks.)"""
    sent = _count_task_blocks(monkeypatch)
    with procqueue.Pool(1, retries=1) as pool:
        _measure_record_run(pool, tmp_path)
        blocker = pool.submit(time.sleep, 0.3)  # the rest queue up behind it: full batches
        futures = [pool.submit(record_run, i, str(tmp_path)) for i in range(N)]
        blocker.result(timeout=30)
        outcomes = [f.exception(timeout=30) or f.result() for f in futures]
        stats = pool.stats()
    assert max(sent) > 1, "no batch of these calls went as a block"
    assert str(outcomes[BAD + 1]) == f"bad {BAD + 1}"
    assert [o for i, o in enumerate(outcomes) if i != BAD + 1] == \
        [i for i in range(N) if i != BAD + 1]
    runs = [int(p.name.split("-")[1]) for p in tmp_path.glob("ran-*")]
    assert set(runs) == set(range(N)) and runs.count(BAD) == 2
    assert max(runs.count(i) for i in range(N)) <= 2
    assert stats.worker_restarts == 1 and stats.retries == 1


@pytest.mark.timeout(60)
def test_a_crash_in_a_block_of_submit_calls_names_the_call_and_the_exit(tmp_path, monkeypatch):
    sent = _count_task_blocks(monkeypatch)
    with procqueue.Pool(1, retries=0) as pool:  # the crash is the call's outcome
        _measure_record_run(pool, tmp_path)
        blocker = pool.submit(time.sleep, 0.3)
        futures = [pool.submit(record_run, i, str(tmp_path)) for i in range(N)]
        blocker.result(timeout=30)
        crash = futures[BAD].exception(timeout=30)
        rest = [f.result(timeout=30) for i, f in enumerate(futures) if i not in (BAD, BAD + 1)]
    assert max(sent) > 1
    assert isinstance(crash, errors.WorkerCrashedError) and crash.exitcode == 3
    assert crash.pid is not None and crash.input_repr == f"(({BAD}, {str(tmp_path)!r}), {{}})"
    assert rest == [i for i in range(N) if i not in (BAD, BAD + 1)]


@pytest.mark.parametrize("kind, items, expected", [
    (CallKind.ARGS_KWARGS, [((1,), {}), ((2, "b"), {})], (CallKind.STAR, [(1,), (2, "b")])),
    (CallKind.ARGS_KWARGS, [((1,), {}), ((2,), {"y": 1})], None),  # keyword arguments
    (CallKind.ARGS_KWARGS, [((1,), {}), (([2],), {})], None),  # a list: mutable, not plain
    (CallKind.ARGS_KWARGS, [((1,), {})], None),  # one task: nothing to share
    (CallKind.ONE, [1, "a", None], (CallKind.ONE, [1, "a", None])),
    (CallKind.ONE, [1, {"a": 1}], None),
    (CallKind.STAR, [(1, 2), (3, 4)], (CallKind.STAR, [(1, 2), (3, 4)])),
])
def test_which_batches_of_tasks_travel_as_blocks(kind, items, expected):
    job = Job(1, 1, b"", kind, None, timeout_s=None, sizer=ChunkSizer(1, None))
    tasks = [Task(i, job, i, b"", item) for i, item in enumerate(items)]
    assert task_block_inputs(PoolConfig(processes=1), job, tasks) == expected


def test_tasks_with_a_timeout_or_of_several_calls_do_not_travel_as_blocks():
    config = PoolConfig(processes=1)
    timed = Job(1, 1, b"", CallKind.ONE, None, timeout_s=5.0, sizer=ChunkSizer(1, None))
    assert task_block_inputs(config, timed, [Task(i, timed, i, b"", i) for i in (1, 2)]) is None
    a, b = _job(job_id=2), _job(job_id=3)
    assert task_block_inputs(config, a, [Task(1, a, 0, b"", 1), Task(2, b, 0, b"", 2)]) is None
    assert task_block_inputs(config, a, [Task(1, a, 0, b"", 1), Task(2, a, 0, b"", 2)]) == \
        (CallKind.ONE, [1, 2])
    events = PoolConfig(processes=1, on_event=print)
    assert task_block_inputs(events, a, [Task(1, a, 0, b"", 1), Task(2, a, 0, b"", 2)]) is None


def note_start(i, directory):
    path = Path(directory, f"ran-{i}")
    assert not path.exists(), f"{i} started twice"
    path.touch()
    time.sleep(0.002)
    return i


@pytest.mark.timeout(60)
def test_a_cancelled_submit_call_inside_a_block_in_the_workers_pipe_never_starts(
        tmp_path, monkeypatch):
    """cancel() returned True: the call must not run, though its block is in the worker's
    pipe (the worker looks at the revoked batches before each input of such a block); the
    rest of the block runs, each call once."""
    sent = _count_task_blocks(monkeypatch)
    warm = tmp_path / "warm"
    warm.mkdir()
    with procqueue.Pool(1) as pool:
        assert [pool.submit(note_start, -k, str(warm)).result(timeout=30) for k in range(3)] \
            == [0, -1, -2]
        blocker = pool.submit(time.sleep, 0.5)
        futures = [pool.submit(note_start, i, str(tmp_path)) for i in range(N)]
        deadline = time.monotonic() + 10
        while not sent and time.monotonic() < deadline:  # a block waits behind the sleep
            time.sleep(0.005)
        assert sent and not blocker.done(), "no block was prefetched behind the running call"
        cancelled = [futures[i].cancel() for i in (0, 1, N - 1)]
        blocker.result(timeout=30)
        results = {i: f.result(timeout=30) for i, f in enumerate(futures) if not f.cancelled()}
    assert cancelled == [True, True, True]
    assert results == {i: i for i in range(2, N - 1)}
    ran = sorted(int(p.name.split("-")[1]) for p in tmp_path.glob("ran-*"))
    assert ran == list(range(2, N - 1))
