"""DaskPool: the procqueue.Pool contract on a Dask distributed cluster.

    caller threads              driver thread (owns every item's state)                   Dask
    ──────────────              ───────────────────────────────────────                   ────
    map / submit ─► _Submit ─┐
    imap feeder  ─► _Submit ─┤  inbox ─► apply ─► dispatch ── client.submit(run_chunk) ─► scheduler
    cancel/close ─► _Cancel…─┤    ▲                                                        │
                             │    └─── _ChunkDone(future) ◄─ future.add_done_callback ◄─ worker
    sinks (ApplyResult, MapResult, ResultStream, TaskFuture) ◄─ deliver(item, ok, value),
                                                                in the driver thread only

One driver thread per pool blocks in one ``inbox.get()``: caller commands and Dask's done
callbacks both arrive there, so every item's life (pending → in a chunk → done | retry | failed)
changes in one thread, and each item gets exactly one ``deliver``.  (distributed.as_completed
could not also wait for new submissions, cancellations and retry deadlines: its ``__next__``
polls every 100 ms.)

Items travel in chunks: one Dask task runs a list of items and returns one row per item (ok, the
pickled result or the pickled ErrorInfo, seconds), so a failing item fails only itself and an
unpicklable result is that item's error.  Chunks are sized from measured item times (about
TARGET_CHUNK_S of work each, smaller at the tail) unless the call fixes ``chunksize``.  At most
INFLIGHT_CHUNKS_PER_THREAD chunks per Dask worker thread are submitted at once; lazy inputs
(imap*) are read by a feeder thread through the same bounded Window as the local pool.

Limits, each enforced where it holds for the whole cluster:
  * concurrency (pool or call): a distributed.Semaphore lease held by each chunk while it runs;
  * rate (pool): each item takes a lease of a distributed.Semaphore(max_leases=limit) right
    before it runs, in the worker, and gives it back `per` seconds later: a sliding window
    over every worker (_RateWindow);
  * key / key_concurrency (call): counted here, by the driver, which sees every item of the
    call: an item holds its key from the moment it is put in a chunk to that chunk's end, and
    keyed items wait in a FairQueue (round robin across keys), as in the local pool.

Faults:
  * a task's exception keeps its type and message, the remote traceback is its ``__cause__``;
  * a Dask worker lost mid-chunk: Dask itself re-runs the chunk elsewhere, up to the
    scheduler's ``allowed-failures``; then the chunk's items are re-run one per Dask task, so
    only the item that kills its worker fails, as WorkerCrashedError;
  * timeouts are enforced inside the worker (see _TimedRun): a pure-Python item is interrupted
    at the deadline; an item blocked in C code is abandoned in its thread after a grace.
"""

from __future__ import annotations

import contextlib
import ctypes
import heapq
import itertools
import math
import os
import pickle
import queue
import random
import threading
import time
import traceback
import uuid
import weakref
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping

from ..affinity import usable_cpu_count
from ..calls import PoolCalls, errors_mode
from ..chunking import ChunkSizer
from ..errors import (ArgumentSerializationError, InitializerError, PoolBrokenError,
                      PoolClosedError, RemoteError, TaskCancelledError, TaskTimeoutError,
                      WorkerCrashedError, WorkerExitedError, annotate, argument_error,
                      exception_types)
from ..limits import START_SKEW_MARGIN_S, FairQueue, KeyedLimit, Rate
from ..protocol import (CallKind, apply_call, capture_exception, dumps, dumps_function,
                        pickled_function, restore_exception, short_repr,
                        unpicklable_result_error, unreadable_result_error)
from ..results import (ApplyResult, IMapIterator, MapResult, OutcomeIterator,
                       ResultStream, TaskFuture, Window)

TARGET_CHUNK_S = 0.2  # a Dask task costs ~1-3 ms of scheduling: aim for chunks of 200 ms
MAX_CHUNK_ITEMS = 10_000  # caps one chunk's memory and result latency
INFLIGHT_CHUNKS_PER_THREAD = 2  # submitted chunks per worker thread: one running, one waiting
NTHREADS_REFRESH_S = 2.0  # how often the cluster's thread count is asked for (it may scale)
WINDOW_ITEMS_PER_THREAD = 512  # lazy calls: inputs taken but not consumed, per worker thread
WINDOW_ITEMS_MIN = 2048
FEED_GROUP_MAX = 256  # inputs a feeder hands to the driver in one command at most
TIMEOUT_GRACE_S = 1.0  # after interrupting a timed-out item, wait this long before abandoning it
RETRY_BACKOFF_S = 0.05  # first retry delay; doubles per attempt, with jitter
RETRY_BACKOFF_MAX_S = 5.0
CLOSE_TIMEOUT_S = 10.0  # closing the client and a LocalCluster we started
WORKER_STOP_GRACE_S = 0.6  # a LocalCluster we started: its workers' time to stop, then SIGKILL
LOCAL_DASHBOARD = "127.0.0.1:0"  # a LocalCluster's HTTP server: loopback, any free port
FUNCTION_CACHE_SIZE = 64  # functions a Dask worker keeps unpickled, by fn_id
DEFAULT_CRASH_RETRIES = 1  # as the local pool: one re-run covers a one-off OOM kill
# A lease wait asks the scheduler again this often (seconds), so that a wait on a semaphore
# its pool closed meanwhile (terminate) ends with an error instead of holding the worker
# thread forever: the scheduler forgets the waiters of a closed semaphore without waking them.
LEASE_POLL_S = 1.0
# A start's rate lease is given back this much later than `per` seconds after it was granted
# (seconds): the item itself starts a moment after the grant (as START_SKEW_MARGIN_S does
# for the local pool's gate).
RATE_RELEASE_MARGIN_S = START_SKEW_MARGIN_S
# A pool with a rate ends by giving its leases back; it waits at most this long (seconds) for
# the ones in flight to arrive, polling every RATE_DRAIN_POLL_S, before closing the semaphore.
RATE_DRAIN_WAIT_S = 0.5
RATE_DRAIN_POLL_S = 0.01


# ================================ worker side ====================================================
# Runs inside Dask worker processes: procqueue must be importable there (docs/dask.md).

_functions: OrderedDict[int, Callable[..., Any]] = OrderedDict()
_function_errors: dict[int, bytes] = {}  # fn_id -> pickled ErrorInfo (unpickling failed here)

Row = tuple[bool, bytes, float]  # (ok, pickled result or ErrorInfo, seconds) of one item


@dataclass(frozen=True)
class RateSpec:
    """A pool's cluster-wide rate gate, as a chunk carries it: the distributed.Semaphore's
    name, `limit` starts in any `period_s` seconds."""

    name: str
    limit: int
    period_s: float


def run_chunk(fn_id: int, fn_payload: bytes, kind: int, payloads: list[bytes],
              timeout_s: float | None, limits: tuple[Any, ...],
              rate: RateSpec | None = None) -> tuple[int, str, list[Row]]:
    """One Dask task: run the items in order, each one's outcome a row.  Holds every
    distributed.Semaphore in `limits` while it runs; each item takes a start from the
    pool's rate gate (if any) right before it runs.  Returns (pid, worker address, rows)."""
    fn, fn_error = _load_function(fn_id, fn_payload)
    call_kind = CallKind(kind)
    gate = None if rate is None else _rate_window(rate)
    with contextlib.ExitStack() as stack:
        for limit in limits:
            stack.enter_context(_lease(limit))
        if timeout_s is None:
            rows = [_run_item(fn, fn_error, call_kind, p, gate) for p in payloads]
        else:
            rows = _TimedRun(fn, fn_error, call_kind, payloads, timeout_s, gate).run()
    return os.getpid(), _worker_address(), rows


def _acquire_lease(semaphore: Any) -> None:
    """Block until the distributed.Semaphore grants a lease (see LEASE_POLL_S)."""
    while not semaphore.acquire(timeout=LEASE_POLL_S):
        pass


@contextlib.contextmanager
def _lease(semaphore: Any) -> Iterator[None]:
    _acquire_lease(semaphore)
    try:
        yield
    finally:
        semaphore.release()


