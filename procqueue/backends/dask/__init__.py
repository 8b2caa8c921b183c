"""DaskPool: the procqueue.Pool contract on a Dask distributed cluster.

    caller threads              driver thread (owns every item's state)                   Dask
    ──────────────              ───────────────────────────────────────                   ────
    map / submit ─► _Submit ─┐  (a DaskJob and its DaskTasks: procqueue.tasks' Job and Task)
    imap feeder  ─► _Submit ─┤  inbox ─► apply ─► dispatch ── client.submit(run_chunk) ─► scheduler
    cancel/close ─► _Cancel…─┤    ▲                                                        │
                             │    └─── _ChunkDone(future) ◄─ future.add_done_callback ◄─ worker
    sinks (ApplyResult, MapResult, ResultStream, TaskFuture) ◄─ deliver(item, ok, value),
                                                                in the driver thread only

    pool.py                     driver.py (its commands: items.py)              worker_side.py
                                  chunks.py: dispatch; outcomes.py: a chunk's rows

One driver thread per pool (driver._Driver) blocks in one ``inbox.get()``: caller commands
and Dask's done callbacks both arrive there, so every item's life changes in one thread.
(distributed.as_completed could not also wait for new submissions, cancellations and retry
deadlines: its ``__next__`` polls every 100 ms.)

An item is a procqueue Task (items.DaskTask) and a call a Job (items.DaskJob): the local
pool's task model, whose state machine (procqueue.tasks) every move goes through - QUEUED
while pending, DISPATCHED in a chunk, RETRY_WAIT during a backoff, back to QUEUED when its
chunk lost a worker, then one of DONE, FAILED, CANCELLED - so each item gets exactly one
``deliver``, and a move off that table raises IllegalTransition.

Items travel in chunks: one Dask task (worker_side.run_chunk) runs a list of items and
returns one row per item (ok, the pickled result or the pickled ErrorInfo, seconds, start),
so a failing item fails only itself and an unpicklable result is that item's error.  Chunks are
sized from measured item times (about pool.TARGET_CHUNK_S of work each, smaller at the tail)
unless the call fixes ``chunksize``.  At most chunks.INFLIGHT_CHUNKS_PER_THREAD chunks per
Dask worker thread are submitted at once; lazy inputs (imap*) are read by a feeder thread
through the same bounded Window as the local pool.

Limits, each enforced where it holds for the whole cluster (cluster_limits.py):
  * concurrency (pool, named queue, call, named Limit): a distributed.Semaphore lease held by
    each chunk while it runs;
  * rate (pool, named queue, named Limit): each item takes a lease of a
    distributed.Semaphore(max_leases=limit) right before it runs, in the worker, and gives it
    back `per` seconds after it started: a sliding window over every worker
    (worker_side._RateWindow);
  * a named Limit's semaphores are named after it, not after the pool, so every pool on the
    cluster using that name shares them, and no pool closes them; a chunk's wait on them
    (or on any lease or start) ends instead when its pool lets go of the chunk, which the
    worker sees on its own (worker_side._Unwanted), and then none of its items starts;
  * key / key_concurrency (call): counted here, by the driver, which sees every item of the
    call: an item holds its key from the moment it is put in a chunk to that chunk's end, and
    keyed items wait in a FairQueue (round robin across keys, items._Pending), as in the
    local pool.

Faults:
  * a task's exception keeps its type and message, the remote traceback is its ``__cause__``;
  * a Dask worker lost mid-chunk: Dask itself re-runs the chunk elsewhere, up to the
    scheduler's ``allowed-failures``; then the chunk's items are re-run one per Dask task, so
    only the item that kills its worker fails, as WorkerCrashedError;
  * timeouts are enforced inside the worker (see worker_side._TimedRun): a pure-Python item is
    interrupted at the deadline; an item blocked in C code is abandoned in its thread after a
    grace.

Modules, each importing only those before it in this list:
  worker_side  what runs inside a Dask worker: run_chunk, timeouts, leases, rate windows
  items        the driver's data: items (DaskTask), calls (DaskJob), pending queues, chunks,
               driver commands
  cluster      what the pool holds on the cluster: client, LocalCluster, plugin, semaphores
  options      the checks of the pool's and each call's options
  cluster_limits  the semaphores and rate windows of the pool, its queues, its calls, Limits
  chunks       pending items into chunks, chunks into Dask tasks, the chunks in flight
  outcomes     a returned chunk read: each row's outcome, a failed or crashed chunk's error
  driver       the driver thread
  pool         DaskPool and its stats
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...lazy import lazy_getattr

if TYPE_CHECKING:  # explicit re-exports for type checkers; loaded lazily at run time
    from .cluster import cluster_config as cluster_config
    from .cluster import require_distributed as require_distributed
    from .pool import DaskPool as DaskPool
    from .pool import DaskPoolStats as DaskPoolStats
    from .pool import DaskWorkerStats as DaskWorkerStats
    from .worker_side import RateSpec as RateSpec
    from .worker_side import close_rate_window as close_rate_window
    from .worker_side import run_chunk as run_chunk
    from .worker_side import seal_rate_window as seal_rate_window

# name -> module of this package, imported on first access (PEP 562).  A Dask worker imports
# worker_side (run_chunk) and cluster (_WorkerSetup), and this package with them: it then
# loads neither pool.py nor, through it, the local pool and supervisor DaskPool derives from.
_LAZY = {
    "cluster_config": "cluster",
    "require_distributed": "cluster",
    "DaskPool": "pool",
    "DaskPoolStats": "pool",
    "DaskWorkerStats": "pool",
    "RateSpec": "worker_side",
    "close_rate_window": "worker_side",
    "run_chunk": "worker_side",
    "seal_rate_window": "worker_side",
}


__getattr__ = lazy_getattr(globals(), _LAZY)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["DaskPool", "DaskPoolStats", "DaskWorkerStats", "RateSpec", "close_rate_window",
           "cluster_config", "run_chunk", "seal_rate_window"]
