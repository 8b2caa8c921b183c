"""JobMaker: a call's Job, from its function, its parsed options and what a pool keeps
across calls.

A Job (tasks.Job) is one call's function, pickled, with how to call it and what admits and
sizes its batches.  Some of that outlives the call, so a pool keeps it here, for its most
recent FUNCTION_CACHE_SIZE functions:

    pickled functions   submit()/apply_async() pickle a function once, not once per call
    chunk sizers        calls of one function share what was measured of it (chunking.py)
    shared Jobs         submit()/apply_async() calls of a function without options share one
    run times           ... and with a relative timeout, the run times its median is of
    open limits         a named machine-wide Limit is opened once per pool, by name

Every value this module reads of a call was validated by call_options.py.
"""

from __future__ import annotations

import functools
import threading
import types
import weakref
from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Any, Callable, Generic, Hashable, Mapping, TypeVar

from .admission import ConcurrencyGate, Gate, RateGateAdapter, SemaphoreGate
from .call_options import NO_CALL, ParsedCall, parse_timeout
from .chunking import ChunkSizer
from .config import PoolConfig
from .limits.keyed import KeyedLimit
from .protocol import CallKind, NotCallable, pickled_function
from .tasks import RECENT_DURATIONS, Job, OutcomeSink, Task, new_id

if TYPE_CHECKING:  # a call's named Limit: see limits/__init__
    from .limits import Limit, LimitHandle

FUNCTION_CACHE_SIZE = 256  # functions whose pickled form, sizer and template a pool keeps

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class _Recent(Generic[K, V]):
    """The FUNCTION_CACHE_SIZE most recently used entries: a program that makes functions
    on the fly (a lambda per call) keeps a bounded cache.  Not locked: JobMaker's lock is."""

    def __init__(self) -> None:
        self._entries: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> V:
        self._entries[key] = value
        while len(self._entries) > FUNCTION_CACHE_SIZE:
            self._entries.popitem(last=False)
        return value

    def peek(self, key: K) -> V | None:
        return self._entries.get(key)

    def discard(self, key: K) -> None:
        self._entries.pop(key, None)


class _Kept:
    """A strong reference called as a weak one is: for callables that take no weak reference
    (builtins), which live as long as their module anyway."""

    __slots__ = ("_obj",)

    def __init__(self, obj: Any) -> None:
        self._obj = obj

    def __call__(self) -> Any:
        return self._obj


def _reference(func: Any, on_gone: Callable[[Any], object] | None = None
               ) -> Callable[[], Any]:
    try:
        return weakref.ref(func, on_gone)
    except TypeError:
        return _Kept(func)


class _ByFunction(Generic[V]):
    """What a pool keeps for its most recent functions, by identity, without keeping them
    alive: a bound method holds its object, which the program expects freed once its calls
    are over, as ProcessPoolExecutor and multiprocessing free it (CPython's futures tests,
    test_no_stale_references); a closure per call would keep what it closes over.  An entry
    goes when its function does.  Not locked: JobMaker's lock is."""

    def __init__(self) -> None:
        self._recent: _Recent[int, tuple[Callable[[], Any], V]] = _Recent()
        # ids of functions collected: appended by weakref callbacks (in whatever thread the
        # collection ran, maybe holding JobMaker's lock), so read only by get() and put()
        self._gone: list[int] = []

    def get(self, func: Any) -> V | None:
        self._drop_gone()
        hit = self._recent.get(id(func))
        return hit[1] if hit is not None and hit[0]() is func else None

    def put(self, func: Any, value: V) -> None:
        self._drop_gone()
        key, gone = id(func), self._gone

        def on_gone(_: Any) -> None:
            gone.append(key)
        self._recent.put(key, (_reference(func, on_gone), value))

    def _drop_gone(self) -> None:
        while self._gone:
            key = self._gone.pop()
            entry = self._recent.peek(key)
            if entry is not None and entry[0]() is None:  # not a new function of that id
                self._recent.discard(key)


