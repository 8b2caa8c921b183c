"""The driver thread (_Driver): the one owner of every item of a DaskPool.

It blocks in one ``inbox.get()``, applies the commands callers and Dask's done callbacks post
there (items.py), has pending items put into chunks and submitted to Dask as run_chunk tasks
(chunks.py), and turns each chunk's rows, as outcomes.py reads them, into exactly one outcome
per item: delivered, retried after a backoff, re-run alone after a lost worker, failed or
cancelled.  Each is a move of the item's Task (procqueue.tasks), so the state machine that
guards the local pool's tasks guards these.  See the package docstring for the whole data
flow.

With a listener (DaskPool(on_event=...) or trace=), each attempt an item ran gets one
TaskEvent, given in this thread before its outcome is delivered, as the local supervisor
does: its times are the worker's, its slot the Dask worker thread that ran it (events.py).
"""

from __future__ import annotations

import heapq
import itertools
import queue
import threading
import time
import traceback
from typing import Any, Callable

from ...errors import (PoolBrokenError, TaskCancelledError, TaskTimeoutError, annotate,
                       retry_stopped)
from ...protocol import short_repr
from ...retry import FailureKind, RetryPolicy
from ...stats import TaskEvent
from ...tasks import TaskState
from .chunks import _Dispatch
from .cluster import _close_quietly
from .events import _Events, _Run, _Slots
from .items import (Command, DaskJob, DaskTask, _CancelCall, _CancelItem, _Chunk, _ChunkDone,
                    _Close, _InputDone, _Open, _Submit, _Terminate)
from .outcomes import (WorkerTally, cancelled_error, chunk_failure, crash_error,
                       is_killed_worker, read_row)
from .worker_side import ChunkReport


# A chunk in flight is killed with its items: Dask says neither whether it had started (it may
# wait in a worker's queue) nor which of its items ran (see docs/dask.md, `cancelled`)
IN_FLIGHT = "while on the Dask cluster (running there, or waiting to run)"


class _Counters:
    def __init__(self) -> None:
        self.submitted = self.succeeded = self.failed = self.cancelled = 0
        self.retries = self.lost_chunks = 0

    def ended(self, state: TaskState) -> None:
        if state is TaskState.DONE:
            self.succeeded += 1
        elif state is TaskState.CANCELLED:
            self.cancelled += 1
        else:
            self.failed += 1


