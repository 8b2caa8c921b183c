"""A DaskPool's limits as they hold on the cluster: the distributed.Semaphore leases each
chunk holds while it runs, and the rate windows each item takes its start from.

    pool concurrency=          a Semaphore of the pool's, held by each chunk of the pool
    pool rate=                 a rate window of the pool's (worker_side._RateWindow)
    queues={name: Queue(...)}  per queue, a Semaphore and a rate window of the pool's, for
                               the calls made with queue=name
    call concurrency=          a Semaphore of the call's own, closed when the call ends
    call limit=Limit(...)      a Semaphore and a rate window named after the Limit, shared by
                               every pool on the cluster that uses a Limit of that name

What a pool owns is closed with it (cluster._Resources).  No pool closes a named Limit's
semaphores: other pools and programs may be using them, and they stay on the scheduler as a
local Limit's shared memory stays on its machine.  A chunk of an ended pool still waiting on
them stops anyway, when the worker learns its task was cancelled (worker_side._Unwanted).

A chunk takes its leases in one order (the pool's, the queue's, the call's, the Limit's):
the only lease two pools share comes last, so no two chunks wait on each other in a cycle.
"""

from __future__ import annotations

import threading
from typing import Any, Mapping, NamedTuple

from ...limits import Limit, Rate
from .cluster import _Resources
from .options import QueueSpec
from .worker_side import RateSpec, _distributed

# A named Limit's semaphores are the cluster's, not a pool's: they are named without the
# "procqueue-<pool token>-" of what a pool owns, so both programs derive the same name.
NAMED_LIMIT_PREFIX = "procqueue.limit."


class Gates(NamedTuple):
    """Semaphores a chunk holds while it runs, and rate windows its items take starts from."""

    semaphores: tuple[Any, ...] = ()
    rates: tuple[RateSpec, ...] = ()

    def then(self, other: "Gates") -> "Gates":
        return Gates(self.semaphores + other.semaphores, self.rates + other.rates)


class CallGates(NamedTuple):
    """One call's gates, and the semaphores of its own (closed when the call ends)."""

    semaphores: tuple[Any, ...]
    rates: tuple[RateSpec, ...]
    owned: tuple[Any, ...]


class ClusterLimits:
    """The gates of a pool and of its queues, opened with the pool, and each call's."""

    def __init__(self, resources: _Resources, token: str, concurrency: int | None,
                 rate: Rate | None, queues: Mapping[str, QueueSpec]) -> None:
        self.resources = resources
        self.token = token
        self.pool = self._owned_gates(concurrency, "pool", rate, "rate")
        self.queues = {name: self._owned_gates(spec.concurrency, f"queue-{name}",
                                               spec.rate, f"queue-{name}-rate")
                       for name, spec in queues.items()}
        self.named: dict[str, tuple[Limit, Gates]] = {}  # by Limit name, opened once per pool
        self.lock = threading.Lock()  # calls come from any thread

    def for_call(self, call_id: int, concurrency: int | None, queue: Any,
                 limit: Limit | None) -> CallGates:
        """The gates of a call; ValueError for a queue the pool does not have or a Limit
        that disagrees with one of its name (in this pool or on the cluster)."""
        queued = self._queue(queue)
        named = self._named(limit)
        own = () if concurrency is None else (self._semaphore(concurrency, f"call{call_id}"),)
        gates = self.pool.then(queued).then(Gates(own)).then(named)
        return CallGates(gates.semaphores, gates.rates, own)

    def _queue(self, name: Any) -> Gates:
        if name is None:
            return Gates()
        gates = self.queues.get(name)
        if gates is None:  # the local pool's words (job_maker)
            raise ValueError(f"unknown queue {name!r}; this pool has "
                             f"{sorted(self.queues) or 'no named queues'}")
        return gates

    def _named(self, limit: Limit | None) -> Gates:
        if limit is None:
            return Gates()
        with self.lock:
            known = self.named.get(limit.name)
            if known is None:
                known = self.named[limit.name] = (limit, self._open_named(limit))
        if known[0] != limit:
            raise ValueError(f"limit {limit.name!r} is already open in this pool as "
                             f"{known[0]}, not {limit}")
        return known[1]

    def _open_named(self, limit: Limit) -> Gates:
        name = NAMED_LIMIT_PREFIX + limit.name
        semaphores: tuple[Any, ...] = ()
        rates: tuple[RateSpec, ...] = ()
        if limit.concurrency is not None:
            semaphores = (self._shared_semaphore(limit, limit.concurrency, name),)
        if limit.rate is not None:
            window = self._shared_semaphore(limit, limit.rate.limit, f"{name}.rate")
            rates = (RateSpec(window.name, limit.rate.limit, limit.rate.period_s, shared=True),)
        return Gates(semaphores, rates)

    def _shared_semaphore(self, limit: Limit, max_leases: int, name: str) -> Any:
        """A named Limit's semaphore, registered now: a program that opened the name with
        other values is told here, not by every chunk failing on a worker."""
        semaphore = self._new_semaphore(max_leases, name)
        self.resources.shared += (semaphore,)
        try:
            semaphore.register()
        except ValueError as exc:  # the scheduler's "Inconsistent max leases"
            raise ValueError(f"limit {limit.name!r} is open on this cluster with other values "
                             f"than {limit} ({exc}); every program using a Limit of that name "
                             "must give it the same concurrency and rate") from exc
        return semaphore

    def _owned_gates(self, concurrency: int | None, what: str, rate: Rate | None,
                     rate_what: str) -> Gates:
        semaphores = () if concurrency is None else (self._pool_semaphore(concurrency, what),)
        rates = () if rate is None else (self._rate_window(rate, rate_what),)
        return Gates(semaphores, rates)

    def _pool_semaphore(self, max_leases: int, what: str) -> Any:
        semaphore = self._semaphore(max_leases, what)
        self.resources.limits += (semaphore,)
        return semaphore

    def _rate_window(self, rate: Rate, what: str) -> RateSpec:
        """A rate window of the pool's, as its chunks carry it; the semaphore behind it is
        closed with the pool, after the workers gave its leases back (_Resources.close)."""
        semaphore = self._pool_semaphore(rate.limit, what)
        self.resources.rate_names.append(semaphore.name)
        return RateSpec(semaphore.name, rate.limit, rate.period_s)

    def _semaphore(self, max_leases: int, what: str) -> Any:
        return self._new_semaphore(max_leases, f"procqueue-{self.token}-{what}")

    def _new_semaphore(self, max_leases: int, name: str) -> Any:
        client = self.resources.client
        return _distributed().Semaphore(max_leases=max_leases, name=name,
                                        scheduler_rpc=client.scheduler, loop=client.loop)
