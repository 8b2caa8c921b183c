"""What callers wait on: multiprocessing-style AsyncResult/MapResult/IMapIterator, a
concurrent.futures.Future, and the TaskOutcome stream of `imap_outcomes`.

Each is an OutcomeSink: the supervisor thread calls `deliver(task, ok, value)` exactly once
per task (value: the result, or the exception to raise); map and imap sinks also take
`deliver_run(first_index, inputs, values, seconds, pid)`, the successes of consecutive inputs
of a Block (each input still gets exactly one outcome: in a run or through its own Task).
Callbacks run on the supervisor thread, as in multiprocessing: keep them short.

Lazy inputs are fed with backpressure: a feeder thread takes a slot of the call's Window per
item and the consumer gives it back when it takes the item's result, so an endless generator
runs in bounded memory.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import multiprocessing.pool as mp_pool
import sys
import threading
from collections import deque
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Generic, Self, TypeVar

from .errors import TaskCancelledError
from .records import FrozenRecord
from .tasks import OutcomeSink, Task

T = TypeVar("T")


class TaskOutcome(FrozenRecord):
    """The one outcome of one input: its result or its error, and how it ran."""

    # __match_args__ as Record sets it, spelled out for mypy: a caller's `case TaskOutcome(i, x,
    # ok, ...)` is checked with it, as on the dataclass
    _fields = __match_args__ = ("index", "input", "ok", "value", "error", "attempts", "seconds",
                                "pid")

    index: int
    input: Any
    ok: bool
    value: Any  # the result if ok, else None
    error: BaseException | None  # the exception if not ok
    attempts: int  # runs started (0: it never ran)
    seconds: float  # run time of the last attempt
    pid: int | None  # worker pid of the last attempt

    def __init__(self, index: int, input: Any, ok: bool, value: Any, error: BaseException | None,
                 attempts: int, seconds: float, pid: int | None) -> None:
        set_ = object.__setattr__  # frozen: FrozenRecord's __setattr__ refuses
        set_(self, "index", index)
        set_(self, "input", input)
        set_(self, "ok", ok)
        set_(self, "value", value)
        set_(self, "error", error)
        set_(self, "attempts", attempts)
        set_(self, "seconds", seconds)
        set_(self, "pid", pid)


def _report_callback_error(kind: str) -> None:
    exc = sys.exc_info()[1]
    print(f"procqueue: exception in {kind} (ignored): {exc!r}", file=sys.stderr)


class CallbackRunner:
    """Runs a pool's result callbacks (apply_async's and map_async's callback and
    error_callback, a submit() future's done-callbacks) in a thread of their own, in the order
    their results came, so that a callback that is slow, or that waits on another result of
    its pool, does not hold the thread that delivered it: the supervisor's, which also reads
    the workers' results, notices their deaths and times their tasks out.  The thread starts
    at the first callback; finish() runs what is queued and ends it (a pool's join()).  A
    callback that waits on a result whose own callback is queued behind it waits for ever, as
    under multiprocessing, whose result handler thread runs them all."""

    def __init__(self, name: str, thread_ending: Callable[[], None] | None = None) -> None:
        self._name = name
        self._thread_ending = thread_ending  # told when the thread is about to end
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[Callable[[], None] | None] = deque()  # None: end the thread
        self._unfinished = 0  # queued or running callbacks
        self._thread: threading.Thread | None = None

    def run(self, callback: Callable[[], None]) -> None:
        """Run `callback` (which reports its own errors) in the runner's thread."""
        if self._thread is not None and threading.current_thread() is self._thread:
            callback()  # a callback's own result (a submit() from a callback, say)
            return
        with self._cond:
            self._queue.append(callback)
            self._unfinished += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def finish(self, timeout: float | None = None) -> bool:
        """Run the callbacks queued so far (waiting at most `timeout`), then end the thread;
        False if one was still running then (it stays with its daemon thread)."""
        with self._cond:
            thread = self._thread
            if thread is None or threading.current_thread() is thread:
                return True  # nothing ever ran, or a callback finishing its own pool
            done = self._cond.wait_for(lambda: self._unfinished == 0, timeout)
            if not done:
                return False
            self._queue.append(None)
            self._thread = None
            self._cond.notify_all()
        thread.join()
        return True

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                callback = self._queue.popleft()
            if callback is None:
                if self._thread_ending is not None:
                    self._thread_ending()
                return
            try:
                callback()
            except BaseException:  # noqa: BLE001 - a done-callback's sys.exit(): reported,
                _report_callback_error("callback")  # and the callbacks after it still run
            finally:
                with self._cond:
                    self._unfinished -= 1
                    self._cond.notify_all()


def callback_runner_of(pool: Any) -> CallbackRunner | None:
    return getattr(pool, "_callback_runner", None)


# The classes below subclass multiprocessing's own result classes so that code checking
# isinstance(r, multiprocessing.pool.AsyncResult) keeps working; none of multiprocessing's
# machinery is used: every method a caller reaches is defined here, and its __init__ (which
# registers with a multiprocessing pool) is never called.

class ApplyResult(mp_pool.ApplyResult[Any], OutcomeSink):
    """multiprocessing.pool.AsyncResult for one task."""

    def __init__(self, keepalive: Any, callback: Callable[[Any], object] | None = None,
                 error_callback: Callable[[BaseException], object] | None = None) -> None:
        self._event = threading.Event()
        self._callback = callback
        self._error_callback = error_callback
        self._success = False
        self._value: Any = None
        self._settled = False  # has its outcome (ready() once its callback has run too)
        self._keepalive = keepalive  # the pool must outlive its pending results

    def starting(self, task: Task) -> bool:
        return True

    def deliver(self, task: Task, ok: bool, value: Any) -> None:
        self._set(ok, value)

    def _set(self, ok: bool, value: Any) -> None:
        self._settled = True
        self._success, self._value = ok, value
        callback = self._callback if ok else self._error_callback
        runner = callback_runner_of(self._keepalive) if callback is not None else None
        if runner is None:
            self._call_back_then_be_ready(callback, value)
        else:  # as multiprocessing: get() returns once the callback has run
            runner.run(partial(self._call_back_then_be_ready, callback, value))

    def _call_back_then_be_ready(self, callback: Callable[[Any], object] | None,
                                 value: Any) -> None:
        if callback is not None:
            try:
                callback(value)
            except BaseException:  # noqa: BLE001 - sys.exit() in a callback ends no program
                _report_callback_error("callback")
        self._event.set()
        self._keepalive = None

    def abort(self, error: BaseException) -> None:
        """The pool can no longer give this call its outcome (it was terminated or broke,
        or its supervisor failed), or the call cannot be made (see
        PoolCalls._apply_arguments): `error` is its outcome, if it has none yet."""
        if not self._settled:
            self._set(False, error)

    def ready(self) -> bool:
        return self._event.is_set()

    def successful(self) -> bool:
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return self._success

    def wait(self, timeout: float | None = None) -> None:
        try:
            self._event.wait(timeout)
        except KeyboardInterrupt:
            _interrupted(self._keepalive)
            raise

    def get(self, timeout: float | None = None) -> Any:
        self.wait(timeout)
        if not self.ready():
            raise multiprocessing.TimeoutError
        if self._success:
            return self._value
        raise self._value


AsyncResult = ApplyResult


def _interrupted(pool: Any) -> None:
    """Ctrl-C (a KeyboardInterrupt) while the caller waited on `pool`'s work: the pool stops
    the calls made so far (Pool._on_keyboard_interrupt), then the interrupt goes on up."""
    stop = getattr(pool, "_on_keyboard_interrupt", None)
    if stop is not None:
        try:
            stop()
        except Exception:  # the interrupt is what the caller must get
            _report_callback_error("stopping the pool's calls at a Ctrl-C")


class MapResult(ApplyResult, mp_pool.MapResult[Any]):
    """The result of map_async/starmap_async.  Fails as soon as the first failure in input
    order is known (every earlier input succeeded), not after the whole batch; the error
    carries `partial_results`, {index: result} of the inputs completed by then."""

    def __init__(self, keepalive: Any, length: int, callback: Any = None,
                 error_callback: Any = None, *, return_errors: bool = False) -> None:
        super().__init__(keepalive, callback, error_callback)
        self._values: list[Any] = [None] * length
        self._done = bytearray(length)
        self._errors: dict[int, BaseException] = {}
        self._remaining = length
        self._first_open = 0  # lowest index not yet known to have succeeded
        self._return_errors = return_errors
        if length == 0:
            self._set(True, [])

    def deliver(self, task: Task, ok: bool, value: Any) -> None:
        i = task.index
        if ok or self._return_errors:
            self._values[i] = value
        else:
            self._errors[i] = value
        self._done[i] = 1
        self._remaining -= 1
        if self._settled:
            return
        if self._first_open >= i:
            self._advance()

    def deliver_all(self, succeeded: list[tuple[Task, Any]]) -> None:
        for task, value in succeeded:
            self.deliver(task, True, value)

    def deliver_run(self, first: int, inputs: list[Any], values: list[Any],
                    seconds: list[float] | None, pid: int | None) -> None:
        n = len(values)
        end = first + n
        self._values[first:end] = values
        self._done[first:end] = b"\x01" * n
        self._remaining -= n
        if self._settled:
            return
        if self._first_open >= first:
            self._advance()

    def _advance(self) -> None:
        """Move _first_open past the inputs known to have succeeded; finish or fail."""
        n = len(self._done)
        open_at = self._done.find(0, self._first_open)
        self._first_open = n if open_at < 0 else open_at
        if self._errors:
            first_error = min(self._errors)
            if first_error < self._first_open:
                self._first_open = first_error
        if self._first_open == n:
            self._set(True, self._values)
        elif self._first_open in self._errors:
            self._fail(self._errors[self._first_open])

    def _fail(self, error: BaseException) -> None:
        partial = {i: self._values[i] for i in range(len(self._done))
                   if self._done[i] and i not in self._errors}
        try:
            error.partial_results = partial  # type: ignore[attr-defined]
        except (AttributeError, TypeError):
            pass
        self._set(False, error)


class Window:
    """Bounds the inputs a lazy call has taken but whose results nobody has consumed yet."""

    def __init__(self, size: int) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._free = size
        self._closed = False

    def acquire(self, most: int = 1) -> int:
        """Wait for room; take up to `most` places.  0 once the window is closed."""
        with self._cond:
            while self._free <= 0 and not self._closed:
                self._cond.wait()
            if self._closed:
                return 0
            taken = min(most, self._free)
            self._free -= taken
            return taken

    def release(self, n: int = 1) -> None:
        with self._cond:
            self._free += n
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def closed(self) -> bool:
        return self._closed

    def lift(self) -> None:
        """No bound any more: the pool is closing, and join() must not wait for a consumer
        (multiprocessing feeds a closed pool's inputs to the end, results held for later)."""
        with self._cond:
            self._free = sys.maxsize
            self._cond.notify_all()


class ArgumentMemory:
    """Bytes of the out-of-band arguments (memfd copies of big buffers) a pool has made for
    tasks that have no final outcome yet.  A lazy call's feeder takes new inputs only while
    they stay under `limit` (or fewer than `min_tasks` such tasks are in flight, so that
    every worker has work): imap over a stream of big arrays holds a bounded amount of
    shared memory, not a whole window's worth (2,048 inputs)."""

    def __init__(self, limit: int, min_tasks: int) -> None:
        self.limit = limit
        self.min_tasks = min_tasks
        self.bytes = 0
        self.tasks = 0
        self.peak_bytes = 0
        self.last_size = 0  # of the latest argument: how many more fit the room
        self._cond = threading.Condition(threading.Lock())

    def hold(self, size: int) -> None:
        with self._cond:
            self.bytes += size
            self.tasks += 1
            self.last_size = size
            self.peak_bytes = max(self.peak_bytes, self.bytes)

    def release(self, size: int) -> None:
        with self._cond:
            self.bytes -= size
            self.tasks -= 1
            self._cond.notify_all()

    def room(self, most: int, closed: Callable[[], bool]) -> int:
        """Wait while over the limit (or until `closed()`); then how many more inputs like
        the latest big one fit, between 1 and `most` (`most` while none was big)."""
        with self._cond:
            while self._full() and not closed():
                self._cond.wait(0.1)
            if not self.last_size:
                return most
            fit = max((self.limit - self.bytes) // self.last_size, self.min_tasks - self.tasks)
            return max(1, min(most, fit))

    def _full(self) -> bool:
        return self.bytes > self.limit and self.tasks >= self.min_tasks


# One finished task as a stream keeps it: a plain tuple, cheaper than a TaskOutcome per item.
# (index, input, ok, value-or-error, attempts, seconds, pid)
_Done = tuple[int, Any, bool, Any, int, float, "int | None"]

WINDOW_RELEASE_BATCH = 32  # the consumer gives window places back this many at a time


class _Run:
    """Successes of consecutive inputs (a block's), kept as columns until consumed."""

    __slots__ = ("first", "inputs", "values", "seconds", "pid", "taken")

    def __init__(self, first: int, inputs: list[Any], values: list[Any],
                 seconds: list[float] | None, pid: int | None) -> None:
        self.first = first
        self.inputs = inputs
        self.values = values
        self.seconds = seconds
        self.pid = pid
        self.taken = 0

    def __len__(self) -> int:
        return len(self.values)

    def take(self) -> _Done:
        i = self.taken
        self.taken = i + 1
        seconds = 0.0 if self.seconds is None else self.seconds[i]  # None: an untimed block
        return (self.first + i, self.inputs[i], True, self.values[i], 1, seconds, self.pid)


class ResultStream(OutcomeSink):
    """The sink behind imap, imap_unordered and imap_outcomes (ordered or not)."""

    def __init__(self, ordered: bool, window: Window | None) -> None:
        self._cond = threading.Condition(threading.Lock())
        self.ordered = ordered
        self.window = window
        self._by_index: dict[int, _Done | _Run] = {}
        self._arrived: deque[_Done | _Run] = deque()
        self._run: _Run | None = None  # the run the consumer is taking items from
        self._next_index = 0
        self._yielded = 0
        self._unreleased = 0  # consumed places not yet given back to the window
        self._length: int | None = None  # known once the input is exhausted
        self._input_error: BaseException | None = None
        self._aborted: BaseException | None = None  # see abort
        self._discarding = False  # see discard
        self._input_complete = True  # see input_finished
        self.input_cut = False  # see cut_input

    def cut_input(self) -> None:
        self.input_cut = True

    def starting(self, task: Task) -> bool:
        return True

    def deliver(self, task: Task, ok: bool, value: Any) -> None:
        done = (task.index, task.input, ok, value, task.attempts, task.seconds, task.pid)
        with self._cond:
            if self._discarding:
                self._drop(1)
            elif self.ordered:
                self._by_index[task.index] = done
                if task.index == self._next_index:
                    self._cond.notify()
            else:
                self._arrived.append(done)
                self._cond.notify()

    def deliver_all(self, succeeded: list[tuple[Task, Any]]) -> None:
        """deliver() of many successes: one lock, one wake-up."""
        dones = [(t.index, t.input, True, v, t.attempts, t.seconds, t.pid) for t, v in succeeded]
        with self._cond:
            if self._discarding:
                self._drop(len(dones))
            elif self.ordered:
                by_index = self._by_index
                for done in dones:
                    by_index[done[0]] = done
                if self._next_index in by_index:
                    self._cond.notify()
            else:
                self._arrived.extend(dones)
                self._cond.notify()

    def deliver_run(self, first: int, inputs: list[Any], values: list[Any],
                    seconds: list[float] | None, pid: int | None) -> None:
        """Successes of inputs first, first+1, ...: one entry, one lock, one wake-up."""
        run = _Run(first, inputs, values, seconds, pid)
        with self._cond:
            if self._discarding:
                self._drop(len(run))
            elif self.ordered:
                self._by_index[first] = run
                if first == self._next_index:
                    self._cond.notify()
            else:
                self._arrived.append(run)
                self._cond.notify()

    def discard(self) -> None:
        """The caller dropped its iterator before the end (imap, imap_unordered): as with
        multiprocessing, every input of the call still runs (close() and join() wait for
        them); results are dropped as they come, each giving its place in the window back, so
        that the feeder goes on taking inputs."""
        with self._cond:
            self._discarding = True
            held = [*self._by_index.values(), *self._arrived]
            unread = len(self._run) - self._run.taken if self._run is not None else 0
            self._by_index.clear()
            self._arrived.clear()
            self._run = None
            self._drop(unread + sum(len(e) if isinstance(e, _Run) else 1 for e in held))

    def _drop(self, places: int) -> None:  # with self._cond held
        self._unreleased += places
        self._give_back_places()

    def abort(self, error: BaseException) -> None:
        """The pool can no longer deliver the rest (it was terminated or broke, or its
        supervisor failed): what was delivered is still yielded, then `error` is raised
        instead of waiting (see input_finished)."""
        with self._cond:
            self._aborted = error
            self._cond.notify_all()

    def input_finished(self, length: int, error: BaseException | None = None,
                       complete: bool = True) -> None:
        """The feeder reached the end of the input (or the input raised `error`); not
        `complete`: it stopped before the end (the pool was terminated or broke)."""
        with self._cond:
            self._length = length
            self._input_error = error
            self._input_complete = complete
            self._cond.notify_all()

    def next_done(self, timeout: float | None = None) -> _Done:
        """The next outcome (one input)."""
        done = self._next(timeout, self._take)
        assert not isinstance(done, _Run)
        return done

    def next_entry(self, timeout: float | None = None) -> "_Done | _Run":
        """The next outcome, or the next run of successes whole (its consumer holds them:
        their window places are given back now)."""
        return self._next(timeout, self._take_entry)

    def _next(self, timeout: float | None, take: Callable[[], "_Done | _Run | None"]
              ) -> "_Done | _Run":
        with self._cond:
            while True:
                done = take()
                if done is not None:
                    break
                if self._length is not None and self._yielded >= self._length:
                    if self._input_error is not None:
                        error, self._input_error = self._input_error, None
                        raise error
                    if self._aborted is not None and not self._input_complete:
                        # what the pool's end cut off is no success: say why it ended
                        raise self._aborted
                    raise StopIteration
                if self._aborted is not None:
                    raise self._aborted
                self._give_back_places()  # before sleeping: the feeder may need them
                if not self._cond.wait(timeout):
                    raise multiprocessing.TimeoutError
            n = len(done) if isinstance(done, _Run) else 1
            self._yielded += n
            self._unreleased += n
            if self._unreleased >= WINDOW_RELEASE_BATCH:
                self._give_back_places()
        return done

    def _give_back_places(self) -> None:
        if self.window is not None and self._unreleased:
            self.window.release(self._unreleased)
        self._unreleased = 0

    def _take_entry(self) -> "_Done | _Run | None":
        if self._run is not None:
            return self._take()  # finish a run next_done started
        if self.ordered:
            entry = self._by_index.pop(self._next_index, None)
            if entry is not None:
                self._next_index += len(entry) if isinstance(entry, _Run) else 1
            return entry
        return self._arrived.popleft() if self._arrived else None

    def _take(self) -> _Done | None:
        """The next outcome, one input at a time (a run is taken item by item)."""
        run = self._run
        if run is None:
            entry = self._take_entry()
            if not isinstance(entry, _Run):
                return entry
            run = self._run = entry
        done = run.take()
        if run.taken == len(run):
            self._run = None
        return done


class _StreamIterator(Generic[T]):
    """User-facing iterator over a ResultStream; dropping it stops the feeding of its call."""

    def __init__(self, stream: ResultStream, keepalive: Any,
                 on_abandon: Callable[[], None]) -> None:
        self._stream = stream
        self._keepalive = keepalive
        self._on_abandon = on_abandon
        self._finished = False

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> T:
        return self.next()

    def next(self, timeout: float | None = None) -> T:
        return self._convert(self._pull(self._stream.next_done, timeout))

    def _pull(self, take: Callable[[float | None], Any], timeout: float | None) -> Any:
        try:
            return take(timeout)
        except StopIteration:
            self._finished = True
            self._keepalive = None
            raise
        except KeyboardInterrupt:
            _interrupted(self._keepalive)
            raise

    def _convert(self, done: _Done) -> T:
        raise NotImplementedError

    def __del__(self) -> None:
        if not self._finished:
            try:
                self._on_abandon()
            except Exception:
                pass


if TYPE_CHECKING:  # generic in typeshed only
    _MultiprocessingIMapIterator = mp_pool.IMapIterator[Any]
else:
    _MultiprocessingIMapIterator = mp_pool.IMapIterator


class IMapIterator(_StreamIterator[Any], _MultiprocessingIMapIterator):
    """imap/imap_unordered: yields results; a failed item raises its exception at its place,
    and iteration can go on after it (as in multiprocessing)."""

    def __init__(self, stream: ResultStream, keepalive: Any, on_abandon: Callable[[], None],
                 *, return_errors: bool = False) -> None:
        super().__init__(stream, keepalive, on_abandon)
        self._return_errors = return_errors
        self._ready: deque[Any] = deque()  # values of a run taken whole, not yielded yet

    def __next__(self, timeout: float | None = None) -> Any:  # as multiprocessing's
        return self.next(timeout)

    def next(self, timeout: float | None = None) -> Any:
        ready = self._ready
        while True:
            if ready:
                try:
                    return ready.popleft()
                except IndexError:  # another thread took the last one
                    pass
            entry = self._pull(self._stream.next_entry, timeout)
            if not isinstance(entry, _Run):
                return self._convert(entry)
            ready.extend(entry.values)  # successes only: one lock for the whole run

    def _convert(self, done: _Done) -> Any:
        ok, value = done[2], done[3]
        if ok or self._return_errors:
            return value
        raise value


class OutcomeIterator(_StreamIterator[TaskOutcome]):
    """imap_outcomes: one TaskOutcome per input; never raises for a task's failure."""

    def __init__(self, stream: ResultStream, keepalive: Any, on_abandon: Callable[[], None],
                 on_cancel: Callable[[bool], None]) -> None:
        super().__init__(stream, keepalive, on_abandon)
        self._on_cancel = on_cancel

    def _convert(self, done: _Done) -> TaskOutcome:
        index, item, ok, value, attempts, seconds, pid = done
        return TaskOutcome(index, item, ok, value if ok else None, None if ok else value,
                           attempts, seconds, pid)

    def cancel(self, kill_running: bool = False) -> None:
        """Start no more of this call's tasks: each one not started yet comes out as a
        TaskCancelledError outcome; running ones finish, or with kill_running are killed.
        Safe to call from a signal handler."""
        self._on_cancel(kill_running)


class TaskFuture(concurrent.futures.Future, OutcomeSink):  # type: ignore[type-arg]
    """The Future of a submit() call, and the OutcomeSink of its task.  Its cancel() takes a
    queued task out of the pool, and also cancels a running one (unlike concurrent.futures):
    its worker is killed and replaced.

    Made for programs that hold many thousands pending: Python's garbage collector walks
    every container object at each full collection, and a plain Future with its sink and
    cancel hook is 11 of them (its condition, the condition's lock, deque and two bound
    methods, two lists...).  This one is a single object until someone waits on it: the
    condition (and Future's two lists) is made at the first use of ``_condition``, which
    every blocking path of concurrent.futures goes through (result() of a pending future,
    wait(), as_completed(), add_done_callback(), cancel()).  A change of state on a future
    without a condition is made under one module-wide lock, the same one that makes
    conditions, so it cannot slip between a waiter making the condition and waiting on it.
    """

    _cond: threading.Condition | None = None  # made at the first need
    _runner: CallbackRunner | None = None  # the pool's, once a done-callback is added
    _waiters: Any = ()  # Future's lists: empty until the condition is made, real lists then
    _done_callbacks: Any = ()

    def __init__(self, keepalive: Any = None) -> None:
        if _FUTURE_STATE_KNOWN:
            self._state = _PENDING
            self._result = None
            self._exception = None
        else:  # another Python's Future: its own __init__ (an eager condition, its lists)
            super().__init__()
        self._keepalive = keepalive  # the pool, while the task is not over
        self._canceller: Any = None  # cancel_task(task, running) of whoever runs the task
        self._task: Any = None

    @property
    def _condition(self) -> threading.Condition:
        cond = self._cond
        if cond is None:
            with _LAZY_LOCK:
                cond = self._cond
                if cond is None:
                    self._waiters = []
                    self._done_callbacks = []
                    # A Lock, not Future's RLock: Future never takes its lock twice.
                    cond = self._cond = threading.Condition(threading.Lock())
        return cond

    @_condition.setter
    def _condition(self, cond: threading.Condition) -> None:  # Future.__init__ (see above)
        self._cond = cond

    def cancel_via(self, canceller: Any, task: Any) -> None:
        """Where cancel() goes: canceller.cancel_task(task, running)."""
        self._canceller = canceller
        self._task = task

    # ---- the OutcomeSink of its task (the supervisor's thread) ----------------------------

    def deliver(self, task: Task, ok: bool, value: Any) -> None:
        # The task is over: drop the pool, the task, its call and their inputs, which callers
        # holding many futures would keep alive (and the garbage collector would walk).
        # Before the result is set, so a caller woken by it finds them released.
        self._keepalive = self._canceller = self._task = None
        if not ok and isinstance(value, TaskCancelledError) and self._state == _PENDING:
            # It never started (terminate(), a Ctrl-C): cancelled, as ProcessPoolExecutor's
            # shutdown(cancel_futures=True) leaves the futures it never started.
            with self._condition:
                cancelled = self._state == _PENDING
                if cancelled:
                    self._state = _CANCELLED
                    self._condition.notify_all()
            if cancelled:
                self._notify_cancelled()
                self._call_back()
                return
        self._finish(ok, value)

    def add_done_callback(self, fn: Callable[[Any], object]) -> None:
        if self._runner is None:
            self._runner = callback_runner_of(self._keepalive)  # (None once it is over)
        super().add_done_callback(fn)

    def _call_back(self) -> None:
        """The done-callbacks, for an outcome the pool gave: in its callback thread."""
        if not self._done_callbacks:
            return
        runner = self._runner
        if runner is None:
            self._invoke_callbacks()  # type: ignore[attr-defined]  # Future's own helper
        else:
            runner.run(self._invoke_callbacks)  # type: ignore[attr-defined]

    def starting(self, task: Task) -> bool:
        """set_running_or_notify_cancel() taking one lock in the common case: False if the
        future was cancelled while queued (then the task must not run); True also when
        already RUNNING (a retried or re-queued task starts again)."""
        if self._cond is None:
            with _LAZY_LOCK:
                if self._cond is None:  # so not cancelled: cancel() makes the condition
                    if self._state not in _STARTABLE:
                        return False  # it has its outcome already: nothing to run
                    self._state = _RUNNING
                    return True
        with self._condition:
            if self._state in _STARTABLE:
                self._state = _RUNNING
                return True
        self._notify_cancelled()  # cancelled while queued
        return False

    def _notify_cancelled(self) -> None:
        """What set_running_or_notify_cancel() does for a cancelled future, once, whoever comes
        first (cancel() or the supervisor): CANCELLED_AND_NOTIFIED, and wait() and
        as_completed() told.  A plain CANCELLED future is not done for them."""
        with self._condition:
            if self._state != _CANCELLED:
                return
            self._state = _CANCELLED_AND_NOTIFIED
            for waiter in self._waiters:
                waiter.add_cancelled(self)

    def _finish(self, ok: bool, value: Any) -> None:
        if self._cond is None:
            with _LAZY_LOCK:
                if self._cond is None:
                    # No condition: nobody waits on it and it has no callbacks.  The first
                    # outcome (or a cancel) stands, as set_result's InvalidStateError says.
                    if self._state in _STARTABLE:
                        if ok:
                            self._result = value
                        else:
                            self._exception = value
                        self._state = _FINISHED
                    return
        with self._condition:  # as set_result/set_exception, without their InvalidStateError
            if self._state not in _STARTABLE:
                return
            if ok:
                self._result = value
            else:
                self._exception = value
            self._state = _FINISHED
            for waiter in self._waiters:
                if ok:
                    waiter.add_result(self)
                else:
                    waiter.add_exception(self)
            self._condition.notify_all()
        self._call_back()

    # ---- reads that need no lock (one attribute read is atomic) ---------------------------

    def done(self) -> bool:
        return self._state in _DONE

    def running(self) -> bool:
        return self._state == _RUNNING

    def cancelled(self) -> bool:
        return self._state in _CANCELLED_STATES

    def __repr__(self) -> str:
        # Future's takes the lock, and set_result() formats the future while holding it when
        # it raises InvalidStateError: with a Lock (not an RLock) that would deadlock.
        state, where = self._state, f"<{type(self).__name__} at {id(self):#x} state="
        if state != _FINISHED:
            return f"{where}{_STATE_NAMES.get(state, state)}>"
        if self._exception is not None:
            return f"{where}finished raised {type(self._exception).__name__}>"
        return f"{where}finished returned {type(self._result).__name__}>"

    def result(self, timeout: float | None = None) -> Any:
        if self._state == _FINISHED and self._exception is None:
            return self._result  # its fields were set before its state
        return self._wait(concurrent.futures.Future.result, timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._state == _FINISHED:
            return self._exception
        exception: BaseException | None = self._wait(concurrent.futures.Future.exception,
                                                     timeout)
        return exception

    def _wait(self, wait: Callable[[Any, float | None], Any], timeout: float | None) -> Any:
        """Future's own wait; a Ctrl-C in it stops the pool's calls (see _interrupted)."""
        pool = self._keepalive  # (dropped once the outcome is set)
        try:
            return wait(self, timeout)
        except KeyboardInterrupt:
            _interrupted(pool)
            raise

    def cancel(self) -> bool:
        task, canceller = self._task, self._canceller  # dropped when the task ends
        hooked = task is not None and canceller is not None
        if not self.running() or not hooked:
            cancelled = super().cancel()
            if cancelled and hooked:
                canceller.cancel_task(task, False)  # taken out of the queue: it never starts
                self._notify_cancelled()
            return cancelled
        with self._condition:
            if self._state != _RUNNING:
                return self._state in _CANCELLED_STATES
            # What concurrent.futures does for a cancelled pending future, for a running one:
            self._state = _CANCELLED_AND_NOTIFIED
            for waiter in self._waiters:
                waiter.add_cancelled(self)
            self._condition.notify_all()
        canceller.cancel_task(task, True)
        self._invoke_callbacks()  # type: ignore[attr-defined]  # Future's own helper
        return True


_PENDING = concurrent.futures._base.PENDING
_FUTURE_STATE_KNOWN = set(vars(concurrent.futures.Future())) == {
    "_condition", "_state", "_result", "_exception", "_waiters", "_done_callbacks"}
_RUNNING = concurrent.futures._base.RUNNING
_FINISHED = concurrent.futures._base.FINISHED
_CANCELLED_AND_NOTIFIED = concurrent.futures._base.CANCELLED_AND_NOTIFIED
_STARTABLE = (_PENDING, _RUNNING)
_CANCELLED = concurrent.futures._base.CANCELLED
_CANCELLED_STATES = (_CANCELLED, _CANCELLED_AND_NOTIFIED)
_DONE = (*_CANCELLED_STATES, _FINISHED)
_STATE_NAMES = getattr(concurrent.futures._base, "_STATE_TO_DESCRIPTION_MAP", {})
_LAZY_LOCK = threading.Lock()  # makes TaskFutures' conditions; guards changes made without one

