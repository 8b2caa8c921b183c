"""What caller threads post to the supervisor, and how they wake it.

Caller threads (the Pool API, feeders, a future's cancel(), even a signal handler) never touch
task state: they append a Command to the Inbox and write one byte to its wake-up pipe, which
the supervisor's select() watches (one byte until the supervisor drains it, not one per
post).  The supervisor thread alone takes the commands out.
"""

from __future__ import annotations

import os
import threading
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


class Close(NamedTuple):
    pass


class Terminate(NamedTuple):
    pass


Command = SubmitTasks | OpenJob | CloseJob | CancelJob | CancelTask | Close | Terminate
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
