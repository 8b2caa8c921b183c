"""Conformance: procqueue.Pool keeps the documented semantics of multiprocessing.Pool.

Every test here takes the `pool_cls` fixture, which is parametrised over the standard library's
pool (forkserver context, the start method procqueue uses by default), procqueue.Pool and, where
Dask distributed is installed (the test extra installs it), procqueue.Pool(backend="dask").  A
test that passes on ``multiprocessing`` proves it means what the standard library means; the
same test on ``procqueue`` proves the drop-in promise of issue #2, and on ``procqueue-dask`` the
same promise on a Dask cluster (issue #7).  Run only the reference with
``pytest tests/test_conformance.py -k "not procqueue"``.

``procqueue-dask`` pools share one LocalCluster of two single-threaded worker processes per
module (starting one costs about a second), through ``client=``.  A test whose promise is about
the pool's *own* worker processes (terminate kills them, join waits for them to exit, an
initializer runs once in each fresh one) is marked ``@pool_owns_workers``: on Dask it gets a
pool that starts its own LocalCluster, the configuration in which DaskPool keeps that promise.
A promise DaskPool cannot keep at all is marked ``@dask_difference(reason)``: a strict xfail on
Dask, listed in docs/dask.md under "Differences from the local pool".

The spec is the Python documentation of multiprocessing.pool.Pool, AsyncResult and the imap
iterators.  Functions run by the pools are module-level so that the standard pool can pickle
them; behaviour only procqueue has (lambdas, closures, submit) is tested in the separate
``test_procqueue_only_*`` tests at the end.
"""
from __future__ import annotations

import collections
import concurrent.futures
import concurrent.futures.process
import contextlib
import functools
import importlib.util
import multiprocessing
import multiprocessing.pool
import os
import pickle
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import psutil
import pytest

from process_checks import wait_gone
from conftest import dask_worker_pids, stray_children

TestFn = TypeVar("TestFn", bound=Callable[..., None])

# ---------------------------------------------------------------------------------------------
# Functions the pools run (module-level: the standard library pool pickles by reference)
# ---------------------------------------------------------------------------------------------


class CustomError(Exception):
    """A user-defined exception type; must come back as itself."""


def square(x: int) -> int:
    return x * x


def add(a: int, b: int) -> int:
    return a + b


def power(base: int, exp: int = 2, *, offset: int = 0) -> int:
    return int(base ** exp + offset)


def slow_square(x: int, delay: float = 0.02) -> int:
    time.sleep(delay)
    return x * x


def sleep_then_return(seconds: float, value: Any = "done") -> Any:
    time.sleep(seconds)
    return value


def raise_value_error(x: Any) -> NoReturn:
    raise ValueError(f"bad {x}")


def raise_custom_error(x: Any) -> NoReturn:
    raise CustomError(f"custom {x}")


def fail_on_three(x: int) -> int:
    if x == 3:
        raise ValueError(f"bad {x}")
    return x * x


def getpid_task(_x: Any) -> int:
    time.sleep(0.005)
    return os.getpid()


def record_pid_and_sleep(directory: str, seconds: float) -> int:
    Path(directory, f"running-{os.getpid()}").write_text(str(os.getpid()))
    time.sleep(seconds)
    return os.getpid()


_INIT_STATE: dict[str, Any] = {"count": 0, "value": None}


def init_record(directory: str, value: Any) -> None:
    _INIT_STATE["count"] += 1
    _INIT_STATE["value"] = value
    Path(directory, f"init-{os.getpid()}-{uuid.uuid4().hex}").write_text(str(os.getpid()))


def return_a_lock(_x: Any) -> Any:
    return threading.Lock()


def crash_worker(_x: Any) -> NoReturn:
    os._exit(3)


def report_init_state(_x: Any) -> tuple[int, int, Any]:
    time.sleep(0.005)
    return os.getpid(), _INIT_STATE["count"], _INIT_STATE["value"]


# ---------------------------------------------------------------------------------------------
# The fixture: one parametrised pool factory
# ---------------------------------------------------------------------------------------------

# procqueue-fork: the fork workers procqueue falls back to where forkserver's could not import
# the program's main module (or inherit its initargs), see fork_server.default_start_method.
IMPLEMENTATIONS = ["multiprocessing", "procqueue", "procqueue-fork"]
# Looked up, not imported: every pool worker imports this module (the functions above travel by
# reference), and importing distributed would add ~0.4 s to each worker's start.  The test
# extra installs distributed, so CI always runs the Dask pool.
if importlib.util.find_spec("distributed") is not None:
    IMPLEMENTATIONS.append("procqueue-dask")
PROCQUEUE_IMPLEMENTATIONS = [i for i in IMPLEMENTATIONS if i.startswith("procqueue")]
DASK_WORKERS = 2
SETTLE_S = 3.0  # a shared Dask worker still busy this long after a test gets restarted
_dask_clusters: list[tuple[Any, Any]] = []  # the module's shared LocalCluster while it runs
_OWN_WORKERS: set[str] = set()  # tests marked @pool_owns_workers
_DASK_DIFFERENCES: dict[str, str] = {}  # tests marked @dask_difference, with the reason


