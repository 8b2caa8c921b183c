"""The driver's data: what it owns and what it is told.

The task model is the local pool's (procqueue.tasks): an item, one input of one call, is a
DaskTask, a procqueue Task whose life is TaskState's state machine, so the guarantee of
exactly one outcome per task, checked by Task.move, covers Dask too; a call (map, imap,
submit...) is a DaskJob, a procqueue Job.  Each adds only what the cluster needs: a task its
chunk and crash tally, a job its semaphores, rate windows and pending queue.  _Pending is a
call's items waiting for a chunk (FIFO, or fair across keys), _Chunk the items of one Dask
task in flight.  The commands (_Submit, _Open, _InputDone, _ChunkDone, _CancelCall,
_CancelItem, _Close, _Terminate) are everything that changes an item's state: callers and
Dask's done callbacks post them to the driver's inbox, and only the driver thread applies
them.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any, Callable

from ...chunking import ChunkSizer
from ...errors import argument_error, key_function_error
from ...limits import KeyedLimit
from ...limits.keyed import KeyedFifo
from ...protocol import CallKind, short_repr
from ...tasks import Job, OutcomeSink, Task, new_id
from .worker_side import RateSpec


class DaskTask(Task):
    """One input of one call: a procqueue Task, whose state only Task.move changes (QUEUED
    while pending, DISPATCHED while in a chunk in flight, RETRY_WAIT during a backoff, then
    exactly one of DONE, FAILED, CANCELLED: its outcome delivered), plus where it stands on
    the cluster.  `attempts` counts the chunks it was sent in, less those that lost it
    through no fault of its own."""

    __slots__ = ("error", "isolate", "crash_runs", "chunk", "key_held")

    job: "DaskJob"  # narrowed: the driver reads the Dask fields of its call

    def __init__(self, job: "DaskJob", index: int, value: Any, payload: bytes | None,
                 error: BaseException | None = None) -> None:
        super().__init__(new_id(), job, index, payload, value)
        self.error = error  # set when the input could not be pickled: fails at once
        self.isolate = False  # run alone: its chunk lost a worker, find out who did it
        self.crash_runs = 0  # runs that ended with the worker's death
        self.chunk: "_Chunk | None" = None  # in flight in this chunk
        self.key_held = False  # counted as running under its key (from chunk to chunk end)


@dataclass(frozen=True)
class _KeySpec:
    """A call's per-key limit: `fn(input)` is an input's key (called in the caller, as the
    local pool does), and at most `per_key` items of the call run at once per key."""

    fn: Callable[[Any], Any]
    per_key: int


class _Pending(KeyedFifo[Any, DaskTask]):
    """A call's items waiting for a chunk: the local pool's queue of a call (KeyedFifo), its
    keyed call handing out only items whose key is under its cap, so a key with many items
    neither starves nor blocks the others."""

    def __init__(self, keyed: KeyedLimit[Any] | None) -> None:
        super().__init__(keyed=keyed is not None, limit=keyed)
        self.keyed = keyed

    def pop(self) -> DaskTask | None:
        """The next item that may start now (its key under its cap); None if none may."""
        if self.keyed is None:
            return self.pop_startable()
        return self.pop_startable(self.keyed.can_start)


class DaskJob(Job):
    """One API call (map, imap, submit...): a procqueue Job (its function, how to call it, its
    sink, its sizer, its per-key limit), plus what the cluster holds for it and the driver's
    tally of its items."""

    __slots__ = ("semaphores", "owned_limits", "rates", "pending", "open", "outstanding")

    def __init__(self, job_id: int, fn_id: int, fn_payload: bytes, kind: CallKind,
                 sink: OutcomeSink, *, timeout_s: float | None, semaphores: tuple[Any, ...],
                 sizer: ChunkSizer, rates: tuple[RateSpec, ...] = (),
                 owned_limits: tuple[Any, ...] = (), keys: _KeySpec | None = None) -> None:
        keyed: KeyedLimit[Any] | None = None if keys is None else KeyedLimit(keys.per_key)
        super().__init__(job_id, fn_id, fn_payload, kind, sink, timeout_s=timeout_s,
                         sizer=sizer, keyed=keyed, key_fn=None if keys is None else keys.fn)
        self.semaphores = semaphores  # distributed.Semaphore objects held by each chunk
        self.owned_limits = owned_limits  # this call's own, closed when it ends
        self.rates = rates  # rate windows each item takes a start from, where it runs
        self.pending = _Pending(keyed)
        self.open = False  # a feeder may still add items
        self.outstanding = 0  # items without an outcome yet

    @property
    def finished(self) -> bool:
        return not self.open and self.outstanding == 0


class _Chunk:
    __slots__ = ("key", "call", "items", "future", "submitted_s")

    def __init__(self, key: str, call: DaskJob, items: list[DaskTask], future: Any,
                 submitted_s: float) -> None:
        self.key = key
        self.call = call
        self.items = items
        self.future = future
        self.submitted_s = submitted_s  # wall-clock seconds since the epoch


# ---- driver commands: everything that changes item state is one of these -----------------------

@dataclass(frozen=True)
class _Submit:
    call: DaskJob
    items: list[DaskTask]


@dataclass(frozen=True)
class _Open:
    call: DaskJob


@dataclass(frozen=True)
class _InputDone:
    call: DaskJob


@dataclass(frozen=True)
class _ChunkDone:
    future: Any


@dataclass(frozen=True)
class _CancelCall:
    call: DaskJob
    kill_running: bool
    quiet: bool  # the consumer is gone: nobody reads the cancelled outcomes


@dataclass(frozen=True)
class _CancelItem:
    item: DaskTask
    running: bool


@dataclass(frozen=True)
class _Close:
    pass


@dataclass(frozen=True)
class _Terminate:
    pass


Command = (_Submit | _Open | _InputDone | _ChunkDone | _CancelCall | _CancelItem | _Close
           | _Terminate)


def _make_item(call: DaskJob, index: int, value: Any) -> DaskTask:
    """An item for one input; a problem with the input (it cannot be pickled, its key
    function raises) becomes that item's error, never the whole call's."""
    try:
        item = DaskTask(call, index, value, _dumps_item(value))
    except KeyboardInterrupt:
        raise  # a Ctrl-C while pickling is the caller's, not the argument's
    except BaseException as exc:  # noqa: BLE001 - even a __reduce__ calling sys.exit()
        error = argument_error(f"the task's argument could not be pickled: {exc!r}; "
                               "make sure every argument is picklable", exc)
        return DaskTask(call, index, value, None, error)
    if call.key_fn is not None:
        try:
            item.key = call.key_fn(value)
            hash(item.key)
        except Exception as exc:
            item.error = key_function_error(exc, index, short_repr(value))
    return item


def _dumps_item(item: Any) -> bytes:
    """Pickle an input for the wire: plain pickle (fast), cloudpickle for lambdas and the
    like.  Never out of band: the bytes may go to another machine."""
    try:
        return pickle.dumps(item, pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, TypeError, AttributeError):
        import cloudpickle

        return bytes(cloudpickle.dumps(item, pickle.HIGHEST_PROTOCOL))
