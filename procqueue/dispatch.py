"""Dispatch: which queued work goes to which worker, and the message that carries it.

The supervisor calls Dispatcher.dispatch() once per turn of its loop.  The scheduler decides
what may start now (limits, rate, keys: see scheduler.py and admission.py); this module
decides which worker gets it (idle workers first, then one prefetched batch each) and sends
it: a batch of tasks (RunTasks), a block of primitive inputs (RunBlock; a batch of tasks with
primitive inputs goes as one too, each keeping its Task: task_block_inputs) or, before a
gated call's first task, the function alone (LoadFunction, a warm-up).
"""

from __future__ import annotations

import sys
import time
from typing import Any

from .config import PoolConfig
from .protocol import (CallKind, LoadFunction, OutOfBand, RunBlock, RunTasks, dumps,
                       primitive_run)
from .scheduler import Scheduler
from .task_book import TaskBook
from .tasks import Block, Job, Task, TaskState, new_id
from .worker_slots import Batch, Slot, WorkerSlots

# Tasks queued per worker below which nothing is prefetched (see Dispatcher.dispatch); with
# a chunksize the caller fixed, chunks left once the idle workers have theirs: with fewer, a
# chunk sent ahead could wait behind a slow one while another worker had nothing left to
# take (multiprocessing's workers take the next chunk when they are free).
PREFETCH_MIN_QUEUED_PER_WORKER = 8
PREFETCH_MIN_CHUNKS_PER_WORKER = 2
# Workers lost loading one function (a warm-up) before warm-ups of it stop.
WARM_UP_CRASH_LIMIT = 2
# Tasks of one batch from which they travel as a block (see task_block_inputs).
TASK_BLOCK_MIN = 2


class Dispatcher:
    def __init__(self, config: PoolConfig, book: TaskBook, workers: WorkerSlots) -> None:
        self.config = config
        self.book = book
        self.scheduler: Scheduler = book.scheduler
        self.workers = workers
        self._batch_ids = iter(range(1, sys.maxsize))
        self._warm_up_crashes: dict[int, int] = {}  # fn_id -> workers lost warming it up

    def dispatch(self) -> None:
        # Idle workers first, then one prefetched batch each, but not near the end of the
        # queue: a prefetched batch stuck behind a slow task cannot move to a worker that
        # has gone idle, and at the tail that idleness is what costs (skewed task times).
        prefetch_ok = self.scheduler.queued >= PREFETCH_MIN_QUEUED_PER_WORKER * len(
            self.workers.slots)
        sizer = self.scheduler.next_call_sizer()
        chunks_floor = self._fixed_chunks_floor(None if sizer is None else sizer.fixed)
        # (no result is read during a pass, so a function probed at its start stays so)
        probing = sizer is not None and sizer.probing
        first_probed: Slot | None = None
        for want_batches in ((0, 1) if prefetch_ok else (0,)):
            prefetch = want_batches > 0
            for slot in self.workers.slots:
                while len(slot.batches) == want_batches and slot.can_take_batch():
                    if prefetch and self.scheduler.queued < chunks_floor:
                        return  # the last chunks go to the workers that finish first
                    if self.scheduler.queued == 0 or not self._send_next_batch(slot, prefetch):
                        break
                    if probing:
                        first_probed = first_probed or slot
                        if _has_answered(first_probed):
                            return  # see _has_answered

    def _fixed_chunks_floor(self, chunksize: int | None) -> int:
        """Tasks that must still be queued for a batch ahead of a chunksize the caller fixed:
        such batches do not shrink as the input runs out (sized ones do, see chunking.py)."""
        return PREFETCH_MIN_CHUNKS_PER_WORKER * (chunksize or 0) * len(self.workers.slots)

    def note_lost_warm_ups(self, slot: Slot) -> None:
        """`slot`'s worker died: count the functions it died loading (warm-up batches)."""
        for batch in slot.batches:
            if not batch.tasks and batch.block is None:
                fn_id = batch.job.fn_id
                self._warm_up_crashes[fn_id] = self._warm_up_crashes.get(fn_id, 0) + 1

    def _send_next_batch(self, slot: Slot, prefetch: bool) -> bool:
        limit = self._task_budget(slot)
        if limit <= 0:
            return False
        if not prefetch and self._warm_up(slot):
            return True
        # a prefetched batch runs after the worker's running one (see Scheduler.next_batch)
        after = slot.batches[-1].tasks if prefetch and slot.batches else ()
        taken = self.scheduler.next_batch(limit, time.monotonic(), prefetch=prefetch,
                                          after=after)
        if isinstance(taken, Block):
            self._send_block(slot, taken)
            return True
        if not taken:
            return False  # nothing queued, or every queued task waits on a limit
        tasks = [t for t in taken if self._may_start(t)]
        if not tasks:
            return True  # all were cancelled futures: look again
        self._send_tasks(slot, tasks)
        return True

    def _send_tasks(self, slot: Slot, tasks: list[Task]) -> None:
        job = tasks[0].job
        as_block = task_block_inputs(self.config, job, tasks)
        if as_block is not None:
            self._send_task_block(slot, job, tasks, *as_block)
            return
        for task in tasks:
            if task.payload is None:  # a primitive input, not pickled by the caller
                task.payload = dumps(task.input)
        batch = self._new_batch(slot, job, tasks)
        pid = slot.pid
        payloads: list[tuple[int, bytes]] = []
        oob: list[Task] = []
        for task in tasks:  # one pass: the tasks of many submit() calls travel together
            task.move(TaskState.DISPATCHED)
            task.pid = pid
            payload = task.payload
            if isinstance(payload, OutOfBand):
                slot.lend(task)  # this worker maps it until it says otherwise, or exits
                oob.append(task)
                payload = payload.wire
            payloads.append((task.id, payload))
        message = RunTasks(batch.id, job.fn_id, self._function_for(slot, job), job.kind,
                           tuple(payloads), job.sizer.report_interval_s(),
                           tuple(t.id for t in oob))
        # A failed send surfaces as the worker's death (its sentinel).
        self.workers.send(slot, message, tuple(_fd_of(t.payload) for t in oob))

    def _send_block(self, slot: Slot, block: Block) -> None:
        job = block.job
        inputs = dumps(block.inputs)  # primitives only: cannot fail
        batch = self._new_batch(slot, job, [], block, len(inputs))
        self.workers.send(slot, RunBlock(batch.id, job.fn_id, self._function_for(slot, job),
                                         job.kind, block.id, inputs,
                                         job.sizer.report_interval_s(),
                                         timed=job.timed_inputs or job.may_time_out()))

    def _send_task_block(self, slot: Slot, job: Job, tasks: list[Task], kind: CallKind,
                         inputs: list[Any]) -> None:
        block = Block(new_id(), job, 0, inputs)
        block.tasks = list(tasks)  # exploded from the start: results go to the tasks
        data = dumps(inputs)
        batch = self._new_batch(slot, job, tasks, block, len(data))
        pid = slot.pid
        for task in tasks:
            task.move(TaskState.DISPATCHED)
            task.pid = pid
        self.workers.send(slot, RunBlock(batch.id, job.fn_id, self._function_for(slot, job),
                                         kind, block.id, data,
                                         job.sizer.report_interval_s(), timed=True,
                                         each_revocable=True))

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
        batch = self._new_batch(slot, job, [])
        slot.known_functions.add(job.fn_id)
        self.workers.send(slot, LoadFunction(batch.id, job.fn_id, job.fn_payload, job.kind))
        return True

    def _new_batch(self, slot: Slot, job: Job, tasks: list[Task], block: Block | None = None,
                   payload_bytes: int = 0) -> Batch:
        batch = Batch(next(self._batch_ids), job, tasks, block, payload_bytes)
        slot.add_batch(batch)
        return batch

    def _function_for(self, slot: Slot, job: Job) -> bytes | None:
        """The pickled function, unless this worker has loaded it already."""
        if job.fn_id in slot.known_functions:
            return None
        slot.known_functions.add(job.fn_id)
        return job.fn_payload

    def _may_start(self, task: Task) -> bool:
        if task.sink.starting(task):
            return True
        self.book.finish(task, TaskState.CANCELLED, False, None)  # its future was cancelled
        return False

    def _task_budget(self, slot: Slot) -> int:
        """How many more tasks this worker may be given (maxtasksperchild)."""
        limit = self.config.maxtasksperchild
        if limit is None:
            return sys.maxsize
        return limit - slot.tasks_done - slot.tasks_held()


