"""The event stream: one TaskEvent per task attempt, for progress displays, traces and reports.

Events are made only when someone listens (Pool(on_event=...) or Pool(trace=...)), so the
hot path pays nothing otherwise.  Times are wall-clock seconds since the epoch.
"""

from __future__ import annotations

from typing import Callable, ClassVar, Iterable

from .records import FrozenRecord

OUTCOMES = ("ok", "error", "crash", "timeout", "cancelled")


class TaskEvent(FrozenRecord):
    """One task attempt: which task, where it ran, when, and how it ended."""

    # __match_args__ as Record sets it, spelled out for mypy (a caller's `case TaskEvent(...)`)
    _fields = __match_args__ = ("job", "index", "input_repr", "slot", "pid", "attempt",
                                "start_s", "end_s", "outcome", "error")

    job: int  # which call (map, imap, submit...) the task belongs to
    index: int  # position in that call's input
    input_repr: str
    slot: int  # worker slot (stable across restarts: a row of the timeline)
    pid: int | None  # worker process
    attempt: int  # 1-based
    start_s: float
    end_s: float
    outcome: str  # one of OUTCOMES
    error: str | None  # "TypeName: message" when outcome is not ok

    def __init__(self, job: int, index: int, input_repr: str, slot: int, pid: int | None,
                 attempt: int, start_s: float, end_s: float, outcome: str,
                 error: str | None) -> None:
        set_ = object.__setattr__  # frozen: FrozenRecord's __setattr__ refuses
        set_(self, "job", job)
        set_(self, "index", index)
        set_(self, "input_repr", input_repr)
        set_(self, "slot", slot)
        set_(self, "pid", pid)
        set_(self, "attempt", attempt)
        set_(self, "start_s", start_s)
        set_(self, "end_s", end_s)
        set_(self, "outcome", outcome)
        set_(self, "error", error)

    @property
    def seconds(self) -> float:
        return self.end_s - self.start_s


EventListener = Callable[[TaskEvent], None]


def event_error_text(error: BaseException) -> str:
    """What TaskEvent.error says of an exception: "TypeName: message" (procqueue's errors
    keep their message without the annotations str() adds)."""
    message = getattr(error, "message", None)
    return f"{type(error).__name__}: {message if message is not None else error}"


# Compared and hashed by identity (eq=False), as it always was: what users see is the
# PoolStats the pool makes of it, which compares its own way.
class SupervisorStatistics(FrozenRecord, eq=False):
    """A pool's counters at one moment (Pool.stats() builds on it)."""

    # typed as Record's: PoolStats's fields extend these
    _fields: ClassVar[tuple[str, ...]] = (
        "state", "processes", "tasks_submitted", "tasks_succeeded", "tasks_failed",
        "tasks_cancelled", "tasks_queued", "tasks_running", "retries", "worker_restarts",
        "recycled_for_memory")

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

    def __init__(self, state: str, processes: int, tasks_submitted: int, tasks_succeeded: int,
                 tasks_failed: int, tasks_cancelled: int, tasks_queued: int, tasks_running: int,
                 retries: int, worker_restarts: int, recycled_for_memory: int) -> None:
        set_ = object.__setattr__  # frozen: FrozenRecord's __setattr__ refuses
        set_(self, "state", state)
        set_(self, "processes", processes)
        set_(self, "tasks_submitted", tasks_submitted)
        set_(self, "tasks_succeeded", tasks_succeeded)
        set_(self, "tasks_failed", tasks_failed)
        set_(self, "tasks_cancelled", tasks_cancelled)
        set_(self, "tasks_queued", tasks_queued)
        set_(self, "tasks_running", tasks_running)
        set_(self, "retries", retries)
        set_(self, "worker_restarts", worker_restarts)
        set_(self, "recycled_for_memory", recycled_for_memory)


class Utilisation(FrozenRecord):
    """How busy a run kept its workers: the one definition behind `procqueue map --stats`
    and the HTML report, so that the two print the same efficiency for the same run."""

    _fields = __match_args__ = ("workers", "busy_s", "span_s")  # see TaskEvent

    workers: int  # worker slots that ran at least one task attempt
    busy_s: float  # run time of every task attempt: failed ones and retries included
    span_s: float  # from the first attempt's start to the last attempt's end

    def __init__(self, workers: int, busy_s: float, span_s: float) -> None:
        object.__setattr__(self, "workers", workers)
        object.__setattr__(self, "busy_s", busy_s)
        object.__setattr__(self, "span_s", span_s)

    @property
    def efficiency(self) -> float:
        """busy_s / (workers x span_s): 1.0 when every worker ran tasks all along."""
        capacity_s = self.workers * self.span_s
        return self.busy_s / capacity_s if capacity_s > 0 else 0.0

    @property
    def idle_s(self) -> float:
        return max(self.workers * self.span_s - self.busy_s, 0.0)


def utilisation(events: Iterable[TaskEvent]) -> Utilisation:
    """The Utilisation of the task attempts in `events`.

    The span starts at the first task start, not when the pool was created: starting the
    worker processes costs the same for a batch of ten inputs as for a million, and would
    make every short run look idle.  Slots that never ran a task are not counted: a trace
    records only the slots that did, so a figure computed from a trace file could not count
    them either."""
    events = list(events)
    if not events:
        return Utilisation(0, 0.0, 0.0)
    start_s = min(e.start_s for e in events)
    end_s = max(e.end_s for e in events)
    return Utilisation(workers=len({e.slot for e in events}),
                       busy_s=sum(max(e.seconds, 0.0) for e in events),
                       span_s=max(end_s - start_s, 0.0))
