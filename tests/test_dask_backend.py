"""The Pool contract on Dask distributed (procqueue.backends.dask.DaskPool), on real processes.

Most tests share one LocalCluster of two single-threaded worker processes (module fixture:
starting a cluster costs seconds); the tests about a pool's own cluster and about connecting
by address start their own.  Facts are recorded by the tasks themselves (pids, start and end
times written to files), never inferred from sleeps.
"""
from __future__ import annotations

import contextlib
import copyreg
import gc
import importlib
import json
import concurrent.futures
import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from process_checks import wait_gone
from conftest import cancel_after, dask_worker_pids, inputs_then_wait, stray_children

distributed = pytest.importorskip("distributed")

import dask  # noqa: E402

import procqueue  # noqa: E402
from procqueue import (  # noqa: E402
    ArgumentSerializationError,
    PoolClosedError,
    RemoteError,
    RemoteTraceback,
    ResultSerializationError,
    TaskCancelledError,
    TaskTimeoutError,
    WorkerCrashedError,
    WorkerExitedError,
)
from procqueue.backends.dask import DaskPool, DaskPoolStats, cluster_config  # noqa: E402
from procqueue.process_meter import ProcessMeter  # noqa: E402

WORKERS = 2
_shared: list[Any] = []  # the module's LocalCluster while it runs (its workers are not strays)


# ---- tasks (module level: pickled by reference, importable in the workers) ------------------

def square(x: int) -> int:
    return x * x


def fail_on_three(x: int) -> int:
    if x == 3:
        raise KeyError(f"no {x}")
    return x


def record_and_sleep(path: str, seconds: float) -> int:
    Path(path).write_text(str(os.getpid()))
    time.sleep(seconds)
    return os.getpid()


def exit_worker_on(x: int, bad: int) -> int:
    if x == bad:
        os._exit(13)
    return x


def spin_or_sleep(x: str) -> str:
    if x == "spin":
        while True:
            pass
    if x == "sleep":
        time.sleep(30)
    return x


def interval(directory: str, i: int) -> int:
    start = time.monotonic()
    time.sleep(0.3)
    Path(directory, f"{i}").write_text(f"{start} {time.monotonic()}")
    return i


def get_env(name: str) -> str | None:
    return os.environ.get(name)


def set_env(name: str, value: str) -> None:
    os.environ[name] = value


def unpicklable_result(x: int) -> Any:
    return (lambda: x) if x == 1 else x


def exit_task(x: int) -> int:
    if x == 2:
        sys.exit(4)
    return x


def slow_identity(x: int) -> int:
    time.sleep(0.05)
    return x


def span(directory: str, item: Any, hold_s: float, fail: bool = False) -> Any:
    """Record when this run of `item` started and ended (one file per run), then maybe fail."""
    start = time.time()
    time.sleep(hold_s)
    end = time.time()
    Path(directory, f"{start:.6f}-{os.getpid()}").write_text(f"{item!r}\t{start}\t{end}")
    if fail:
        raise ValueError(f"failing {item!r}")
    return item


def logged_square(args: tuple[str, int]) -> int:
    """x * x; each call leaves a file of its own in `directory`: the calls that ran, counted."""
    directory, x = args
    Path(directory, f"{x}-{os.getpid()}-{time.monotonic_ns()}").touch()
    if x == 3:
        raise KeyError(f"no {x}")
    return x * x


def calls_in(directory: Path) -> list[int]:
    """The inputs logged_square ran for, one entry per call, sorted."""
    return sorted(int(p.name.split("-")[0]) for p in directory.iterdir())


def spans_in(directory: str | Path) -> list[tuple[str, float, float]]:
    """(item repr, start, end) of every recorded run."""
    rows = [p.read_text().split("\t") for p in Path(directory).iterdir()]
    return [(item, float(start), float(end)) for item, start, end in rows]


def max_overlap(spans: Iterable[tuple[float, float]]) -> int:
    """The most spans running at one instant (an end before a start at equal times)."""
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


def max_starts_in_window(starts: Iterable[float], period_s: float) -> int:
    starts = sorted(starts)
    return max(sum(1 for t in starts if a <= t < a + period_s) for a in starts)


def _procqueue_semaphores(dask_scheduler: Any) -> dict[str, int]:
    """The procqueue semaphores the scheduler knows, with their leases held."""
    extension = dask_scheduler.extensions["semaphores"]
    return {name: len(extension.leases.get(name, {})) for name in extension.max_leases
            if str(name).startswith("procqueue-")}


# ---- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[Any, Any]]:
    with dask.config.set(cluster_config(retries=1)):
        cluster = distributed.LocalCluster(n_workers=WORKERS, threads_per_worker=1,
                                           processes=True, dashboard_address="127.0.0.1:0")
    client = distributed.Client(cluster, set_as_default=False)
    _shared.append(cluster)
    yield cluster, client
    _shared.clear()
    client.close()
    cluster.close()
    assert not stray_children(grace_s=5.0), "the shared cluster left processes"


@pytest.fixture
def client(cluster: tuple[Any, Any]) -> Any:
    return cluster[1]


@pytest.fixture
def pool(client: Any) -> Iterator[DaskPool]:
    with DaskPool(client=client, retries=1) as pool:
        yield pool


@pytest.fixture(autouse=True)
def no_stray_processes() -> Iterator[None]:
    """conftest's check, except for the shared cluster's own worker processes (checked when
    the module's cluster closes)."""
    yield
    left = stray_children(grace_s=3.0,
                          allowed=lambda: dask_worker_pids(_shared[0]) if _shared else set())
    for proc in left:
        proc.kill()
    assert not left, f"stray processes after test: {[(p.pid, p.cmdline()) for p in left]}"


def _worker_pids(client: Any) -> set[int]:
    return set(client.run(os.getpid).values())


