"""Pure parts, tested without processes: task state machine, chunk sizing, scheduling and
retry policy, the wire's exception capture, CPU planning and config validation."""
from __future__ import annotations

import json
import pickle
from typing import Any

import hypothesis
import pytest
from hypothesis import strategies as st

from procqueue import errors
from procqueue.affinity import parse_cpu_list, plan_cpus, worker_thread_env
from procqueue.admission import ConcurrencyGate, RateGateAdapter, rate_gate_for
from procqueue.chunking import (MAX_BATCH_TASKS, MAX_BATCHES_PER_S, MIN_BATCH_S, TARGET_BATCH_S,
                                TAIL_MAX_BATCHES_PER_S, ChunkSizer)
from procqueue.config import PoolConfig
from procqueue.protocol import CallKind, capture_exception, restore_exception
from procqueue.errors import TaskTimeoutError
from procqueue.inbox import Close, Inbox, SubmitTasks
from procqueue.retry import FailureKind, RetryPolicy
from procqueue.limits import KeyedLimit, Rate
from procqueue.scheduler import Scheduler
from procqueue.tasks import IllegalTransition, Job, Task, TaskState


class _Sink:
    def starting(self, task):
        return True

    def deliver(self, task, ok, value):
        pass


def make_job(job_id=1, chunksize=None, processes=2):
    sizer = ChunkSizer(processes, chunksize)
    return Job(job_id, 0, b"", CallKind.ONE, _Sink(), timeout_s=None,
               sizer=sizer)


def make_tasks(job, n, start_id=0):
    return [Task(start_id + i, job, i, b"x", i) for i in range(n)]


# ---- tasks ------------------------------------------------------------------------------

def test_task_reaches_exactly_one_terminal_state():
    task = make_tasks(make_job(), 1)[0]
    task.move(TaskState.DISPATCHED)
    task.move(TaskState.DONE)
    for state in TaskState:
        with pytest.raises(IllegalTransition):
            task.move(state)


def test_task_cannot_skip_dispatch_to_done():
    task = make_tasks(make_job(), 1)[0]
    with pytest.raises(IllegalTransition):
        task.move(TaskState.DONE)


# ---- inbox ------------------------------------------------------------------------------

def test_inbox_joins_tasks_posted_alone_with_submits_in_posting_order():
    """A submit() posts its Task alone; the supervisor takes each run of them and of
    SubmitTasks as one SubmitTasks, in order, and never across another command."""
    inbox = Inbox()
    try:
        t = make_tasks(make_job(), 5)
        error = ValueError("not picklable")
        for posted in (t[0], SubmitTasks([t[1]], {t[1].id: error}), t[2], Close(), t[3], t[4]):
            inbox.post(posted)
        taken = inbox.take_all()
    finally:
        inbox.close()
    assert taken == [SubmitTasks(t[:3], {t[1].id: error}), Close(), SubmitTasks(t[3:], {})]


# ---- chunking ---------------------------------------------------------------------------

def test_chunker_probes_with_single_tasks_until_measured():
    sizer = ChunkSizer(2)
    assert sizer.next_size(1000) == 1
    sizer.observe(10, 10 * 1e-6)
    assert sizer.next_size(100_000) > 1


def test_chunks_shrink_as_the_input_runs_out():
    sizer = ChunkSizer(4)
    sizer.observe(100, 100 * 2e-4)  # 0.2 ms tasks: by time alone, 75 per batch
    sizes = [sizer.next_size(q) for q in (100_000, 1000, 100, 8, 1)]
    assert sizes == sorted(sizes, reverse=True)
    assert sizes[-1] == 1
    assert sizer.next_size(100) <= 100 / (2 * 4) + 1  # never more than a 1/(2N) share


def test_tiny_tasks_stop_shrinking_at_a_millisecond_of_work():
    # Below MIN_BATCH_S of work a batch's round trip costs more than the balance it buys.
    sizer = ChunkSizer(2)
    sizer.observe(1000, 1000 * 1e-6)  # 1 us tasks
    assert sizer.next_size(100_000) == MAX_BATCH_TASKS
    floor = MIN_BATCH_S / 1e-6
    assert floor - 1 <= sizer.next_size(2000) <= floor  # guided alone would say 500
    assert sizer.next_size(600) == 600  # the last ms of work goes in one batch


def test_many_workers_get_batches_that_keep_round_trips_per_second_bounded():
    # one supervisor makes a few thousand round trips a second: with N workers of 1 ms tasks,
    # a batch holds N / MAX_BATCHES_PER_S of work, so N workers cost it at most that many
    at_1ms = [ChunkSizer(n) for n in (2, 64, 128)]
    for sizer in at_1ms:
        sizer.observe(1000, 1000 * 1e-3)
    assert [s.next_size(1_000_000) for s in at_1ms] == [
        round(TARGET_BATCH_S / 1e-3), round(64 / MAX_BATCHES_PER_S / 1e-3),
        round(128 / MAX_BATCHES_PER_S / 1e-3)]
    # the tail still spreads over the workers, in batches no smaller than keep the round
    # trips a second bounded there too: 8 ms of work each at 64 workers
    assert at_1ms[1].next_size(20_000) <= 20_000 / (2 * 64) + 1
    assert at_1ms[1].next_size(1000) == round(64 / TAIL_MAX_BATCHES_PER_S / 1e-3) == 8
    assert at_1ms[1].next_size(5) == 5  # never more than what is queued
    # a cap set for a journaled call (what a SIGKILL may lose) is not raised
    capped = at_1ms[1].with_target(0.010)
    assert capped.next_size(1_000_000) == 10