class _RateWindow:
    """This worker's side of a pool's cluster-wide rate gate: at most `limit` item starts in
    any `period_s` seconds, over every worker.

    A sliding window made of a distributed.Semaphore(max_leases=limit): each start takes a
    lease and gives it back `period_s` seconds after it was granted - not when the item ends,
    and whatever the item does (raise, time out, run for an hour).  The leases held at any
    moment are then exactly the starts of the last `period_s` seconds, so no window of
    `period_s` seconds can hold more than `limit` starts.  Only durations are measured, each
    on one machine, so worker clocks need not agree.

    A worker that dies takes its lease refreshes with it: the scheduler frees its leases after
    distributed.scheduler.locks.lease-timeout (30 s by default), which narrows the window for
    that long but never widens it.

    take() runs in item threads; the release timers and the counts live on the worker's event
    loop (one thread, no lock)."""

    def __init__(self, spec: RateSpec, worker: Any) -> None:
        self.loop = worker.loop  # a tornado IOLoop: add_callback is its thread-safe entry
        self.semaphore = _distributed().Semaphore(
            max_leases=spec.limit, name=spec.name, scheduler_rpc=worker.scheduler,
            loop=worker.loop)
        self.period_s = spec.period_s
        self.held = 0  # leases granted here and not given back yet (event loop only)
        self.sealed = False  # the pool is ending: no item may start any more
        self.closed = False  # the pool ended: every lease was given back (event loop only)

    def take(self) -> None:
        """Block until a start is granted; its lease goes back `period_s` seconds later.
        RuntimeError if the pool ended meanwhile: its item must not start."""
        _acquire_lease(self.semaphore)
        if self.sealed:  # granted by a lease the ending pool gave back: not a start
            self.semaphore.release()
            raise RuntimeError("the pool ended while this item waited for its start")
        due = time.monotonic() + self.period_s + RATE_RELEASE_MARGIN_S
        self.loop.add_callback(self._arm, due)

    def _arm(self, due: float) -> Any:
        if self.closed:
            return self._give_back()  # granted while the pool was ending
        self.held += 1
        self.loop.call_later(max(0.0, due - time.monotonic()), self._expire)
        return None

    async def _expire(self) -> None:
        if self.closed:
            return  # close() gave it back already
        self.held -= 1
        await self._give_back()

    async def _give_back(self) -> None:
        try:
            # On the event loop, Semaphore.release() returns the coroutine to await.
            await self.semaphore.release()
        except Exception:  # the pool closed the semaphore: nothing is left to give back
            pass

    async def close(self) -> None:
        """The pool ended: give every lease back now (no start of the pool can follow)."""
        self.sealed = self.closed = True
        held, self.held = self.held, 0
        for _ in range(held):
            await self._give_back()
        refresh = getattr(self.semaphore, "refresh_callback", None)  # none if no lease timeout
        if refresh is not None:
            refresh.stop()


_rate_windows: dict[str, _RateWindow] = {}  # by RateSpec.name, for the pool's lifetime
_rate_windows_lock = threading.Lock()


def _rate_window(spec: RateSpec) -> _RateWindow:
    """This worker's window for `spec` (one per worker process, shared by its threads, so
    its leases are refreshed by one Semaphore).  Called in the Dask task's thread, where
    distributed.get_worker() works."""
    with _rate_windows_lock:
        window = _rate_windows.get(spec.name)
        if window is None:
            window = _RateWindow(spec, _distributed().get_worker())
            _rate_windows[spec.name] = window
        return window


def seal_rate_window(name: str) -> None:
    """Run on every worker (client.run) when a pool with a rate ends, before any of them
    gives its leases back: a lease given back on one worker must not let an item of the
    ending pool start on another."""
    with _rate_windows_lock:
        window = _rate_windows.get(name)
    if window is not None:
        window.sealed = True


async def close_rate_window(name: str) -> None:
    """Run on every worker (client.run) when a pool with a rate ends, after
    seal_rate_window and before its semaphore is closed on the scheduler: the leases go
    back (so it closes empty) and the window is forgotten."""
    with _rate_windows_lock:
        window = _rate_windows.pop(name, None)
    if window is not None:
        await window.close()


def _worker_address() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return ""


def _load_function(fn_id: int, payload: bytes) -> tuple[Callable[..., Any] | None, bytes | None]:
    fn = _functions.get(fn_id)
    if fn is not None:
        return fn, None
    if fn_id in _function_errors:
        return None, _function_errors[fn_id]
    try:
        fn = pickle.loads(payload)
    except BaseException as exc:  # noqa: BLE001 - e.g. the user's module is missing on this worker
        error = ArgumentSerializationError(
            f"could not unpickle the task's function on the Dask worker: {exc!r}; install the "
            "modules it needs on every worker")
        error.__cause__ = exc
        _function_errors[fn_id] = capture_exception(error)
        return None, _function_errors[fn_id]
    _functions[fn_id] = fn
    while len(_functions) > FUNCTION_CACHE_SIZE:
        _functions.popitem(last=False)
    return fn, None


class _Interrupt(BaseException):
    """Raised asynchronously in an item thread whose item ran past its timeout."""


def _run_item(fn: Callable[..., Any] | None, fn_error: bytes | None, kind: CallKind,
              payload: bytes, gate: _RateWindow | None) -> Row:
    if gate is not None:
        gate.take()
    started = time.monotonic()  # after the rate gate: waiting for a start is not run time
    ok, data = _call_item(fn, fn_error, kind, payload)
    return ok, data, time.monotonic() - started


def _call_item(fn: Callable[..., Any] | None, fn_error: bytes | None, kind: CallKind,
               payload: bytes) -> tuple[bool, bytes]:
    """The worker.run_item contract: (True, pickled result) or (False, pickled ErrorInfo);
    never raises for the item's own failure (SystemExit included)."""
    if fn is None:
        assert fn_error is not None
        return False, fn_error
    try:
        arg = pickle.loads(payload)
    except _Interrupt:
        raise
    except BaseException as exc:  # noqa: BLE001
        error = ArgumentSerializationError(f"could not unpickle the task's argument: {exc!r}")
        error.__cause__ = exc
        return False, capture_exception(error)
    try:
        value = apply_call(fn, kind, arg)
    except _Interrupt:
        raise
    except SystemExit as exc:
        exited = WorkerExitedError(f"task called sys.exit({exc.code!r})", code=exc.code)
        exited.__cause__ = exc
        return False, capture_exception(exited)
    except Exception as exc:
        return False, capture_exception(exc)
    except BaseException as exc:  # KeyboardInterrupt, GeneratorExit: never re-raised
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return False, capture_exception(RemoteError(type(exc).__name__, str(exc), tb))
    try:
        return True, dumps(value)
    except _Interrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - an unpicklable result fails only its item
        return False, capture_exception(unpicklable_result_error(value, exc))


def _timeout_row(timeout_s: float, seconds: float, abandoned: bool) -> Row:
    how = ("; it is blocked outside Python and keeps running in an abandoned thread of the "
           "Dask worker" if abandoned else "")
    error = TaskTimeoutError(f"task timed out after {timeout_s:.3g} s{how}", timeout_s=timeout_s)
    return False, capture_exception(error), seconds


class _ItemThread:
    """Runs items[start:] one after another on a helper thread, reporting ("start", i, t)
    and ("done", i, row) to its own queue, or ("error", i, exc) if item i could not get its
    start from the rate gate.  interrupt(i) raises _Interrupt in it, only while
    item i is still the current one (checked under the lock the thread updates it with)."""

    def __init__(self, run: "_TimedRun", start: int) -> None:
        self.run = run
        self.start = start
        self.events: queue.SimpleQueue[tuple[str, int, Any]] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.current: int | None = None
        self.abandoned = False
        self.thread = threading.Thread(target=self._loop, name="procqueue-dask-item",
                                       daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        run = self.run
        for i in range(self.start, len(run.payloads)):
            if self.abandoned:
                return
            if run.gate is not None:
                try:
                    run.gate.take()  # before the item's clock: its timeout counts from here
                except Exception as exc:  # the pool's semaphore is gone (terminated)
                    self.events.put(("error", i, exc))
                    return
            started = time.monotonic()
            try:
                with self.lock:
                    self.current = i
                self.events.put(("start", i, started))
                ok, data = _call_item(run.fn, run.fn_error, run.kind, run.payloads[i])
                row: Row = (ok, data, time.monotonic() - started)
                with self.lock:
                    self.current = None
            except _Interrupt:
                with self.lock:
                    self.current = None
                row = _timeout_row(run.timeout_s, time.monotonic() - started, False)
            self.events.put(("done", i, row))

    def interrupt(self, i: int) -> None:
        with self.lock:
            if self.current == i and self.thread.ident is not None:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(self.thread.ident), ctypes.py_object(_Interrupt))


