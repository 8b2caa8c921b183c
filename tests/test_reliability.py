"""Issue #5: timeouts (absolute and relative), cancel, retries, recycling, memory-aware
admission, return_exceptions; and a property test: random workloads with random faults end
with exactly one outcome per task and the right values for the healthy ones."""
from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from process_checks import wait_gone
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from procqueue import (Pool, PoolBrokenError, TaskCancelledError, TaskTimeoutError,
                       WorkerCrashedError, WorkerExitedError)


def sleep_for(seconds):
    time.sleep(seconds)
    return seconds


def spawn_child_and_hang(path, own_session=False):
    child = subprocess.Popen(["sleep", "60"], start_new_session=own_session)
    with open(path + ".tmp", "w") as f:
        f.write(str(child.pid))
    os.replace(path + ".tmp", path)
    time.sleep(60)


def hog_memory(mib):
    global _HOG
    _HOG = b"x" * (mib * 2**20)  # touched pages: real resident memory
    return os.getpid()


class Flaky(Exception):
    pass


def fail_first_attempts(path_and_failures):
    path, failures = path_and_failures
    with open(path, "a") as f:
        f.write("x")
    with open(path) as f:
        if len(f.read()) <= failures:
            raise Flaky("not yet")
    return "ok"


@pytest.mark.timeout(30)
def test_timeout_kills_the_task_and_its_subprocesses(tmp_path):
    marker = tmp_path / "child.pid"
    # 2 s: the task must have started its child (the worker imports this module first) on a
    # loaded 2-core machine before the timeout fires
    with Pool(2, timeout=2.0, retries=0) as pool:
        started = time.monotonic()
        result = pool.apply_async(spawn_child_and_hang, (str(marker),))
        with pytest.raises(TaskTimeoutError) as info:
            result.get(timeout=15)
        assert time.monotonic() - started < 2.0 + 3.0
        assert info.value.index == 0
        child = int(marker.read_text())
        assert wait_gone([child], 3) == []
        assert pool.map(sleep_for, [0, 0]) == [0, 0]  # the pool goes on


@pytest.mark.timeout(30)
@pytest.mark.parametrize("then", ["pool goes on", "terminate"])
def test_a_killed_tasks_subprocess_in_a_session_of_its_own_dies_with_it(tmp_path, then):
    """Killing the worker's process group does not reach a child that left it
    (start_new_session=True): it is killed with the worker, as GNU parallel kills a timed-out
    job's whole family."""
    marker = tmp_path / "child.pid"
    pool = Pool(1, timeout=2.0, retries=0)
    try:
        result = pool.apply_async(spawn_child_and_hang, (str(marker), True))
        with pytest.raises(TaskTimeoutError):
            result.get(timeout=15)
        child = int(marker.read_text())
        if then == "terminate":
            pool.terminate()
        else:
            assert pool.map(sleep_for, [0]) == [0]
        assert wait_gone([child], 5) == []
    finally:
        pool.terminate()


def count_run_then_maybe_hang(spec):
    """spec: "directory|name" (a string: such inputs travel as blocks) or {"spec": ...}
    (per-task items).  Leaves a file per run; "hang" sleeps until killed."""
    text = spec["spec"] if isinstance(spec, dict) else spec
    directory, name = text.split("|")
    runs = len([f for f in os.listdir(directory) if f.startswith(name + ".")])
    open(os.path.join(directory, f"{name}.{runs + 1}"), "w").close()
    if name == "hang":
        time.sleep(60)
    return name


def _runs(directory):
    counts = {}
    for f in os.listdir(directory):
        name = f.rsplit(".", 1)[0]
        counts[name] = counts.get(name, 0) + 1
    return counts


