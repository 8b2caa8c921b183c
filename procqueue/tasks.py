"""A task's life as an explicit state machine.

    QUEUED ──► DISPATCHED ──► DONE | FAILED
      ▲   │        │  │
      │   │        │  └─► RETRY_WAIT ──► QUEUED     (crash / timeout / retry_on, attempts left)
      │   │        └────► QUEUED                   (its worker died before reaching it)
      │   └──► FAILED | CANCELLED                   (bad argument, cancel, terminate)
      └──────── RETRY_WAIT ──► CANCELLED

DONE, FAILED and CANCELLED are terminal: every task reaches exactly one of them, once.  Every
move goes through `Task.move`, which raises IllegalTransition on anything not in _ALLOWED, so
"exactly one outcome per task" can be read off this table and checked at run time.
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterable

    from .protocol import CallKind


_ids = itertools.count(1)
new_id = _ids.__next__  # task, block and job ids: unique in the process (atomic under the GIL)

RECENT_DURATIONS = 255  # run times a call keeps for its median (relative timeouts)


class TaskState(enum.IntEnum):  # IntEnum: C-speed hashing on the per-task hot path
    QUEUED = 1  # waiting for a worker
    DISPATCHED = 2  # sent to a worker (maybe running, maybe prefetched)
    RETRY_WAIT = 3  # failed an attempt, waiting out its backoff
    DONE = 4  # terminal: result delivered
    FAILED = 5  # terminal: error delivered
    CANCELLED = 6  # terminal: never ran to an outcome of its own

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({TaskState.DONE, TaskState.FAILED, TaskState.CANCELLED})

_ALLOWED: dict[TaskState, frozenset[TaskState]] = {
    TaskState.QUEUED: frozenset(
        {TaskState.DISPATCHED, TaskState.FAILED, TaskState.CANCELLED}),
    TaskState.DISPATCHED: frozenset(
        {TaskState.DONE, TaskState.FAILED, TaskState.RETRY_WAIT, TaskState.QUEUED,
         TaskState.CANCELLED}),
    TaskState.RETRY_WAIT: frozenset({TaskState.QUEUED, TaskState.CANCELLED, TaskState.FAILED}),
    TaskState.DONE: frozenset(),
    TaskState.FAILED: frozenset(),
    TaskState.CANCELLED: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A bug in procqueue: a task was moved along an edge the state machine does not have."""


class OutcomeSink:
    """Whoever waits for a call's outcomes (a result object, a future, an iterator, the
    journal in front of one): the supervisor and the task book call these methods, and no
    other, on the supervisor's thread.  Every sink derives from this class, so what a sink
    can be told is declared here, not discovered with getattr."""

    # The bounded input window of a lazily fed call (results.Window), which the supervisor
    # lifts on close() and closes on terminate(); None for a call given all its input.
    window: Any = None

    def lift_window(self) -> None:
        """close(): the call's input is fed to the end, whatever the consumer takes."""
        if self.window is not None:
            self.window.lift()

    def stop_input(self) -> None:
        """terminate(), or the caller dropped the iterator: no more input is fed."""
        if self.window is not None:
            self.window.close()

    def cut_input(self) -> None:
        """The call halted: a lazy call's iterator may end with the inputs taken so far
        (input_feed.InputFeed.stop_taking, done by its watch: not in the supervisor's thread)."""

    def starting(self, task: "Task") -> bool:
        """The task is about to be sent to a worker; False: it was cancelled, skip it."""
        return True

    def deliver(self, task: "Task", ok: bool, value: Any) -> None:
        """The task's one outcome: its result (ok) or the exception to raise."""
        raise NotImplementedError

    def deliver_all(self, succeeded: list[tuple["Task", Any]]) -> None:
        """deliver() of many successes of this call at once (a sink that can take them
        under one lock and one wake-up of its consumer says so by overriding this)."""
        for task, value in succeeded:
            self.deliver(task, True, value)

    def deliver_run(self, first: int, inputs: list[Any], values: list[Any],
                    seconds: list[float] | None, pid: int | None) -> None:
        """Inputs first, first+1, ... of a block succeeded with `values`, each in one
        attempt.  Only calls whose sink takes runs (map, imap) travel as blocks."""
        raise TypeError(f"{type(self).__name__} takes no runs of a block's results")