class _TimedRun:
    """The items of a chunk with a per-item timeout.  Dask cannot kill a task's thread, so
    each item runs on a helper thread watched from the Dask task's thread: at the deadline
    the item is interrupted (an exception raised in its thread: pure-Python code stops at
    once); if it does not stop within TIMEOUT_GRACE_S (blocked in C: sleep, I/O, an
    extension), its thread is abandoned and the next items run on a fresh one."""

    def __init__(self, fn: Callable[..., Any] | None, fn_error: bytes | None, kind: CallKind,
                 payloads: list[bytes], timeout_s: float, gate: _RateWindow | None) -> None:
        self.fn, self.fn_error, self.kind = fn, fn_error, kind
        self.payloads = payloads
        self.timeout_s = timeout_s
        self.gate = gate
        self.rows: list[Row | None] = [None] * len(payloads)

    def run(self) -> list[Row]:
        position = 0
        while position < len(self.payloads):
            position = self._watch(_ItemThread(self, position))
        return [row for row in self.rows if row is not None]

    def _watch(self, items: _ItemThread) -> int:
        """Collect rows until the thread is done (len) or abandoned (next position)."""
        current, started, deadline, interrupted = -1, 0.0, None, False
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                what, i, value = items.events.get(timeout=wait)
            except queue.Empty:
                if not interrupted:
                    items.interrupt(current)
                    interrupted, deadline = True, time.monotonic() + TIMEOUT_GRACE_S
                    continue
                items.abandoned = True
                self.rows[current] = _timeout_row(self.timeout_s, time.monotonic() - started,
                                                  True)
                return current + 1
            if what == "error":
                raise value  # fails the chunk, as a failing lease does without a timeout
            if what == "start":
                current, started, interrupted = i, value, False
                deadline = started + self.timeout_s
            else:
                self.rows[i], deadline = value, None
                if i == len(self.payloads) - 1:
                    return len(self.payloads)


# ================================ client side ====================================================


class _Item:
    """One input of one call; what the result sinks see as a task (index, input, attempts,
    seconds, pid)."""

    __slots__ = ("call", "index", "input", "payload", "error", "attempts", "seconds", "pid",
                 "done", "isolate", "crash_runs", "chunk", "key", "key_held")

    def __init__(self, call: "_Call", index: int, item: Any, payload: bytes | None,
                 error: BaseException | None = None) -> None:
        self.call = call
        self.index = index
        self.input = item
        self.payload = payload
        self.error = error  # set when the input could not be pickled: fails at once
        self.attempts = 0  # runs started
        self.seconds = 0.0  # run time of the last attempt
        self.pid: int | None = None  # Dask worker process of the last attempt
        self.done = False  # its one outcome was delivered
        self.isolate = False  # run alone: its chunk lost a worker, find out who did it
        self.crash_runs = 0  # runs that ended with the worker's death
        self.chunk: "_Chunk | None" = None  # in flight in this chunk
        self.key: Any = None  # its concurrency key (calls with key=)
        self.key_held = False  # counted as running under its key (from chunk to chunk end)


@dataclass(frozen=True)
class _KeySpec:
    """A call's per-key limit: `fn(input)` is an input's key (called in the caller, as the
    local pool does), and at most `per_key` items of the call run at once per key."""

    fn: Callable[[Any], Any]
    per_key: int


class _Pending:
    """A call's items waiting for a chunk: FIFO, or for a keyed call FIFO within each key and
    round robin across keys (the local pool's FairQueue), handing out only items whose key is
    under its cap, so a key with many items neither starves nor blocks the others."""

    def __init__(self, keyed: KeyedLimit[Any] | None) -> None:
        self.keyed = keyed
        self.fifo: deque[_Item] = deque()
        self.by_key: FairQueue[Any, _Item] | None = None if keyed is None else FairQueue()

    def __len__(self) -> int:
        return len(self.fifo) if self.by_key is None else len(self.by_key)

    def push(self, item: _Item, front: bool = False) -> None:
        if self.by_key is not None:
            if front:
                self.by_key.push_front(item.key, item)
            else:
                self.by_key.push(item.key, item)
        elif front:
            self.fifo.appendleft(item)
        else:
            self.fifo.append(item)

    def pop(self) -> _Item | None:
        """The next item that may start now (its key under its cap); None if none may."""
        if self.by_key is None:
            return self.fifo.popleft() if self.fifo else None
        assert self.keyed is not None
        got = self.by_key.pop_next(self.keyed.can_start)
        return None if got is None else got.item

    def drain(self) -> list[_Item]:
        """Every waiting item, whatever its key."""
        if self.by_key is None:
            items = list(self.fifo)
            self.fifo.clear()
            return items
        drained = []
        while (got := self.by_key.pop_next()) is not None:
            drained.append(got.item)
        return drained


class _Call:
    """One API call (map, imap, submit...): its function, how to call it, its sink."""

    def __init__(self, call_id: int, fn_id: int, fn_payload: bytes, kind: CallKind, sink: Any,
                 *, timeout_s: float | None, limits: tuple[Any, ...],
                 sizer: ChunkSizer, rate: RateSpec | None = None,
                 keys: _KeySpec | None = None) -> None:
        self.id = call_id
        self.fn_id = fn_id
        self.fn_payload = fn_payload
        self.kind = kind
        self.sink = sink
        self.timeout_s = timeout_s
        self.limits = limits  # distributed.Semaphore objects held by each of its chunks
        self.owned_limits: tuple[Any, ...] = ()  # this call's own, closed when it ends
        self.sizer = sizer
        self.rate = rate  # the pool's rate gate, taken by each item where it runs
        self.key_fn = None if keys is None else keys.fn
        self.keyed: KeyedLimit[Any] | None = None if keys is None else KeyedLimit(keys.per_key)
        self.pending = _Pending(self.keyed)
        self.open = False  # a feeder may still add items
        self.outstanding = 0  # items without an outcome yet
        self.cancelled = False

    @property
    def finished(self) -> bool:
        return not self.open and self.outstanding == 0


class _Chunk:
    __slots__ = ("key", "call", "items", "future")

    def __init__(self, key: str, call: _Call, items: list[_Item], future: Any) -> None:
        self.key = key
        self.call = call
        self.items = items
        self.future = future


# ---- driver commands: everything that changes item state is one of these -----------------------

@dataclass(frozen=True)
class _Submit:
    call: _Call
    items: list[_Item]


@dataclass(frozen=True)
class _Open:
    call: _Call


@dataclass(frozen=True)
class _InputDone:
    call: _Call


@dataclass(frozen=True)
class _ChunkDone:
    future: Any


@dataclass(frozen=True)
class _CancelCall:
    call: _Call
    kill_running: bool
    quiet: bool  # the consumer is gone: nobody reads the cancelled outcomes


@dataclass(frozen=True)
class _CancelItem:
    item: _Item
    running: bool


@dataclass(frozen=True)
class _Close:
    pass


@dataclass(frozen=True)
class _Terminate:
    pass


Command = (_Submit | _Open | _InputDone | _ChunkDone | _CancelCall | _CancelItem | _Close
           | _Terminate)


@dataclass(frozen=True)
class DaskWorkerStats:
    """One Dask worker, as the scheduler reports it (the WorkerStats fields it can fill)."""

    slot: int
    pid: int | None
    cpus: tuple[int, ...]
    tasks_done: int
    busy_s: float
    idle_s: float
    restarts: int
    last_exit: str | None
    rss_bytes: int
    address: str = ""
    nthreads: int = 0


