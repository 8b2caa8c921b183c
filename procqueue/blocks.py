"""Blocks' one home: how a block's report is read and routed, and how a block becomes Tasks.

A Block (tasks.Block) is a run of tiny inputs of one map/imap call that travels to a worker in
one RunBlock and is reported in BlockResults: successes as plain values, failures by position.
Nothing about a block is per input until an input needs it:

    BlockResults ──► BlockRouter.route ──► all ok, never exploded: one deliver_run to the sink
                                      ├──► some failed: runs of successes to the sink, each
                                      │    failed input a Task (TaskBook.block_task) whose
                                      │    outcome goes the way of any task's (on_outcome)
                                      └──► exploded while it ran: each input to its own Task

A block explodes (its unreported inputs become Tasks) when something must be done to one of
its inputs alone: its worker died (crash attribution), its call was cancelled or halted, the
pool terminated.  explode_dispatched does it for a running block, TaskBook.explode_queued for a
queued one.
"""

from __future__ import annotations

import enum
import time
import traceback
from typing import Any, Protocol

from .protocol import BlockResults, loads, restore_exception, unreadable_result_error
from .task_book import TaskBook
from .tasks import Block, Job, Task
from .worker_slots import Batch, Slot


class Outcome(enum.IntEnum):
    """What one input's report from a worker is, once decoded here."""

    OK = 0  # its result
    RAISED = 1  # the exception it raised (or a procqueue error standing for it)
    UNREADABLE = 2  # a result the worker pickled that cannot be unpickled here


def decode(ok: bool, payload: bytes) -> tuple[Outcome, Any]:
    """One input's report (a pickled result, or a pickled ErrorInfo) as (outcome, value)."""
    if not ok:
        return Outcome.RAISED, restore_exception(payload)
    try:
        return Outcome.OK, loads(payload)
    except BaseException as exc:  # noqa: BLE001 - fails only this task
        return Outcome.UNREADABLE, unreadable_result_error(exc, len(payload))


def block_outcomes(message: BlockResults) -> list[tuple[Outcome, Any]]:
    """(outcome, value or exception) of each input a BlockResults reports, in order."""
    errors = message.errors
    first = message.first
    if isinstance(message.values, bytes):
        values = loads(message.values)  # plain data: always unpickles
        if not errors:
            return [(Outcome.OK, v) for v in values]
        return [(Outcome.RAISED, restore_exception(errors[first + i])) if first + i in errors
                else (Outcome.OK, v) for i, v in enumerate(values)]
    return [decode(False, errors[first + i]) if first + i in errors
            else decode(True, p or b"") for i, p in enumerate(message.values)]


class OutcomeHandler(Protocol):
    """The supervisor's handling of one task's reported outcome (events, retry or fail)."""

    def __call__(self, slot: Slot, task: Task, status: Outcome, value: Any, seconds: float,
                 started: float, succeeded: list[tuple[Task, Any]]) -> None: ...


class BlockRouter:
    """Routes a block's reports: runs of successes to its call's sink, anything else to the
    Task of that input, through `on_outcome` as any task's outcome."""

    def __init__(self, book: TaskBook, on_outcome: OutcomeHandler) -> None:
        self.book = book
        self.on_outcome = on_outcome

    def route(self, slot: Slot, batch: Batch, message: BlockResults) -> None:
        block = batch.block
        assert block is not None
        if message.skipped >= 0 and block.tasks is None and message.skipped < len(block):
            # The worker gave back the inputs it had not reached (give_back.py: one of them
            # runs long): they become tasks, queued again for any worker
            explode_dispatched(self.book, slot, batch)
        if block.tasks is None and not message.errors and isinstance(message.values, bytes):
            self._deliver_successes(slot, block, message)  # the hot path: tiny tasks
        elif block.tasks is None:
            self._deliver_block_part(slot, block, message, block_outcomes(message))
        else:
            self._route_exploded(slot, batch, block, message, block_outcomes(message))

    def _deliver_successes(self, slot: Slot, block: Block, message: BlockResults) -> None:
        values = loads(message.values)  # type: ignore[arg-type]  # plain data: unpickles
        a = message.first
        b = block.reported = a + len(values)
        self.book.block_successes(b - a)
        _hand_run(slot, block, a, values, message.seconds)

    def _deliver_block_part(self, slot: Slot, block: Block, message: BlockResults,
                            outcomes: list[tuple[Outcome, Any]]) -> None:
        """The common case: consecutive successes go to the sink as runs, in one call each;
        an input that failed becomes a Task, retried or failed like any other."""
        first, seconds_between = message.first, message.seconds_between
        block.reported = first + len(outcomes)
        self.book.block_inputs -= len(outcomes)
        run: list[Any] = []  # the successes since the last failure
        for i, (status, value) in enumerate(outcomes):
            if status is Outcome.OK:
                run.append(value)
                continue
            _hand_run(slot, block, first + i - len(run), run, seconds_between(i - len(run), i))
            self.book.succeeded += len(run)
            run = []
            task = self.book.block_task(block, first + i, slot.pid)
            self.on_outcome(slot, task, status, value, message.seconds_of(i), 0.0, [])
        end = len(outcomes)
        _hand_run(slot, block, first + end - len(run), run,
                  seconds_between(end - len(run), end))
        self.book.succeeded += len(run)

    def _route_exploded(self, slot: Slot, batch: Batch, block: Block, message: BlockResults,
                        outcomes: list[tuple[Outcome, Any]]) -> None:
        """Results of a block exploded while it ran: each input's goes to its Task."""
        assert block.tasks is not None
        succeeded: list[tuple[Task, Any]] = []
        now = time.monotonic()
        for i, (status, value) in enumerate(outcomes):
            task = block.tasks[message.first + i]
            if task is None or batch.pending.pop(task.id, None) is None:
                continue
            self.on_outcome(slot, task, status, value, message.seconds_of(i), now, succeeded)
        if succeeded:
            self.book.succeed_all(batch.job, succeeded)
        if message.skipped >= 0:
            for task in block.tasks[message.skipped:]:
                if task is not None and batch.pending.pop(task.id, None) is not None:
                    self.book.on_skipped(task)


def _hand_run(slot: Slot, block: Block, position: int, values: list[Any],
              seconds: list[float] | None) -> None:
    """Successes of the block's inputs from `position` on, to the call's sink at once."""
    if not values:
        return  # a final message with nothing left to report (a flush sent it all)
    if seconds is not None:
        block.job.note_durations(seconds)  # (successes only: a relative timeout's median)
    try:
        block.job.sink.deliver_run(block.start + position,
                                   block.inputs[position:position + len(values)], values,
                                   seconds, slot.pid)
    except Exception:
        traceback.print_exc()


def explode_dispatched(book: TaskBook, slot: Slot, batch: Batch) -> None:
    """A running block's unreported inputs become DISPATCHED tasks of its batch, so that
    crash attribution, cancelling and terminating work on them as on any task; later
    results of the block are routed to them by position."""
    block = batch.unexploded_block()
    if block is None:
        return
    block.tasks = [None] * len(block)
    for position in range(block.reported, len(block)):
        task = book.block_task(block, position, slot.pid)
        block.tasks[position] = task
        batch.tasks.append(task)
        batch.pending[task.id] = task
    book.block_inputs -= len(block) - block.reported


def explode_slot(book: TaskBook, slot: Slot, job: Job | None = None) -> None:
    """explode_dispatched for each block `slot` holds (of `job` only, if given)."""
    for batch in slot.batches:
        if job is None or batch.job is job:
            explode_dispatched(book, slot, batch)
