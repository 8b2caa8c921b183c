"""Feeding a lazy call (imap, imap_unordered, imap_outcomes): one thread takes its inputs as
the window has room and hands them to the backend in groups, so an endless generator runs
in bounded memory.  The same loop for every backend; what a group becomes (tasks for the
local supervisor, items for the Dask driver) is the backend's `submit`.

    iterable ──► InputSource.take ──► submit(first index, inputs) ──► the backend
        ▲                                                                 │
        └──── Window.acquire (places) ◄── the consumer takes an outcome ◄─┘

A call has at most its window's size of inputs taken whose outcomes were not consumed yet.
An exception of the user's iterable ends the input: the inputs taken before it still run,
and the consumer meets the error after their outcomes (as with multiprocessing.Pool.imap).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, TypeAlias, cast

from .results import ResultStream, Window

WINDOW_TASKS_PER_WORKER = 512  # inputs taken but not consumed, per worker (process or thread)
WINDOW_TASKS_MIN = 2048  # ... with a floor for small pools
# ... and, with a chunksize the caller fixed, room for this many chunks per worker: one
# running, one sent ahead, and what must be queued for a batch to go ahead (dispatch.py).
WINDOW_CHUNKS_PER_WORKER = 4
FEED_GROUP_MAX = 256  # inputs a feeder submits in one go at most
FEED_GROUP_MAX_WAIT_S = 0.002  # a group stops growing once its first input waited this long


# a group of inputs, as InputSource.take gives them
Inputs: TypeAlias = "list[Any] | tuple[Any, ...]"


def window_size(workers: int, chunksize: int | None = None) -> int:
    return max(WINDOW_TASKS_MIN, WINDOW_TASKS_PER_WORKER * workers,
               WINDOW_CHUNKS_PER_WORKER * workers * (chunksize or 0))


class InputFeed:
    """One lazy call's feeding loop; run() is its thread.

    submit(first, inputs): hand inputs first, first+1, ... to the backend.
    count_known(count): the input has ended, count inputs in all (a journal records it).
    finish(): after the stream was told the count: the backend has every input.
    room(most, closed): how many inputs the next group may take, at most `most` (the local
    pool bounds the big arguments copied ahead; closed() says the window has closed).
    With whole_chunks=N > 1 (an explicit chunksize), a list, tuple or range is submitted N
    inputs at a time: the supervisor, which may dispatch a group before the next one arrives,
    never sends a chunk cut short.  So is an iterator's input with wait_for_whole_chunks
    (imap), as multiprocessing.Pool does, and an error of the input iterator drops the chunk
    it cut short, as there: imap yields the results of the whole chunks before it, then
    raises the error.  Without it (imap_outcomes, the command line), an iterator's inputs are
    not held back for the rest of their chunk."""

    def __init__(self, stream: ResultStream, iterable: Iterable[Any],
                 submit: Callable[[int, Inputs], None],
                 finish: Callable[[], None], *,
                 count_known: Callable[[int], None] | None = None,
                 room: Callable[[int, Callable[[], bool]], int] | None = None,
                 whole_chunks: int = 1, wait_for_whole_chunks: bool = False) -> None:
        assert stream.window is not None  # a lazy call's stream has a window
        self.stream = stream
        self.window: Window = stream.window
        self.source = InputSource(iterable)
        self.submit = submit
        self.finish = finish
        self.count_known = count_known
        self.room = room
        self.whole_chunks = whole_chunks
        self.wait_for_whole_chunks = wait_for_whole_chunks
        self.count = 0  # inputs submitted so far
        self.held: list[Any] = []  # inputs of a chunk not complete yet (whole_chunks > 1)

    def run(self) -> None:
        """Feed until the input ends or the window closes, then tell the stream how many
        inputs there were (and the backend, through finish)."""
        input_error: BaseException | None = None
        try:
            self._feed()
            input_error = self.source.error  # the inputs taken before it still run
        except BaseException as exc:  # e.g. a key function, a journal, a bug of ours
            input_error = self.source.error or exc
        finally:
            if self.held:
                self.window.release(len(self.held))
            if self.count_known is not None:
                self.count_known(self.count)
            self.stream.input_finished(self.count, input_error)
            self.finish()

    def _feed(self) -> None:
        window, source = self.window, self.source
        while not source.exhausted:
            most = FEED_GROUP_MAX if self.room is None else self.room(FEED_GROUP_MAX,
                                                                       window.closed)
            places = window.acquire(most)
            if not places:
                break  # the window closed: terminate, cancel, or the iterator was dropped
            items = source.take(places)
            if places > len(items):  # replayed outcomes hold their place like tasks
                window.release(places - len(items))
            if self.whole_chunks > 1 and (source.sequence is not None
                                          or self.wait_for_whole_chunks):
                items, self.held = _whole_chunks(self.held, items, self.whole_chunks, source)
            if items:
                self.submit(self.count, items)
            self.count += len(items)


class InputSource:
    """A feeder's view of imap's iterable.  A list, tuple or range is sliced (no Python step
    per input); any other iterable is advanced item by item, and a group stops growing once
    its first item waited FEED_GROUP_MAX_WAIT_S, so a slow generator's items are still
    submitted one by one, as soon as each arrives."""

    def __init__(self, iterable: Iterable[Any]) -> None:
        # exact types: a subclass may iterate differently from how it slices
        self.sequence = (cast("list[Any] | tuple[Any, ...] | range", iterable)
                         if type(iterable) in (list, tuple, range) else None)
        self.iterator = iter(iterable) if self.sequence is None else None
        self.position = 0
        self.exhausted = False
        self.error: BaseException | None = None  # what the user's iterable raised

    def take(self, places: int) -> Inputs:
        if self.sequence is not None:
            items = self.sequence[self.position:self.position + places]
            self.position += len(items)
            self.exhausted = self.position >= len(self.sequence)
            return items if type(items) is not range else list(items)
        return self._next_items(places)

    def _next_items(self, places: int) -> list[Any]:
        assert self.iterator is not None
        items: list[Any] = []
        deadline = time.monotonic() + FEED_GROUP_MAX_WAIT_S
        try:
            while len(items) < places:
                items.append(next(self.iterator))
                if time.monotonic() > deadline:
                    break
        except StopIteration:
            self.exhausted = True
        except BaseException as exc:  # noqa: BLE001 - the user's iterable: reported in order
            self.error = exc
            self.exhausted = True
        return items


def _whole_chunks(held: list[Any], items: Inputs, chunk: int,
                  source: InputSource) -> tuple[list[Any], list[Any]]:
    """(inputs to submit now, inputs held back): whole chunks of `chunk` inputs, and the last,
    shorter one once the input has ended without an error."""
    taken = held + list(items)
    if source.exhausted and source.error is None:
        return taken, []
    cut = len(taken) - len(taken) % chunk
    return taken[:cut], taken[cut:]
