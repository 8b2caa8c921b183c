"""What caller threads post to the supervisor, how they wake it, and when they let it run.

Caller threads (the Pool API, feeders, a future's cancel(), even a signal handler) never touch
task state: they append a Command to the Inbox and write one byte to its wake-up pipe, which
the supervisor's select() watches (one byte until the supervisor drains it, not one per
post).  The supervisor thread alone takes the commands out.  Threads that post tasks step
aside while a turn of the supervisor runs long (SupervisorTurn), so that it gets the GIL.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import deque
from typing import NamedTuple

from .tasks import Block, Job, Task


# NamedTuples, not frozen dataclasses: as immutable and matched the same way (case
# SubmitTasks(tasks, errors)), and a sixth of the cost to define at import (~0.15 ms each
# against ~1 ms), which every program creating a pool pays.  Nothing compares commands.

class SubmitTasks(NamedTuple):
    tasks: list[Task | Block]
    errors: dict[int, BaseException]  # task id -> error known before dispatch (bad argument)


class OpenJob(NamedTuple):
    job: Job  # a lazily fed call: the pool is not drained until CloseJob


class CloseJob(NamedTuple):
    job: Job


class CancelJob(NamedTuple):
    job: Job
    kill_running: bool  # also kill its running tasks' workers
    stop_input: bool  # stop the feeder too (the caller dropped the iterator)


class CancelTask(NamedTuple):
    task: Task
    running: bool = False  # it may be running: kill its worker if so


class Interrupt(NamedTuple):
    last_job_id: int  # the calls made before the caller's Ctrl-C: their ids are at most this
    kill_running: bool = True  # False: their running tasks finish (shutdown(cancel_futures))


class Close(NamedTuple):
    pass


class Terminate(NamedTuple):
    pass


Command = (SubmitTasks | OpenJob | CloseJob | CancelJob | CancelTask | Interrupt | Close
           | Terminate)
# What is posted: a Command, or a Task alone, which stands for SubmitTasks([task], {}) (a
# submit() call posts one task, and a tuple and a list per call were a tenth of its cost).
Posted = Command | Task


class Inbox:
    """Commands in posting order, and the pipe that says there are some."""

    def __init__(self) -> None:
        self._commands: deque[Posted] = deque()
        self.wakeup = WakeupPipe()

    def post(self, command: Posted) -> None:
        """Any thread."""
        self._commands.append(command)
        if not self.wakeup.pending:  # else the supervisor is woken already: no call
            self.wakeup.wake()

    def take_all(self) -> list[Command]:
        """Supervisor thread: the commands posted so far, runs of SubmitTasks and Tasks
        joined into one SubmitTasks (many submit() calls: one accept).

        Order matters: drain the pipe (which re-arms it), then the deque.  A post that lands
        after the pipe is drained writes a fresh byte that this drain cannot eat; one that
        landed before is in the deque by the time we empty it."""
        self.wakeup.drain()
        commands = self._commands
        taken: list[Command] = []
        while commands:
            command = commands.popleft()
            if isinstance(command, Task) or (isinstance(command, SubmitTasks) and commands
                                             and isinstance(commands[0], _SUBMITS)):
                command = _joined_submits(command, commands)
            taken.append(command)
        return taken

    def close(self) -> None:
        self.wakeup.close()


_SUBMITS = (SubmitTasks, Task)


def _joined_submits(first: SubmitTasks | Task, commands: "deque[Posted]") -> SubmitTasks:
    """`first` and the SubmitTasks and Tasks right behind it, as one, in order."""
    tasks: list[Task | Block]
    errors: dict[int, BaseException]
    if isinstance(first, Task):
        tasks, errors = [first], {}
    else:
        tasks, errors = list(first.tasks), dict(first.errors)
    while commands and isinstance(commands[0], _SUBMITS):
        more = commands.popleft()
        if isinstance(more, Task):
            tasks.append(more)
        else:
            assert isinstance(more, SubmitTasks)
            tasks += more.tasks
            errors.update(more.errors)
    return SubmitTasks(tasks, errors)


TURN_PATIENCE_MIN_S = 0.001  # the least patience: a pool of many workers
TURN_WAIT_S = 0.02  # the longest a caller waits for one turn
HAND_OVER_POLL_S = 0.0001  # how often a caller handing over looks whether the turn began
_HAS_GIL = getattr(sys, "_is_gil_enabled", lambda: True)()  # False: a free-threaded build


class SupervisorTurn:
    """Caller threads step aside while a turn of the supervisor's loop runs long.

    CPython hands the GIL from a thread that runs Python without pause (a loop of submit()
    calls, a feeder making tasks) to one that waits for it only after the switch interval
    (5 ms).  The supervisor gives the GIL up at every read and write of its turn, and such a
    caller takes it each time: the supervisor then gets one system call done per 5 ms while
    the workers wait for their next batch (64 workers of 1 ms tasks, 96,000 submit() calls in
    a loop: the first result came after 0.5 s, when the loop ended).  So a caller thread about
    to post first waits, without the GIL, for a turn older than `patience_s` to end.

    patience_s: how long a turn may run before a worker is likely to wait on it.  A worker
    holds the batch it runs and, while enough is queued, one more (dispatch.py): one to two
    batches of chunking.TARGET_BATCH_S (25 ms), and N workers' batches end at spread-out
    times, so one of them is down to its last every 2 x 25 ms / N: 25 ms with 2 workers (their
    turns rarely last so long, and there the caller's wait would only cost it time: its work
    and the supervisor's overlap at every system call), 1 ms (the floor) from 50 workers up.
    Measured on 16 cores (bench/README.md): 64 workers, submit() 0.71 -> 0.94 of the ideal.
    Never in the supervisor's own thread (a done-callback that submits), at most TURN_WAIT_S
    per turn (a turn held up by a callback that blocks), and not where there is no GIL."""

    def __init__(self, patience_s: float) -> None:
        self.patience_s = patience_s
        self._lock = threading.Lock()  # held by the supervisor through each turn
        self.running = False
        self.number = 0
        self.started = 0.0
        self.supervisor_thread = 0  # its ident, set when the thread starts
        self._not_waited_for = -1  # the number of a turn a caller waited TURN_WAIT_S for

    @classmethod
    def for_workers(cls, workers: int, batch_s: float) -> "SupervisorTurn":
        """The turn of a supervisor of `workers` workers, each fed batches of `batch_s`."""
        return cls(max(TURN_PATIENCE_MIN_S, 2 * batch_s / max(workers, 1)))

    def begin(self) -> None:
        """Supervisor thread: a turn starts (its select() returned)."""
        if not self._lock.acquire(timeout=TURN_WAIT_S):
            # A caller took it and never gave it back: Ctrl-C landed between its acquire and
            # its release.  Waiting would hang the pool; a fresh lock serves the next waits.
            self._lock = threading.Lock()
            self._lock.acquire()
        self.number += 1
        self.started = time.monotonic()
        self.running = True

    def end(self) -> None:
        """Supervisor thread: the turn is over."""
        self.running = False
        self._lock.release()

    def hand_over(self, posted_in: int) -> None:
        """Any thread that has just posted the first part of a call and has more of it to
        make (the rest of a map's inputs): wait, without the GIL, for the turn that takes the
        post to begin and end.  Woken by the post, the supervisor would otherwise wait for the
        GIL until this thread has made all of it (or the switch interval has passed): a map
        of 96,000 numbers on 64 workers sent its first batch 3.4-5.4 ms after the call
        instead of 0.35-1.2 (bench/README.md).  `posted_in`: `number` read before the
        post.  At most TURN_WAIT_S for each of the two waits."""
        if not _HAS_GIL or threading.get_ident() == self.supervisor_thread:
            return
        deadline = time.monotonic() + TURN_WAIT_S
        while self.number == posted_in:  # no turn has begun since the post
            if time.monotonic() >= deadline:
                return
            time.sleep(HAND_OVER_POLL_S)
        self._wait_for_the_end()

    def step_aside(self) -> None:
        """Any thread, holding no lock the supervisor may need: wait for a long turn to end."""
        if (not self.running or not _HAS_GIL
                or time.monotonic() - self.started < self.patience_s
                or threading.get_ident() == self.supervisor_thread):
            return
        number = self.number
        if number == self._not_waited_for:
            return
        if not self._wait_for_the_end():
            self._not_waited_for = number

    def _wait_for_the_end(self) -> bool:
        """Wait, without the GIL, for the turn running now to end (at most TURN_WAIT_S);
        whether it did."""
        if self._lock.acquire(timeout=TURN_WAIT_S):
            self._lock.release()
            return True
        return False


class WakeupPipe:
    """The pipe post() writes a byte to so that the supervisor's select() returns.

    Writing is guarded against use after close: once the pipe is closed, its descriptor
    numbers are free for the program to reuse (a file, a socket, multiprocessing's resource
    tracker pipe), and a late post() (terminate() or garbage collection after join()) must not
    write a stray NUL byte into whatever now holds that number."""

    def __init__(self) -> None:
        self.reader, self._writer = os.pipe()
        os.set_blocking(self._writer, False)
        os.set_blocking(self.reader, False)
        self.pending = False  # a byte is in the pipe: one per batch of commands is enough
        self._closed = False
        self._lock = threading.Lock()  # taken once per wake-up byte, not per post()

    def wake(self) -> None:
        """Any thread."""
        if self.pending:
            return
        with self._lock:
            if self._closed or self.pending:
                return
            self.pending = True
            try:
                os.write(self._writer, b"\0")
            except BlockingIOError:
                pass  # full: a wake-up is pending anyway

    def drain(self) -> None:
        """Supervisor thread: empty the pipe and re-arm wake()."""
        try:
            while os.read(self.reader, 4096):
                pass
        except BlockingIOError:
            pass
        self.pending = False

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            os.close(self.reader)
            os.close(self._writer)