class Task:
    """One call of the user's function on one input."""

    __slots__ = ("id", "job", "sink", "index", "payload", "kind", "state", "attempts", "pid",
                 "seconds", "input", "not_before", "timeout_s", "key", "holds", "alone",
                 "last_error")

    def __init__(self, task_id: int, job: "Job", index: int, payload: Any,
                 input: Any, sink: OutcomeSink | None = None) -> None:
        self.id = task_id
        self.job = job
        # Where its outcome goes: its call's sink, or its own where calls share a Job (the
        # submit() calls of one function: see JobMaker.single_task_job).
        self.sink = job.sink if sink is None else sink
        self.index = index  # position in its call's input
        # pickled argument(s): bytes, protocol.OutOfBand, or None for a primitive input not
        # pickled yet (Submitter.make_task; pickled when sent, Dispatcher._send_tasks)
        self.payload = payload
        self.kind = job.kind
        self.state = TaskState.QUEUED
        # Runs started, counted when the start is observed (a result, a crash or timeout
        # charged to it, a kill while running), not at dispatch: a task sent to a worker
        # and given back unrun (a revoke, another task's crash) has not been attempted.
        self.attempts = 0
        self.pid: int | None = None  # worker of the latest attempt
        self.seconds = 0.0  # run time of the latest attempt
        # In a batch whose reading killed its worker (outcomes.on_death): it travels in a
        # batch of its own from then on, so that the task that did it is told apart
        self.alone = False
        self.input = input  # kept for errors and outcomes; its repr is made only on failure
        # The failure it waits to be retried after: its outcome if the retry never starts
        # (its call is halted or cancelled, the pool terminated), not "cancelled before it
        # started", which would lose the error and say it never ran
        self.last_error: BaseException | None = None
        self.not_before = 0.0  # RETRY_WAIT: monotonic time it may be queued again
        self.timeout_s = job.timeout_s
        self.key: Any = None  # concurrency key (calls with key=)
        self.holds: tuple[Any, ...] = ()  # admission permits held while DISPATCHED

    def move(self, new: TaskState) -> None:
        if new not in _ALLOWED[self.state]:
            raise IllegalTransition(f"task {self.id}: {self.state.name} -> {new.name}")
        if self.holds and new is not TaskState.DISPATCHED:
            # Leaving DISPATCHED ends the attempt: whatever admitted it is given back here,
            # the one place every attempt passes, so no permit can leak (nor one admitted but
            # not started: its Future was cancelled between admission and dispatch).
            holds, self.holds = self.holds, ()
            for hold in holds:
                hold.release()
        self.state = new

    def __repr__(self) -> str:
        return f"<Task {self.id} job={self.job.id} index={self.index} {self.state.name}>"


class Block:
    """A run of fresh inputs of one call, at consecutive indices, that travel, run and report
    together: the same outcome per input as Tasks give, without a Task per input (tiny tasks
    spend most of their time on that bookkeeping).  Only calls without per-task machinery
    (rates, keys, halt, journal, events) get them, and only for immutable primitive inputs
    (see Submitter.blocks_allowed); under concurrency limits a running block holds one permit
    (`hold`, given back when its batch ends: Slot.end_batch, Slot.drop_batches).  A block is
    never retried or cancelled as a whole: whatever is not plain success (an input that fails,
    a crash, a cancel, terminate) first turns the block's unreported inputs into Tasks
    (TaskBook.explode_queued for a queued block, blocks.explode_dispatched for a running one),
    and the Task machinery takes it from there."""

    __slots__ = ("id", "job", "start", "inputs", "reported", "tasks", "hold")

    def __init__(self, block_id: int, job: "Job", start: int, inputs: list[Any]) -> None:
        self.id = block_id
        self.job = job
        self.start = start  # index of inputs[0] in its call's input
        self.inputs = inputs
        self.reported = 0  # inputs [0, reported) have their outcome (results come in order)
        self.tasks: list[Task | None] | None = None  # once exploded: position -> its Task
        self.hold: Any = None  # admission.BatchHold of its call's concurrency limits, if any

    def __len__(self) -> int:
        return len(self.inputs)

    def split(self, n: int, new_id: int) -> "Block":
        """Take the first n inputs off as a new block; this one keeps the rest."""
        head = Block(new_id, self.job, self.start, self.inputs[:n])
        self.start += n
        self.inputs = self.inputs[n:]
        return head

    def __repr__(self) -> str:
        return f"<Block {self.id} job={self.job.id} [{self.start}:{self.start + len(self)}]>"


