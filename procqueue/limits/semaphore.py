"""A named, machine-wide counting semaphore in shared memory that survives SIGKILLed holders.

Every process on the machine (of one user) that opens ``Semaphore("gpu", 2)`` shares the
same two permits: the slot table lives in ``/dev/shm/procqueue.sem.gpu`` (layout in
`_shm`).  Each held permit is one slot recording its holder's pid and start time.  Permits
are counted per process: a process may hold several, and any code in that process may
release one.

Crash safety: when no slot is free, an acquirer checks the recorded holders and frees the
slots of processes that have exited (or whose pid was reused), so the permits of a
SIGKILLed holder come back on the next acquire attempt, within `reclaim_interval_s`.  The
lock guarding the table is a flock, which the kernel releases when its holder dies.

Waiting is polling: there is no portable cross-process wake-up in the standard library, so
a blocked `acquire()` retries with a backoff from `_FIRST_POLL_S` up to `retry_interval_s`.
A program with its own event loop uses `acquire_nowait()` and retries at its next wake-up,
at most `retry_interval_s` later (and at once when one of its own holders releases).

Cross-process waiters are not served in FIFO order.
"""

from __future__ import annotations

import errno
import math
import os
import time
from dataclasses import dataclass
from types import TracebackType
from typing import ClassVar

from ._shm import (
    ProcessIdentity,
    Segment,
    SegmentKind,
    SegmentSpec,
    SegmentState,
    SemaphoreSlots,
    current_identity,
    is_alive,
    read_header,
    unlink_segment,
)

MAX_SEMAPHORE_VALUE = 65_536  # 16 bytes of shared memory per permit

# A blocked acquire() first retries quickly (a permit often frees within a millisecond when
# holders run short tasks) and backs off to retry_interval_s to keep idle waiters cheap.
_FIRST_POLL_S = 0.0005


@dataclass(frozen=True)
class SemaphoreStatistics:
    """A snapshot; `holders` has one pid per held permit (a pid repeats when it holds
    several), sorted, so ``len(holders) == held``.  `reclaimed` has one pid per permit of an
    exited holder that taking this snapshot freed (they are not in `holders`)."""

    name: str
    value: int
    held: int
    holders: tuple[int, ...]
    reclaimed: tuple[int, ...] = ()


