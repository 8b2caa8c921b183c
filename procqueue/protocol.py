"""The wire between the supervisor and one worker: named, typed messages over one duplex pipe.

One pipe per worker (never a queue shared by workers), so a worker killed mid-read or mid-write
can only break its own channel, and the supervisor always knows which tasks that worker held.

    supervisor                                   worker
        |  <--------------------- Ready(pid)  ---- |   after pinning and the initializer
        |  <------------- InitFailed(error)   ---- |   (or this, then the worker exits)
        |  ---- RunTasks(batch_id, fn, items) ---> |   fn's bytes only when new to this worker
        |                                          |   for each item: slot_state[CURRENT] = task id
        |  <---- BatchResults(partial ...)  ------ |   every report_s while a batch runs
        |  <---- BatchResults(final=True) -------- |
        |  ---- RunBlock(block id, inputs) ------> |   a Block: its inputs in one pickle
        |  <---- BlockResults(first, values ...) -- |   partial every report_s, then final
        |  ---- LoadFunction(batch_id, fn) ------> |   a gated call's warm-up: load fn, no task
        |  <---- BatchResults(final=True) -------- |   (empty)
        |  ---- Stop() ----------------------------> |   the worker exits 0

"Which task is running right now" is not a message: the worker writes the task id and its start
time into a small shared array (Slot.state, laid out in worker.py), which costs nanoseconds per
task and lets the supervisor attribute a crash, or enforce a timeout, for one task inside a
batch.

Arguments and results are pickled per item with protocol 5 (so one unpicklable item fails only
its own task); functions are pickled with cloudpickle (lambdas, closures), a top-level function
of the program's script by reference to the worker's import of it (see _MainFunction).
"""

from __future__ import annotations

import copyreg
import enum
import io
import mmap
import os
import pickle
import reprlib
import sys
import threading
import traceback
import types
import weakref
from itertools import chain
from operator import attrgetter
from typing import Any, Callable, Union

from .errors import (RemoteError, ResultSerializationError, TaskFailed, argument_error,
                     remote_traceback)
from .records import FrozenRecord, Record

PICKLE_PROTOCOL = 5


class CallKind(enum.IntEnum):
    """How a task's payload is applied to its function."""

    ONE = 1  # fn(item)                      map, imap, submit with one positional arg
    STAR = 2  # fn(*item)                    starmap
    ARGS_KWARGS = 3  # fn(*args, **kwargs)   apply, submit


# The messages are not frozen records: a frozen __init__ sets each field through
# object.__setattr__, five times the cost of a plain one, on every message read.  Nothing
# changes a message after it is made.  Their `_fields` order is the order of the values on the
# wire (see _Codec) and of their __init__'s parameters.

class RunTasks(Record):
    """Run these tasks of one call in order; each gets its row in BatchResults."""

    __slots__ = ("batch_id", "fn_id", "fn_payload", "kind", "items", "report_s", "oob_task_ids")
    _fields = __slots__

    batch_id: int
    fn_id: int
    fn_payload: bytes | None  # cloudpickled function; None when this worker already has fn_id
    kind: CallKind
    items: tuple[tuple[int, bytes], ...]  # (task id, pickled payload)
    report_s: float  # send what is done at least this often while it runs (ChunkSizer)
    oob_task_ids: tuple[int, ...]  # tasks whose big buffers follow as file descriptors

    def __init__(self, batch_id: int, fn_id: int, fn_payload: bytes | None, kind: CallKind,
                 items: tuple[tuple[int, bytes], ...], report_s: float,
                 oob_task_ids: tuple[int, ...] = ()) -> None:
        self.batch_id = batch_id
        self.fn_id = fn_id
        self.fn_payload = fn_payload
        self.kind = kind
        self.items = items
        self.report_s = report_s
        self.oob_task_ids = oob_task_ids


class RunBlock(Record):
    """Run a block's inputs in order (tasks.Block); they are reported by BlockResults."""

    __slots__ = ("batch_id", "fn_id", "fn_payload", "kind", "block_id", "inputs", "report_s",
                 "timed", "each_revocable")
    _fields = __slots__

    batch_id: int
    fn_id: int
    fn_payload: bytes | None  # as RunTasks
    kind: CallKind
    block_id: int
    inputs: bytes  # the pickled list of the block's (primitive) inputs
    report_s: float  # as RunTasks
    timed: bool  # report each input's run time, or (False) only their total
    # Each input is a task that may be cancelled alone (a batch of submit() calls sent as a
    # block): the revoked batch ids are looked at before each input, as RunTasks does.
    each_revocable: bool

    def __init__(self, batch_id: int, fn_id: int, fn_payload: bytes | None, kind: CallKind,
                 block_id: int, inputs: bytes, report_s: float, timed: bool = True,
                 each_revocable: bool = False) -> None:
        self.batch_id = batch_id
        self.fn_id = fn_id
        self.fn_payload = fn_payload
        self.kind = kind
        self.block_id = block_id
        self.inputs = inputs
        self.report_s = report_s
        self.timed = timed
        self.each_revocable = each_revocable


