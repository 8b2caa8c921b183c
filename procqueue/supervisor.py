"""The supervisor: one thread that owns every task's state and every worker.

    caller threads (Pool API, feeders)            supervisor thread                 workers
    ----------------------------------            -----------------                 -------
    post(SubmitTasks | Cancel | Close | ...) ──►  inbox (deque) + wakeup pipe
                                                  ONE selector.select() over:
                                                    wakeup pipe          ◄── post()
                                                    each worker's pipe   ◄── Ready / BatchResults
                                                    each worker sentinel ◄── the process died
                                                    timeout = next deadline (task timeout,
                                                      SIGKILL escalation, retry backoff, respawn)
                                                  apply events ─► scheduler picks batches
                                                  ─► RunTasks | RunBlock on a worker's pipe ──► run
    AsyncResult / Future / iterator  ◄── the task book: deliver(task, ok, value), once per task

It never polls: everything that can happen is a readable file descriptor or a deadline.  A
worker's death is seen through its sentinel at once; the tasks it held are known (one pipe
per worker) and the one it was running is read from the slot's shared state, so only that
task is charged with the crash; the others go back to the front of the queue.

States: RUNNING ─close()─► CLOSING (drain, then stop workers) ─► STOPPED
        RUNNING/CLOSING ─terminate()─► TERMINATING (fail what is left, kill workers) ─► STOPPED
        RUNNING ─initializer keeps failing─► BROKEN ─► STOPPED
"""

from __future__ import annotations

import enum
import os
import selectors
import sys
import threading
import time
import traceback
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from .config import PoolConfig
from .errors import (InitializerError, PoolBrokenError, TaskCancelledError, TaskTimeoutError,
                     WorkerCrashedError, describe_exit)
from .protocol import (BatchResults, BlockResults, InitFailed, InitializerCall, MemfdPool,
                       LoadFunction, OutOfBand, Ready, RunBlock, RunTasks, dumps, loads,
                       restore_exception, short_repr, wire_payload)
from .admission import ConcurrencyGate, FreeMemoryGate, Gate, RateGateAdapter, rate_gate_for
from .scheduler import FailureKind, RetryPolicy, Scheduler
from .stats import TaskEvent
from .blocks import BlockRouter, Outcome, decode, explode_slot
from .task_book import TaskBook
from .timeouts import task_deadline, timeout_of, timing_task, wake_times
from .tasks import Block, Job, Task, TaskState
from .worker_slots import Batch, Slot, SlotPhase, WorkerSlots

STOP_WORKERS_TIMEOUT_S = 1.0  # close(): how long retiring workers get before being killed
REUSABLE_MEMFD_BYTES = 64 * 2**20  # finished big arguments' memfds kept for reuse, at most
WARM_UP_CRASH_LIMIT = 2  # workers lost loading one function before warm-ups stop
# Tasks queued per worker below which nothing is prefetched (see _dispatch).
PREFETCH_MIN_QUEUED_PER_WORKER = 8


class SupervisorState(enum.Enum):
    RUNNING = "running"  # takes and runs work
    CLOSING = "closing"  # close(): runs what it has, takes no more, then stops the workers
    TERMINATING = "terminating"  # terminate(): what is left fails, the workers are killed
    BROKEN = "broken"  # the pool cannot run tasks (initializer, or a bug of procqueue's)
    STOPPED = "stopped"  # every worker is gone; the loop has ended


# The only moves Supervisor._move allows.  A procqueue bug breaks the pool from any live
# state (see _run); after BROKEN, terminate() still kills what is left.
_STATE_MOVES = {
    SupervisorState.RUNNING: {SupervisorState.CLOSING, SupervisorState.TERMINATING,
                              SupervisorState.BROKEN, SupervisorState.STOPPED},
    SupervisorState.CLOSING: {SupervisorState.TERMINATING, SupervisorState.BROKEN,
                              SupervisorState.STOPPED},
    SupervisorState.TERMINATING: {SupervisorState.BROKEN, SupervisorState.STOPPED},
    SupervisorState.BROKEN: {SupervisorState.TERMINATING, SupervisorState.STOPPED},
    SupervisorState.STOPPED: set(),
}


# ---- commands posted by caller threads ---------------------------------------------------

@dataclass(frozen=True)
class SubmitTasks:
    tasks: list[Task | Block]
    errors: dict[int, BaseException]  # task id -> error known before dispatch (bad argument)


@dataclass(frozen=True)
class OpenJob:
    job: Job  # a lazily fed call: the pool is not drained until CloseJob


@dataclass(frozen=True)
class CloseJob:
    job: Job


@dataclass(frozen=True)
class CancelJob:
    job: Job
    kill_running: bool  # also kill its running tasks' workers
    stop_input: bool  # stop the feeder too (the caller dropped the iterator)