def test_the_tail_floor_grows_with_the_workers_and_stays_a_millisecond_for_few():
    # 64 workers shrinking to 1 ms batches asked one supervisor for 64,000 round trips a
    # second in the tail; up to 8 workers keep the 1 ms floor (at most 8,000 a second)
    floor_ms = {n: max(MIN_BATCH_S, n / TAIL_MAX_BATCHES_PER_S) * 1e3 for n in (2, 8, 16, 64)}
    assert floor_ms == {2: 1.0, 8: 1.0, 16: 2.0, 64: 8.0}
    sizes = {}
    for workers in floor_ms:
        sizer = ChunkSizer(workers)
        sizer.observe(1000, 1000 * 1e-4)  # 0.1 ms tasks
        sizes[workers] = sizer.next_size(200)  # near the end of the input
    # guided shrinking (200 / 2N) where it asks for more work than the floor, else the floor
    assert sizes == {2: 50, 8: 13, 16: 20, 64: 80}


def test_slow_tasks_travel_alone():
    sizer = ChunkSizer(2)
    sizer.observe(1, 0.2)
    assert sizer.next_size(10_000) == 1


def test_chunk_size_is_capped():
    sizer = ChunkSizer(1)
    sizer.observe(1000, 1e-9)
    assert sizer.next_size(10**7) == MAX_BATCH_TASKS


def test_fixed_chunksize_is_respected():
    sizer = ChunkSizer(2, fixed=7)
    assert sizer.next_size(100) == 7
    assert sizer.next_size(3) == 3


def test_a_call_may_take_shorter_batches_from_what_was_measured():
    # A journaled call: what a worker finished but has not sent is lost with the run.
    sizer = ChunkSizer(2)
    sizer.observe(100, 100 * 0.001)  # 1 ms tasks: 25 to a batch of TARGET_BATCH_S
    short = sizer.with_target(0.010)
    assert short.next_size(10_000) == 10 and sizer.next_size(10_000) == 25
    fixed = ChunkSizer(2, fixed=50)
    assert fixed.with_target(0.010) is fixed  # the caller's chunksize is kept


def test_a_batch_reports_what_it_finished_once_unless_it_runs_far_longer_than_sized():
    from procqueue.chunking import MIN_REPORT_S

    few, many = ChunkSizer(2), ChunkSizer(64)
    assert few.report_interval_s() == MIN_REPORT_S  # 25 ms batches
    assert many.report_interval_s() == pytest.approx(2 * 64 / MAX_BATCHES_PER_S)  # 256 ms
    assert many.with_target(0.010).report_interval_s() == MIN_REPORT_S  # a journaled call
    assert ChunkSizer(64, fixed=1000).report_interval_s() == MIN_REPORT_S  # unknown length


@pytest.mark.parametrize("processes,fixed", [(0, None), (2, 0)])
def test_chunker_rejects_bad_arguments(processes, fixed):
    with pytest.raises(ValueError):
        ChunkSizer(processes, fixed)


# ---- scheduler --------------------------------------------------------------------------

def test_calls_are_served_fifo_and_batches_hold_one_call():
    sched = Scheduler()
    a, b = make_job(1, chunksize=10), make_job(2, chunksize=10)
    for t in make_tasks(a, 3, 0) + make_tasks(b, 3, 100):
        sched.enqueue(t)
    first = sched.next_batch(100)
    assert [t.job.id for t in first] == [1, 1, 1]
    assert [t.index for t in first] == [0, 1, 2]
    assert [t.job.id for t in sched.next_batch(100)] == [2, 2, 2]
    assert sched.next_batch(100) == []
    assert sched.queued == 0


def _gated_scheduler(gates, workers, pool_gates):
    sched = Scheduler(gates if pool_gates else (), workers)
    job = make_job(chunksize=100, processes=workers)
    if not pool_gates:
        job.gates = gates
    tasks = make_tasks(job, 1000)
    for task in tasks:
        sched.enqueue(task)
    return sched, tasks


@pytest.mark.parametrize("pool_gates", [False, True])
def test_a_batch_under_concurrency_limits_holds_one_permit_until_its_last_task_ends(pool_gates):
    # A worker runs its batch one task at a time: a batch is one task running.  A permit per
    # task made a batch sized for 1 ms tasks (100 here) take every permit of concurrency=64
    # and leave 63 of 64 workers idle.
    gate = ConcurrencyGate(64)
    sched, _ = _gated_scheduler((gate,), 64, pool_gates)
    batch = sched.next_batch(1000, 0.0)
    assert len(batch) == 100 and gate.running == 1
    for task in batch:
        task.move(TaskState.DISPATCHED)
    for task in batch[:-1]:
        task.move(TaskState.DONE)
    assert gate.running == 1
    batch[-1].move(TaskState.FAILED)
    assert gate.running == 0


@pytest.mark.parametrize("limit, workers, per_batch", [(64, 64, 1), (256, 64, 4), (3, 8, 1),
                                                       (1000, 2, 100)])
