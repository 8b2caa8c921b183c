"""Pool behaviour beyond the multiprocessing conformance suite: lazy bounded input, pinning,
thread caps, crash recovery with every task accounted for, and no stray processes after each
way of shutting down."""
from __future__ import annotations

import concurrent.futures
import gc
import itertools
import os
import signal
import threading
import time
import weakref

import psutil
import pytest

from process_checks import living, wait_gone

from procqueue import Pool, TaskCancelledError, WorkerCrashedError


def square(x):
    return x * x


def affinity_and_pid(_):
    return os.getpid(), tuple(sorted(os.sched_getaffinity(0)))


def thread_env(_):
    return os.environ.get("OMP_NUM_THREADS"), os.environ.get("OPENBLAS_NUM_THREADS")


def slow_square(x):
    time.sleep(0.01)
    return x * x


def crash_on(x):
    kind, value = x
    if kind == "exit":
        os._exit(3)
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "segv":
        import ctypes
        ctypes.string_at(0)
    return value


def sleep_forever(_):
    time.sleep(3600)


def worker_pid(_):
    time.sleep(0.05)
    return os.getpid()


class CountingInput:
    """An endless input that counts how many items were taken from it."""

    def __init__(self):
        self.taken = 0

    def __iter__(self):
        for i in itertools.count():
            self.taken += 1
            yield i


@pytest.mark.timeout(30)
def test_imap_over_endless_generator_is_lazy_and_bounded():
    source = CountingInput()
    with Pool(2) as pool:
        results = []
        for r in pool.imap(square, source):
            results.append(r)
            if len(results) == 500:
                break
        time.sleep(0.3)  # give a runaway feeder time to show itself
        taken = source.taken
    assert results == [i * i for i in range(500)]
    # bounded: the feeder may run ahead by its window only, not consume the endless input
    assert taken < 500 + 20_000, taken


@pytest.mark.timeout(30)
def test_dropping_an_imap_iterator_stops_taking_from_an_iterator_so_join_returns():
    source = CountingInput()
    pool = Pool(2)
    it = pool.imap_unordered(square, source)
    next(it)
    del it
    pool.close()
    pool.join()  # would hang forever if the endless input were still being fed
    assert source.taken < 50_000


def touch(path):
    open(path, "w").close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["never-read", "break", "partly-read"])
def test_a_dropped_imap_iterator_still_runs_every_input_of_a_list(tmp_path, how):
    # As with multiprocessing: code that never reads imap's results (or stops reading) relies
    # on its inputs running; close() and join() wait for them
    paths = [str(tmp_path / f"f{i}") for i in range(3000)]  # more than imap's window
    pool = Pool(2)
    if how == "never-read":
        pool.imap_unordered(touch, paths, 1)
    elif how == "break":
        for _ in pool.imap(touch, paths):
            break
    else:
        it = pool.imap(touch, paths)
        for _ in range(3):
            next(it)
        del it
    gc.collect()
    pool.close()
    pool.join()
    assert sum(os.path.exists(p) for p in paths) == len(paths)
    stats = pool.stats()
    assert stats.tasks_succeeded == len(paths) and stats.tasks_cancelled == 0


def slow_inputs():
    yield 1
    time.sleep(5)  # a slow producer (a socket, stdin)
    yield 2


@pytest.mark.timeout(30)
def test_terminate_wakes_an_imap_consumer_whose_input_is_slow_to_come():
    pool = Pool(2)
    it = pool.imap(square, slow_inputs())
    assert next(it) == 1
    seen = []

    def consume():
        try:
            seen.extend(it)
        except TaskCancelledError as exc:
            seen.append(exc)

    consumer = threading.Thread(target=consume)
    consumer.start()
    time.sleep(0.2)  # (the consumer waits for input 2, which the feeder waits for)
    pool.terminate()
    consumer.join(3)
    assert not consumer.is_alive() and isinstance(seen[-1], TaskCancelledError)
    pool.join()


@pytest.mark.timeout(30)
def test_each_worker_is_pinned_to_one_cpu():
    allowed = sorted(os.sched_getaffinity(0))
    with Pool(len(allowed)) as pool:
        seen = dict(pool.map(affinity_and_pid, range(200), chunksize=1))
    assert all(len(cpus) == 1 and cpus[0] in allowed for cpus in seen.values())
    if len(seen) == len(allowed):  # every worker ran something: pinned to distinct CPUs
        assert sorted(c for (c,) in seen.values()) == allowed


@pytest.mark.timeout(30)
def test_pin_false_leaves_affinity_alone():
    allowed = tuple(sorted(os.sched_getaffinity(0)))
    with Pool(2, pin=False) as pool:
        assert {cpus for _, cpus in pool.map(affinity_and_pid, range(10))} == {allowed}