@dataclass(frozen=True)
class DaskPoolStats:
    """The PoolStats fields (same names and meaning) for a DaskPool."""

    state: str
    processes: int  # Dask worker threads in the cluster
    tasks_submitted: int
    tasks_succeeded: int
    tasks_failed: int
    tasks_cancelled: int
    tasks_queued: int
    tasks_running: int  # items in chunks submitted to Dask (running or waiting there)
    retries: int
    worker_restarts: int  # chunks Dask lost with a worker
    recycled_for_memory: int
    workers: tuple[DaskWorkerStats, ...] = ()
    chunks_submitted: int = 0


class _Counters:
    def __init__(self) -> None:
        self.submitted = self.succeeded = self.failed = self.cancelled = 0
        self.retries = self.lost_chunks = self.chunks = 0


class _Driver:
    """The one thread that owns every item of a DaskPool (see the module docstring)."""

    def __init__(self, client: Any, token: str, retries: int,
                 retry_on: tuple[type[BaseException], ...], allowed_failures: int) -> None:
        self.client = client
        self.token = token
        self.retries = retries
        self.retry_on = retry_on
        self.allowed_failures = allowed_failures
        self.inbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self.calls: dict[int, _Call] = {}  # calls with work left, in submission order
        self.ready: deque[_Call] = deque()  # calls with pending items (round robin)
        self.inflight: dict[str, _Chunk] = {}
        self.retry_heap: list[tuple[float, int, _Item]] = []
        self.retry_seq = itertools.count()
        self.chunk_ids = itertools.count(1)
        self.counts = _Counters()
        self.closing = False
        self.state = "running"
        self.broken_error: BaseException | None = None
        self.worker_pids: dict[str, int] = {}  # Dask worker address -> pid, as seen in results
        self.worker_work: dict[str, tuple[int, float]] = {}  # address -> (items run, busy s)
        self._nthreads = 0
        self._nthreads_at = -math.inf
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"procqueue-dask-{token}",
                                       daemon=True)

    def cancel_task(self, item: _Item, running: bool) -> None:
        """A submit() future's cancel()."""
        self.post(_CancelItem(item, running))

    def post(self, command: Command) -> None:
        self.inbox.put(command)

    # ---- the loop -------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self.state != "stopped":
                self._apply(self._next_command())
                while True:  # apply whatever else arrived before dispatching once
                    try:
                        self._apply(self.inbox.get_nowait())
                    except queue.Empty:
                        break
                self._requeue_due_retries()
                self._dispatch()
                self._maybe_stop()
        except BaseException:  # a procqueue bug: never leave a caller waiting forever
            self._break(PoolBrokenError("procqueue dask driver failed:\n" + traceback.format_exc()))
        finally:
            self.state = "stopped"
            self.stopped.set()

    def _next_command(self) -> Command | None:
        timeout = None
        if self.retry_heap:
            timeout = max(0.0, self.retry_heap[0][0] - time.monotonic())
        try:
            return self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def _apply(self, command: Command | None) -> None:
        match command:
            case None:
                pass
            case _Submit(call, items):
                self._on_submit(call, items)
            case _Open(call):
                call.open = True
                self.calls[call.id] = call
            case _InputDone(call):
                call.open = False
                self._forget_if_finished(call)
            case _ChunkDone(future):
                self._on_chunk_done(future)
            case _CancelCall(call, kill_running, quiet):
                self._cancel_call(call, kill_running, quiet)
            case _CancelItem(item, running):
                self._cancel_item(item, running)
            case _Close():
                self.closing = True
            case _Terminate():
                self._terminate()
            case _:
                raise TypeError(f"unknown driver command {command!r}")

    def _maybe_stop(self) -> None:
        if self.closing and self.state == "running" and not self.calls and not self.inflight:
            self.state = "stopped"

    # ---- submission and dispatch -----------------------------------------------------------

    def _on_submit(self, call: _Call, items: list[_Item]) -> None:
        self.calls[call.id] = call
        call.outstanding += len(items)
        self.counts.submitted += len(items)
        for item in items:
            if item.error is not None:
                self._fail(item, item.error)
            elif call.cancelled:
                self._finish(item, False, self._cancelled_error(item, "before it started"))
            else:
                call.pending.push(item)
        self._mark_ready(call)
        self._forget_if_finished(call)

    def _mark_ready(self, call: _Call) -> None:
        if call.pending and call not in self.ready:
            self.ready.append(call)

    def _capacity(self) -> int:
        now = time.monotonic()
        if now - self._nthreads_at > NTHREADS_REFRESH_S:
            try:
                self._nthreads = sum(self.client.nthreads().values())
            except Exception:  # the scheduler is unreachable for a moment: keep the last count
                pass
            self._nthreads_at = now
        return INFLIGHT_CHUNKS_PER_THREAD * max(1, self._nthreads)

    def threads(self) -> int:
        return max(1, self._nthreads)

    def _dispatch(self) -> None:
        if self.state != "running" or not self.ready:
            return
        room = self._capacity() - len(self.inflight)
        while room > 0 and self.ready:
            call = self.ready.popleft()
            items = self._take_chunk(call)
            if items:
                self._submit_chunk(call, items)
                room -= 1
                self._mark_ready(call)
            # else every waiting key is at its cap: a chunk that ends marks the call ready

    def _take_chunk(self, call: _Call) -> list[_Item]:
        size = call.sizer.next_size(len(call.pending), workers=self.threads())
        items: list[_Item] = []
        while len(items) < size:
            item = call.pending.pop()
            if item is None:
                break
            if item.done:
                continue  # cancelled while it waited
            if item.isolate and items:
                call.pending.push(item, front=True)
                break  # an isolated item runs alone
            if not call.sink.starting(item):  # its Future was cancelled while queued
                self._finish(item, False, None)
                continue
            self._hold_key(item)
            items.append(item)
            if item.isolate:
                break
        return items

    def _hold_key(self, item: _Item) -> None:
        """Count the item as running under its key from now to its chunk's end: a chunk in
        flight may be running any of its items, so the cap holds for the items that run."""
        keyed = item.call.keyed
        if keyed is not None:
            keyed.started(item.key)
            item.key_held = True

    def _release_key(self, item: _Item) -> None:
        keyed = item.call.keyed
        if item.key_held and keyed is not None:
            item.key_held = False
            keyed.finished(item.key)
            self._mark_ready(item.call)

    def _forget_chunk(self, chunk: _Chunk) -> None:
        """The chunk is no longer in flight (done, lost, cancelled): its items' keys free."""
        self.inflight.pop(chunk.key, None)
        for item in chunk.items:
            item.chunk = None
            self._release_key(item)

    def _submit_chunk(self, call: _Call, items: list[_Item]) -> None:
        key = f"procqueue-{self.token}-{call.id}-{next(self.chunk_ids)}"
        payloads = [item.payload for item in items]
        future = self.client.submit(run_chunk, call.fn_id, call.fn_payload, int(call.kind),
                                    payloads, call.timeout_s, call.limits, call.rate, key=key,
                                    pure=False)
        chunk = _Chunk(key, call, items, future)
        for item in items:
            item.attempts += 1
            item.chunk = chunk
        self.inflight[key] = chunk
        self.counts.chunks += 1
        post = self.post
        future.add_done_callback(lambda f: post(_ChunkDone(f)))

    # ---- outcomes ---------------------------------------------------------------------------

    def _on_chunk_done(self, future: Any) -> None:
        chunk = self.inflight.get(future.key)
        if chunk is None:
            return  # cancelled or terminated before it finished
        self._forget_chunk(chunk)
        status = future.status
        if status == "finished":
            self._on_rows(chunk, future)
        elif status == "error":
            self._on_chunk_error(chunk, future.exception())
        elif status == "lost":
            self._requeue_uncharged(chunk)
        else:  # cancelled by Dask (scheduler restart, client reconnect)
            for item in _alive(chunk.items):
                self._finish(item, False, self._cancelled_error(item, "by Dask"))
        future.release()

    def _on_rows(self, chunk: _Chunk, future: Any) -> None:
        try:
            pid, address, rows = future.result()
        except Exception as exc:  # fetching the result failed (the worker left meanwhile)
            self._on_chunk_error(chunk, exc)
            return
        busy = 0.0
        for item, (ok, data, seconds) in zip(chunk.items, rows, strict=True):
            busy += seconds
            item.seconds, item.pid = seconds, pid
            if not item.done:
                self._on_row(item, ok, data)
        chunk.call.sizer.observe(len(rows), busy)
        if address:
            self.worker_pids[address] = pid
            done, busy_s = self.worker_work.get(address, (0, 0.0))
            self.worker_work[address] = (done + len(rows), busy_s + busy)

    def _on_row(self, item: _Item, ok: bool, data: bytes) -> None:
        if ok:
            try:
                value = pickle.loads(data)
            except BaseException as exc:  # noqa: BLE001 - fails only this item
                self._fail(item, unreadable_result_error(exc, len(data)))
                return
            self._finish(item, True, value)
        else:
            self._after_failure(item, restore_exception(data))

    def _on_chunk_error(self, chunk: _Chunk, exc: BaseException | None) -> None:
        if _is_killed_worker(exc):
            self._on_lost_worker(chunk, exc)
            return
        for item in _alive(chunk.items):
            error = RemoteError(type(exc).__name__, f"the Dask task running this item failed: "
                                f"{exc}; is procqueue installed on every Dask worker?")
            error.__cause__ = exc
            self._fail(item, error)

    def _on_lost_worker(self, chunk: _Chunk, exc: Any) -> None:
        """Dask re-ran the chunk until `allowed_failures`: split it so that the next worker
        death is charged to the one item that causes it."""
        self.counts.lost_chunks += 1
        alive = _alive(chunk.items)
        if len(chunk.items) > 1:
            self._requeue_uncharged(chunk, isolate=True)
            return
        for item in alive:
            item.crash_runs += self.allowed_failures + 1
            item.attempts += self.allowed_failures  # Dask's own re-runs
            if self.state == "running" and not item.call.cancelled \
                    and item.crash_runs <= self.retries:
                self._retry(item)
            else:
                self._fail(item, self._crash_error(item, exc))

    def _crash_error(self, item: _Item, exc: Any) -> WorkerCrashedError:
        address = getattr(getattr(exc, "last_worker", None), "address", "?")
        item.pid = self.worker_pids.get(address)
        error = WorkerCrashedError(
            f"Dask worker {address} died while running the task, {item.crash_runs} time(s) "
            f"(distributed.scheduler.allowed-failures={self.allowed_failures}); a SIGKILL "
            "(the OOM killer is a common cause), os._exit or a segfault", exitcode=None)
        error.__cause__ = exc
        return error

    def _requeue_uncharged(self, chunk: _Chunk, isolate: bool = False) -> None:
        call = chunk.call
        for item in reversed(_alive(chunk.items)):
            item.attempts -= 1  # its run was not its fault (or it never ran)
            item.isolate = item.isolate or isolate
            if call.cancelled or self.state != "running":
                self._finish(item, False, self._cancelled_error(item, "before it finished"))
            else:
                call.pending.push(item, front=True)
        self._mark_ready(call)

    def _after_failure(self, item: _Item, error: BaseException) -> None:
        if self.state == "running" and not item.call.cancelled \
                and item.attempts <= self.retries and isinstance(error, self.retry_on):
            self._retry(item)
        else:
            self._fail(item, error)

    def _retry(self, item: _Item) -> None:
        self.counts.retries += 1
        ceiling = min(RETRY_BACKOFF_MAX_S, RETRY_BACKOFF_S * 2 ** max(item.attempts - 1, 0))
        due = time.monotonic() + ceiling / 2 + random.uniform(0, ceiling / 2)
        heapq.heappush(self.retry_heap, (due, next(self.retry_seq), item))

    def _requeue_due_retries(self) -> None:
        now = time.monotonic()
        while self.retry_heap and self.retry_heap[0][0] <= now:
            item = heapq.heappop(self.retry_heap)[2]
            if item.done:
                continue
            if item.call.cancelled or self.state != "running":
                self._finish(item, False, self._cancelled_error(item, "before its retry"))
                continue
            item.call.pending.push(item, front=True)
            self._mark_ready(item.call)

    def _fail(self, item: _Item, error: BaseException) -> None:
        annotate(error, index=item.index, input_repr=short_repr(item.input), pid=item.pid,
                 attempts=item.attempts)
        self._finish(item, False, error)

    def _finish(self, item: _Item, ok: bool, value: Any) -> None:
        """The only place an item gets its outcome; value None with not ok: a cancelled
        Future (it knows already)."""
        if item.done:
            return
        item.done = True
        item.payload = None
        call = item.call
        call.outstanding -= 1
        if ok:
            self.counts.succeeded += 1
        elif isinstance(value, TaskCancelledError) or value is None:
            self.counts.cancelled += 1
        else:
            self.counts.failed += 1
        if value is not None or ok:
            try:
                call.sink.deliver(item, ok, value)
            except Exception:
                traceback.print_exc()
        self._forget_if_finished(call)

    def _forget_if_finished(self, call: _Call) -> None:
        if call.finished and self.calls.pop(call.id, None) is not None:
            for limit in call.owned_limits:
                _close_quietly(limit)

    def _cancelled_error(self, item: _Item, when: str) -> TaskCancelledError:
        error = TaskCancelledError(f"the task was cancelled {when}")
        annotate(error, index=item.index, input_repr=short_repr(item.input), pid=item.pid,
                 attempts=item.attempts)
        return error

    # ---- cancel / terminate ---------------------------------------------------------------

    def _cancel_call(self, call: _Call, kill_running: bool, quiet: bool) -> None:
        call.cancelled = True
        _close_window(call)
        for item in call.pending.drain():
            self._finish(item, False, self._cancelled_error(item, "before it started"))
        if kill_running:
            for chunk in [c for c in self.inflight.values() if c.call is call]:
                self._kill_chunk(chunk, "while running")

    def _cancel_item(self, item: _Item, running: bool) -> None:
        chunk = item.chunk
        if chunk is not None and running and len(_alive(chunk.items)) == 1:
            self._forget_chunk(chunk)
            self.client.cancel(chunk.future, force=True)
        self._finish(item, False, None)

    def _kill_chunk(self, chunk: _Chunk, when: str) -> None:
        """Forget a chunk in flight (Dask cannot stop its thread: it runs on, unread)."""
        self._forget_chunk(chunk)
        try:
            self.client.cancel(chunk.future, force=True)
        except Exception:
            pass
        for item in _alive(chunk.items):
            self._finish(item, False, self._cancelled_error(item, when))

    def _terminate(self) -> None:
        self.state = "terminating"
        for call in list(self.calls.values()):
            _close_window(call)
        for chunk in list(self.inflight.values()):
            self._kill_chunk(chunk, "while running: the pool was terminated")
        for call in list(self.calls.values()):
            for item in call.pending.drain():
                self._finish(item, False,
                             self._cancelled_error(item, "before it started: the pool was "
                                                   "terminated"))
        while self.retry_heap:
            item = heapq.heappop(self.retry_heap)[2]
            self._finish(item, False, self._cancelled_error(item, "while waiting to retry"))
        for call in list(self.calls.values()):
            call.open = False
            self._forget_if_finished(call)
        self.state = "stopped"

    def _break(self, error: BaseException) -> None:
        self.broken_error = error
        for chunk in list(self.inflight.values()):
            self._forget_chunk(chunk)
            for item in _alive(chunk.items):
                self._finish_quietly(item, error)
        for call in list(self.calls.values()):
            _close_window(call)
            for item in call.pending.drain():
                self._finish_quietly(item, error)
        for _, _, item in self.retry_heap:
            self._finish_quietly(item, error)

    def _finish_quietly(self, item: _Item, error: BaseException) -> None:
        try:
            self._finish(item, False, PoolBrokenError(str(error)))
        except Exception:
            pass

    def statistics(self) -> tuple[int, int]:
        """(items queued, items in flight): read from other threads, hence approximate."""
        queued = sum(len(c.pending) for c in list(self.calls.values())) + len(self.retry_heap)
        running = sum(len(c.items) for c in list(self.inflight.values()))
        return queued, running


