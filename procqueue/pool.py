"""Pool: the multiprocessing.Pool API (plus submit, options, imap_outcomes and serve) over a
Supervisor.  This module is the front end; what it drives lives below it:

    a call ──► call_options.parse_call ──► JobMaker.job ──► JournalHolder.for_call
           │   (options validated once)    (its Job; the     (journaled: the Job's sink
           │                                pool's caches)    then commits first)
           ├─► list (map, starmap, apply_async): Submitter.submit, in groups, now
           └─► iterable (imap*): a feeder thread (feeder.py), lazily, in a bounded window
                                  │
                 Tasks, or Blocks of primitive inputs (submission.py) ──► the supervisor
                 thread, which owns them from then on; outcomes reach the call's result
                 object (results.py) from there

Also here: what code written for multiprocessing.Pool reads (_state, _pool, pickling
refused), the pool's stats(), named queues (Queue) and per-call option views (PoolView).
"""

from __future__ import annotations

import enum
import os
import signal
import threading
import time
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Mapping, Sequence

from .admission import ConcurrencyGate, Gate, RateGateAdapter, rate_gate_for
from .call_options import NO_CALL, NO_OPTIONS, ParsedCall, parse_call, parsed
from .call_options import CallOptions as CallOptions
from .calls import PoolCalls
from .config import PoolConfig, fork_instead_of_default
from .errors import PoolClosedError
from .feeder import new_feed_watch, start_feeder
from .input_feed import FeedWatch, window_size
from .job_maker import JobMaker
from .affinity import worker_thread_env
from .pool_journal import JournaledCall, JournalHolder
from .program_fork import note_thread_ending
from .protocol import (CallKind, InitializerCall, NotCallable, shared_only_by_inheritance,
                       short_repr)
from .records import FrozenRecord, replaced
from .results import (ApplyResult, ArgumentMemory, CallbackRunner, IMapIterator, MapResult,
                      OutcomeIterator, ResultStream, TaskFuture, Window)
from .submission import Submitter
from .inbox import CancelJob, Close, Interrupt, Terminate
from .stats import SupervisorStatistics
from .supervisor import Supervisor

if TYPE_CHECKING:  # imported when a pool first uses them: sqlite3 and json cost ~6 ms
    from .journal import Journal
    from .service import ServiceSummary
    from .taskqueue import TaskQueue
    from .limits import Rate
    from .trace import TraceWriter

ARGUMENT_MEMORY_AHEAD = 256 * 2**20  # big-argument bytes a feeder copies ahead of the workers
TERMINATE_WAIT_S = 5.0  # terminate() returns once the workers are gone, or after this
# ... and once the callbacks of what it ended have run, or after this: one that waits for ever
# goes on in its own (daemon) thread
CALLBACKS_AT_TERMINATE_S = 1.0
SPAWN_WAIT_S = 10.0  # Pool() waits this long at most for its workers to be spawned
RUNNING_REPR_CHARS = 200  # stats(): a worker's running input, as people read it

# The journal of a call, under the name the Dask backend takes from this module (it journals
# its calls through the same front end: backends/dask/pool.py)
_JournaledCall = JournaledCall


BACKENDS = ("local", "dask")


class PoolState(str, enum.Enum):
    # multiprocessing.pool's own values: code that reads pool._state keeps working
    RUN = "RUN"
    CLOSE = "CLOSE"
    TERMINATE = "TERMINATE"

    def __str__(self) -> str:  # 'RUN', as multiprocessing's plain string prints
        return str.__str__(self)