@pytest.mark.timeout(30)
def test_workers_default_blas_threads_to_one(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    with Pool(1, worker_env={"OPENBLAS_NUM_THREADS": "2"}) as pool:
        assert pool.apply(thread_env, (0,)) == ("1", "2")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind,exitcode", [("exit", 3), ("kill", -signal.SIGKILL),
                                           ("segv", -signal.SIGSEGV)])
def test_crash_fails_only_its_task_and_the_pool_goes_on(kind, exitcode):
    inputs = [("ok", i) for i in range(20)]
    inputs[7] = (kind, 7)
    with Pool(2, retries=0) as pool:
        before = {w.pid for w in pool.stats().workers}
        out = pool.map(crash_on, inputs, errors="return")
        assert [v for i, v in enumerate(out) if i != 7] == [i for i in range(20) if i != 7]
        error = out[7]
        assert isinstance(error, WorkerCrashedError)
        assert error.exitcode == exitcode and error.index == 7 and error.pid in before
        assert pool.map(square, range(5)) == [0, 1, 4, 9, 16]  # same pool, still usable
        stats = pool.stats()
        assert stats.worker_restarts >= 1
        assert stats.tasks_failed == 1 and stats.tasks_succeeded == 24


@pytest.mark.timeout(60)
class Payload:
    """An argument whose lifetime the test can watch (a weakref)."""

    def __init__(self, n):
        self.n = n


def note_pid_then_sleep(path):
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(1.0)
    return os.getpid()


@pytest.mark.timeout(60)
def test_underscore_pool_lists_the_workers_as_multiprocessing_does_and_killing_one_is_a_crash(
        tmp_path):
    # Code written for multiprocessing.Pool reads pool._pool for the worker processes (to
    # kill one in a test, or to list their pids).  Killing one from outside is a crash the
    # pool handles: the task it ran is retried on a replacement, nothing hangs.
    marker = tmp_path / "pid"
    with Pool(2, retries=1) as pool:
        pool.map(square, range(4))
        workers = pool._pool
        assert len(workers) == 2 and all(w.is_alive() and w.exitcode is None for w in workers)
        assert sorted(w.pid for w in workers) == sorted(w.pid for w in pool.stats().workers)
        busy = pool.apply_async(note_pid_then_sleep, (str(marker),))
        deadline = time.monotonic() + 10
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)  # the pid is written
        victim = next(w for w in workers if w.pid == int(marker.read_text()))
        victim.kill()
        replacement = busy.get(timeout=30)
        assert replacement != victim.pid
        deadline = time.monotonic() + 10
        while victim.exitcode is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not victim.is_alive() and victim.exitcode == -signal.SIGKILL
        assert replacement in {w.pid for w in pool._pool}


def payload_size(p):
    return p.n


@pytest.mark.timeout(60)
def test_a_done_future_does_not_keep_its_argument_alive():
    import gc
    import weakref

    with Pool(1) as pool:
        arg = Payload(3)
        watch = weakref.ref(arg)
        future = pool.submit(payload_size, arg)
        assert future.result(timeout=30) == 3
        del arg
        gc.collect()
        assert watch() is None  # the caller holds only the future, and so does procqueue
        assert future.result() == 3 and not future.cancel()


def test_crash_with_futures_accounts_for_every_task():
    with Pool(2, retries=1) as pool:
        futures = [pool.submit(crash_on, ("exit" if i % 5 == 0 else "ok", i)) for i in range(20)]
        done, not_done = concurrent.futures.wait(futures, timeout=30)
        assert not not_done
        for i, fut in enumerate(futures):
            if i % 5 == 0:
                assert isinstance(fut.exception(), WorkerCrashedError)
                assert fut.exception().attempts == 2  # retried once on a fresh worker
            else:
                assert fut.result() == i


def _children_of_me():
    return [p for p in psutil.Process().children(recursive=True)
            if "forkserver" not in " ".join(p.cmdline())]



@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["terminate", "close_join", "context_exit", "garbage"])
def test_no_worker_outlives_the_pool(how):
    pool = Pool(2)
    pool.map(square, range(10))
    pids = [w.pid for w in pool.stats().workers]
    assert len(living(pids)) == 2
    if how == "terminate":
        pool.terminate()
    elif how == "close_join":
        pool.close()
        pool.join()
    elif how == "context_exit":
        with pool:
            pass
    else:
        with pytest.warns(ResourceWarning, match="unclosed running multiprocessing pool"):
            del pool  # as multiprocessing.Pool, a running pool dropped says so
            gc.collect()
    assert wait_gone(pids, 3) == []