def _wait_for(predicate: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


# ---- results and order -------------------------------------------------------------------------

def test_every_api_returns_results_in_the_local_pools_order(pool: DaskPool) -> None:
    assert pool.map(square, range(50)) == [x * x for x in range(50)]
    assert list(pool.imap(square, iter(range(30)))) == [x * x for x in range(30)]
    assert sorted(pool.imap_unordered(square, range(30))) == sorted(x * x for x in range(30))
    assert pool.starmap(pow, [(2, 3), (3, 2), (5, 0)]) == [8, 9, 1]
    assert pool.apply(square, (9,)) == 81
    assert pool.apply_async(divmod, (7, 2)).get(timeout=20) == (3, 1)
    assert pool.submit(pow, 2, 10).result(timeout=20) == 1024
    assert pool.map_async(square, [3, 4]).get(timeout=20) == [9, 16]
    assert pool.map(square, []) == []


def test_callbacks_get_results_and_errors(pool: DaskPool) -> None:
    got: list[Any] = []
    errors: list[BaseException] = []
    pool.map_async(square, [1, 2], callback=got.append).wait(20)
    pool.apply_async(fail_on_three, (3,), error_callback=errors.append).wait(20)
    assert got == [[1, 4]] and isinstance(errors[0], KeyError)


def test_imap_outcomes_reports_every_input_in_order(pool: DaskPool) -> None:
    outcomes = list(pool.imap_outcomes(fail_on_three, range(6), chunksize=3))
    assert [o.index for o in outcomes] == list(range(6))
    assert [o.ok for o in outcomes] == [True, True, True, False, True, True]
    assert isinstance(outcomes[3].error, KeyError)
    assert all(o.attempts == 1 and o.pid in _worker_pids(pool.client) for o in outcomes)


def test_tiny_tasks_are_batched_into_few_dask_tasks(pool: DaskPool) -> None:
    before = pool.stats().chunks_submitted
    assert pool.map(square, range(20_000)) == [x * x for x in range(20_000)]
    assert pool.stats().chunks_submitted - before < 500  # not one Dask task per item


def test_lazy_input_is_streamed_with_a_bounded_number_in_flight(pool: DaskPool) -> None:
    taken = []

    def endless() -> Iterator[int]:
        i = 0
        while True:
            taken.append(i)
            yield i
            i += 1

    results = pool.imap(square, endless())
    first = [next(results) for _ in range(100)]
    assert first == [x * x for x in range(100)]
    time.sleep(0.5)  # give the feeder every chance to run ahead
    stats = pool.stats()
    assert len(taken) <= 100 + 2048 + 256  # the window, not the whole generator
    assert stats.tasks_running <= len(taken)
    del results  # dropping the iterator stops its feeding
    assert pool.map(square, [5]) == [25]


def test_imap_runs_the_inputs_taken_before_its_iterator_raised_then_raises(
        pool: DaskPool) -> None:
    def inputs() -> Iterator[int]:
        yield from (1, 2, 3)
        raise ZeroDivisionError("the inputs broke")

    results = pool.imap(square, inputs())
    assert [results.next(timeout=20) for _ in range(3)] == [1, 4, 9]
    with pytest.raises(ZeroDivisionError, match="the inputs broke"):
        results.next(timeout=20)


def test_imap_sends_each_input_as_it_comes_so_a_generator_may_wait_for_results(
        pool: DaskPool) -> None:
    # A feedback loop: each input is the last result plus one (it hung while an iterator's
    # input waited for the next one to be produced before it was handed over).
    fed_back: "queue.Queue[int]" = queue.Queue()

    def feedback() -> Iterator[int]:
        yield 2
        for _ in range(3):
            yield fed_back.get(timeout=20)

    results = []
    for result in pool.imap(square, feedback()):
        results.append(result)
        fed_back.put(result + 1)
    assert results == [4, 25, 676, 458329]


def test_cancelling_a_call_whose_generator_waits_ends_it_with_what_it_took(
        pool: DaskPool) -> None:
    release = threading.Event()
    try:
        outcomes = pool.imap_outcomes(square, inputs_then_wait([1, 2], release))
        first, rest, waited = cancel_after(outcomes, 2)
    finally:
        release.set()
    assert first == [1, 4] and rest == []
    assert waited < 15, f"the cancelled call waited {waited:.1f} s for its generator"


# ---- errors ------------------------------------------------------------------------------------

def test_exception_keeps_type_and_message_with_remote_traceback(pool: DaskPool) -> None:
    with pytest.raises(KeyError, match="no 3") as info:
        pool.map(fail_on_three, range(6), chunksize=6)
    error: Any = info.value  # procqueue annotates it: index, input_repr, partial_results
    assert isinstance(error.__cause__, RemoteTraceback)
    assert "fail_on_three" in error.__cause__.tb_text
    assert error.index == 3 and error.input_repr == "3"
    assert error.partial_results == {0: 0, 1: 1, 2: 2}
    with pytest.raises(KeyError):
        pool.submit(fail_on_three, 3).result(timeout=20)


def test_a_worker_loads_a_function_whose_module_came_after_a_failed_load(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # docs/dask.md: install the module on the workers, or client.upload_file() it.  A worker
    # process kept its first failure to unpickle a function for good: an upload after a
    # failed run changed nothing until the workers restarted.
    from procqueue.backends.dask import worker_side
    from procqueue.protocol import pickled_function, restore_exception
    name = f"arrives_later_{os.getpid()}_{time.monotonic_ns()}"
    module_file = tmp_path / "elsewhere" / f"{name}.py"
    module_file.parent.mkdir()
    module_file.write_text("def triple(x):\n    return 3 * x\n")
    monkeypatch.syspath_prepend(str(module_file.parent))
    fn_id, payload = pickled_function(importlib.import_module(name).triple)
    del sys.modules[name]
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(module_file.parent)])
    fn, error = worker_side._load_function(fn_id, payload)  # the worker lacks the module
    assert fn is None and error is not None
    assert isinstance(restore_exception(error), ArgumentSerializationError)
    monkeypatch.syspath_prepend(str(module_file.parent))  # uploaded, or installed, since
    fn, error = worker_side._load_function(fn_id, payload)
    assert error is None and fn is not None and fn(2) == 6


def test_submit_of_something_not_callable_fails_its_future(pool: DaskPool) -> None:
    future = pool.submit(None, 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="'NoneType' object is not callable"):
        future.result(timeout=20)


def test_failing_item_fails_only_itself_in_its_chunk(pool: DaskPool) -> None:
    values = pool.map(fail_on_three, range(8), chunksize=8, errors="return")
    assert isinstance(values[3], KeyError)
    assert [v for i, v in enumerate(values) if i != 3] == [0, 1, 2, 4, 5, 6, 7]
    it = pool.imap(fail_on_three, range(6), chunksize=6)
    got = [next(it), next(it), next(it)]
    with pytest.raises(KeyError):
        next(it)
    assert got + list(it) == [0, 1, 2, 4, 5]


def test_unpicklable_argument_and_result_fail_only_their_item(pool: DaskPool) -> None:
    outcomes = list(pool.imap_outcomes(unpicklable_result, [0, 1, 2]))
    assert [o.ok for o in outcomes] == [True, False, True]
    assert isinstance(outcomes[1].error, ResultSerializationError)
    values = pool.map(repr, [1, _Unpicklable(), 3], errors="return")
    assert isinstance(values[1], ArgumentSerializationError) and values[2] == "3"


class _Unpicklable:
    def __reduce__(self) -> Any:
        raise TypeError("cannot pickle this")


class _NeedsTwoArguments(Exception):
    """An exception whose pickle does not load (its __init__ needs two arguments)."""

    def __init__(self, message: str, extra: int) -> None:
        super().__init__(message)
        self.extra = extra


class _ReducedByTheProgram(Exception):
    """An exception made picklable the usual way: a reducer registered with copyreg."""

    def __init__(self, first: int, second: int) -> None:
        super().__init__(f"{first} and {second}")
        self.first, self.second = first, second


copyreg.pickle(_ReducedByTheProgram, lambda e: (_ReducedByTheProgram, (e.first, e.second)))


def fail_in_ways(how: str) -> Any:
    if how == "exit":
        sys.exit(4)
    if how == "base":
        raise _LocalBase.made("base")
    if how == "unloadable":
        raise _NeedsTwoArguments("two", 2)
    if how == "lock":
        return threading.Lock()
    if how == "reduced":
        raise _ReducedByTheProgram(1, 2)
    raise KeyError(how)


class _LocalBase:
    @staticmethod
    def made(message: str) -> BaseException:
        class NotPicklable(BaseException):  # a local class: it cannot travel as itself
            pass
        return NotPicklable(message)


@pytest.mark.parametrize("backend", ["dask", "local"])
def test_errors_are_alike_where_distributed_pickles_exceptions_with_their_causes(
        backend: str) -> None:
    """Dask's distributed installs tblib's exception picklers (cause, context, traceback) for
    the exception classes there are when it is imported: in the workers of a LocalCluster
    that procqueue starts, procqueue's are among them, as in a local pool's workers when the
    program imports distributed.  A task's error still has the remote traceback as its cause
    (the command line's records print it), and the same type and message on both backends."""
    with procqueue.Pool(2, backend=backend, retries=0, initializer=_install_tblib) as pool:
        errors = pool.map(fail_in_ways, ["exit", "base", "unloadable", "lock", "key",
                                         "reduced"], errors="return")
    exited, base, unloadable, lock, key, reduced = errors
    assert isinstance(exited, WorkerExitedError) and exited.code == 4
    assert isinstance(base, RemoteError) and str(base).startswith("NotPicklable: base (task 1")
    # tblib's reducers rebuild an exception whose __init__ takes other arguments (without
    # them, it would be a RemoteError naming its type): it keeps its type and attributes
    assert isinstance(unloadable, _NeedsTwoArguments) and unloadable.extra == 2
    assert str(unloadable) == "two"
    assert isinstance(lock, ResultSerializationError) and isinstance(key, KeyError)
    assert isinstance(reduced, _ReducedByTheProgram) and reduced.second == 2
    for error, text in zip(errors, ["sys.exit(4)", "NotPicklable", "_NeedsTwoArguments",
                                    "cannot pickle", "KeyError", "_ReducedByTheProgram"],
                           strict=True):
        assert isinstance(error.__cause__, RemoteTraceback), (error, error.__cause__)
        assert text in error.__cause__.tb_text