@pytest.mark.timeout(60)
@pytest.mark.parametrize("as_dicts", [False, True], ids=["block", "items"])
def test_inputs_a_worker_finished_before_a_timeout_are_not_run_again(tmp_path, as_dicts):
    # One worker, one batch: a, b, c, d finish, then "hang" is killed for its timeout.  Their
    # results, not sent yet when it was killed, must still come out of it, not be recomputed.
    specs = [f"{tmp_path}|{name}" for name in ["a", "b", "c", "d", "hang"]]
    inputs = [{"spec": s} for s in specs] if as_dicts else specs
    with Pool(1, timeout=1, retries=0) as pool:
        out = pool.map(count_run_then_maybe_hang, inputs, chunksize=5, return_exceptions=True)
    assert out[:4] == ["a", "b", "c", "d"] and isinstance(out[4], TaskTimeoutError)
    assert _runs(tmp_path) == {"a": 1, "b": 1, "c": 1, "d": 1, "hang": 1}


@pytest.mark.timeout(60)
def test_halt_now_keeps_the_results_of_inputs_that_had_finished(tmp_path):
    # "hang" times out, which halts the call (now: running tasks are killed); a, b, c, d had
    # finished in the same worker, so they keep their results, not TaskCancelledError.
    specs = [f"{tmp_path}|{name}" for name in ["a", "b", "c", "d", "hang", "e"]]
    with Pool(1, retries=0) as pool:
        outcomes = list(pool.imap_outcomes(count_run_then_maybe_hang, specs, chunksize=5,
                                           timeout=1, halt="now,fail=1"))
    assert [(o.ok, o.value) for o in outcomes[:4]] == [(True, n) for n in "abcd"]
    assert isinstance(outcomes[4].error, TaskTimeoutError)
    assert isinstance(outcomes[5].error, TaskCancelledError) and outcomes[5].attempts == 0
    assert _runs(tmp_path) == {"a": 1, "b": 1, "c": 1, "d": 1, "hang": 1}


def _wait_for(path):
    deadline = time.monotonic() + 10
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.005)


def ignore_sigterm_for_a_while_or_fail_once_it_runs(spec):
    """"bad" raises once the other input runs; the other ignores SIGTERM (the halt's), so
    only the SIGKILL after the grace can end its worker, and returns the seconds given after
    "bad" raised."""
    directory, name, seconds = spec.split("|")
    started, raising = os.path.join(directory, "started"), os.path.join(directory, "raising")
    if name == "bad":
        _wait_for(started)
        open(raising, "w").close()
        raise ValueError("bad input")
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    open(started, "w").close()
    _wait_for(raising)
    time.sleep(float(seconds))
    return name


@pytest.mark.timeout(60)
def test_halt_now_keeps_the_result_of_a_task_that_returned_before_its_worker_died(tmp_path):
    # "bad" fails while "slow" runs in the other worker: the halt kills "slow"'s worker, but
    # "slow" returns 0.25 s after, before the kill takes effect (0.5 s grace): the window
    # between a task's return and its worker's death, made wide.  Its result was computed: it
    # is kept, not replaced by TaskCancelledError (a journal would run it again).
    specs = [f"{tmp_path}|slow|0.25", f"{tmp_path}|bad|0"]
    with Pool(2, retries=0) as pool:
        outcomes = list(pool.imap_outcomes(ignore_sigterm_for_a_while_or_fail_once_it_runs,
                                           specs, chunksize=1, halt="now,fail=1"))
    slow, bad = outcomes
    assert slow.pid != bad.pid  # the premise: they ran side by side
    assert isinstance(bad.error, ValueError)
    assert (slow.ok, slow.value, slow.attempts) == (True, "slow", 1), slow.error


@pytest.mark.timeout(60)
def test_halt_now_cancels_a_task_that_ignores_sigterm_after_the_kill_grace(tmp_path):
    # The halt's SIGTERM is ignored: after the grace the worker is SIGKILLed, and the task
    # ends cancelled (it ran: one attempt), without waiting for the task's own 30 s.
    specs = [f"{tmp_path}|hold|30", f"{tmp_path}|bad|0"]
    began = time.monotonic()
    with Pool(2, retries=0) as pool:
        hold, bad = pool.imap_outcomes(ignore_sigterm_for_a_while_or_fail_once_it_runs, specs,
                                       chunksize=1, halt="now,fail=1")
        assert isinstance(bad.error, ValueError)
        assert isinstance(hold.error, TaskCancelledError) and hold.attempts == 1
        assert "while running" in str(hold.error)
        assert time.monotonic() - began < 15
        assert pool.map(abs, [-1]) == [1]  # a fresh worker took the killed one's place