def pool_owns_workers(test: TestFn) -> TestFn:
    """The test's promise is about the pool's own worker processes: on Dask, the pool starts
    its own LocalCluster instead of sharing the module's."""
    _OWN_WORKERS.add(test.__name__)
    return test


def dask_difference(reason: str) -> Callable[[TestFn], TestFn]:
    """A documented difference (docs/dask.md): a strict xfail for the Dask pool only."""
    def mark(test: TestFn) -> TestFn:
        _DASK_DIFFERENCES[test.__name__] = reason
        return test
    return mark


def _procqueue_pool_class() -> Any:
    try:
        import procqueue
    except ImportError as exc:  # pragma: no cover - while the package is being written
        pytest.skip(f"procqueue is not importable yet: {exc}")
    cls = getattr(procqueue, "Pool", None)
    if cls is None:  # pragma: no cover
        pytest.skip("procqueue.Pool does not exist yet")
    return cls


@pytest.fixture(params=IMPLEMENTATIONS)
def pool_cls(request: pytest.FixtureRequest) -> Iterator[PoolFactory]:
    """A callable with multiprocessing.Pool's signature.  Every pool it makes is terminated and
    joined at teardown, so a failing test cannot leave workers behind."""
    yield from _pool_factory(request, request.param)


@pytest.fixture(params=PROCQUEUE_IMPLEMENTATIONS)
def procqueue_cls(request: pytest.FixtureRequest) -> Iterator[PoolFactory]:
    """pool_cls for procqueue's own pools only (what multiprocessing.Pool cannot do)."""
    yield from _pool_factory(request, request.param)


class PoolFactory:
    """Makes pools of one implementation with multiprocessing.Pool's signature, and
    remembers them for the teardown."""

    def __init__(self, implementation: str, base: Callable[..., Any]) -> None:
        self.implementation = implementation
        self.base = base
        self.made: list[Any] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        pool = self.base(*args, **kwargs)
        self.made.append(pool)
        return pool


def _pool_factory(request: pytest.FixtureRequest, implementation: str
                  ) -> Iterator[PoolFactory]:
    base: Callable[..., Any]
    if implementation == "multiprocessing":
        base = multiprocessing.get_context("forkserver").Pool
    elif implementation == "procqueue":
        base = _procqueue_pool_class()
    elif implementation == "procqueue-fork":
        base = functools.partial(_procqueue_pool_class(), context="fork")
    else:
        base = _dask_pool_class(request)
    make = PoolFactory(implementation, base)
    yield make
    for pool in make.made:
        pool.terminate()
        pool.join()
    if implementation == "procqueue-dask" and _dask_clusters:
        _settle(_dask_clusters[0][1])