class WorkerStats(FrozenRecord):
    """One worker slot's figures in a PoolStats snapshot."""

    # typed as Record's: DaskWorkerStats's fields extend these.  __match_args__ as Record sets
    # it, spelled out for mypy (a caller's `case WorkerStats(...)`)
    _fields: ClassVar[tuple[str, ...]]
    _fields = __match_args__ = ("slot", "pid", "cpus", "tasks_done", "busy_s", "idle_s",
                                "restarts", "last_exit", "rss_bytes", "task", "task_s",
                                "task_input")

    slot: int  # a worker position: its process may have been replaced
    pid: int | None  # the current process
    cpus: tuple[int, ...]  # pinned to
    tasks_done: int
    busy_s: float  # running tasks
    idle_s: float  # waiting for work (starts included)
    restarts: int  # processes replaced in this slot (crash, timeout, recycling)
    last_exit: str | None  # how the previous process ended ("exit code 0", "killed by SIGKILL")
    rss_bytes: int  # resident memory, as last reported
    task: str | None  # a short repr of the input it runs now; None: idle
    task_s: float | None  # how long that task has been running
    task_input: Any  # that input itself (a worker service maps it to its stored task)

    def __init__(self, slot: int, pid: int | None, cpus: tuple[int, ...], tasks_done: int,
                 busy_s: float, idle_s: float, restarts: int, last_exit: str | None,
                 rss_bytes: int, task: str | None = None, task_s: float | None = None,
                 task_input: Any = None) -> None:
        set_ = object.__setattr__
        set_(self, "slot", slot)
        set_(self, "pid", pid)
        set_(self, "cpus", cpus)
        set_(self, "tasks_done", tasks_done)
        set_(self, "busy_s", busy_s)
        set_(self, "idle_s", idle_s)
        set_(self, "restarts", restarts)
        set_(self, "last_exit", last_exit)
        set_(self, "rss_bytes", rss_bytes)
        set_(self, "task", task)
        set_(self, "task_s", task_s)
        set_(self, "task_input", task_input)


class PoolStats(SupervisorStatistics):
    """A snapshot: the supervisor's task and worker counts, and each worker's figures."""

    _fields = (*SupervisorStatistics._fields, "workers")

    workers: tuple[WorkerStats, ...]

    def __init__(self, state: str, processes: int, tasks_submitted: int, tasks_succeeded: int,
                 tasks_failed: int, tasks_cancelled: int, tasks_queued: int, tasks_running: int,
                 retries: int, worker_restarts: int, recycled_for_memory: int,
                 workers: tuple[WorkerStats, ...] = ()) -> None:
        super().__init__(state, processes, tasks_submitted, tasks_succeeded, tasks_failed,
                         tasks_cancelled, tasks_queued, tasks_running, retries, worker_restarts,
                         recycled_for_memory)
        object.__setattr__(self, "workers", workers)


