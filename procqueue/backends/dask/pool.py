"""DaskPool: procqueue.Pool's API and result objects on a Dask distributed cluster.

The calls (apply_async, map, imap, submit, imap_outcomes...) turn their inputs into items
(items.py) and post them to the pool's driver thread (driver.py); close, terminate and join
end it and give back what the pool holds on the cluster (cluster.py).  DaskPool is a
procqueue.Pool (isinstance holds, and code typed for a Pool accepts it) that runs none of the
local pool's machinery: it overrides what the local pool does with its supervisor and keeps
what holds for any pool.  Its stats() are a DaskPoolStats with DaskWorkerStats rows: a
PoolStats and WorkerStats, with the fields a Dask cluster can fill and a few of its own.

The records of a run are the front end's, as in the local pool, and kept with Pool's own
code: the journal of map/imap calls (Pool._open_run_records, then each call's
_JournaledCall: inputs done in an earlier run are replayed by the caller or the feeder, never
sent to Dask, and outcomes are committed before they are reported) and the trace; the
driver only gives the listener one TaskEvent per attempt (driver.py).
"""

from __future__ import annotations

import itertools
import os
import threading
import uuid
import weakref
from functools import partial
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from ...calls import errors_mode
from ...chunking import ChunkSizer
from ...errors import InitializerError, PoolClosedError
from ...input_feed import InputFeed, Inputs, window_size
from ...limits import Rate
# The one import of the local pool's module: a DaskPool is a procqueue.Pool (its base class,
# state values, stats types and per-call options, and the front end's journal of a call), and
# uses none of its machinery.
from ...pool import (BACKENDS, CallOptions, Pool, PoolState, PoolStats, Queue, WorkerStats,
                     _JournaledCall)
from ...protocol import CallKind, NotCallable, pickled_function
from ...results import (ApplyResult, CallbackRunner, IMapIterator, MapResult, OutcomeIterator,
                        ResultStream, TaskFuture, Window)
from .cluster import CLOSE_TIMEOUT_S, _close_quietly, _Resources, _WorkerSetup
from .cluster_limits import ClusterLimits
from .driver import _Driver
from .items import (DaskJob, DaskTask, _CancelCall, _Close, _InputDone, _Open, _Submit,
                    _Terminate, _make_item)
from .options import DEFAULT_CRASH_RETRIES, _call_options, check_pool_options
from .worker_side import FUNCTION_CACHE_SIZE

if TYPE_CHECKING:
    from ...stats import TaskEvent

TARGET_CHUNK_S = 0.2  # a Dask task costs ~1-3 ms of scheduling: aim for chunks of 200 ms
MAX_CHUNK_ITEMS = 10_000  # caps one chunk's memory and result latency


# Records (procqueue/records.py) as their bases are: a dataclass would not see the fields of
# a base that is not one.
class DaskWorkerStats(WorkerStats):
    """One Dask worker, as the scheduler reports it: the WorkerStats fields it can fill (cpus
    empty, idle_s and restarts 0, last_exit None), its address and its thread count."""

    _fields = (*WorkerStats._fields, "address", "nthreads")

    address: str
    nthreads: int

    def __init__(self, slot: int, pid: int | None, cpus: tuple[int, ...], tasks_done: int,
                 busy_s: float, idle_s: float, restarts: int, last_exit: str | None,
                 rss_bytes: int, task: str | None = None, task_s: float | None = None,
                 task_input: Any = None, address: str = "", nthreads: int = 0) -> None:
        super().__init__(slot, pid, cpus, tasks_done, busy_s, idle_s, restarts, last_exit,
                         rss_bytes, task, task_s, task_input)
        object.__setattr__(self, "address", address)
        object.__setattr__(self, "nthreads", nthreads)


