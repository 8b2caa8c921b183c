"""What runs inside a Dask worker process, and nothing of the driver's side.

run_chunk is one Dask task: it runs a chunk's items in order and returns one row per item
(ok, the pickled result or ErrorInfo, seconds, start), so a failing item fails only itself.  Around
it: the worker's cache of unpickled functions, an item's call (the shared
item_run.run_item), per-item timeouts (_TimedRun watching an _ItemThread), the concurrency leases a
chunk holds, and the worker's side of the cluster-wide rate windows (_RateWindow: the pool's,
a named queue's, a named Limit's) an item takes its start from (_Starts), which no item of a
pool that let go of its chunk gets (_Unwanted).  Dask
workers unpickle run_chunk, seal_rate_window and close_rate_window by reference
(procqueue.backends.dask.worker_side.<name>), so procqueue must be importable there
(docs/dask.md); this module imports only the shared task model, so that a worker loads no
more of procqueue than it runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pickle
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple

from ...errors import ArgumentSerializationError, TaskTimeoutError
from ...item_run import run_item
from ...limits import START_SKEW_MARGIN_S
from ...protocol import CallKind, capture_exception

TIMEOUT_GRACE_S = 1.0  # after interrupting a timed-out item, wait this long before abandoning it
FUNCTION_CACHE_SIZE = 64  # functions a Dask worker keeps unpickled, by fn_id
# A lease wait asks the scheduler again this often (seconds), so that a wait on a semaphore
# its pool closed meanwhile (terminate) ends with an error instead of holding the worker
# thread forever: the scheduler forgets the waiters of a closed semaphore without waking them.
# Between two asks it also looks whether its pool let go of the chunk (_Unwanted): a named
# Limit's semaphore outlives every pool, so only that tells its waiter to stop.
LEASE_POLL_S = 1.0
# A start's rate lease is given back this much later than `per` seconds after it was granted
# (seconds): the item itself starts a moment after the grant (as START_SKEW_MARGIN_S does
# for the local pool's gate).
RATE_RELEASE_MARGIN_S = START_SKEW_MARGIN_S

_functions: OrderedDict[int, Callable[..., Any]] = OrderedDict()

# One item's outcome: (ok, pickled result or ErrorInfo, seconds it ran, when it started in
# wall-clock seconds since the epoch, by this worker's clock)
Row = tuple[bool, bytes, float, float]


class ChunkReport(NamedTuple):
    """What run_chunk returns: where the chunk ran (the worker's pid and address, and the
    ident of the worker thread that ran it) and one row per item, in order."""

    pid: int
    address: str
    thread: int
    rows: list[Row]


@dataclass(frozen=True)
class RateSpec:
    """A cluster-wide rate window, as a chunk carries it: the distributed.Semaphore's name,
    `limit` starts in any `period_s` seconds.  shared: a named Limit's window, which outlives
    the pool (other pools and programs take starts from it), so no pool seals or closes it."""

    name: str
    limit: int
    period_s: float
    shared: bool = False


def run_chunk(fn_id: int, fn_payload: bytes, kind: int, payloads: list[bytes],
              timeout_s: float | None, limits: tuple[Any, ...],
              rates: tuple[RateSpec, ...] = ()) -> ChunkReport:
    """One Dask task: run the items in order, each one's outcome a row.  Holds every
    distributed.Semaphore in `limits` while it runs; each item takes a start from every
    rate window in `rates` right before it runs."""
    fn, fn_error = _load_function(fn_id, fn_payload)
    call_kind = CallKind(kind)
    unwanted = _Unwanted.of_this_task()
    gate = _Starts([_rate_window(rate) for rate in rates], unwanted)
    with contextlib.ExitStack() as stack:
        for limit in limits:
            stack.enter_context(_lease(limit, unwanted))
        if timeout_s is None:
            rows = [_run_item(fn, fn_error, call_kind, p, gate) for p in payloads]
        else:
            rows = _TimedRun(fn, fn_error, call_kind, payloads, timeout_s, gate).run()
    return ChunkReport(os.getpid(), _worker_address(), threading.get_ident(), rows)


class _PoolEnded(RuntimeError):
    """The chunk's pool ended (or cancelled it) before an item of it could start: the chunk
    fails, unread, and none of its later items starts."""


class _Unwanted:
    """Whether the pool has let go of this chunk.  A named Limit's semaphores and rate
    window are never closed, so a wait on them cannot learn of the pool's end from them.
    But every end of a pool (terminate(), the end of `with`, garbage collection, a broken
    pool) and a cancel cancel or drop the chunk's future, and the scheduler then tells the
    worker, which marks the task it cannot stop "cancelled" (distributed's worker state
    machine): the word of the pool's end is already on the worker, with nothing to create
    on the scheduler or remove from it.  Reading it is an attribute read, no round trip, so
    it is checked before every item and between a lease wait's polls.  Outside a Dask task
    (no worker) a chunk is always wanted."""

    def __init__(self, task: Any) -> None:
        self.task = task  # the worker's TaskState of the running chunk, or None

    @classmethod
    def of_this_task(cls) -> "_Unwanted":
        """Called in the Dask task's thread: the item threads of a timed run have no
        worker context of their own, so they share the state captured here."""
        try:
            worker = _distributed().get_worker()
            return cls(worker.state.tasks.get(worker.get_current_task()))
        except (ValueError, KeyError, AttributeError):
            return cls(None)

    def __call__(self) -> bool:
        return self.task is not None and self.task.state == "cancelled"

    def check(self, what: str) -> None:
        if self():
            raise _PoolEnded(f"the pool ended while this item waited for {what}")


_ALWAYS_WANTED = _Unwanted(None)


def _acquire_lease(semaphore: Any, unwanted: _Unwanted = _ALWAYS_WANTED) -> None:
    """Block until the distributed.Semaphore grants a lease (see LEASE_POLL_S);
    _PoolEnded, holding no lease, if the chunk's pool lets go of it meanwhile."""
    while not semaphore.acquire(timeout=LEASE_POLL_S):
        unwanted.check("its lease")