def crash_after_a_while_or_count(spec):
    directory, name = spec.split("|")
    with open(os.path.join(directory, name), "a") as f:
        f.write("x")
    if name == "crash":
        time.sleep(0.5)
        os._exit(3)
    return name


@pytest.mark.timeout(60)
def test_inputs_of_a_cancelled_call_held_by_a_worker_that_crashes_never_run(tmp_path):
    # cancel(kill_running=False): the running input finishes (here: crashes); the inputs
    # behind it in the worker's batch must end cancelled, never started (attempts 0).
    specs = [f"{tmp_path}|{name}" for name in ["crash", "b", "c"]]
    with Pool(1, retries=0) as pool:
        outcomes = pool.imap_outcomes(crash_after_a_while_or_count, specs, chunksize=3)
        deadline = time.monotonic() + 10
        while not (tmp_path / "crash").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        outcomes.cancel(kill_running=False)
        ended = list(outcomes)
        got = [(type(o.error).__name__, o.attempts) for o in ended]
        assert pool.map(abs, [-1]) == [1]
    assert got == [("WorkerCrashedError", 1), ("TaskCancelledError", 0),
                   ("TaskCancelledError", 0)]
    assert ended[0].seconds >= 0.4  # it ran 0.5 s before it crashed (the record says so)
    assert sorted(os.listdir(tmp_path)) == ["crash"]


@pytest.mark.timeout(60)
def test_a_task_killed_by_a_cancel_says_how_long_it_ran(tmp_path):
    specs = [f"{tmp_path}|hang"]
    with Pool(1, retries=0) as pool:
        outcomes = pool.imap_outcomes(count_then_sleep, specs)
        deadline = time.monotonic() + 10
        while not (tmp_path / "hang").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.5)
        outcomes.cancel(kill_running=True)
        (ended,) = list(outcomes)
    assert isinstance(ended.error, TaskCancelledError) and ended.attempts == 1
    assert 0.4 <= ended.seconds < 20


def count_then_sleep(spec):
    directory, name = spec.split("|")
    Path(directory, name).write_text("x")
    time.sleep(30)


@pytest.mark.parametrize("case", ["worker", "forked_by_a_task", "signalled_again"])
def test_the_sigterm_handler_sends_once_and_only_from_the_worker_itself(case):
    # The worker's handler sends what its batch finished, then dies of SIGTERM; a process a
    # task forked inherits the handler (and the pipe) but must not send on the worker's behalf;
    # a second SIGTERM during the send (a timeout, then the halt it causes) must not cut it.
    from procqueue import worker

    forked_by_a_task = case == "forked_by_a_task"

    def send(write_end):
        if case == "signalled_again":
            os.kill(os.getpid(), signal.SIGTERM)  # handled at the next bytecode: right here
        os.write(write_end, b"results")

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child plays the worker
        try:
            os.close(read_end)
            worker.UNSENT.clear()
            worker.UNSENT.pid = os.getppid() if forked_by_a_task else os.getpid()
            worker.UNSENT.send = lambda: send(write_end)
            signal.signal(signal.SIGTERM, worker._send_unsent_then_die)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        finally:
            os._exit(99)  # the handler should have ended the process before this
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read_end, "rb") as pipe:
        sent = pipe.read()
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
    assert sent == (b"" if forked_by_a_task else b"results")