class DaskPoolStats(PoolStats):
    """The PoolStats fields (same names and meaning) for a DaskPool, where processes counts
    the Dask worker threads in the cluster, tasks_running the items in chunks submitted to
    Dask (running or waiting there) and worker_restarts the chunks Dask lost with a worker;
    state is the local pool's word: "running", "closing", "terminating", "broken" or
    "stopped"; plus the chunks (Dask tasks) submitted."""

    _fields = (*PoolStats._fields, "chunks_submitted")

    workers: tuple[DaskWorkerStats, ...]
    chunks_submitted: int

    def __init__(self, state: str, processes: int, tasks_submitted: int, tasks_succeeded: int,
                 tasks_failed: int, tasks_cancelled: int, tasks_queued: int, tasks_running: int,
                 retries: int, worker_restarts: int, recycled_for_memory: int,
                 workers: tuple[DaskWorkerStats, ...] = (), chunks_submitted: int = 0) -> None:
        super().__init__(state, processes, tasks_submitted, tasks_succeeded, tasks_failed,
                         tasks_cancelled, tasks_queued, tasks_running, retries, worker_restarts,
                         recycled_for_memory, workers)
        object.__setattr__(self, "chunks_submitted", chunks_submitted)


class DaskPool(Pool):
    """procqueue.Pool's API and result objects on a Dask distributed cluster.

    address=None and client=None: a LocalCluster of `processes` single-threaded worker
    processes on this machine, shut down with the pool.  address="tcp://host:8786": a
    Client of that scheduler, closed with the pool.  client=: that Client, left open.
    retries: re-runs of an item whose Dask worker died (Dask's own rescheduling, then one run
    per item, see the package docstring) and of an item raising one of retry_on.  timeout:
    per-item seconds (interrupts Python code; see docs/dask.md for what cannot be).
    concurrency: at most this many items of the pool running at once, cluster-wide (a
    distributed.Semaphore).  rate (a Rate or "50/30s"): at most `limit` item starts in any
    `per` seconds, cluster-wide (see worker_side._RateWindow).  queues: named queues, each
    with its concurrency and rate, cluster-wide, for the calls made with queue=name; a call's
    limit= (a named procqueue.Limit) is shared with every pool on the cluster using its name
    (see cluster_limits).  worker_env: set in every
    worker while the pool is open (and in the processes of a LocalCluster the pool starts).
    processes is the size of the LocalCluster the pool starts; with address= or client= the
    cluster is what it is, and processes is ignored.  journal, trace and on_event work as
    on the local pool (a TaskEvent's slot is a Dask worker thread; see docs/dask.md).
    maxtasksperchild, context and pin have no meaning on Dask and are ignored; the local
    pool's other options (tied to this machine) and per-call halt= are refused by name.
    backend is accepted as procqueue.Pool(backend="dask", ...) passes it on.
    """

    reports_running_inputs = False  # Dask does not say which item a worker runs

    def __new__(cls, *args: Any, **kwargs: Any) -> "DaskPool":
        # Not Pool.__new__, which picks the backend: a DaskPool is the Dask backend already.
        return object.__new__(cls)

    def __init__(self, processes: int | None = None,
                 initializer: Callable[..., object] | None = None, initargs: Iterable[Any] = (),
                 maxtasksperchild: int | None = None, context: Any = None, *,
                 backend: str = "dask", address: str | None = None, client: Any = None,
                 retries: int = DEFAULT_CRASH_RETRIES,
                 retry_on: type[BaseException] | Iterable[type[BaseException]] = (),
                 timeout: float | None = None, chunksize: int | None = None,
                 concurrency: int | None = None, rate: Rate | str | None = None,
                 queues: Mapping[str, Queue] | None = None,
                 worker_env: Mapping[str, str] | None = None,
                 journal: Any = None,  # a path or a procqueue.Journal, as Pool's journal=
                 trace: "str | os.PathLike[str] | None" = None,
                 on_event: Callable[[TaskEvent], None] | None = None, **options: Any) -> None:
        # Pool.__init__ is never called: it starts the local supervisor and its workers.
        _check_backend(backend)
        checked = check_pool_options(
            processes, initializer, initargs, maxtasksperchild, context, address=address,
            client=client, retries=retries, retry_on=retry_on, timeout=timeout,
            chunksize=chunksize, concurrency=concurrency, rate=rate, queues=queues,
            worker_env=worker_env, journal=journal, trace=trace, on_event=on_event, **options)
        listener = self._open_run_records(journal, trace, on_event)  # opens no file yet
        env = checked.worker_env
        self._state = PoolState.RUN
        self._retries = retries
        self._timeout_s = None if timeout is None else float(timeout)
        self._chunksize = chunksize
        self._token = uuid.uuid4().hex[:8]
        self._ids = itertools.count(1)
        self._sizers: OrderedDict[int, ChunkSizer] = OrderedDict()
        self._lock = threading.Lock()
        self._resources = _Resources.open(processes, address, client, retries, env)
        self._client = self._resources.client
        try:
            self._limits = ClusterLimits(self._resources, self._token, concurrency,
                                         checked.rate, checked.queues)
            self._install_worker_setup(env, initializer, tuple(initargs))
            self._driver = _Driver(self._client, self._token, retries, checked.retry_on,
                                   self._resources.allowed_failures(), listener)
        except BaseException:
            self._resources.close()
            raise
        self._driver.thread.start()
        # the driver's thread delivers outcomes; the callbacks run in this one (results.py)
        self._callback_runner = runner = CallbackRunner(f"procqueue-dask-callbacks-{id(self):x}")
        # Under Pool's name, which Pool.__del__ reads (a pool dropped while running says so);
        # typed with gradual parameters, as Pool's own finalizer takes other arguments.
        records = (partial(runner.finish, CLOSE_TIMEOUT_S), self._journal.close) + (
            () if self._trace is None else (self._trace.close,))
        finalizer: weakref.finalize[..., Any] = weakref.finalize(
            self, _shutdown, self._driver, self._resources, records)
        self._finalizer = finalizer

    @staticmethod
    def check_options(processes: int | None = None, **options: Any) -> None:
        """Pool.check_options with the Dask backend's rules: raise the ValueError or TypeError
        DaskPool(processes, **options) would raise for a bad option, connecting to nothing."""
        _check_backend(options.pop("backend", "dask"))
        check_pool_options(processes, **options)

    # ---- multiprocessing.Pool API (apply, map, imap... in calls.PoolCalls) ----------------

    def apply_async(self, func: Callable[..., Any], args: Iterable[Any] = (),
                    kwds: Mapping[str, Any] | None = None,
                    callback: Callable[[Any], object] | None = None,
                    error_callback: Callable[[BaseException], object] | None = None,
                    **options: Any) -> ApplyResult:
        self._check_running()
        result = ApplyResult(self, callback, error_callback)
        arguments = self._apply_arguments(func, args, kwds, result)
        if arguments is None:
            return result
        call = self._call(func, CallKind.ARGS_KWARGS, result, 1, options)
        self._post_items(call, [arguments])
        return result

    def close(self) -> None:
        """No more work may be submitted; join() waits for the submitted work."""
        if self._state is PoolState.RUN:
            self._state = PoolState.CLOSE
            self._driver.post(_Close())

    def terminate(self) -> None:
        """Stop now: unfinished items fail with TaskCancelledError, chunks in flight are
        cancelled, a LocalCluster we started is shut down."""
        self._state = PoolState.TERMINATE
        self._finalizer()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Pool.shutdown: close(), then (wait) join().  cancel_futures is the local pool's
        only: on a cluster, terminate() cancels what has not finished."""
        if cancel_futures:
            raise NotImplementedError("shutdown(cancel_futures=True) is not supported by the "
                                      "Dask backend; terminate() cancels what has not finished")
        self.close()
        if wait:
            self.join()

    def _on_keyboard_interrupt(self) -> None:
        """The local pool stops its calls at a Ctrl-C; on a cluster they go on, as before
        (terminate() stops them)."""

    def join(self) -> None:
        """Wait for the submitted work (after close) and release the cluster."""
        if self._state is PoolState.RUN:
            raise ValueError("Pool is still running")
        self._driver.stopped.wait()
        self._finalizer()

    def __enter__(self) -> "DaskPool":
        self._check_running()
        return self

    def __repr__(self) -> str:
        return (f"<procqueue.DaskPool state={self._state.value} "
                f"scheduler={self._resources.scheduler_address()!r}>")

    def __reduce__(self) -> Any:
        raise NotImplementedError("pool objects cannot be passed between processes or pickled")

    @property
    def _pool(self) -> list[Any]:
        """multiprocessing.Pool's list of its worker processes (Pool._pool): a DaskPool has
        none of its own to list - the Dask workers are the cluster's, which replaces them."""
        return []

    # ---- procqueue extras ----------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskFuture:
        """Run fn(*args, **kwargs) on the cluster; returns a concurrent.futures.Future."""
        return self._submit_with({}, fn, args, kwargs)

    def _submit_call(self, call: CallOptions, fn: Callable[..., Any], args: tuple[Any, ...],
                     kwargs: dict[str, Any]) -> TaskFuture:
        """pool.options(...).submit(...) (Pool.options's view): submit() with its options."""
        options = {name: getattr(call, name) for name in call._fields
                   if getattr(call, name) is not None}
        return self._submit_with(options, fn, args, kwargs)

    def _submit_with(self, options: dict[str, Any], fn: Callable[..., Any],
                     args: tuple[Any, ...], kwargs: dict[str, Any]) -> TaskFuture:
        self._check_running()
        future = TaskFuture(keepalive=self)
        if not callable(fn):
            future.set_exception(NotCallable.error_of(fn))
            return future
        call = self._call(fn, CallKind.ARGS_KWARGS, future, 1, options)
        item = _make_item(call, 0, (args, kwargs))
        future.cancel_via(self._driver, item)  # before the driver can deliver its outcome
        self._driver.post(_Submit(call, [item]))
        return future

    def imap_outcomes(self, func: Callable[..., Any], iterable: Iterable[Any], *,
                      ordered: bool = True, chunksize: int | None = None, star: bool = False,
                      **options: Any) -> OutcomeIterator:
        """One TaskOutcome per input, in input order or (ordered=False) completion order."""
        self._check_running()
        stream = ResultStream(ordered, Window(self._window_size()))
        call = self._call(func, CallKind.STAR if star else CallKind.ONE, stream, chunksize,
                          options)
        post = self._driver.post
        journal = self._journaled(func, call)

        def cancel(kill: bool) -> None:
            post(_CancelCall(call, kill, False))
            feed.stop_taking()  # the iterator may never give another input

        iterator = OutcomeIterator(
            stream, self, on_abandon=lambda: post(_CancelCall(call, False, True)),
            on_cancel=cancel)
        feed = self._start_input_feed(call, stream, iterable, journal)
        return iterator

    def stats(self) -> DaskPoolStats:
        """A snapshot of item counts and the cluster's workers."""
        d = self._driver
        queued, running = d.statistics()
        workers = _worker_stats(self._client, dict(d.workers.pids), dict(d.workers.work))
        return DaskPoolStats(
            self._stats_state(), sum(w.nthreads for w in workers), d.counts.submitted,
            d.counts.succeeded, d.counts.failed, d.counts.cancelled, queued, running,
            d.counts.retries, d.counts.lost_chunks, 0, workers, d.chunks.submitted)

    statistics = stats

    @property
    def client(self) -> Any:
        """The distributed.Client the pool submits to."""
        return self._client

    # ---- internals -------------------------------------------------------------------------

    def _check_running(self) -> None:
        if self._state is not PoolState.RUN:
            raise PoolClosedError("Pool not running")
        if self._driver.broken_error is not None:
            raise self._driver.broken_error

    def _stats_state(self) -> str:
        """The state in the local pool's words (supervisor.SupervisorState's values), so that
        code reading stats().state works on both backends."""
        if self._driver.state == "stopped":
            return "stopped"
        if self._driver.broken_error is not None:
            return "broken"
        if self._state is PoolState.TERMINATE or self._driver.state == "terminating":
            return "terminating"
        return "closing" if self._state is PoolState.CLOSE else "running"

    def _call(self, func: Callable[..., Any], kind: CallKind, sink: Any,
              chunksize: int | None, options: dict[str, Any]) -> DaskJob:
        if not callable(func):
            func = NotCallable(type(func).__name__)
        settings = _call_options(options, self._timeout_s)
        fn_id, payload = pickled_function(func)
        fixed = chunksize if chunksize is not None else self._chunksize
        if fixed is not None and (isinstance(fixed, bool) or not isinstance(fixed, int)
                                  or fixed < 1):
            raise ValueError("Chunksize must be 1+")
        call_id = next(self._ids)
        # last: a call refused before here leaves no semaphore of its own behind
        gates = self._limits.for_call(call_id, settings.concurrency, settings.queue,
                                      settings.limit)
        # Under a rate, chunks keep their adaptive size: each item takes its start where it
        # runs, so a chunk cannot start its items early (the local pool's batches can).
        # (A fixed chunksize lives in the sizer, which always answers it.)
        return DaskJob(call_id, fn_id, payload, kind, sink, timeout_s=settings.timeout_s,
                       semaphores=gates.semaphores, sizer=self._sizer(fn_id, fixed),
                       rates=gates.rates, owned_limits=gates.owned, keys=settings.keys)

    def _sizer(self, fn_id: int, fixed: int | None) -> ChunkSizer:
        if fixed is not None:
            return ChunkSizer(1, fixed)
        with self._lock:
            sizer = self._sizers.get(fn_id)
            if sizer is None:  # sized per Dask worker thread (next_size's workers=)
                sizer = self._sizers[fn_id] = ChunkSizer(
                    1, target_s=TARGET_CHUNK_S, max_tasks=MAX_CHUNK_ITEMS)
                while len(self._sizers) > FUNCTION_CACHE_SIZE:
                    self._sizers.popitem(last=False)
            return sizer

    def _install_worker_setup(self, env: dict[str, str],
                              initializer: Callable[..., object] | None,
                              initargs: tuple[Any, ...]) -> None:
        own_processes = self._resources.cluster is not None
        if not env and initializer is None and not own_processes:
            return
        from distributed.diagnostics.plugin import WorkerPlugin

        plugin = type("ProcqueueWorkerSetup", (_WorkerSetup, WorkerPlugin), {})(
            env, initializer, initargs, own_processes)
        name = f"procqueue-setup-{self._token}"
        self._resources.plugin_name = name  # unregistered at close, even if setup failed
        try:
            self._client.register_plugin(plugin, name=name)
        except Exception as exc:
            error = InitializerError(
                f"the worker initializer raised {type(exc).__name__}: {exc}")
            error.__cause__ = exc
            raise error from exc

    def _window_size(self, call: Any = None) -> int:
        return window_size(self._driver.threads())  # a worker thread runs an item at a time

    def _post_items(self, call: DaskJob, values: Iterable[Any],
                    journal: _JournaledCall | None = None) -> list[DaskTask]:
        items = self._items_to_run(call, 0, values, journal)
        self._driver.post(_Submit(call, items))  # (none left: the driver forgets the call)
        return items

    def _items_to_run(self, call: DaskJob, start: int, values: Iterable[Any],
                      journal: _JournaledCall | None) -> list[DaskTask]:
        """The items of inputs start, start+1, ...: one per input, except the inputs an
        earlier run journaled, whose stored outcomes the journal reports instead (in input
        order: a repeated input is an input of its own each time)."""
        return [_make_item(call, i, value) for i, value in enumerate(values, start)
                if journal is None or not journal.replayed(i, value)]

    def _journaled(self, func: Callable[..., Any], call: DaskJob) -> _JournaledCall | None:
        """The journal of a map/imap call (None: the pool has none), which opens the pool's
        journal at its first call; if it refuses the call (JournalMismatchError...), the
        call's own semaphore goes with it."""
        try:
            return self._journal.for_call(func, call)
        except BaseException:
            for limit in call.owned_limits:
                _close_quietly(limit)
            raise

    def _map_async(self, func: Callable[..., Any], iterable: Iterable[Any],
                   chunksize: int | None, kind: CallKind, callback: Any = None,
                   error_callback: Any = None, *, errors: str, options: dict[str, Any]
                   ) -> MapResult:
        self._check_running()
        errors = errors_mode(errors, options)
        values = iterable if isinstance(iterable, (list, tuple)) else list(iterable)
        result = MapResult(self, len(values), callback, error_callback,
                           return_errors=errors == "return")
        if values:
            call = self._call(func, kind, result, chunksize, options)
            journal = self._journaled(func, call)
            if journal is not None:
                journal.journal.set_total(len(values))
            self._post_items(call, values, journal)
        return result

    def _imap(self, func: Callable[..., Any], iterable: Iterable[Any], chunksize: int | None,
              *, ordered: bool, errors: str, options: dict[str, Any]) -> IMapIterator:
        self._check_running()
        errors = errors_mode(errors, options)
        stream = ResultStream(ordered, Window(self._window_size()))
        call = self._call(func, CallKind.ONE, stream, chunksize, options)
        journal = self._journaled(func, call)
        post = self._driver.post
        iterator = IMapIterator(stream, self,
                                on_abandon=lambda: post(_CancelCall(call, False, True)),
                                return_errors=errors == "return")
        self._start_input_feed(call, stream, iterable, journal)
        return iterator

    def _start_input_feed(self, call: DaskJob, stream: ResultStream, iterable: Iterable[Any],
                          journal: _JournaledCall | None) -> InputFeed:
        """The local pool's feeding loop (input_feed.InputFeed), handing the driver items; a
        journaled input holds its place in the window, as an item would, until its replayed
        outcome is consumed."""
        self._driver.post(_Open(call))

        def submit(first: int, values: Inputs) -> None:
            group = self._items_to_run(call, first, values, journal)
            if group:
                self._driver.post(_Submit(call, group))

        feed = InputFeed(stream, iterable, submit, lambda: self._driver.post(_InputDone(call)),
                         count_known=None if journal is None else journal.journal.set_total)
        feeder = threading.Thread(target=feed.run, name=f"procqueue-dask-feeder-{call.id}",
                                  daemon=True)
        feeder.start()
        return feed