class LoadFunction(Record):
    """Load a call's function before its tasks come (a gated call's warm-up, see
    Dispatcher._warm_up); answered by an empty final BatchResults of batch_id."""

    __slots__ = ("batch_id", "fn_id", "fn_payload", "kind")
    _fields = __slots__

    batch_id: int
    fn_id: int
    fn_payload: bytes
    kind: CallKind

    def __init__(self, batch_id: int, fn_id: int, fn_payload: bytes, kind: CallKind) -> None:
        self.batch_id = batch_id
        self.fn_id = fn_id
        self.fn_payload = fn_payload
        self.kind = kind


class Stop(Record):
    """The worker's last message: it exits (0) after the messages sent before it."""

    __slots__ = ()
    _fields = __slots__

    def __init__(self) -> None:
        pass


class Ready(Record):
    """The worker started and ran its initializer."""

    __slots__ = ("pid",)
    _fields = __slots__

    pid: int

    def __init__(self, pid: int) -> None:
        self.pid = pid


class InitFailed(Record):
    """The worker's initializer raised; the worker exits."""

    # __match_args__ as Record sets it, spelled out for mypy: it checks `case InitFailed(error):`
    # (supervisor.py) with it, and does not see __init_subclass__
    __slots__ = _fields = __match_args__ = ("error",)

    error: bytes  # pickled ErrorInfo

    def __init__(self, error: bytes) -> None:
        self.error = error


class BatchResults(Record):
    """Results of some items of one batch, column by column (lists of primitives pickle far
    faster than one object per item).  Entry i of each list belongs to task_ids[i]."""

    __slots__ = ("batch_id", "task_ids", "ok", "payloads", "seconds", "started", "final",
                 "rss_bytes", "skipped", "released")
    _fields = __slots__

    batch_id: int
    task_ids: list[int]
    ok: list[bool]
    payloads: list[bytes]  # pickled result if ok, else pickled ErrorInfo
    seconds: list[float]  # run time of each item in the worker
    started: list[float]  # time.monotonic() when each item started (one clock machine-wide)
    final: bool  # True: the batch is complete, the worker is idle or on its next batch
    rss_bytes: int  # the worker's resident memory when it sent this (worker recycling)
    skipped: list[int]  # not started: their batch was revoked
    # tasks whose out-of-band argument this worker no longer maps (see MemfdPool)
    released: list[int]

    def __init__(self, batch_id: int, task_ids: list[int], ok: list[bool], payloads: list[bytes],
                 seconds: list[float], started: list[float], final: bool, rss_bytes: int = 0,
                 skipped: list[int] | None = None, released: list[int] | None = None) -> None:
        self.batch_id = batch_id
        self.task_ids = task_ids
        self.ok = ok
        self.payloads = payloads
        self.seconds = seconds
        self.started = started
        self.final = final
        self.rss_bytes = rss_bytes
        # None: a new list for each message, never one list shared by all as a default
        self.skipped = [] if skipped is None else skipped
        self.released = [] if released is None else released

    def __len__(self) -> int:
        return len(self.task_ids)

    @property
    def busy_s(self) -> float:
        return sum(self.seconds)


class BlockResults(Record):
    """Results of consecutive inputs of a block, from position `first` on.  The values are
    one pickle of the list when they are plain data (see dumps_plain_data: it always
    unpickles), else one pickle per value, so a value the caller cannot unpickle fails only
    its input."""

    __slots__ = ("batch_id", "first", "values", "errors", "count", "seconds", "busy_s", "final",
                 "rss_bytes", "skipped")
    _fields = __slots__

    batch_id: int
    first: int  # position in the block of the first input reported here
    values: bytes | list[bytes | None]  # None (or a None in the list) where the input failed
    errors: dict[int, bytes]  # position -> pickled ErrorInfo
    count: int  # inputs reported here
    seconds: list[float] | None  # run time of each, where the batch was `timed`
    busy_s: float  # their run time in all
    final: bool
    rss_bytes: int
    skipped: int  # the batch was revoked: inputs from this position on never started

    def __init__(self, batch_id: int, first: int, values: bytes | list[bytes | None],
                 errors: dict[int, bytes], count: int, seconds: list[float] | None,
                 busy_s: float, final: bool, rss_bytes: int = 0, skipped: int = -1) -> None:
        self.batch_id = batch_id
        self.first = first
        self.values = values
        self.errors = errors
        self.count = count
        self.seconds = seconds
        self.busy_s = busy_s
        self.final = final
        self.rss_bytes = rss_bytes
        self.skipped = skipped

    def __len__(self) -> int:
        return self.count

    def seconds_of(self, i: int) -> float:
        """The run time of the i-th input reported here; 0.0 where the batch was untimed."""
        return 0.0 if self.seconds is None else self.seconds[i]

    def seconds_between(self, i: int, j: int) -> list[float] | None:
        return None if self.seconds is None else self.seconds[i:j]


