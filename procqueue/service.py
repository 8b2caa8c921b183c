"""A worker service: claims stored tasks from a TaskQueue and runs them in a Pool.

    service loop (caller's thread)                    pool (its supervisor and workers)
    ------------------------------                    ---------------------------------
    claim(wants) ── one transaction ──► tasks ──► pool.imap_outcomes(call_stored, ...) ──┐
      ▲      wants: free places, per-queue                                                │
      │      worker_concurrency; the store                collector thread per batch ◄────┘
      │      applies the global limits                    puts each outcome in `done`,
      │                                                   writes a byte to the wake-up pipe
    record(outcomes) ◄── one transaction per wake-up ◄── done
    wait: selector over the store's waker (an enqueue), the wake-up pipe (an outcome),
          and the next poll or rate-limit time
    heartbeat thread: refreshes the lease every HEARTBEAT_S, with a report of the workers
          (pid, stored task running, CPU, memory, restarts): for dashboards, and so that a
          death is charged only to the tasks that were running (store/sql.py _put_back_lost)

How many tasks a service holds: with a limited queue, at most one per free worker (a task held
here is one another service cannot run); otherwise enough to keep the workers fed between two
claims, sized from the tasks' measured run time (tiny tasks are claimed hundreds at a time, so
one transaction serves many).  On exit (until_idle, stop, Ctrl-C, an error) the tasks it still
holds go back to pending, unfinished, and the service's row is removed.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue as queue_module
import selectors
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol, Sequence

from .errors import (TaskFailed, TaskTimeoutError, WorkerCrashedError, remote_traceback,
                     remote_traceback_text)
from .process_meter import ProcessMeter
from .store import HEARTBEAT_S, ClaimedTask, Finished, QueueSpec, StoredError
from .store.codec import error_columns, short_repr
from .stored_call import call_stored
from .taskqueue import TaskQueue

POLL_S = 0.25  # claim again this often without a wake-up (others' tasks ending free limits)
SPECS_REFRESH_S = 1.0  # re-read the queues' definitions (new queues, changed limits)
FEED_S = 0.5  # hold enough tasks to keep each worker busy this long between claims
MAX_DEPTH = 1024  # but at most this many per worker
MIN_DEPTH = 2
STORE_RETRY_S = 1.0  # a store that failed (busy, unreachable) is tried again this often
# A cancelled call's running tasks end within the pool's kill grace (0.5 s) of the cancel; a
# worker stuck in the kernel is not waited for longer than this
CANCEL_WAIT_S = 5.0


class OutcomePool(Protocol):
    """What the service needs of a pool (procqueue.Pool)."""

    _processes: int

    def imap_outcomes(self, func: Callable[..., Any], iterable: Iterable[Any], *,
                      ordered: bool = True, chunksize: int | None = None, star: bool = False,
                      **options: Any) -> Any: ...


@dataclass
class ServiceSummary:
    """What a service did: outcomes it recorded, by kind."""

    service_id: str
    succeeded: int = 0
    failed: int = 0  # errors, crashes included (a crash may have been re-queued: retries=)
    dropped: int = 0  # outcomes of tasks cancelled or taken over meanwhile
    by_queue: dict[str, int] = field(default_factory=dict)


class QueueService:
    """One run of a worker service (see the module docstring)."""

    def __init__(self, pool: OutcomePool, tq: TaskQueue, queues: Sequence[str] | None = None,
                 *, until_idle: bool = False, stop: threading.Event | None = None) -> None:
        self.pool = pool
        self.tq = tq
        self.store = tq.store
        self.queues = list(queues) if queues else None
        self.until_idle = until_idle
        self.stop = stop or threading.Event()
        self.id = uuid.uuid4().hex[:12]
        self.summary = ServiceSummary(self.id)
        self.jobs = max(1, int(getattr(pool, "_processes", os.cpu_count() or 1)))
        self._held: dict[int, ClaimedTask] = {}
        self._done: queue_module.SimpleQueue[tuple[ClaimedTask, Any]] = queue_module.SimpleQueue()
        self._pipe_r, self._pipe_w = os.pipe()
        self._wake_sent = threading.Event()
        os.set_blocking(self._pipe_r, False)
        os.set_blocking(self._pipe_w, False)
        self._specs: dict[str, QueueSpec] = {}
        self._specs_at = 0.0
        self._rotation = 0
        self._mean_s = 1.0  # measured run time per task: seeded long, so a first claim of
        # unknown tasks takes MIN_DEPTH per worker, not a pile other services could run
        # the calls running in the pool: id(outcomes) -> (outcomes, its collector thread)
        self._calls: dict[int, tuple[Any, threading.Thread]] = {}
        self._batch_of: dict[int, tuple[Any, list[ClaimedTask]]] = {}  # task id -> its call
        self._revoked: queue_module.SimpleQueue[set[int]] = queue_module.SimpleQueue()
        self._unrecorded: list[Finished] = []
        self._last_store_error = ""

    # ---- the loop ---------------------------------------------------------------------------

    def run(self) -> ServiceSummary:
        self.store.register_service(self.id, self.queues or [], self.jobs)
        waker = self.store.waker(self.id)
        heartbeat = threading.Thread(target=self._beat, name="procqueue-heartbeat",
                                     daemon=True)
        heartbeat.start()
        try:
            self._loop(waker)
        finally:
            self.stop.set()
            with contextlib.suppress(Exception):
                self._record_done()  # what finished is kept; only the rest goes back
            self._cancel_batches()  # (their cancellations are not outcomes: never recorded)
            self.store.deregister_service(self.id, [(t.id, t.attempt)
                                                    for t in self._held.values()])
            waker.close()
            heartbeat.join()
            os.close(self._pipe_r)
            os.close(self._pipe_w)
        return self.summary

    def _loop(self, waker: Any) -> None:
        selector = selectors.DefaultSelector()
        waker_fd = waker.fileno()
        selector.register(waker_fd, selectors.EVENT_READ, "store")
        selector.register(self._pipe_r, selectors.EVENT_READ, "outcomes")
        claim_due, next_claim = True, 0.0
        try:
            while not self.stop.is_set():
                try:
                    dropped = self._drop_revoked()
                    if (self._record_done() or dropped) and self._worth_claiming():
                        claim_due = True  # places are free once recorded, not before
                    now = time.monotonic()
                    if claim_due or now >= next_claim:
                        got_all, retry_in = self._claim()
                        claim_due = got_all and self._worth_claiming()
                        next_claim = now + (POLL_S if retry_in is None
                                            else min(POLL_S, retry_in))
                        if (self.until_idle and not self._held and not got_all
                                and self._idle()):
                            return
                except Exception as exc:  # the store is busy or unreachable: keep what we
                    self._store_failed(exc)  # have (outcomes are kept), try again
                    self.stop.wait(STORE_RETRY_S)
                    continue
                timeout = 0.0 if claim_due else max(0.0, next_claim - time.monotonic())
                for key, _ in selector.select(timeout):
                    if key.data == "store":
                        waker.drain()
                        claim_due = True
                        if waker.fileno() != waker_fd:  # PostgreSQL: listening again, anew
                            selector.unregister(waker_fd)
                            waker_fd = waker.fileno()
                            selector.register(waker_fd, selectors.EVENT_READ, "store")
                    else:
                        # Drain, then clear: a byte written between a clear and the drain would
                        # be eaten with the flag left set, and no collector would write again.
                        _drain_pipe(self._pipe_r)
                        self._wake_sent.clear()
                        claim_due = claim_due or self._worth_claiming()
        finally:
            selector.close()

    def _store_failed(self, exc: Exception) -> None:
        text = f"{type(exc).__name__}: {exc}"
        if text != self._last_store_error:
            self._last_store_error = text
            print(f"procqueue service {self.id}: the store failed ({text}); retrying every "
                  f"{STORE_RETRY_S:g} s", file=sys.stderr)

    def _idle(self) -> bool:
        """No pending task left in the served queues (until_idle's end)."""
        return not any(c.pending for c in self.store.counts()
                       if self.queues is None or c.spec.name in self.queues)

    # ---- claiming ---------------------------------------------------------------------------

    def _served_specs(self) -> dict[str, QueueSpec]:
        now = time.monotonic()
        if now - self._specs_at > SPECS_REFRESH_S:
            specs = self.store.queue_specs()
            self._specs = {name: spec for name, spec in specs.items()
                           if self.queues is None or name in self.queues}
            self._specs_at = now
        return self._specs

    def _capacity(self, specs: dict[str, QueueSpec]) -> int:
        if any(spec.limited for spec in specs.values()):
            return self.jobs
        depth = min(MAX_DEPTH, max(MIN_DEPTH, math.ceil(FEED_S / max(self._mean_s, 1e-6))))
        return self.jobs * depth

    def _free(self) -> int:
        return self._capacity(self._specs) - len(self._held)

    def _worth_claiming(self) -> bool:
        """Free places enough for a claim: any, under a limit (a place held back is a task
        that waits); else half the places, so that one claim, one call into the pool and one
        collector serve many tasks (per task they cost a worker ~1 ms of its CPU)."""
        free = self._free()
        if any(spec.limited for spec in self._specs.values()):
            return free > 0
        return free > 0 and free * 2 >= self._capacity(self._specs)

    def _wants(self, specs: dict[str, QueueSpec]) -> dict[str, int]:
        free = self._capacity(specs) - len(self._held)
        if free <= 0 or not specs:
            return {}
        names = sorted(specs)
        self._rotation = (self._rotation + 1) % len(names)
        names = names[self._rotation:] + names[:self._rotation]  # no queue starves the others
        wants: dict[str, int] = {}
        for name in names:
            spec = specs[name]
            want = free
            if spec.worker_concurrency is not None:
                mine = sum(1 for t in self._held.values() if t.queue == name)
                want = min(want, spec.worker_concurrency - mine)
            if want > 0:
                wants[name] = want
        return wants

    def _claim(self) -> tuple[bool, float | None]:
        """Claim and dispatch; (whether every place asked for was filled, seconds until a
        rate limit lets more start)."""
        specs = self._served_specs()
        wants = self._wants(specs)
        if not wants:
            return False, None
        # Under a limit a claimed task counts as started (a rate, a concurrency): all queues
        # together take no more than the workers free, or a task waits in the pool behind
        # another queue's and starts later than its claim said (rate 1/s: two starts 0.1 s apart)
        total = self._free() if any(spec.limited for spec in specs.values()) else None
        claim = self.store.claim(self.id, wants, total)
        for task in claim.expired:
            self._held[task.id] = task
            self._done.put((task, TaskTimeoutError(  # (_attributed names the task)
                "passed its stored deadline before it could run again")))
        self._dispatch(claim.tasks)
        retry_in = None if claim.retry_at is None else max(0.0, claim.retry_at - time.time())
        wanted = max(wants.values()) if total is None else min(total, max(wants.values()))
        return len(claim.tasks) + len(claim.expired) >= wanted, retry_in

    def _dispatch(self, tasks: list[ClaimedTask]) -> None:
        by_timeout: dict[float | None, list[ClaimedTask]] = {}
        for task in tasks:
            self._held[task.id] = task
            by_timeout.setdefault(task.time_left_s, []).append(task)
        for time_left, batch in by_timeout.items():
            options: dict[str, Any] = {} if time_left is None else {"timeout": time_left}
            # Chunks of at most a quarter of the batch per worker: a batch of a few long tasks
            # must spread over the workers, not run one after another in a single chunk.
            outcomes = self.pool.imap_outcomes(
                call_stored, [(t.function, t.payload, t.id) for t in batch], ordered=False,
                star=True, chunksize=max(1, len(batch) // (4 * self.jobs)), **options)
            for task in batch:
                self._batch_of[task.id] = (outcomes, batch)
            collector = threading.Thread(target=self._collect, args=(batch, outcomes),
                                         name="procqueue-collect", daemon=True)
            self._calls[id(outcomes)] = (outcomes, collector)
            collector.start()

    def _collect(self, batch: list[ClaimedTask], outcomes: Any) -> None:
        try:
            for outcome in outcomes:
                self._done.put((batch[outcome.index], outcome))
                if not self._wake_sent.is_set():  # one byte per wake-up, not per outcome
                    self._wake_sent.set()
                    with contextlib.suppress(BlockingIOError, OSError):
                        os.write(self._pipe_w, b"!")
        finally:
            self._calls.pop(id(outcomes), None)

    def _cancel_batches(self) -> None:
        self._cancel_until_ended([outcomes for outcomes, _ in list(self._calls.values())])

    def _cancel_until_ended(self, calls: list[Any]) -> None:
        """Cancel calls, killing their running tasks, and wait until each has every outcome:
        a killed task ends once its worker is dead or SIGKILLed.  Only then may its tasks go
        back to the store: another service would start one beside its dying copy (a
        concurrency of 1 seen as 2)."""
        for outcomes in calls:
            with contextlib.suppress(Exception):
                outcomes.cancel(True)
        deadline = time.monotonic() + CANCEL_WAIT_S
        for outcomes in calls:
            _, collector = self._calls.get(id(outcomes), (None, None))
            if collector is not None:
                collector.join(max(0.0, deadline - time.monotonic()))

    # ---- tasks taken away: cancelled, or given to another service -------------------

    def _drop_revoked(self) -> bool:
        """Kill the calls running tasks this service no longer holds; their other unfinished
        tasks go back to pending, unrun (a call is cancelled as a whole).  Only once a call's
        processes are gone do its cancelled tasks give up their places under the queue's
        limits (store: release's `ended`).  Whether any call was dropped (places are free)."""
        revoked: set[int] = set()
        while True:
            try:
                revoked |= self._revoked.get_nowait()
            except queue_module.Empty:
                break
        calls = {id(self._batch_of[i][0]): self._batch_of[i] for i in revoked
                 if i in self._batch_of and i in self._held}
        for outcomes, batch in calls.values():
            self._cancel_until_ended([outcomes])
            back = [(t.id, t.attempt) for t in batch if t.id in self._held
                    and t.id not in revoked]
            ended = [t.id for t in batch if t.id in revoked]
            self.store.release(self.id, back, ended)
            for task in batch:
                self._held.pop(task.id, None)
                self._batch_of.pop(task.id, None)
        return bool(calls)

    def _check_still_held(self) -> None:
        """(heartbeat thread) Tell the loop which held tasks were cancelled meanwhile."""
        held = list(self._held.copy())
        gone = set(held) - self.store.still_held(self.id, held)
        if gone:
            self._revoked.put(gone)
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(self._pipe_w, b"!")

    # ---- recording --------------------------------------------------------------------------

    def _record_done(self) -> int:
        """Record the outcomes that came in; how many."""
        finished, self._unrecorded = self._unrecorded, []
        while True:
            try:
                task, outcome = self._done.get_nowait()
            except queue_module.Empty:
                break
            if task.id in self._held:  # else revoked, or put back: not ours to record
                finished.append(self._finished(task, outcome))
        if not finished:
            return 0
        try:
            applied = self.store.record(self.id, finished)
        except Exception:
            self._unrecorded = finished  # recorded at the next try (or fenced, if too late)
            raise
        self.summary.dropped += len(finished) - applied
        for f in finished:
            task = self._held.pop(f.id)
            self._batch_of.pop(f.id, None)
            self.summary.by_queue[task.queue] = self.summary.by_queue.get(task.queue, 0) + 1
            if f.error is None:
                self.summary.succeeded += 1
            else:
                self.summary.failed += 1
        if any(spec.limited for spec in self._specs.values()):
            self.store.notify()  # places freed under a shared limit: other services may claim
        return len(finished)

    def _finished(self, task: ClaimedTask, outcome: Any) -> Finished:
        if isinstance(outcome, BaseException):
            error = _attributed(outcome, task, None, task.attempt)
            return Finished(task.id, task.attempt, None, StoredError(*error_columns(error)))
        seconds = float(outcome.seconds or 0.0)
        self._mean_s = 0.8 * self._mean_s + 0.2 * seconds
        runs = max(1, int(outcome.attempts or 1))
        if outcome.ok:
            return Finished(task.id, task.attempt, outcome.value, None, seconds=seconds,
                            pid=outcome.pid, runs=runs)
        error = _attributed(outcome.error, task, outcome.pid, task.attempt + runs - 1,
                            outcome.index)
        return Finished(task.id, task.attempt, None, StoredError(*error_columns(error)),
                        retryable=isinstance(error, WorkerCrashedError), seconds=seconds,
                        pid=outcome.pid, runs=runs)

    # ---- the lease --------------------------------------------------------------------------

    def _beat(self) -> None:
        meter = ProcessMeter()
        while not self.stop.wait(HEARTBEAT_S):
            try:
                workers = None  # not known: the store falls back to what was claimed when
                with contextlib.suppress(Exception):  # the lease matters most
                    workers = self._workers_report(meter)
                if not self.store.heartbeat(self.id, workers):
                    # Declared dead (paused past the lease): our tasks were given to others;
                    # stop, and let whoever runs us start a fresh service.
                    self.stop.set()
                    return
                self._check_still_held()
            except Exception:
                continue  # a busy store: the next beat tries again within the lease

    def _workers_report(self, meter: ProcessMeter) -> list[dict[str, Any]] | None:
        """The pool's workers as a dashboard shows them, with the stored task each runs; None
        for a pool that cannot say which input its workers run (then the store charges a
        death to the tasks claimed before the last heartbeat instead)."""
        stats = getattr(self.pool, "stats", None)
        if stats is None or not getattr(self.pool, "reports_running_inputs", False):
            return None
        workers = stats().workers
        report = []
        for w in workers:
            cpu, rss = meter.measure(w.pid)
            running = w.task_input
            task_id = running[2] if isinstance(running, tuple) and len(running) == 3 else None
            held = self._held.get(task_id) if task_id is not None else None
            report.append({
                "slot": w.slot, "pid": w.pid, "task": task_id,
                "label": None if held is None else held.label,  # (_held: read, atomic)
                "task_started_at": None if w.task_s is None else time.time() - w.task_s,
                "cpu_percent": None if cpu is None else round(cpu, 1),
                "rss_bytes": rss or w.rss_bytes, "tasks_done": w.tasks_done,
                "restarts": w.restarts, "last_exit": w.last_exit})
        meter.keep_only(w.pid for w in workers)
        return report


def _attributed(error: BaseException, task: ClaimedTask, pid: int | None,
                attempts: int, pool_index: int | None = None) -> BaseException:
    """Name the stored task (its id, arguments and attempt) where the pool named its own
    call's index and input (the function reference and the arguments' pickle): a user of
    get_result() knows the task by its id and arguments, not by its place in a batch."""
    if isinstance(error, TaskFailed):
        error.index, error.input_repr, error.attempts = task.id, task.label, attempts
        return error
    # The pool set .index and .input_repr on the task's own exception unless it had them
    # (errors.annotate): only what the pool set is replaced
    if getattr(error, "input_repr", None) == short_repr((task.function, task.payload, task.id)):
        with contextlib.suppress(AttributeError, TypeError):
            error.input_repr = task.label  # type: ignore[attr-defined]
            if pool_index is not None and getattr(error, "index", None) == pool_index:
                error.index = task.id  # type: ignore[attr-defined]
    tb_text = remote_traceback_text(error.__cause__)
    if tb_text is not None:
        where = f"[procqueue] raised by stored task {task.id} (input {task.label})"
        if pid is not None:
            where += f" in worker pid {pid}"
        error.__cause__ = remote_traceback(tb_text + ("" if tb_text.endswith("\n") else "\n")
                                           + where + "\n")
    return error


def _drain_pipe(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 4096):
            pass


def serve(pool: OutcomePool, tq: TaskQueue, queues: Sequence[str] | None = None, *,
          until_idle: bool = False, stop: threading.Event | None = None) -> ServiceSummary:
    """Run a worker service in the calling thread until ``stop`` is set, Ctrl-C, or (with
    until_idle) the served queues have no pending task and nothing runs here."""
    return QueueService(pool, tq, queues, until_idle=until_idle, stop=stop).run()