@dataclass(frozen=True)
class CancelTask:
    task: Task
    running: bool = False  # it may be running: kill its worker if so


@dataclass(frozen=True)
class Close:
    pass


@dataclass(frozen=True)
class Terminate:
    pass


Command = SubmitTasks | OpenJob | CloseJob | CancelJob | CancelTask | Close | Terminate


@dataclass(frozen=True)
class SupervisorStatistics:
    state: str
    processes: int
    tasks_submitted: int
    tasks_succeeded: int
    tasks_failed: int
    tasks_cancelled: int
    tasks_queued: int
    tasks_running: int
    retries: int
    worker_restarts: int
    recycled_for_memory: int


class Supervisor:
    def __init__(self, config: PoolConfig, initializer: InitializerCall | None,
                 env: dict[str, str], *, workers: WorkerSlots | None = None) -> None:
        """`workers` (the processes' side) defaults to this config's; a test may hand in
        slots of its own."""
        self.config = config
        self.workers = workers if workers is not None else WorkerSlots(
            config.context, list(config.cpus), config.pin, env, initializer,
            maxtasksperchild=config.maxtasksperchild,
            max_memory_per_child=config.max_memory_per_child)
        self.memfds = MemfdPool(REUSABLE_MEMFD_BYTES)  # big arguments' memfds, for reuse
        policy = RetryPolicy(config.retries, config.retry_on, config.retry_backoff_s,
                             config.retry_backoff_max_s, config.retries_on_timeout())
        self.book = TaskBook(Scheduler(pool_gates(config)), policy, self._halt)
        self.scheduler = self.book.scheduler
        self.blocks = BlockRouter(self.book, self._on_outcome)
        self.state = SupervisorState.RUNNING
        self.broken_error: BaseException | None = None
        self._open_jobs: dict[int, Job] = {}  # lazily fed calls whose input is not exhausted
        # Sinks of many-input calls (map, imap...), told if this thread dies of a bug, so
        # their callers cannot wait forever for an input it lost (see _run).
        self._watched: weakref.WeakSet[Any] = weakref.WeakSet()
        self._watched_lock = threading.Lock()
        self._inbox: deque[Command] = deque()
        self._wakeup = WakeupPipe()
        self._selector = selectors.DefaultSelector()
        self._batch_ids = iter(range(1, sys.maxsize))
        self._warm_up_crashes: dict[int, int] = {}  # fn_id -> workers lost warming it up
        self._stop_deadline: float | None = None
        self.spawned = threading.Event()  # the first workers exist (they may still be starting)
        self.stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="procqueue-supervisor",
                                        daemon=True)

    # ---- any thread ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def post(self, command: Command) -> None:
        self._inbox.append(command)
        self._wakeup.wake()

    def watch(self, sink: Any) -> None:
        """A many-input call's sink, to abort(error) if the supervisor fails (any thread)."""
        with self._watched_lock:
            self._watched.add(sink)

    def cancel_task(self, task: Task, running: bool) -> None:
        """A submit() future's cancel(): any thread, even a signal handler."""
        self.post(CancelTask(task, running))

    def join(self, timeout: float | None = None) -> bool:
        if self._thread.ident is None:
            return True
        if threading.current_thread() is self._thread:
            return self.stopped.is_set()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def statistics(self) -> SupervisorStatistics:
        # Running: started in a worker (not a task waiting in a worker's pipe behind one).
        running = sum(s.is_running_a_task() for s in self.workers.slots)
        return SupervisorStatistics(
            self.state.value, len(self.workers.slots), self.book.submitted, self.book.succeeded,
            self.book.failed, self.book.cancelled, self.scheduler.queued, running,
            self.book.retries,
            self.workers.restarts, self.workers.recycled_for_memory)

    # ---- the loop (supervisor thread only) ---------------------------------------------------

    def _takes_work(self) -> bool:
        """Tasks may still start (and so be retried): running, or closing with work left."""
        return self.state in (SupervisorState.RUNNING, SupervisorState.CLOSING)

    def _halt(self, job: Job) -> None:
        """The book's verdict: the call reached its halt policy."""
        assert job.halt is not None
        self._cancel_job(job, kill_running=job.halt.now)

    def _move(self, new: SupervisorState) -> None:
        if new not in _STATE_MOVES[self.state]:
            raise RuntimeError(f"supervisor: {self.state.name} -> {new.name}")
        self.state = new

    def _run(self) -> None:
        try:
            self._selector.register(self._wakeup.reader, selectors.EVENT_READ, self._on_wakeup)
            for slot in self.workers.slots:
                self._spawn(slot)
            self.spawned.set()
            while self.state is not SupervisorState.STOPPED:
                self._step()
        except BaseException:  # a procqueue bug: never leave callers waiting forever
            error = PoolBrokenError("procqueue supervisor failed:\n" + traceback.format_exc())
            try:
                self._break(error)
            finally:
                self._abort_watched(error)  # whatever the bug lost on the way
                self._finish_stopping()
        finally:
            self._release_everything()
            self.spawned.set()

    def _step(self) -> None:
        timeout = self._seconds_until_next_deadline(time.monotonic())
        for key, _ in self._selector.select(timeout):
            key.data(key)
        now = time.monotonic()
        self._on_deadlines(now)
        if self.state in (SupervisorState.RUNNING, SupervisorState.CLOSING):
            self._dispatch()
        self._check_progress_of_shutdown(now)

    def _on_wakeup(self, key: Any) -> None:
        # Order matters: drain the pipe (which re-arms it), then drain the inbox.  A post that
        # lands after the pipe is drained writes a fresh byte that this drain cannot eat; one
        # that landed before is in the inbox by the time we drain it.
        self._wakeup.drain()
        inbox = self._inbox
        while inbox:
            command = inbox.popleft()
            if isinstance(command, SubmitTasks) and inbox and isinstance(inbox[0], SubmitTasks):
                command = _joined_submits(command, inbox)  # many submit() calls: one accept
            self._apply(command)

    def _apply(self, command: Command) -> None:
        match command:
            case SubmitTasks(tasks, errors):
                self._accept(tasks, errors)
            case OpenJob(job):
                self._open_jobs[job.id] = job
            case CloseJob(job):
                self._open_jobs.pop(job.id, None)
            case CancelJob(job, kill_running, stop_input):
                self._cancel_job(job, kill_running)
                if stop_input:
                    _stop_feeding(job)
            case CancelTask(task, running):
                self._cancel_task(task, running)
            case Close():
                if self.state is SupervisorState.RUNNING:
                    self._move(SupervisorState.CLOSING)
                    for job in self._open_jobs.values():
                        _lift_window(job)
            case Terminate():
                self._terminate()

    # ---- tasks in ----------------------------------------------------------------------------

    def _accept(self, entries: list[Task | Block], errors: dict[int, BaseException]) -> None:
        refusal = None if self._takes_work() else (
            self.broken_error or TaskCancelledError("the pool was terminated"))
        self.book.accept(entries, errors, refusal)

    # ---- dispatch ----------------------------------------------------------------------------

    def _dispatch(self) -> None:
        # Idle workers first, then one prefetched batch each, but not near the end of the
        # queue: a prefetched batch stuck behind a slow task cannot move to a worker that
        # has gone idle, and at the tail that idleness is what costs (skewed task times).
        prefetch_ok = self.scheduler.queued >= PREFETCH_MIN_QUEUED_PER_WORKER * len(
            self.workers.slots)
        for want_batches in ((0, 1) if prefetch_ok else (0,)):
            for slot in self.workers.slots:
                while len(slot.batches) == want_batches and slot.can_take_batch():
                    prefetch = want_batches > 0
                    if self.scheduler.queued == 0 or not self._send_next_batch(slot, prefetch):
                        break

    def _send_next_batch(self, slot: Slot, prefetch: bool) -> bool:
        limit = self._task_budget(slot)
        if limit <= 0:
            return False
        if not prefetch and self._warm_up(slot):
            return True
        taken = self.scheduler.next_batch(limit, time.monotonic(), prefetch=prefetch)
        if isinstance(taken, Block):
            self._send_block(slot, taken)
            return True
        if not taken:
            return False  # nothing queued, or every queued task waits on a limit
        tasks = [t for t in taken if self._may_start(t)]
        if not tasks:
            return True  # all were cancelled futures: look again
        job = tasks[0].job
        batch = Batch(next(self._batch_ids), job, tasks)
        for task in tasks:
            task.move(TaskState.DISPATCHED)
            task.attempts += 1
            task.pid = slot.pid
        slot.batches.append(batch)
        fn_payload = None if job.fn_id in slot.known_functions else job.fn_payload
        slot.known_functions.add(job.fn_id)
        oob = [t for t in tasks if isinstance(t.payload, OutOfBand)]
        for task in oob:  # this worker maps it until it says otherwise, or exits
            slot.lend(task)
        message = RunTasks(batch.id, job.fn_id, fn_payload, job.kind,
                           tuple((t.id, wire_payload(t.payload)) for t in tasks),
                           tuple(t.id for t in oob))
        # A failed send surfaces as the worker's death (its sentinel).
        self.workers.send(slot, message, tuple(_fd_of(t.payload) for t in oob))
        return True

    def _send_block(self, slot: Slot, block: Block) -> None:
        job = block.job
        inputs = dumps(block.inputs)  # primitives only: cannot fail
        batch = Batch(next(self._batch_ids), job, [], block, len(inputs))
        slot.batches.append(batch)
        fn_payload = None if job.fn_id in slot.known_functions else job.fn_payload
        slot.known_functions.add(job.fn_id)
        self.workers.send(slot, RunBlock(batch.id, job.fn_id, fn_payload, job.kind, block.id,
                                         inputs, timed=job.timed_inputs))

    def _warm_up(self, slot: Slot) -> bool:
        """Before a gated call's first task goes to a worker, send that worker the function
        alone.  A rate start is recorded at dispatch; loading the function (importing the
        user's module) can take long enough that tasks admitted early would start late and
        bunch up inside one window.  Warmed up, a task starts a pipe hop after admission."""
        job = self.scheduler.next_gated_job()
        if job is None or job.fn_id in slot.known_functions:
            return False
        if self._warm_up_crashes.get(job.fn_id, 0) >= WARM_UP_CRASH_LIMIT:
            return False  # loading it kills workers: send it with tasks, which get charged
        batch = Batch(next(self._batch_ids), job, [])
        slot.batches.append(batch)
        slot.known_functions.add(job.fn_id)
        self.workers.send(slot, LoadFunction(batch.id, job.fn_id, job.fn_payload, job.kind))
        return True

    def _may_start(self, task: Task) -> bool:
        if task.job.sink.starting(task):
            return True
        self.book.finish(task, TaskState.CANCELLED, False, None)  # its future was cancelled
        return False

    def _task_budget(self, slot: Slot) -> int:
        """How many more tasks this worker may be given (maxtasksperchild)."""
        limit = self.config.maxtasksperchild
        if limit is None:
            return sys.maxsize
        return limit - slot.tasks_done - slot.tasks_held()

    # ---- worker events -----------------------------------------------------------------------

    def _spawn(self, slot: Slot) -> None:
        self.workers.spawn(slot)
        self._selector.register(slot.conn, selectors.EVENT_READ, self._on_readable(slot))
        self._selector.register(slot.process.sentinel, selectors.EVENT_READ,
                                self._on_sentinel(slot))

    def _on_readable(self, slot: Slot) -> Callable[[Any], None]:
        def handler(key: Any) -> None:
            self._read_message(slot)
        return handler

    def _on_sentinel(self, slot: Slot) -> Callable[[Any], None]:
        def handler(key: Any) -> None:
            self._on_worker_exit(slot)
        return handler

    def _read_message(self, slot: Slot) -> bool:
        """Read and apply one message; False when the pipe is at EOF (the worker is gone)."""
        try:
            data = slot.conn.recv_bytes()
        except (EOFError, OSError):
            self._unregister(slot.conn)
            return False
        message = loads(data)
        match message:
            case BatchResults():
                self._on_results(slot, message)
            case BlockResults():
                self._on_block_results(slot, message)
            case Ready():
                self.workers.started(slot)
            case InitFailed(error):
                self.workers.last_init_error = restore_exception(error)
            case _:
                raise TypeError(f"unexpected message from worker {slot.pid}: {message!r}")
        return True

    def _on_results(self, slot: Slot, message: BatchResults) -> None:
        for task_id in message.released:
            slot.unlend(task_id)
        batch = next((b for b in slot.batches if b.id == message.batch_id), None)
        if batch is None:
            return  # results of a batch already written off (its task timed out)
        pending = batch.pending
        succeeded: list[tuple[Task, Any]] = []
        for i, task_id in enumerate(message.task_ids):
            task = pending.pop(task_id, None)
            if task is not None:
                self._on_item(slot, task, message.ok[i], message.payloads[i],
                              message.seconds[i], message.started[i], succeeded)
        if succeeded:
            self.book.succeed_all(batch.job, succeeded)
        for task_id in message.skipped:
            task = pending.pop(task_id, None)
            if task is not None:
                self.book.on_skipped(task)
        self._after_results(slot, batch, message)

    def _after_results(self, slot: Slot, batch: Batch, message: BatchResults | BlockResults
                       ) -> None:
        n = len(message)
        slot.tasks_done += n
        slot.tasks_done_total += n
        busy_s = message.busy_s
        slot.busy_s += busy_s
        batch.job.sizer.observe(n, busy_s)
        slot.rss_bytes = message.rss_bytes
        if message.final:
            slot.batches.remove(batch)
            if slot.phase is SlotPhase.READY and (slot.retire_reason
                                                  or self.workers.due_for_recycling(slot)):
                # Takes no new batch (can_take_batch); exits once it has run what it holds.
                if not slot.batches:
                    self.workers.retire(slot)

    def _on_block_results(self, slot: Slot, message: BlockResults) -> None:
        batch = next((b for b in slot.batches if b.id == message.batch_id), None)
        if batch is None:
            return  # results of a batch already written off
        self.blocks.route(slot, batch, message)
        self._after_results(slot, batch, message)

    def _on_item(self, slot: Slot, task: Task, ok: bool, payload: bytes, seconds: float,
                 started: float, succeeded: list[tuple[Task, Any]]) -> None:
        """One item's result; a success joins `succeeded`, delivered with its batch."""
        status, value = decode(ok, payload)
        self._on_outcome(slot, task, status, value, seconds, started, succeeded)

    def _on_outcome(self, slot: Slot, task: Task, status: Outcome, value: Any, seconds: float,
                    started: float, succeeded: list[tuple[Task, Any]]) -> None:
        task.seconds = seconds
        task.job.note_duration(seconds)
        if task.state is not TaskState.DISPATCHED:
            return  # already given an outcome (cancelled while running)
        if status is Outcome.OK:
            if self.config.on_event is not None:
                self._emit(task, slot, started, started + seconds, "ok", None)
            succeeded.append((task, value))
        elif status is Outcome.UNREADABLE:
            self.book.fail(task, value)  # not the task's doing: no retry
        else:
            self._emit(task, slot, started, started + seconds, "error", value)
            self.book.after_failure(task, FailureKind.EXCEPTION, value,
                                    may_retry=self._takes_work())

    def _on_worker_exit(self, slot: Slot) -> None:
        self._read_sent_results(slot)  # sent before it died: apply them first
        slot.unlend_all()  # a process that is gone maps nothing
        explode_slot(self.book, slot)
        running = slot.current_task()
        was = slot.phase
        self._unregister(slot.conn)
        self._unregister(slot.process.sentinel)
        exitcode = self.workers.reap(slot)
        why = slot.kill_reason or slot.retire_reason
        slot.last_exit = describe_exit(exitcode) + (f" ({why})" if why else "")
        if was is SlotPhase.STARTING:
            self._on_start_failure(slot, exitcode)
        else:
            self._write_off_batches(slot, running, exitcode, was)
        self._maybe_respawn(slot, was)

    def _read_sent_results(self, slot: Slot) -> None:
        while slot.conn is not None and not slot.conn.closed and self._pipe_has_data(slot):
            if not self._read_message(slot):
                break

    def _pipe_has_data(self, slot: Slot) -> bool:
        try:
            return bool(slot.conn.poll(0))
        except (EOFError, OSError):
            return False

    def _write_off_batches(self, slot: Slot, running: tuple[int, float] | None,
                           exitcode: int | None, phase: SlotPhase) -> None:
        """Attribute a worker's death: the task it was running is charged with the crash;
        every other task it held goes back to the front of the queue, uncharged, unless its
        call was halted or cancelled: then it ends there, cancelled."""
        for batch in slot.batches:
            if not batch.tasks and batch.block is None:  # it died loading a warm-up function
                fn_id = batch.job.fn_id
                self._warm_up_crashes[fn_id] = self._warm_up_crashes.get(fn_id, 0) + 1
        held = [t for b in slot.batches for t in b.pending.values()]
        began = _started_ids(slot, running)  # finished, unsent, or the one it was running
        slot.batches.clear()
        culprit_id = running[0] if running else None
        if culprit_id is None and held and phase is not SlotPhase.KILLING:
            culprit_id = held[0].id  # it died before marking a task: charge the first it held
        for task in reversed(held):  # reversed + front=True keeps their order
            if task.state is not TaskState.DISPATCHED:
                continue
            if task.id == culprit_id and phase is not SlotPhase.KILLING:
                error = self._crash_error(task, exitcode)
                started = running[1] if running else time.monotonic()
                self._emit(task, slot, started, time.monotonic(), "crash", error)
                self.book.after_failure(task, FailureKind.CRASH, error,
                                        may_retry=self._takes_work())
            else:
                self.book.write_off(task, started=task.id in began)

    def _crash_error(self, task: Task, exitcode: int | None) -> WorkerCrashedError:
        error = WorkerCrashedError(
            f"worker process died while running the task: {describe_exit(exitcode)}",
            exitcode=exitcode, oom_suspected=exitcode == -9)
        if exitcode == -9:
            error.message += " (SIGKILL: the OOM killer is a common cause)"
        return error

    def _on_start_failure(self, slot: Slot, exitcode: int | None) -> None:
        if self.state not in (SupervisorState.RUNNING, SupervisorState.CLOSING):
            return  # killed while starting, by terminate() or a break: no failure to count
        if not self.workers.start_failed(slot):
            return  # it is respawned after a backoff
        cause = self.workers.last_init_error
        if cause is not None:
            error: PoolBrokenError = InitializerError(
                f"the worker initializer raised {type(cause).__name__}: {cause}")
            error.__cause__ = cause
        else:
            error = InitializerError(
                f"worker process failed to start: {describe_exit(exitcode)}"
                f"{_unimportable_main_hint(self.config.context)}")
        self._break(error)

    def _maybe_respawn(self, slot: Slot, was: SlotPhase) -> None:
        if self.state is SupervisorState.RUNNING or (
                self.state is SupervisorState.CLOSING and self._work_left()):
            if was is not SlotPhase.STARTING:
                slot.respawn_at = 0.0
            if slot.respawn_at <= time.monotonic():
                self._respawn(slot)

    def _respawn(self, slot: Slot) -> None:
        self.workers.respawned(slot)
        self._spawn(slot)

    def _unregister(self, fileobj: Any) -> None:
        try:
            self._selector.unregister(fileobj)
        except (KeyError, ValueError, OSError):
            pass

    # ---- outcomes ----------------------------------------------------------------------------

    def _emit(self, task: Task, slot: Slot, start_mono: float, end_mono: float, outcome: str,
              error: BaseException | None) -> None:
        listener = self.config.on_event
        if listener is None:
            return
        to_wall = time.time() - time.monotonic()
        event = TaskEvent(task.job.id, task.index, short_repr(task.input), slot.index,
                          task.pid, task.attempts, start_mono + to_wall, end_mono + to_wall,
                          outcome, None if error is None else _error_text(error))
        try:
            listener(event)
        except Exception:
            traceback.print_exc()

    # ---- cancel / terminate ------------------------------------------------------------------

    def _cancel_task(self, task: Task, running: bool) -> None:
        """A future was cancelled (it already shows it): no outcome is delivered."""
        if task.state is not TaskState.DISPATCHED or not running:
            self.book.cancel_queued(task, notify=False)
            return
        for slot in self.workers.slots:
            batch = next((b for b in slot.batches if task.id in b.pending), None)
            if batch is None:
                continue
            del batch.pending[task.id]
            current = slot.current_task()
            if current is not None and current[0] == task.id:
                now = time.monotonic()
                self._emit(task, slot, current[1], now, "cancelled", None)
                self.workers.kill(slot, "cancelled", self.config.kill_grace_s, now)
            else:
                # It waits in the worker's pipe: revoke its batch so it does not start; the
                # batch's other unstarted tasks come back as skipped and are queued again.
                slot.revoke(batch)
            self.book.finish(task, TaskState.CANCELLED, False, None)
            return

    def _cancel_job(self, job: Job, kill_running: bool) -> None:
        job.cancelled = True
        self.book.cancel_waiting(job)
        if not kill_running:
            # Running tasks finish; those sent to a worker behind them must not start.
            for slot in self.workers.slots:
                explode_slot(self.book, slot, job)
                for batch in slot.batches:
                    if batch.job is job and batch.pending:
                        slot.revoke(batch)
        else:
            now = time.monotonic()
            for slot in self.workers.slots:
                explode_slot(self.book, slot, job)
                doomed = [t for b in slot.batches for t in b.pending.values() if t.job is job]
                if not doomed:
                    continue
                self._read_sent_results(slot)  # computed results are kept, not killed
                doomed = [t for b in slot.batches for t in b.pending.values() if t.job is job]
                running = slot.current_task()
                started = _started_ids(slot, running)
                for task in doomed:
                    if task.id not in started:
                        for batch in slot.batches:
                            batch.pending.pop(task.id, None)
                        task.attempts -= 1  # it never ran
                        self.book.finish(task, TaskState.CANCELLED, False,
                                     self.book.cancelled_error(task))
                    elif running is not None and running[0] == task.id:
                        error = TaskCancelledError("the task was cancelled while running")
                        self._emit(task, slot, running[1], now, "cancelled", error)
                        self._fail_running(slot, task, error)
                    # else it finished in the worker and its result is not sent yet: the
                    # SIGTERM below has the worker send it first (worker._send_unsent_then_die);
                    # if it does not arrive, _write_off_batches settles the task.
                self.workers.kill(slot, "cancelled", self.config.kill_grace_s, now)

    def _fail_running(self, slot: Slot, task: Task, error: BaseException) -> None:
        for batch in slot.batches:
            batch.pending.pop(task.id, None)
        self.book.fail(task, error)

    def _terminate(self) -> None:
        if self.state in (SupervisorState.TERMINATING, SupervisorState.STOPPED):
            return
        self._move(SupervisorState.TERMINATING)
        for job in self._open_jobs.values():
            _stop_feeding(job)
        self._fail_everything(
            TaskCancelledError("the pool was terminated before the task finished"))
        self.workers.kill_all_now()
        self._stop_deadline = time.monotonic() + STOP_WORKERS_TIMEOUT_S

    def _break(self, error: BaseException) -> None:
        self.broken_error = error
        if self.state is not SupervisorState.BROKEN:  # (a bug while broken: see _run)
            self._move(SupervisorState.BROKEN)
        for job in self._open_jobs.values():
            _stop_feeding(job)
        self._fail_everything(error)
        self.workers.kill_all_now()
        self._stop_deadline = time.monotonic() + STOP_WORKERS_TIMEOUT_S

    def _fail_everything(self, error: BaseException) -> None:
        for slot in self.workers.slots:
            explode_slot(self.book, slot)
        self.book.tasks_of(self.scheduler.all_queued())  # registers the blocks' inputs as tasks
        for task in list(self.book.tasks.values()):
            if task.state.terminal:
                continue
            for slot in self.workers.slots:
                for batch in slot.batches:
                    batch.pending.pop(task.id, None)
            if task.state is TaskState.QUEUED or task.state is TaskState.RETRY_WAIT:
                self.book.finish(task, TaskState.CANCELLED, False, _copy_error(error, task))
            else:
                self.book.fail(task, _copy_error(error, task))
        self.scheduler.all_retry_waiting()

    # ---- deadlines ---------------------------------------------------------------------------

    def _seconds_until_next_deadline(self, now: float) -> float | None:
        deadlines = [d for d in self._deadlines() if d is not None]
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - now)

    def _deadlines(self) -> list[float | None]:
        out: list[float | None] = [self.scheduler.next_retry_at(), self._stop_deadline]
        if self.scheduler.queued and self.state in (SupervisorState.RUNNING,
                                                    SupervisorState.CLOSING):
            out.append(self.scheduler.admission_wait_until)
        for slot in self.workers.slots:
            out.append(slot.kill_deadline)
            if slot.phase is SlotPhase.DEAD and self._should_have_worker():
                out.append(slot.respawn_at)
            out.extend(wake_times(slot))
        return out

    def _on_deadlines(self, now: float) -> None:
        for task in self.scheduler.release_due_retries(now):
            self.book.requeue(task)
        for slot in self.workers.slots:
            if slot.kill_deadline is not None and now >= slot.kill_deadline:
                self.workers.escalate(slot)
            if slot.phase is SlotPhase.DEAD and self._should_have_worker() \
                    and now >= slot.respawn_at:
                self._respawn(slot)
            if self._past_task_deadline(slot, now):
                self._on_timeout(slot, now)

    def _past_task_deadline(self, slot: Slot, now: float) -> bool:
        deadline = task_deadline(slot)
        if deadline is None or now < deadline:
            return False
        # What the worker sent before the deadline counts first: a task that finished and
        # went back to idle looks, from its slot alone, like one that never started.
        self._read_sent_results(slot)
        deadline = task_deadline(slot)
        return deadline is not None and now >= deadline

    def _on_timeout(self, slot: Slot, now: float) -> None:
        timing = timing_task(slot)
        assert timing is not None, "a deadline passed on a slot that runs nothing"
        task, started = timing
        for batch in slot.batches:
            batch.pending.pop(task.id, None)
        task.seconds = now - started
        timeout_s = timeout_of(task) or 0.0
        how = "" if task.timeout_s is not None else \
            f" ({task.job.timeout_factor:.0%} of the median task time)"
        error = TaskTimeoutError(f"task timed out after {timeout_s:.3g} s{how}",
                                 timeout_s=timeout_s)
        self.workers.kill(slot, "timeout", self.config.kill_grace_s, now)
        self._emit(task, slot, started, now, "timeout", error)
        self.book.after_failure(task, FailureKind.TIMEOUT, error, may_retry=self._takes_work())

    def _should_have_worker(self) -> bool:
        return self.state is SupervisorState.RUNNING or (
            self.state is SupervisorState.CLOSING and self._work_left())

    # ---- shutdown ----------------------------------------------------------------------------

    def _work_left(self) -> bool:
        return self.book.work_left() or bool(self._open_jobs)

    def _check_progress_of_shutdown(self, now: float) -> None:
        if self.state is SupervisorState.CLOSING and not self._work_left():
            self._retire_all()
        if self.state in (SupervisorState.TERMINATING, SupervisorState.BROKEN, ) \
                or (self.state is SupervisorState.CLOSING and not self._work_left()):
            if all(s.phase is SlotPhase.DEAD for s in self.workers.slots):
                self._move(SupervisorState.STOPPED)
            elif self._stop_deadline is not None and now >= self._stop_deadline:
                self.workers.kill_all_now()
                self._stop_deadline = now + STOP_WORKERS_TIMEOUT_S

    def _retire_all(self) -> None:
        for slot in self.workers.slots:
            if slot.phase is SlotPhase.READY:
                self.workers.retire(slot)
        # A worker still running its initializer finishes it, as with multiprocessing.Pool:
        # its side effects are the program's (a file written, a counter set).  It is retired
        # once Ready (this runs every step); the kill deadline starts when none is starting.
        if any(slot.phase is SlotPhase.STARTING for slot in self.workers.slots):
            return
        if self._stop_deadline is None:
            self._stop_deadline = time.monotonic() + STOP_WORKERS_TIMEOUT_S

    def _abort_watched(self, error: BaseException) -> None:
        with self._watched_lock:
            sinks = list(self._watched)
        for sink in sinks:
            try:
                sink.abort(error)
            except Exception:
                traceback.print_exc()

    def _finish_stopping(self) -> None:
        self.workers.kill_all_now()
        deadline = time.monotonic() + STOP_WORKERS_TIMEOUT_S
        for slot in self.workers.slots:
            if slot.phase is not SlotPhase.DEAD and slot.process is not None:
                slot.process.join(max(0.0, deadline - time.monotonic()))
                try:
                    self.workers.reap(slot)
                except Exception:
                    pass

    def _release_everything(self) -> None:
        if self.state is not SupervisorState.STOPPED:
            self._move(SupervisorState.STOPPED)
        if any(s.phase is not SlotPhase.DEAD for s in self.workers.slots):
            self._finish_stopping()
        self.memfds.close()
        for slot in self.workers.slots:  # dead now: what they mapped can be closed
            slot.unlend_all()
        self.workers.close()
        self._selector.close()
        self._wakeup.close()
        self.stopped.set()


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
        self._pending = False  # a byte is in the pipe: one per batch of commands is enough
        self._closed = False
        self._lock = threading.Lock()  # taken once per wake-up byte, not per post()

    def wake(self) -> None:
        """Any thread."""
        if self._pending:
            return
        with self._lock:
            if self._closed or self._pending:
                return
            self._pending = True
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
        self._pending = False

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            os.close(self.reader)
            os.close(self._writer)