class Semaphore:
    """``Semaphore(name, value)``: open (or create) the machine-wide semaphore `name`.

    Every opener must pass the same `value`, else ValueError names both values.  ``with
    sem:`` acquires (blocking) and releases.  `close()` releases the permits this object
    still holds and unmaps; `unlink()` removes the name from the machine.  The object
    pickles by name, so a process it is sent to opens the same semaphore.  With
    ``create=False`` it only attaches to an existing one (FileNotFoundError if there is none).
    """

    # The longest a blocked acquire() sleeps between attempts, and how soon a caller of
    # acquire_nowait() should retry when it gets False.
    retry_interval_s: ClassVar[float] = 0.010
    # Checking holders costs one /proc read per holding process, so an object rechecks at
    # most this often; a dead holder's permits come back within this time.
    reclaim_interval_s: ClassVar[float] = 0.050

    def __init__(self, name: str, value: int, *, create: bool = True) -> None:
        self._value = _validate_value(value)
        self._segment = Segment(_spec(name, self._value), create=create)
        self._name = self._segment.spec.name
        self._held_here = 0  # permits acquired through this object and not yet released
        self._pid = os.getpid()
        self._next_reclaim_s = -math.inf  # time.monotonic() of the next allowed check

    @classmethod
    def attach(cls, name: str) -> Semaphore:
        """Open the existing semaphore `name` with the value it was created with, creating
        nothing: FileNotFoundError when there is none (for tools that inspect limits)."""
        header = read_header(SegmentKind.SEMAPHORE, name)
        if header is None:
            raise FileNotFoundError(errno.ENOENT, f"no semaphore {name!r}")
        return cls(name, header[0], create=False)

    @property
    def name(self) -> str:
        return self._name

    @property
    def value(self) -> int:
        return self._value

    def acquire_nowait(self) -> bool:
        """Take one permit if one is free (after reclaiming dead holders' permits)."""
        me = current_identity()
        self._forget_parent_permits()
        with self._segment.locked() as mapping:
            slots = SemaphoreSlots(mapping, self._value)
            index = _free_slot(slots)
            if index is None and self._reclaim_due() and _reclaim_dead(slots, me):
                index = _free_slot(slots)
            if index is None:
                return False
            slots.write(index, me)
        self._held_here += 1
        return True

    def acquire(self, timeout: float | None = None) -> bool:
        """Block until a permit is free; False if `timeout` seconds pass first."""
        deadline = _deadline(timeout)
        delay_s = _FIRST_POLL_S
        while not self.acquire_nowait():
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                return False
            time.sleep(min(delay_s, remaining_s))
            delay_s = min(2 * delay_s, self.retry_interval_s)
        return True

    def release(self) -> None:
        """Return one permit held by this process; RuntimeError if it holds none."""
        me = current_identity()
        self._forget_parent_permits()
        with self._segment.locked() as mapping:
            slots = SemaphoreSlots(mapping, self._value)
            index = _slot_of(slots, me)
            if index is None:
                raise RuntimeError(
                    f"release() of semaphore {self._name!r} by process {me.pid}, "
                    f"which holds none of its permits"
                )
            slots.write(index, None)
        self._held_here = max(0, self._held_here - 1)

    def statistics(self) -> SemaphoreStatistics:
        """Snapshot of the live holders (permits of dead holders are reclaimed first)."""
        with self._segment.locked() as mapping:
            slots = SemaphoreSlots(mapping, self._value)
            reclaimed = _reclaim_dead(slots, current_identity())
            pids = sorted(holder.pid for holder in slots.read_all() if holder is not None)
        return SemaphoreStatistics(self._name, self._value, len(pids), tuple(pids),
                                   tuple(sorted(reclaimed)))

    def close(self) -> None:
        """Release the permits acquired through this object, then unmap.  Idempotent."""
        self._forget_parent_permits()
        while self._held_here > 0 and self._segment.state is SegmentState.OPEN:
            try:
                self.release()
            except RuntimeError:  # released meanwhile through another object
                break
        self._held_here = 0
        self._segment.close()

    def unlink(self) -> bool:
        """Remove this semaphore's name from the machine; True if it was still there.

        Only do this when no program uses the name: processes that have it open keep the old
        permits, while later openers create a fresh semaphore with all permits free."""
        return self._segment.unlink()

    @staticmethod
    def unlink_name(name: str) -> bool:
        """Remove the semaphore `name` without opening it (same caveat as `unlink()`)."""
        return unlink_segment(SegmentKind.SEMAPHORE, name)

    def __enter__(self) -> None:
        self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __reduce__(self) -> tuple[type[Semaphore], tuple[str, int]]:
        return (Semaphore, (self._name, self._value))

    def __repr__(self) -> str:
        return f"Semaphore({self._name!r}, {self._value})"

    def _reclaim_due(self) -> bool:
        now_s = time.monotonic()
        if now_s < self._next_reclaim_s:
            return False
        self._next_reclaim_s = now_s + self.reclaim_interval_s
        return True

    def _forget_parent_permits(self) -> None:
        # A forked child inherits this object, but the permits belong to its parent's pid.
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._held_here = 0


def _spec(name: str, value: int) -> SegmentSpec:
    return SegmentSpec(
        kind=SegmentKind.SEMAPHORE,
        name=name,
        capacity=value,
        parameter=0.0,
        body_size=SemaphoreSlots.body_size(value),
        label="semaphore",
        capacity_label="value",
        parameter_label="",
    )


def _validate_value(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"semaphore value must be an int, not {type(value).__name__}")
    if not 1 <= value <= MAX_SEMAPHORE_VALUE:
        raise ValueError(f"semaphore value must be >= 1 and <= {MAX_SEMAPHORE_VALUE}; got {value}")
    return value


def _deadline(timeout: float | None) -> float:
    if timeout is None:
        return math.inf
    if math.isnan(timeout) or timeout < 0:
        raise ValueError(f"timeout must be >= 0 seconds or None; got {timeout}")
    return time.monotonic() + timeout


def _free_slot(slots: SemaphoreSlots) -> int | None:
    for index, holder in enumerate(slots.read_all()):
        if holder is None:
            return index
    return None


def _slot_of(slots: SemaphoreSlots, holder: ProcessIdentity) -> int | None:
    for index, recorded in enumerate(slots.read_all()):
        if recorded == holder:
            return index
    return None


def _reclaim_dead(slots: SemaphoreSlots, me: ProcessIdentity) -> list[int]:
    """Free the slots of holders that no longer run; returns their pids, one per slot."""
    alive: dict[ProcessIdentity, bool] = {me: True}  # one /proc check per holding process
    freed = []
    for index, holder in enumerate(slots.read_all()):
        if holder is None:
            continue
        if holder not in alive:
            alive[holder] = is_alive(holder)
        if not alive[holder]:
            slots.write(index, None)
            freed.append(holder.pid)
    return freed