class Pool(PoolCalls):
    """A process pool that is a drop-in for multiprocessing.Pool.

    backend="dask" (or address="tcp://scheduler:8786", or client=a distributed.Client) runs
    the same calls on a Dask cluster instead; see docs/dask.md.

    Extra keyword-only options: pin (pin each worker to a CPU, default True), retries
    (re-runs of a task whose worker crashed, default 1), retry_on (exception types that are
    retried too; add TaskTimeoutError to retry timeouts), timeout (per-task seconds, from the
    task's start), chunksize (None: adaptive), worker_env (extra environment for workers),
    init_timeout (seconds a worker's initializer may run before the pool breaks with an
    InitializerError; default: no limit).
    """

    def __new__(cls, *args: Any, backend: str = "local", address: str | None = None,
                client: Any = None, **kwargs: Any) -> Any:
        """backend="dask" (implied by address= or client=) returns a DaskPool: the same API on
        a Dask distributed cluster (see docs/dask.md); "local" is this machine's processes."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
        if backend == "dask" or address is not None or client is not None:
            try:
                from .backends.dask import DaskPool, require_distributed
                require_distributed()
            except ImportError as exc:
                raise ImportError("backend='dask' needs Dask distributed: "
                                  "pip install 'procqueue[dask]'") from exc
            # Uninitialised: a DaskPool is a Pool, so Python calls its __init__ with these same
            # arguments once __new__ returns - unless cls is a subclass the DaskPool is not.
            pool = DaskPool.__new__(DaskPool)
            if not isinstance(pool, cls):
                DaskPool.__init__(pool, *args, backend=backend, address=address, client=client,
                                  **kwargs)
            return pool
        return super().__new__(cls)

    # stats() names the input each worker runs (WorkerStats.task_input): a worker service
    # reports the stored task each runs, and its death is charged to those (service.py)
    reports_running_inputs = True

    def __init__(self, processes: int | None = None,
                 initializer: Callable[..., object] | None = None, initargs: Iterable[Any] = (),
                 maxtasksperchild: int | None = None, context: Any = None, *,
                 backend: str = "local",
                 queues: dict[str, "Queue"] | None = None,
                 journal: "str | Journal | None" = None,
                 trace: "str | os.PathLike[str] | None" = None, **options: Any) -> None:
        self._state = PoolState.RUN
        self._owner_pid = os.getpid()
        options["on_event"] = self._open_run_records(journal, trace, options.get("on_event"))
        self._config = PoolConfig.build(processes, initializer, initargs, maxtasksperchild,
                                        context, **options)
        initializer_call = None
        if initializer is not None:
            initializer_call = self._initializer_call(initializer, context is None)
        self._supervisor = Supervisor(self._config, initializer_call,
                                      worker_thread_env(self._config.worker_env))
        self._processes = self._config.processes
        self._argument_memory = ArgumentMemory(ARGUMENT_MEMORY_AHEAD, 2 * self._processes)
        self._jobs = JobMaker(self._config, {name: _queue_gates(name, spec)
                                             for name, spec in (queues or {}).items()})
        self._submitter = Submitter(self._supervisor, self._config, self._argument_memory)
        self._feed_watch = new_feed_watch()  # for the calls fed from iterators
        self._callback_runner = CallbackRunner(f"procqueue-callbacks-{id(self):x}",
                                               thread_ending=note_thread_ending)
        self._supervisor.start()
        # Like multiprocessing.Pool, return with the worker processes started.
        self._supervisor.spawned.wait(SPAWN_WAIT_S)
        # Terminate on garbage collection and at interpreter exit, without keeping self alive.
        self._finalizer = weakref.finalize(self, _shutdown, self._supervisor, self._journal,
                                           self._trace, self._feed_watch,
                                           self._callback_runner)
        _POOLS_OF_THIS_PROCESS.add(self)

    def _open_run_records(self, journal: "str | os.PathLike[str] | Journal | None",
                          trace: "str | os.PathLike[str] | None",
                          on_event: Callable[[Any], None] | None
                          ) -> Callable[[Any], None] | None:
        """Keep the records of this pool's run in its front end, whatever runs the tasks (the
        supervisor, or a DaskPool's driver): the journal its map/imap calls consult and feed
        (self._journal.for_call) and the trace of its task events (self._trace), closed with
        the pool.  Returns the listener the backend gives each TaskEvent: on_event, the
        trace's, both, or None."""
        self._journal = JournalHolder(journal)
        self._trace: TraceWriter | None = None
        if trace is None:
            return on_event
        from .trace import TraceWriter  # here: json and tempfile cost ~4 ms at import

        self._trace = TraceWriter(trace)
        return _both(self._trace, on_event)

    @staticmethod
    def check_options(processes: int | None = None, **options: Any) -> None:
        """Raise the ValueError or TypeError Pool(processes, **options) would raise for a bad
        option, without starting anything: a program (the `procqueue` command) can refuse a
        bad configuration before it does any work."""
        PoolConfig.build(processes, **options)

    def _initializer_call(self, initializer: Callable[..., object],
                          default_context: bool) -> InitializerCall:
        config = self._config
        if config.context.get_start_method() != "fork":
            try:
                return InitializerCall.pickled(initializer, config.initargs)
            except Exception as exc:
                fork = fork_instead_of_default() if default_context else None
                if fork is None:
                    if not shared_only_by_inheritance(exc):
                        raise
                    return InitializerCall.args_at_process_start(initializer, config.initargs)
            # Code written for multiprocessing.Pool on Linux passes initargs its fork workers
            # inherit (a Lock, Value or Queue, an open connection): so do ours, then.
            self._config = replaced(config, context=fork)
        return InitializerCall.inherited(initializer, config.initargs)

    # ---- multiprocessing.Pool API (apply, map, imap... in calls.PoolCalls) ------------------
    # Every call also takes the keyword-only per-call options of CallOptions (limit=, queue=,
    # concurrency=, key=, key_concurrency=, timeout=, halt=), parsed once by call_options.
    # submit() cannot (its **kwargs are the function's): use pool.options(...).submit(...).

    def apply_async(self, func: Callable[..., Any], args: Iterable[Any] = (),
                    kwds: Mapping[str, Any] | None = None,
                    callback: Callable[[Any], object] | None = None,
                    error_callback: Callable[[BaseException], object] | None = None,
                    **options: Any) -> ApplyResult:
        self._check_running()
        self._submitter.step_aside()
        call = parse_call(options)
        result = ApplyResult(self, callback, error_callback)
        arguments = self._apply_arguments(func, args, kwds, result)
        if arguments is None:
            return result
        job = self._jobs.single_task_job(func, result, call)
        errors: dict[int, BaseException] = {}
        task = self._submitter.make_task(job, 0, arguments, errors, result)
        self._submitter.post_single(task, errors)
        return result

    def close(self) -> None:
        """No more work may be submitted; workers exit once the submitted work is done."""
        if self._state is PoolState.RUN:
            self._state = PoolState.CLOSE
            self._supervisor.post(Close())

    def terminate(self) -> None:
        """Stop now: unfinished tasks fail with TaskCancelledError, workers are killed."""
        self._state = PoolState.TERMINATE
        self._finalizer()

    def _on_keyboard_interrupt(self) -> None:
        """A KeyboardInterrupt (Ctrl-C) left one of this pool's waits (results.py): the calls
        made so far end now, their running tasks killed, and none of their tasks starts
        after it (the supervisor's _interrupt); the pool takes new calls, so a program that
        catches it (a notebook's interrupted cell) can go on with it."""
        if self._state is PoolState.TERMINATE:
            return
        self._supervisor.post(Interrupt(self._jobs.forget_shared_jobs()))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """concurrent.futures.Executor.shutdown, for code written for ProcessPoolExecutor:
        no more work is taken (close()); cancel_futures: every task not yet started is
        cancelled (its future cancelled(), a map's result TaskCancelledError), those running
        finish; wait: return once all has ended and the workers are gone (join())."""
        # (also after a first shutdown(wait=False): what it left queued is cancelled now)
        if cancel_futures and self._state is not PoolState.TERMINATE \
                and not self._supervisor.stopped.is_set():
            self._supervisor.post(Interrupt(self._jobs.forget_shared_jobs(),
                                            kill_running=False))
        if self._state is PoolState.RUN:
            self.close()
        if wait:
            self.join()

    def join(self) -> None:
        """Wait for the workers to exit; call close() or terminate() first."""
        if self._state is PoolState.RUN:
            raise ValueError("Pool is still running")
        self._supervisor.join()
        # as multiprocessing: every callback has run (after terminate() not for ever: one may
        # wait on a result whose callback is queued behind it)
        self._callback_runner.finish(None if self._state is PoolState.CLOSE
                                     else CALLBACKS_AT_TERMINATE_S)
        self._feed_watch.close()
        self._journal.close()
        if self._trace is not None:
            self._trace.close()

    def __enter__(self) -> "Pool":
        self._check_running()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.terminate()  # as multiprocessing.Pool: leaving the block terminates

    def __del__(self, _warn: Callable[..., None] = warnings.warn,
                _running: PoolState = PoolState.RUN) -> None:
        # As multiprocessing.Pool, in its words (warning filters match them): a pool dropped
        # while running says so (a ResourceWarning, shown under `python -X dev` or
        # -W default); the finalizer terminates it either way.
        if getattr(self, "_finalizer", None) is not None and self.__dict__.get(
                "_pool_state") is _running:
            _warn(f"unclosed running multiprocessing pool {self!r}", ResourceWarning,
                  source=self)

    @property
    def _state(self) -> PoolState:
        """multiprocessing.Pool's state attribute, which code written for it reads (and its
        tests set to multiprocessing.pool.RUN, a string): kept as a PoolState."""
        return self._pool_state

    @_state.setter
    def _state(self, value: "PoolState | str") -> None:
        self._pool_state = PoolState(value)

    def __repr__(self) -> str:
        return (f"<procqueue.Pool state={self._state.value} "
                f"processes={self._processes} pid={_pids(self)}>")

    def __reduce__(self) -> Any:
        # As multiprocessing.Pool: a pool lives in the process that made it.
        raise NotImplementedError("pool objects cannot be passed between processes or pickled")

    @property
    def _pool(self) -> list["WorkerProcess"]:
        """multiprocessing.Pool's private list of its worker processes, which code written for
        it reads (`[p.pid for p in pool._pool]`): a snapshot of the workers now running."""
        return [WorkerProcess(slot, slot.pid) for slot in list(self._supervisor.workers.slots)
                if slot.pid is not None]

    def _repopulate_pool(self) -> None:
        """multiprocessing.Pool's private refill of exited workers, which code written for it
        calls: procqueue's supervisor replaces a worker as soon as it exits, so there is
        nothing left to do here."""

    # ---- procqueue extras --------------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskFuture:
        """Run fn(*args, **kwargs) in a worker; returns a concurrent.futures.Future."""
        return self._submit_call(NO_OPTIONS, fn, args, kwargs)

    def options(self, **options: Any) -> "PoolView":
        """A view of this pool whose calls carry per-call options, e.g.
        ``pool.options(limit=api, timeout=30).submit(fetch, url, retries=3)``."""
        return PoolView(self, CallOptions.build(options))

    def imap_outcomes(self, func: Callable[..., Any], iterable: Iterable[Any], *,
                      ordered: bool = True, chunksize: int | None = None, star: bool = False,
                      **options: Any) -> OutcomeIterator:
        """One TaskOutcome per input (result or error, attempts, seconds, worker pid), in
        input order or, with ordered=False, in completion order.  Never raises for a task."""
        self._check_running()
        call = parse_call(options, chunksize=chunksize)
        stream = ResultStream(ordered, self._window(call))
        kind = CallKind.STAR if star else CallKind.ONE
        job = self._jobs.job(func, kind, stream, call)
        self._supervisor.watch(stream)
        journal = self._journal.for_call(func, job)
        post = self._supervisor.post

        def cancel(kill: bool) -> None:
            post(CancelJob(job, kill, False))
            feed.stop_taking()  # the iterator may never give another input

        iterator = OutcomeIterator(
            stream, self, on_abandon=lambda: post(CancelJob(job, False, True)), on_cancel=cancel)
        feed = start_feeder(self._submitter, job, stream, iterable, journal,
                            whole_chunks=self._whole_chunks(call), watch=self._feed_watch)
        return iterator

    def serve(self, queue: "TaskQueue", queues: Sequence[str] | None = None, *,
              until_idle: bool = False, stop: threading.Event | None = None
              ) -> "ServiceSummary":
        """Run a worker service of a durable TaskQueue on this pool's workers, in the calling
        thread, until ``stop`` is set, Ctrl-C, or (``until_idle``) the served queues (all, by
        default) have no pending task left.  A crashed task is re-run here first per this
        pool's ``retries`` (default 1), then re-queued per its queue's; every run counts in its
        record's attempts.  See procqueue/service.py."""
        self._check_running()
        from .service import serve  # the queue machinery loads only for pools that serve
        return serve(self, queue, queues, until_idle=until_idle, stop=stop)

    def stats(self) -> PoolStats:
        """A snapshot of task counts and per-worker figures."""
        s = self._supervisor.statistics()
        workers = tuple(_worker_stats(slot) for slot in self._supervisor.workers.slots)
        return PoolStats(**{name: getattr(s, name) for name in s._fields}, workers=workers)

    statistics = stats

    # ---- internals ---------------------------------------------------------------------------

    def _check_running(self) -> None:
        if self._state is not PoolState.RUN:
            if self._owner_pid != os.getpid():
                raise PoolClosedError(
                    f"this pool belongs to process {self._owner_pid}: a process forked from it "
                    f"cannot use it (make a pool in this process)")
            raise PoolClosedError("Pool not running")
        broken = self._supervisor.broken_error
        if broken is not None:
            raise broken

    def _submit_call(self, call: CallOptions, fn: Callable[..., Any], args: tuple[Any, ...],
                     kwargs: dict[str, Any]) -> TaskFuture:
        """submit(), with the options of a PoolView (validated when it was made)."""
        self._check_running()
        self._submitter.step_aside()  # before anything is made: Ctrl-C there leaves nothing
        future = TaskFuture(keepalive=self)
        if not callable(fn):
            future.set_exception(NotCallable.error_of(fn))
            return future
        job = self._jobs.single_task_job(fn, future,
                                         NO_CALL if call is NO_OPTIONS else parsed(call))
        errors: dict[int, BaseException] = {}
        task = self._submitter.make_task(job, 0, (args, kwargs), errors, future)
        future.cancel_via(self._supervisor, task)  # before the supervisor can finish it
        self._submitter.post_single(task, errors)
        return future

    def _map_async(self, func: Callable[..., Any], iterable: Iterable[Any],
                   chunksize: int | None, kind: CallKind, callback: Any = None,
                   error_callback: Any = None, *, errors: str, options: dict[str, Any]
                   ) -> MapResult:
        self._check_running()
        call = parse_call(options, errors=errors)
        items = iterable if isinstance(iterable, (list, tuple)) else list(iterable)
        result = MapResult(self, len(items), callback, error_callback,
                           return_errors=call.return_errors)
        if items:
            call = call.with_chunksize(chunksize)
            job = self._jobs.job(func, kind, result, call, timed_inputs=False)
            self._supervisor.watch(result)
            journal = self._journal.for_call(func, job)
            if journal is not None:
                journal.journal.set_total(len(items))
            self._submitter.submit(job, items, journal)
        return result

    def _imap(self, func: Callable[..., Any], iterable: Iterable[Any], chunksize: int | None,
              *, ordered: bool, errors: str, options: dict[str, Any]) -> IMapIterator:
        self._check_running()
        call = parse_call(options, chunksize=chunksize, errors=errors)
        stream = ResultStream(ordered, self._window(call))
        job = self._jobs.job(func, CallKind.ONE, stream, call, timed_inputs=False)
        self._supervisor.watch(stream)
        journal = self._journal.for_call(func, job)

        def abandon() -> None:
            # Dropped before its end, the iterator leaves its call running, results discarded,
            # as multiprocessing does (code that never reads imap's results relies on its
            # inputs running): a list's inputs to the end, an iterator's (which may be
            # endless) those taken so far.
            stream.discard()
            feed.stop_taking()  # (nothing for a list)

        iterator = IMapIterator(stream, self, abandon, return_errors=call.return_errors)
        feed = start_feeder(self._submitter, job, stream, iterable, journal,
                            whole_chunks=self._whole_chunks(call), wait_for_whole_chunks=True,
                            watch=self._feed_watch)
        return iterator

    def _whole_chunks(self, call: ParsedCall) -> int:
        """Inputs a lazy call feeds at a time: its chunksize where a chunk fits in the window
        (a partial chunk holds its places; one larger than the window could never complete)."""
        chunksize = self._jobs.fixed_chunksize(call)
        if chunksize is None or chunksize > self._window_size(call):
            return 1
        return chunksize

    def _window(self, call: ParsedCall) -> Window:
        return Window(self._window_size(call))

    def _window_size(self, call: ParsedCall) -> int:
        return window_size(self._processes, self._jobs.fixed_chunksize(call))