def _install_tblib() -> None:
    import tblib.pickling_support
    tblib.pickling_support.install()


def test_sys_exit_in_a_task_is_a_task_failure(pool: DaskPool) -> None:
    values = pool.map(exit_task, range(4), errors="return")
    assert isinstance(values[2], WorkerExitedError) and values[2].code == 4
    assert values[:2] == [0, 1] and values[3] == 3


# ---- crashes -----------------------------------------------------------------------------------

def test_sigkilled_dask_worker_mid_task_is_rerun_elsewhere(pool: DaskPool, client: Any,
                                                           tmp_path: Path) -> None:
    marker = tmp_path / "pid"
    future = pool.submit(record_and_sleep, str(marker), 2.0)
    _wait_for(marker.exists)
    victim = int(marker.read_text())
    assert victim in _worker_pids(client)
    os.kill(victim, signal.SIGKILL)
    pid = future.result(timeout=30)
    assert pid != victim
    assert pool.map(square, range(10)) == [x * x for x in range(10)]  # the pool goes on


def test_item_that_kills_its_worker_fails_alone_with_worker_crashed_error(pool: DaskPool) -> None:
    values = pool.starmap(exit_worker_on, [(x, 5) for x in range(8)], chunksize=4,
                          errors="return")
    error = values[5]
    assert isinstance(error, WorkerCrashedError), values
    assert error.index == 5 and error.input_repr == "(5, 5)"
    assert [v for i, v in enumerate(values) if i != 5] == [0, 1, 2, 3, 4, 6, 7]
    assert pool.map(square, range(4)) == [0, 1, 4, 9]


# ---- timeouts ----------------------------------------------------------------------------------

def test_timeout_interrupts_python_code_and_abandons_blocked_code(client: Any) -> None:
    with DaskPool(client=client, timeout=0.5) as pool:
        started = time.monotonic()
        outcomes = list(pool.imap_outcomes(spin_or_sleep, ["a", "spin", "b", "sleep", "c"],
                                           chunksize=5))
        elapsed = time.monotonic() - started
    assert [o.ok for o in outcomes] == [True, False, True, False, True]
    assert isinstance(outcomes[1].error, TaskTimeoutError)
    assert isinstance(outcomes[3].error, TaskTimeoutError)
    assert "abandoned" in str(outcomes[3].error) and "abandoned" not in str(outcomes[1].error)
    assert elapsed < 0.5 + 0.5 + 1.0 + 3.0  # T (spin) + T + grace (sleep) + slack


# ---- limits ------------------------------------------------------------------------------------

def test_concurrency_limit_holds_across_dask_workers(client: Any, tmp_path: Path) -> None:
    with DaskPool(client=client, concurrency=1) as pool:
        pool.starmap(interval, [(str(tmp_path), i) for i in range(4)], chunksize=1)
    spans = sorted(tuple(map(float, p.read_text().split())) for p in tmp_path.iterdir())
    assert len(spans) == 4
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))


@pytest.mark.timeout(30)
def test_rate_gate_never_more_than_l_starts_per_window_across_workers(client: Any,
                                                                      tmp_path: Path) -> None:
    items = [(str(tmp_path), i, 0.05, i % 3 == 0) for i in range(30)]  # every third raises
    with DaskPool(client=client, rate="10/0.5s") as pool:
        started = time.monotonic()
        values = pool.starmap(span, items, errors="return")
        elapsed = time.monotonic() - started
    assert [isinstance(v, ValueError) for v in values] == [i % 3 == 0 for i in range(30)]
    starts = [start for _, start, _ in spans_in(tmp_path)]
    assert len(starts) == 30
    assert max_starts_in_window(starts, 0.5) <= 10
    # a failing item's start leaves the window after 0.5 s like any other (not at the
    # lease timeout): 30 starts at 10 per 0.5 s take about 1 s
    assert elapsed < 5.0
    # the pool ended: its rate semaphore is gone from the scheduler, no lease left behind
    assert client.run_on_scheduler(_procqueue_semaphores) == {}


def _executing(dask_worker: Any) -> int:
    return int(dask_worker.state.executing_count)


@pytest.mark.timeout(30)
def test_item_waiting_for_its_start_never_starts_after_terminate(client: Any,
                                                                 tmp_path: Path) -> None:
    pool = DaskPool(client=client, rate="1/30s")
    futures = [pool.submit(span, str(tmp_path), i, 1.0) for i in range(2)]
    _wait_for(lambda: any(tmp_path.iterdir()) or sum(client.run(_executing).values()) == 2)
    pool.terminate()  # the second item waits for a start the window will not give for 30 s
    _wait_for(lambda: sum(client.run(_executing).values()) == 0, timeout_s=10)
    assert len(spans_in(tmp_path)) == 1  # the pool's leases went back, yet nothing started
    assert all(f.cancelled() or f.exception(timeout=5) is not None for f in futures)
    assert client.run_on_scheduler(_procqueue_semaphores) == {}


@pytest.mark.timeout(30)
def test_key_concurrency_never_exceeds_k_per_key_and_keys_share_fairly(client: Any,
                                                                       tmp_path: Path) -> None:
    items = [(str(tmp_path), ("big", i), 0.1) for i in range(12)]
    items += [(str(tmp_path), ("small", i), 0.1) for i in range(3)]
    with DaskPool(client=client) as pool:
        assert len(pool.starmap(span, items, key=lambda args: args[1][0])) == 15
    runs = spans_in(tmp_path)
    by_key = {key: [(s, e) for item, s, e in runs if key in item] for key in ("big", "small")}
    assert max_overlap(by_key["big"]) == 1 and max_overlap(by_key["small"]) == 1
    assert max_overlap([(s, e) for _, s, e in runs]) == 2  # the keys ran side by side
    # round robin between keys: the 3 small items do not wait behind the 12 big ones
    last_small = max(s for s, _ in by_key["small"])
    assert sum(1 for s, _ in by_key["big"] if s < last_small) <= 5


def meet_another(folder: str, x: int) -> bool:
    """Waits (at most 5 s) until another item is running too: True if it met one; x < 0
    returns at once (teaches the pool that the function is short)."""
    if x < 0:
        return True
    (Path(folder) / f"started-{x}").touch()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if len(list(Path(folder).iterdir())) >= 2:
            return True
        time.sleep(0.002)
    return False


@pytest.mark.timeout(60)
def test_short_items_of_few_keys_still_spread_over_the_workers(client: Any,
                                                               tmp_path: Path) -> None:
    """A chunk holds its items' places under their keys while they run one after another:
    chunks sized for short items took both keys' places into one chunk, so the call ran on
    one worker.  Each worker thread gets its share: the two items meet."""
    folder = str(tmp_path)
    with DaskPool(client=client) as pool:
        assert all(pool.starmap(meet_another, [(folder, -1)] * 2000))  # short: big chunks
        met = pool.starmap(meet_another, [(folder, x) for x in range(WORKERS)],
                           key=lambda args: args[1], key_concurrency=1)
    assert met == [True] * WORKERS


@pytest.mark.timeout(60)
def test_chunks_of_short_keyed_items_keep_each_key_under_its_cap(client: Any,
                                                                  tmp_path: Path) -> None:
    """A chunk holds one place per key it has items of (they run one after another): many
    short items of two keys of 1 each, on two worker threads, never run two of a key at once,
    and each runs exactly once."""
    folder = str(tmp_path)
    items = [(folder, (key, i), 0.001) for i in range(150) for key in ("a", "b")]
    with DaskPool(client=client) as pool:
        assert all(pool.starmap(meet_another, [(folder + "-warm", -1)] * 2000))  # short
        done = pool.starmap(span, items, key=lambda args: args[1][0], key_concurrency=1)
    assert done == [item for _, item, _ in items]
    runs = spans_in(tmp_path)
    assert sorted(item for item, _, _ in runs) == sorted(repr(item) for _, item, _ in items)
    for key in ("a", "b"):
        assert max_overlap([(s, e) for item, s, e in runs if repr(key) in item]) == 1


