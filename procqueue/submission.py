"""Submitter: a call's inputs as the entries the supervisor takes, posted in groups.

    inputs ──► Submitter.groups ──► a run of primitive inputs: one Block (no step per input)
                                ├─► any other input: a Task (its argument pickled here,
                                │   unless primitive: then with its batch, when sent)
                                └─► journaled already: replayed (pool_journal.py), not sent
           ──► SubmitTasks(group, errors) ──► the supervisor, group by group

Groups hold at most SUBMIT_GROUP_BYTES of arguments, so workers start on the first inputs
while the caller (map) or the feeder (imap, feeder.py) still pickles the rest.  A problem
with one input (it cannot be pickled, its key function raises) is that task's error, posted
with its group, never the whole call's.
"""

from __future__ import annotations

import time
from typing import Any, Iterator

from .config import PoolConfig
from .errors import argument_error, key_function_error
from .inbox import SubmitTasks
from .pool_journal import JournaledCall
from .protocol import (CallKind, OutOfBand, dumps_argument, primitive, primitive_run,
                       short_repr)
from .results import ArgumentMemory
from .supervisor import Supervisor
from .tasks import Block, Job, OutcomeSink, Task, new_id

SUBMIT_GROUP_TASKS = 4096  # map posts its tasks to the supervisor in groups of this many...
SUBMIT_GROUP_BYTES = 4 * 2**20  # ...or of this many argument bytes, whichever comes first

Entries = list[Task | Block]  # what one SubmitTasks carries
Errors = dict[int, BaseException]  # task id -> the error it fails with, unsent