def _dask_pool_class(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """procqueue.Pool(..., backend="dask") on the module's shared cluster, or on a cluster of
    its own for a @pool_owns_workers test; a @dask_difference test becomes a strict xfail."""
    reason = _DASK_DIFFERENCES.get(request.function.__name__)
    if reason is not None:
        request.applymarker(pytest.mark.xfail(strict=True,
                                              reason=f"documented difference: {reason}"))
    cls = _procqueue_pool_class()
    if request.function.__name__ in _OWN_WORKERS:
        return functools.partial(cls, backend="dask")
    return functools.partial(cls, backend="dask", client=request.getfixturevalue("dask_client"))


@pytest.fixture(scope="module")
def dask_client() -> Iterator[Any]:
    """A Client of a LocalCluster of DASK_WORKERS single-threaded worker processes, configured
    as DaskPool configures its own (cluster_config).  Module scope: conftest's stray-process
    check runs after every test of the other modules, and these processes must be gone then."""
    import dask

    from procqueue.backends.dask import cluster_config

    # typed Any: distributed is only partly annotated (procqueue's _distributed() does the same)
    distributed: Any = importlib.import_module("distributed")

    with dask.config.set(cluster_config(retries=1)):
        cluster = distributed.LocalCluster(n_workers=DASK_WORKERS, threads_per_worker=1,
                                           processes=True, dashboard_address="127.0.0.1:0")
    client = distributed.Client(cluster, set_as_default=False)
    _dask_clusters.append((cluster, client))
    yield client
    _dask_clusters.clear()
    client.close()
    cluster.close()


def _settle(client: Any) -> None:
    """Wait for the shared workers to be idle; restart them if a test left an item running
    (Dask cannot stop a running task), so that it cannot slow the next tests down."""
    deadline = time.monotonic() + SETTLE_S
    while any(client.run(_executing_count).values()):
        if time.monotonic() > deadline:
            client.restart(wait_for_workers=True)
            return
        time.sleep(0.02)


def _executing_count(dask_worker: Any) -> int:
    return int(dask_worker.state.executing_count)


@pytest.fixture(autouse=True)
def no_stray_processes() -> Iterator[None]:
    """conftest's check (a test that leaves a child process behind fails), except for the
    module's shared Dask cluster's worker processes: they outlive each test by design, and
    are checked by conftest's fixture in the test that follows this module."""
    yield
    # re-read while waiting: a restarted shared worker has a new pid
    left = stray_children(grace_s=2.0, allowed=lambda: {
        pid for cluster, _ in _dask_clusters for pid in dask_worker_pids(cluster)})
    for proc in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    assert not left, f"stray processes after test: {[(p.pid, p.cmdline()) for p in left]}"


def _wait_for_files(directory: Path, pattern: str, count: int,
                    timeout_s: float = 15.0) -> list[Path]:
    deadline = time.monotonic() + timeout_s
    while True:
        files = sorted(directory.glob(pattern))
        if len(files) >= count or time.monotonic() > deadline:
            return files
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------
# map / starmap / imap / imap_unordered: results and order
# ---------------------------------------------------------------------------------------------


def test_map_returns_results_in_input_order(pool_cls: PoolFactory) -> None:
    with pool_cls(2) as pool:
        assert pool.map(square, range(50)) == [x * x for x in range(50)]


@pytest.mark.parametrize("chunksize", [1, 3, 7, 1000])
def test_map_accepts_chunksize(pool_cls: PoolFactory, chunksize: int) -> None:
    with pool_cls(2) as pool:
        assert pool.map(square, range(23), chunksize) == [x * x for x in range(23)]
        assert pool.map(square, range(23), chunksize=chunksize) == [x * x for x in range(23)]


def test_map_consumes_a_generator_without_len(pool_cls: PoolFactory) -> None:
    with pool_cls(2) as pool:
        assert pool.map(square, (x for x in range(30))) == [x * x for x in range(30)]


def test_map_keeps_order_when_early_items_are_slower(pool_cls: PoolFactory) -> None:
    delays = [0.3, 0.0, 0.0, 0.0, 0.0, 0.0]
    with pool_cls(2) as pool:
        assert pool.map(sleep_then_return, delays, chunksize=1) == ["done"] * 6
        out = pool.starmap(sleep_then_return, [(d, i) for i, d in enumerate(delays)], chunksize=1)
        assert out == list(range(6))


def test_map_empty_iterable_returns_empty_list(pool_cls: PoolFactory) -> None:
    with pool_cls(2) as pool:
        assert pool.map(square, []) == []
        assert pool.map(square, iter(())) == []


def test_starmap_unpacks_argument_tuples_in_order(pool_cls: PoolFactory) -> None:
    pairs = [(i, 10 * i) for i in range(25)]
    with pool_cls(2) as pool:
        assert pool.starmap(add, pairs) == [a + b for a, b in pairs]
        assert pool.starmap(add, pairs, chunksize=4) == [a + b for a, b in pairs]
        assert pool.starmap(add, iter(pairs), 1) == [a + b for a, b in pairs]


def test_starmap_empty_iterable_returns_empty_list(pool_cls: PoolFactory) -> None:
    with pool_cls(2) as pool:
        assert pool.starmap(add, []) == []


@pytest.mark.parametrize("chunksize", [1, 4])
def test_imap_yields_results_in_input_order(pool_cls: PoolFactory, chunksize: int) -> None:
    with pool_cls(2) as pool:
        it = pool.imap(square, range(30), chunksize)
        assert iter(it) is it
        assert list(it) == [x * x for x in range(30)]
        assert list(pool.imap(square, range(30), chunksize=chunksize)) == [x * x for x in range(30)]


def test_imap_iterator_has_next_method(pool_cls: PoolFactory) -> None:
    with pool_cls(2) as pool:
        it = pool.imap(square, range(3))
        assert it.next() == 0
        assert next(it) == 1
        assert it.next(timeout=10) == 4
        with pytest.raises(StopIteration):
            it.next()


def test_imap_keeps_order_when_early_items_are_slower(pool_cls: PoolFactory) -> None:
    delays = [0.3, 0.0, 0.0, 0.0]
    with pool_cls(2) as pool:
        out = list(pool.imap(slow_square, range(4), 1))
        assert out == [0, 1, 4, 9]
        assert list(pool.imap(sleep_then_return, delays, 1)) == ["done"] * 4


@pytest.mark.parametrize("chunksize", [1, 4])
def test_imap_unordered_yields_every_result_once(pool_cls: PoolFactory, chunksize: int) -> None:
    with pool_cls(2) as pool:
        it = pool.imap_unordered(square, range(30), chunksize)
        assert iter(it) is it
        out = list(it)
        assert sorted(out) == [x * x for x in range(30)]
        assert len(out) == 30


def test_imap_unordered_with_uneven_durations_yields_every_result(pool_cls: PoolFactory) -> None:
    # The docs call the order arbitrary; what is promised is every result exactly once.
    with pool_cls(2) as pool:
        out = list(pool.imap_unordered(_star_sleep_then_return,
                                       [(0.5, "slow")] + [(0.0, i) for i in range(5)], 1))
    assert sorted(out, key=str) == sorted(["slow", 0, 1, 2, 3, 4], key=str)


def _star_sleep_then_return(pair: tuple[float, Any]) -> Any:
    return sleep_then_return(*pair)


@pytest.mark.parametrize("method", ["imap", "imap_unordered"])
def test_imap_empty_iterable_yields_nothing(pool_cls: PoolFactory, method: str) -> None:
    with pool_cls(2) as pool:
        assert list(getattr(pool, method)(square, [])) == []


# ---------------------------------------------------------------------------------------------
# apply / apply_async / map_async / starmap_async and AsyncResult
# ---------------------------------------------------------------------------------------------


def test_apply_returns_the_value_with_args_and_kwds(pool_cls: PoolFactory) -> None:
    with pool_cls(2) as pool:
        assert pool.apply(square, (7,)) == 49
        assert pool.apply(power, (2,), {"exp": 5}) == 32
        assert pool.apply(power, (3, 2), {"offset": 1}) == 10
        assert pool.apply(os.getpid) != os.getpid()


def test_apply_async_get_returns_the_value(pool_cls: PoolFactory) -> None:
    with pool_cls(2) as pool:
        result = pool.apply_async(power, (2,), {"exp": 10})
        assert result.get(timeout=30) == 1024
        assert result.get() == 1024  # get() may be called again
        assert result.ready()
        assert result.successful()


def test_apply_async_callback_receives_the_value(pool_cls: PoolFactory) -> None:
    got: list[Any] = []
    called = threading.Event()

    def callback(value: Any) -> None:
        got.append(value)
        called.set()

    with pool_cls(2) as pool:
        result = pool.apply_async(square, (9,), callback=callback)
        assert result.get(timeout=30) == 81
        assert called.wait(10)
    assert got == [81]


def test_apply_async_error_callback_receives_the_exception(pool_cls: PoolFactory) -> None:
    got: list[Any] = []
    called = threading.Event()

    def error_callback(exc: BaseException) -> None:
        got.append(exc)
        called.set()

    with pool_cls(2) as pool:
        result = pool.apply_async(raise_value_error, (4,), error_callback=error_callback)
        with pytest.raises(ValueError, match="bad 4"):
            result.get(timeout=30)
        assert called.wait(10)
        assert not result.successful()
    assert len(got) == 1
    assert type(got[0]) is ValueError
    assert str(got[0]) == "bad 4"


def test_map_async_callback_receives_the_full_list(pool_cls: PoolFactory) -> None:
    got: list[Any] = []
    with pool_cls(2) as pool:
        result = pool.map_async(square, range(20), callback=got.append)
        assert result.get(timeout=30) == [x * x for x in range(20)]
        result.wait(10)
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
    assert got == [[x * x for x in range(20)]]


def test_map_async_with_chunksize_and_empty_iterable(pool_cls: PoolFactory) -> None:
    with pool_cls(2) as pool:
        assert pool.map_async(square, range(10), 3).get(timeout=30) == [x * x for x in range(10)]
        # (multiprocessing does not call the callback for an empty iterable, so neither is asked.)
        result = pool.map_async(square, [])
        assert result.get(timeout=30) == []
        assert result.successful()


def test_map_async_error_callback_receives_the_exception(pool_cls: PoolFactory) -> None:
    got_errors: list[BaseException] = []
    got_values: list[Any] = []
    with pool_cls(2) as pool:
        result = pool.map_async(fail_on_three, range(6), callback=got_values.append,
                                error_callback=got_errors.append)
        with pytest.raises(ValueError, match="bad 3"):
            result.get(timeout=30)
        deadline = time.monotonic() + 10
        while not got_errors and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not result.successful()
    assert got_values == []
    assert len(got_errors) == 1
    assert type(got_errors[0]) is ValueError and str(got_errors[0]) == "bad 3"


def test_starmap_async_callback_receives_the_full_list(pool_cls: PoolFactory) -> None:
    got: list[Any] = []
    pairs = [(i, i) for i in range(12)]
    with pool_cls(2) as pool:
        result = pool.starmap_async(add, pairs, callback=got.append)
        assert result.get(timeout=30) == [2 * i for i in range(12)]
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pool.starmap_async(add, pairs, 5).get(timeout=30) == [2 * i for i in range(12)]
    assert got == [[2 * i for i in range(12)]]


def test_starmap_async_error_callback_receives_the_exception(pool_cls: PoolFactory) -> None:
    got: list[Any] = []
    with pool_cls(2) as pool:
        result = pool.starmap_async(fail_on_three, [(i,) for i in range(5)],
                                    error_callback=got.append)
        with pytest.raises(ValueError, match="bad 3"):
            result.get(timeout=30)
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
    assert len(got) == 1 and type(got[0]) is ValueError


def test_get_with_timeout_raises_multiprocessing_timeout_error_when_not_ready(
        pool_cls: PoolFactory) -> None:
    with pool_cls(2) as pool:
        result = pool.apply_async(sleep_then_return, (1.0, "late"))
        start = time.monotonic()
        with pytest.raises(multiprocessing.TimeoutError):
            result.get(timeout=0.1)
        assert time.monotonic() - start < 0.9
        assert not result.ready()
        assert result.get(timeout=30) == "late"
        mapped = pool.map_async(sleep_then_return, [1.0, 1.0])
        with pytest.raises(multiprocessing.TimeoutError):
            mapped.get(timeout=0.1)
        assert mapped.get(timeout=30) == ["done", "done"]


def test_wait_and_ready(pool_cls: PoolFactory) -> None:
    with pool_cls(2) as pool:
        result = pool.apply_async(sleep_then_return, (0.8,))
        assert not result.ready()
        start = time.monotonic()
        assert result.wait(0.1) is None
        assert time.monotonic() - start < 0.7
        assert not result.ready()
        result.wait()
        assert result.ready()
        assert result.successful()
        assert result.get(timeout=0) == "done"


def test_successful_raises_value_error_when_not_ready(pool_cls: PoolFactory) -> None:
    with pool_cls(2) as pool:
        result = pool.apply_async(sleep_then_return, (1.0,))
        with pytest.raises(ValueError):
            result.successful()
        mapped = pool.map_async(sleep_then_return, [1.0])
        with pytest.raises(ValueError):
            mapped.successful()
        result.wait(30)
        mapped.wait(30)
        assert result.successful() and mapped.successful()


def test_successful_is_false_after_the_task_raised(pool_cls: PoolFactory) -> None:
    with pool_cls(2) as pool:
        result = pool.apply_async(raise_value_error, (1,))
        result.wait(30)
        assert result.ready()
        assert result.successful() is False
        with pytest.raises(ValueError, match="bad 1"):
            result.get()


def test_imap_next_timeout_raises_multiprocessing_timeout_error(pool_cls: PoolFactory) -> None:
    with pool_cls(2) as pool:
        for method in ("imap", "imap_unordered"):
            it = getattr(pool, method)(sleep_then_return, [1.0])
            start = time.monotonic()
            with pytest.raises(multiprocessing.TimeoutError):
                it.next(timeout=0.1)
            assert time.monotonic() - start < 0.9
            assert it.next(timeout=30) == "done"
            with pytest.raises(StopIteration):
                it.next(timeout=30)


# ---------------------------------------------------------------------------------------------
# Exceptions raised by tasks
# ---------------------------------------------------------------------------------------------


def _call_map(pool: Any, fn: Callable[[Any], Any], x: Any) -> Any:
    return pool.map(fn, [x])


def _call_map_async(pool: Any, fn: Callable[[Any], Any], x: Any) -> Any:
    return pool.map_async(fn, [x]).get(timeout=30)


def _call_starmap(pool: Any, fn: Callable[[Any], Any], x: Any) -> Any:
    return pool.starmap(fn, [(x,)])


def _call_apply(pool: Any, fn: Callable[[Any], Any], x: Any) -> Any:
    return pool.apply(fn, (x,))


def _call_apply_async(pool: Any, fn: Callable[[Any], Any], x: Any) -> Any:
    return pool.apply_async(fn, (x,)).get(timeout=30)


def _call_imap(pool: Any, fn: Callable[[Any], Any], x: Any) -> Any:
    return list(pool.imap(fn, [x]))


def _call_imap_unordered(pool: Any, fn: Callable[[Any], Any], x: Any) -> Any:
    return list(pool.imap_unordered(fn, [x]))


CALLS = {
    "map": _call_map, "map_async": _call_map_async, "starmap": _call_starmap,
    "apply": _call_apply, "apply_async": _call_apply_async, "imap": _call_imap,
    "imap_unordered": _call_imap_unordered,
}


@pytest.mark.parametrize("call", sorted(CALLS))
@pytest.mark.parametrize("fn, exc_type, message", [
    (raise_value_error, ValueError, "bad 5"),
    (raise_custom_error, CustomError, "custom 5"),
])
def test_task_exception_keeps_type_and_message(pool_cls: PoolFactory, call: str,
                                               fn: Callable[[Any], Any],
                                               exc_type: type[BaseException],
                                               message: str) -> None:
    with pool_cls(2) as pool:
        with pytest.raises(exc_type) as info:
            CALLS[call](pool, fn, 5)
        assert type(info.value) is exc_type
        assert str(info.value) == message
        assert info.value.args == (message,)
        # Both pools chain the worker's traceback text as the cause.
        assert info.value.__cause__ is not None
        assert fn.__name__ in str(info.value.__cause__)
        # The pool is still usable.
        assert pool.map(square, range(4)) == [0, 1, 4, 9]


def test_map_raises_the_task_exception(pool_cls: PoolFactory) -> None:
    with pool_cls(2) as pool:
        with pytest.raises(ValueError, match="bad 3"):
            pool.map(fail_on_three, range(10), chunksize=1)
        assert pool.map(square, range(5)) == [0, 1, 4, 9, 16]


@pytest.mark.parametrize("chunksize", [1])
def test_imap_continues_yielding_after_an_item_raised(pool_cls: PoolFactory,
                                                      chunksize: int) -> None:
    with pool_cls(2) as pool:
        it = pool.imap(fail_on_three, range(7), chunksize)
        assert [next(it) for _ in range(3)] == [0, 1, 4]
        with pytest.raises(ValueError, match="bad 3"):
            next(it)
        assert list(it) == [16, 25, 36]


def test_imap_unordered_continues_yielding_after_an_item_raised(pool_cls: PoolFactory) -> None:
    with pool_cls(2) as pool:
        it = pool.imap_unordered(fail_on_three, range(7), 1)
        values, errors = [], []
        for _ in range(7):
            try:
                values.append(next(it))
            except ValueError as exc:
                errors.append(exc)
        with pytest.raises(StopIteration):
            next(it)
        assert sorted(values) == [0, 1, 4, 16, 25, 36]
        assert [str(e) for e in errors] == ["bad 3"]


# ---------------------------------------------------------------------------------------------
# Lifecycle: close / join / terminate / context manager / closed pool
# ---------------------------------------------------------------------------------------------


def test_close_then_join_finishes_queued_work(pool_cls: PoolFactory) -> None:
    pool = pool_cls(2)
    results = [pool.apply_async(slow_square, (i, 0.05)) for i in range(8)]
    mapped = pool.map_async(square, range(10))
    pool.close()
    start = time.monotonic()
    pool.join()
    assert time.monotonic() - start < 20
    assert [r.get(timeout=0) for r in results] == [i * i for i in range(8)]
    assert mapped.get(timeout=0) == [x * x for x in range(10)]


def test_join_before_close_raises_value_error(pool_cls: PoolFactory) -> None:
    pool = pool_cls(2)
    try:
        assert pool.map(square, [1, 2]) == [1, 4]
        with pytest.raises(ValueError):
            pool.join()
        # still running and usable after the refused join
        assert pool.apply(square, (3,)) == 9
    finally:
        pool.close()
        pool.join()


def _use_map(pool: Any) -> Any:
    return pool.map(square, [1])


def _use_map_async(pool: Any) -> Any:
    return pool.map_async(square, [1])


def _use_starmap(pool: Any) -> Any:
    return pool.starmap(add, [(1, 2)])


def _use_starmap_async(pool: Any) -> Any:
    return pool.starmap_async(add, [(1, 2)])


def _use_apply(pool: Any) -> Any:
    return pool.apply(square, (1,))


def _use_apply_async(pool: Any) -> Any:
    return pool.apply_async(square, (1,))


def _use_imap(pool: Any) -> Any:
    return list(pool.imap(square, [1]))


def _use_imap_unordered(pool: Any) -> Any:
    return list(pool.imap_unordered(square, [1]))


USES = {
    "map": _use_map, "map_async": _use_map_async, "starmap": _use_starmap,
    "starmap_async": _use_starmap_async, "apply": _use_apply, "apply_async": _use_apply_async,
    "imap": _use_imap, "imap_unordered": _use_imap_unordered,
}


@pytest.mark.parametrize("how", ["close", "terminate"])
@pytest.mark.parametrize("use", sorted(USES))
def test_closed_pool_refuses_work_with_value_error(pool_cls: PoolFactory, how: str,
                                                   use: str) -> None:
    pool = pool_cls(2)
    getattr(pool, how)()
    with pytest.raises(ValueError):
        USES[use](pool)
    pool.join()


def test_context_manager_returns_the_pool(pool_cls: PoolFactory) -> None:
    pool = pool_cls(2)
    with pool as entered:
        assert entered is pool
        assert entered.map(square, [2, 3]) == [4, 9]


@pool_owns_workers
def test_context_exit_terminates_running_work(pool_cls: PoolFactory, tmp_path: Path) -> None:
    with pool_cls(2) as pool:
        result = pool.apply_async(record_pid_and_sleep, (str(tmp_path), 60))
        files = _wait_for_files(tmp_path, "running-*", 1)
        assert files, "the task never started"
        worker_pid = int(files[0].name.split("-")[1])  # the name: the content may lag
        start = time.monotonic()
    # __exit__ calls terminate(): a 60 s task must not hold it up.
    assert time.monotonic() - start < 5
    assert not result.ready() or not result.successful()
    assert wait_gone([worker_pid], 5) == []
    with pytest.raises(ValueError):
        pool.map(square, [1])
    pool.join()


@pool_owns_workers
def test_terminate_stops_running_work_promptly(pool_cls: PoolFactory, tmp_path: Path) -> None:
    pool = pool_cls(2)
    pool.apply_async(record_pid_and_sleep, (str(tmp_path), 60))
    files = _wait_for_files(tmp_path, "running-*", 1)
    assert files
    worker_pid = int(files[0].name.split("-")[1])  # the name: the content may lag
    start = time.monotonic()
    pool.terminate()
    pool.join()
    assert time.monotonic() - start < 5
    assert wait_gone([worker_pid], 5) == []


@pool_owns_workers
def test_join_after_close_returns_workers_gone(pool_cls: PoolFactory) -> None:
    pool = pool_cls(2)
    pids = set(pool.map(getpid_task, range(10), 1))
    pool.close()
    pool.join()
    assert wait_gone(pids, 5) == []


# ---------------------------------------------------------------------------------------------
# Constructor arguments
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("processes", [0, -1])
def test_processes_below_one_raises_value_error(pool_cls: PoolFactory, processes: int) -> None:
    with pytest.raises(ValueError):
        pool_cls(processes)


def test_default_processes_works(pool_cls: PoolFactory) -> None:
    with pool_cls() as pool:
        assert pool.map(square, range(5)) == [0, 1, 4, 9, 16]


@pool_owns_workers
def test_initializer_runs_once_per_worker_process(pool_cls: PoolFactory, tmp_shared: Path) -> None:
    with pool_cls(2, init_record, (str(tmp_shared), "hello")) as pool:
        out = pool.map(report_init_state, range(20), chunksize=1)
    task_pids = {pid for pid, _, _ in out}
    assert all(count == 1 and value == "hello" for _, count, value in out), out
    init_pids = collections.Counter(int(p.read_text()) for p in tmp_shared.glob("init-*"))
    assert all(n == 1 for n in init_pids.values()), init_pids
    assert task_pids <= set(init_pids), (task_pids, init_pids)
    assert len(init_pids) <= 2


@pool_owns_workers
def test_initializer_keyword_arguments(pool_cls: PoolFactory, tmp_shared: Path) -> None:
    with pool_cls(processes=1, initializer=init_record,
                  initargs=(str(tmp_shared), "kw")) as pool:
        pid, count, value = pool.apply(report_init_state, (0,))
    assert (count, value) == (1, "kw")
    assert [int(p.read_text()) for p in tmp_shared.glob("init-*")] == [pid]


@dask_difference("maxtasksperchild is ignored: Dask's worker processes are not recycled "
                 "by task count")
def test_maxtasksperchild_limits_tasks_per_worker_process(pool_cls: PoolFactory) -> None:
    with pool_cls(2, maxtasksperchild=2) as pool:
        pids = pool.map(getpid_task, range(12), chunksize=1)
    per_pid = collections.Counter(pids)
    assert len(pids) == 12
    assert max(per_pid.values()) <= 2, per_pid
    assert len(per_pid) >= 6


@dask_difference("maxtasksperchild is ignored, so no replacement worker is started")
def test_replacement_workers_run_the_initializer(pool_cls: PoolFactory, tmp_shared: Path) -> None:
    with pool_cls(2, init_record, (str(tmp_shared), "again"), maxtasksperchild=1) as pool:
        out = pool.map(report_init_state, range(6), chunksize=1)
    assert len({pid for pid, _, _ in out}) == 6
    assert all(count == 1 and value == "again" for _, count, value in out), out
    init_pids = collections.Counter(int(p.read_text()) for p in tmp_shared.glob("init-*"))
    assert all(n == 1 for n in init_pids.values())
    assert {pid for pid, _, _ in out} <= set(init_pids)


def test_workers_are_other_processes(pool_cls: PoolFactory) -> None:
    with pool_cls(2) as pool:
        pids = set(pool.map(getpid_task, range(10), 1))
    assert os.getpid() not in pids
    assert 1 <= len(pids) <= 2


def test_an_unpicklable_result_raises_maybe_encoding_error(pool_cls: PoolFactory) -> None:
    with pool_cls(1) as pool:
        with pytest.raises(multiprocessing.pool.MaybeEncodingError):
            pool.map(return_a_lock, [1])
        assert pool.map(square, [3]) == [9]  # the pool goes on


@pytest.mark.parametrize("bad", ["args", "kwds", "func"])
def test_apply_async_with_a_bad_call_fails_through_get_and_error_callback(
        pool_cls: PoolFactory, bad: str) -> None:
    # multiprocessing finds out in the worker: the call itself returns a result
    call: dict[str, Any] = {"args": 5} if bad == "args" else {"kwds": [1]} if bad == "kwds" \
        else {}
    errors: list[BaseException] = []
    with pool_cls(1) as pool:
        result = pool.apply_async(None if bad == "func" else square, error_callback=errors.append,
                                  **call)
        with pytest.raises(TypeError):
            result.get(timeout=30)
        assert [type(e) for e in errors] == [TypeError]


def test_map_imap_of_something_not_callable_fail_as_multiprocessing_finds_out_in_its_workers(
        pool_cls: PoolFactory) -> None:
    errors: list[BaseException] = []
    with pool_cls(1) as pool:
        with pytest.raises(TypeError, match="'NoneType' object is not callable"):
            pool.map(None, [1, 2])
        result = pool.map_async(None, [1], error_callback=errors.append)
        with pytest.raises(TypeError):
            result.get(timeout=30)
        assert [type(e) for e in errors] == [TypeError]
        iterator = pool.imap(None, [1, 2])
        for _ in range(2):  # each input fails on its own
            with pytest.raises(TypeError):
                iterator.next(timeout=30)
        assert pool.map(None, []) == [] and list(pool.imap(None, [])) == []
        assert pool.map(square, [3]) == [9]


def raise_holding_a_lock(_: Any) -> None:
    raise ValueError(threading.Lock())


def test_an_exception_that_cannot_be_pickled_raises_maybe_encoding_error(
        pool_cls: PoolFactory) -> None:
    with pool_cls(1) as pool:
        with pytest.raises(multiprocessing.pool.MaybeEncodingError):
            pool.map(raise_holding_a_lock, [1])
        assert pool.map(square, [3]) == [9]  # the pool goes on


def test_an_unpicklable_argument_raises_a_pickling_error(pool_cls: PoolFactory) -> None:
    # multiprocessing raises pickle's own error (TypeError for a lock); procqueue's
    # ArgumentSerializationError is a pickle.PicklingError
    with pool_cls(1) as pool:
        with pytest.raises((TypeError, pickle.PicklingError)):
            pool.map(square, [threading.Lock()])
        assert pool.map(square, [3]) == [9]


def test_a_pool_cannot_be_pickled(pool_cls: PoolFactory) -> None:
    with pool_cls(1) as pool:
        with pytest.raises(NotImplementedError, match="cannot be passed between processes"):
            pickle.dumps(pool)


def test_results_are_the_documented_classes(pool_cls: PoolFactory) -> None:
    # "class multiprocessing.pool.AsyncResult: the class of the result returned by
    # Pool.apply_async() and Pool.map_async()"; code written for the standard pool may check.
    with pool_cls(2) as pool:
        assert isinstance(pool, multiprocessing.pool.Pool)
        results = [pool.apply_async(square, (3,)), pool.map_async(square, [1, 2]),
                   pool.starmap_async(add, [(1, 2)])]
        assert all(isinstance(r, multiprocessing.pool.AsyncResult) for r in results)
        assert [r.get(timeout=30) for r in results] == [9, [1, 4], [3]]
        iterators = [pool.imap(square, [1, 2]), pool.imap_unordered(square, [1, 2])]
        assert all(isinstance(it, multiprocessing.pool.IMapIterator) for it in iterators)
        assert list(iterators[0]) == [1, 4] and sorted(iterators[1]) == [1, 4]


# ---------------------------------------------------------------------------------------------
# procqueue only: what multiprocessing.Pool cannot do (it pickles functions by reference)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def procqueue_pool(procqueue_cls: PoolFactory) -> Any:
    return procqueue_cls(2)


def test_procqueue_only_lambdas_and_closures(procqueue_pool: Any) -> None:
    pool = procqueue_pool
    offset = 100

    def closure(x: int) -> int:
        return x + offset

    assert pool.map(lambda x: x * 3, range(10)) == [x * 3 for x in range(10)]
    assert pool.map(closure, range(5)) == [100, 101, 102, 103, 104]
    assert list(pool.imap(closure, range(5))) == [100, 101, 102, 103, 104]
    assert sorted(pool.imap_unordered(lambda x: -x, range(5))) == [-4, -3, -2, -1, 0]
    assert pool.starmap(lambda a, b: a * b, [(2, 3), (4, 5)]) == [6, 20]
    assert pool.apply(lambda: "hi") == "hi"
    assert pool.apply_async(closure, (1,)).get(timeout=30) == 101


@pool_owns_workers  # it kills a worker process
def test_procqueue_only_a_crashed_workers_future_raises_broken_process_pool(
        procqueue_pool: Any) -> None:
    # what ProcessPoolExecutor code catches; procqueue fails only the task that crashed
    future = procqueue_pool.submit(crash_worker, 1)
    with pytest.raises(concurrent.futures.process.BrokenProcessPool):
        future.result(timeout=30)
    assert procqueue_pool.submit(square, 4).result(timeout=30) == 16


def test_procqueue_only_submit_returns_a_concurrent_future(procqueue_pool: Any) -> None:
    pool = procqueue_pool
    futures = [pool.submit(power, i, exp=3, offset=1) for i in range(6)]
    assert all(isinstance(f, concurrent.futures.Future) for f in futures)
    done = [f.result() for f in concurrent.futures.as_completed(futures, timeout=30)]
    assert sorted(done) == sorted(i ** 3 + 1 for i in range(6))
    failing = pool.submit(raise_value_error, 2)
    assert isinstance(failing.exception(timeout=30), ValueError)
    with pytest.raises(ValueError, match="bad 2"):
        failing.result()
    assert pool.submit(lambda: 5).result(timeout=30) == 5


@pool_owns_workers
def test_procqueue_only_initializer_may_be_a_lambda(procqueue_cls: PoolFactory,
                                                    tmp_shared: Path) -> None:
    directory = str(tmp_shared)
    with procqueue_cls(2, initializer=lambda: init_record(directory, "lam")) as pool:
        out = pool.map(report_init_state, range(6), chunksize=1)
    assert all(count == 1 and value == "lam" for _, count, value in out)