def test_a_batch_that_takes_a_permit_per_task_takes_its_share(limit, workers, per_batch):
    # With a rate gate too, each task takes its own permits (a rate counts starts).
    gate = ConcurrencyGate(limit)
    rate = RateGateAdapter(rate_gate_for(Rate(10**6, 1.0)))
    sched, _ = _gated_scheduler((gate, rate), workers, pool_gates=False)
    assert len(sched.next_batch(1000, 0.0)) == per_batch
    assert gate.running == per_batch


def _keyed_scheduler(keys, per_key, workers, tasks_per_key=4, batch_size=8):
    sched = Scheduler((), workers)
    job = make_job(chunksize=batch_size, processes=workers)
    job.keyed = KeyedLimit(per_key)
    for i, task in enumerate(make_tasks(job, keys * tasks_per_key)):
        task.key = i % keys
        sched.enqueue(task)
    return sched, job.keyed


@pytest.mark.parametrize("keys, per_key, running, ahead", [
    (1024, 4, 64, True),  # 4,096 places, 64 taken: plenty to spare
    (64, 1, 32, False),  # the 32 free places are what the 32 idle workers need
    (64, 1, 64, False)])  # every key at its cap
def test_a_busy_worker_gets_a_keyed_batch_ahead_only_while_keys_have_places_to_spare(
        keys, per_key, running, ahead):
    """A prefetched batch waits behind its worker's running one while holding its keys'
    places: taken where the keys have at least two places per worker to spare, not where a
    worker about to go idle would find none."""
    sched, limit = _keyed_scheduler(keys, per_key, workers=64)
    for _ in range(running):
        assert sched.next_batch(8, 0.0)
    batch = sched.next_batch(8, 0.0, prefetch=True)
    assert bool(batch) == ahead
    held = {task.key for task in batch}
    assert all(limit.running(key) <= per_key for key in range(keys))
    assert all(limit.running(key) >= 1 for key in held)


def test_many_keys_leave_places_for_a_batch_ahead_of_every_worker():
    """1,024 keys of 4 on 64 workers: a worker holds two batches at once (its running one and
    one sent ahead), and a keyed batch holds a place of each key it has tasks of.  The first
    batches must leave places for the batches ahead: taking every place at once left each
    worker waiting for a round trip after every batch."""
    sched, limit = _keyed_scheduler(1024, 4, workers=64, tasks_per_key=32, batch_size=100)
    running = [sched.next_batch(100, 0.0) for _ in range(64)]
    ahead = [sched.next_batch(100, 0.0, prefetch=True) for _ in range(64)]
    assert all(running) and all(ahead)
    assert all(limit.running(key) <= 4 for key in range(1024))


def test_a_busy_worker_gets_more_of_the_keys_it_holds_once_no_other_key_may_start():
    """64 keys of one on 64 workers: every place is held, so a batch ahead for a busy worker
    takes more tasks of its own keys, in their places (they run after its batch's, on the
    same worker): no new place is taken, and each place is given back only when the last
    task in it ends."""
    sched, limit = _keyed_scheduler(64, 1, workers=64, tasks_per_key=16)
    running = [sched.next_batch(8, 0.0) for _ in range(64)]
    assert all(running) and all(limit.running(key) == 1 for key in range(64))
    mine = running[5]
    ahead = sched.next_batch(8, 0.0, prefetch=True, after=mine)
    assert ahead and {t.key for t in ahead} == {t.key for t in mine}
    assert all(limit.running(key) == 1 for key in range(64))  # no place more
    for task in mine + ahead:
        task.move(TaskState.DISPATCHED)
    for task in mine:
        task.move(TaskState.DONE)
    key = mine[0].key
    assert limit.running(key) == 1  # its later tasks still run in that place
    for task in ahead:
        task.move(TaskState.DONE)
    assert limit.running(key) == 0


def test_a_worker_keeps_no_keys_place_while_another_key_waits_for_one():
    # 65 keys of one on 64 workers: one key may start, so a busy worker's batch ahead does
    # not hold on to its keys (round robin), and one place to spare is not enough to take
    sched, _ = _keyed_scheduler(65, 1, workers=64, tasks_per_key=16)
    running = [sched.next_batch(8, 0.0) for _ in range(64)]
    assert sched.next_batch(8, 0.0, prefetch=True, after=running[0]) == []


def test_a_keyed_task_its_gate_refuses_goes_back_to_the_queue_and_is_counted_there():
    # A rate of 3 starts under 10 keys: a batch takes 3; the refused task is queued again,
    # first of its key, and the counts (what the dispatcher and the batch sizes read) agree.
    sched, limit = _keyed_scheduler(10, 1, workers=1, tasks_per_key=1)
    job = next(iter(sched._queues.values())).job
    job.gates = (RateGateAdapter(rate_gate_for(Rate(3, 60.0))),)
    first = sched.next_batch(8, 0.0)
    assert [t.key for t in first] == [0, 1, 2]
    assert sched.queued == 7
    assert sched.next_batch(8, 0.0) == []  # the rate is spent: nothing starts
    assert sched.queued == 7 and sched.admission_wait_until is not None
    assert all(limit.running(key) == (1 if key < 3 else 0) for key in range(10))


def test_a_task_admitted_then_cancelled_before_it_starts_gives_its_permit_back():
    # Its Future was cancelled between admission and dispatch (Dispatcher._may_start).
    gate = ConcurrencyGate(1)
    rate = RateGateAdapter(rate_gate_for(Rate(10**6, 1.0)))
    sched, _ = _gated_scheduler((gate, rate), 1, pool_gates=False)
    [task] = sched.next_batch(1, 0.0)
    assert gate.running == 1
    task.move(TaskState.CANCELLED)
    assert gate.running == 0