@pytest.mark.timeout(30)
def test_terminate_kills_running_tasks_promptly_and_fails_them():
    pool = Pool(2)
    futures = [pool.submit(sleep_forever, i) for i in range(8)]
    time.sleep(0.3)
    started = time.monotonic()
    pool.terminate()
    assert time.monotonic() - started < 2.0
    # those that ran fail; those that never started are cancelled, as the futures of
    # ProcessPoolExecutor.shutdown(cancel_futures=True): `except CancelledError` takes both
    assert not futures[0].cancelled() and futures[-1].cancelled()
    for fut in futures:
        assert fut.cancelled() or isinstance(fut.exception(timeout=5), TaskCancelledError)
    for fut in futures:
        with pytest.raises(concurrent.futures.CancelledError):
            fut.result(timeout=5)
    assert concurrent.futures.wait(futures, timeout=5).not_done == set()


@pytest.mark.timeout(30)
def test_close_then_join_finishes_submitted_work():
    pool = Pool(2)
    result = pool.map_async(slow_square, range(20))
    pool.close()
    pool.join()
    assert result.get(timeout=1) == [x * x for x in range(20)]


@pytest.mark.timeout(30)
def test_maxtasksperchild_recycles_workers():
    with Pool(2, maxtasksperchild=3) as pool:
        pids = pool.map(worker_pid, range(12), chunksize=1)
    counts = {pid: pids.count(pid) for pid in set(pids)}
    assert max(counts.values()) <= 3
    assert len(counts) >= 4


@pytest.mark.timeout(30)
def test_lambdas_and_closures_run_in_workers():
    offset = 10
    with Pool(2) as pool:
        assert pool.map(lambda x: x + offset, range(3)) == [10, 11, 12]
        assert pool.submit(lambda a, b=1: a * b, 3, b=4).result() == 12


@pytest.mark.timeout(30)
def test_submit_futures_work_with_as_completed_and_cancel():
    with Pool(1) as pool:
        blocker = pool.submit(time.sleep, 0.5)
        queued = [pool.submit(square, i) for i in range(5)]
        assert queued[-1].cancel()
        done = list(concurrent.futures.as_completed(queued[:-1] + [blocker], timeout=10))
        assert len(done) == 5
        assert [f.result() for f in queued[:-1]] == [0, 1, 4, 9]
        assert queued[-1].cancelled()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("method", ["spawn", "forkserver", "fork"])
def test_every_start_method_works(method):
    with Pool(2, context=method) as pool:
        assert pool.map(square, range(10)) == [x * x for x in range(10)]


@pytest.mark.timeout(60)
def test_map_over_ranges_of_several_groups_keeps_every_input_in_order():
    # map posts its inputs to the supervisor in groups (4,096 at a time): the offsets of later
    # groups, steps, negative steps and chunksizes must hold, as multiprocessing's map keeps them
    with Pool(2) as pool:
        for inputs, chunksize in [(range(5, 30_000, 3), None), (range(20_000, -3, -2), 1000),
                                  (range(7, 7), None), (range(9000), 4000)]:
            assert pool.map(square, inputs, chunksize) == [x * x for x in inputs]
        result = pool.starmap_async(pow, range(3))  # not argument tuples: each input fails
        with pytest.raises(TypeError):
            result.get(timeout=30)


@pytest.mark.timeout(30)
def test_results_in_submission_or_completion_order():
    with Pool(2) as pool:
        assert list(pool.imap(slow_square, range(30))) == [x * x for x in range(30)]
        assert sorted(pool.imap_unordered(slow_square, range(30))) == [x * x for x in range(30)]


@pytest.mark.timeout(30)
def test_many_threads_submitting_at_once_get_every_result():
    with Pool(2) as pool:
        out: dict[int, list[int]] = {}

        def client(k):
            out[k] = pool.map(square, range(k * 100, k * 100 + 100))

        threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert all(out[k] == [x * x for x in range(k * 100, k * 100 + 100)] for k in range(8))


_EXIT_SCRIPT = """
import os, sys, time
from procqueue import Pool
def hang(_):
    time.sleep(60)
if __name__ == "__main__":
    pool = Pool(2)                      # never closed
    for i in range(4):
        pool.apply_async(hang, (i,))
    time.sleep(0.5)
    print(" ".join(str(w.pid) for w in pool.stats().workers), flush=True)
    sys.exit(0)                         # interpreter exit with tasks still running
"""