ToWorker = Union[RunTasks, RunBlock, LoadFunction, Stop]
CallsFunction = Union[RunTasks, RunBlock, LoadFunction]  # messages that carry a function
FromWorker = Union[Ready, InitFailed, BatchResults, BlockResults]


# ---- the messages' encoding ----------------------------------------------------------------
#
# A message travels as (tag, its field values), its CallKind as a plain int.  Pickling the
# message object itself named its class (a global: ~4 us each way) and the CallKind enum (~10 us
# each way) and walked its fields in __getstate__: 10-20 us per message each way, against 2-4
# us for the tuple, and every batch pays it four times (two messages, each both ways).

class _Codec:
    __slots__ = ("tag", "cls", "values", "kind_at")

    def __init__(self, tag: int, cls: type[Record]) -> None:
        names = list(cls._fields)
        self.tag = tag
        self.cls = cls
        self.values: Callable[[Any], tuple[Any, ...]] = (
            attrgetter(*names) if len(names) > 1
            else (lambda message: tuple(getattr(message, n) for n in names)))
        self.kind_at = names.index("kind") if "kind" in names else -1


_CODECS = tuple(_Codec(tag, cls) for tag, cls in enumerate(
    (RunTasks, RunBlock, LoadFunction, Stop, Ready, InitFailed, BatchResults, BlockResults)))
_CODEC_OF = {codec.cls: codec for codec in _CODECS}
_KINDS = {int(kind): kind for kind in CallKind}


def dumps_message(message: ToWorker | FromWorker) -> bytes:
    codec = _CODEC_OF[type(message)]
    values = codec.values(message)
    k = codec.kind_at
    if k >= 0:
        values = values[:k] + (int(values[k]),) + values[k + 1:]
    return pickle.dumps((codec.tag, values), PICKLE_PROTOCOL)


def loads_message(data: bytes) -> Any:
    """The message dumps_message made (typed Any: the reader matches on its class)."""
    tag, values = pickle.loads(data)
    codec = _CODECS[tag]
    k = codec.kind_at
    if k >= 0:
        values = values[:k] + (_KINDS[values[k]],) + values[k + 1:]
    return codec.cls(*values)


# Compared and hashed by identity (eq=False), as it always was: nothing compares or hashes one.
class ErrorInfo(FrozenRecord, eq=False):
    """An exception on its way back from a worker, as plain data the caller can always read:
    the exception's own pickle (a RemoteError's when it does not survive a round trip in the
    worker), read apart, because its class may not be importable in the caller (a class of a
    script that only the workers import); and its type name, message and traceback text, from
    which the caller makes a RemoteError when that pickle does not load there."""

    __slots__ = ("exception", "type_name", "message", "traceback_text")
    _fields = __slots__

    exception: bytes
    type_name: str
    message: str
    traceback_text: str

    def __init__(self, exception: bytes, type_name: str, message: str,
                 traceback_text: str) -> None:
        set_ = object.__setattr__  # frozen: FrozenRecord's __setattr__ refuses
        set_(self, "exception", exception)
        set_(self, "type_name", type_name)
        set_(self, "message", message)
        set_(self, "traceback_text", traceback_text)


# Values of these exact types pickle and unpickle anywhere, cannot be mutated behind our back
# and are cheap to copy: a Block carries only such inputs, and such results travel in one pickle.
SCRIPT_MODULE_PREFIX = "_procqueue_script_"  # stored_call imports scripts under this name

PRIMITIVE_TYPES = frozenset({int, float, bool, str, bytes, complex, type(None)})


def primitive(item: Any) -> bool:
    """An input a Block may carry: of a primitive type, or a tuple of such (starmap)."""
    kind = type(item)
    if kind in PRIMITIVE_TYPES:
        return True
    return kind is tuple and all(type(part) in PRIMITIVE_TYPES for part in item)


def primitive_run(items: "list[Any] | tuple[Any, ...]") -> bool:
    """Whether every input is primitive (see primitive), checked at C speed: map's list of
    numbers or paths becomes Blocks without a Python step per input."""
    kinds = set(map(type, items))
    if kinds <= PRIMITIVE_TYPES:
        return True
    if kinds == {tuple}:  # starmap: the parts of each argument tuple
        return set(map(type, chain.from_iterable(items))) <= PRIMITIVE_TYPES
    return False


class _NeedsAClass(Exception):
    pass