def pool_gates(config: PoolConfig) -> tuple[Gate, ...]:
    """The gates every task of the pool passes: its concurrency and its rate."""
    gates: list[Gate] = []
    if config.concurrency is not None:
        gates.append(ConcurrencyGate(config.concurrency))
    if config.rate is not None:
        gates.append(RateGateAdapter(rate_gate_for(config.rate)))
    if config.min_free_memory is not None:
        gates.append(FreeMemoryGate(config.min_free_memory))
    return tuple(gates)


def _fd_of(payload: Any) -> int:
    assert isinstance(payload, OutOfBand)
    return payload.fd


def _lift_window(job: Job) -> None:
    window = job.sink.window
    if window is not None:
        window.lift()










def _started_ids(slot: Slot, running: tuple[int, float] | None) -> set[int]:
    """Ids of the tasks a worker has started: the one running now and those before it in its
    batch (finished, their results not sent yet).  Tasks after it, and a prefetched batch,
    wait in the worker's pipe."""
    if running is None:
        return set()
    for batch in slot.batches:
        ids = [t.id for t in batch.tasks]
        if running[0] in ids:
            return set(ids[:ids.index(running[0]) + 1])
    return {running[0]}


def _stop_feeding(job: Job) -> None:
    window = job.sink.window
    if window is not None:
        window.close()