class Submitter:
    """Turns one pool's inputs into Tasks and Blocks and posts them (any thread)."""

    def __init__(self, supervisor: Supervisor, config: PoolConfig,
                 argument_memory: ArgumentMemory) -> None:
        self.supervisor = supervisor
        self.post = supervisor.post
        # caller threads wait for a long supervisor turn before they post (inbox.py)
        self.step_aside = supervisor.turn.step_aside
        self.config = config
        # bytes of big arguments (memfds) held for tasks not started yet: the feeder waits
        # for room (feeder.py) and each task gives its argument's bytes back at its outcome
        self.argument_memory = argument_memory

    def submit(self, job: Job, items: "list[Any] | tuple[Any, ...]",
               journal: JournaledCall | None = None) -> Entries:
        """Pickle and submit the inputs, posting them in groups so that workers start on the
        first ones while the caller is still pickling the rest (big arguments)."""
        blocks = self.blocks_allowed(job, journal)
        submitted: Entries = []
        group_tasks = _whole_chunks_of(SUBMIT_GROUP_TASKS, job.sizer.fixed)
        began = time.monotonic()
        for start in range(0, len(items), group_tasks):
            chunk = items[start:start + group_tasks]
            for group, errors in self.groups(job, start, chunk, journal, blocks):
                hand_over = not submitted and self._rest_takes_long(began, group, len(items))
                self.post_group(group, errors, hand_over=hand_over)
                submitted += group
        return submitted

    def _rest_takes_long(self, began: float, first_group: Entries, total: int) -> bool:
        """Whether making a call's other inputs at the pace of its first group (made since
        `began`) would keep the supervisor from the GIL longer than its patience: then the
        first group is handed over (SupervisorTurn.hand_over), and the workers start on it
        while the rest is made.  With 2 workers (25 ms of patience) a map's inputs are made
        first: handing 4,096 of 50,000 tiny inputs over gave 0.86 and 0.95 of the speed in
        two runs of bench/ab.py (the first batches were sized from a short queue)."""
        made = sum(len(e.inputs) if isinstance(e, Block) else 1 for e in first_group)
        if made <= 0 or made >= total:
            return False
        rest_s = (time.monotonic() - began) * (total - made) / made
        return rest_s > self.supervisor.turn.patience_s

    def post_group(self, group: Entries, errors: Errors, *, hand_over: bool = False) -> None:
        """A group of a call's inputs (made by groups()), once a long supervisor turn is over;
        with hand_over, this thread then waits for the turn that takes it."""
        self.step_aside()
        turn = self.supervisor.turn
        posted_in = turn.number
        self.post(SubmitTasks(group, errors))
        if hand_over:
            turn.hand_over(posted_in)

    def post_single(self, task: Task, errors: Errors) -> None:
        """The task of a submit() or apply_async() call (made by make_task): posted alone
        (see inbox.Posted), unless its argument already failed.  The caller stepped aside
        (step_aside) before it made the task."""
        self.post(SubmitTasks([task], errors) if errors else task)

    def blocks_allowed(self, job: Job, journal: JournaledCall | None) -> bool:
        """Whether the call's primitive inputs may travel in Blocks: only where no per-task
        machinery would see them (rates, keys, halt, journal, events, recycling).  Timeouts
        do not need a Task per input: a timed block marks each input's start in its slot, and
        the input whose deadline passes becomes a Task then (outcomes.on_timeout).  Nor do
        concurrency limits: a block runs one input at a time, and holds one permit."""
        config = self.config
        gates = self.supervisor.scheduler.pool_gates + job.gates
        return (hasattr(job.sink, "deliver_run") and job.kind is not CallKind.ARGS_KWARGS
                and journal is None and all(gate.refundable for gate in gates)
                and job.keyed is None and job.halt is None
                and config.on_event is None and config.maxtasksperchild is None)

    def groups(self, job: Job, start: int, chunk: "list[Any] | tuple[Any, ...]",
               journal: JournaledCall | None, blocks: bool) -> Iterator[tuple[Entries, Errors]]:
        """Entries for inputs start, start+1, ... (`chunk`), in groups of at most
        SUBMIT_GROUP_BYTES argument bytes.  A chunk of primitive inputs is one Block, checked
        without a Python step per input; otherwise each input is a Task, or joins a Block."""
        if blocks and primitive_run(chunk):
            yield [Block(new_id(), job, start, list(chunk))], {}
            return
        group: Entries = []
        errors: Errors = {}
        block: Block | None = None
        group_bytes = 0
        for i, item in enumerate(chunk, start):
            if journal is not None and journal.replayed(i, item):
                continue  # done in an earlier run: its journaled outcome was reported
            if blocks and primitive(item):
                block = _join_block(group, block, job, i, item)
                continue
            block = None
            task = self.make_task(job, i, item, errors)
            group.append(task)
            group_bytes += _payload_bytes(task.payload)
            if group_bytes >= SUBMIT_GROUP_BYTES:
                yield group, errors
                group, errors, block, group_bytes = [], {}, None, 0
        if group:
            yield group, errors

    def make_task(self, job: Job, index: int, item: Any, errors: Errors,
                  sink: OutcomeSink | None = None) -> Task:
        """A Task for one input, its outcome for `sink` (default: its call's); a problem with
        the input (it cannot be pickled, its key function raises) becomes that task's error,
        never the whole call's.  A primitive input is not pickled here: a batch of such
        tasks travels as one block of inputs (dispatch.task_block_inputs), and any other
        batch pickles it when sent (Dispatcher._send_tasks)."""
        # (a submit() call's (args, kwargs) is never one: not looked at, a step per call less)
        if job.kind is not CallKind.ARGS_KWARGS and primitive(item):
            task = Task(new_id(), job, index, None, item, sink)
            if job.key_fn is not None:
                self._key_task(task, item, errors)
            return task
        try:
            payload = dumps_argument(item, self.supervisor.memfds)
        except KeyboardInterrupt:
            raise  # a Ctrl-C while pickling is the caller's, not the argument's
        except BaseException as exc:  # noqa: BLE001 - even a __reduce__ calling sys.exit()
            error = argument_error(f"the task's argument could not be pickled: {exc!r}; "
                                   "make sure every argument is picklable", exc)
            task = Task(new_id(), job, index, b"", item, sink)
            errors[task.id] = error
            return task
        if isinstance(payload, OutOfBand):
            self.argument_memory.hold(payload.size)
            payload.on_close = self.argument_memory.release
        task = Task(new_id(), job, index, payload, item, sink)
        if job.key_fn is not None:
            self._key_task(task, item, errors)
        return task

    @staticmethod
    def _key_task(task: Task, item: Any, errors: Errors) -> None:
        """The task's concurrency key, from its call's key function; its error if that
        raises or the key cannot be hashed."""
        try:
            task.key = task.job.key_fn(item)
            hash(task.key)
        except Exception as exc:
            errors[task.id] = key_function_error(exc, task.index, short_repr(item))


def _join_block(group: Entries, block: Block | None, job: Job, index: int, item: Any) -> Block:
    """Add input `index` to `block`, the last entry of `group`, or to a new block there."""
    if block is None:
        block = Block(new_id(), job, index, [])
        group.append(block)
    block.inputs.append(item)
    return block


def _whole_chunks_of(tasks: int, chunksize: int | None) -> int:
    """`tasks` rounded up to whole chunks of a chunksize the caller fixed.  The supervisor
    may dispatch a group before the next one is posted: a group that ended inside a chunk
    sent that chunk's head as a short batch and its rest later, to another worker or
    behind another chunk (`map(f, range(8000), chunksize=1000)` on 8 workers ran two
    chunks on one worker and took twice as long)."""
    if not chunksize:
        return tasks
    return -(-tasks // chunksize) * chunksize


def _payload_bytes(payload: Any) -> int:
    """Argument bytes pickled here (a primitive input's, None, are pickled when sent)."""
    if payload is None:
        return 0
    if isinstance(payload, OutOfBand):
        return payload.size
    return len(payload)
