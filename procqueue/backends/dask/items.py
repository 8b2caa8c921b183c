"""The driver's data: what it owns and what it is told.

_Item is one input of one call (what the result sinks see as a task), _Call one API call
(map, imap, submit...) with its function, its sink and its limits, _Pending a call's items
waiting for a chunk (FIFO, or fair across keys), _Chunk the items of one Dask task in
flight.  The commands (_Submit, _Open, _InputDone, _ChunkDone, _CancelCall, _CancelItem,
_Close, _Terminate) are everything that changes an item's state: callers and Dask's done
callbacks post them to the driver's inbox, and only the driver thread applies them.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any, Callable

from ...chunking import ChunkSizer
from ...errors import argument_error
from ...limits import KeyedLimit
from ...limits.keyed import KeyedFifo
from ...protocol import CallKind
from .worker_side import RateSpec


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


class _Pending(KeyedFifo[Any, "_Item"]):
    """A call's items waiting for a chunk: the local pool's queue of a call (KeyedFifo), its
    keyed call handing out only items whose key is under its cap, so a key with many items
    neither starves nor blocks the others."""

    def __init__(self, keyed: KeyedLimit[Any] | None) -> None:
        super().__init__(keyed=keyed is not None)
        self.keyed = keyed

    def pop(self) -> _Item | None:
        """The next item that may start now (its key under its cap); None if none may."""
        if self.keyed is None:
            return self.pop_startable()
        return self.pop_startable(self.keyed.can_start)


class _Call:
    """One API call (map, imap, submit...): its function, how to call it, its sink."""

    def __init__(self, call_id: int, fn_id: int, fn_payload: bytes, kind: CallKind, sink: Any,
                 *, timeout_s: float | None, limits: tuple[Any, ...],
                 sizer: ChunkSizer, rates: tuple[RateSpec, ...] = (),
                 owned_limits: tuple[Any, ...] = (), keys: _KeySpec | None = None) -> None:
        self.id = call_id
        self.fn_id = fn_id
        self.fn_payload = fn_payload
        self.kind = kind
        self.sink = sink
        self.timeout_s = timeout_s
        self.limits = limits  # distributed.Semaphore objects held by each of its chunks
        self.owned_limits = owned_limits  # this call's own, closed when it ends
        self.sizer = sizer
        self.rates = rates  # rate windows each item takes a start from, where it runs
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
    __slots__ = ("key", "call", "items", "future", "submitted_s")

    def __init__(self, key: str, call: _Call, items: list[_Item], future: Any,
                 submitted_s: float) -> None:
        self.key = key
        self.call = call
        self.items = items
        self.future = future
        self.submitted_s = submitted_s  # wall-clock seconds since the epoch


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


def _make_item(call: _Call, index: int, value: Any) -> _Item:
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


def _dumps_item(item: Any) -> bytes:
    """Pickle an input for the wire: plain pickle (fast), cloudpickle for lambdas and the
    like.  Never out of band: the bytes may go to another machine."""
    try:
        return pickle.dumps(item, pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, TypeError, AttributeError):
        import cloudpickle

        return bytes(cloudpickle.dumps(item, pickle.HIGHEST_PROTOCOL))