def _alive(items: list[_Item]) -> list[_Item]:
    return [item for item in items if not item.done]


def _close_window(call: _Call) -> None:
    window = getattr(call.sink, "window", None)
    if window is not None:
        window.close()


def _close_quietly(limit: Any) -> None:
    try:
        limit.close()
    except Exception:
        pass


def _is_killed_worker(exc: Any) -> bool:
    try:
        from distributed.scheduler import KilledWorker
    except ImportError:
        return False
    return isinstance(exc, KilledWorker)


def _dumps_item(item: Any) -> bytes:
    """Pickle an input for the wire: plain pickle (fast), cloudpickle for lambdas and the
    like.  Never out of band: the bytes may go to another machine."""
    try:
        return pickle.dumps(item, pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, TypeError, AttributeError):
        import cloudpickle

        return bytes(cloudpickle.dumps(item, pickle.HIGHEST_PROTOCOL))


def cluster_config(retries: int) -> dict[str, Any]:
    """Scheduler settings for the procqueue semantics on a cluster we start: Dask re-runs a
    chunk lost with its worker `retries` times; each 1-thread worker holds only the chunk it
    runs, so a worker death marks only that chunk as suspicious (saturation 1.1 would also
    charge the chunk queued behind it)."""
    return {"distributed.scheduler.allowed-failures": retries,
            "distributed.scheduler.worker-saturation": 1.0}