@pytest.mark.timeout(30)
def test_interpreter_exit_with_a_running_pool_is_prompt_and_leaves_no_worker(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "exit_script.py"
    script.write_text(_EXIT_SCRIPT)
    started = time.monotonic()
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=20)
    assert run.returncode == 0, run.stderr
    assert time.monotonic() - started < 0.5 + 5.0
    pids = [int(p) for p in run.stdout.split()]
    assert len(pids) == 2
    assert wait_gone(pids, 2) == []


_SIGTERM_SCRIPT = """
import os, sys, time
from procqueue import Pool
def hang(_):
    time.sleep(60)
if __name__ == "__main__":
    with Pool(2) as pool:
        for i in range(4):
            pool.apply_async(hang, (i,))
        time.sleep(0.5)
        print(" ".join(str(w.pid) for w in pool.stats().workers), flush=True)
        time.sleep(60)
"""


@pytest.mark.timeout(30)
def test_sigterm_of_the_supervisor_leaves_no_worker(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "sigterm_script.py"
    script.write_text(_SIGTERM_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 2
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)
    assert wait_gone(pids, 2) == []  # the workers notice their supervisor is gone


def _breaking_input():
    for i in range(10):
        if i == 6:
            raise RuntimeError("input broke at 6")
        yield i


@pytest.mark.timeout(30)
@pytest.mark.parametrize("api", ["imap", "imap_unordered", "imap_outcomes"])
def test_input_that_raises_midway_yields_what_came_before_then_its_error(api):
    with Pool(2) as pool:
        got = []
        with pytest.raises(RuntimeError, match="input broke at 6"):
            for value in getattr(pool, api)(square, _breaking_input()):
                got.append(value.value if api == "imap_outcomes" else value)
        assert sorted(got) == [x * x for x in range(6)]
        assert pool.map(square, range(3)) == [0, 1, 4]


def _nested_sum(n):
    with Pool(2) as inner:
        return sum(inner.map(square, range(n)))


@pytest.mark.timeout(60)
def test_a_task_may_run_its_own_pool():
    # multiprocessing.Pool's workers are daemonic and may not have children; ours may
    with Pool(2) as pool:
        assert pool.map(_nested_sum, [3, 4]) == [5, 14]


@pytest.mark.timeout(60)
def test_close_and_join_finish_an_unconsumed_imap_as_multiprocessing_does():
    pool = Pool(2)
    it = pool.imap(square, range(10_000))  # more than the feeding window holds
    pool.close()
    pool.join()  # must not wait for someone to consume the results
    assert list(it) == [x * x for x in range(10_000)]


START_EARLY = """
import os, sys, time
from multiprocessing import forkserver
import procqueue
procqueue.start_fork_server()
server = forkserver._forkserver._forkserver_pid
assert server is not None, "not started"
procqueue.start_fork_server()  # a second call: the same server
assert forkserver._forkserver._forkserver_pid == server
# `python -c` programs get fork workers by default (nothing for the server to import)
with procqueue.Pool(2, context="forkserver") as pool:
    assert pool.map(abs, range(-50, 0)) == list(range(50, 0, -1))
    assert pool.apply(os.getppid) == server
    workers = {w.pid for w in pool.stats().workers}
print(server, *workers)
"""


@pytest.mark.timeout(60)
def test_start_fork_server_early_then_a_pool_uses_it_and_nothing_outlives_the_program():
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", START_EARLY], capture_output=True, text=True,
                         timeout=50)
    assert run.returncode == 0, run.stderr
    pids = [int(p) for p in run.stdout.split()]
    assert len(pids) == 3
    assert living(pids) == []  # the server is stopped and waited for at exit


def _double(x):
    return 2 * x


@pytest.mark.timeout(60)
def test_submit_futures_work_with_wait_as_completed_and_callbacks_that_use_them():
    # The futures lock is a plain Lock (fewer objects to collect): nothing in
    # concurrent.futures or in a done-callback may need to take it twice.
    seen = []

    def callback(future):  # runs outside the future's lock: may use the future again
        seen.append((future.done(), future.running(), future.result(), future.cancel()))

    with Pool(2) as pool:
        futures = [pool.submit(_double, i) for i in range(200)]
        for f in futures[:50]:
            f.add_done_callback(callback)
        done, _ = concurrent.futures.wait(futures[:10],
                                          return_when=concurrent.futures.FIRST_COMPLETED)
        assert done
        got = sorted(f.result() for f in concurrent.futures.as_completed(futures, timeout=30))
        late = pool.submit(_double, 5)
        assert late.result(timeout=30) == 10
        late.add_done_callback(callback)  # already done: runs at once, in this thread
    assert got == [2 * i for i in range(200)]
    assert sorted(s[2] for s in seen) == sorted([2 * i for i in range(50)] + [10])
    assert all(s[0] and not s[1] and not s[3] for s in seen)


