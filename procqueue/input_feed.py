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

An iterator's inputs are gathered into groups, and the feeder cannot hand a group over while
it waits inside the iterator for the next input.  So a watch thread (FeedWatch, one per pool)
hands over what a group has gathered once the iterator has given nothing for a look or two
(FEED_STALL_CHECK_S): an input never waits for the next one to be produced, as in
multiprocessing.Pool.imap, where a generator that waits for the results of the inputs it
gave (a feedback loop) works.
"""

from __future__ import annotations

import threading
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
# How often the watch looks at an iterator's group: inputs gathered while the iterator gives
# nothing for a whole look are handed over then (at most ~2 looks after they were produced).
# While no group holds inputs not handed over, the looks grow apart, up to FEED_LOOK_MAX_S: a
# look wakes a thread (~30 us of CPU here), and 500 a second cost 1.5% of a core all along.
FEED_STALL_CHECK_S = 0.002
FEED_LOOK_MAX_S = 0.016


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
    not held back for the rest of their chunk, nor for the next input: `watch` looks at the
    feed (see FeedWatch; without one, the feed has a watch of its own)."""

    def __init__(self, stream: ResultStream, iterable: Iterable[Any],
                 submit: Callable[[int, Inputs], None],
                 finish: Callable[[], None], *,
                 count_known: Callable[[int], None] | None = None,
                 room: Callable[[int, Callable[[], bool]], int] | None = None,
                 whole_chunks: int = 1, wait_for_whole_chunks: bool = False,
                 watch: "FeedWatch | None" = None) -> None:
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
        self.watch = watch
        # An iterator's inputs taken for the group being gathered, of which the watch has
        # submitted the first `handed`; one submit at a time (the feeder's or the watch's),
        # under `handover`, so that inputs go in order and `count` is theirs.
        self.handover = threading.Lock()
        self.group: list[Any] = []
        self.handed = 0
        self.watch_error: BaseException | None = None
        # the input has ended here (run, or stop_taking on a cancel): nothing more is
        # submitted, by the feeder or the watch
        self.cut = False

    def run(self) -> None:
        """Feed until the input ends or the window closes, then tell the stream how many
        inputs there were (and the backend, through finish)."""
        input_error: BaseException | None = None
        unwatch = self._watched()
        try:
            self._feed()
            input_error = self.source.error  # the inputs taken before it still run
        except BaseException as exc:  # e.g. a key function, a journal, a bug of ours
            input_error = self.source.error or exc
        finally:
            try:
                self._tell_the_end(input_error)
            finally:
                unwatch()  # after `cut`: a look under way submits nothing more

    def _tell_the_end(self, input_error: BaseException | None) -> None:
        """The input has ended: how many inputs there were, to the stream and the backend."""
        if self.held:
            self.window.release(len(self.held))
        with self.handover:
            if not self.cut:  # (else told already, by stop_taking)
                self.cut = True
                if self.count_known is not None:
                    self.count_known(self.count)
                # (not exhausted: the window closed, the pool terminated or broke)
                self.stream.input_finished(self.count, input_error,
                                           complete=self.source.exhausted)
                self.finish()

    def stop_taking(self) -> None:
        """The call was cancelled: an iterator's input ends with the inputs submitted so far,
        now, though the feeder may be waiting inside the iterator for one that never comes
        (stdin still open), so that the consumer gets their outcomes and no more; what the
        iterator gives from now on is not taken.  A list's inputs are all reported still
        (each comes out cancelled).  Light enough for a signal handler: no submit here."""
        if self.source.sequence is not None:
            return
        with self.handover:
            if self.cut:
                return
            self.cut = True
            self.stream.input_finished(self.count)
            self.finish()

    def _feed(self) -> None:
        window, source = self.window, self.source
        while not source.exhausted and not self.cut:
            most = FEED_GROUP_MAX if self.room is None else self.room(FEED_GROUP_MAX,
                                                                       window.closed)
            places = window.acquire(most)
            # the window closed (terminate, cancel, the iterator dropped), or the call was
            # cancelled while the feeder waited for room
            if not places or self.cut:
                break
            if source.sequence is not None:
                items: Inputs = source.take(places)
                taken = len(items)
            else:
                items, taken = self._take_from_iterator(places)
            if places > taken:  # the input ended
                window.release(places - taken)
            if self._holds_whole_chunks():
                items, self.held = _whole_chunks(self.held, items, self.whole_chunks, source)
            if items:
                with self.handover:
                    if not self.cut:
                        self._submit_now(items)

    def _holds_whole_chunks(self) -> bool:
        return self.whole_chunks > 1 and (self.source.sequence is not None
                                          or self.wait_for_whole_chunks)

    def _take_from_iterator(self, places: int) -> tuple[list[Any], int]:
        """(the inputs of the group the watch did not submit, how many were taken)."""
        self.source.take_into(self.group, places)
        with self.handover:
            if self.watch_error is not None:
                raise self.watch_error
            group, handed = self.group, self.handed
            self.group, self.handed = [], 0
        return group[handed:], len(group)

    def _submit_now(self, items: Inputs) -> None:
        """Under `handover`."""
        self.submit(self.count, items)
        self.count += len(items)

    # ---- the watch: an iterator's gathered inputs, handed over while it is slow -------------

    def _watched(self) -> Callable[[], None]:
        """Have the feed watched where inputs could wait for the next one; returns how to
        stop (once `cut`: by then the watch submits nothing)."""
        if self.source.sequence is not None or self._holds_whole_chunks():
            return lambda: None
        own = self.watch is None
        watch = FeedWatch() if self.watch is None else self.watch
        watch.add(self)

        def unwatch() -> None:
            watch.remove(self)
            if own:
                watch.close()
        return unwatch

    def hand_over_stalled(self, looked_at: tuple[list[Any] | None, int]
                          ) -> tuple[tuple[list[Any] | None, int], bool]:
        """The watch's look: submit the group's inputs not submitted yet if it has not grown
        since the last look (the iterator is slow, or waits for something); returns this
        look, and whether inputs wait to be handed over still (to look again soon).  A
        failure to submit is the feeder's to raise (it ends the input).  A call that halted
        ends its input here (stop_taking)."""
        if self.stream.input_cut:
            self.stop_taking()
        with self.handover:
            group, size = self.group, len(self.group)
            if self.watch_error is not None or self.cut:
                return (group, size), False
            if (group, size) == looked_at and size > self.handed and not self.window.closed():
                items = group[self.handed:size]
                self.handed = size
                try:
                    self._submit_now(items)
                except BaseException as exc:  # noqa: BLE001 - raised by the feeder
                    self.watch_error = exc
            return (group, size), size > self.handed