class Queue(FrozenRecord):
    """A named queue inside one pool: its own concurrency and rate, sharing the workers.
    ``Pool(8, queues={"io": Queue(concurrency=2, rate=Rate(10, per=1))})`` then
    ``pool.map(f, items, queue="io")``."""

    _fields = __match_args__ = ("concurrency", "rate")  # see WorkerStats

    concurrency: int | None
    rate: Rate | str | None

    def __init__(self, concurrency: int | None = None, rate: Rate | str | None = None) -> None:
        object.__setattr__(self, "concurrency", concurrency)
        object.__setattr__(self, "rate", rate)


def _queue_gates(name: str, spec: Queue) -> tuple[Gate, ...]:
    if not isinstance(spec, Queue):
        raise TypeError(f"queue {name!r} must be a procqueue.Queue, not {spec!r}")
    gates: list[Gate] = []
    if spec.concurrency is not None:
        gates.append(ConcurrencyGate(spec.concurrency))
    if spec.rate is not None:
        from .limits import Rate  # here: see limits/__init__

        rate = Rate.parse(spec.rate) if isinstance(spec.rate, str) else spec.rate
        gates.append(RateGateAdapter(rate_gate_for(rate)))
    return tuple(gates)


class PoolView:
    """A Pool whose calls carry a set of per-call options (see Pool.options)."""

    def __init__(self, pool: Pool, call: CallOptions) -> None:
        self._pool = pool
        self._call = call

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskFuture:
        return self._pool._submit_call(self._call, fn, args, kwargs)

    def options(self, **options: Any) -> "PoolView":
        return PoolView(self._pool, self._call.merged(options))

    def _with(self, name: str) -> Callable[..., Any]:
        method = getattr(self._pool, name)
        given = self._call.given()

        def bound(*args: Any, **kwargs: Any) -> Any:
            return method(*args, **{**given, **kwargs})
        return bound

    def __getattr__(self, name: str) -> Any:
        if name in _VIEW_METHODS:
            return self._with(name)
        raise AttributeError(name)