class _WorkerSetup:
    """The pool's setup of every Dask worker, present and future (a distributed WorkerPlugin:
    setup(worker) and teardown(worker) are the whole protocol): `env` first, then the
    initializer, as a local worker has its environment before its initializer runs.
    teardown (the pool ends on a cluster it does not own) restores the environment."""

    def __init__(self, env: dict[str, str], initializer: Callable[..., object] | None,
                 initargs: tuple[Any, ...]) -> None:
        self.env = env
        # Pickled as the tasks' functions are (protocol.dumps_function), so that a script's
        # initializer and its tasks share the worker's globals, as in the local pool.
        self.init_payload = (None if initializer is None
                             else dumps_function((initializer, tuple(initargs))))
        self.saved: dict[str, str | None] = {}  # in each worker: the values env replaced

    def setup(self, worker: Any) -> None:
        self.saved = {name: os.environ.get(name) for name in self.env}
        os.environ.update(self.env)
        if self.init_payload is not None:
            initializer, initargs = pickle.loads(self.init_payload)
            initializer(*initargs)

    def teardown(self, worker: Any) -> None:
        for name, value in self.saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class DaskPool(PoolCalls):
    """procqueue.Pool's API and result objects on a Dask distributed cluster.

    address=None and client=None: a LocalCluster of `processes` single-threaded worker
    processes on this machine, shut down with the pool.  address="tcp://host:8786": a
    Client of that scheduler, closed with the pool.  client=: that Client, left open.
    retries: re-runs of an item whose Dask worker died (Dask's own rescheduling, then one run
    per item, see the module docstring) and of an item raising one of retry_on.  timeout:
    per-item seconds (interrupts Python code; see docs/dask.md for what cannot be).
    concurrency: at most this many items of the pool running at once, cluster-wide (a
    distributed.Semaphore).  rate (a Rate or "50/30s"): at most `limit` item starts in any
    `per` seconds, cluster-wide (see _RateWindow).  worker_env: set in every worker while the
    pool is open (and in the processes of a LocalCluster the pool starts).
    processes is the size of the LocalCluster the pool starts; with address= or client= the
    cluster is what it is, and processes is ignored.  maxtasksperchild, context and pin have
    no meaning on Dask and are ignored; the local pool's other options are refused by name.
    """

    def __init__(self, processes: int | None = None,
                 initializer: Callable[..., object] | None = None, initargs: Iterable[Any] = (),
                 maxtasksperchild: int | None = None, context: Any = None, *,
                 address: str | None = None, client: Any = None,
                 retries: int = DEFAULT_CRASH_RETRIES,
                 retry_on: type[BaseException] | Iterable[type[BaseException]] = (),
                 timeout: float | None = None, chunksize: int | None = None,
                 concurrency: int | None = None, rate: Rate | str | None = None,
                 worker_env: Mapping[str, str] | None = None, **options: Any) -> None:
        _check_options(processes, retries, timeout, chunksize, concurrency, address, client)
        _check_local_options(maxtasksperchild, options)
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        pool_rate = Rate.of(rate)
        env = _check_worker_env(worker_env)
        self._state = "run"
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
            self._limits = self._pool_limits(concurrency)
            self._rate = self._rate_gate(pool_rate)
            self._install_worker_setup(env, initializer, tuple(initargs))
            self._driver = _Driver(self._client, self._token, retries, exception_types(retry_on),
                                   self._resources.allowed_failures())
        except BaseException:
            self._resources.close()
            raise
        self._driver.thread.start()
        self._finalizer = weakref.finalize(self, _shutdown, self._driver, self._resources)

    # ---- multiprocessing.Pool API (apply, map, imap... in calls.PoolCalls) ----------------

    def apply_async(self, func: Callable[..., Any], args: Iterable[Any] = (),
                    kwds: Mapping[str, Any] | None = None,
                    callback: Callable[[Any], object] | None = None,
                    error_callback: Callable[[BaseException], object] | None = None,
                    **options: Any) -> ApplyResult:
        self._check_running()
        result = ApplyResult(self, callback, error_callback)
        call = self._call(func, CallKind.ARGS_KWARGS, result, 1, options)
        self._post_items(call, [(tuple(args), dict(kwds or {}))])
        return result

    def close(self) -> None:
        """No more work may be submitted; join() waits for the submitted work."""
        if self._state == "run":
            self._state = "close"
            self._driver.post(_Close())

    def terminate(self) -> None:
        """Stop now: unfinished items fail with TaskCancelledError, chunks in flight are
        cancelled, a LocalCluster we started is shut down."""
        self._state = "terminate"
        self._finalizer()

    def join(self) -> None:
        """Wait for the submitted work (after close) and release the cluster."""
        if self._state == "run":
            raise ValueError("Pool is still running")
        self._driver.stopped.wait()
        self._finalizer()

    def __enter__(self) -> "DaskPool":
        self._check_running()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.terminate()

    def __repr__(self) -> str:
        return (f"<procqueue.DaskPool state={self._state} "
                f"scheduler={self._resources.scheduler_address()!r}>")

    def __reduce__(self) -> Any:
        raise NotImplementedError("pool objects cannot be passed between processes or pickled")

    # ---- procqueue extras ----------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskFuture:
        """Run fn(*args, **kwargs) on the cluster; returns a concurrent.futures.Future."""
        self._check_running()
        future = TaskFuture(keepalive=self)
        call = self._call(fn, CallKind.ARGS_KWARGS, future, 1, {})
        item = self._make_item(call, 0, (args, kwargs))
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
        iterator = OutcomeIterator(
            stream, self, on_abandon=lambda: post(_CancelCall(call, False, True)),
            on_cancel=lambda kill: post(_CancelCall(call, kill, False)))
        self._start_feeder(call, stream, iterable)
        return iterator

    def stats(self) -> DaskPoolStats:
        """A snapshot of item counts and the cluster's workers."""
        d = self._driver
        queued, running = d.statistics()
        workers = self._resources.worker_stats(dict(d.worker_pids), dict(d.worker_work))
        return DaskPoolStats(
            self._state, sum(w.nthreads for w in workers), d.counts.submitted,
            d.counts.succeeded, d.counts.failed, d.counts.cancelled, queued, running,
            d.counts.retries, d.counts.lost_chunks, 0, workers, d.counts.chunks)

    statistics = stats

    @property
    def client(self) -> Any:
        """The distributed.Client the pool submits to."""
        return self._client

    # ---- internals -------------------------------------------------------------------------

    def _check_running(self) -> None:
        if self._state != "run":
            raise PoolClosedError("Pool not running")
        if self._driver.broken_error is not None:
            raise self._driver.broken_error

    def _call(self, func: Callable[..., Any], kind: CallKind, sink: Any,
              chunksize: int | None, options: dict[str, Any]) -> _Call:
        if not callable(func):
            raise TypeError(f"{func!r} is not callable")
        timeout_s, concurrency, keys = _call_options(options, self._timeout_s)
        fn_id, payload = pickled_function(func)
        fixed = chunksize if chunksize is not None else self._chunksize
        if fixed is not None and (isinstance(fixed, bool) or not isinstance(fixed, int)
                                  or fixed < 1):
            raise ValueError("Chunksize must be 1+")
        # Under a rate, chunks keep their adaptive size: each item takes its start where it
        # runs, so a chunk cannot start its items early (the local pool's batches can).
        # (A fixed chunksize lives in the sizer, which always answers it.)
        call = _Call(next(self._ids), fn_id, payload, kind, sink, timeout_s=timeout_s,
                     limits=self._limits, sizer=self._sizer(fn_id, fixed), rate=self._rate,
                     keys=keys)
        if concurrency is not None:
            own = self._semaphore(concurrency, f"call{call.id}")
            call.limits, call.owned_limits = self._limits + (own,), (own,)
        return call

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

    def _semaphore(self, max_leases: int, what: str) -> Any:
        return _distributed().Semaphore(
            max_leases=max_leases, name=f"procqueue-{self._token}-{what}",
            scheduler_rpc=self._client.scheduler, loop=self._client.loop)

    def _pool_limits(self, concurrency: int | None) -> tuple[Any, ...]:
        if concurrency is None:
            return ()
        limit = self._semaphore(concurrency, "pool")
        self._resources.limits += (limit,)
        return (limit,)

    def _rate_gate(self, rate: Rate | None) -> RateSpec | None:
        """The pool's rate as its chunks carry it; the semaphore behind it is closed with the
        pool, after the workers gave its leases back (_Resources.close)."""
        if rate is None:
            return None
        semaphore = self._semaphore(rate.limit, "rate")
        self._resources.limits += (semaphore,)
        self._resources.rate_names.append(semaphore.name)
        return RateSpec(semaphore.name, rate.limit, rate.period_s)

    def _install_worker_setup(self, env: dict[str, str],
                              initializer: Callable[..., object] | None,
                              initargs: tuple[Any, ...]) -> None:
        if not env and initializer is None:
            return
        from distributed.diagnostics.plugin import WorkerPlugin

        plugin = type("ProcqueueWorkerSetup", (_WorkerSetup, WorkerPlugin), {})(
            env, initializer, initargs)
        name = f"procqueue-setup-{self._token}"
        self._resources.plugin_name = name  # unregistered at close, even if setup failed
        try:
            self._client.register_plugin(plugin, name=name)
        except Exception as exc:
            error = InitializerError(
                f"the worker initializer raised {type(exc).__name__}: {exc}")
            error.__cause__ = exc
            raise error from exc

    def _window_size(self) -> int:
        return max(WINDOW_ITEMS_MIN, WINDOW_ITEMS_PER_THREAD * self._driver.threads())

    def _make_item(self, call: _Call, index: int, value: Any) -> _Item:
        """An item for one input; a problem with the input (it cannot be pickled, its key
        function raises) becomes that item's error, never the whole call's."""
        try:
            item = _Item(call, index, value, _dumps_item(value))
        except Exception as exc:
            error = argument_error(f"the task's argument could not be pickled: {exc!r}; "
                                   "make sure every argument is picklable", exc)
            return _Item(call, index, value, None, error)
        if call.key_fn is not None:
            try:
                item.key = call.key_fn(value)
                hash(item.key)
            except Exception as exc:
                item.error = exc
        return item

    def _post_items(self, call: _Call, values: Iterable[Any]) -> list[_Item]:
        items = [self._make_item(call, i, v) for i, v in enumerate(values)]
        self._driver.post(_Submit(call, items))
        return items

    def _map_async(self, func: Callable[..., Any], iterable: Iterable[Any],
                   chunksize: int | None, kind: CallKind, callback: Any, error_callback: Any,
                   *, errors: str, options: dict[str, Any]) -> MapResult:
        self._check_running()
        errors = errors_mode(errors, options)
        values = iterable if isinstance(iterable, (list, tuple)) else list(iterable)
        result = MapResult(self, len(values), callback, error_callback,
                           return_errors=errors == "return")
        if values:
            call = self._call(func, kind, result, chunksize, options)
            self._post_items(call, values)
        return result

    def _imap(self, func: Callable[..., Any], iterable: Iterable[Any], chunksize: int | None,
              *, ordered: bool, errors: str, options: dict[str, Any]) -> IMapIterator:
        self._check_running()
        errors = errors_mode(errors, options)
        stream = ResultStream(ordered, Window(self._window_size()))
        call = self._call(func, CallKind.ONE, stream, chunksize, options)
        post = self._driver.post
        iterator = IMapIterator(stream, self,
                                on_abandon=lambda: post(_CancelCall(call, False, True)),
                                return_errors=errors == "return")
        self._start_feeder(call, stream, iterable)
        return iterator

    def _start_feeder(self, call: _Call, stream: ResultStream, iterable: Iterable[Any]) -> None:
        self._driver.post(_Open(call))
        feeder = threading.Thread(target=self._feed, args=(call, stream, iter(iterable)),
                                  name=f"procqueue-dask-feeder-{call.id}", daemon=True)
        feeder.start()

    def _feed(self, call: _Call, stream: ResultStream, iterator: Iterator[Any]) -> None:
        """Feeder thread: take inputs while the window has room, hand them over in groups."""
        window = stream.window
        assert window is not None
        count, input_error = 0, None
        try:
            while True:
                places = window.acquire(FEED_GROUP_MAX)
                if not places:
                    break  # the window closed: terminate, cancel, or the iterator was dropped
                group: list[_Item] = []
                try:
                    while len(group) < places:
                        group.append(self._make_item(call, count, next(iterator)))
                        count += 1
                except StopIteration:
                    pass
                if places > len(group):
                    window.release(places - len(group))
                if group:
                    self._driver.post(_Submit(call, group))
                if len(group) < places:
                    break
        except BaseException as exc:  # the user's iterable raised: what it gave still runs
            input_error = exc
        finally:
            stream.input_finished(count, input_error)
            self._driver.post(_InputDone(call))


