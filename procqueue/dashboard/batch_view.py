"""What a dashboard shows of a batch a pool runs: fed by the pool's event stream (one
TaskEvent per task attempt, Pool(on_event=view.on_event)) and its statistics (per worker:
pid, running input and for how long, RSS, restarts).

on_event runs on the pool's supervisor thread, once per attempt, so it only counts and
appends to bounded buffers (a few microseconds under an uncontended lock); the snapshot,
taken on the dashboard's sampler thread once per interval, does the rest.  Memory stays
bounded whatever the batch's length: the timeline keeps the last TIMELINE_EVENTS attempts,
the failures the last FAILURES_KEPT, the throughput the last THROUGHPUT_WINDOW_S.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from typing import Any, Protocol, Sequence

from ..process_meter import ProcessMeter
from ..report import COLOURS
from ..stats import TaskEvent, Utilisation

TIMELINE_EVENTS = 1000  # the timeline shows at most the last this many attempts...
TIMELINE_WINDOW_S = 60.0  # ...of at most the last minute
FAILURES_KEPT = 200
THROUGHPUT_BUCKET_S = 5.0  # the chart changes once per bucket: each redraw costs the browser
THROUGHPUT_WINDOW_S = 300.0
WINDOW_STEP_S = 30.0


class WatchedPool(Protocol):
    """What the view reads of a pool (procqueue.Pool): its stats() snapshot."""

    def stats(self) -> Any: ...


class BatchView:
    kind = "pool"

    def __init__(self, total: int | None = None, title: str = "procqueue batch") -> None:
        self.total = total
        self.title = title
        self.pool: WatchedPool | None = None
        self._lock = threading.Lock()
        self._recent: collections.deque[TaskEvent] = collections.deque(maxlen=TIMELINE_EVENTS)
        self._failures: collections.deque[TaskEvent] = collections.deque(maxlen=FAILURES_KEPT)
        self._buckets: dict[int, list[int]] = {}  # bucket number -> [ok, failed]
        # the run's utilisation, kept as running sums (stats.utilisation's definition)
        self._busy_s = 0.0
        self._first_start: float | None = None
        self._last_end: float | None = None
        self._slots: set[int] = set()
        self._started = time.time()
        self._meter = ProcessMeter()

    def attach(self, pool: WatchedPool) -> None:
        self.pool = pool

    def close(self) -> None:
        self.pool = None

    # ---- the pool's thread ------------------------------------------------------------------

    def on_event(self, event: TaskEvent) -> None:
        """A task attempt ended: give this to Pool(on_event=...)."""
        bucket = int(event.end_s // THROUGHPUT_BUCKET_S)
        with self._lock:
            self._recent.append(event)
            if event.outcome != "ok":
                self._failures.append(event)
            counts = self._buckets.get(bucket)
            if counts is None:
                counts = self._buckets[bucket] = [0, 0]
                self._forget_old_buckets(bucket)
            counts[event.outcome != "ok"] += 1
            self._busy_s += max(event.end_s - event.start_s, 0.0)
            if self._first_start is None or event.start_s < self._first_start:
                self._first_start = event.start_s
            if self._last_end is None or event.end_s > self._last_end:
                self._last_end = event.end_s
            self._slots.add(event.slot)

    def _forget_old_buckets(self, newest: int) -> None:
        oldest = newest - int(THROUGHPUT_WINDOW_S / THROUGHPUT_BUCKET_S)
        for old in [b for b in self._buckets if b < oldest]:
            del self._buckets[old]

    # ---- the sampler's thread ---------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        now = time.time()
        with self._lock:
            recent = list(self._recent)
            failures = list(self._failures)
            buckets = sorted((b, list(c)) for b, c in self._buckets.items())
            use = Utilisation(len(self._slots), self._busy_s,
                              0.0 if self._first_start is None or self._last_end is None
                              else self._last_end - self._first_start)
        stats = self.pool.stats() if self.pool is not None else None
        slots = {w.slot for w in stats.workers} if stats is not None else set()
        return {"kind": self.kind, "title": self.title, "now": now,
                "batch": self._batch(stats, use, now),
                "workers": self._workers(stats),
                "throughput": {"bucket_s": THROUGHPUT_BUCKET_S,
                               "window_s": _window(now - self._started),
                               "series": [[b * THROUGHPUT_BUCKET_S, ok, failed]
                                          for b, (ok, failed) in buckets]},
                "timeline": _timeline(recent, slots, now),
                "failures": [_failure(e) for e in reversed(failures)]}

    def _batch(self, stats: Any, use: Utilisation, now: float) -> dict[str, Any]:
        batch: dict[str, Any] = {"total": self.total, "elapsed_s": now - self._started,
                                 "efficiency": use.efficiency if use.workers else None}
        if stats is None:
            return {**batch, "done": None, "failed": None, "running": None, "retries": None,
                    "workers": None}
        return {**batch, "done": stats.tasks_succeeded + stats.tasks_failed
                + stats.tasks_cancelled, "failed": stats.tasks_failed,
                "running": stats.tasks_running, "retries": stats.retries,
                "workers": stats.processes,
                "total": self.total if self.total is not None else stats.tasks_submitted}

    def _workers(self, stats: Any) -> list[dict[str, Any]]:
        if stats is None:
            return []
        rows = []
        for w in stats.workers:
            cpu, rss = self._meter.measure(w.pid)
            rows.append({"slot": w.slot, "pid": w.pid, "task": w.task, "task_s": w.task_s,
                         "cpu_percent": cpu, "rss_bytes": rss or w.rss_bytes,
                         "tasks_done": w.tasks_done, "restarts": w.restarts,
                         "last_exit": w.last_exit})
        self._meter.keep_only(w.pid for w in stats.workers)
        return rows


def _window(elapsed_s: float) -> float:
    """The throughput chart's span: the run so far, in steps of WINDOW_STEP_S, up to
    THROUGHPUT_WINDOW_S (a short batch is not squeezed into the right edge)."""
    steps = max(math.ceil(elapsed_s / WINDOW_STEP_S), 1)
    return min(steps * WINDOW_STEP_S, THROUGHPUT_WINDOW_S)


def _timeline(recent: Sequence[TaskEvent], slots: set[int], now: float) -> dict[str, Any]:
    """The last attempts as the page draws them, as the HTML report draws a run: one row per
    worker slot, one bar per attempt, in the report's colours."""
    start = now - TIMELINE_WINDOW_S
    shown = [e for e in recent if e.end_s >= start]
    if shown:
        start = max(start, min(e.start_s for e in shown))
    return {"start": start, "end": now, "colours": COLOURS,
            "slots": sorted(slots | {e.slot for e in shown}),
            "events": [[e.slot, e.start_s, e.end_s, e.outcome, e.input_repr, e.attempt, e.pid,
                        e.error] for e in shown]}


def _failure(e: TaskEvent) -> dict[str, Any]:
    return {"input": e.input_repr, "outcome": e.outcome, "attempt": e.attempt,
            "slot": e.slot, "pid": e.pid, "error": e.error, "end": e.end_s}
