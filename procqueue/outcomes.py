"""What a worker's reports mean for its tasks: results, a death, a task past its deadline.

The supervisor detects each event (a readable pipe, a sentinel, a deadline); this module
decides what it does to the tasks concerned and hands each task's outcome to the task book:

    BatchResults / BlockResults ──► on_results / on_block_results ─► book.succeed_all / fail
    the worker died             ──► on_death: the task it was running is charged with the crash,
                                    the others it held go back to the queue, uncharged
    a task's deadline passed    ──► on_timeout: its worker is killed, the task charged

and, when someone listens, reports each attempt as a TaskEvent (Pool(on_event=, trace=)).
"""

from __future__ import annotations

import time
import traceback
from typing import Any, Callable

from .blocks import BlockRouter, Outcome, decode, explode_dispatched
from .errors import TaskCancelledError, TaskTimeoutError, WorkerCrashedError, describe_exit
from .protocol import BatchResults, BlockResults, short_repr
from .retry import FailureKind
from .stats import EventListener, TaskEvent, event_error_text
from .task_book import TaskBook
from .tasks import Task, TaskState
from .timeouts import timeout_of, timing_of
from .worker_slots import Batch, Slot, SlotPhase, WorkerSlots


class TaskEvents:
    """One TaskEvent per task attempt to the pool's listener, if it has one."""

    def __init__(self, listener: EventListener | None) -> None:
        self.listener = listener

    def emit(self, task: Task, slot: Slot, start_mono: float, end_mono: float, outcome: str,
             error: BaseException | None) -> None:
        if self.listener is None:
            return
        to_wall = time.time() - time.monotonic()
        event = TaskEvent(task.job.id, task.index, short_repr(task.input), slot.index,
                          task.pid, task.attempts, start_mono + to_wall, end_mono + to_wall,
                          outcome, None if error is None else event_error_text(error))
        try:
            self.listener(event)
        except Exception:
            traceback.print_exc()