FORK_HOLDS_THE_SERVER = """
import os, sys, time
from multiprocessing import forkserver
import procqueue
procqueue.start_fork_server()
child = os.fork()
if child == 0:  # holds the server's alive pipe open, as a forked helper of a program would
    time.sleep(20)
    os._exit(0)
with open(sys.argv[1], "w") as f:
    f.write(f"{child} {forkserver._forkserver._forkserver_pid}")
"""


@pytest.mark.timeout(60)
def test_exit_after_start_fork_server_does_not_hang_on_a_forked_child(tmp_path):
    import subprocess
    import sys

    pid_file = tmp_path / "child"
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", FORK_HOLDS_THE_SERVER, str(pid_file)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        returncode = proc.wait(timeout=50)
        took = time.monotonic() - started
        child, server = (int(p) for p in pid_file.read_text().split())
        server_left = bool(living([server]))
    finally:
        for pid in [int(pid_file.read_text().split()[0])] if pid_file.exists() else []:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert returncode == 0
    assert took < 10  # the wait for the server is bounded, not the child's 20 s
    assert not server_left  # stopped though the child still holds its pipe


def _fails(x):
    raise ValueError(f"bad input {x}")


@pytest.mark.timeout(60)
def test_submit_futures_work_with_asyncio():
    import asyncio

    async def main(pool):
        got = await asyncio.gather(*(asyncio.wrap_future(pool.submit(square, i))
                                     for i in range(100)))
        with pytest.raises(ValueError, match="bad input 3"):
            await asyncio.wrap_future(pool.submit(_fails, 3))
        running = pool.submit(time.sleep, 30)
        wrapped = asyncio.wrap_future(running)
        deadline = time.monotonic() + 20
        while not running.running() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        wrapped.cancel()  # asyncio cancels the source future: its worker is killed
        with pytest.raises(asyncio.CancelledError):
            await wrapped
        while not running.cancelled() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return got, running.cancelled()

    with Pool(2) as pool:
        got, cancelled = asyncio.run(main(pool))
        assert pool.submit(square, 7).result(timeout=30) == 49  # the pool goes on
    assert got == [i * i for i in range(100)]
    assert cancelled


@pytest.mark.timeout(60)
def test_a_forked_child_cannot_use_the_pool_and_says_so_instead_of_waiting():
    with Pool(2) as pool:
        assert pool.map(square, [1, 2]) == [1, 4]
        read_end, write_end = os.pipe()
        child = os.fork()
        if child == 0:  # the copy has no supervisor thread: a call would wait forever
            try:
                pool.map(square, [3])
                os.write(write_end, b"returned")
            except BaseException as exc:
                os.write(write_end, f"{type(exc).__name__}: {exc}".encode())
            os._exit(0)
        os.close(write_end)
        import select

        answered = select.select([read_end], [], [], 20)[0]
        if not answered:
            os.kill(child, signal.SIGKILL)
        with os.fdopen(read_end, "rb") as reader:
            said = reader.read().decode() if answered else "no answer in 20 s"
        assert os.waitpid(child, 0)[1] == 0
        assert said.startswith("PoolClosedError: this pool belongs to process")
        assert pool.map(square, [4]) == [16]  # the child left the parent's workers alone


_shared = {}


def _keep_shared(counter, lock, queue):
    _shared.update(counter=counter, lock=lock, queue=queue)
    with lock:
        counter.value += 1000  # one per worker start


def _count_and_report(x):
    with _shared["lock"]:
        _shared["counter"].value += 1
    _shared["queue"].put(x)
    return x


@pytest.mark.timeout(60)
@pytest.mark.parametrize("context", [None, "forkserver"])
def test_initargs_may_be_multiprocessing_locks_values_and_queues(context):
    # The classic multiprocessing.Pool idiom: such objects may only be inherited, never
    # pickled into a task.  By default (made from the default, fork, context) fork workers
    # inherit them; for forkserver workers they must come from that context, as in
    # multiprocessing, and travel with the process start.
    import multiprocessing

    ctx = multiprocessing.get_context(context)
    counter, lock, queue = ctx.Value("i", 0), ctx.Lock(), ctx.Queue()
    with Pool(2, initializer=_keep_shared, initargs=(counter, lock, queue),
              maxtasksperchild=3, context=context) as pool:
        assert pool.map(_count_and_report, range(12), chunksize=1) == list(range(12))
        pool.close()  # workers that exit (not killed) flush what they put (multiprocessing's
        pool.join()   # rule for a Queue: terminate() may lose it, with multiprocessing too)
    assert sorted(queue.get(timeout=10) for _ in range(12)) == list(range(12))
    assert counter.value % 1000 == 12
    assert counter.value // 1000 >= 4  # 3 tasks per worker: replacements ran it too
    queue.close()
    queue.join_thread()


