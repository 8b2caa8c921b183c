"""Admission: may a task start now?  The gates a start must pass, and how a batch takes them.

A task starts only when every gate on its path grants it: the pool's concurrency and rate, its
call's named machine-wide Limit (semaphore and/or rate), its named queue's concurrency and rate,
and its key's concurrency.  Rate gates count starts: a batch of k tasks takes k of them.  A call
under concurrency limits only takes one permit per batch (BatchHold: a worker runs one task at a
time); where a rate or a key counts its tasks too, each task takes its own permits, and a batch
only its share of them (batch_share).

Two kinds of gate: refundable ones (concurrency counters, semaphores) hold a permit while the
attempt runs and give it back when the attempt ends; rate gates record a start, which cannot be
undone.  So a batch takes the refundable gates first, sees how many starts every rate gate can
grant, takes that many, and refunds the surplus.  The scheduler never blocks on a gate: a gate
that refuses says when to look again (a rate's wait, a shared semaphore's retry interval) or
that only a release of ours can help (None), which the supervisor sees as a finished task.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from .limits import START_SKEW_MARGIN_S

if TYPE_CHECKING:  # the gates' objects are made by whoever uses a limit (see limits/__init__)
    from .limits import KeyedLimit, Rate, RateGate, Semaphore


def rate_gate_for(rate: Rate) -> RateGate:
    """A pool-local rate gate for `rate` (see START_SKEW_MARGIN_S)."""
    from .limits import RateGate

    return RateGate(rate.limit, rate.period_s + START_SKEW_MARGIN_S)

class Gate(Protocol):
    refundable: bool

    @property
    def capacity(self) -> int | None:
        """Refundable gates: how many permits there are in all, where known (batch_share)."""

    def take(self, n: int, now: float) -> int:
        """Take up to n starts; returns how many were taken."""

    def put_back(self, n: int) -> None:
        """Give back n starts taken but not used (refundable gates only)."""

    def release(self) -> None:
        """One attempt that held this gate ended."""

    def wait_s(self, now: float) -> float | None:
        """When refusing: seconds until it may grant again, or None (wait for a release)."""

    def room(self, now: float) -> int:
        """Rate gates only: how many starts it would grant now, without taking them."""


class ConcurrencyGate:
    """At most `limit` attempts running at once (in this pool)."""

    refundable = True

    def __init__(self, limit: int) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"concurrency must be an int >= 1, not {limit!r}")
        self.limit = limit
        self.capacity = limit
        self.running = 0
        self.max_running = 0  # the most ever running at once (statistics)

    def take(self, n: int, now: float) -> int:
        taken = max(0, min(n, self.limit - self.running))
        self.running += taken
        self.max_running = max(self.max_running, self.running)
        return taken

    def put_back(self, n: int) -> None:
        self.running -= n

    def room(self, now: float) -> int:
        return self.limit - self.running

    def release(self) -> None:
        self.running -= 1

    def wait_s(self, now: float) -> float | None:
        return None


class SemaphoreGate:
    """A machine-wide named semaphore shared with other processes."""

    refundable = True

    def __init__(self, semaphore: Semaphore) -> None:
        self.semaphore = semaphore
        self.capacity = semaphore.value  # (other processes may hold some)

    def take(self, n: int, now: float) -> int:
        taken = 0
        while taken < n and self.semaphore.acquire_nowait():
            taken += 1
        return taken

    def put_back(self, n: int) -> None:
        for _ in range(n):
            self.semaphore.release()

    def room(self, now: float) -> int:
        return 1  # unknown without taking: other processes share it

    def release(self) -> None:
        self.semaphore.release()

    def wait_s(self, now: float) -> float | None:
        # Other processes release without telling us: look again shortly.
        return float(self.semaphore.retry_interval_s)


class RateGateAdapter:
    """At most L starts in any P-second window (local, or shared by name)."""

    refundable = False
    capacity: None = None

    def __init__(self, gate: RateGate) -> None:
        self.gate = gate

    def room(self, now: float) -> int:
        return self.gate.available(now)

    def take(self, n: int, now: float) -> int:
        k = min(n, self.gate.available(now))
        if k <= 0:
            return 0
        return k if self.gate.try_acquire(now, count=k) == 0.0 else 0

    def put_back(self, n: int) -> None:
        raise RuntimeError("a recorded start cannot be given back")

    def release(self) -> None:
        pass

    def wait_s(self, now: float) -> float | None:
        return max(self.gate.statistics(now).wait_s, 0.001)


class FreeMemoryGate:
    """A task starts only while at least `min_free_bytes` of memory is available, so a batch
    of big inputs does not invite the OOM killer.  One start at a time: the task about to
    start has not allocated its memory yet, so the next one is judged after a short look."""

    refundable = False
    capacity: None = None
    recheck_s = 0.1  # how often a refused start looks at free memory again

    def __init__(self, min_free_bytes: int) -> None:
        self.min_free_bytes = min_free_bytes

    def room(self, now: float) -> int:
        import psutil

        return 1 if psutil.virtual_memory().available >= self.min_free_bytes else 0

    def take(self, n: int, now: float) -> int:
        return min(n, self.room(now))

    def put_back(self, n: int) -> None:
        raise RuntimeError("a memory check cannot be given back")

    def release(self) -> None:
        pass

    def wait_s(self, now: float) -> float | None:
        return self.recheck_s


def admit(gates: tuple[Gate, ...], n: int,
          now: float) -> tuple[int, float | None, tuple[Gate, ...]]:
    """Take up to n starts from every gate.  Returns (granted, wait, held): held are the
    refundable gates each granted task must release when its attempt ends; when granted is 0,
    wait is the seconds until a gate may grant again (None: until a release)."""
    if not gates:
        return n, None, ()
    refundable = [g for g in gates if g.refundable]
    rates = [g for g in gates if not g.refundable]
    k = n
    taken: list[Gate] = []
    for gate in refundable:
        got = gate.take(k, now)
        for earlier in taken:
            earlier.put_back(k - got)
        if got == 0:
            return 0, gate.wait_s(now), ()
        k = got
        taken.append(gate)
    if rates:
        room = min(g.room(now) for g in rates)
        if room <= 0:
            for gate in taken:
                gate.put_back(k)
            waits = [w for g in rates if (w := g.wait_s(now)) is not None]
            return 0, (min(waits) if waits else None), ()
        granted = min(k, room)
        for gate in rates:
            gate.take(granted, now)
        for gate in taken:
            gate.put_back(k - granted)
        k = granted
    return k, None, tuple(taken)


def batch_share(gates: tuple[Gate, ...], workers: int) -> int | None:
    """The most tasks one batch may take through `gates`, or None for no cap.  A batch holds
    a permit per task until that task ends, even while it waits behind the others in its
    worker; so batches sized for throughput left the other workers idle under a concurrency
    limit (1 ms tasks, 64 workers, concurrency=64: one batch of 64 held every permit).  At
    most capacity // workers each, every worker can have a share."""
    caps = [gate.capacity for gate in gates if gate.capacity is not None]
    return max(1, min(caps) // workers) if caps else None


def earliest(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


__all__ = ["Gate", "ConcurrencyGate", "SemaphoreGate", "RateGateAdapter", "KeyHold",
           "FreeMemoryGate", "admit", "batch_share", "BatchHold",
           "earliest", "rate_gate_for"]


class BatchHold:
    """One permit of each of a call's concurrency gates, held by the tasks of one batch
    together and given back when the last of them ends.  A worker runs its batch's tasks one
    at a time, so counting running batches keeps "at most K at once" while a batch holds as
    many tasks as its size wants (a permit per task made a batch take its worker's share of
    them: one task per batch, a round trip each, when K was near the number of workers)."""

    __slots__ = ("gates", "left")

    def __init__(self, gates: tuple[Gate | KeyHold, ...], tasks: int) -> None:
        self.gates = gates  # or a key's place (KeyHold): one per key a batch has tasks of
        self.left = tasks  # tasks of the batch whose attempt has not ended

    def release(self) -> None:
        self.left -= 1
        if self.left == 0:
            for gate in self.gates:
                gate.release()


class KeyHold:
    """A running attempt's place under its key's concurrency cap."""

    __slots__ = ("keyed", "key")

    def __init__(self, keyed: KeyedLimit[object], key: object) -> None:
        self.keyed = keyed
        self.key = key

    def release(self) -> None:
        self.keyed.finished(self.key)