def task_block_inputs(config: PoolConfig, job: Job, tasks: list[Task]
                      ) -> tuple[CallKind, list[Any]] | None:
    """(the kind to call them with, their inputs) where `tasks` may travel as one block:
    several tasks of one call (the submit() calls of one function share one) whose inputs
    are primitives.  The worker then unpickles the inputs and pickles the results once, not
    once per task, and the results are read here at once; each task keeps its own outcome,
    cancel and crash attribution (the block is sent exploded: Block.tasks), and the worker
    looks at the revoked batches before each input (RunBlock.each_revocable).  Not for what
    a task batch does that a block does not: a timeout's clock (timeouts.py), the events'
    start times, recycling, halting."""
    if len(tasks) < TASK_BLOCK_MIN or job.may_time_out() or job.halt is not None:
        return None
    if config.on_event is not None or config.maxtasksperchild is not None:
        return None
    if any(task.job is not job for task in tasks):
        return None
    kind, inputs = job.kind, [task.input for task in tasks]
    if kind is CallKind.ARGS_KWARGS:  # submit() calls: (args, kwargs) each
        if any(kwargs for _, kwargs in inputs):
            return None
        kind, inputs = CallKind.STAR, [args for args, _ in inputs]  # f(*args), as a starmap
    return (kind, inputs) if primitive_run(inputs) else None


def _has_answered(slot: Slot) -> bool:
    """Whether the worker given the first one-task batch of this pass (its function still
    being measured) has something to read: then the pass stops and the supervisor's loop reads
    it, and the workers not yet served get batches sized from that measure rather than more
    one-task ones.  With 64 workers on 2 cores a pass took ~10 ms, longer than the first
    tasks; a pool's first short call lost 5-6% of its workers' time to it (worker_idle.py).
    A slow function answers no one during the pass, which then goes on as before."""
    try:
        return bool(slot.conn.poll())
    except (OSError, EOFError, ValueError):  # its pipe is gone: the loop will see why
        return True


def _fd_of(payload: Any) -> int:
    assert isinstance(payload, OutOfBand)
    return payload.fd
