"""A DaskPool's task events: one TaskEvent per attempt an item ran, as the local supervisor
gives them (Pool(on_event=...), trace=), with the Dask worker's own times.  See docs/dask.md
for how they differ from the local pool's (slots are worker threads; a crash has one event
after Dask's own re-runs)."""

from __future__ import annotations

import traceback
from typing import Callable, NamedTuple

from ...protocol import short_repr
from ...stats import TaskEvent, event_error_text
from .items import DaskTask


class _Slots:
    """The slot numbers of a pool's TaskEvents: one per Dask worker thread (worker address,
    thread ident), 0, 1, 2... in the order this pool first saw each finish a chunk.  A
    thread, not a worker process, is the unit that runs one item at a time, so a trace's
    rows never overlap, even on workers with several threads."""

    UNKNOWN = -1  # an item whose worker died with it: Dask does not say which thread ran it

    def __init__(self) -> None:
        self.numbers: dict[tuple[str, int], int] = {}

    def of(self, address: str, thread: int) -> int:
        return self.numbers.setdefault((address, thread), len(self.numbers))


class _Run(NamedTuple):
    """Where and when one attempt of an item ran, as its TaskEvent says: the slot (see
    _Slots) and wall-clock start and end, in seconds since the epoch."""

    slot: int
    start_s: float
    end_s: float


_UNHEARD = _Run(_Slots.UNKNOWN, 0.0, 0.0)  # the run of an item when no one listens: unused


class _Events:
    """The listener of a pool, if any, and the slot numbers it has handed out."""

    def __init__(self, listener: Callable[[TaskEvent], None] | None) -> None:
        self.listener = listener
        self.slots = _Slots()

    def run(self, address: str, thread: int, started_s: float, seconds: float) -> _Run:
        """Where and when an item of a chunk ran (nothing is numbered when no one listens)."""
        if self.listener is None:
            return _UNHEARD
        return _Run(self.slots.of(address, thread), started_s, started_s + seconds)

    def emit(self, item: DaskTask, run: _Run, outcome: str, error: BaseException | None) -> None:
        """Give the listener the TaskEvent of the attempt `run` of `item`; a listener that
        raises is reported and changes nothing."""
        if self.listener is None:
            return
        event = TaskEvent(item.job.id, item.index, short_repr(item.input), run.slot,
                          item.pid, item.attempts, run.start_s, run.end_s, outcome,
                          None if error is None else event_error_text(error))
        try:
            self.listener(event)
        except Exception:
            traceback.print_exc()