@pytest.mark.timeout(30)
def test_key_concurrency_k_allows_k_of_a_key_and_a_failing_key_fails_its_item(
        client: Any, tmp_path: Path) -> None:
    with DaskPool(client=client) as pool:
        items = [(str(tmp_path), ("one", i), 0.1) for i in range(8)]
        pool.starmap(span, items, key=lambda args: args[1][0], key_concurrency=2)
        values = pool.map(square, [0, 1, 2], key=lambda x: 1 // x, errors="return")
        with pytest.raises(ValueError, match="key_concurrency needs key="):
            pool.map(square, [1], key_concurrency=2)
    assert max_overlap([(s, e) for _, s, e in spans_in(tmp_path)]) <= 2
    error: Any = values[0]  # annotated by procqueue with its index
    assert error.index == 0 and isinstance(values[0], ZeroDivisionError)
    assert error.__notes__ == ["[procqueue] raised by the key function for input 0: 0"]
    assert values[1:] == [1, 4]


def _spans(directory: Path) -> list[tuple[float, float]]:
    return [(start, end) for _, start, end in spans_in(directory)]


@pytest.mark.timeout(60)
def test_a_named_queue_holds_its_concurrency_across_workers_and_calls(client: Any,
                                                                    tmp_path: Path) -> None:
    io_a, io_b, plain = (tmp_path / name for name in ("io_a", "io_b", "plain"))
    for directory in (io_a, io_b, plain):
        directory.mkdir()
    queues = {"io": procqueue.Queue(concurrency=1)}
    with DaskPool(client=client, queues=queues) as pool:
        # two calls in the queue at once: the queue's limit is theirs together
        calls = [pool.starmap_async(span, [(str(directory), i, 0.1) for i in range(3)],
                                    chunksize=1, queue="io") for directory in (io_a, io_b)]
        assert [call.get(timeout=30) for call in calls] == [[0, 1, 2]] * 2
        # a call without queue= is not held by it
        pool.starmap(span, [(str(plain), i, 0.3) for i in range(4)], chunksize=1)
        with pytest.raises(ValueError, match=r"unknown queue 'nope'; this pool has \['io'\]"):
            pool.map(square, [1], queue="nope")
    assert len(_spans(io_a)) == len(_spans(io_b)) == 3
    assert max_overlap(_spans(io_a) + _spans(io_b)) == 1
    assert max_overlap(_spans(plain)) == 2
    assert client.run_on_scheduler(_procqueue_semaphores) == {}
    with DaskPool(client=client) as pool:
        with pytest.raises(ValueError, match="this pool has no named queues"):
            pool.map(square, [1], queue="io")
    with pytest.raises(TypeError, match="queue 'io' must be a procqueue.Queue, not 2"):
        DaskPool(client=client, queues={"io": 2})


@pytest.mark.timeout(60)
def test_a_named_queue_holds_its_rate_under_the_pools_own(client: Any, tmp_path: Path) -> None:
    slow, plain = tmp_path / "slow", tmp_path / "plain"
    slow.mkdir()
    plain.mkdir()
    queues = {"slow": procqueue.Queue(rate="4/0.5s")}
    with DaskPool(client=client, rate="50/0.5s", queues=queues) as pool:
        started = time.monotonic()
        pool.starmap(span, [(str(slow), i, 0.02) for i in range(12)], queue="slow")
        queued_s = time.monotonic() - started
        pool.starmap(span, [(str(plain), i, 0.02) for i in range(12)])
    slow_starts = [start for start, _ in _spans(slow)]
    assert len(slow_starts) == 12 and max_starts_in_window(slow_starts, 0.5) <= 4
    assert queued_s >= 1.0  # 12 starts at 4 per 0.5 s: the third window opens after 1 s
    # the call without queue= only has the pool's rate: more than 4 of its starts in 0.5 s
    assert max_starts_in_window([start for start, _ in _spans(plain)], 0.5) > 4
    assert client.run_on_scheduler(_procqueue_semaphores) == {}


@pytest.mark.timeout(60)
def test_a_named_limit_is_shared_by_the_pools_on_a_cluster(client: Any, tmp_path: Path) -> None:
    # The shared cluster has 2 worker threads: a concurrency of 1 is what they can show.
    name = f"pq-dask-{os.getpid()}-{time.monotonic_ns()}"
    limit = procqueue.Limit(name, concurrency=1, rate=procqueue.Rate(3, per=0.5))
    directories = [tmp_path / "a", tmp_path / "b"]
    for directory in directories:
        directory.mkdir()
    with DaskPool(client=client) as a, DaskPool(client=client) as b:
        calls = [pool.starmap_async(span, [(str(directory), i, 0.1) for i in range(6)],
                                    chunksize=1, limit=limit)
                 for pool, directory in zip((a, b), directories)]
        assert [call.get(timeout=30) for call in calls] == [list(range(6))] * 2
        with pytest.raises(ValueError, match=f"limit '{name}' is already open in this pool"):
            a.map(square, [1], limit=procqueue.Limit(name, concurrency=2))
    spans = _spans(directories[0]) + _spans(directories[1])
    assert len(spans) == 12 and max_overlap(spans) == 1
    assert max_starts_in_window([start for start, _ in spans], 0.5) <= 3
    with DaskPool(client=client) as other:  # another program giving the name other values
        with pytest.raises(ValueError, match=f"limit '{name}' is open on this cluster with "
                                             "other values"):
            other.map(square, [1], limit=procqueue.Limit(name, concurrency=2))
        with pytest.raises(TypeError, match="limit must be a procqueue.Limit"):
            other.map(square, [1], limit=name)
        assert other.map(square, [3], limit=limit) == [9]  # the same values: shared still


def hold_until(directory: str, item: Any, release: str) -> Any:
    """Record that `item` started (a file of its own), then run until `release` exists."""
    Path(directory, f"{item}-{time.monotonic_ns()}").touch()
    deadline = time.monotonic() + 60
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.01)
    return item


def _named_limit_leases(dask_scheduler: Any, name: str) -> dict[str, int]:
    """The leases held on a named Limit's semaphores (its concurrency's and its rate's)."""
    extension = dask_scheduler.extensions["semaphores"]
    prefix = f"procqueue.limit.{name}"
    return {key: len(extension.leases.get(key, {})) for key in extension.max_leases
            if str(key) in (prefix, f"{prefix}.rate")}


def _executing_total(client: Any) -> int:
    return sum(client.run(_executing).values())


def _unique_limit_name() -> str:
    return f"pq-dask-{os.getpid()}-{time.monotonic_ns()}"


@pytest.mark.timeout(60)
def test_a_terminated_pools_items_waiting_for_a_named_limit_never_start(
        client: Any, tmp_path: Path) -> None:
    name = _unique_limit_name()
    limit = procqueue.Limit(name, concurrency=1)
    ran_a, ran_b, release = tmp_path / "a", tmp_path / "b", tmp_path / "release"
    ran_a.mkdir()
    ran_b.mkdir()
    with DaskPool(client=client) as a:
        held = a.apply_async(hold_until, (str(ran_a), "a", str(release)), limit=limit)
        try:
            _wait_for(lambda: any(ran_a.iterdir()))  # a holds the Limit's one lease
            # b also waits on a semaphore of its own: a mix of gates, the Limit's taken last
            b = DaskPool(client=client, concurrency=2)
            waiting = b.starmap_async(hold_until,
                                      [(str(ran_b), i, str(release)) for i in range(4)],
                                      chunksize=1, limit=limit)
            _wait_for(lambda: _executing_total(client) == 2)  # b's chunk waits on the worker
            b.terminate()
            # b's chunk stops waiting although a still holds the lease it waited for
            _wait_for(lambda: _executing_total(client) == 1, timeout_s=10)
            assert client.run_on_scheduler(_named_limit_leases, name=name) == {
                f"procqueue.limit.{name}": 1}
        finally:
            release.touch()  # whatever failed, the workers are not held for the next test
        assert held.get(timeout=30) == "a"
    _wait_for(lambda: _executing_total(client) == 0, timeout_s=10)
    with pytest.raises(Exception):
        waiting.get(timeout=5)
    assert not any(ran_b.iterdir())  # none of b's items ever started
    # no lease of b's was left on the shared semaphore: another pool gets the whole Limit
    assert client.run_on_scheduler(_named_limit_leases, name=name) == {
        f"procqueue.limit.{name}": 0}
    with DaskPool(client=client) as c:
        assert c.map(square, range(4), chunksize=1, limit=limit) == [0, 1, 4, 9]
    assert client.run_on_scheduler(_procqueue_semaphores) == {}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("timeout", [None, 30.0], ids=["untimed", "timed"])
