"""The public error hierarchy; every error procqueue raises is defined here.

    ProcqueueError
     ├─ TaskFailed                 one task failed; the pool is fine
     │   ├─ WorkerCrashedError     its worker died (exit code or signal) while running it
     │   │                         (also a concurrent.futures BrokenProcessPool)
     │   ├─ WorkerExitedError      the task called sys.exit(); the worker survived
     │   ├─ TaskTimeoutError       it ran longer than its timeout (also a builtin TimeoutError)
     │   ├─ TaskCancelledError     cancelled, or the pool was terminated before it finished
     │   ├─ ServiceLostError       the durable queue's worker service running it died, too often
     │   ├─ ArgumentSerializationError   its argument could not be pickled
     │   │                               (a PicklingError, a TypeError)
     │   ├─ ResultSerializationError     its result could not be pickled or unpickled
     │   │                               (a multiprocessing.pool.MaybeEncodingError)
     │   └─ RemoteError            it raised an exception that cannot cross a process boundary
     ├─ PoolBrokenError            the pool cannot run tasks any more (a BrokenProcessPool)
     │   └─ InitializerError       the worker initializer raised
     └─ PoolClosedError            a call on a closed/terminated pool (also a ValueError,
                                   like multiprocessing.Pool's "Pool not running")

The second bases are the errors multiprocessing.Pool and ProcessPoolExecutor raise in the same
situations, so code written against them keeps catching what it caught.

A task's own exception keeps its type, message and notes: procqueue re-raises it with the
remote traceback as ``__cause__`` (multiprocessing.pool.RemoteTraceback, whose text also names
the task, input and worker) and the task's index/input/pid/attempts as attributes.  This
module imports nothing from procqueue.
"""

from __future__ import annotations

import pickle as _pickle
import signal as _signal
from concurrent.futures import CancelledError as _CancelledError
from concurrent.futures.process import BrokenProcessPool as _BrokenProcessPool
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # typeshed does not declare them
    _MaybeEncodingError = Exception

    class RemoteTraceback(Exception):
        tb: str
        tb_text: str

        def __init__(self, tb: str) -> None: ...
else:
    from multiprocessing.pool import MaybeEncodingError as _MaybeEncodingError
    # The standard library's own class, so that code checking `type(exc.__cause__)` or reading
    # `exc.__cause__.tb`, as CPython's Pool tests do, keeps working.
    from multiprocessing.pool import RemoteTraceback as RemoteTraceback


def remote_traceback(tb_text: str, where: str | None = None) -> RemoteTraceback:
    """The ``__cause__`` of an exception raised in a worker, as multiprocessing.Pool attaches it:
    ``.tb`` is the text it prints (the traceback in triple quotes, as the standard library
    shows it, then `where`: which task, input and worker); ``.tb_text`` the bare traceback."""
    shown = tb_text if tb_text.endswith("\n") or not tb_text else tb_text + "\n"
    if where:
        shown += where + "\n"
    cause = RemoteTraceback('\n"""\n' + shown + '"""')
    cause.tb_text = tb_text
    return cause


def remote_traceback_text(cause: BaseException | None) -> str | None:
    """The bare traceback text of a RemoteTraceback (ours, or one multiprocessing made)."""
    if not isinstance(cause, RemoteTraceback):
        return None
    text = getattr(cause, "tb_text", None)
    if isinstance(text, str):
        return text
    shown = str(getattr(cause, "tb", ""))
    return shown.removeprefix('\n"""\n').removesuffix('"""')


class ProcqueueError(Exception):
    """Base of every error procqueue raises itself."""


class TaskFailed(ProcqueueError):
    """One task failed.  Carries who/what/where: the task's index in its call, a repr of its
    input, the worker pid and the attempt number (1-based)."""

    def __init__(
        self,
        message: str,
        *,
        index: int | None = None,
        input_repr: str | None = None,
        pid: int | None = None,
        attempts: int | None = None,
    ) -> None:
        Exception.__init__(self, message)  # not the second base's (MaybeEncodingError's)
        self.message = message
        self.index = index
        self.input_repr = input_repr
        self.pid = pid
        self.attempts = attempts

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep keyword-only state across pickling (errors travel back from workers).
        return (_rebuild, (type(self), self.message, dict(self.__dict__)))

    def __str__(self) -> str:
        where = []
        if self.index is not None:
            where.append(f"task {self.index}")
        if self.input_repr is not None:
            where.append(f"input {self.input_repr}")
        if self.pid is not None:
            where.append(f"worker pid {self.pid}")
        if self.attempts is not None and self.attempts > 1:
            where.append(f"after {self.attempts} attempts")
        suffix = f" ({', '.join(where)})" if where else ""
        return f"{self.message}{suffix}"


def _rebuild(cls: type[BaseException], message: str, state: dict[str, Any]) -> Any:
    obj = cls.__new__(cls)
    Exception.__init__(obj, message)
    obj.__dict__.update(state)
    return obj