def test_retried_task_goes_to_the_front():
    sched = Scheduler()
    job = make_job(chunksize=1)
    tasks = make_tasks(job, 3)
    for t in tasks:
        sched.enqueue(t)
    sched.enqueue(Task(99, job, 9, b"", 9), front=True)
    assert sched.next_batch(1)[0].id == 99


def test_cancelled_tasks_are_skipped():
    sched = Scheduler()
    job = make_job(chunksize=5)
    tasks = make_tasks(job, 3)
    for t in tasks:
        sched.enqueue(t)
    tasks[1].move(TaskState.CANCELLED)
    assert [t.id for t in sched.next_batch(5)] == [0, 2]


def test_retry_waits_for_its_backoff():
    sched = Scheduler()
    task = make_tasks(make_job(), 1)[0]
    task.move(TaskState.DISPATCHED)
    task.move(TaskState.RETRY_WAIT)
    sched.wait_for_retry(task, not_before=10.0)
    assert sched.next_retry_at() == 10.0
    assert sched.release_due_retries(now=9.9) == []
    assert sched.release_due_retries(now=10.0) == [task]


def _policy(retries=1, retry_on=(), timeouts=False):
    return RetryPolicy(retries, retry_on + ((TaskTimeoutError,) if timeouts else ()), 0.05, 1.0)


@pytest.mark.parametrize("kind,error,retry_on,timeouts,expected", [
    (FailureKind.CRASH, None, (), False, True),
    (FailureKind.EXCEPTION, ValueError(), (), False, False),
    (FailureKind.EXCEPTION, ValueError(), (ValueError,), False, True),
    (FailureKind.EXCEPTION, KeyError(), (ValueError,), False, False),
    (FailureKind.TIMEOUT, None, (), False, False),
    (FailureKind.TIMEOUT, None, (), True, True),
])
def test_retry_policy_table(kind, error, retry_on, timeouts, expected):
    assert _policy(1, retry_on, timeouts).should_retry(1, kind, error) is expected


def test_retries_are_bounded():
    assert _policy(retries=2).should_retry(2, FailureKind.CRASH, None)
    assert not _policy(retries=2).should_retry(3, FailureKind.CRASH, None)


def test_backoff_grows_and_is_capped():
    policy = RetryPolicy(10, (), 0.1, 1.0)
    for attempts in range(1, 10):
        delay = policy.backoff(attempts)
        ceiling = min(1.0, 0.1 * 2 ** (attempts - 1))
        assert ceiling / 2 <= delay <= ceiling


# ---- protocol -----------------------------------------------------------------------------

def _refuse_to_load(*args):
    raise TypeError("cannot be rebuilt here")


class NeedsTwoArgs(Exception):
    """Pickles, but cannot be unpickled (as an exception whose __init__ does not match its
    args; spelled out with __reduce__ because tblib, which distributed imports, would
    otherwise rebuild such exceptions without calling __init__)."""

    def __init__(self, a, b):
        super().__init__(a)

    def __reduce__(self):
        return _refuse_to_load, self.args


def _raise(exc):
    try:
        raise exc
    except BaseException as caught:
        return capture_exception(caught)


def test_exception_keeps_type_and_gets_remote_traceback():
    restored = restore_exception(_raise(ValueError("bad 7")))
    assert type(restored) is ValueError and str(restored) == "bad 7"
    assert isinstance(restored.__cause__, errors.RemoteTraceback)
    assert "_raise" in restored.__cause__.tb_text


def test_exception_that_cannot_be_unpickled_becomes_remote_error():
    restored = restore_exception(_raise(NeedsTwoArgs(1, 2)))
    assert isinstance(restored, errors.RemoteError)
    assert "NeedsTwoArgs" in restored.type_name and "1" in str(restored)
    assert "_raise" in restored.traceback_text


def test_procqueue_errors_pickle_with_their_details():
    err = errors.WorkerCrashedError("died", exitcode=-11, index=3, input_repr="'x'", pid=42,
                                    attempts=2)
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.exitcode, copy.index, copy.pid, copy.attempts) == (-11, 3, 42, 2)
    assert copy.signal == "SIGSEGV"
    assert "task 3" in str(copy) and "pid 42" in str(copy)


def test_annotate_keeps_type_message_and_notes_and_names_the_input_in_the_cause():
    exc = restore_exception(_raise(KeyError("k")))
    exc = errors.annotate(exc, index=5, input_repr="'five'", pid=9, attempts=2)
    assert isinstance(exc, KeyError) and exc.index == 5 and exc.pid == 9 and exc.attempts == 2
    assert str(exc) == "'k'" and not getattr(exc, "__notes__", None)
    assert "task 5 (input 'five') in worker pid 9, attempt 2" in exc.__cause__.tb
    assert "'five'" not in exc.__cause__.tb_text  # the bare traceback, as the worker sent it


class _LookedForAProcess(Exception):
    def __init__(self, pid):
        super().__init__(f"no process {pid}")
        self.pid = pid  # as psutil.NoSuchProcess


def test_annotate_leaves_an_attribute_the_exception_has_of_its_own():
    exc = restore_exception(_raise(_LookedForAProcess(999999)))
    exc = errors.annotate(exc, index=5, input_repr="'five'", pid=9, attempts=1)
    assert exc.pid == 999999 and exc.index == 5
    assert "in worker pid 9" in exc.__cause__.tb  # the worker is still named


