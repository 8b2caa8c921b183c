"""The feeder: one thread per lazy call (imap, imap_unordered, imap_outcomes) that takes its
inputs as the window has room and submits them, so an endless generator runs in bounded
memory.

    iterable ──► _InputSource.take ──► Submitter.groups ──► SubmitTasks ──► supervisor
        ▲                                                                       │
        └──── Window.acquire (places) ◄──── the consumer takes an outcome ◄─────┘

A call has at most window_size(processes) inputs taken whose outcomes were not consumed
yet, and at most ARGUMENT_MEMORY_AHEAD bytes of big arguments copied ahead (pool.py).  The
supervisor hears OpenJob before the first input and CloseJob after the last, so it knows when
a lazy call has all its tasks.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Iterable, cast

from .pool_journal import JournaledCall
from .results import ResultStream, Window
from .submission import Submitter
from .inbox import CloseJob, OpenJob, SubmitTasks
from .tasks import Job

# Inputs a lazy call may have taken whose results were not consumed yet (bounded memory for
# imap over an endless generator), per worker, with a floor for small pools.
WINDOW_TASKS_PER_WORKER = 512
WINDOW_TASKS_MIN = 2048
FEED_GROUP_MAX = 256  # inputs a feeder submits in one go at most
FEED_GROUP_MAX_WAIT_S = 0.002  # a group stops growing once its first input waited this long


def window_size(processes: int) -> int:
    return max(WINDOW_TASKS_MIN, WINDOW_TASKS_PER_WORKER * processes)


def start_feeder(submitter: Submitter, job: Job, stream: ResultStream, iterable: Iterable[Any],
                 journal: JournaledCall | None = None, whole_chunks: int = 1) -> None:
    """Open the call in the supervisor and start its feeder thread."""
    submitter.post(OpenJob(job))
    feeder = Feeder(submitter, job, stream, iterable, journal, whole_chunks)
    thread = threading.Thread(target=feeder.run, name=f"procqueue-feeder-{job.id}",
                              daemon=True)
    thread.start()


class Feeder:
    """Takes a lazy call's inputs while its window has room and submits them in groups.
    With whole_chunks=N > 1 (imap's explicit chunksize), inputs are submitted N at a time,
    as multiprocessing.Pool does, so that an error of the input iterator drops the chunk it
    cut short, as there: imap yields the results of the whole chunks before it, then raises
    the error."""

    def __init__(self, submitter: Submitter, job: Job, stream: ResultStream,
                 iterable: Iterable[Any], journal: JournaledCall | None,
                 whole_chunks: int) -> None:
        assert stream.window is not None  # a lazy call's stream has a window
        self.submitter = submitter
        self.job = job
        self.stream = stream
        self.window: Window = stream.window
        self.source = _InputSource(iterable)
        self.journal = journal
        self.whole_chunks = whole_chunks
        self.count = 0  # inputs submitted or replayed so far
        self.held: list[Any] = []  # inputs of a chunk not complete yet (whole_chunks > 1)

    def run(self) -> None:
        """The feeder thread: feed until the input ends or the window closes, then tell the
        stream how many inputs there were and the supervisor that the call has them all."""
        input_error: BaseException | None = None
        try:
            self._feed()
            input_error = self.source.error  # the inputs taken before it still run
        except BaseException as exc:  # e.g. a key function or pickling bug of ours
            input_error = self.source.error or exc
        finally:
            if self.held:
                self.window.release(len(self.held))
            if self.journal is not None:
                self.journal.journal.set_total(self.count)
            self.stream.input_finished(self.count, input_error)
            self.submitter.post(CloseJob(self.job))

    def _feed(self) -> None:
        window, source, submitter = self.window, self.source, self.submitter
        blocks = submitter.blocks_allowed(self.job, self.journal)
        while not source.exhausted:
            most = submitter.argument_memory.room(FEED_GROUP_MAX, window.closed)
            places = window.acquire(most)
            if not places:
                break  # the window closed: terminate, or the iterator was dropped
            items = source.take(places)
            if places > len(items):  # replayed outcomes hold their place like tasks
                window.release(places - len(items))
            if self.whole_chunks > 1 and source.sequence is None:  # (a list cannot raise)
                items, self.held = _whole_chunks(self.held, items, self.whole_chunks, source)
            for group, errors in submitter.groups(self.job, self.count, items, self.journal,
                                                  blocks):
                submitter.post(SubmitTasks(group, errors))
            self.count += len(items)


class _InputSource:
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

    def take(self, places: int) -> "list[Any] | tuple[Any, ...]":
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
        except BaseException as exc:  # the user's iterable raised
            self.error = exc
            self.exhausted = True
        return items


def _whole_chunks(held: list[Any], items: "list[Any] | tuple[Any, ...]", chunk: int,
                  source: _InputSource) -> tuple[list[Any], list[Any]]:
    """(inputs to submit now, inputs held back): whole chunks of `chunk` inputs, and the last,
    shorter one once the input has ended without an error."""
    taken = held + list(items)
    if source.exhausted and source.error is None:
        return taken, []
    cut = len(taken) - len(taken) % chunk
    return taken[:cut], taken[cut:]