class Job:
    """One API call (a map, an imap, one apply_async or submit): its function, how to call
    it, its per-call options, and the sink its outcomes go to (option-less submit() calls of
    one function share one Job, their tasks carrying their own sinks: see Task.sink).  What
    the call was given is set here, once (job_maker.JobMaker makes Jobs), but for a journaled
    call's sink and sizer, replaced before its first input is submitted
    (pool_journal.JournaledCall); the rest is the supervisor's tally."""

    __slots__ = ("id", "fn_id", "fn_payload", "kind", "sink", "timeout_s",
                 "sizer", "cancelled", "gates", "keyed", "key_fn", "timeout_factor",
                 "durations", "halt", "failures", "successes", "submitted", "single_task",
                 "timed_inputs")

    def __init__(self, job_id: int, fn_id: int, fn_payload: bytes, kind: "CallKind",
                 sink: OutcomeSink, *, timeout_s: float | None,
                 sizer: Any, gates: tuple[Any, ...] = (), keyed: Any = None,
                 key_fn: Any = None, timeout_factor: float | None = None, halt: Any = None,
                 single_task: bool = False, timed_inputs: bool = True) -> None:
        self.id = job_id
        self.fn_id = fn_id
        self.fn_payload = fn_payload
        self.kind = kind
        self.sink = sink
        self.timeout_s = timeout_s
        self.sizer = sizer
        self.gates = gates  # admission gates of this call (its Limit, queue, concurrency)
        self.keyed = keyed  # KeyedLimit when the call has a key= (per-key concurrency)
        self.key_fn = key_fn  # input -> its concurrency key (run in the caller's thread)
        self.timeout_factor = timeout_factor  # relative timeout: x median task time
        self.halt = halt  # scheduler.HaltPolicy: stop the call after enough failures
        self.single_task = single_task  # submit()/apply_async(): never cancelled as a call
        # Whether each input's own run time reaches the sink (imap_outcomes reports it); map
        # and imap need only the total, and their blocks then run without a clock per input.
        self.timed_inputs = timed_inputs
        # ---- the supervisor's, as the call runs
        self.cancelled = False
        # Recent run times, newest last: kept only for a relative timeout (made at the first
        # one: one object fewer per submit() call for the garbage collector to walk).
        self.durations: deque[float] | None = None
        self.failures = 0  # tasks of this call that failed (for halt)
        self.successes = 0  # ... and that succeeded (for a success= or done= halt)
        self.submitted = 0  # tasks of this call accepted by the supervisor (for halt's N%)

    def may_time_out(self) -> bool:
        """Whether a task of this call can have a timeout (a task's timeout is its call's)."""
        return self.timeout_s is not None or self.timeout_factor is not None

    def note_duration(self, seconds: float) -> None:
        """A task of this call ran `seconds` (remembered where a relative timeout needs it)."""
        self.note_durations((seconds,))

    def note_durations(self, seconds: "Iterable[float]") -> None:
        if self.timeout_factor is None:
            return
        if self.durations is None:
            self.durations = deque(maxlen=RECENT_DURATIONS)
        self.durations.extend(seconds)