def test_argument_error_is_a_type_error_and_the_error_pickling_raised():
    error = errors.argument_error("cannot pickle", RuntimeError("no"), index=2, input_repr="x")
    assert isinstance(error, errors.ArgumentSerializationError)
    assert isinstance(error, RuntimeError) and isinstance(error, TypeError)
    assert isinstance(error.__cause__, RuntimeError)
    copy = pickle.loads(pickle.dumps(error))  # travels, e.g. in a multiprocessing queue
    assert type(copy) is type(error) and copy.index == 2


# ---- affinity and config ------------------------------------------------------------------

def test_cpu_list_parsing():
    assert parse_cpu_list("0-3,8,10-11") == [0, 1, 2, 3, 8, 10, 11]
    with pytest.raises(ValueError):
        parse_cpu_list("3-1")


def test_plan_wraps_round_robin_and_uses_each_cpu_once_first():
    plan = plan_cpus(5, allowed=[0, 1])
    assert [cpus[0] for cpus in plan] == [0, 1, 0, 1, 0]
    assert sorted(c for (c,) in plan_cpus(2, allowed=[4, 6])) == [4, 6]


def test_blas_threads_default_to_one_but_user_settings_win(monkeypatch):
    for name in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # a LocalCluster sets them here
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    env = worker_thread_env({"MKL_NUM_THREADS": "2"})
    assert "OMP_NUM_THREADS" not in env  # inherited from the user's environment
    assert env["MKL_NUM_THREADS"] == "2"
    assert env["OPENBLAS_NUM_THREADS"] == "1"


@pytest.mark.parametrize("kwargs,exc", [
    ({"processes": 0}, ValueError),
    ({"processes": -1}, ValueError),
    ({"processes": 1.5}, TypeError),
    ({"processes": 1, "maxtasksperchild": 0}, ValueError),
    ({"processes": 1, "maxtasksperchild": "2"}, ValueError),  # as multiprocessing.Pool
    ({"processes": 1, "initializer": 3}, TypeError),
    ({"processes": 1, "timeout": 0}, ValueError),
    ({"processes": 1, "retries": -1}, ValueError),
    ({"processes": 1, "retry_on": (3,)}, TypeError),
    ({"processes": 1, "nonsense": 1}, TypeError),
    ({"processes": 1, "context": 3.0}, TypeError),
])
def test_config_validation_names_the_rule(kwargs, exc):
    with pytest.raises(exc):
        PoolConfig.build(**kwargs)


def test_calls_of_one_function_share_a_batch_of_the_functions_size():
    sched = Scheduler()
    sizer = ChunkSizer(2)  # unmeasured: batches of one
    jobs = [Job(i, 7, b"", CallKind.ARGS_KWARGS, _Sink(), timeout_s=None,
                sizer=sizer) for i in range(6)]
    for i, job in enumerate(jobs):
        sched.enqueue(Task(i, job, 0, b"", i))
    assert [len(sched.next_batch(100)) for _ in range(6)] == [1] * 6
    sizer.observe(100, 100 * 5e-4)  # measured at 0.5 ms: now they travel together
    for i, job in enumerate(jobs):
        sched.enqueue(Task(10 + i, job, 0, b"", i))
    assert len(sched.next_batch(100)) == 2  # guided: ceil(6 queued / (2 * 2 workers))


def test_a_function_still_probed_gets_no_batch_ahead():
    # While no task of the function is measured its batches hold one task; a second pass of
    # those to busy workers (prefetch) only put off the sized batches its first results allow
    for fixed in (None, 10):
        sched = Scheduler()
        sizer = ChunkSizer(2, fixed)
        job = Job(1, 7, b"", CallKind.ONE, _Sink(), timeout_s=None, sizer=sizer)
        for i in range(100):
            sched.enqueue(Task(i, job, i, b"", i))
        ahead = sched.next_batch(100, prefetch=True)
        assert len(ahead) == (0 if fixed is None else 10)  # a chunksize given: no probing
        assert len(sched.next_batch(100)) == (1 if fixed is None else 10)  # an idle worker
        sizer.observe(10, 10 * 1e-3)
        assert len(sched.next_batch(100, prefetch=True)) == (25 if fixed is None else 10)


class _WorkerEnd:
    """A worker's pipe as the dispatcher sees it: what was sent, and whether it answered."""

    def __init__(self, answers: bool) -> None:
        self.sent: list[Any] = []
        self.answers = answers

    def poll(self) -> bool:
        return self.answers and bool(self.sent)


class _Workers:
    def __init__(self, n: int, answering: set[int]) -> None:
        from procqueue.worker_slots import Slot, SlotPhase

        self.slots = [Slot(i, ()) for i in range(n)]
        for slot in self.slots:
            slot.phase = SlotPhase.READY
            slot.pid = 1000 + slot.index
            slot.conn = _WorkerEnd(slot.index in answering)

    def send(self, slot: Any, message: Any, fds: tuple[int, ...] = ()) -> bool:
        slot.conn.sent.append(message)
        return True