class _Resources:
    """What a DaskPool holds on the cluster and must give back: the client (closed only if
    we opened it), the LocalCluster we started, the worker setup plugin, the semaphores and
    the workers' rate windows."""

    def __init__(self, client: Any, cluster: Any, owns_client: bool) -> None:
        self.client = client
        self.cluster = cluster
        self.owns_client = owns_client
        self.plugin_name: str | None = None
        self.limits: tuple[Any, ...] = ()  # distributed.Semaphore objects, closed at the end
        self.rate_names: list[str] = []  # rate semaphores whose worker windows close first
        self.closed = False

    @classmethod
    def open(cls, processes: int | None, address: str | None, client: Any,
             retries: int, env: dict[str, str]) -> "_Resources":
        import dask

        Client, LocalCluster = _distributed().Client, _distributed().LocalCluster
        if client is not None:
            return cls(client, None, owns_client=False)
        if address is not None:
            return cls(Client(address, set_as_default=False), None, owns_client=True)
        with dask.config.set(cluster_config(retries)):
            # env= reaches the worker processes as they start (what a library reads at import
            # sees it); the worker setup plugin sets it again, as on any cluster.
            cluster = LocalCluster(n_workers=processes or usable_cpu_count(), threads_per_worker=1,
                                   processes=True, dashboard_address=LOCAL_DASHBOARD,
                                   env=dict(env))
            try:
                return cls(Client(cluster, set_as_default=False), cluster, owns_client=True)
            except BaseException:
                cluster.close()
                raise

    def allowed_failures(self) -> int:
        """How many times the scheduler re-runs a task whose worker died."""
        try:
            value = self.client.run_on_scheduler(_scheduler_allowed_failures)
            return int(value)
        except Exception:
            import dask

            return int(dask.config.get("distributed.scheduler.allowed-failures"))

    def scheduler_address(self) -> str | None:
        try:
            return str(self.client.scheduler.address)
        except Exception:
            return None

    def worker_stats(self, pids: dict[str, int], work: dict[str, tuple[int, float]]
                     ) -> tuple[DaskWorkerStats, ...]:
        """One row per worker the scheduler knows now; pid and work as this pool saw them."""
        try:
            workers = self.client.scheduler_info(n_workers=-1)["workers"]
        except TypeError:
            workers = self.client.scheduler_info()["workers"]
        except Exception:
            return ()
        rows = []
        for slot, (address, info) in enumerate(sorted(workers.items())):
            metrics = info.get("metrics", {})
            done, busy_s = work.get(address, (0, 0.0))
            rows.append(DaskWorkerStats(
                slot, pids.get(address), (), done, busy_s, 0.0, 0, None,
                int(metrics.get("memory", 0) or 0), address, int(info.get("nthreads", 0))))
        return tuple(rows)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._give_back_rate_leases()
        for limit in self.limits:
            _close_quietly(limit)
        if self.plugin_name is not None and not self.owns_client:
            with contextlib.suppress(Exception):  # a shared cluster outlives us: unregister
                self.client.unregister_worker_plugin(self.plugin_name)
        if self.owns_client:
            with contextlib.suppress(Exception):
                self.client.close(timeout=CLOSE_TIMEOUT_S)
        if self.cluster is not None:
            self._close_cluster()

    def _give_back_rate_leases(self) -> None:
        """The rate leases still count starts of the last `per` seconds: give them back, so
        that the semaphores close empty.  Every worker is sealed before any gives back, and
        a wait woken by a give-back returns its lease at once (no start follows)."""
        if not self.rate_names:
            return
        with contextlib.suppress(Exception):
            for name in self.rate_names:
                self.client.run(seal_rate_window, name, on_error="ignore")
            for name in self.rate_names:
                self.client.run(close_rate_window, name, on_error="ignore")
            deadline = time.monotonic() + RATE_DRAIN_WAIT_S
            for limit in self.limits:
                if limit.name in self.rate_names:
                    while limit.get_value() and time.monotonic() < deadline:
                        time.sleep(RATE_DRAIN_POLL_S)

    def _close_cluster(self) -> None:
        """Our own LocalCluster: its worker processes get WORKER_STOP_GRACE_S to stop, then
        are killed, as the local pool's terminate kills its workers.  (A plain close lets a
        worker busy in a task Dask cannot interrupt hold the close for the nanny's 4 s.)"""
        nannies = list(getattr(self.cluster, "workers", {}).values())
        with contextlib.suppress(Exception):
            self.cluster.sync(_close_nannies, nannies, WORKER_STOP_GRACE_S)
        with contextlib.suppress(Exception):
            self.cluster.close(timeout=CLOSE_TIMEOUT_S)


