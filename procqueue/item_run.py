"""One item's run as a worker reports it, on any backend: (True, the pickled result) or
(False, a pickled ErrorInfo), never an exception for the item's own failure.

The local pool's workers (worker.py) and the Dask workers (backends/dask/worker_side.py) both
call run_item, so a task fails the same way wherever it runs: an argument that does not
unpickle, an exception (its type, message and remote traceback), sys.exit() in the task, a
KeyboardInterrupt raised inside it, a result that cannot be pickled.
"""

from __future__ import annotations

import traceback
from typing import Any, Callable

from .errors import ArgumentSerializationError, RemoteError, WorkerExitedError
from .protocol import (CallKind, apply_call, capture_exception, dumps, loads_argument,
                       unpicklable_result_error)

_NOTHING: tuple[type[BaseException], ...] = ()


def run_item(fn: Callable[..., Any] | None, fn_error: bytes | None, kind: CallKind,
             payload: bytes, fds: dict[int, int], task_id: int,
             passthrough: tuple[type[BaseException], ...] = _NOTHING) -> tuple[bool, bytes]:
    """Run one item.  `fn_error`: why `fn` could not be loaded (then it is None); `fds`: the
    out-of-band buffers that came with the batch, by task id; `passthrough`: exceptions that
    are not the item's own and go up (the Dask worker's timeout interrupt)."""
    if fn is None:
        assert fn_error is not None
        return False, fn_error
    try:
        arg = loads_argument(payload, fds, task_id)
    except passthrough:
        raise
    except BaseException as exc:  # noqa: BLE001 - any unpickling failure is this task's error
        error = ArgumentSerializationError(f"could not unpickle the task's argument: {exc!r}")
        error.__cause__ = exc
        return False, capture_exception(error)
    try:
        value = apply_call(fn, kind, arg)
    except passthrough:
        raise
    except BaseException as exc:  # noqa: BLE001 - the task's failure, whatever it raised
        return False, error_of(exc)
    try:
        return True, dumps(value)
    except passthrough:
        raise
    except BaseException as exc:  # noqa: BLE001 - an unpicklable result fails only this task
        return False, unpicklable_result(value, exc)


def error_of(exc: BaseException) -> bytes:
    """What a task's exception reports: sys.exit() as WorkerExitedError, an Exception as
    itself, a KeyboardInterrupt or GeneratorExit wrapped (never re-raised in the caller)."""
    if isinstance(exc, SystemExit):
        exited = WorkerExitedError(f"task called sys.exit({exc.code!r})", code=exc.code)
        exited.__cause__ = exc
        return capture_exception(exited)
    if isinstance(exc, Exception):
        return capture_exception(exc)
    tb_text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    wrapped = RemoteError(type(exc).__name__, str(exc), tb_text)
    wrapped.__cause__ = exc  # the task's own frames, in the remote traceback the caller sees
    return capture_exception(wrapped)


def unpicklable_result(value: Any, exc: BaseException) -> bytes:
    return capture_exception(unpicklable_result_error(value, exc))