_VIEW_METHODS = frozenset({"apply", "apply_async", "map", "map_async", "starmap",
                           "starmap_async", "imap", "imap_unordered", "imap_outcomes"})


class WorkerProcess:
    """What a multiprocessing.Process of a pool's `_pool` is read for: pid, name, is_alive(),
    exitcode, terminate() and kill().  The supervisor owns the process; ending it from here
    is a crash the pool handles as any other (the task fails or is retried, a worker replaces
    it)."""

    daemon = True

    def __init__(self, slot: Any, pid: int) -> None:
        self._slot = slot
        self.pid = pid
        self.name = str(getattr(slot.process, "name", f"PoolWorker-{slot.index + 1}"))

    def is_alive(self) -> bool:
        import psutil

        try:
            return bool(psutil.Process(self.pid).status() != psutil.STATUS_ZOMBIE)
        except psutil.Error:
            return False

    @property
    def exitcode(self) -> int | None:
        """None until the pool has reaped the process (as multiprocessing's, until joined)."""
        return next((code for pid, code in list(self._slot.exits) if pid == self.pid), None)

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def __repr__(self) -> str:
        return f"<WorkerProcess name={self.name!r} pid={self.pid}>"


def _worker_stats(slot: Any) -> WorkerStats:
    w = slot.statistics()
    running = slot.running_input()
    task, task_s, task_input = None, None, None
    if running is not None:
        task_input = running[0]
        task = short_repr(task_input, RUNNING_REPR_CHARS)
        task_s = max(time.monotonic() - running[1], 0.0)
    return WorkerStats(w.slot, w.pid, w.cpus, w.tasks_done, w.busy_s, w.idle_s, w.restarts,
                       w.last_exit, w.rss_bytes, task, task_s, task_input)