def _worker_stats(client: Any, pids: dict[str, int], work: dict[str, tuple[int, float]]
                  ) -> tuple[DaskWorkerStats, ...]:
    """One row per worker the scheduler knows now; pid and work as this pool saw them."""
    try:
        workers = client.scheduler_info(n_workers=-1)["workers"]
    except TypeError:
        workers = client.scheduler_info()["workers"]
    except Exception:
        return ()
    rows = []
    for slot, (address, info) in enumerate(sorted(workers.items())):
        metrics = info.get("metrics", {})
        done, busy_s = work.get(address, (0, 0.0))
        rows.append(DaskWorkerStats(
            slot, pids.get(address), (), done, busy_s, 0.0, 0, None,
            int(metrics.get("memory", 0) or 0), address=address,
            nthreads=int(info.get("nthreads", 0))))
    return tuple(rows)


def _shutdown(driver: _Driver, resources: _Resources,
              records: tuple[Callable[[], None], ...]) -> None:
    """Terminate the driver (if still running), close the run's records (the journal's last
    outcomes are committed and reported, the trace is written) and release the cluster
    (finalizer: GC, terminate, join, interpreter exit)."""
    if not driver.stopped.is_set():
        driver.post(_Terminate())
        driver.stopped.wait(CLOSE_TIMEOUT_S)
    try:
        for close in records:
            close()
    finally:
        resources.close()


def _check_backend(backend: Any) -> None:
    """Any backend Pool.__new__ accepts: it made a DaskPool of it (backend="local" with
    address= or client= is a DaskPool too)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