class _Driver:
    """The one thread that owns every item of a DaskPool (see the package docstring)."""

    def __init__(self, client: Any, token: str, retries: int,
                 retry_on: tuple[type[BaseException], ...], allowed_failures: int,
                 on_event: Callable[[TaskEvent], None] | None = None) -> None:
        self.client = client
        self.token = token
        self.policy = RetryPolicy(retries, retry_on)  # the local pool's, see retry.py
        self.allowed_failures = allowed_failures
        self.inbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self.calls: dict[int, DaskJob] = {}  # calls with work left, in submission order
        self.chunks = _Dispatch(client, token, self.post)  # chunks in flight, calls ready
        self.inflight = self.chunks.inflight  # by Dask key
        self.retry_heap: list[tuple[float, int, DaskTask]] = []
        self.retry_seq = itertools.count()
        self.counts = _Counters()
        self.closing = False
        self.state = "running"
        self.broken_error: BaseException | None = None
        self.workers = WorkerTally()  # what each Dask worker ran, as its chunks said
        self.events = _Events(on_event)  # a TaskEvent per attempt (called in this thread)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"procqueue-dask-{token}",
                                       daemon=True)

    def cancel_task(self, item: DaskTask, running: bool) -> None:
        """A submit() future's cancel()."""
        self.post(_CancelItem(item, running))

    def post(self, command: Command) -> None:
        self.inbox.put(command)

    # ---- the loop -------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self.state != "stopped":
                self._apply(self._next_command())
                while True:  # apply whatever else arrived before dispatching once
                    try:
                        self._apply(self.inbox.get_nowait())
                    except queue.Empty:
                        break
                self._requeue_due_retries()
                if self.state == "running":
                    self.chunks.fill(drop=lambda item: self._finish(item, False, None))
                self._maybe_stop()
        except BaseException:  # a procqueue bug: never leave a caller waiting forever
            self._break(PoolBrokenError("procqueue dask driver failed:\n" + traceback.format_exc()))
        finally:
            self.state = "stopped"
            self.stopped.set()

    def _next_command(self) -> Command | None:
        timeout = None
        if self.retry_heap:
            timeout = max(0.0, self.retry_heap[0][0] - time.monotonic())
        try:
            return self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def _apply(self, command: Command | None) -> None:
        match command:
            case None:
                pass
            case _Submit(call, items):
                self._on_submit(call, items)
            case _Open(call):
                call.open = True
                self.calls[call.id] = call
            case _InputDone(call):
                call.open = False
                self._forget_if_finished(call)
            case _ChunkDone(future):
                self._on_chunk_done(future)
            case _CancelCall(call, kill_running, quiet):
                self._cancel_call(call, kill_running, quiet)
            case _CancelItem(item, running):
                self._cancel_item(item, running)
            case _Close():
                self.closing = True
            case _Terminate():
                self._terminate()
            case _:
                raise TypeError(f"unknown driver command {command!r}")

    def _maybe_stop(self) -> None:
        if self.closing and self.state == "running" and not self.calls and not self.inflight:
            self.state = "stopped"

    # ---- submission (chunks: chunks.py) ---------------------------------------------------

    def _on_submit(self, call: DaskJob, items: list[DaskTask]) -> None:
        self.calls[call.id] = call
        call.outstanding += len(items)
        self.counts.submitted += len(items)
        for item in items:
            if item.error is not None:
                self._fail(item, item.error)
            elif call.cancelled:
                self._finish(item, False, cancelled_error(item, "before it started"))
            else:
                call.pending.push(item, item.key)
        self.chunks.mark_ready(call)
        self._forget_if_finished(call)

    def threads(self) -> int:
        return self.chunks.threads()

    # ---- outcomes ---------------------------------------------------------------------------

    def _on_chunk_done(self, future: Any) -> None:
        chunk = self.inflight.get(future.key)
        if chunk is None:
            return  # cancelled or terminated before it finished
        self.chunks.forget(chunk)
        status = future.status
        if status == "finished":
            self._on_rows(chunk, future)
        elif status == "error":
            self._on_chunk_error(chunk, future.exception())
        elif status == "lost":
            self._requeue_uncharged(chunk)
        else:  # cancelled by Dask (scheduler restart, client reconnect)
            for item in _alive(chunk.items):
                self._finish(item, False, cancelled_error(item, "by Dask"))
        future.release()

    def _on_rows(self, chunk: _Chunk, future: Any) -> None:
        try:
            report: ChunkReport = future.result()
        except Exception as exc:  # fetching the result failed (the worker left meanwhile)
            self._on_chunk_error(chunk, exc)
            return
        busy = 0.0
        for item, (ok, data, seconds, started_s) in zip(chunk.items, report.rows, strict=True):
            busy += seconds
            item.seconds, item.pid = seconds, report.pid
            if not item.state.terminal:
                run = self.events.run(report.address, report.thread, started_s, seconds)
                self._on_row(item, ok, data, run)
        chunk.call.sizer.observe(len(report.rows), busy)
        self.workers.record(report, busy)

    def _on_row(self, item: DaskTask, ok: bool, data: bytes, run: _Run) -> None:
        row = read_row(ok, data)
        self.events.emit(item, run, row.outcome, None if row.outcome == "ok" else row.value)
        if row.outcome == "ok":
            self._finish(item, True, row.value)
        elif row.task_error:
            self._after_failure(item, row.value)
        else:  # its result could not be read here: no run would read it either
            self._fail(item, row.value)

    def _on_chunk_error(self, chunk: _Chunk, exc: BaseException | None) -> None:
        if is_killed_worker(exc):
            self._on_lost_worker(chunk, exc)
            return
        for item in _alive(chunk.items):
            self._fail(item, chunk_failure(exc))

    def _on_lost_worker(self, chunk: _Chunk, exc: Any) -> None:
        """Dask re-ran the chunk until `allowed_failures`: split it so that the next worker
        death is charged to the one item that causes it."""
        self.counts.lost_chunks += 1
        alive = _alive(chunk.items)
        if len(chunk.items) > 1:
            self._requeue_uncharged(chunk, isolate=True)
            return
        for item in alive:
            item.crash_runs += self.allowed_failures + 1
            item.attempts += self.allowed_failures  # Dask's own re-runs
            error = crash_error(item, exc, self.workers.pids, self.allowed_failures)
            # Dask says neither when the runs started nor on which thread: the driver's times,
            # from the chunk's submission to now, cover them all (one event for them all)
            run = _Run(_Slots.UNKNOWN, chunk.submitted_s, time.time())
            self.events.emit(item, run, "crash", error)
            self._retry_or_fail(item, item.crash_runs, FailureKind.CRASH, error)

    def _requeue_uncharged(self, chunk: _Chunk, isolate: bool = False) -> None:
        call = chunk.call
        for item in reversed(_alive(chunk.items)):
            item.attempts -= 1  # its run was not its fault (or it never ran)
            item.isolate = item.isolate or isolate
            if call.cancelled or self.state != "running":
                self._end_unstarted(item, "before it finished")
            else:
                item.move(TaskState.QUEUED)
                call.pending.push(item, item.key, front=True)
        self.chunks.mark_ready(call)

    def _after_failure(self, item: DaskTask, error: BaseException) -> None:
        kind = FailureKind.TIMEOUT if isinstance(error, TaskTimeoutError) \
            else FailureKind.EXCEPTION
        self._retry_or_fail(item, item.attempts, kind, error)

    def _retry_or_fail(self, item: DaskTask, runs: int, kind: FailureKind,
                       error: BaseException) -> None:
        """As the local pool's TaskBook.after_failure: retried if the policy says so, failed
        with retry_stopped where only a halt, a cancel or the pool's stop keeps it from that."""
        if not self.policy.should_retry(runs, kind, error):
            self._fail(item, error)
        elif self.state != "running" or item.job.cancelled:
            self._fail(item, retry_stopped(error))
        else:
            self._retry(item, error)

    def _retry(self, item: DaskTask, error: BaseException) -> None:
        item.last_error = error  # its outcome if the retry never starts (Task.last_error)
        item.move(TaskState.RETRY_WAIT)
        self.counts.retries += 1
        due = time.monotonic() + self.policy.backoff(item.attempts)
        heapq.heappush(self.retry_heap, (due, next(self.retry_seq), item))

    def _requeue_due_retries(self) -> None:
        now = time.monotonic()
        while self.retry_heap and self.retry_heap[0][0] <= now:
            item = heapq.heappop(self.retry_heap)[2]
            if item.state.terminal:
                continue
            if item.job.cancelled or self.state != "running":
                self._end_unstarted(item, "before its retry")
                continue
            item.move(TaskState.QUEUED)
            item.job.pending.push(item, item.key, front=True)
            self.chunks.mark_ready(item.job)

    def _end_unstarted(self, item: DaskTask, when: str) -> None:
        """End an item that waits to start: cancelled `when`, unless it failed and waited to
        be retried: then that failure is its outcome."""
        if item.last_error is not None:
            self._fail(item, retry_stopped(item.last_error))
        else:
            self._finish(item, False, cancelled_error(item, when))

    def _fail(self, item: DaskTask, error: BaseException) -> None:
        annotate(error, index=item.index, input_repr=short_repr(item.input), pid=item.pid,
                 attempts=item.attempts)
        self._finish(item, False, error)

    def _finish(self, item: DaskTask, ok: bool, value: Any) -> None:
        """The only place an item gets its outcome, its move to a terminal state; value None
        with not ok: a cancelled Future (it knows already)."""
        if item.state.terminal:
            return
        item.move(_terminal_state(ok, value))
        item.payload = None
        call = item.job
        call.outstanding -= 1
        self.counts.ended(item.state)
        if value is not None or ok:
            try:
                call.sink.deliver(item, ok, value)
            except Exception:
                traceback.print_exc()
        self._forget_if_finished(call)

    def _forget_if_finished(self, call: DaskJob) -> None:
        if call.finished and self.calls.pop(call.id, None) is not None:
            for limit in call.owned_limits:
                _close_quietly(limit)

    # ---- cancel / terminate ---------------------------------------------------------------

    def _cancel_call(self, call: DaskJob, kill_running: bool, quiet: bool) -> None:
        call.cancelled = True
        call.sink.stop_input()
        for item in call.pending.drain():
            self._end_unstarted(item, "before it started")
        if kill_running:
            for chunk in [c for c in self.inflight.values() if c.call is call]:
                self._kill_chunk(chunk, IN_FLIGHT)

    def _cancel_item(self, item: DaskTask, running: bool) -> None:
        chunk = item.chunk
        if chunk is not None and running and len(_alive(chunk.items)) == 1:
            self.chunks.forget(chunk)
            self.client.cancel(chunk.future, force=True)
        self._finish(item, False, None)

    def _kill_chunk(self, chunk: _Chunk, when: str) -> None:
        """Forget a chunk in flight (Dask cannot stop its thread: it runs on, unread)."""
        self.chunks.forget(chunk)
        try:
            self.client.cancel(chunk.future, force=True)
        except Exception:
            pass
        for item in _alive(chunk.items):
            self._finish(item, False, cancelled_error(item, when))

    def _terminate(self) -> None:
        self.state = "terminating"
        for call in list(self.calls.values()):
            call.sink.stop_input()
        for chunk in list(self.inflight.values()):
            self._kill_chunk(chunk, f"{IN_FLIGHT}: the pool was terminated")
        for call in list(self.calls.values()):
            for item in call.pending.drain():
                self._end_unstarted(item, "before it started: the pool was terminated")
        while self.retry_heap:
            item = heapq.heappop(self.retry_heap)[2]
            self._end_unstarted(item, "while waiting to retry")
        for call in list(self.calls.values()):
            call.open = False
            self._forget_if_finished(call)
        self.state = "stopped"

    def _break(self, error: BaseException) -> None:
        self.broken_error = error
        for chunk in list(self.inflight.values()):
            self.chunks.forget(chunk)
            for item in _alive(chunk.items):
                self._finish_quietly(item, error)
        for call in list(self.calls.values()):
            call.sink.stop_input()
            for item in call.pending.drain():
                self._finish_quietly(item, error)
        for _, _, item in self.retry_heap:
            self._finish_quietly(item, error)

    def _finish_quietly(self, item: DaskTask, error: BaseException) -> None:
        try:
            self._finish(item, False, PoolBrokenError(str(error)))
        except Exception:
            pass

    def statistics(self) -> tuple[int, int]:
        """(items queued, items in flight): read from other threads, hence approximate."""
        queued = sum(len(c.pending) for c in list(self.calls.values())) + len(self.retry_heap)
        running = sum(len(c.items) for c in list(self.inflight.values()))
        return queued, running


def _alive(items: list[DaskTask]) -> list[DaskTask]:
    return [item for item in items if not item.state.terminal]


def _terminal_state(ok: bool, value: Any) -> TaskState:
    if ok:
        return TaskState.DONE
    if value is None or isinstance(value, TaskCancelledError):
        return TaskState.CANCELLED
    return TaskState.FAILED