@contextlib.contextmanager
def _lease(semaphore: Any, unwanted: _Unwanted = _ALWAYS_WANTED) -> Iterator[None]:
    _acquire_lease(semaphore, unwanted)
    try:
        yield
    finally:
        semaphore.release()


class _RateWindow:
    """This worker's side of a cluster-wide rate window (a pool's, a named queue's or a named
    Limit's): at most `limit` item starts in any `period_s` seconds, over every worker.

    A sliding window made of a distributed.Semaphore(max_leases=limit): each start holds a
    lease from its grant to `period_s` seconds after its item started (the grant itself when
    the item has no other window to wait for) - not until the item ends, and whatever the
    item does (raise, time out, run for an hour).  The leases held at any moment then cover
    every start of the last `period_s` seconds, so no window of `period_s` seconds can hold
    more than `limit` starts.  Only durations are measured, each
    on one machine, so worker clocks need not agree.

    A worker that dies takes its lease refreshes with it: the scheduler frees its leases after
    distributed.scheduler.locks.lease-timeout (30 s by default), which narrows the window for
    that long but never widens it.

    acquire() and start_now() run in item threads; the release timers and the counts live on
    the worker's event loop (one thread, no lock)."""

    def __init__(self, spec: RateSpec, worker: Any) -> None:
        self.loop = worker.loop  # a tornado IOLoop: add_callback is its thread-safe entry
        self.semaphore = _distributed().Semaphore(
            max_leases=spec.limit, name=spec.name, scheduler_rpc=worker.scheduler,
            loop=worker.loop)
        self.period_s = spec.period_s
        self.held = 0  # leases granted here and not given back yet (event loop only)
        self.sealed = False  # the pool is ending: no item may start any more
        self.closed = False  # the pool ended: every lease was given back (event loop only)

    def acquire(self, unwanted: _Unwanted = _ALWAYS_WANTED) -> None:
        """Block until a lease is granted; it is held until start_now() says when the item
        starts.  RuntimeError if the pool ended meanwhile: its item must not start."""
        _acquire_lease(self.semaphore, unwanted)
        if self.sealed:  # granted by a lease the ending pool gave back: not a start
            self.semaphore.release()
            raise RuntimeError("the pool ended while this item waited for its start")

    def start_now(self) -> None:
        """The item starts now: its lease goes back `period_s` seconds from now."""
        due = time.monotonic() + self.period_s + RATE_RELEASE_MARGIN_S
        self.loop.add_callback(self._arm, due)

    def give_back_unused(self) -> None:
        """A lease granted to an item that will not start (another window refused it)."""
        self.semaphore.release()

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