class JobMaker:
    """Makes the Jobs of one pool's calls (any thread)."""

    def __init__(self, config: PoolConfig, queue_gates: Mapping[str, tuple[Gate, ...]]) -> None:
        self._config = config
        self._queue_gates = dict(queue_gates)  # the pool's named queues, by name
        self._default_timeout = parse_timeout(config.timeout_s)  # (seconds, factor)
        self._lock = threading.Lock()
        # Keyed by id(function), with the function kept: an id reused by another function
        # after the first was collected is never a hit.
        self._functions: _ByFunction[tuple[int, bytes]] = _ByFunction()
        # The Job that the option-less submit() calls of a function share, and the last used
        self._shared: _ByFunction[Job] = _ByFunction()
        self._last_shared: tuple[Callable[[], Any], Job] | None = None
        self._sizers: _Recent[int, ChunkSizer] = _Recent()  # by fn_id (the pickle's hash)
        self._durations: _ByFunction[deque[float]] = _ByFunction()  # see _durations_of
        self._limits: dict[str, LimitHandle] = {}  # named machine-wide limits, by name

    def job(self, func: Callable[..., Any], kind: CallKind, sink: OutcomeSink,
            call: ParsedCall, *, cache: bool = False, timed_inputs: bool = True,
            single_task: bool = False) -> Job:
        """The Job of one call of `func`; `cache`: keep its pickled form for the next call.
        timed_inputs=False: only the total run time reaches the sink (map, imap)."""
        if not callable(func):
            func = NotCallable(type(func).__name__)
        fn_id, payload = self._pickled_function(func, cache)
        fixed = self.fixed_chunksize(call)
        if call.options.rate_limited or self._config.rate is not None or call.halt is not None:
            # a rate counts starts, a halt stops starts: a batch must not start early ones
            fixed = fixed or 1
        sizer = self._sizer(fn_id, fixed)  # a fixed chunksize lives in it, which answers it
        options = call.options
        keyed: KeyedLimit[Any] | None = None
        if options.key is not None:
            keyed = KeyedLimit(options.key_concurrency or 1)
        timeout_s, factor = ((call.timeout_s, call.timeout_factor) if call.sets_timeout
                             else self._default_timeout)
        job = Job(new_id(), fn_id, payload, kind, sink, timeout_s=timeout_s, sizer=sizer,
                  gates=self._gates(call), keyed=keyed, key_fn=options.key,
                  timeout_factor=factor, halt=call.halt, single_task=single_task,
                  timed_inputs=timed_inputs)
        if single_task and factor is not None:
            # A call of one task never has a median of its own: a relative timeout of
            # submit()/apply_async() is of the median of its function's tasks so far
            job.durations = self._durations_of(func)
        return job

    def single_task_job(self, func: Callable[..., Any], sink: OutcomeSink,
                        call: ParsedCall) -> Job:
        """The Job of a submit() or apply_async() call, whose Task is then made with the
        call's `sink` (Task(sink=)).  Programs submit many thousands of these: without
        per-call options, the calls of one function share one Job, made at the first one
        (what job() works out depends on the function and the pool only), unless per-call
        state of a Job would show (see _shareable)."""
        same = _pickles_the_same(func)
        if call is not NO_CALL or not same:
            return self.job(func, CallKind.ARGS_KWARGS, sink, call, cache=same,
                            single_task=True)
        last = self._last_shared  # lock-free: one function submitted in a loop
        if last is not None and last[0]() is func:
            return last[1]
        with self._lock:
            hit = self._shared.get(func)
        if hit is not None:
            self._last_shared = (_reference(func), hit)
            return hit
        job = self.job(func, CallKind.ARGS_KWARGS, _NO_SINK, call, cache=True,
                       single_task=True)
        if not self._shareable(job):
            job.sink = sink
            return job
        with self._lock:
            self._shared.put(func, job)
        self._last_shared = (_reference(func), job)
        return job

    def forget_shared_jobs(self) -> int:
        """The Jobs made so far are being cancelled (a Ctrl-C: Pool._on_keyboard_interrupt):
        later calls get new ones, which nothing cancelled.  Returns an id no Job made so far
        exceeds, and every later one does."""
        with self._lock:
            self._shared = _ByFunction()
            self._last_shared = None
            return new_id()

    def _shareable(self, job: Job) -> bool:
        """Whether calls may share `job`: nothing of it is per call but its tally, which only
        a halt policy (none without options) and a relative timeout (the median of the
        call's own run times) read, and its id, which only events show (TaskEvent.job)."""
        return job.timeout_factor is None and job.halt is None \
            and self._config.on_event is None

    def _gates(self, call: ParsedCall) -> tuple[Gate, ...]:
        """The admission gates of a call: its own concurrency, its queue's, its Limit's."""
        options = call.options
        gates: list[Gate] = []
        if options.concurrency is not None:
            gates.append(ConcurrencyGate(options.concurrency))
        if options.queue is not None:
            if options.queue not in self._queue_gates:
                raise ValueError(f"unknown queue {options.queue!r}; this pool has "
                                 f"{sorted(self._queue_gates) or 'no named queues'}")
            gates.extend(self._queue_gates[options.queue])
        if options.limit is not None:
            gates.extend(self._limit_gates(options.limit))
        return tuple(gates)

    def _limit_gates(self, limit: Limit) -> tuple[Gate, ...]:
        """A named machine-wide limit, opened once per pool."""
        with self._lock:
            handle = self._limits.get(limit.name)
            if handle is None:
                handle = self._limits[limit.name] = limit.open()
            elif handle.limit != limit:
                raise ValueError(f"limit {limit.name!r} is already open in this pool as "
                                 f"{handle.limit}, not {limit}")
        gates: list[Gate] = []
        if handle.semaphore is not None:
            gates.append(SemaphoreGate(handle.semaphore))
        if handle.rate_gate is not None:
            gates.append(RateGateAdapter(handle.rate_gate))
        return tuple(gates)

    def fixed_chunksize(self, call: ParsedCall) -> int | None:
        """The call's chunksize, or the pool's (None: batches sized from measured times)."""
        return call.chunksize or self._config.chunksize

    def _sizer(self, fn_id: int, fixed: int | None) -> ChunkSizer:
        """Calls of one function share what was measured of it (adaptive chunking), unless
        the call fixes its chunksize."""
        if fixed is not None:
            return ChunkSizer(self._config.processes, fixed)
        with self._lock:
            sizer = self._sizers.get(fn_id)
            if sizer is None:
                sizer = self._sizers.put(fn_id, ChunkSizer(self._config.processes))
            return sizer

    def _durations_of(self, func: Any) -> "deque[float]":
        """The recent run times of a function's single-task calls (added to by the
        supervisor's thread only: Job.note_durations): of the code that runs, whatever the
        state a call carries (a partial's arguments, a callable object's attributes)."""
        code = _code_of(func)
        with self._lock:
            durations = self._durations.get(code)
            if durations is None:
                durations = deque(maxlen=RECENT_DURATIONS)
                self._durations.put(code, durations)
            return durations

    def _pickled_function(self, func: Callable[..., Any], cache: bool) -> tuple[int, bytes]:
        """cloudpickle the function (lambdas, closures, __main__ functions all work).  Its id
        is a hash of the bytes, so workers unpickle each distinct function once."""
        if cache:
            with self._lock:
                hit = self._functions.get(func)
            if hit is not None:
                return hit
        pickled = pickled_function(func)
        if cache:
            with self._lock:
                self._functions.put(func, pickled)
        return pickled