def test_a_terminated_pools_items_waiting_for_a_named_limits_start_never_start(
        client: Any, tmp_path: Path, timeout: float | None) -> None:
    name = _unique_limit_name()
    limit = procqueue.Limit(name, rate=procqueue.Rate(1, per=30))
    ran_a, ran_b = tmp_path / "a", tmp_path / "b"
    ran_a.mkdir()
    ran_b.mkdir()
    with DaskPool(client=client) as a:  # a's one item takes the window's one start
        assert a.starmap(span, [(str(ran_a), "a", 0.0)], limit=limit) == ["a"]
    # b's items wait for a start the window gives in 30 s, under b's own rate too
    b = DaskPool(client=client, rate="10/s", timeout=timeout)
    waiting = b.starmap_async(span, [(str(ran_b), i, 0.0) for i in range(4)], chunksize=1,
                              limit=limit)
    _wait_for(lambda: _executing_total(client) == 2)
    b.terminate()
    _wait_for(lambda: _executing_total(client) == 0, timeout_s=10)
    with pytest.raises(Exception):
        waiting.get(timeout=5)
    assert not any(ran_b.iterdir())
    # only a's start holds the window: b's waits gave back whatever they were granted
    assert client.run_on_scheduler(_named_limit_leases, name=name) == {
        f"procqueue.limit.{name}.rate": 1}
    assert client.run_on_scheduler(_procqueue_semaphores) == {}


def _has_cancelled_task(dask_worker: Any) -> bool:
    """The worker was told a task it runs is no longer wanted (it cannot stop it)."""
    return any(ts.state == "cancelled" for ts in dask_worker.state.tasks.values())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("timeout", [None, 30.0], ids=["untimed", "timed"])
def test_a_terminated_pools_running_chunk_starts_none_of_its_later_items(
        client: Any, tmp_path: Path, timeout: float | None) -> None:
    release = tmp_path / "release"
    pool = DaskPool(client=client, timeout=timeout)  # no limit: nothing to wait for
    try:
        pool.starmap_async(hold_until, [(str(tmp_path), i, str(release)) for i in range(3)],
                           chunksize=3)
        _wait_for(lambda: any(p.name.startswith("0-") for p in tmp_path.iterdir()))
        pool.terminate()
        _wait_for(lambda: any(client.run(_has_cancelled_task).values()), timeout_s=10)
    finally:
        release.touch()
    _wait_for(lambda: _executing_total(client) == 0, timeout_s=10)
    assert [p.name.split("-")[0] for p in tmp_path.iterdir() if p != release] == ["0"]


class _FakeTask:
    """A worker's TaskState, as _Abandoned reads it."""

    state = "executing"


class _FakeSemaphore:
    """Times out `polls` times, then grants; the task is cancelled at poll `cancel_at`."""

    def __init__(self, task: _FakeTask, polls: int, cancel_at: int) -> None:
        self.task, self.polls, self.cancel_at = task, polls, cancel_at
        self.asked = self.released = 0

    def acquire(self, timeout: float) -> bool:
        self.asked += 1
        if self.asked == self.cancel_at:
            self.task.state = "cancelled"
        return self.asked > self.polls

    def release(self) -> None:
        self.released += 1


class _FakeWindow:
    """A worker's rate window that grants at once, cancelling the task if told to."""

    def __init__(self, task: _FakeTask, cancel_on_grant: bool = False) -> None:
        self.task, self.cancel_on_grant = task, cancel_on_grant
        self.started = self.given_back = 0

    def acquire(self, unwanted: Any) -> None:
        if self.cancel_on_grant:
            self.task.state = "cancelled"

    def start_now(self) -> None:
        self.started += 1

    def give_back_unused(self) -> None:
        self.given_back += 1


def test_a_lease_wait_ends_holding_nothing_once_its_chunk_is_cancelled() -> None:
    from procqueue.backends.dask import worker_side

    task = _FakeTask()
    semaphore = _FakeSemaphore(task, polls=5, cancel_at=2)
    with pytest.raises(RuntimeError, match="the pool ended while this item waited"):
        with worker_side._lease(semaphore, worker_side._Unwanted(task)):
            pytest.fail("the chunk ran under a lease it never got")
    assert (semaphore.asked, semaphore.released) == (2, 0)
    # granted as the chunk is cancelled: the lease is held and given back, no item starts
    task = _FakeTask()
    granted = _FakeSemaphore(task, polls=0, cancel_at=1)
    unwanted = worker_side._Unwanted(task)
    with pytest.raises(RuntimeError, match="the pool ended"):
        with worker_side._lease(granted, unwanted):
            worker_side._Starts([], unwanted).take()
    assert granted.released == 1


def test_a_start_granted_as_the_chunk_is_cancelled_is_given_back_unused() -> None:
    from procqueue.backends.dask import worker_side

    task = _FakeTask()
    windows = [_FakeWindow(task), _FakeWindow(task, cancel_on_grant=True)]
    starts = worker_side._Starts(windows, worker_side._Unwanted(task))  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="the pool ended while this item waited for its start"):
        starts.take()
    assert [(w.started, w.given_back) for w in windows] == [(0, 1), (0, 1)]
    # outside a Dask task, a chunk is always wanted
    assert not worker_side._Unwanted.of_this_task()()


# ---- the run's records: events, trace, journal ------------------------------------------------

def test_on_event_gets_one_event_per_input_with_its_outcome_and_its_workers_times(
        client: Any, tmp_path: Path) -> None:
    events: list[procqueue.TaskEvent] = []
    items = [(str(tmp_path), i, 0.05, i == 3) for i in range(6)]  # input 3 raises
    before = time.time()
    with DaskPool(client=client, on_event=events.append) as pool:
        values = pool.starmap(span, items, errors="return")
    after = time.time()
    assert isinstance(values[3], ValueError)
    assert sorted(e.index for e in events) == list(range(6))  # exactly one each
    by_index = {e.index: e for e in events}
    assert [by_index[i].outcome for i in range(6)] == ["ok"] * 3 + ["error"] + ["ok"] * 2
    assert by_index[3].error == "ValueError: failing 3"
    assert all(e.error is None for e in events if e.outcome == "ok")
    assert len({e.job for e in events}) == 1 and all(e.attempt == 1 for e in events)
    assert all(e.input_repr.endswith(f", {e.index}, 0.05, {e.index == 3})") for e in events)
    assert {e.pid for e in events} <= _worker_pids(client)
    # a slot is a Dask worker thread, numbered per pool: one per single-threaded worker here
    assert {e.slot for e in events} <= set(range(WORKERS))
    assert len({(e.slot, e.pid) for e in events}) == len({e.slot for e in events})
    # the times are the item's own run, measured in its worker
    runs = {item: (start, end) for item, start, end in spans_in(tmp_path)}
    for e in events:
        start, end = runs[repr(e.index)]
        assert before <= e.start_s <= start + 0.001 and end - 0.001 <= e.end_s <= after
        assert e.seconds - (end - start) < 0.05


def test_every_attempt_gets_an_event_retries_and_timeouts_included(client: Any) -> None:
    events: list[procqueue.TaskEvent] = []
    with DaskPool(client=client, timeout=0.5, retries=1, retry_on=(KeyError,),
                  on_event=events.append) as pool:
        values = pool.map(fail_on_three, range(5), errors="return")
        outcomes = list(pool.imap_outcomes(spin_or_sleep, ["a", "spin"]))
    assert isinstance(values[3], KeyError) and not outcomes[1].ok
    mapped, timed = sorted({e.job for e in events})
    attempts = sorted((e.index, e.attempt, e.outcome) for e in events if e.job == mapped)
    assert attempts == [(0, 1, "ok"), (1, 1, "ok"), (2, 1, "ok"), (3, 1, "error"),
                        (3, 2, "error"), (4, 1, "ok")]
    spun = sorted((e for e in events if e.job == timed), key=lambda e: e.index)
    assert [e.outcome for e in spun] == ["ok", "timeout"]
    assert spun[1].error is not None and spun[1].error.startswith(
        "TaskTimeoutError: task timed out after 0.5 s")
    assert spun[1].seconds >= 0.5


