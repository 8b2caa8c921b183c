"""The event stream: one TaskEvent per task attempt, for progress displays, traces and reports.

Events are made only when someone listens (Pool(on_event=...) or Pool(trace=...)), so the
hot path pays nothing otherwise.  Times are wall-clock seconds since the epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

OUTCOMES = ("ok", "error", "crash", "timeout", "cancelled")


@dataclass(frozen=True)
class TaskEvent:
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

    @property
    def seconds(self) -> float:
        return self.end_s - self.start_s


EventListener = Callable[[TaskEvent], None]