def _keep_lock(lock):
    _shared["thread_lock"] = lock


def _has_lock(_):
    return type(_shared["thread_lock"]).__name__


@pytest.mark.timeout(60)
def test_initargs_that_cannot_be_pickled_are_inherited_by_default_as_with_multiprocessing():
    with Pool(2, initializer=_keep_lock, initargs=(threading.Lock(),)) as pool:
        assert pool.map(_has_lock, range(2)) == ["lock", "lock"]
    with pytest.raises(TypeError, match="pickle"):  # forkserver asked for: it cannot travel
        Pool(2, initializer=_keep_lock, initargs=(threading.Lock(),), context="forkserver")


def test_the_pool_state_reads_as_multiprocessing_pools_does():
    import multiprocessing.pool

    pool = Pool(1)
    assert pool._state == multiprocessing.pool.RUN and "state=RUN" in repr(pool)
    assert str(pool._state) == f"{pool._state}" == "RUN"  # printed as multiprocessing's
    pool.close()
    assert pool._state == multiprocessing.pool.CLOSE
    pool.terminate()
    pool.join()
    assert pool._state == multiprocessing.pool.TERMINATE and "state=TERMINATE" in repr(pool)


def _nap_then_double(x):
    time.sleep(0.2)
    if x == 3:
        raise ValueError(f"bad input {x}")
    return 2 * x


@pytest.mark.timeout(60)
def test_each_submit_of_one_function_has_its_own_outcome_cancel_and_error():
    """The option-less submit() calls of one function share a Job (JobMaker.single_task_job):
    cancelling one future, running or queued, or one call failing, touches no other call."""
    with Pool(2) as pool:
        futures = [pool.submit(_nap_then_double, i) for i in range(8)]
        applied = pool.apply_async(_nap_then_double, (7,))
        deadline = time.monotonic() + 20
        while not futures[0].running() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert futures[0].cancel()  # running: its worker is killed
        assert futures[6].cancel()  # queued: it never runs
        assert [f.result(timeout=30) for f in futures[1:3]] == [2, 4]
        with pytest.raises(ValueError, match="bad input 3") as raised:
            futures[3].result(timeout=30)
        assert raised.value.index == 0 and raised.value.input_repr == "((3,), {})"
        assert [f.result(timeout=30) for f in (futures[4], futures[5], futures[7])] == [8, 10, 14]
        assert applied.get(timeout=30) == 14
        assert futures[0].cancelled() and futures[6].cancelled()
        assert pool.submit(_nap_then_double, 1).result(timeout=30) == 2  # the pool goes on
        stats = pool.stats()
    assert (stats.tasks_succeeded, stats.tasks_failed, stats.tasks_cancelled) == (7, 1, 2)


class _Holder:
    def __init__(self):
        self.data = bytearray(1 << 20)

    def size(self, extra=0):
        return len(self.data) + extra


@pytest.mark.timeout(60)
@pytest.mark.parametrize("api", ["submit", "apply_async", "map", "imap"])
def test_a_bound_methods_object_is_freed_once_its_call_is_over(api):
    """As ProcessPoolExecutor and multiprocessing (CPython's test_no_stale_references): the
    pool's caches of functions do not keep them, nor what they hold, alive."""
    with Pool(2) as pool:
        refs = []
        for _ in range(5):
            holder = _Holder()
            refs.append(weakref.ref(holder))
            if api == "submit":
                assert pool.submit(holder.size).result(timeout=30) == 1 << 20
            elif api == "apply_async":
                assert pool.apply_async(holder.size).get(timeout=30) == 1 << 20
            else:
                assert list(getattr(pool, api)(holder.size, [1])) == [(1 << 20) + 1]
            del holder
        gc.collect()
        assert [r() for r in refs] == [None] * 5
        assert pool.submit(square, 3).result(timeout=30) == 9


def _adder(k):
    def add(x):
        return x + k
    return add