@pytest.mark.timeout(120)
def test_an_item_that_kills_its_worker_gets_one_crash_event() -> None:
    # On a LocalCluster of its own: on this 2-core machine under load, a second series of
    # worker kills on the shared cluster could leave it with no worker at all (the scheduler
    # drops live workers whose results it failed to gather, and their nannies leave them down)
    events: list[procqueue.TaskEvent] = []
    with DaskPool(WORKERS, on_event=events.append) as pool:
        values = pool.starmap(exit_worker_on, [(x, 5) for x in range(8)], chunksize=4,
                              errors="return")
    error = values[5]
    assert isinstance(error, WorkerCrashedError)
    assert sorted(e.index for e in events) == list(range(8))  # lost chunks' runs: no events
    crash = next(e for e in events if e.index == 5)
    assert crash.outcome == "crash" and crash.attempt == error.attempts
    assert crash.slot == -1  # Dask does not say which thread of the dead worker ran it
    assert crash.error is not None and crash.error.startswith("WorkerCrashedError: Dask worker")
    assert all(e.outcome == "ok" for e in events if e.index != 5)


def test_a_trace_of_a_dask_run_reads_back_as_its_events(client: Any, tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    events: list[procqueue.TaskEvent] = []
    pool = DaskPool(client=client, trace=str(path), on_event=events.append)
    pool.map(fail_on_three, range(6), errors="return")
    pool.close()
    pool.join()  # writes the trace, as the local pool's join does
    document = json.loads(path.read_text())
    rows = {e["args"]["name"] for e in document["traceEvents"] if e["name"] == "thread_name"}
    assert rows == {f"worker {e.slot}" for e in events}
    traced = {e.index: e for e in procqueue.load_trace(path)}
    assert sorted(traced) == list(range(6)) and len(events) == 6
    for e in events:
        t = traced[e.index]
        assert (t.job, t.input_repr, t.slot, t.pid, t.attempt, t.outcome, t.error) == (
            e.job, e.input_repr, e.slot, e.pid, e.attempt, e.outcome, e.error)
        assert abs(t.start_s - e.start_s) < 1e-5 and abs(t.end_s - e.end_s) < 1e-5
    assert traced[3].outcome == "error" and "no 3" in (traced[3].error or "")


def _comparable(values: list[Any]) -> list[Any]:
    """Results, with each exception as its type and arguments (objects never compare equal)."""
    return [(type(v).__name__, v.args) if isinstance(v, BaseException) else v for v in values]


@pytest.mark.parametrize("api", ["map", "imap"])
def test_a_journaled_dask_run_skips_the_inputs_an_earlier_run_finished(
        client: Any, tmp_path: Path, api: str) -> None:
    calls, db = tmp_path / "calls", str(tmp_path / "run.db")
    calls.mkdir()

    def run(xs: Iterable[int], events: list[procqueue.TaskEvent] | None = None) -> list[Any]:
        items = [(str(calls), x) for x in xs]
        with DaskPool(client=client, journal=db,
                      on_event=None if events is None else events.append) as pool:
            if api == "map":
                return pool.map(logged_square, items, errors="return")
            return list(pool.imap(logged_square, iter(items), errors="return"))

    expected = _comparable([KeyError("no 3") if x == 3 else x * x for x in range(20)])
    assert _comparable(run(range(10))) == expected[:10]
    assert calls_in(calls) == list(range(10))
    events: list[procqueue.TaskEvent] = []
    assert _comparable(run(range(20), events)) == expected  # done ones reported again, in order
    assert calls_in(calls) == list(range(20))  # 0-9 (3 failed) were not run again
    assert sorted(e.index for e in events) == list(range(10, 20))
    with procqueue.Journal.read(db) as journal:
        summary = journal.summary()
    assert (summary.done, summary.failed, summary.pending) == (19, 1, 0)
    assert _comparable(run(range(20))) == expected  # all done: nothing runs at all
    assert calls_in(calls) == list(range(20))


# ---- options -----------------------------------------------------------------------------------

@pytest.mark.parametrize("option, value, reason", [
    ("max_memory_per_child", "1G", "recycles this machine's worker processes"),
    ("min_free_memory", "1G", "this machine's free memory"),
])
def test_local_only_pool_options_are_refused_by_name_with_the_reason(
        client: Any, option: str, value: Any, reason: str) -> None:
    with pytest.raises(TypeError, match=f"{option} not supported on the Dask backend: "
                                        f"{option}: [^;]*{reason}"):
        DaskPool(client=client, **{option: value})
    with pytest.raises(TypeError, match="not supported on the Dask backend"):
        procqueue.Pool(backend="dask", client=client, **{option: value})


def test_unknown_pool_option_is_a_type_error_and_meaningless_ones_are_accepted(client: Any) -> None:
    with pytest.raises(TypeError, match="unexpected Pool option"):
        DaskPool(client=client, no_such_option=1)
    with pytest.raises(ValueError, match="maxtasksperchild"):
        DaskPool(client=client, maxtasksperchild=0)
    with DaskPool(2, None, (), 5, "spawn", client=client, pin=False) as pool:
        assert pool.map(square, [3]) == [9]
        with pytest.raises(TypeError, match="not supported on the Dask backend: halt"):
            pool.map(square, [1], halt="now,fail=1")
        # None means "not set", as in the local pool: code passing the defaults runs
        assert pool.map(square, [2], limit=None, queue=None, halt=None) == [4]
    with DaskPool(client=client, journal=None, trace=None, queues=None, on_event=None) as pool:
        assert pool.map(square, [4]) == [16]


def test_worker_env_is_set_in_every_worker_while_the_pool_is_open(client: Any) -> None:
    with DaskPool(client=client, worker_env={"PQ_WORKER_ENV": "on"}) as pool:
        assert set(pool.map(get_env, ["PQ_WORKER_ENV"] * 6, chunksize=1)) == {"on"}
    assert set(client.run(get_env, "PQ_WORKER_ENV").values()) == {None}


# ---- lifecycle ---------------------------------------------------------------------------------

def test_initializer_runs_in_every_worker(client: Any) -> None:
    with DaskPool(client=client, initializer=set_env, initargs=("PQ_INIT", "yes")) as pool:
        assert set(pool.map(get_env, ["PQ_INIT"] * 8, chunksize=1)) == {"yes"}


def test_closed_pool_raises_and_join_finishes_submitted_work(client: Any) -> None:
    pool = DaskPool(client=client)
    result = pool.map_async(slow_identity, range(10), chunksize=1)
    pool.close()
    with pytest.raises(PoolClosedError):
        pool.map(square, [1])
    with pytest.raises(PoolClosedError):
        pool.submit(square, 1)
    pool.join()
    assert result.get(timeout=0) == list(range(10))


def test_terminate_cancels_unfinished_work(client: Any, tmp_path: Path) -> None:
    pool = DaskPool(client=client)
    futures = [pool.submit(time.sleep, 5) for _ in range(4)]
    started = time.monotonic()
    pool.terminate()
    assert time.monotonic() - started < 3
    for future in futures:  # never started: cancelled(), as the local pool's
        with pytest.raises(concurrent.futures.CancelledError):
            future.result(timeout=5)
        assert future.cancelled() or isinstance(future.exception(), TaskCancelledError)
        if not future.cancelled():  # sent to Dask, which says not whether it started
            assert "on the Dask cluster (running there, or waiting to run)" \
                in str(future.exception())
    with pytest.raises(PoolClosedError):
        pool.submit(square, 1)


@pytest.mark.parametrize("backend", ["dask", "local"])
def test_stats_state_is_in_the_same_words_on_both_backends(backend: str, client: Any) -> None:
    pool = procqueue.Pool(2) if backend == "local" else DaskPool(client=client)
    assert pool.stats().state == "running"
    assert pool.map(square, range(4)) == [0, 1, 4, 9]
    pool.close()
    assert pool.stats().state in ("running", "closing", "stopped")  # (the close is on its way)
    pool.join()
    assert pool.stats().state == "stopped"
    assert "state=CLOSE" in repr(pool)


def fail_then_count(path: str) -> None:
    with open(path, "a") as runs:
        runs.write("run\n")
    raise ValueError("failed before its retry")


def test_a_task_waiting_for_its_retry_at_terminate_ends_with_its_failure(
        client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As on the local pool: its retry never starts, so the error it failed with is its
    outcome (not "cancelled", which would lose the error and say it never ran)."""
    from procqueue.retry import RetryPolicy
    monkeypatch.setattr(RetryPolicy, "backoff", lambda self, attempts: 30.0)  # it waits
    runs = tmp_path / "runs"
    pool = DaskPool(client=client, retries=5, retry_on=(ValueError,))
    future = pool.submit(fail_then_count, str(runs))
    _wait_for(runs.exists)
    pool.terminate()
    error = future.exception(timeout=20)
    assert isinstance(error, ValueError) and "failed before its retry" in str(error)
    assert error.attempts == runs.read_text().count("run")  # type: ignore[attr-defined]
    assert procqueue.is_retry_stopped(error)


def test_cancelled_future_never_delivers(pool: DaskPool) -> None:
    blocker = [pool.submit(time.sleep, 0.3) for _ in range(WORKERS * 3)]
    late = pool.submit(square, 3)
    assert late.cancel()
    assert late.cancelled()
    for f in blocker:
        f.result(timeout=30)


def test_own_local_cluster_is_started_and_shut_down_with_the_pool() -> None:
    with DaskPool(2) as pool:
        assert pool.map(square, range(5)) == [0, 1, 4, 9, 16]
        pids = _worker_pids(pool.client)
        assert len(pids) == 2 and os.getpid() not in pids
    assert wait_gone(pids, 5) == []


OWN_CLUSTER_PROGRAM = """
import os, re, signal, subprocess, sys, time
from pathlib import Path
import procqueue

def start_child_and_hang(i):
    # In the worker's group, not a session of its own; deaf to Ctrl-C, as a program that
    # handles SIGINT itself (or one that a terminal's SIGINT does not reach)
    child = subprocess.Popen(["sleep", "60"],
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    Path(sys.argv[1], f".child-{i}").write_text(f"{os.getpid()} {child.pid}")
    os.replace(Path(sys.argv[1], f".child-{i}"), Path(sys.argv[1], f"child-{i}"))
    if sys.argv[2] == "in C":  # minutes in the regex engine, the GIL held throughout
        re.match(r"(a+)+b", "a" * 40)
    time.sleep(60)

if __name__ == "__main__":
    try:
        with procqueue.Pool(2, backend="dask") as pool:
            pool.map(start_child_and_hang, range(2), chunksize=1)
    except KeyboardInterrupt:
        sys.exit(130)
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("end, task", [("SIGKILL", "asleep"), ("Ctrl-C", "asleep"),
                                       ("SIGKILL", "in C")])
def test_a_tasks_subprocess_ends_with_the_program_on_its_own_local_cluster(
        tmp_path: Path, end: str, task: str) -> None:
    # The local pool's promise, on the LocalCluster a pool starts: nothing outlives the
    # program, a task's subprocess included.  They outlived it (reparented to init) when the
    # program was SIGKILLed, and at Ctrl-C, whose terminate killed the worker processes only;
    # a worker whose task held the GIL outlived the program until the task ended.
    script = tmp_path / "program.py"
    script.write_text(OWN_CLUSTER_PROGRAM)
    program = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), task], start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    descendants: set[int] = set()
    try:
        _wait_for(lambda: len(list(tmp_path.glob("child-*"))) == 2, timeout_s=60)
        pids = [tuple(map(int, p.read_text().split())) for p in tmp_path.glob("child-*")]
        workers, children = {w for w, _ in pids}, {c for _, c in pids}
        descendants = {p.pid for p in psutil.Process(program.pid).children(recursive=True)}
        assert workers | children <= descendants
        if end == "SIGKILL":
            program.kill()
        else:  # a terminal's Ctrl-C: SIGINT to the foreground process group
            os.killpg(program.pid, signal.SIGINT)
        program.wait(timeout=30)
        assert wait_gone(children, 5) == [], "a task's subprocess outlived the program"
        assert wait_gone(workers, 5) == [], "a worker outlived the program"
        assert wait_gone(descendants, 15) == []
    finally:
        if program.poll() is None:
            program.kill()
            program.wait(timeout=10)
        for pid in descendants:
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()


# ---- a DaskPool is a procqueue.Pool ------------------------------------------------------------

# What procqueue.Pool defines that a DaskPool runs as Pool's own: these work on a DaskPool as
# they are (the calls of calls.PoolCalls, the view of options(), the state, the no-op refill,
# the warning of a pool dropped while running, the with block's end: its submit() futures,
# then terminate()).  Every other public or multiprocessing-compatible name must be DaskPool's
# own (test below), so a name added to Pool must be sorted.
INHERITED_FROM_POOL = {"apply", "map", "map_async", "starmap", "starmap_async", "imap",
                       "imap_unordered", "options", "_state", "_repopulate_pool", "__del__",
                       "serve", "__exit__"}
MULTIPROCESSING_NAMES = {"_pool", "_repopulate_pool", "_state", "_check_running", "__new__",
                         "__init__", "__reduce__", "__del__", "__repr__", "__enter__",
                         "__exit__"}


def test_a_dask_pool_is_a_procqueue_pool_and_a_multiprocessing_pool(client: Any) -> None:
    import multiprocessing.pool

    for pool in (procqueue.Pool(backend="dask", client=client), procqueue.Pool(client=client),
                 DaskPool(client=client)):
        with pool:
            assert type(pool) is DaskPool
            assert isinstance(pool, procqueue.Pool)
            assert isinstance(pool, multiprocessing.pool.Pool)
            assert pool.map(square, [3]) == [9]
    with procqueue.Pool(1) as local:
        assert isinstance(local, multiprocessing.pool.Pool) and not isinstance(local, DaskPool)


def _driver_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("procqueue-dask-")
            and not t.name.startswith(("procqueue-dask-feeder", "procqueue-dask-item"))}