class _PlainDataPickler(pickle.Pickler):
    """Pickles plain data only: builtin scalars and lists, tuples, dicts and sets of them,
    which unpickle anywhere.  Pickle's C code writes those without calling reducer_override;
    anything else reaches it and stops the pickling (complex is reduced to its type)."""

    def reducer_override(self, obj: Any) -> Any:
        if obj is complex or type(obj) is complex:
            return NotImplemented
        raise _NeedsAClass


def dumps_plain_data(obj: Any) -> bytes | None:
    """obj's pickle if it is plain data (see _PlainDataPickler), else None.  As fast as a
    plain dumps: no Python step per value, unlike a type check before it (~20 ns a value)."""
    out = io.BytesIO()
    try:
        _PlainDataPickler(out, PICKLE_PROTOCOL).dump(obj)
    except _NeedsAClass:
        return None
    except RecursionError:
        return None  # too deep for one pickle: each value on its own (and its own error)
    return out.getvalue()


def apply_call(fn: Callable[..., Any], kind: CallKind, arg: Any) -> Any:
    """Call fn on one task's payload, as its kind says."""
    if kind is CallKind.ONE:
        return fn(arg)
    if kind is CallKind.STAR:
        return fn(*arg)
    args, kwargs = arg
    return fn(*args, **kwargs)


INPUT_REPR_MAX_CHARS = 200  # an input as named in an error message, at most
_PLAIN_REPR = (int, float, bool, type(None))
_REPRS: dict[int, reprlib.Repr] = {}  # by max_chars; each used as is by several threads


def short_repr(value: Any, max_chars: int = INPUT_REPR_MAX_CHARS) -> str:
    """A bounded repr of an input that never raises and never walks a whole big container."""
    bounded = _REPRS.get(max_chars)
    if bounded is None:
        bounded = reprlib.Repr()
        bounded.maxstring = bounded.maxother = max_chars
        bounded.maxlist = bounded.maxtuple = bounded.maxdict = bounded.maxset = 20
        bounded = _REPRS.setdefault(max_chars, bounded)
    try:
        text = repr(value) if isinstance(value, _PLAIN_REPR) else bounded.repr(value)
    except Exception as exc:
        text = f"<{type(value).__name__} whose repr raised {exc!r}>"
    return text if len(text) <= max_chars else text[:max_chars - 3] + "..."


def dumps(obj: Any) -> bytes:
    return pickle.dumps(obj, PICKLE_PROTOCOL)


# pickle's own, not a function calling it: one Python call less for each result read
loads: Callable[[bytes], Any] = pickle.loads


def dumps_function(fn: Any) -> bytes:
    """Pickle a task function (or an (initializer, initargs) pair) for the workers."""
    if isinstance(fn, tuple):
        fn = tuple(_main_function_by_reference(part) for part in fn)
    else:
        fn = _main_function_by_reference(fn)
    named = _pickled_by_reference(fn)
    if named is not None:
        return named
    # imported lazily: workers unpickle cloudpickle output without it loaded first
    import cloudpickle

    try:
        return bytes(cloudpickle.dumps(fn, PICKLE_PROTOCOL))
    except Exception:
        # cloudpickle copies what `__main__` defines by value, a class with all its
        # attributes: one that holds a lock or a pool (a test case's class holding its pool,
        # whose method is the task) cannot be copied.  Plain pickle names it instead, as
        # multiprocessing.Pool does, and the workers find it in their import of the script.
        try:
            return pickle.dumps(fn, PICKLE_PROTOCOL)
        except Exception:
            pass
        raise


def _pickled_by_reference(fn: Any) -> bytes | None:
    """Plain pickle's bytes for `fn` when they are exactly cloudpickle's, else None.

    cloudpickle names importable functions and classes by reference, as pickle does (the same
    bytes); it copies by value only what pickle cannot name (lambdas, closures, classes made at
    run time: pickle refuses those), what `__main__` defines, and modules registered with
    register_pickle_by_value.  A module-level function, a builtin or the command line's
    script function thus skip importing cloudpickle in the program: ~10 ms of a cold pool's
    first call (it loads uuid, platform, hashlib)."""
    parts = fn if isinstance(fn, tuple) else (fn,)
    if any(isinstance(part, _MainFunction) for part in parts):
        return None  # its copy by value is cloudpickle's
    loaded = sys.modules.get("cloudpickle")
    if loaded is not None and loaded.list_registry_pickle_by_value():
        return None
    try:
        payload = pickle.dumps(fn, PICKLE_PROTOCOL)
    except Exception:
        return None
    # Something of `__main__` named by reference (an instance of a class the script defines):
    # cloudpickle would copy its class by value.  The name in the bytes can only be a
    # reference or a string: either way cloudpickle decides, as before.
    return None if b"__main__" in payload else payload


