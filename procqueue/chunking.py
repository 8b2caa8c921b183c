"""Guided chunk sizes from measured task durations, so users never tune `chunksize`.

A batch (chunk) costs a round trip, a few tens of microseconds; a task may cost a microsecond.
So tiny tasks travel in batches that take about TARGET_BATCH_S to run, while no batch takes
more than a 1/(2*workers) share of what is queued: batches shrink as the input runs out (down
to a floor of work that keeps the supervisor's round trips a second bounded), and the slow
tail is spread over all workers instead of sitting in one big last chunk.  Until a task of
this function has been measured, batches hold one task.  Pure: no I/O, no clock.
"""

from __future__ import annotations

import math

# Aim for batches of about 25 ms of work: a batch costs its worker ~150-250 us to report
# (bench/worker_gaps.py), so 1%; at 15 ms, 10 ms tasks went one per batch (2-3%).
TARGET_BATCH_S = 0.025
MIN_BATCH_S = 0.001  # guided shrinking stops at batches of this much work (see next_size)
# The supervisor pays each batch a send and a receive (~0.1-0.4 ms of its time): with many
# workers, 25 ms batches are more round trips a second than one supervisor thread makes.  So a
# batch holds at least workers / MAX_BATCHES_PER_S of work: 2-16 workers keep TARGET_BATCH_S,
# 64 get 128 ms batches (guided shrinking still spreads the tail over every worker).
MAX_BATCHES_PER_S = 500
# ... and as the input runs out, guided shrinking stops where the batches would ask for more
# round trips a second than this: workers / TAIL_MAX_BATCHES_PER_S of work (1 ms up to 8
# workers, 8 ms at 64).  Shrinking to 1 ms batches at 64 workers asked the supervisor for
# 64,000 round trips a second, and the workers waited for it through the last 10% of a
# `map` (bench/worker_idle.py, 2 cores: 1.3-3.5% of their time, 0.3-0.8% with this floor).
# The price is the end's balance, at most one such batch per worker: a floor twice as high
# (4,000 a second) gave back at the end what it saved in the tail.
TAIL_MAX_BATCHES_PER_S = 16 * MAX_BATCHES_PER_S
# While a batch runs, its worker sends what it finished at least this often (see
# report_interval_s): what a crash loses and how late imap sees results
MIN_REPORT_S = 0.05
MAX_BATCH_TASKS = 4096  # caps the memory and result latency of one batch
EWMA_WEIGHT = 0.3  # weight of the newest observation of mean task time


class ChunkSizer:
    """Chooses the next batch size for one call (one function)."""

    __slots__ = ("processes", "fixed", "target_s", "max_tasks", "mean_task_s",
                 "observed_tasks", "capped")

    def __init__(self, processes: int, fixed: int | None = None, *,
                 target_s: float = TARGET_BATCH_S, max_tasks: int = MAX_BATCH_TASKS) -> None:
        if processes < 1:
            raise ValueError("processes must be >= 1")
        if fixed is not None and fixed < 1:
            raise ValueError("chunksize must be >= 1")
        self.processes = processes
        self.fixed = fixed
        self.target_s = target_s  # a batch's work, in seconds (its round trip's worth)
        self.max_tasks = max_tasks
        self.mean_task_s: float | None = None
        self.observed_tasks = 0
        self.capped = False  # target_s is a cap (with_target): many workers do not raise it

    @property
    def probing(self) -> bool:
        """No task of this function has been measured yet: its batches hold one task."""
        return self.fixed is None and self.mean_task_s is None

    def observe(self, tasks: int, busy_s: float) -> None:
        """Record that `tasks` tasks took `busy_s` seconds of worker time in total."""
        if tasks <= 0:
            return
        mean = max(busy_s, 0.0) / tasks
        if self.mean_task_s is None:
            self.mean_task_s = mean
        else:
            self.mean_task_s = EWMA_WEIGHT * mean + (1 - EWMA_WEIGHT) * self.mean_task_s
        self.observed_tasks += tasks

    def with_target(self, target_s: float) -> "ChunkSizer":
        """A sizer for one call whose batches hold at most about `target_s` of work, starting
        from what this one measured (a journaled call: what a worker finished but has not
        sent when the run dies is lost).  A fixed chunksize is the caller's: kept."""
        if self.fixed is not None or target_s >= self.target_s:
            return self
        sizer = ChunkSizer(self.processes, target_s=target_s, max_tasks=self.max_tasks)
        sizer.mean_task_s = self.mean_task_s
        sizer.observed_tasks = self.observed_tasks
        sizer.capped = True
        return sizer

    def report_interval_s(self) -> float:
        """How often a worker sends what a batch of this call has finished while it runs
        (RunTasks.report_s): twice the work the batch was sized for, at least
        MIN_REPORT_S.  A batch then reports once, at its end, unless it runs far longer
        than expected: with many workers, batches of 128 ms sent three reports each at 50 ms,
        a message each way per report (~3 us of a worker's and 2 of the supervisor's CPU per
        1 ms task at 64 workers).  A chunksize of the caller's keeps MIN_REPORT_S: how
        long its batches run is not known."""
        if self.fixed is not None:
            return MIN_REPORT_S
        return max(MIN_REPORT_S, 2 * self._target_s(self.processes))

    def _target_s(self, workers: int) -> float:
        """The work a batch is sized for (see MAX_BATCHES_PER_S)."""
        return self.target_s if self.capped else max(self.target_s, workers / MAX_BATCHES_PER_S)

    def next_size(self, queued: int, workers: int | None = None) -> int:
        """How many of the `queued` tasks the next batch should take (at least 1); `workers`
        overrides `processes` where their number changes (a Dask cluster)."""
        if queued <= 0:
            return 0
        if self.fixed is not None:
            return min(self.fixed, queued)
        if self.mean_task_s is None:
            return 1
        mean = max(self.mean_task_s, 1e-7)
        workers = workers or self.processes
        # Shrinking a batch below this much work gains less balance at the tail than the extra
        # round trips cost: tiny tasks end in a few ms-sized batches, not hundreds.
        floor_s = max(MIN_BATCH_S, workers / TAIL_MAX_BATCHES_PER_S)
        guided = max(math.ceil(queued / (2 * workers)), int(floor_s / mean))
        return max(1, min(int(self._target_s(workers) / mean), guided, self.max_tasks, queued))