@pytest.mark.timeout(60)
def test_more_distinct_functions_than_a_worker_keeps_all_run_again_later():
    """A closure per call: the worker drops the oldest of the functions it keeps; those come
    back with their bytes (it raised "procqueue bug: worker has no function")."""
    functions = [_adder(k) for k in range(80)]
    with Pool(1) as pool:
        for _ in range(2):
            assert [pool.submit(f, 1).result(timeout=30) for f in functions] == \
                [k + 1 for k in range(80)]
            assert [pool.map(f, [1, 2])[1] for f in functions] == [k + 2 for k in range(80)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("make", [Pool, concurrent.futures.ProcessPoolExecutor])
def test_submit_of_something_not_callable_fails_its_future_not_the_call(make):
    """ProcessPoolExecutor finds out in the worker: the future carries the TypeError."""
    with make(1) as pool:
        future = pool.submit(None, 3)
        with pytest.raises(TypeError, match="'NoneType' object is not callable"):
            future.result(timeout=30)
        assert concurrent.futures.wait([future], timeout=30).done == {future}
        assert pool.submit(square, 3).result(timeout=30) == 9  # the pool goes on


@pytest.mark.timeout(60)
def test_events_tell_each_submit_call_apart():
    """A TaskEvent names its call (TaskEvent.job): submit() calls then do not share a Job."""
    events = []
    with Pool(2, on_event=events.append) as pool:
        assert [pool.submit(square, i).result(timeout=30) for i in range(3)] == [0, 1, 4]
    assert len({e.job for e in events}) == 3


def leave_a_thread_running(x):
    threading.Thread(target=time.sleep, args=(60,)).start()  # not a daemon thread
    return x


@pytest.mark.timeout(60)
def test_a_worker_whose_task_left_a_thread_running_is_still_recycled():
    # its interpreter's exit would wait for that thread for ever (and the pool for the worker)
    with Pool(2, maxtasksperchild=1) as pool:
        assert list(pool.imap(leave_a_thread_running, range(6))) == list(range(6))
        pool.close()
        pool.join()


def fork_and_return(x):
    pid = os.fork()  # the child returns too, into the worker's code
    if pid:
        os.waitpid(pid, 0)
        return ("parent", x)
    return ("child", x)


@pytest.mark.timeout(60)
def test_a_forked_child_that_returns_from_the_task_ends_there():
    # it must not go on with the worker's loop: send on its pipe, run its next tasks
    with Pool(2) as pool:
        assert pool.map(fork_and_return, range(6)) == [("parent", x) for x in range(6)]
        assert pool.map(square, range(50)) == [x * x for x in range(50)]
        futures = [pool.submit(fork_and_return, x) for x in range(4)]
        assert [f.result(timeout=30) for f in futures] == [("parent", x) for x in range(4)]


@pytest.mark.timeout(60)
def test_a_callback_may_wait_on_its_own_pool():
    # multiprocessing runs callbacks in the thread that delivers results, so there one that
    # waits on its pool waits for ever; here they run in a thread of their own
    seen, both = [], threading.Event()

    def note(value):
        seen.append(value)
        if len(seen) == 2:
            both.set()

    with Pool(2) as pool:
        result = pool.apply_async(square, (3,), callback=lambda r: note(pool.apply(square, (r,))))
        future = pool.submit(square, 4)
        future.add_done_callback(lambda f: note(pool.submit(square, f.result()).result()))
        assert result.get(timeout=30) == 9  # as multiprocessing: after its callback ran
        assert 81 in seen
        assert future.result(timeout=30) == 16  # (a future's callbacks may run after this)
        assert both.wait(30)
    assert sorted(seen) == [81, 256]


@pytest.mark.timeout(60)
def test_join_after_close_returns_once_every_callback_has_run():
    seen = []
    with Pool(2) as pool:
        for i in range(20):
            pool.apply_async(square, (i,), callback=lambda r: (time.sleep(0.01), seen.append(r)))
        pool.close()
        pool.join()
        assert sorted(seen) == [i * i for i in range(20)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("api", ["apply_async", "map_async", "submit"])
def test_a_callback_that_blocks_holds_back_no_other_outcome(api):
    """A callback runs outside the supervisor's thread: while one blocks, other results
    still come, a crash is still seen, and terminate() still ends the pool."""
    release, entered = threading.Event(), threading.Event()

    def blocking(_):
        entered.set()
        release.wait(30)

    pool = Pool(2, retries=0)
    try:
        if api == "apply_async":
            pool.apply_async(square, (1,), callback=blocking)
        elif api == "map_async":
            pool.map_async(square, [1, 2], callback=blocking)
        else:
            pool.submit(square, 1).add_done_callback(blocking)
        assert entered.wait(30)
        assert pool.submit(square, 5).result(timeout=10) == 25
        assert pool.apply_async(square, (6,)).get(timeout=10) == 36
        with pytest.raises(WorkerCrashedError):
            pool.submit(os._exit, 3).result(timeout=10)
        workers = [w.pid for w in pool.stats().workers]
        started = time.monotonic()
        pool.terminate()
        assert time.monotonic() - started < 4.0
        assert wait_gone(workers, 5.0) == []
    finally:
        release.set()
        pool.terminate()


@pytest.mark.timeout(60)
def test_tasks_terminate_cancels_before_they_start_name_their_input():
    pool = Pool(1)
    results = [pool.apply_async(sleep_forever, (f"item-{i}",)) for i in range(3)]
    time.sleep(0.3)
    pool.terminate()
    for i, result in enumerate(results):
        with pytest.raises(TaskCancelledError) as error:
            result.get(timeout=30)
        assert f"item-{i}" in error.value.input_repr and f"item-{i}" in str(error.value)
    pool.join()


def _nap(x):
    time.sleep(0.3)
    return x


@pytest.mark.timeout(60)
@pytest.mark.parametrize("make", [Pool, concurrent.futures.ProcessPoolExecutor])
@pytest.mark.parametrize("cancel_futures", [False, True])
def test_shutdown_as_a_process_pool_executors(make, cancel_futures):
    """Code written for ProcessPoolExecutor calls shutdown(): it waits for what was
    submitted, or (cancel_futures) cancels what has not started while the running finish."""
    pool = make(1)
    futures = [pool.submit(_nap, i) for i in range(8)]
    assert futures[0].result(timeout=30) == 0  # started, so it finishes either way
    pool.shutdown(wait=True, cancel_futures=cancel_futures)
    assert all(f.done() for f in futures)
    if cancel_futures:
        assert futures[-1].cancelled()
        assert all(f.cancelled() or f.result() == i for i, f in enumerate(futures))
    else:
        assert [f.result() for f in futures] == list(range(8))
    with pytest.raises(RuntimeError):  # as concurrent.futures says it...
        pool.submit(_nap, 1)
    if make is Pool:
        with pytest.raises(ValueError):  # ...and multiprocessing
            pool.apply_async(_nap, (1,))


@pytest.mark.timeout(60)
def test_leaving_the_block_terminates_whatever_is_not_done_as_multiprocessing():
    # submit() futures too: a task that hangs must not hang the block's end (code written for
    # ProcessPoolExecutor, whose block waits, calls shutdown(wait=True) or reads them inside)
    started = time.monotonic()
    with Pool(1) as pool:
        futures = [pool.submit(time.sleep, 60) for _ in range(2)]
    assert time.monotonic() - started < 20
    assert all(f.done() for f in futures) and futures[-1].cancelled()


@pytest.mark.timeout(60)
def test_a_second_shutdown_cancels_what_the_first_left_queued():
    # shutdown(wait=False), then shutdown(cancel_futures=True): the second's cancel was
    # ignored once the pool was closed, and every queued task ran (ProcessPoolExecutor
    # cancels what its first shutdown left in its queue, not what it had already sent on).
    pool = Pool(1)
    futures = [pool.submit(_nap, i) for i in range(8)]
    assert futures[0].result(timeout=30) == 0
    pool.shutdown(wait=False)
    pool.shutdown(wait=True, cancel_futures=True)
    assert futures[-1].cancelled()
    assert all(f.cancelled() or f.result() == i for i, f in enumerate(futures))


class _ExitAtPickle:
    def __reduce__(self):
        raise SystemExit(0)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("api", ["submit", "apply_async", "map"])
def test_an_argument_whose_pickling_calls_sys_exit_fails_its_task_not_the_caller(api):
    """loky's crash matrix: the future fails with a PicklingError; SystemExit must not
    escape into the program."""
    import pickle
    with Pool(2) as pool:
        with pytest.raises(pickle.PicklingError):
            if api == "submit":
                pool.submit(id, _ExitAtPickle()).result(timeout=30)
            elif api == "apply_async":
                pool.apply_async(id, (_ExitAtPickle(),)).get(timeout=30)
            else:
                pool.map(id, [1, _ExitAtPickle(), 3])
        assert pool.map(square, [2, 3]) == [4, 9]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("raised", [SystemExit, KeyboardInterrupt])
def test_a_callback_that_raises_sys_exit_stops_no_later_callback(raised):
    """loky's test_callback_crash_on_submit: the callback thread goes on; its own result is
    ready (get() waits for the callback), later callbacks run, close()+join() returns."""
    def bad(_):
        raise raised

    later = []
    with Pool(2) as pool:
        first = pool.apply_async(square, (2,), callback=bad)
        pool.submit(square, 3).add_done_callback(bad)
        assert first.get(timeout=30) == 4
        second = pool.apply_async(square, (5,), callback=later.append)
        assert second.get(timeout=30) == 25 and later == [25]
        future = pool.submit(square, 6)
        future.add_done_callback(lambda f: later.append(f.result()))
        pool.close()
        pool.join()
    assert later == [25, 36]