@pytest.mark.timeout(60)
def test_relative_timeout_catches_the_stuck_input():
    durations = [0.1] * 6 + [60] + [0.1] * 3
    with Pool(2, timeout="300%", retries=0) as pool:
        out = pool.map(sleep_for, durations, return_exceptions=True)
    assert isinstance(out[6], TaskTimeoutError)
    assert [v for i, v in enumerate(out) if i != 6] == [0.1] * 9


def fail_fast_or_sleep(x):
    if x == "fail":
        raise ValueError("fails at once")
    time.sleep(x)
    return x


@pytest.mark.timeout(60)
def test_a_relative_timeout_is_of_the_successes_so_quick_failures_kill_no_good_input():
    # GNU parallel's median is of the jobs that succeeded: three inputs that fail at once
    # (medians of ~0 s) must not make a healthy 1.5 s input time out after the 1 s floor
    with Pool(1, timeout="200%", retries=0) as pool:
        out = pool.map(fail_fast_or_sleep, ["fail", "fail", "fail", 1.5], return_exceptions=True)
    assert all(isinstance(v, ValueError) for v in out[:3]), out
    assert out[3] == 1.5


@pytest.mark.timeout(60)
@pytest.mark.parametrize("api", ["submit", "apply_async"])
@pytest.mark.parametrize("given", ["pool", "call"])
def test_relative_timeout_catches_a_stuck_submitted_task(api, given):
    # Each submit() is a call of one task, whose median never had 3 run times: "300%" never
    # timed a submitted task out (it waited for ever).  Its median is of its function's
    # tasks so far.
    with Pool(2, retries=0, timeout="300%" if given == "pool" else None) as pool:
        calls = pool if given == "pool" else pool.options(timeout="300%")
        if api == "submit":
            results = [calls.submit(sleep_for, d) for d in [0.1] * 6 + [60]]
            get = lambda r: r.result(timeout=20)  # noqa: E731
        else:
            results = [calls.apply_async(sleep_for, (d,)) for d in [0.1] * 6 + [60]]
            get = lambda r: r.get(timeout=20)  # noqa: E731
        assert [get(r) for r in results[:6]] == [0.1] * 6
        with pytest.raises(TaskTimeoutError):
            get(results[6])


