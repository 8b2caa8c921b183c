"""In a worker: what waits behind a task that runs long goes back to the supervisor.

multiprocessing and concurrent.futures feed every worker from one shared queue, so a task that
runs for minutes (or hangs, with no timeout) keeps only itself from finishing.  procqueue sends
each worker batches of its own, many tiny tasks each and one batch ahead: a task that runs long
would keep the tasks behind it in the same worker waiting as long, while other workers have
nothing to do.  So a thread of the worker watches: once the batch running has not passed one of
its looks for GIVE_BACK_AFTER_S (a task runs long), the tasks of the batch it has not reached
yet, and the batches waiting in the pipe, go back to the supervisor as skipped, which queues
them again for any worker.

No task runs twice: a batch of tasks starts each task under `lock` (`start`), and a block looks
at what went back at its looks (worker._BlockReport.check), which come before every input
after one that ran long (timed blocks), or at the end of each stretch of inputs (untimed
blocks, whose looks set `until`, where the next stretch ends: what goes back starts there).
A look costs no lock: it writes the time of the look (`looked_at`) and only then reads
`claimed`, which the thread sets before it reads `looked_at` (one thread runs Python code at
a time, so each sees the other's write in that order): either the thread sees the new look
and gives nothing back, or the look sees the claim and waits for the lock.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Callable

from .protocol import (BatchResults, BlockResults, RunBlock, RunTasks, dumps_message,
                       dumps_plain_data, loads_message)

GIVE_BACK_AFTER_S = 0.5  # a batch this long past its last look has what waits behind it go back
MIN_SLEEP_S = 0.05  # the watching thread sleeps at least this long between looks


class HeldWork:
    """What a worker holds: the batch running (under `lock`), and the messages the watching
    thread read from the pipe and kept for the serve loop, in order."""

    def __init__(self, conn: Any, receive_fds: Callable[[Any, tuple[int, ...]], dict[int, int]],
                 unsent: Any, slot_state: Any = None, position_field: int = 0,
                 watch: bool = True) -> None:
        self._watching = watch  # False: a batch run on its own (no serve loop), no thread
        self.conn = conn
        self._receive_fds = receive_fds
        self._unsent = unsent  # the SIGTERM handler's view (worker.UNSENT): no send over it
        self._slot_state = slot_state  # a block's running position is in it
        self._position_field = position_field
        self.lock = threading.Lock()
        self.pending: deque[tuple[Any, dict[int, int] | None]] = deque()
        self._thread: threading.Thread | None = None
        self.batch: RunTasks | RunBlock | None = None
        self.results: Any = None  # a batch of tasks' results not sent yet (worker._Columns)
        self._new_results: Callable[[], Any] | None = None
        self._size = 0  # tasks or inputs in the batch
        self._timed = False
        self.position = -1  # a batch of tasks': the task running (or last run)
        self.looked_at: float | None = None  # time.monotonic() of the last look or task start
        self.until = 0  # a block's: where the stretch it runs ends (its next look)
        self.given_back_from: int | None = None  # positions from here on went back
        # Set by the watching thread (lock held) before it reads a block's last look: a look
        # that then sees it (or given_back_from) waits for the lock (see module docstring)
        self.claimed = False
        self._keep_all = False  # the batch's tasks have arguments mapped here: not given back
        self._send_done_before: Callable[[int], None] | None = None  # a block's

    # ---- the serve loop's side (the main thread) -------------------------------------------

    def next_message(self) -> tuple[Any, dict[int, int] | None]:
        """The next message: one the thread read first, else the pipe's next.  No lock:
        between batches (after `end_locked`) the thread reads nothing from the pipe."""
        if self.pending:
            return self.pending.popleft()
        return loads_message(self.conn.recv_bytes()), None

    # begin_*: no lock (a block of tiny inputs takes microseconds): the thread does nothing
    # until the batch's first look or task start sets `looked_at`

    def begin_tasks(self, batch: RunTasks, results: Any, new_results: Callable[[], Any],
                    keep_all: bool) -> None:
        self._begin(batch, len(batch.items), timed=True)
        self.results, self._new_results, self._keep_all = results, new_results, keep_all
        self._start_watching()

    def begin_block(self, batch: RunBlock, size: int, timed: bool,
                    send_done_before: Callable[[int], None]) -> None:
        """`send_done_before(position)` sends the block's inputs done before `position`."""
        self._begin(batch, size, timed)
        self._send_done_before = send_done_before
        self._start_watching()

    def start(self, position: int) -> bool:
        """Before a batch of tasks' task at `position` (lock held): False if it went back."""
        if self.given_back_from is not None and position >= self.given_back_from:
            return False
        self.position = position
        self.looked_at = time.monotonic()
        return True

    def end_locked(self) -> None:
        """The batch sent its last results (lock held)."""
        self.batch = self.results = self._new_results = self.looked_at = None
        self._send_done_before = None

    def _begin(self, batch: RunTasks | RunBlock, size: int, timed: bool) -> None:
        self.batch, self._size, self._timed = batch, size, timed
        self.position, self.until = -1, 0
        self.looked_at, self.given_back_from, self._keep_all = None, None, False

    def _start_watching(self) -> None:
        # (at the first batch: not on the way to the worker's Ready)
        if self._thread is None and self._watching:
            self._thread = threading.Thread(target=self._watch, name="procqueue-give-back",
                                            daemon=True)
            self._thread.start()

    # ---- the watching thread ------------------------------------------------------------------

    def _watch(self) -> None:
        """Wakes every GIVE_BACK_AFTER_S or so (no event per batch: a block of tiny inputs
        takes microseconds, and setting and clearing one cost ~1 us of it)."""
        sleep_s = GIVE_BACK_AFTER_S
        while True:
            time.sleep(sleep_s)
            with self.lock:
                self.claimed = True  # before the look is read: see _BlockReport.check
                try:
                    sleep_s = self._look()
                except (OSError, EOFError):
                    return  # the supervisor is gone: the worker ends anyway
                finally:
                    self.claimed = False

    def _look(self) -> float:
        """Give back what waits if the batch is GIVE_BACK_AFTER_S past its last look; how
        long to sleep until the next look."""
        looked_at = self.looked_at
        if looked_at is None:
            return GIVE_BACK_AFTER_S
        late = time.monotonic() - looked_at
        if late < GIVE_BACK_AFTER_S:
            # Sleep until the batch could be that far past its last look, no more often
            return max(MIN_SLEEP_S, GIVE_BACK_AFTER_S - late)
        self._give_back()
        return GIVE_BACK_AFTER_S

    def _give_back(self) -> None:  # with self.lock held, the batch running long
        if self._unsent.dying or self._unsent.sending:
            return  # the SIGTERM handler is sending: the worker is about to die anyway
        batch = self.batch
        start = self._start_of_what_goes_back()
        rest = start is not None and start < self._size
        waiting = self._batches_waiting_in_the_pipe()
        if not rest and not waiting:
            return
        self._unsent.sending = True
        try:
            if rest:
                assert batch is not None and start is not None
                self.given_back_from = start
                if isinstance(batch, RunBlock) and self._send_done_before is not None:
                    self._send_done_before(int(self._slot_state[self._position_field]))
                self.conn.send_bytes(dumps_message(self._skipped_from(batch, start)))
            for given in waiting:
                self.conn.send_bytes(dumps_message(self._skipped_from(given, 0, final=True)))
        finally:
            self._unsent.sending = False

    def _start_of_what_goes_back(self) -> int | None:
        if self.given_back_from is not None or self._keep_all or self.batch is None:
            return None
        if isinstance(self.batch, RunTasks):
            return self.position + 1
        running = int(self._slot_state[self._position_field])
        return max(running + 1, self.until)

    def _skipped_from(self, batch: RunTasks | RunBlock, start: int, final: bool = False
                      ) -> BatchResults | BlockResults:
        """The message that gives `batch`'s tasks or inputs from `start` on back (with a
        batch of tasks' results finished so far)."""
        if isinstance(batch, RunTasks):
            if final:
                return BatchResults(batch.batch_id, [], [], [], [], [], True,
                                    skipped=[task_id for task_id, _ in batch.items])
            assert self._new_results is not None
            message: BatchResults = self.results.message(final=False)
            message.skipped = [task_id for task_id, _ in batch.items[start:]]
            self.results = self._new_results()
            return message
        # (no values: `first` says nothing here)
        return BlockResults(batch.batch_id, 0, dumps_plain_data([]) or b"", {}, 0,
                            [] if (batch.timed if final else self._timed) else None, 0.0,
                            final, skipped=start)

    def _batches_waiting_in_the_pipe(self) -> list[RunTasks | RunBlock]:
        """Read what waits in the pipe: batches go back, unless arguments of theirs are
        mapped here or they bring their function (the supervisor sends it to a worker once);
        anything else (and everything after it) is kept, in order, for the serve loop."""
        given: list[RunTasks | RunBlock] = []
        while not self.pending and self.conn.poll(0):
            message = loads_message(self.conn.recv_bytes())
            if isinstance(message, (RunTasks, RunBlock)) and message.fn_payload is None \
                    and not getattr(message, "oob_task_ids", ()):
                given.append(message)
                continue
            fds = (self._receive_fds(self.conn, message.oob_task_ids)
                   if isinstance(message, RunTasks) else None)
            self.pending.append((message, fds))
        return given