class FeedWatch:
    """A thread that looks at the iterator-fed calls it is given (InputFeed.hand_over_stalled)
    every FEED_STALL_CHECK_S, less often while none holds inputs to hand over (up to
    FEED_LOOK_MAX_S), and waits without looking while it has none.  One per pool,
    started with its first such call and stopped by close(): a thread per call made each
    imap over a generator ~0.15 ms longer.  `thread_ending` is called as the thread ends."""

    def __init__(self, thread_ending: Callable[[], None] | None = None) -> None:
        # reentrant: the pool's finalizer (close) may run in this thread, from a collection
        # of garbage while it holds the lock
        self._cond = threading.Condition(threading.RLock())
        self._looks: dict[InputFeed, tuple[list[Any] | None, int]] = {}
        self._thread: threading.Thread | None = None
        self._closed = False
        self._closing = threading.Event()  # cuts a look's interval short: close() joins
        self._thread_ending = thread_ending

    def add(self, feed: InputFeed) -> None:
        with self._cond:
            if self._closed:
                return  # the pool is shutting down: its calls end
            self._looks[feed] = (None, 0)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="procqueue-feed-watch")
                self._thread.start()
            self._cond.notify()

    def remove(self, feed: InputFeed) -> None:
        with self._cond:
            self._looks.pop(feed, None)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._closing.set()
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _run(self) -> None:
        interval = FEED_STALL_CHECK_S
        try:
            while self._wait_for_feeds():
                if self._closing.wait(interval):
                    break  # closed: the pool's calls are over, nothing is submitted any more
                pending = self._look_at_each()
                interval = FEED_STALL_CHECK_S if pending else min(2 * interval,
                                                                  FEED_LOOK_MAX_S)
        finally:
            if self._thread_ending is not None:
                self._thread_ending()

    def _look_at_each(self) -> bool:
        """One look at every feed; whether one holds inputs not handed over yet."""
        pending = False
        looks = self._looks.copy()  # (one step: add and remove may run meanwhile)
        for feed, looked_at in looks.items():
            try:
                look, waiting = feed.hand_over_stalled(looked_at)
            except BaseException as exc:  # noqa: BLE001 - that feed's to raise
                feed.watch_error, look, waiting = exc, looked_at, False
            pending = pending or waiting
            with self._cond:  # not back in, if its call ended meanwhile (remove)
                if feed in self._looks:
                    self._looks[feed] = look
        return pending

    def _wait_for_feeds(self) -> bool:
        """Wait while there is nothing to look at; False once closed."""
        with self._cond:
            while not self._looks and not self._closed:
                self._cond.wait()
            return not self._closed


class InputSource:
    """A feeder's view of imap's iterable.  A list, tuple or range is sliced (no Python step
    per input); any other iterable is advanced item by item, and a group stops growing once
    its first item waited FEED_GROUP_MAX_WAIT_S (what it gathered while the iterator is slow
    is handed over by the feed's watch)."""

    def __init__(self, iterable: Iterable[Any]) -> None:
        # exact types: a subclass may iterate differently from how it slices
        self.sequence = (cast("list[Any] | tuple[Any, ...] | range", iterable)
                         if type(iterable) in (list, tuple, range) else None)
        self.iterator = iter(iterable) if self.sequence is None else None
        self.position = 0
        self.exhausted = False
        self.error: BaseException | None = None  # what the user's iterable raised

    def take(self, places: int) -> Inputs:
        """A list's, tuple's or range's next `places` inputs (an iterator's: take_into)."""
        assert self.sequence is not None
        items = self.sequence[self.position:self.position + places]
        self.position += len(items)
        self.exhausted = self.position >= len(self.sequence)
        return items if type(items) is not range else list(items)

    def take_into(self, items: list[Any], places: int) -> None:
        """An iterator's next inputs, appended to `items` one by one (another thread may take
        them from it meanwhile: each append is one step) until it holds `places`."""
        iterator = self.iterator
        assert iterator is not None
        append = items.append
        deadline = time.monotonic() + FEED_GROUP_MAX_WAIT_S
        try:
            while len(items) < places:
                append(next(iterator))
                if time.monotonic() > deadline:
                    break
        except StopIteration:
            self.exhausted = True
        except BaseException as exc:  # noqa: BLE001 - the user's iterable: reported in order
            self.error = exc
            self.exhausted = True


def _whole_chunks(held: list[Any], items: Inputs, chunk: int,
                  source: InputSource) -> tuple[list[Any], list[Any]]:
    """(inputs to submit now, inputs held back): whole chunks of `chunk` inputs, and the last,
    shorter one once the input has ended without an error."""
    taken = held + list(items)
    if source.exhausted and source.error is None:
        return taken, []
    cut = len(taken) - len(taken) % chunk
    return taken[:cut], taken[cut:]