async def _close_nannies(nannies: list[Any], grace_s: float) -> None:
    """Close each nanny and its worker process: the worker has 0.8 * grace_s to stop, then
    it is killed (distributed's Nanny.close(timeout=) contract)."""
    import asyncio

    await asyncio.gather(*(nanny.close(timeout=grace_s) for nanny in nannies),
                         return_exceptions=True)


def require_distributed() -> None:
    """Raises ImportError when Dask distributed (the dask extra) is not installed."""
    _distributed()


def _distributed() -> Any:
    """The distributed package, typed Any: it is an optional extra (procqueue[dask]) and
    only partly annotated, so its calls are checked by the tests, not by mypy."""
    import importlib

    return importlib.import_module("distributed")


def _scheduler_allowed_failures(dask_scheduler: Any) -> int:
    return int(dask_scheduler.allowed_failures)


def _shutdown(driver: _Driver, resources: _Resources) -> None:
    """Terminate the driver (if still running) and release the cluster (finalizer: GC,
    terminate, join, interpreter exit)."""
    if not driver.stopped.is_set():
        driver.post(_Terminate())
        driver.stopped.wait(CLOSE_TIMEOUT_S)
    resources.close()



def _check_options(processes: Any, retries: Any, timeout: Any, chunksize: Any,
                   concurrency: Any, address: Any, client: Any) -> None:
    for name, value, minimum in (("processes", processes, 1), ("retries", retries, 0),
                                 ("chunksize", chunksize, 1), ("concurrency", concurrency, 1)):
        if value is None and name != "retries":
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, not {type(value).__name__}")
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, not {value}")
    _check_timeout(timeout)
    if address is not None and client is not None:
        raise ValueError("give address= or client=, not both")


def _check_timeout(timeout: Any) -> None:
    if timeout is None:
        return
    if isinstance(timeout, str):
        raise ValueError("relative timeouts ('300%') are not supported on the Dask backend: "
                         "give seconds")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds or None, not {timeout!r}")
    if not timeout > 0:
        raise ValueError("timeout must be > 0 seconds")


# Options of the local Pool with no meaning on Dask: accepted, so that code written for the
# local pool runs unchanged, and ignored (maxtasksperchild and context are positional).
# pin: the worker processes are the cluster's, placed by whoever started them.
_IGNORED_POOL_OPTIONS = frozenset({"pin"})
# Options of the local Pool that the Dask backend does not implement: refused by name, so
# that nobody believes they hold.
_LOCAL_ONLY_POOL_OPTIONS = frozenset({"queues", "journal", "trace", "on_event",
                                      "max_memory_per_child", "min_free_memory"})


def _check_local_options(maxtasksperchild: Any, options: dict[str, Any]) -> None:
    if maxtasksperchild is not None and (isinstance(maxtasksperchild, bool)
                                         or not isinstance(maxtasksperchild, int)
                                         or maxtasksperchild < 1):
        raise ValueError("maxtasksperchild must be a positive int or None")
    refused = sorted(_given(options) & _LOCAL_ONLY_POOL_OPTIONS)
    if refused:
        raise TypeError(f"Pool option(s) {', '.join(refused)} not supported on the Dask "
                        "backend (see docs/dask.md)")
    unknown = sorted(set(options) - _IGNORED_POOL_OPTIONS - _LOCAL_ONLY_POOL_OPTIONS)
    if unknown:
        raise TypeError(f"unexpected Pool option(s): {', '.join(unknown)}")


def _given(options: dict[str, Any]) -> set[str]:
    """The options given a value: None means "not set", as in the local pool, so code that
    passes the local pool's defaults (journal=None...) runs unchanged."""
    return {name for name, value in options.items() if value is not None}


def _check_worker_env(env: Any) -> dict[str, str]:
    if env is None:
        return {}
    if not isinstance(env, Mapping):
        raise TypeError(f"worker_env must be a mapping of str to str, not {env!r}")
    for name, value in env.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise TypeError(f"worker_env must map str to str, got {name!r}: {value!r}")
    return dict(env)


_CALL_OPTIONS = frozenset({"timeout", "concurrency", "key", "key_concurrency"})
_LOCAL_ONLY_CALL_OPTIONS = frozenset({"limit", "queue", "halt"})


def _call_options(options: dict[str, Any], default_timeout_s: float | None
                  ) -> tuple[float | None, int | None, _KeySpec | None]:
    """(timeout_s, concurrency, per-key limit) of one call; the local pool's other per-call
    options are refused by name rather than silently ignored."""
    unsupported = _given(options) & _LOCAL_ONLY_CALL_OPTIONS
    if unsupported:
        raise TypeError(f"not supported on the Dask backend: {', '.join(sorted(unsupported))}")
    unknown = set(options) - _CALL_OPTIONS - _LOCAL_ONLY_CALL_OPTIONS
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    timeout = options.get("timeout", default_timeout_s)
    _check_timeout(timeout)
    concurrency = _check_count("concurrency", options.get("concurrency"))
    return (None if timeout is None else float(timeout)), concurrency, _key_spec(options)


def _key_spec(options: dict[str, Any]) -> _KeySpec | None:
    """key= and key_concurrency=, with the local pool's rules (CallOptions.validate)."""
    key, per_key = options.get("key"), _check_count("key_concurrency",
                                                    options.get("key_concurrency"))
    if key is None:
        if per_key is not None:
            raise ValueError("key_concurrency needs key=")
        return None
    if not callable(key):
        raise TypeError("key must be a callable mapping an input to its key")
    return _KeySpec(key, per_key or 1)


def _check_count(name: str, value: Any) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or value < 1):
        raise ValueError(f"{name} must be an int >= 1, not {value!r}")
    return value


__all__ = ["DaskPool", "DaskPoolStats", "DaskWorkerStats", "RateSpec", "close_rate_window",
           "cluster_config", "run_chunk", "seal_rate_window"]