@pytest.mark.parametrize("answering", [set(), {0}])
def test_a_pass_of_one_task_probes_stops_when_the_first_probed_worker_answers(answering):
    # While no task of the function is measured, every idle worker would get a one-task
    # batch; once the first of them has a result to read, the pass stops so the supervisor
    # reads it, and the workers not served yet get batches sized from it
    from procqueue.dispatch import Dispatcher
    from procqueue.task_book import TaskBook

    sched = Scheduler()
    book = TaskBook(sched, RetryPolicy(0, (), 0.0, 0.0), lambda job: None)
    workers = _Workers(8, answering)
    dispatcher = Dispatcher(PoolConfig.build(8), book, workers)  # type: ignore[arg-type]
    sizer = ChunkSizer(8)
    job = Job(1, 7, b"", CallKind.ONE, _Sink(), timeout_s=None, sizer=sizer)
    for i in range(10_000):
        sched.enqueue(Task(i, job, i, b"", i))
    dispatcher.dispatch()
    served = [len(slot.batches) for slot in workers.slots]
    if not answering:  # a slow function: every worker gets its probe, none a second one
        assert served == [1] * 8
        return
    assert served == [1] + [0] * 7
    sizer.observe(1, 1e-3)  # what the supervisor's loop does with the answer
    dispatcher.dispatch()
    sizes = [len(batch.tasks) for slot in workers.slots[1:] for batch in slot.batches]
    assert sizes and all(size > 1 for size in sizes)  # sized, not probes
    assert len(workers.slots[0].batches) == 2  # and the answering worker a batch ahead


def test_consecutive_single_task_calls_share_a_queue_and_calls_stay_fifo():
    sched = Scheduler()
    sizer = ChunkSizer(2, fixed=100)

    def job(i, single=True, gates=()):
        j = Job(i, 7, b"", CallKind.ARGS_KWARGS, _Sink(), timeout_s=None,
                sizer=sizer, gates=gates)
        j.single_task = single
        return j

    submits = [job(i) for i in range(3)]          # three submit() calls in a row
    a_map = job(10, single=False)                  # then a map call of the same function
    later = job(20)                                # then one more submit()
    gated = job(30, gates=(ConcurrencyGate(5),))   # a submit with its own limit
    order = submits + [a_map, later, gated]
    for n, j in enumerate(order):
        sched.enqueue_all([Task(100 + n, j, 0, b"", n)])
    assert len(sched._queues) == 4  # the submits | the map | the later submit | the gated one
    taken = []
    while (batch := sched.next_batch(100)):
        taken += [t.input for t in batch]
    assert taken == list(range(len(order)))  # first come, first served, across calls
    assert sched.queued == 0


# ---- the worker's untimed block loop, and plain-data results ---------------------------

def test_untimed_stretches_fit_the_revoke_interval_and_grow_at_most_twofold():
    from procqueue.worker import REVOKE_CHECK_S, UNTIMED_CHECK_MAX, _inputs_per_look

    assert _inputs_per_look(1, 1, 1e-7) == 2  # fast inputs: twice as many, no more
    assert _inputs_per_look(64, 64, 64e-7) == 128
    assert _inputs_per_look(UNTIMED_CHECK_MAX, 10**6, 1e-3) == UNTIMED_CHECK_MAX
    assert _inputs_per_look(256, 256, 256 * 0.01) == 1  # slow inputs: a look after each
    half = _inputs_per_look(256, 100, 100 * REVOKE_CHECK_S / 50)
    assert half == 50  # as many as fit in REVOKE_CHECK_S at the last stretch's pace
    assert _inputs_per_look(8, 0, 0.0) == 16  # nothing measured: grows as fast inputs do


@pytest.mark.parametrize("value", [
    [1, 2.5, "s", b"b", None, True, 10**40, complex(1, 2), bytearray(b"x")],
    {"a": [1, (2, {3})], "b": frozenset({4})},
    ({"nested": [[[]]]},),
])
def test_plain_data_pickles_in_one_go_and_unpickles_as_it_was(value):
    from procqueue.protocol import dumps_plain_data

    blob = dumps_plain_data(value)
    assert blob is not None and pickle.loads(blob) == value


class _Instance:
    pass


@pytest.mark.parametrize("value", [
    [1, _Instance()], [errors.TaskFailed], [len], {"k": __import__("enum").Enum("E", "A").A},
    [__import__("collections").OrderedDict()], [__import__("decimal").Decimal(1)],
])
def test_values_that_need_a_class_to_unpickle_are_not_plain_data(value):
    from procqueue.protocol import dumps_plain_data

    assert dumps_plain_data(value) is None


def test_plain_data_too_deep_for_one_pickle_is_not_taken_as_plain():
    from procqueue.protocol import dumps_plain_data

    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    assert dumps_plain_data([deep]) is None


def test_current_rss_bytes_follows_this_process_memory():
    from procqueue.worker import current_rss_bytes

    before = current_rss_bytes()
    block = bytearray(64 * 2**20)  # zero-filled: resident once written
    for i in range(0, len(block), 4096):
        block[i] = 1
    grown = current_rss_bytes()
    assert before > 0 and grown - before >= 48 * 2**20
    del block


class _Pipe:
    def __init__(self):
        self.sent = []

    def send_bytes(self, data):
        self.sent.append(data)