class WorkerCrashedError(TaskFailed, _BrokenProcessPool):
    """The worker process died while running the task (os._exit, segfault, SIGKILL/OOM)."""

    def __init__(
        self,
        message: str = "worker process died while running the task",
        *,
        exitcode: int | None = None,
        oom_suspected: bool = False,
        **where: Any,
    ) -> None:
        super().__init__(message, **where)
        self.exitcode = exitcode
        self.oom_suspected = oom_suspected

    @property
    def signal(self) -> str | None:
        """The name of the signal that killed the worker (``"SIGKILL"``), or None."""
        if self.exitcode is None or self.exitcode >= 0:
            return None
        return signal_name(-self.exitcode)


class WorkerExitedError(TaskFailed):
    """The task called ``sys.exit(code)``.  Reported as a task failure, never re-raised as
    SystemExit in the caller (which would silently end the caller's program)."""

    def __init__(self, message: str = "task called sys.exit()", *, code: Any = None,
                 **where: Any) -> None:
        super().__init__(message, **where)
        self.code = code


class TaskTimeoutError(TaskFailed, TimeoutError):
    """The task ran longer than its timeout; its worker (and process group) was killed."""

    def __init__(self, message: str = "task timed out", *, timeout_s: float | None = None,
                 **where: Any) -> None:
        super().__init__(message, **where)
        self.timeout_s = timeout_s


class TaskCancelledError(TaskFailed, _CancelledError):
    """The task was cancelled, or the pool was terminated before it finished.  A
    concurrent.futures.CancelledError, so `except CancelledError` around a future's result()
    catches it as it catches a cancelled future's."""


class ServiceLostError(TaskFailed):
    """A durable queue's task whose worker service died (its heartbeat lapsed, or its process
    is gone) each of the times it ran; the store stopped re-queueing it.  The store records
    it by the name ``procqueue.errors.ServiceLostError``, so that name must not change."""

    def __init__(self, message: str = "the worker service running the task died",
                 **where: Any) -> None:
        super().__init__(message, **where)


class ArgumentSerializationError(TaskFailed, _pickle.PicklingError, TypeError):
    """The task's arguments (or its function) could not be pickled.  Also a TypeError, as
    multiprocessing.Pool raises for a lock, a generator or an open file; argument_error()
    makes it an instance of what pickling raised, too (a RuntimeError from a __reduce__)."""


def argument_error(message: str, cause: BaseException, **where: Any
                   ) -> ArgumentSerializationError:
    """An ArgumentSerializationError that is also of the type pickling raised (`cause`), so
    that `except RuntimeError` catches it where multiprocessing.Pool raised the RuntimeError
    itself; `cause` is chained."""
    error = _argument_error_type(type(cause))(message, **where)
    error.__cause__ = cause
    return error


_ARGUMENT_ERROR_TYPES: dict[type[BaseException], type[ArgumentSerializationError]] = {}


def _argument_error_type(cause_type: type[BaseException]) -> type[ArgumentSerializationError]:
    if issubclass(ArgumentSerializationError, cause_type) or not issubclass(cause_type,
                                                                            Exception):
        return ArgumentSerializationError
    made = _ARGUMENT_ERROR_TYPES.get(cause_type)
    if made is None:
        try:
            made = type("ArgumentSerializationError", (ArgumentSerializationError, cause_type),
                        {"__module__": __name__, "__reduce__": _reduce_argument_error})
        except TypeError:  # an exception type that cannot be a second base (layout, final)
            made = ArgumentSerializationError
        _ARGUMENT_ERROR_TYPES[cause_type] = made
    return made


def _reduce_argument_error(self: ArgumentSerializationError) -> tuple[Any, ...]:
    # The made type is not importable by name: rebuild it from the type pickling raised.
    second = next(b for b in type(self).__bases__ if b is not ArgumentSerializationError)
    return (_rebuild_argument_error, (second, self.message, dict(self.__dict__)))


def _rebuild_argument_error(cause_type: type[BaseException], message: str,
                            state: dict[str, Any]) -> Any:
    return _rebuild(_argument_error_type(cause_type), message, state)


class ResultSerializationError(TaskFailed, _MaybeEncodingError):
    """The task's result could not be pickled in the worker or unpickled in the caller."""

    def __init__(self, message: str, *, value_repr: str | None = None, **where: Any) -> None:
        super().__init__(message, **where)
        # MaybeEncodingError's attributes: what went wrong, and the repr of the result
        self.exc = message
        self.value = value_repr


class RemoteError(TaskFailed, _MaybeEncodingError):
    """A task raised an exception that cannot be pickled or unpickled.  Keeps its type name,
    message and traceback text; the traceback is also the ``__cause__``.  A
    MaybeEncodingError, as multiprocessing.Pool raises for an exception it cannot send."""

    def __init__(self, type_name: str = "Exception", message: str = "",
                 traceback_text: str = "", **where: Any) -> None:
        super().__init__(f"{type_name}: {message}" if message else type_name, **where)
        self.type_name = type_name
        self.remote_message = message
        self.traceback_text = traceback_text
        # MaybeEncodingError's attributes: what went wrong, and the repr of the "result"
        self.exc = "the exception could not travel from the worker"
        self.value = f"{type_name}({message!r})"