class InitializerCall:
    """A pool's initializer and its arguments, on their way to each worker as an argument of
    its Process: pickled with cloudpickle when the pool is made (lambdas, functions of the
    script); or, for initargs multiprocessing shares only by inheritance (its Lock, Value,
    Queue...), the initializer pickled and the initargs left to the process start, whose
    pickler takes those made from its context; or, for fork workers, nothing pickled: they
    inherit whatever the initargs are, as with multiprocessing.Pool on Linux."""

    __slots__ = ("function", "args")

    def __init__(self, function: Any, args: tuple[Any, ...] | None) -> None:
        self.function = function  # bytes: cloudpickled (function, args) if args is None, else
        self.args = args          # the cloudpickled function; or the function itself (fork)

    @classmethod
    def pickled(cls, initializer: Callable[..., object], initargs: tuple[Any, ...]
                ) -> "InitializerCall":
        return cls(dumps_function((initializer, initargs)), None)

    @classmethod
    def args_at_process_start(cls, initializer: Callable[..., object],
                              initargs: tuple[Any, ...]) -> "InitializerCall":
        return cls(dumps_function(initializer), initargs)

    @classmethod
    def inherited(cls, initializer: Callable[..., object], initargs: tuple[Any, ...]
                  ) -> "InitializerCall":
        return cls(initializer, initargs)

    def __call__(self) -> None:
        function, args = self.function, self.args
        if isinstance(function, bytes):
            function = loads(function)
            if args is None:
                function, args = function
        function(*(args or ()))


def shared_only_by_inheritance(error: BaseException) -> bool:
    """multiprocessing's refusal to pickle its Lock, Value, Queue... outside a process start."""
    return isinstance(error, RuntimeError) and "through inheritance" in str(error)


class NotCallable:
    """What runs in the workers in place of a call's function that is not callable: each of
    its inputs fails with the TypeError calling it raises, as multiprocessing.Pool finds out
    in its workers (map() raises it, map_async() gives it to error_callback, each of imap()'s
    next() raises it, and a call with no input has no error)."""

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name

    @classmethod
    def error_of(cls, func: object) -> TypeError:
        """The TypeError calling `func` raises: what apply_async() and submit() report
        through their result or future, as multiprocessing and ProcessPoolExecutor do,
        rather than raising it at the call."""
        return cls(type(func).__name__).error()

    def error(self) -> TypeError:
        return TypeError(f"{self.type_name!r} object is not callable")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise self.error()


def pickled_function(func: Any) -> tuple[int, bytes]:
    """The function's id (a hash of its pickle, so a worker unpickles each distinct function
    once) and its pickle; a function that cannot be pickled is an ArgumentSerializationError."""
    try:
        payload = dumps_function(func)
    except Exception as exc:
        raise argument_error(
            f"the function {getattr(func, '__qualname__', func)!r} cannot be pickled: "
            f"{exc!r}; make sure it and everything it refers to are picklable", exc) from exc
    fn_id = int.from_bytes(_blake2b(payload, digest_size=8).digest(), "little") >> 1
    return fn_id, payload


def _blake2b(data: bytes, digest_size: int) -> Any:
    """hashlib.blake2b, which is _blake2's: imported from there, the program does not load
    hashlib and OpenSSL with it (~3 ms of a cold pool's first call); workers never need it."""
    try:
        from _blake2 import blake2b
    except ImportError:  # an interpreter built without it: hashlib has one then
        from hashlib import blake2b
    return blake2b(data, digest_size=digest_size)


class _MainFunction:
    """A top-level function of the program's script (`__main__`), sent by reference with a
    copy by value to fall back on.

    A worker imports the script as `__mp_main__` (multiprocessing's spawn preparation), so the
    reference finds the worker's own module function, whose globals are that module's: an
    initializer that sets a global and the tasks that read it see one namespace, as with
    multiprocessing.Pool.  Sent by value only (cloudpickle's way for `__main__`), each function
    would get its own copy of the globals and the tasks would never see what the initializer
    set.  A program with no script file (`python -c`, Jupyter) gets fork workers (see
    fork_server.default_start_method), copies of its `__main__` where the reference resolves
    too.  The copy by value serves where the reference does not resolve: a function defined
    under `if __name__ == "__main__":`, a Dask worker."""

    __slots__ = ("fn",)

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def __reduce__(self) -> tuple[Any, ...]:
        import cloudpickle

        code = self.fn.__code__
        by_value = cloudpickle.dumps(self.fn, PICKLE_PROTOCOL)
        return (_main_function, (self.fn.__qualname__, code.co_filename, code.co_firstlineno,
                                 by_value))


def _main_function_by_reference(fn: Any) -> Any:
    main = sys.modules.get("__main__")
    if (isinstance(fn, types.FunctionType) and fn.__module__ == "__main__"
            and getattr(main, fn.__qualname__, None) is fn):
        return _MainFunction(fn)
    return fn