class WorkerOutcomes:
    def __init__(self, book: TaskBook, workers: WorkerSlots, events: TaskEvents,
                 may_retry: Callable[[], bool]) -> None:
        """`may_retry`: whether a failed task may still run again (the pool takes work)."""
        self.book = book
        self.workers = workers
        self.events = events
        self.may_retry = may_retry
        self.blocks = BlockRouter(book, self._on_outcome)
        self.oom_kills = OomKills()

    # ---- results -----------------------------------------------------------------------------

    def on_results(self, slot: Slot, message: BatchResults) -> None:
        for task_id in message.released:
            slot.unlend(task_id)
        batch = _batch_of(slot, message.batch_id)
        if batch is None:
            return  # results of a batch already written off (its task timed out)
        pending = batch.pending
        succeeded: list[tuple[Task, Any]] = []
        for task_id, ok, payload, seconds, started in zip(
                message.task_ids, message.ok, message.payloads, message.seconds,
                message.started):
            task = pending.pop(task_id, None)
            if task is not None:
                status, value = decode(ok, payload)
                self._on_outcome(slot, task, status, value, seconds, started, succeeded)
        if succeeded:
            self.book.succeed_all(batch.job, succeeded)
        for task_id in message.skipped:
            task = pending.pop(task_id, None)
            if task is not None:
                self.book.on_skipped(task)
        if message.skipped and not batch.job.cancelled:
            slot.gave_back = True  # (see Slot.gave_back)
        self._after_results(slot, batch, message)

    def on_block_results(self, slot: Slot, message: BlockResults) -> None:
        batch = _batch_of(slot, message.batch_id)
        if batch is None:
            return  # results of a batch already written off
        # The batch ends (a block under a concurrency limit gives its permit back) before its
        # last results go out, as a task's permits are given back before its outcome is
        # delivered: whoever the results wake finds the limit free.
        if message.skipped >= 0 and not batch.job.cancelled:
            slot.gave_back = True  # (see Slot.gave_back)
        self._after_results(slot, batch, message)
        self.blocks.route(slot, batch, message)

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
            slot.end_batch(batch)
            if slot.phase is SlotPhase.READY and (slot.retire_reason
                                                  or self.workers.due_for_recycling(slot)):
                # Takes no new batch (can_take_batch); exits once it has run what it holds.
                if not slot.batches:
                    self.workers.retire(slot)

    def _on_outcome(self, slot: Slot, task: Task, status: Outcome, value: Any, seconds: float,
                    started: float, succeeded: list[tuple[Task, Any]]) -> None:
        """One task's reported outcome; a success joins `succeeded`, delivered with its batch."""
        task.seconds = seconds
        if status is Outcome.OK:
            # A relative timeout is of the successes' run times, as GNU parallel's: inputs
            # that fail at once would otherwise make it kill good slow ones
            task.job.note_duration(seconds)
        if task.state is not TaskState.DISPATCHED:
            return  # already given an outcome (cancelled while running)
        task.attempts += 1  # it ran
        if status is Outcome.OK:
            if self.events.listener is not None:
                self.events.emit(task, slot, started, started + seconds, "ok", None)
            succeeded.append((task, value))
        elif status is Outcome.UNREADABLE:
            self.book.fail(task, value)  # not the task's doing: no retry
        else:
            self.events.emit(task, slot, started, started + seconds, "error", value)
            self.book.after_failure(task, FailureKind.EXCEPTION, value,
                                    may_retry=self.may_retry())

    # ---- a worker died -----------------------------------------------------------------------

    def on_death(self, slot: Slot, running: tuple[int, float] | None, exitcode: int | None,
                 phase: SlotPhase, reading: bool = False) -> None:
        """Attribute a worker's death: the task it was running is charged with the crash;
        every other task it held goes back to the front of the queue, uncharged, unless its
        call was halted or cancelled: then it ends there, cancelled.  A worker being killed
        (phase KILLING: a timeout, a cancel) was killed for a task already charged.  One that
        died `reading` its next message (worker.RECEIVING) may have been killed by what it
        read (an argument too big for its memory): the task of a batch of one is charged; the
        tasks of a bigger batch go back uncharged, each to travel alone from then on, so that
        the one that did it is charged alone (Task.alone).  One that died idle charges none."""
        self.end_timed_out(slot)
        read = list(slot.batches[0].pending.values()) if reading and slot.batches else []
        held = [t for b in slot.batches for t in b.pending.values()]
        began = started_ids(slot, running)  # finished, unsent, or the one it was running
        slot.drop_batches()
        culprit_id = running[0] if running else None
        if culprit_id is None and read and phase is not SlotPhase.KILLING:
            if len(read) == 1 or any(task.alone for task in read):
                culprit_id = read[0].id  # it died before marking a task: charge the first
            else:
                for task in read:
                    task.alone = True
        for task in reversed(held):  # reversed + front=True keeps their order
            if task.state is not TaskState.DISPATCHED:
                continue
            if task.id == culprit_id and phase is not SlotPhase.KILLING:
                task.attempts += 1  # it was running, or its worker died before saying which
                error = crash_error(exitcode, self.oom_kills.killed_since_last_look()
                                    if exitcode == -9 else None)
                now = time.monotonic()
                started = running[1] if running else now
                task.seconds = now - started  # how long it ran before the crash
                self.events.emit(task, slot, started, now, "crash", error)
                self.book.after_failure(task, FailureKind.CRASH, error,
                                        may_retry=self.may_retry())
            elif running is not None and task.id == running[0] and task.job.cancelled:
                # Killed while running it, for its call's cancel or halt (Canceller).
                self._end_cancelled_while_running(slot, task, running[1])
            else:
                self.book.write_off(task, started=task.id in began)

    def on_kill_escalated(self, slot: Slot) -> None:
        """The worker let its SIGTERM's grace pass: the task of a cancelled call it still runs
        sends no result now.  It ends here, not when the SIGKILLed worker is reaped (which a
        process stuck in the kernel can put off); so does a task that timed out."""
        self.end_timed_out(slot)
        running = slot.current_task()
        if running is None:
            return
        for batch in slot.batches:
            task = batch.pending.get(running[0])
            if task is not None and task.job.cancelled:
                del batch.pending[task.id]
                self._end_cancelled_while_running(slot, task, running[1])
                return

    def _end_cancelled_while_running(self, slot: Slot, task: Task, started: float) -> None:
        task.attempts += 1
        now = time.monotonic()
        task.seconds = now - started  # how long it ran before it was killed
        cancelled = TaskCancelledError("the task was cancelled while running")
        self.events.emit(task, slot, started, now, "cancelled", cancelled)
        self.book.fail(task, cancelled)

    # ---- a task ran out of time --------------------------------------------------------------

    def on_timeout(self, slot: Slot, now: float, kill_grace_s: float) -> None:
        task, started = self._timed_task(slot)
        for batch in slot.batches:
            batch.pending.pop(task.id, None)
        task.seconds = now - started
        task.attempts += 1
        timeout_s = timeout_of(task) or 0.0
        how = "" if task.timeout_s is not None else \
            f" ({task.job.timeout_factor:.0%} of the median task time)"
        error = TaskTimeoutError(f"task timed out after {timeout_s:.3g} s{how}",
                                 timeout_s=timeout_s)
        self.workers.kill(slot, "timeout", kill_grace_s, now)
        # Its outcome waits for the worker's end (or its SIGKILL): until then the task runs,
        # and so counts against its limits (a queue's next task, a retry of its own, would
        # start beside it).  A worker's SIGTERM handler ends it within milliseconds.
        slot.timed_out.append((task, error, started, now))

    def end_timed_out(self, slot: Slot) -> None:
        """The outcomes of the tasks `slot` timed out: its worker is dead or SIGKILLed, or the
        pool is ending (Supervisor._end_all)."""
        ended, slot.timed_out = slot.timed_out, []
        for task, error, started, at in ended:
            self.events.emit(task, slot, started, at, "timeout", error)
            self.book.after_failure(task, FailureKind.TIMEOUT, error, may_retry=self.may_retry())

    def _timed_task(self, slot: Slot) -> tuple[Task, float]:
        """The task timed on `slot` and when its clock started.  An input of a block has no
        Task: its block is exploded first (its worker is about to be killed, and its other
        unreported inputs then go back to the queue as any task it held would)."""
        timing = timing_of(slot)
        assert timing is not None, "a deadline passed on a slot that runs nothing"
        if timing.item_id not in timing.batch.pending:
            explode_dispatched(self.book, slot, timing.batch)
            timing = timing_of(slot)
            assert timing is not None
        return timing.batch.pending[timing.item_id], timing.started