def test_a_sigterm_mid_input_sends_only_the_inputs_that_are_complete():
    # The worker's SIGTERM handler can run between any two bytecodes of the block loops: an
    # input whose value is in but not its run time, or whose error is set but not its
    # placeholder value, must not be sent (it runs again), and no failure may go as a success.
    from procqueue import worker
    from procqueue.protocol import loads, loads_message

    pipe = _Pipe()
    report = worker._BlockReport(pipe, [0] * worker.SLOT_STATE_SIZE, batch_id=7, timed=True,
                                  report_s=1.0)
    report.first = 10
    report.values.extend(["a", None, "c"])  # positions 10, 11 (failed), 12 (no time yet)
    report.errors.update({11: b"error of 11", 13: b"error of 13, before its placeholder"})
    report.seconds.extend([0.1, 0.2])
    report.send_unsent()
    (message,) = [loads_message(data) for data in pipe.sent]
    assert (message.batch_id, message.first, message.count, message.final) == (7, 10, 2, False)
    assert message.errors == {11: b"error of 11"}
    assert loads(message.values) == ["a", None] and message.seconds == [0.1, 0.2]

    columns = worker._Columns(3)
    columns.add(1, True, b"one", 0.1, 5.0)
    columns.task_ids.append(2)  # `add` interrupted after its first column
    rows = columns.complete_rows()
    assert (rows.task_ids, rows.ok, rows.payloads, rows.seconds) == ([1], [True], [b"one"], [0.1])
    empty = worker._BlockReport(pipe, [0] * worker.SLOT_STATE_SIZE, batch_id=8, timed=False,
                                 report_s=1.0)
    empty.send_unsent()
    assert len(pipe.sent) == 1  # nothing complete: nothing sent


@pytest.mark.parametrize("each_revocable, ran", [(True, [0, 1, 2, 3]), (False, list(range(8)))])
def test_a_block_of_tasks_looks_at_the_revoked_batches_before_each_input(each_revocable, ran):
    # A batch of submit() calls travels as a block whose tasks may be cancelled one by one:
    # revoked while input 3 runs, such a block starts no input after it.  A map's block
    # looks every REVOKE_CHECK_S only (its call is cancelled whole, and a look costs).
    from procqueue import worker
    from procqueue.protocol import CallKind, RunBlock, dumps, loads_message

    state = [0] * worker.SLOT_STATE_SIZE
    started = []

    def task(i):
        started.append(i)
        if i == 3:
            state[worker.REVOKED[0]] = 9  # what the supervisor's revoke writes
        return i

    pipe = _Pipe()
    message = RunBlock(9, 1, None, CallKind.ONE, 2, dumps(list(range(8))), 1.0, timed=True,
                       each_revocable=each_revocable)
    worker.run_block(pipe, state, {1: task}, message)
    (report,) = [loads_message(data) for data in pipe.sent]
    assert started == ran
    assert report.final and report.skipped == (4 if each_revocable else -1)


def test_every_wire_message_reads_back_as_sent():
    from procqueue.protocol import (BatchResults, BlockResults, CallKind, InitFailed,
                                    LoadFunction, Ready, RunBlock, RunTasks, Stop,
                                    dumps_message, loads_message)

    messages = [
        RunTasks(1, 2, b"fn", CallKind.STAR, ((3, b"a"), (4, b"b")), 0.25, (4,)),
        RunBlock(5, 2, None, CallKind.ONE, 6, b"inputs", 0.05, timed=False),
        RunBlock(5, 2, None, CallKind.STAR, 6, b"inputs", 0.05, True, each_revocable=True),
        LoadFunction(7, 2, b"fn", CallKind.ARGS_KWARGS), Stop(), Ready(1234), InitFailed(b"e"),
        BatchResults(1, [3], [False], [b"err"], [0.5], [9.0], True, 2**31, [4], [3]),
        BlockResults(5, 10, [b"x", None], {11: b"err"}, 2, [0.1, 0.2], 0.3, False, 7, 12),
    ]
    for message in messages:
        back = loads_message(dumps_message(message))
        assert type(back) is type(message) and back == message
        if hasattr(message, "kind"):
            assert back.kind is message.kind  # the enum member, not its int


# ---- how a task function travels to the workers ------------------------------------------
# cloudpickle names importable functions by reference, as pickle does; procqueue uses plain
# pickle then (no cloudpickle import in the program: ~10 ms of a cold pool's first call), and
# must give the same bytes (journals identify a function by them) and keep cloudpickle's
# copies by value wherever it would make one.

def test_importable_functions_are_sent_as_cloudpickle_would_name_them():
    import cloudpickle
    import os.path

    from procqueue.cli.loader import ScriptFunction, WorkerStart
    from procqueue.protocol import dumps_function

    script = ScriptFunction("process", path="/tmp/job.py")
    for fn in (abs, os.path.join, script, (WorkerStart(script, prints_to_stderr=True), ())):
        assert dumps_function(fn) == cloudpickle.dumps(fn, 5)