def _main_function(qualname: str, filename: str, firstlineno: int, by_value: bytes) -> Any:
    """Unpickles a _MainFunction: this process's `__main__` function of that name if it is the
    same source (file and line), else the copy by value."""
    fn = getattr(sys.modules.get("__main__"), qualname, None)
    code = getattr(fn, "__code__", None)
    if code is not None and code.co_firstlineno == firstlineno and _same_file(
            code.co_filename, filename):
        return fn
    return pickle.loads(by_value)


def _same_file(a: str, b: str) -> bool:
    try:
        return a == b or os.path.samefile(a, b)
    except OSError:
        return False


class OutOfBand:
    """A pickled argument whose large buffers (numpy arrays and other PickleBuffer
    producers) live in a memfd instead of the pickle: the caller copies them once, the worker
    receives the descriptor over its pipe (SCM_RIGHTS) and maps it, copy-on-write.  A memfd
    has no name, so nothing can leak into /dev/shm whoever dies; the caller keeps its
    descriptor until the task's final outcome (a retry sends it again), then hands it to a
    MemfdPool for the next argument of its size, or closes it."""

    __slots__ = ("wire", "fd", "size", "nbytes", "on_close", "memfds", "lent", "final",
                 "waiting")

    def __init__(self, inband: bytes, sizes: tuple[int, ...], fd: int,
                 memfds: "MemfdPool | None" = None) -> None:
        self.wire = OOB_MARKER + pickle.dumps((inband, sizes), PICKLE_PROTOCOL)
        self.fd = fd
        self.nbytes = sum(sizes)  # the memfd's
        self.size = len(inband) + self.nbytes  # bytes of the argument, in band and out
        self.on_close: Callable[[int], None] | None = None  # told the size, once
        self.memfds = memfds  # where the memfd goes back for reuse, if anywhere
        self.lent = 0  # workers sent the memfd that have not reported it unmapped yet
        self.final = False  # the task has its final outcome: no more sends
        self.waiting = False  # final, kept open until the workers unmap it (MemfdPool.wait)

    def __len__(self) -> int:
        return len(self.wire)  # what travels in the pipe

    def finish(self) -> None:
        """The task has its final outcome: the memfd goes back for reuse once no worker maps
        it any more (at once if none does), else it is closed."""
        self._end()
        if self.lent == 0:
            self._dispose(reuse=True)
        elif self.memfds is not None and self.memfds.wait():
            self.waiting = True
        else:  # too many wait already (tasks that keep their arguments): close it now
            self._dispose(reuse=False)

    def returned(self) -> None:
        """A worker this memfd was sent to has unmapped it (or exited)."""
        self.lent -= 1
        if self.final and self.lent == 0:
            self._dispose(reuse=True)

    def close(self) -> None:
        """Close the memfd now, not for reuse (a worker's mapping of it stays valid)."""
        self._end()
        self._dispose(reuse=False)

    def _end(self) -> None:
        self.final = True
        on_close, self.on_close = self.on_close, None
        if on_close is not None:
            on_close(self.size)

    def _dispose(self, reuse: bool) -> None:
        fd, self.fd = self.fd, -1
        if fd < 0:
            return
        memfds = self.memfds
        if memfds is not None and self.waiting:
            self.waiting = False
            memfds.waited()
        if not reuse or memfds is None or not memfds.give(fd, self.nbytes):
            os.close(fd)


class MemfdPool:
    """Memfds of finished tasks' arguments, for the next arguments of the same size.

    Copying a buffer into a fresh memfd costs ~5x copying it into one whose pages exist
    (the kernel allocates and zeroes each page, and frees them at close): 0.4 ms against
    0.08 ms per MiB here.  A memfd is reused only once its task is final and every worker
    it was sent to has said it no longer maps it (the worker tells when the mapping is
    garbage collected; a worker that exits maps nothing): rewriting pages a worker still
    maps, even privately, would change its argument under it.  Used by the caller's thread
    (take) and the supervisor's (give)."""

    def __init__(self, max_bytes: int, max_waiting: int = 256) -> None:
        self.max_bytes = max_bytes
        self.max_waiting = max_waiting  # finished memfds held open until unmapped: fds
        self.waiting = 0
        self.reused = 0
        self._free: dict[int, list[int]] = {}  # size -> memfds of exactly that size
        self._bytes = 0
        self._closed = False
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> int | None:
        with self._lock:
            fds = self._free.get(nbytes)
            if not fds:
                return None
            self._bytes -= nbytes
            self.reused += 1
            fd = fds.pop()
            if not fds:
                del self._free[nbytes]
            return fd

    def wait(self) -> bool:
        """May one more finished memfd stay open until its workers unmap it?"""
        with self._lock:
            if self._closed or self.waiting >= self.max_waiting:
                return False
            self.waiting += 1
            return True

    def waited(self) -> None:
        with self._lock:
            self.waiting -= 1

    def give(self, fd: int, nbytes: int) -> bool:
        """Keep `fd` for reuse (True), or not: the caller closes it (False)."""
        with self._lock:
            if self._closed or self._bytes + nbytes > self.max_bytes:
                return False
            self._free.setdefault(nbytes, []).append(fd)
            self._bytes += nbytes
            return True

    def close(self) -> None:
        with self._lock:
            self._closed = True
            fds = [fd for group in self._free.values() for fd in group]
            self._free.clear()
            self._bytes = 0
        for fd in fds:
            os.close(fd)