def _pids(pool: Pool) -> list[int | None]:
    return [slot.pid for slot in pool._supervisor.workers.slots]


_POOLS_OF_THIS_PROCESS: "weakref.WeakSet[Pool]" = weakref.WeakSet()


def _disown_pools_after_fork() -> None:
    """In a child forked from a process with pools (os.fork, or a fork worker): their copies
    have no supervisor thread, so a call would wait forever.  They are closed here, and never
    shut down from here (their workers are the parent's), and the child lets go of what tells
    their workers that the parent lives (WorkerSlots.let_go_after_fork)."""
    for pool in list(_POOLS_OF_THIS_PROCESS):
        pool._state = PoolState.TERMINATE
        pool._finalizer.detach()
        try:
            pool._supervisor.workers.let_go_after_fork()
        except Exception:  # noqa: BLE001 - a fork handler must not fail the fork's child
            pass
    _POOLS_OF_THIS_PROCESS.clear()


os.register_at_fork(after_in_child=_disown_pools_after_fork)


def _shutdown(supervisor: Supervisor, journal: JournalHolder,
              trace: TraceWriter | None, feed_watch: FeedWatch,
              callbacks: CallbackRunner) -> None:
    """Terminate and wait for the workers to be gone (finalizer: GC, terminate, exit)."""
    supervisor.post(Terminate())
    if not supervisor.join(TERMINATE_WAIT_S):
        # The supervisor is stuck (an on_event listener that waits on this pool, say): its
        # workers are killed from here, so none outlives the pool (nor holds the program's
        # exit, which waits for its children)
        supervisor.workers.kill_all_now()
    # the error callbacks of what terminate() cancelled; one stuck waiting on this pool
    # is left to its daemon thread
    callbacks.finish(CALLBACKS_AT_TERMINATE_S)
    feed_watch.close()
    journal.close()
    if trace is not None:
        trace.close()


def _both(first: Callable[[Any], None], second: Callable[[Any], None] | None
          ) -> Callable[[Any], None]:
    if second is None:
        return first

    def both(event: Any) -> None:
        first(event)
        second(event)
    return both