class CountingSleeper:
    """A callable object whose state changes with each call (so does its pickle)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, seconds):
        return sleep_for(seconds)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("made", ["changing object", "partial per call"])
def test_relative_timeout_of_submitted_calls_counts_the_code_not_the_callables_state(made):
    # Pickled with each call, a callable whose state changes had a new median of its own at
    # each call, never 3 run times long: the stuck call was never timed out.
    import functools

    sleeper = CountingSleeper()

    def callable_for(seconds):
        if made == "partial per call":
            return functools.partial(sleep_for, seconds)
        sleeper.calls += 1
        return functools.partial(sleeper, seconds)

    with Pool(2, timeout="300%", retries=0) as pool:
        quick = [pool.submit(callable_for(0.1)) for _ in range(6)]
        assert [f.result(timeout=20) for f in quick] == [0.1] * 6
        stuck = pool.submit(callable_for(60))
        assert isinstance(stuck.exception(timeout=20), TaskTimeoutError)


def deaf_to_sigterm_beating(path):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        with open(path, "a") as beats:
            beats.write(f"{time.time()}\n")
        time.sleep(0.01)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("api", ["submit", "map"])
def test_a_timeout_is_reported_once_the_task_no_longer_runs(tmp_path, api):
    # The TaskTimeoutError came at the SIGTERM, while a task that ignores it ran on for the
    # grace (0.5 s): a queue's next task, or the retry of this one, started beside it.  It
    # comes once the worker is dead or SIGKILLed: no beat of the task after it.
    beats = tmp_path / "beats"
    with Pool(1, timeout=0.5, retries=0) as pool:
        if api == "submit":
            error = pool.submit(deaf_to_sigterm_beating, str(beats)).exception(timeout=20)
        else:
            [error] = pool.map(deaf_to_sigterm_beating, [str(beats)], return_exceptions=True)
        reported_at = time.time()
        assert isinstance(error, TaskTimeoutError)
        assert pool.map(abs, [-1]) == [1]  # (the worker is replaced: the old one is gone)
    last_beat = float(beats.read_text().split()[-1])
    assert last_beat < reported_at


@pytest.mark.timeout(30)
def test_per_call_timeout_overrides_the_pools():
    with Pool(1, timeout=30) as pool:
        with pytest.raises(TaskTimeoutError):
            pool.apply(sleep_for, (30,), timeout=0.3)


@pytest.mark.timeout(30)
def test_a_short_timeout_behind_a_long_one_on_the_same_worker_still_fires():
    # The supervisor keeps a slot's deadline between readings (many workers, many turns); the
    # second task's own, much sooner, deadline must replace the first's once it runs.
    with Pool(1) as pool:
        first = pool.apply_async(sleep_for, (0.3,), timeout=60)
        second = pool.apply_async(sleep_for, (60,), timeout=0.5)
        assert first.get(timeout=20) == 0.3
        with pytest.raises(TaskTimeoutError):
            second.get(timeout=20)


@pytest.mark.timeout(30)
def test_cancelling_a_running_future_kills_its_worker():
    with Pool(1) as pool:
        running = pool.submit(sleep_for, 60)
        deadline = time.monotonic() + 10
        while not running.running() and time.monotonic() < deadline:
            time.sleep(0.01)
        pid_before = pool.stats().workers[0].pid
        assert running.cancel() and running.cancelled()
        assert pool.submit(sleep_for, 0).result(timeout=10) == 0  # not stuck behind it
        assert pool.stats().workers[0].pid != pid_before


@pytest.mark.timeout(30)
def test_retry_on_retries_exceptions_with_attempts_counted(tmp_path):
    path = tmp_path / "attempts"
    with Pool(1, retries=3, retry_on=(Flaky,)) as pool:
        assert pool.apply(fail_first_attempts, ((str(path), 2),)) == "ok"
    assert len(path.read_text()) == 3
    path.unlink()
    with Pool(1, retries=1, retry_on=(Flaky,)) as pool:
        with pytest.raises(Flaky) as info:
            pool.apply(fail_first_attempts, ((str(path), 5),))
    assert info.value.attempts == 2


@pytest.mark.timeout(30)
def test_exceptions_are_not_retried_by_default(tmp_path):
    path = tmp_path / "attempts"
    with Pool(1, retries=3) as pool:
        with pytest.raises(Flaky):
            pool.apply(fail_first_attempts, ((str(path), 1),))
    assert len(path.read_text()) == 1


@pytest.mark.timeout(30)
def test_worker_over_its_memory_limit_is_recycled_after_the_task():
    with Pool(1, max_memory_per_child="60M") as pool:
        pids = pool.map(hog_memory, [100, 100, 100], chunksize=1)
        stats = pool.stats()
    assert len(set(pids)) >= 2  # replaced after the first task that grew it
    assert stats.recycled_for_memory >= 1


@pytest.mark.timeout(30)
def test_min_free_memory_holds_tasks_back():
    with Pool(1, min_free_memory="1000T") as pool:  # more than any machine has free
        result = pool.map_async(sleep_for, [0])
        time.sleep(0.5)
        assert not result.ready()
        assert pool.stats().tasks_queued == 1
    with pytest.raises(TaskCancelledError):
        result.get(timeout=5)


@pytest.mark.timeout(30)
def test_stats_report_busy_idle_and_restarts():
    with Pool(2, retries=0) as pool:
        pool.map(sleep_for, [0.1] * 4)
        pool.apply_async(os._exit, (1,)).wait(10)
        stats = pool.stats()
    assert stats.tasks_succeeded == 4 and stats.tasks_failed == 1
    assert stats.worker_restarts == 1
    assert sum(w.busy_s for w in stats.workers) >= 0.35
    assert all(w.idle_s >= 0 for w in stats.workers)
    assert any(w.last_exit == "exit code 1" for w in stats.workers)


# ---- property: exactly one outcome per task, whatever the faults ------------------------

def faulty(action):
    kind, value = action
    if kind == "raise":
        raise ValueError(value)
    if kind == "exit":
        os._exit(value % 100 + 1)
    if kind == "sysexit":
        raise SystemExit(value)
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "sleep":
        time.sleep(value / 1000)
    return value


ACTIONS = st.tuples(st.sampled_from(["ok", "ok", "ok", "ok", "sleep", "raise", "exit",
                                     "sysexit", "kill"]),
                    st.integers(min_value=0, max_value=20))
EXPECTED = {"raise": ValueError, "exit": WorkerCrashedError, "kill": WorkerCrashedError,
            "sysexit": WorkerExitedError}


@pytest.fixture(scope="module")
def shared_pool():
    pool = Pool(2, retries=0)
    yield pool
    pool.terminate()


@pytest.mark.timeout(120)
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(actions=st.lists(ACTIONS, min_size=1, max_size=25),
       api=st.sampled_from(["map", "imap", "imap_unordered", "submit"]))
def test_every_task_ends_with_exactly_one_right_outcome(shared_pool, actions, api):
    pool = shared_pool
    if api == "map":
        outcomes = list(enumerate(pool.map(faulty, actions, return_exceptions=True)))
    elif api == "imap":
        outcomes = list(enumerate(pool.imap(faulty, actions, errors="return")))
    elif api == "imap_unordered":
        outcomes = [(o.index, o.value if o.ok else o.error)
                    for o in pool.imap_outcomes(faulty, actions, ordered=False)]
    else:
        futures = [pool.submit(faulty, a) for a in actions]
        concurrent.futures.wait(futures, timeout=60)
        outcomes = [(i, f.exception() or f.result()) for i, f in enumerate(futures)]
    assert sorted(i for i, _ in outcomes) == list(range(len(actions)))  # one each, none lost
    for index, value in outcomes:
        kind, number = actions[index]
        if kind in EXPECTED:
            assert isinstance(value, EXPECTED[kind]), (kind, value)
        else:
            assert value == number
    stats = pool.stats()
    assert stats.tasks_queued == 0 and stats.tasks_running == 0


def fail_if_odd(x):
    if x % 2:
        raise ValueError(f"odd {x}")
    time.sleep(0.01)
    return x


@pytest.mark.timeout(30)
@pytest.mark.parametrize("halt,threshold", [("soon,fail=2", 2), ("now,fail=2", 2),
                                            ("soon,fail=10%", 4)])
def test_halt_policy_stops_a_call_after_enough_failures(halt, threshold):
    with Pool(1) as pool:
        outcomes = list(pool.imap_outcomes(fail_if_odd, range(40), halt=halt))
        assert len(outcomes) == 40  # every input still has exactly one outcome
        failed = [o for o in outcomes if not o.ok and isinstance(o.error, ValueError)]
        cancelled = [o for o in outcomes if isinstance(o.error, TaskCancelledError)]
        # the threshold, plus at most the one task the worker had prefetched
        assert threshold <= len(failed) <= threshold + 1 and len(cancelled) >= 25
        assert all(o.attempts == 0 for o in cancelled if "before it started" in str(o.error))
        assert pool.map(fail_if_odd, [0, 2]) == [0, 2]  # other calls are not halted


@pytest.mark.timeout(30)
@pytest.mark.parametrize("halt,ok_at_least", [("soon,success=3", 3), ("now,done=4", 2)])
def test_halt_after_successes_or_finished_inputs(halt, ok_at_least):
    with Pool(1) as pool:
        outcomes = list(pool.imap_outcomes(fail_if_odd, range(40), halt=halt))
        assert len(outcomes) == 40  # every input still has exactly one outcome
        succeeded = [o for o in outcomes if o.ok]
        cancelled = [o for o in outcomes if isinstance(o.error, TaskCancelledError)]
        assert ok_at_least <= len(succeeded) <= ok_at_least + 2 and len(cancelled) >= 30


@pytest.mark.timeout(10)
def test_bad_halt_policy_is_refused():
    with Pool(1) as pool:
        with pytest.raises(ValueError, match="halt"):
            pool.map(fail_if_odd, [0], halt="sometimes")


def record_start_and_sleep(args):
    folder, item = args
    with open(os.path.join(folder, str(item)), "w"):
        pass
    time.sleep(0.6)
    return item


@pytest.mark.timeout(30)
def test_cancel_without_kill_starts_nothing_more_and_lets_running_tasks_finish(tmp_path):
    """What was sent to a worker behind its running task (prefetched) must not start either:
    the iterator's cancel(kill_running=False) is the CLI's first Ctrl-C and --halt soon."""
    with Pool(2) as pool:
        outcomes = pool.imap_outcomes(record_start_and_sleep,
                                      [(str(tmp_path), i) for i in range(40)])
        deadline = time.monotonic() + 10
        while len(os.listdir(tmp_path)) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)  # the second pair started: task times are known, batches queued
        assert pool.stats().tasks_running == 2  # started, not merely sent to a worker
        outcomes.cancel(kill_running=False)
        results = list(outcomes)
        assert pool.map(abs, [-1]) == [1]  # the pool itself goes on
    started = {int(name) for name in os.listdir(tmp_path)}
    assert len(results) == 40 and len(started) == 4
    assert {o.index for o in results if o.ok} == started  # running ones finished, not killed
    for outcome in results:
        if outcome.index not in started:
            assert isinstance(outcome.error, TaskCancelledError) and outcome.attempts == 0


@pytest.mark.timeout(30)
def test_a_cancelled_future_waiting_in_a_workers_pipe_never_starts(tmp_path):
    """cancel() of a future whose task was already sent to a worker (behind a running one)
    returns True, so the task must not run; the rest of its batch still runs, once."""
    with Pool(1) as pool:
        first = pool.submit(record_start_and_sleep, (str(tmp_path), 0))
        futures = [pool.submit(record_start_and_sleep_short, (str(tmp_path), i))
                   for i in range(1, 40)]
        deadline = time.monotonic() + 10
        while not os.listdir(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.01)
        held = pool.stats().workers[0]  # the worker now holds the first task and maybe more
        assert held.pid is not None
        assert futures[0].cancel()
        assert first.result(timeout=20) == 0
        assert [f.result(timeout=20) for f in futures[1:]] == list(range(2, 40))
    started = sorted(int(name) for name in os.listdir(tmp_path))
    assert started == [0] + list(range(2, 40))  # each once (a file per start), 1 never


def record_start_and_sleep_short(args):
    folder, item = args
    path = os.path.join(folder, str(item))
    assert not os.path.exists(path), f"{item} started twice"
    with open(path, "w"):
        pass
    time.sleep(0.001)
    return item


@pytest.mark.timeout(60)
@pytest.mark.parametrize("api", ["map", "imap", "imap_outcomes"])
def test_a_supervisor_bug_that_loses_inputs_fails_the_call_instead_of_hanging(api, monkeypatch):
    # The supervisor thread dies of an exception after taking a block of inputs off the
    # queue and before any worker has it: nothing records those inputs any more.  Their call
    # must still end, with the supervisor's error, and the pool must still shut down.
    from procqueue.dispatch import Dispatcher

    def lose_the_block(self, slot, block):
        raise RuntimeError("injected supervisor bug")

    monkeypatch.setattr(Dispatcher, "_send_block", lose_the_block)
    with Pool(2) as pool:
        call = getattr(pool, api)
        with pytest.raises(PoolBrokenError, match="injected supervisor bug"):
            list(call(abs, range(1000), chunksize=100))
        with pytest.raises(PoolBrokenError):
            pool.submit(abs, 1)  # (no process is left: the autouse fixture checks)