def test_a_class_of_main_and_a_module_registered_by_value_are_still_copied_by_value(tmp_path,
                                                                                    monkeypatch):
    import sys
    import types

    import cloudpickle

    from procqueue.protocol import dumps_function

    main = types.ModuleType("__main__")
    exec("class Scale:\n    def __call__(self, x):\n        return 3 * x\n", main.__dict__)
    monkeypatch.setitem(sys.modules, "__main__", main)
    scale = main.Scale()
    assert pickle.dumps(scale, 5) != cloudpickle.dumps(scale, 5)  # pickle would name it
    assert pickle.loads(dumps_function(scale)) is not scale and dumps_function(scale) == \
        cloudpickle.dumps(scale, 5)

    (tmp_path / "by_value_mod.py").write_text("def triple(x):\n    return 3 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import by_value_mod

    cloudpickle.register_pickle_by_value(by_value_mod)
    try:
        payload = dumps_function(by_value_mod.triple)
    finally:
        cloudpickle.unregister_pickle_by_value(by_value_mod)
    assert payload != pickle.dumps(by_value_mod.triple, 5)
    monkeypatch.delitem(sys.modules, "by_value_mod")
    assert pickle.loads(payload)(2) == 6  # a copy: found without its module


POOL_OF_NAMED_FUNCTIONS = """\
import os.path, sys
from procqueue import Pool
if __name__ == "__main__":
    with Pool(2) as pool:
        print(pool.map(os.path.basename, ["/a/b", "/c/d"]), pool.apply(abs, (-3,)))
        print("cloudpickle" in sys.modules)
        print(pool.map(lambda x: 2 * x, [1, 2]))
"""


# A pool's program, and the `procqueue` command, start without these (issue #24): ctypes
# (~2.5 ms) was the slot state's RawArray, dataclasses (~2.5 ms) the command's value types.
HEAVY_START_MODULES = ("ctypes", "dataclasses", "multiprocessing.sharedctypes")

POOL_THEN_MODULES = """\
import sys
from procqueue import Pool
HEAVY = {heavy!r}
if __name__ == "__main__":
    with Pool(2) as pool:
        assert pool.map(abs, [-1, -2]) == [1, 2]
    if sys.argv[1:] == ["command"]:
        sys.argv = ["procqueue", "map", sys.argv[0], "--fn", "double", ":::", "1", "2"]
        from procqueue.cli.main import main
        try:
            main()
        except SystemExit as finished:
            assert finished.code == 0, finished.code
    print(sorted(name for name in HEAVY if name in sys.modules), file=sys.stderr)

def double(x):
    return 2 * int(x)
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("what", ["pool", "command"])
def test_a_pool_and_the_command_start_without_ctypes_or_dataclasses(tmp_path, what):
    import subprocess
    import sys

    script = tmp_path / "light.py"
    script.write_text(POOL_THEN_MODULES.format(heavy=HEAVY_START_MODULES))
    run = subprocess.run([sys.executable, str(script), what], capture_output=True, text=True,
                         timeout=50)
    assert run.returncode == 0, run.stderr
    assert run.stderr.splitlines()[-1] == "[]", run.stderr
    if what == "command":
        assert [json.loads(line)["result"] for line in run.stdout.splitlines()] == [2, 4]


@pytest.mark.timeout(60)
def test_a_pool_runs_named_functions_without_loading_cloudpickle_and_lambdas_with_it(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "named.py"
    script.write_text(POOL_OF_NAMED_FUNCTIONS)
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=50)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["['b', 'd'] 3", "False", "[2, 4]"]


# ---- the functions a worker holds: what the supervisor sends without bytes -----------------

@pytest.mark.timeout(60)
@hypothesis.settings(max_examples=200, deadline=None,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(uses=st.lists(st.integers(0, 100), max_size=400),
                  failing=st.sets(st.integers(0, 100), max_size=10))
def test_a_worker_has_every_function_the_supervisor_sends_it_without_bytes(
        uses: list[int], failing: set[int], monkeypatch: pytest.MonkeyPatch) -> None:
    """More distinct functions than a worker keeps (a closure per call): the supervisor's
    KnownFunctions and the worker's cache drop the same ones, so a function sent without its
    bytes is always there, or its load's failure is.  A failed load lags the worker's cache
    behind the supervisor's set; a function sent again then counts as the newest in both."""
    from procqueue import worker
    from procqueue.protocol import LoadFunction
    from procqueue.worker_slots import KnownFunctions
    monkeypatch.setattr(worker, "_failed_functions", {})  # each example sets it anew
    known, functions = KnownFunctions(), {}
    for fn_id in uses:
        payload = None
        if fn_id not in known:
            known.add(fn_id)
            payload = b"not a pickle" if fn_id in failing else pickle.dumps(len)
        fn, error = worker._load_function(functions, LoadFunction(0, fn_id, payload,
                                                                  CallKind.ONE))
        if fn_id in failing:
            assert fn is None and b"could not unpickle" in error
        else:
            assert fn is len, restore_exception(error)
    assert len(functions) <= worker.FUNCTION_CACHE_SIZE


def test_a_sigkill_is_suspected_of_being_the_oom_killers_only_when_its_count_moved(tmp_path):
    from procqueue.outcomes import OomKills, crash_error
    vmstat = tmp_path / "vmstat"
    vmstat.write_text("pgfault 10\noom_kill 4\n")
    kills = OomKills(str(vmstat))
    assert kills.killed_since_last_look() is False
    vmstat.write_text("pgfault 12\noom_kill 5\n")
    assert kills.killed_since_last_look() is True
    assert kills.killed_since_last_look() is False  # counted once
    error = crash_error(-9, True)
    assert error.oom_suspected and "OOM killer killed a process" in str(error)
    error = crash_error(-9, False)
    assert not error.oom_suspected and "OOM" not in str(error)
    assert crash_error(-9, None).oom_suspected  # cannot tell: the hint stays
    assert not crash_error(3, None).oom_suspected
    assert OomKills(str(tmp_path / "missing")).killed_since_last_look() is None