# Functions and builtins: code, whose pickle carries no state that a call could change
_PLAIN_FUNCTIONS = (types.FunctionType, types.BuiltinFunctionType)


def _code_of(func: Any) -> Any:
    """The function that runs when `func` is called: a partial's, a bound method's, a callable
    object's class (whose __call__ runs)."""
    while isinstance(func, functools.partial):
        func = func.func
    if isinstance(func, types.MethodType):
        return func.__func__
    if isinstance(func, (*_PLAIN_FUNCTIONS, type)):
        return func
    return type(func)


def _pickles_the_same(func: Any) -> bool:
    """Whether `func` pickles the same every time, so that one pickle serves all its calls: a
    function or a builtin.  An object whose state its pickle carries (a callable instance, a
    functools.partial, a bound method held in a variable) is pickled with each call, as
    multiprocessing pickles it with each task: a change between two calls reaches the second."""
    return isinstance(func, _PLAIN_FUNCTIONS)


class _NoSink(OutcomeSink):
    """The sink of a Job that calls share (JobMaker.single_task_job): never fed, as each
    of its tasks carries its own call's sink."""

    def starting(self, task: Task) -> bool:
        raise AssertionError("a shared job's tasks have sinks of their own")

    def deliver(self, task: Task, ok: bool, value: Any) -> None:
        raise AssertionError("a shared job's tasks have sinks of their own")


_NO_SINK = _NoSink()