class OomKills:
    """Whether the kernel's OOM killer has killed a process since the last look: the count in
    /proc/vmstat (Linux 4.13+, machine-wide, cgroups' OOM kills included).  A SIGKILL is only
    suspected of being the OOM killer's when that count moved (another process's OOM kill at
    the same moment can still make it a false suspicion); where the count cannot be read,
    every SIGKILL is suspected, as the hint says which is a common cause."""

    def __init__(self, path: str = "/proc/vmstat") -> None:
        self._path = path
        self._seen = self._count()

    def _count(self) -> int | None:
        try:
            with open(self._path, "rb") as vmstat:
                for line in vmstat:
                    if line.startswith(b"oom_kill "):
                        return int(line.split()[1])
        except (OSError, ValueError, IndexError):
            pass
        return None

    def killed_since_last_look(self) -> bool | None:
        """True/False, or None where the count cannot be read."""
        now = self._count()
        if now is None or self._seen is None:
            self._seen = now
            return None
        moved, self._seen = now > self._seen, now
        return moved


def crash_error(exitcode: int | None, oom_killed: bool | None = None) -> WorkerCrashedError:
    """`oom_killed`: whether the OOM killer acted meanwhile (OomKills), None if unknown."""
    suspected = exitcode == -9 and oom_killed is not False
    error = WorkerCrashedError(
        f"worker process died while running the task: {describe_exit(exitcode)}",
        exitcode=exitcode, oom_suspected=suspected)
    if suspected:
        error.message += (" (the kernel's OOM killer killed a process then: out of memory?)"
                          if oom_killed else " (SIGKILL: the OOM killer is a common cause)")
    return error


def started_ids(slot: Slot, running: tuple[int, float] | None) -> set[int]:
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


def _batch_of(slot: Slot, batch_id: int) -> Batch | None:
    return next((b for b in slot.batches if b.id == batch_id), None)

