"""The supervisor's loop as a unit, with fake workers: threads of this process that run the
real worker loop (worker.serve) over a real pipe, whose "process" ends when the test says so.
No process is started, so these tests see the loop's decisions alone: every task ends once,
close() retires the workers, a worker that dies fails only the task it was running and is
replaced."""
from __future__ import annotations

import itertools
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from typing import Any

import psutil
import pytest

from procqueue.chunking import ChunkSizer
from procqueue.config import PoolConfig
from procqueue.errors import WorkerCrashedError
from procqueue.protocol import CallKind, Ready, dumps_argument, dumps_message, pickled_function
from procqueue.inbox import Close, SubmitTasks
from procqueue.supervisor import Supervisor
from procqueue.tasks import Job, Task, new_id
from procqueue.worker import CURRENT_TASK, serve
from procqueue.worker_slots import Slot, WorkerSlots

FAKE_PIDS = itertools.count(10**9)  # above pid_max: never a real process's pid
RELEASE = threading.Event()  # lets the task a test holds running finish


def square(x: int) -> int:
    return x * x


def square_but_hold_three(x: int) -> int:
    if x == 3:
        RELEASE.wait(10)
    return x * x


class ThreadProcess:
    """What the supervisor reads of a worker process (pid, sentinel, join, exitcode,
    close), played by a thread running the real worker loop on its end of the pipe."""

    def __init__(self, conn: Any, slot_state: Any) -> None:
        self.pid = next(FAKE_PIDS)
        self.exitcode: int | None = None
        self._conn = conn
        self._sentinel_r, self._sentinel_w = os.pipe()  # readable once the "process" ended
        self.sentinel = self._sentinel_r
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, args=(slot_state,), daemon=True,
                                        name=f"fake-worker-{self.pid}")
        self._thread.start()

    def _run(self, slot_state: Any) -> None:
        try:
            self._conn.send_bytes(dumps_message(Ready(self.pid)))
            serve(self._conn, slot_state)  # returns on Stop, or on EOF of its pipe
            self._end(0)
        except (OSError, EOFError, ValueError):  # its pipe was closed under it: killed
            self._end(-signal.SIGKILL)

    def die(self, sig: int = signal.SIGKILL) -> None:
        """As a process killed by `sig`: gone at once, whatever its thread is doing."""
        self._end(-sig)

    def _end(self, exitcode: int) -> None:
        with self._lock:
            if self.exitcode is not None:
                return
            self.exitcode = exitcode
            self._conn.close()
            os.close(self._sentinel_w)

    def join(self, timeout: float | None = None) -> None:
        if self.exitcode is None:
            self._thread.join(timeout)

    def close(self) -> None:
        os.close(self._sentinel_r)


class ThreadWorkers(WorkerSlots):
    """WorkerSlots whose workers are ThreadProcesses; signals end them instead of going to
    a pid (their pids are fake)."""

    def __init__(self, config: PoolConfig) -> None:
        super().__init__(multiprocessing.get_context("fork"), list(config.cpus), False, {},
                         None, maxtasksperchild=config.maxtasksperchild)
        self.started_processes: list[ThreadProcess] = []

    def _start_process(self, slot: Slot, child_end: Any, parent_end: Any) -> ThreadProcess:
        # The caller closes child_end, as a real start leaves it to the child: keep a copy.
        own_end = multiprocessing.connection.Connection(os.dup(child_end.fileno()))
        process = ThreadProcess(own_end, slot.state)
        self.started_processes.append(process)
        return process

    def _signal_group(self, slot: Slot, sig: int) -> None:
        if slot.process is not None and sig in (signal.SIGTERM, signal.SIGKILL):
            slot.process.die(sig)

    def _kill_leftover_group(self, slot: Slot) -> None:
        pass  # a thread leaves no process group behind


class RecordingSink:
    def __init__(self) -> None:
        self.outcomes: dict[int, list[tuple[bool, Any]]] = {}
        self.lock = threading.Lock()

    window = None  # not a lazily fed call

    def starting(self, task: Task) -> bool:
        return True

    def deliver(self, task: Task, ok: bool, value: Any) -> None:
        with self.lock:
            self.outcomes.setdefault(task.index, []).append((ok, value))

    def deliver_all(self, succeeded: list[tuple[Task, Any]]) -> None:
        for task, value in succeeded:
            self.deliver(task, True, value)


def submit(supervisor: Supervisor, fn: Any, inputs: list[Any]) -> tuple[RecordingSink,
                                                                          list[Task]]:
    sink = RecordingSink()
    fn_id, payload = pickled_function(fn)
    job = Job(new_id(), fn_id, payload, CallKind.ONE, sink, timeout_s=None,
              sizer=ChunkSizer(2, 1))
    tasks = [Task(new_id(), job, i, dumps_argument(x), x) for i, x in enumerate(inputs)]
    supervisor.post(SubmitTasks(list(tasks), {}))
    return sink, tasks


def started_supervisor(**options: Any) -> tuple[Supervisor, ThreadWorkers]:
    config = PoolConfig.build(2, pin=False, **options)
    workers = ThreadWorkers(config)
    supervisor = Supervisor(config, None, {}, workers=workers)
    supervisor.start()
    assert supervisor.spawned.wait(10)
    return supervisor, workers


@pytest.mark.timeout(30)
def test_every_task_ends_once_and_close_retires_the_workers() -> None:
    children_before = {p.pid for p in psutil.Process().children(recursive=True)}
    supervisor, workers = started_supervisor()
    sink, _ = submit(supervisor, square, list(range(40)))
    supervisor.post(Close())
    assert supervisor.stopped.wait(20)
    assert sink.outcomes == {i: [(True, i * i)] for i in range(40)}
    stats = supervisor.statistics()
    assert (stats.state, stats.tasks_submitted, stats.tasks_succeeded) == ("stopped", 40, 40)
    assert [p.exitcode for p in workers.started_processes] == [0, 0]  # each asked to Stop
    children_now = {p.pid for p in psutil.Process().children(recursive=True)}
    assert children_now <= children_before  # the loop started no process


@pytest.mark.timeout(30)
def test_a_worker_that_dies_fails_only_the_task_it_ran_and_is_replaced() -> None:
    RELEASE.clear()
    supervisor, workers = started_supervisor(retries=0)
    sink, tasks = submit(supervisor, square_but_hold_three, list(range(8)))
    deadline = time.monotonic() + 10
    holder = None
    while holder is None and time.monotonic() < deadline:
        holder = next((slot for slot in workers.slots
                       if slot.state[CURRENT_TASK] == tasks[3].id), None)
        time.sleep(0.005)
    assert holder is not None, "task 3 never started"
    dead_pid = holder.process.pid
    holder.process.die(signal.SIGKILL)
    supervisor.post(Close())
    assert supervisor.stopped.wait(20)
    # Only now may its thread finish the task (and find its pipe gone): a process killed
    # while running task 3 never goes on to mark itself idle
    RELEASE.set()
    ((ok, error),) = sink.outcomes.pop(3)
    assert not ok and isinstance(error, WorkerCrashedError)
    assert (error.exitcode, error.signal, error.pid, error.index) == (-9, "SIGKILL", dead_pid, 3)
    assert sink.outcomes == {i: [(True, i * i)] for i in range(8) if i != 3}
    assert workers.restarts == 1 and len(workers.started_processes) == 3