def test_a_dask_pool_made_by_procqueue_pool_is_initialised_once(
        client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pool.__new__ returns the DaskPool uninitialised and Python initialises it, once, with
    the caller's arguments - also for a subclass of Pool, which Python does not initialise."""
    calls: list[dict[str, Any]] = []
    init = DaskPool.__init__

    def counting_init(self: DaskPool, *args: Any, **kwargs: Any) -> None:
        calls.append(kwargs)
        init(self, *args, **kwargs)

    monkeypatch.setattr(DaskPool, "__init__", counting_init)

    class PoolOfOurs(procqueue.Pool):
        pass

    for make in (lambda: procqueue.Pool(backend="dask", client=client, retries=3),
                 lambda: PoolOfOurs(client=client, retries=3),
                 lambda: DaskPool(client=client, retries=3)):
        calls.clear()
        before = _driver_threads()
        with make() as pool:
            assert len(calls) == 1 and calls[0]["retries"] == 3, calls
            assert len(_driver_threads() - before) == 1  # one driver, hence one pool's setup
            assert type(pool) is DaskPool and pool.apply(square, (4,)) == 16
    calls.clear()
    with pytest.raises(TypeError, match="max_memory_per_child not supported"):
        procqueue.Pool(backend="dask", client=client, max_memory_per_child="1G")
    assert len(calls) == 1


def test_every_pool_method_works_on_a_dask_pool_or_is_its_own(client: Any) -> None:
    import multiprocessing.pool

    from procqueue.calls import PoolCalls

    pool_names = {n for n in [*vars(procqueue.Pool), *vars(PoolCalls)]
                  if not n.startswith("_")} | MULTIPROCESSING_NAMES
    own = set(vars(DaskPool))
    assert pool_names - own <= INHERITED_FROM_POOL, sorted(pool_names - own - INHERITED_FROM_POOL)

    pool = procqueue.Pool(backend="dask", client=client)
    with pool:
        assert pool.__enter__() is pool
        assert pool.apply(square, (3,)) == 9
        assert pool.apply_async(square, (4,)).get(timeout=30) == 16
        assert pool.map(square, range(4)) == [0, 1, 4, 9]
        assert pool.map_async(square, range(3)).get(timeout=30) == [0, 1, 4]
        assert pool.starmap(pow, [(2, 3)]) == [8]
        assert pool.starmap_async(pow, [(2, 2)]).get(timeout=30) == [4]
        assert list(pool.imap(square, range(3))) == [0, 1, 4]
        assert sorted(pool.imap_unordered(square, range(3))) == [0, 1, 4]
        assert [o.value for o in pool.imap_outcomes(square, range(3))] == [0, 1, 4]
        assert pool.submit(square, 5).result(timeout=30) == 25

        view = pool.options(timeout=30)  # Pool's own options(): calls carry per-call options
        assert isinstance(view, procqueue.PoolView)
        assert view.submit(square, 6).result(timeout=30) == 36
        assert view.map(square, [2]) == [4]
        assert view.options(concurrency=1).apply(square, (7,)) == 49
        with pytest.raises(TypeError, match="not supported on the Dask backend: halt"):
            pool.options(halt="now,fail=1").submit(square, 1)

        for stats in (pool.stats(), pool.statistics()):
            assert isinstance(stats, DaskPoolStats) and isinstance(stats, procqueue.PoolStats)
            assert stats.state == "running" and stats.tasks_succeeded >= 16
            assert stats.workers and all(isinstance(w, procqueue.WorkerStats)
                                         for w in stats.workers)
            # each worker's address and threads in their own fields (an idle worker runs no
            # task: its task fields stay empty)
            assert all(w.address.startswith("tcp://") and w.nthreads >= 1 and w.task is None
                       and w.task_s is None for w in stats.workers), stats.workers
        assert pool.client is client
        assert pool._state == multiprocessing.pool.RUN and pool._pool == []
        pool._repopulate_pool()  # nothing to refill: Dask replaces its own workers
        pool._check_running()
        assert repr(pool).startswith("<procqueue.DaskPool state=RUN scheduler='tcp://")
        with pytest.raises(NotImplementedError, match="cannot be passed between processes"):
            pickle.dumps(pool)

        DaskPool.check_options(2, timeout=5, rate="5/s", retries=0, backend="dask")
        pool.check_options(worker_env={"A": "1"}, pin=True, journal=None)
        pool.check_options(journal="run.db", trace="trace.json", on_event=print)
        for bad, error in (({"timeout": "300%"}, ValueError), ({"queues": {"io": 2}}, TypeError),
                           ({"on_event": 3}, TypeError), ({"trace": 3}, TypeError),
                           ({"retry_on": 3}, TypeError), ({"backend": "ray"}, ValueError),
                           ({"processes": 0}, ValueError), ({"nope": 1}, TypeError)):
            with pytest.raises(error):
                DaskPool.check_options(**bad)

        pool.close()
        assert pool._state == multiprocessing.pool.CLOSE and "state=CLOSE" in repr(pool)
        with pytest.raises(PoolClosedError):
            pool._check_running()
        pool.join()
    assert pool._state == multiprocessing.pool.TERMINATE  # __exit__ terminated it
    assert "state=TERMINATE" in repr(pool) and pool.stats().state == "stopped"


def test_a_dask_pool_dropped_while_running_says_so_as_the_local_pool_does(client: Any) -> None:
    pool = procqueue.Pool(backend="dask", client=client)
    with pytest.warns(ResourceWarning, match="unclosed running multiprocessing pool"):
        del pool
        gc.collect()
    closed = procqueue.Pool(backend="dask", client=client)
    closed.close()
    closed.join()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        del closed
        gc.collect()


def test_dask_workers_import_neither_the_local_pool_nor_its_supervisor() -> None:
    """A worker unpickles run_chunk and _WorkerSetup by reference: it imports their modules,
    and with them the package, which loads DaskPool (and procqueue.pool) only when asked."""
    code = ("import json, pickle, sys\n"
            "from procqueue.backends.dask.worker_side import run_chunk\n"
            "from procqueue.backends.dask.cluster import _WorkerSetup\n"
            "assert pickle.loads(pickle.dumps(run_chunk)) is run_chunk\n"
            "print(json.dumps([m for m in sys.modules if m.startswith('procqueue')]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    loaded = set(json.loads(out))
    assert "procqueue.backends.dask.worker_side" in loaded
    assert not loaded & {"procqueue.pool", "procqueue.supervisor", "procqueue.worker_slots",
                         "procqueue.backends.dask.pool", "procqueue.backends.dask.driver"}


def _scheduler_address(scheduler_file: Path, scheduler: "subprocess.Popen[bytes]",
                       timeout_s: float = 60.0) -> str:
    """The address the scheduler bound (port 0: no port picked here that another process could
    take first), from the file it writes once it listens."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and scheduler.poll() is None:
        try:
            return str(json.loads(scheduler_file.read_text())["address"])
        except (FileNotFoundError, ValueError, KeyError):
            time.sleep(0.05)
    raise AssertionError(f"the dask scheduler did not start (exit {scheduler.poll()})")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)


def test_connects_by_address_to_dask_scheduler_and_worker_commands(tmp_path: Path) -> None:
    scheduler_file = tmp_path / "scheduler.json"
    # Workers must import the user's modules (here: this test file) - as on a real cluster.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    scheduler = subprocess.Popen(
        ["dask", "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
         "--scheduler-file", str(scheduler_file)],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "scheduler.log", "w"),
        start_new_session=True)
    worker = None
    try:
        address = _scheduler_address(scheduler_file, scheduler)
        worker = subprocess.Popen(
            ["dask", "worker", address, "--nworkers", "2", "--nthreads", "1",
             "--no-dashboard", "--host", "127.0.0.1"],
            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "worker.log", "w"),
            start_new_session=True, env=env)
        with distributed.Client(address, timeout=30, set_as_default=False) as probe:
            probe.wait_for_workers(2, timeout=60)
        with DaskPool(address=address) as pool:
            assert pool.map(square, range(20)) == [x * x for x in range(20)]
            assert len(_worker_pids(pool.client)) == 2
            assert sorted(pool.imap_unordered(square, range(5))) == [0, 1, 4, 9, 16]
    finally:
        if worker is not None:
            _stop(worker)
        _stop(scheduler)


def test_a_worker_service_runs_a_durable_queue_on_the_cluster(pool: DaskPool, tmp_path) -> None:
    # Scale-out of the durable queues: the same Pool.serve, its tasks run by Dask workers.
    tasks = Path(__file__).with_name("queue_tasks.py")
    tq = procqueue.TaskQueue(tmp_path / "jobs.db")
    handles = tq.enqueue_many(f"{tasks}:square", range(12))
    failing = tq.enqueue(f"{tasks}:fail", 5)
    summary = pool.serve(tq, until_idle=True)
    assert [h.get_result(timeout=30) for h in handles] == [x * x for x in range(12)]
    with pytest.raises(ValueError, match="bad input 5"):
        failing.get_result(timeout=30)
    assert (summary.succeeded, summary.failed) == (12, 1)
    # Dask does not say which item a worker runs: the service's heartbeat reports no workers,
    # so a death of this service is charged as before reports (tasks claimed before a beat)
    from procqueue.service import QueueService
    service = QueueService(pool, tq)
    try:
        assert service._workers_report(ProcessMeter()) is None
    finally:
        os.close(service._pipe_r)
        os.close(service._pipe_w)
    tq.close()


def test_shutdown_waits_for_submitted_work(client: Any) -> None:
    pool = DaskPool(client=client)
    futures = [pool.submit(square, i) for i in range(4)]
    pool.shutdown()
    assert [f.result(timeout=5) for f in futures] == [0, 1, 4, 9]
    with pytest.raises(PoolClosedError):
        pool.submit(square, 1)