OOB_MARKER = b"\x00procqueue-oob\x00"
OOB_MIN_BYTES = 256 * 1024  # smaller buffers ride inside the pickle: a memfd costs syscalls


def dumps_argument(obj: Any, memfds: MemfdPool | None = None) -> bytes | OutOfBand:
    """Pickle a task argument: plain pickle first (fast), cloudpickle for lambdas and the like;
    big contiguous buffers out of band (see OutOfBand).  Raises the pickling error if neither
    pickler can."""
    buffers: list[pickle.PickleBuffer] = []
    try:
        inband = pickle.dumps(obj, PICKLE_PROTOCOL, buffer_callback=buffers.append)
    except (pickle.PicklingError, TypeError, AttributeError):
        import cloudpickle

        return bytes(cloudpickle.dumps(obj, PICKLE_PROTOCOL))
    if not buffers:
        return inband
    try:
        raws = [b.raw() for b in buffers]
    except BufferError:  # not contiguous: let pickle copy it in band
        return pickle.dumps(obj, PICKLE_PROTOCOL)
    total = sum(r.nbytes for r in raws)
    if total < OOB_MIN_BYTES or not hasattr(os, "memfd_create"):
        return pickle.dumps(obj, PICKLE_PROTOCOL)
    return OutOfBand(inband, tuple(r.nbytes for r in raws), _memfd_with(raws, total, memfds),
                     memfds)


def _memfd_with(raws: list[memoryview], total: int, memfds: MemfdPool | None) -> int:
    """A memfd holding the buffers back to back: a reused one of that size, or a new one.
    Written with pwrite, not through a mapping: the kernel allocates the pages in the write
    path (2x faster than faulting them in), and the GIL is released while it copies."""
    fd = memfds.take(total) if memfds is not None else None
    if fd is None:
        fd = os.memfd_create("procqueue-argument", os.MFD_CLOEXEC)
    try:
        offset = 0
        for raw in raws:
            view = raw.cast("B") if raw.format != "B" or raw.ndim != 1 else raw
            done = 0
            while done < view.nbytes:  # pwrite may write less than asked (2 GiB cap)
                done += os.pwrite(fd, view[done:], offset + done)
            offset += view.nbytes
    except BaseException:
        os.close(fd)
        raise
    return fd


UNMAPPED: list[int] = []  # worker side: tasks whose argument is no longer mapped here


def loads_argument(payload: bytes, fds: dict[int, int], task_id: int) -> Any:
    """The worker's side of dumps_argument."""
    if not payload.startswith(OOB_MARKER):
        return pickle.loads(payload)
    inband, sizes = pickle.loads(payload[len(OOB_MARKER):])
    fd = fds.pop(task_id)
    try:
        # Private and writable: the task may modify its array without touching the caller's.
        mapped = mmap.mmap(fd, sum(sizes), flags=mmap.MAP_PRIVATE,
                           prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        UNMAPPED.append(task_id)
        raise
    finally:
        os.close(fd)
    # When the last view of the mapping is gone (the argument, and anything the task kept
    # of it), the supervisor may reuse the memfd: see MemfdPool.
    weakref.finalize(mapped, UNMAPPED.append, task_id).atexit = False
    views, offset = [], 0
    whole = memoryview(mapped)
    for size in sizes:
        views.append(whole[offset:offset + size])
        offset += size
    return pickle.loads(inband, buffers=views)


def unpicklable_result_error(value: Any, exc: BaseException) -> ResultSerializationError:
    """A worker's result that cannot be pickled: fails its task, as multiprocessing.Pool's
    MaybeEncodingError (whose `.value` is the result's repr) fails its call."""
    error = ResultSerializationError(
        f"the task's result of type {type(value).__qualname__} could not be pickled ({exc!r}); "
        "return only picklable values", value_repr=short_repr(value))
    error.__cause__ = exc
    return error


def unreadable_result_error(exc: BaseException, nbytes: int) -> ResultSerializationError:
    """A result the worker pickled that cannot be unpickled in the caller."""
    error = ResultSerializationError(
        f"the task's result could not be unpickled in the caller: {exc!r}",
        value_repr=f"<a pickled result of {nbytes} bytes>")
    error.__cause__ = exc
    return error


def capture_exception(exc: BaseException) -> bytes:
    """Pickle an exception raised in a worker so that the parent can always decode it.

    An exception that fails to pickle, or whose pickle fails to load (custom __init__
    signatures are the usual cause), becomes a RemoteError with its type name and message.
    """
    _keep_user_frames(exc)
    tb_text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    type_name, message = _qualified_type_name(exc), _safe_str(exc)
    exc_for_wire = _strip_traceback(exc)
    blob = _loadable_pickle(exc_for_wire)
    if blob is None:
        blob = _dumps_exception(RemoteError(type_name, message, tb_text))
    return dumps(ErrorInfo(blob, type_name, message, tb_text))


def _loadable_pickle(exc: BaseException) -> bytes | None:
    """The exception's pickle, if it loads again (custom __init__ signatures fail that check
    here, not in the caller): as Python pickles it, else with tblib's reducers where Dask's
    distributed installed them (they rebuild an exception whose __init__ takes other
    arguments, and stand in for a program's own reducer that they replaced), without its
    cause and context, whose text is in the traceback."""
    try:
        blob = _dumps_exception(exc)
        loads(blob)
        return blob
    except Exception:
        pass
    if len(_reducers_but_exceptions()) == len(copyreg.dispatch_table):
        return None  # no tblib: nothing else to try
    exc.__cause__ = exc.__context__ = None
    try:
        blob = dumps(exc)
        loads(blob)
        return blob
    except Exception:
        return None


def _dumps_exception(exc: BaseException) -> bytes:
    """Pickle an exception as Python does (its args and attributes: no traceback, no chain),
    also where tblib's reducers are in copyreg (Dask's distributed installs them for every
    exception class on import): they pickle the cause and context too, which the caller then
    keeps instead of the remote traceback, and fail on a cause that does not pickle."""
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, PICKLE_PROTOCOL)
    pickler.dispatch_table = _reducers_but_exceptions()
    pickler.dump(exc)
    return buffer.getvalue()