class _Starts:
    """What an item waits for right before it starts: a start from each rate window of its
    chunk (the pool's, its queue's, its Limit's; maybe none), and its pool still wanting it.
    A lease granted early counts from the item's real start, after the last window granted
    one: a lease held while the item waited for another window must not leave its window
    before the start it stands for does."""

    def __init__(self, windows: list[_RateWindow], unwanted: _Unwanted) -> None:
        self.windows = windows
        self.unwanted = unwanted

    def take(self) -> None:
        """Block until every window grants a start; RuntimeError (every lease given back)
        if a pool ended meanwhile, before or while it waited, or as the last lease came."""
        self.unwanted.check("its start")
        if not self.windows:
            return
        granted: list[_RateWindow] = []
        try:
            for window in self.windows:
                window.acquire(self.unwanted)
                granted.append(window)
            self.unwanted.check("its start")  # a start granted too late: not a start
        except BaseException:
            for window in granted:
                window.give_back_unused()
            raise
        for window in granted:
            window.start_now()


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
    ending pool start on another.  (Never for a named Limit's window: it outlives pools.)"""
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
    try:
        fn = pickle.loads(payload)
    except BaseException as exc:  # noqa: BLE001 - e.g. the user's module is missing on this worker
        # Not kept: each chunk tries again, so that a module installed or uploaded since
        # (client.upload_file) is found without restarting the workers
        error = ArgumentSerializationError(
            f"could not unpickle the task's function on the Dask worker: {exc!r}; install the "
            "modules it needs on every worker")
        error.__cause__ = exc
        return None, capture_exception(error)
    _functions[fn_id] = fn
    while len(_functions) > FUNCTION_CACHE_SIZE:
        _functions.popitem(last=False)
    return fn, None


class _Interrupt(BaseException):
    """Raised asynchronously in an item thread whose item ran past its timeout."""


def _run_item(fn: Callable[..., Any] | None, fn_error: bytes | None, kind: CallKind,
              payload: bytes, gate: _Starts) -> Row:
    gate.take()
    started = time.monotonic()  # after the rate gate: waiting for a start is not run time
    ok, data = _call_item(fn, fn_error, kind, payload)
    return ok, data, time.monotonic() - started, _wall_time(started)


def _wall_time(monotonic_s: float) -> float:
    """A time.monotonic() reading as wall-clock seconds since the epoch (what TaskEvents
    carry; durations are measured on the monotonic clock, which no clock step moves)."""
    return monotonic_s + (time.time() - time.monotonic())


def _call_item(fn: Callable[..., Any] | None, fn_error: bytes | None, kind: CallKind,
               payload: bytes) -> tuple[bool, bytes]:
    """The shared run_item (the local workers' too); the timeout interrupt goes up."""
    return run_item(fn, fn_error, kind, payload, _NO_FDS, 0, passthrough=(_Interrupt,))


_NO_FDS: dict[int, int] = {}  # a Dask item's argument never travels out of band


def _timeout_row(timeout_s: float, started: float, abandoned: bool) -> Row:
    """The row of an item that ran past its timeout, from its start (time.monotonic())."""
    how = ("; it is blocked outside Python and keeps running in an abandoned thread of the "
           "Dask worker" if abandoned else "")
    error = TaskTimeoutError(f"task timed out after {timeout_s:.3g} s{how}", timeout_s=timeout_s)
    return False, capture_exception(error), time.monotonic() - started, _wall_time(started)


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
            try:
                run.gate.take()  # before the item's clock: its timeout counts from here
            except Exception as exc:  # the pool ended (or its semaphore is gone)
                self.events.put(("error", i, exc))
                return
            started = time.monotonic()
            try:
                with self.lock:
                    self.current = i
                self.events.put(("start", i, started))
                ok, data = _call_item(run.fn, run.fn_error, run.kind, run.payloads[i])
                row: Row = (ok, data, time.monotonic() - started, _wall_time(started))
                with self.lock:
                    self.current = None
            except _Interrupt:
                with self.lock:
                    self.current = None
                row = _timeout_row(run.timeout_s, started, False)
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
                 payloads: list[bytes], timeout_s: float, gate: _Starts) -> None:
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
                self.rows[current] = _timeout_row(self.timeout_s, started, True)
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


def _distributed() -> Any:
    """The distributed package, typed Any: it is an optional extra (procqueue[dask]) and
    only partly annotated, so its calls are checked by the tests, not by mypy."""
    import importlib

    return importlib.import_module("distributed")
