"""The supervisor: one thread, one loop, that owns every task's state and every worker.

  caller threads (Pool API, feeders)        supervisor thread                          workers
  post(SubmitTasks | CancelJob | Close...) ─► Inbox: deque + wake-up pipe (inbox.py)
                                            ONE selector.select() over
                                              the wake-up pipe      ◄── post()
                                              each worker's pipe    ◄── Ready / BatchResults
                                              each worker sentinel  ◄── the process died
                                              timeout = next deadline (task timeout, SIGKILL
                                                escalation, retry backoff, respawn)
                                            commands    ─► TaskBook (task_book.py), Canceller
                                            reports, deaths, timeouts ─► WorkerOutcomes
                                            Dispatcher.dispatch(): the Scheduler says what may
                                              start ─► RunTasks | RunBlock ──────────────────► run
  AsyncResult / Future / iterator ◄── TaskBook.finish(): one outcome per task, to its sink

It never polls: everything that can happen is a readable file descriptor or a deadline.  A
worker's death is seen through its sentinel at once; the tasks it held are known (one pipe
per worker) and the one it was running is read from the slot's shared state, so only that
task is charged with the crash (outcomes.py); the others go back to the front of the queue.
The supervisor detects and sequences; what an event means for the tasks is decided below it.

States (SupervisorState, moved only through _move and _STATE_MOVES):
        RUNNING ─close()─► CLOSING (drain, then stop workers) ─► STOPPED
        RUNNING/CLOSING ─terminate()─► TERMINATING (fail what is left, kill them) ─► STOPPED
        RUNNING ─initializer keeps failing, or a procqueue bug─► BROKEN ─► STOPPED
"""

from __future__ import annotations

import enum
import selectors
import threading
import time
import traceback
import weakref
from typing import Any, Callable, Iterator

from .blocks import explode_slot
from .cancelling import Canceller
from .chunking import TARGET_BATCH_S
from .config import PoolConfig
from .dispatch import Dispatcher
from .errors import InitializerError, PoolBrokenError, TaskCancelledError, describe_exit
from .inbox import (CancelJob, CancelTask, Close, CloseJob, Command, Inbox, Interrupt, OpenJob,
                    SubmitTasks, SupervisorTurn, Terminate)
from .outcomes import TaskEvents, WorkerOutcomes
from .program_fork import note_thread_ending
from .protocol import (BatchResults, BlockResults, InitFailed, InitializerCall, MemfdPool,
                       Ready, loads_message, restore_exception)
from .retry import RetryPolicy
from .scheduler import Scheduler, pool_gates
from .stats import SupervisorStatistics
from .task_book import TaskBook
from .tasks import Job, Task
from .timeouts import TimedSlots, task_deadline
from .worker_slots import Slot, SlotPhase, WorkerSlots

STOP_WORKERS_TIMEOUT_S = 1.0  # close(): how long retiring workers get before being killed
REUSABLE_MEMFD_BYTES = 64 * 2**20  # finished big arguments' memfds kept for reuse, at most


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