class PoolBrokenError(ProcqueueError, _BrokenProcessPool):
    """The pool can no longer run tasks."""


class InitializerError(PoolBrokenError):
    """The worker initializer raised; the pool does not respawn it in a loop."""


class PoolClosedError(ProcqueueError, ValueError, RuntimeError):
    """A call on a pool that is closed or terminated: a ValueError, as multiprocessing
    raises, and a RuntimeError, as concurrent.futures raises for a submit() after shutdown()."""


class StoreError(ProcqueueError):
    """A task store (a durable queue's SQLite file or PostgreSQL database, or a journal)
    cannot be used; the message says which and why, on one line."""


class StoreFormatError(StoreError):
    """The file or database is not a procqueue store, or one of a newer format."""


class StoreUnsafeError(StoreError):
    """The store is writable by other users: its pickles are code the workers would run."""


def signal_name(signum: int) -> str:
    try:
        return _signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def describe_exit(exitcode: int | None) -> str:
    """'exit code 3' or 'killed by SIGKILL (-9)' for a dead process."""
    if exitcode is None:
        return "unknown exit status"
    if exitcode < 0:
        return f"killed by {signal_name(-exitcode)} ({exitcode})"
    return f"exit code {exitcode}"


def retry_stopped(error: BaseException) -> BaseException:
    """Mark the error a task failed with as its outcome because its retry never started (its
    call was halted or cancelled, the pool terminated): `.retry_stopped` is True.  Its input
    did not use its retries, so a journal or a joblog leaves it pending, as a cancelled one."""
    try:
        setattr(error, "retry_stopped", True)
    except (AttributeError, TypeError):  # exceptions with __slots__ or read-only attributes
        pass
    return error


def is_retry_stopped(error: BaseException | None) -> bool:
    return getattr(error, "retry_stopped", False) is True


def annotate(exc: BaseException, *, index: int | None, input_repr: str | None,
             pid: int | None, attempts: int | None) -> BaseException:
    """Attach who/what/where to a task's exception as attributes (`.index`, `.input_repr`,
    `.pid`, `.attempts`) and as a line of its remote traceback, printed right above it.  Its
    type, message and notes stay what the task raised: `except ValueError` and
    `pytest.raises(ValueError, match="^bad item 3$")` see what they see with
    multiprocessing.Pool.  An attribute the exception has of its own stays its own
    (psutil.NoSuchProcess's `.pid` is the process it looked for, not the worker)."""
    own = not isinstance(exc, TaskFailed)
    for name, value in (("index", index), ("input_repr", input_repr), ("pid", pid),
                        ("attempts", attempts)):
        if (own and not hasattr(exc, name)) or (not own and getattr(exc, name, None) is None):
            try:
                setattr(exc, name, value)
            except (AttributeError, TypeError):  # exceptions with __slots__ or read-only attrs
                pass
    cause = exc.__cause__
    if not isinstance(exc, TaskFailed) and isinstance(cause, RemoteTraceback):
        where = f"[procqueue] raised by task {index} (input {input_repr}) in worker pid {pid}"
        if attempts and attempts > 1:
            where += f", attempt {attempts}"
        exc.__cause__ = remote_traceback(remote_traceback_text(cause) or "", where)
    return exc


def key_function_error(exc: Exception, index: int, input_repr: str) -> Exception:
    """The exception a call's key= function raised for one input, as that input's error: a
    note names the input (its type and message stay what the function raised)."""
    exc.add_note(f"[procqueue] raised by the key function for input {index}: {input_repr}")
    return exc


__all__ = [
    "ProcqueueError", "TaskFailed", "WorkerCrashedError", "WorkerExitedError",
    "TaskTimeoutError", "TaskCancelledError", "ServiceLostError", "ArgumentSerializationError",
    "ResultSerializationError", "RemoteError", "PoolBrokenError", "InitializerError",
    "PoolClosedError", "RemoteTraceback", "remote_traceback", "remote_traceback_text",
    "retry_stopped", "is_retry_stopped",
    "argument_error", "signal_name", "describe_exit", "annotate", "key_function_error",
]


def exception_types(retry_on: Any) -> tuple[type[BaseException], ...]:
    """A pool's retry_on option (one exception type or several) as a tuple of types."""
    if isinstance(retry_on, type):
        retry_on = (retry_on,)
    types: list[type[BaseException]] = []
    for t in tuple(retry_on):
        if not (isinstance(t, type) and issubclass(t, BaseException)):
            raise TypeError(f"retry_on must hold exception types, got {t!r}")
        types.append(t)
    return tuple(types)