_PLAIN_REDUCERS: tuple[int, dict[Any, Any]] = (-1, {})


def _reducers_but_exceptions() -> dict[Any, Any]:
    """copyreg's reducers without tblib's (remade when the table grows); a program's own
    reducer for an exception class stays (the usual way to pickle one whose __init__ takes
    other arguments than its args)."""
    global _PLAIN_REDUCERS
    size, reducers = _PLAIN_REDUCERS
    if size != len(copyreg.dispatch_table):
        table = dict(copyreg.dispatch_table)
        reducers = {cls: reduce for cls, reduce in table.items() if not _is_tblibs(reduce)}
        _PLAIN_REDUCERS = (len(table), reducers)
    return reducers


def _is_tblibs(reduce: Any) -> bool:
    function = getattr(reduce, "func", reduce)  # (a functools.partial for tracebacks)
    return str(getattr(function, "__module__", "")).startswith("tblib")


def restore_exception(data: bytes) -> BaseException:
    """Decode an ErrorInfo into the exception to raise in the caller, remote traceback chained."""
    info: ErrorInfo = loads(data)
    try:
        exc: BaseException = loads(info.exception)
    except Exception:  # its class is not importable here: keep its name, message and text
        exc = RemoteError(info.type_name, info.message, info.traceback_text)
    # (an exception's own pickle may bring a cause along: the text has the whole chain)
    exc.__cause__ = remote_traceback(info.traceback_text)
    if isinstance(exc, TaskFailed) and isinstance(exc, RemoteError) and not exc.traceback_text:
        exc.traceback_text = info.traceback_text
    return exc


def _keep_user_frames(exc: BaseException) -> None:
    """Drop the worker's own leading frames from the traceback of `exc` and of every exception
    chained to it (a task's sys.exit() is the cause of its WorkerExitedError)."""
    seen: set[int] = set()
    chained: BaseException | None = exc
    while chained is not None and id(chained) not in seen:
        seen.add(id(chained))
        chained.__traceback__ = _user_frames(chained.__traceback__)
        chained = chained.__cause__ or chained.__context__


def _user_frames(tb: Any) -> Any:
    """The traceback from the first frame outside procqueue (the worker's own call frames
    say nothing about the user's bug); all of it if every frame is procqueue's."""
    first = tb
    while tb is not None and _is_procqueue_module(tb.tb_frame.f_globals.get("__name__", "")):
        tb = tb.tb_next
    return tb if tb is not None else first


def _is_procqueue_module(name: str) -> bool:
    return name == "procqueue" or name.startswith("procqueue.")


def _strip_traceback(exc: BaseException) -> BaseException:
    # Tracebacks don't pickle; the text travels next to the exception instead.
    exc.__traceback__ = None
    return exc


def _qualified_type_name(exc: BaseException) -> str:
    cls = type(exc)
    module = cls.__module__
    # a script's classes: the private module name a worker imports it under says nothing
    return (cls.__qualname__ if module in ("builtins", "__main__")
            or module.startswith(SCRIPT_MODULE_PREFIX) else f"{module}.{cls.__qualname__}")


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<{type(exc).__name__} whose str() raised>"