class Supervisor:
    def __init__(self, config: PoolConfig, initializer: InitializerCall | None,
                 env: dict[str, str], *, workers: WorkerSlots | None = None) -> None:
        """`workers` (the processes' side) defaults to this config's; a test may hand in
        slots of its own."""
        self.config = config
        self.workers = workers if workers is not None else WorkerSlots(
            config.context, list(config.cpus), config.pin, env, initializer,
            maxtasksperchild=config.maxtasksperchild,
            max_memory_per_child=config.max_memory_per_child,
            init_timeout_s=config.init_timeout_s)
        self.memfds = MemfdPool(REUSABLE_MEMFD_BYTES)  # big arguments' memfds, for reuse
        policy = RetryPolicy(config.retries, config.retry_on)
        self.book = TaskBook(Scheduler(pool_gates(config), config.processes), policy, self._halt)
        self.scheduler = self.book.scheduler
        self.dispatcher = Dispatcher(config, self.book, self.workers)
        events = TaskEvents(config.on_event)
        self.outcomes = WorkerOutcomes(self.book, self.workers, events, self._takes_work)
        self.canceller = Canceller(self.book, self.workers, events, config.kill_grace_s,
                                   self._read_sent_results)
        self.state = SupervisorState.RUNNING
        self.broken_error: BaseException | None = None
        self._open_jobs: dict[int, Job] = {}  # lazily fed calls whose input is not exhausted
        # Sinks of many-input calls (map, imap...), told if this thread dies of a bug, so
        # their callers cannot wait forever for an input it lost (see _run).
        self._watched: weakref.WeakSet[Any] = weakref.WeakSet()
        self._watched_lock = threading.Lock()
        self._inbox = Inbox()
        # caller threads step aside while a long turn runs
        self.turn = SupervisorTurn.for_workers(config.processes, TARGET_BATCH_S)
        self.post = self._inbox.post  # any thread (the inbox's own: one call less per post)
        self._selector = selectors.DefaultSelector()
        self._stop_deadline: float | None = None
        self._timed = TimedSlots()  # the slots running calls with a timeout, as last read
        self.spawned = threading.Event()  # the first workers exist (they may still be starting)
        self.stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="procqueue-supervisor",
                                        daemon=True)

    # ---- any thread ------------------------------------------------------------------------

    def start(self) -> None:
        self.workers.open_fork_server()  # while this thread may be the program's only one
        self._thread.start()

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
        book = self.book
        # a pool that broke says so after its loop has stopped too (whatever broke it)
        state = SupervisorState.BROKEN if self.broken_error is not None else self.state
        return SupervisorStatistics(
            state.value, len(self.workers.slots), book.submitted, book.succeeded,
            book.failed, book.cancelled, self.scheduler.queued, running, book.retries,
            self.workers.restarts, self.workers.recycled_for_memory)

    # ---- the loop (supervisor thread only) ---------------------------------------------------

    def _takes_work(self) -> bool:
        """Tasks may still start (and so be retried): running, or closing with work left."""
        return self.state in (SupervisorState.RUNNING, SupervisorState.CLOSING)

    def _move(self, new: SupervisorState) -> None:
        if new not in _STATE_MOVES[self.state]:
            raise RuntimeError(f"supervisor: {self.state.name} -> {new.name}")
        self.state = new

    def _run(self) -> None:
        self.turn.supervisor_thread = threading.get_ident()
        try:
            self._selector.register(self._inbox.wakeup.reader, selectors.EVENT_READ,
                                    self._on_wakeup)
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
                self.workers.kill_and_reap_all(STOP_WORKERS_TIMEOUT_S)
        finally:
            self._release_everything()
            self.spawned.set()
            note_thread_ending()

    def _step(self) -> None:
        before = time.monotonic()
        due_at = self._next_deadline(before)
        events = self._selector.select(None if due_at is None else max(0.0, due_at - before))
        self.turn.begin()
        try:
            for key, _ in events:
                key.data(key)
            now = time.monotonic()
            # Before due_at nothing is due.  What this turn's events make due (a kill's grace,
            # a respawn) is in the next turn's due_at; if that has come already, the next
            # select does not wait.  (A look at every slot at every turn was 9-12% of the
            # supervisor's CPU with 64-128 workers: bench/README.md.)
            if due_at is not None and now >= due_at:
                self._on_deadlines(now)
            if self._takes_work():
                self.dispatcher.dispatch()
            self._check_progress_of_shutdown(now)
        finally:
            self.turn.end()

    def _on_wakeup(self, key: Any) -> None:
        for command in self._inbox.take_all():
            self._apply(command)

    def _apply(self, command: Command) -> None:
        match command:
            case SubmitTasks(tasks, errors):
                refusal = None if self._takes_work() else (
                    self.broken_error or TaskCancelledError("the pool was terminated"))
                self.book.accept(tasks, errors, refusal)
            case OpenJob(job):
                self._open_jobs[job.id] = job
            case CloseJob(job):
                self._open_jobs.pop(job.id, None)
            case CancelJob(job, kill_running, stop_input):
                self.canceller.cancel_job(job, kill_running)
                if stop_input:
                    job.sink.stop_input()
            case CancelTask(task, running):
                self.canceller.cancel_task(task, running)
            case Interrupt(last_job_id, kill_running):
                self._interrupt(last_job_id, kill_running)
            case Close():
                if self.state is SupervisorState.RUNNING:
                    self._move(SupervisorState.CLOSING)
                    for job in self._open_jobs.values():
                        job.sink.lift_window()
            case Terminate():
                self._terminate()

    def _interrupt(self, last_job_id: int, kill_running: bool) -> None:
        """Ctrl-C in a caller waiting on the pool (a KeyboardInterrupt out of get(), an imap,
        a future's result()): every call made before it ends now, as a halt now ends one (its
        queued tasks cancelled, its running ones killed, what they finished kept), and the
        pool goes on taking calls.  Calls made since (a later id) are left alone.  Without
        kill_running (shutdown(cancel_futures=True)) running tasks finish."""
        jobs = {job.id: job for job in self.scheduler.queued_jobs()}
        jobs.update(self._open_jobs)
        jobs.update((t.job.id, t.job) for t in self.book.tasks.values() if not t.state.terminal)
        jobs.update((b.job.id, b.job) for slot in self.workers.slots for b in slot.batches)
        for job in jobs.values():
            if job.id <= last_job_id and not job.cancelled:
                self.canceller.cancel_job(job, kill_running)
                job.sink.cut_input()

    def _halt(self, job: Job) -> None:
        """The book's verdict: the call reached its halt policy."""
        assert job.halt is not None
        self.canceller.cancel_job(job, kill_running=job.halt.now)
        job.sink.cut_input()

    # ---- worker events -----------------------------------------------------------------------

    def _spawn(self, slot: Slot) -> None:
        self.workers.spawn(slot)
        self._selector.register(slot.conn, selectors.EVENT_READ, _handler(self._read_message,
                                                                          slot))
        self._selector.register(slot.process.sentinel, selectors.EVENT_READ,
                                _handler(self._on_worker_exit, slot))

    def _read_message(self, slot: Slot) -> bool:
        """Read and apply one message; False when the pipe is at EOF (the worker is gone)."""
        try:
            data = slot.conn.recv_bytes()
        except (EOFError, OSError):
            self._unregister(slot.conn)
            return False
        message = loads_message(data)
        match message:
            case BatchResults():
                self.outcomes.on_results(slot, message)
            case BlockResults():
                self.outcomes.on_block_results(slot, message)
            case Ready():
                self.workers.started(slot)
            case InitFailed(error):
                self.workers.last_init_error = restore_exception(error)
            case _:
                raise TypeError(f"unexpected message from worker {slot.pid}: {message!r}")
        return True

    def _read_sent_results(self, slot: Slot) -> None:
        while slot.conn is not None and not slot.conn.closed and _pipe_has_data(slot):
            if not self._read_message(slot):
                break

    def _on_worker_exit(self, slot: Slot) -> None:
        """A worker's sentinel fired: it is gone.  Its tasks' fate is WorkerOutcomes'."""
        self._read_sent_results(slot)  # sent before it died: apply them first
        slot.unlend_all()  # a process that is gone maps nothing
        explode_slot(self.book, slot)
        running, reading = slot.current_task(), slot.reading_message()
        was = slot.phase
        self._unregister(slot.conn)
        self._unregister(slot.process.sentinel)
        exitcode = self.workers.reap(slot)
        why = slot.kill_reason or slot.retire_reason
        slot.last_exit = describe_exit(exitcode) + (f" ({why})" if why else "")
        if was is SlotPhase.STARTING:
            self._on_start_failure(slot, exitcode)
        else:
            self.dispatcher.note_lost_warm_ups(slot)
            self.outcomes.on_death(slot, running, exitcode, was, reading)
        if self._should_have_worker():
            if was is not SlotPhase.STARTING:
                slot.respawn_at = 0.0  # a start failure waits out its backoff first
            if slot.respawn_at <= time.monotonic():
                self._respawn(slot)

    def _on_start_failure(self, slot: Slot, exitcode: int | None) -> None:
        if not self._takes_work():
            return  # killed while starting, by terminate() or a break: no failure to count
        if self.workers.start_failed(slot, exitcode):  # else it is respawned after a backoff
            self._break(self.workers.start_failure_error(exitcode))

    def _respawn(self, slot: Slot) -> None:
        self.workers.respawned(slot)
        self._spawn(slot)

    def _unregister(self, fileobj: Any) -> None:
        try:
            self._selector.unregister(fileobj)
        except (KeyError, ValueError, OSError):
            pass

    # ---- terminate / break -------------------------------------------------------------------

    def _terminate(self) -> None:
        if self.state in (SupervisorState.TERMINATING, SupervisorState.STOPPED):
            return
        self._move(SupervisorState.TERMINATING)
        self._end_all(TaskCancelledError("the pool was terminated before the task finished"))

    def _break(self, error: BaseException) -> None:
        self.broken_error = error
        if self.state is not SupervisorState.BROKEN:  # (a bug while broken: see _run)
            self._move(SupervisorState.BROKEN)
        self._end_all(error)

    def _end_all(self, error: BaseException) -> None:
        for job in self._open_jobs.values():
            job.sink.stop_input()
        for slot in self.workers.slots:  # timed out before: their own error, not `error`
            self.outcomes.end_timed_out(slot)
        self.canceller.fail_everything(error)
        # A lazy call whose feeder is still inside the caller's iterable (a slow generator)
        # has inputs that will never come: its consumer gets `error` once it has taken what
        # was delivered, instead of waiting for them.
        self._abort_watched(error)
        self.workers.kill_all_now()
        self._stop_deadline = time.monotonic() + STOP_WORKERS_TIMEOUT_S

    # ---- deadlines ---------------------------------------------------------------------------

    def _next_deadline(self, now: float) -> float | None:
        """When the soonest thing is due (see _deadlines); None if nothing is."""
        self._timed.read(self.workers.slots, now)
        return min(self._deadlines(), default=None)

    def _deadlines(self) -> Iterator[float]:
        """Every time something is due.  Asked at every turn of the loop, so a slot with
        nothing due (most of them, with many workers) costs a few attribute reads."""
        for due in (self.scheduler.next_retry_at(), self._stop_deadline):
            if due is not None:
                yield due
        if self.scheduler.queued and self._takes_work() \
                and self.scheduler.admission_wait_until is not None:
            yield self.scheduler.admission_wait_until
        for slot in self.workers.slots:
            if slot.kill_deadline is not None:
                yield slot.kill_deadline
            if slot.phase is SlotPhase.DEAD and self._should_have_worker():
                yield slot.respawn_at
            if slot.init_deadline is not None and slot.phase is SlotPhase.STARTING:
                yield slot.init_deadline
        yield from self._timed.wake_times()

    def _on_deadlines(self, now: float) -> None:
        for task in self.scheduler.release_due_retries(now):
            self.book.requeue(task)
        for slot in self.workers.slots:
            if slot.kill_deadline is not None and now >= slot.kill_deadline:
                self.workers.escalate(slot)
                self.outcomes.on_kill_escalated(slot)
            if slot.phase is SlotPhase.DEAD and self._should_have_worker() \
                    and now >= slot.respawn_at:
                self._respawn(slot)
            if slot.init_deadline is not None and slot.phase is SlotPhase.STARTING \
                    and now >= slot.init_deadline and self._takes_work():
                # a hanging initializer: one clear error for every call, not a wait for ever
                self._break(InitializerError(
                    f"the initializer did not finish within init_timeout="
                    f"{self.workers.init_timeout_s:g} s (worker pid {slot.pid})"))
            if self._past_task_deadline(slot, now):
                self.outcomes.on_timeout(slot, now, self.config.kill_grace_s)

    def _past_task_deadline(self, slot: Slot, now: float) -> bool:
        deadline = self._timed.deadline_of(slot)  # as last read
        if deadline is None or now < deadline:
            return False
        # What the worker sent before the deadline counts first: a task that finished and
        # went back to idle looks, from its slot alone, like one that never started.
        self._read_sent_results(slot)
        deadline = task_deadline(slot)
        return deadline is not None and now >= deadline

    # ---- shutdown ----------------------------------------------------------------------------

    def _should_have_worker(self) -> bool:
        return self.state is SupervisorState.RUNNING or (
            self.state is SupervisorState.CLOSING and self._work_left())

    def _work_left(self) -> bool:
        return self.book.work_left() or bool(self._open_jobs)

    def _check_progress_of_shutdown(self, now: float) -> None:
        drained = self.state is SupervisorState.CLOSING and not self._work_left()
        if drained and self.workers.retire_ready() and self._stop_deadline is None:
            self._stop_deadline = now + STOP_WORKERS_TIMEOUT_S
        if drained or self.state in (SupervisorState.TERMINATING, SupervisorState.BROKEN):
            if self.workers.all_dead():
                self._move(SupervisorState.STOPPED)
            elif self._stop_deadline is not None and now >= self._stop_deadline:
                self.workers.kill_all_now()
                self._stop_deadline = now + STOP_WORKERS_TIMEOUT_S

    def _abort_watched(self, error: BaseException) -> None:
        with self._watched_lock:
            sinks = list(self._watched)
        for sink in sinks:
            try:
                sink.abort(error)
            except Exception:
                traceback.print_exc()

    def _release_everything(self) -> None:
        if self.state is not SupervisorState.STOPPED:
            self._move(SupervisorState.STOPPED)
        if not self.workers.all_dead():
            self.workers.kill_and_reap_all(STOP_WORKERS_TIMEOUT_S)
        self.memfds.close()
        for slot in self.workers.slots:  # dead now: what they mapped can be closed
            slot.unlend_all()
            slot.drop_batches()  # and the permits their blocks held given back
        self.workers.close()
        self._selector.close()
        self._inbox.close()
        self.stopped.set()


def _handler(method: Callable[[Slot], Any], slot: Slot) -> Callable[[Any], None]:
    """A selector callback calling `method(slot)`."""
    def handler(key: Any) -> None:
        method(slot)
    return handler


def _pipe_has_data(slot: Slot) -> bool:
    try:
        return bool(slot.conn.poll(0))
    except (EOFError, OSError):
        return False