def _error_text(error: BaseException) -> str:
    message = error.message if hasattr(error, "message") else str(error)
    return f"{type(error).__name__}: {message}"


def _copy_error(error: BaseException, task: Task) -> BaseException:
    """One exception object per task (each gets its own index/input attributes)."""
    if isinstance(error, TaskCancelledError):
        return TaskCancelledError(error.message)
    if isinstance(error, PoolBrokenError):
        copy = type(error)(str(error))
        copy.__cause__ = error.__cause__
        return copy
    return error


def _unimportable_main_hint(context: Any) -> str:
    """Why every worker of a script piped into Python (`python - < job.py`) dies at start:
    the forkserver and spawn start methods re-import the program's main module in each
    worker, from its __file__, which is then no file."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if (path is None or getattr(main, "__spec__", None) is not None or os.path.isfile(path)
            or context.get_start_method() == "fork"):
        return ""
    return (f"; the program's main module ({path!r}) is not a file the workers can import "
            "(the forkserver start method re-imports it in each worker): run the program from "
            "a .py file, or pass context='fork'")


def _joined_submits(first: SubmitTasks, inbox: "deque[Command]") -> SubmitTasks:
    """`first` and the SubmitTasks right behind it in the inbox, as one, in order."""
    tasks = list(first.tasks)
    errors = dict(first.errors)
    while inbox and isinstance(inbox[0], SubmitTasks):
        more = inbox.popleft()
        assert isinstance(more, SubmitTasks)
        tasks += more.tasks
        errors.update(more.errors)
    return SubmitTasks(tasks, errors)
