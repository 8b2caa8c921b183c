"""Per-key concurrency caps and a fair queue across keys: pure bookkeeping, no I/O.

`KeyedLimit` counts running tasks per key (tenant, user, host) against one cap per key.
`FairQueue` holds waiting items per key, FIFO within a key, and hands them out round-robin
across keys: after a key is served it goes to the back of the rotation, so a key with
10,000 queued items and a key with 5 alternate, and the 5 are done within 10 pops.  A key
that may not start now (``can_start(key)`` is False) is skipped but keeps its place, so it
is served first once it may start again.

Both are used by one thread (the scheduler's); they take no locks.  ``pop_next`` costs
O(number of keys skipped), i.e. of keys with queued items that are at their cap; a queue that
parks (``FairQueue(parks=True)``, tied to its KeyedLimit by KeyedFifo) takes such keys out of
the rotation until their limit frees them, so each pop costs O(1) however many keys are at
their cap (with many workers, most of them are: a call with 1,024 keys of 4 on 128 workers).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from ..records import FrozenRecord

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class KeyedLimitStatistics(FrozenRecord):
    """A KeyedLimit's counts at one moment."""

    # __match_args__ as Record sets it, spelled out for mypy (a caller's `case X(a, b):`)
    _fields = __match_args__ = ("concurrency_per_key", "running", "active_keys",
                                "saturated_keys")

    concurrency_per_key: int
    running: int  # over all keys
    active_keys: int  # keys with at least one running
    saturated_keys: int  # keys at their cap

    def __init__(self, concurrency_per_key: int, running: int, active_keys: int,
                 saturated_keys: int) -> None:
        set_ = object.__setattr__
        set_(self, "concurrency_per_key", concurrency_per_key)
        set_(self, "running", running)
        set_(self, "active_keys", active_keys)
        set_(self, "saturated_keys", saturated_keys)


class KeyedLimit(Generic[K]):
    """At most `concurrency_per_key` running per key; keys are forgotten when idle."""

    def __init__(self, concurrency_per_key: int) -> None:
        if isinstance(concurrency_per_key, bool) or not isinstance(concurrency_per_key, int):
            raise TypeError(
                f"concurrency_per_key must be an int, not {type(concurrency_per_key).__name__}"
            )
        if concurrency_per_key < 1:
            raise ValueError(f"concurrency_per_key must be >= 1; got {concurrency_per_key}")
        self._cap = concurrency_per_key
        self._running: dict[K, int] = {}
        self._on_free: Callable[[K], None] | None = None

    def when_free(self, callback: Callable[[K], None] | None) -> None:
        """Call `callback(key)` whenever a key at its cap drops below it (one callback: the
        last one given; None for none)."""
        self._on_free = callback

    @property
    def concurrency_per_key(self) -> int:
        return self._cap

    def can_start(self, key: K) -> bool:
        return self._running.get(key, 0) < self._cap

    def running(self, key: K) -> int:
        return self._running.get(key, 0)

    def started(self, key: K) -> None:
        """Count one more running for `key`; RuntimeError if it is at its cap."""
        if not self.can_start(key):
            raise RuntimeError(
                f"key {key!r} already has {self._cap} running "
                f"(concurrency_per_key={self._cap}); check can_start() first"
            )
        self._running[key] = self._running.get(key, 0) + 1

    def finished(self, key: K) -> None:
        """Count one fewer running for `key`; RuntimeError if none is running."""
        count = self._running.get(key, 0)
        if count == 0:
            raise RuntimeError(f"finished({key!r}) but no task of that key is running")
        if count == 1:
            del self._running[key]  # forget idle keys: memory stays O(active keys)
        else:
            self._running[key] = count - 1
        if count == self._cap and self._on_free is not None:
            self._on_free(key)

    def statistics(self) -> KeyedLimitStatistics:
        counts = self._running.values()
        return KeyedLimitStatistics(
            concurrency_per_key=self._cap,
            running=sum(counts),
            active_keys=len(self._running),
            saturated_keys=sum(1 for count in counts if count >= self._cap),
        )


class QueuedItem(FrozenRecord, Generic[K, T]):
    """What `FairQueue.pop_next` hands out: the item and the key it was queued under."""

    _fields = __match_args__ = ("key", "item")  # see KeyedLimitStatistics

    key: K
    item: T

    def __init__(self, key: K, item: T) -> None:
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "item", item)


class FairQueueStatistics(FrozenRecord):
    """A FairQueue's sizes at one moment."""

    _fields = __match_args__ = ("queued", "keys", "longest_key_queue")  # see KeyedLimitStatistics

    queued: int  # items over all keys
    keys: int  # keys with at least one queued item
    longest_key_queue: int  # items queued under the busiest key

    def __init__(self, queued: int, keys: int, longest_key_queue: int) -> None:
        set_ = object.__setattr__
        set_(self, "queued", queued)
        set_(self, "keys", keys)
        set_(self, "longest_key_queue", longest_key_queue)


def _always(key: object) -> bool:
    return True


class FairQueue(Generic[K, T]):
    """Waiting items per key: FIFO within a key, round-robin across keys.

    With `parks`, a key that `pop_next` finds unable to start leaves the rotation (it is
    parked, its items kept) until `unpark(key)` brings it back to the front: the owner must
    call `unpark` when the key may start again (KeyedLimit.when_free), or its items wait for
    ever."""

    def __init__(self, parks: bool = False) -> None:
        # Insertion order is the rotation order: the front key is served next.
        self._queues: OrderedDict[K, deque[T]] = OrderedDict()
        self._parked: dict[K, deque[T]] = {}
        self._parks = parks
        self._size = 0

    def push(self, key: K, item: T) -> None:
        """Queue `item` at the back of `key`'s queue; a new key joins the back of the rotation."""
        queue = self._queue_of(key)
        if queue is None:
            queue = self._queues[key] = deque()
        queue.append(item)
        self._size += 1

    def push_front(self, key: K, item: T) -> None:
        """Put `item` back at the front of `key`'s queue (it was popped but could not start);
        a key not queued any more goes back to the front of the rotation."""
        queue = self._queue_of(key)
        if queue is None:
            queue = self._queues[key] = deque()
            self._queues.move_to_end(key, last=False)
        queue.appendleft(item)
        self._size += 1

    def pop_next(self, can_start: Callable[[K], bool] = _always) -> QueuedItem[K, T] | None:
        """The oldest item of the first key in the rotation for which `can_start(key)`;
        that key moves to the back.  None if no queued key may start."""
        key = self._first_startable(can_start)
        return None if key is None else QueuedItem(key, self._pop_from(key))

    def pop_next_item(self, can_start: Callable[[K], bool] = _always) -> T | None:
        """pop_next's item alone (the scheduler's path: one task per start, no record)."""
        key = self._first_startable(can_start)
        return None if key is None else self._pop_from(key)

    def has_startable(self, can_start: Callable[[K], bool]) -> bool:
        """Whether a key in the rotation may start (`can_start`); the keys found unable to
        are parked on the way, as pop_next parks them."""
        return self._first_startable(can_start) is not None

    def _first_startable(self, can_start: Callable[[K], bool]) -> K | None:
        blocked: list[K] = []
        try:
            for key in self._queues:
                if can_start(key):
                    return key
                if self._parks:
                    blocked.append(key)
            return None
        finally:
            for key in blocked:  # out of the rotation until unpark(key)
                self._parked[key] = self._queues.pop(key)

    def pop_of(self, key: K) -> T | None:
        """The oldest item of `key` (in the rotation or parked), or None; the rotation does
        not change."""
        queue = self._queue_of(key)
        if not queue:
            return None
        item = queue.popleft()
        self._size -= 1
        if not queue:
            self._queues.pop(key, None)
            self._parked.pop(key, None)
        return item

    def rotating_keys(self) -> int:
        """Keys with queued items in the rotation (not parked): each may start one more at
        least, unless it reached its cap since it was last looked at."""
        return len(self._queues)

    def unpark(self, key: K) -> None:
        """`key` may start again: back to the front of the rotation, if it was parked."""
        queue = self._parked.pop(key, None)
        if queue is not None:
            self._queues[key] = queue
            self._queues.move_to_end(key, last=False)

    def unpark_all(self) -> None:
        """Every parked key back at the front, in the order they were parked."""
        for key in reversed(list(self._parked)):
            self.unpark(key)

    def remove(self, key: K, item: T) -> bool:
        """Take out the queued `item` (compared by identity), e.g. on cancellation."""
        queue = self._queue_of(key)
        if queue is None:
            return False
        for index, queued in enumerate(queue):
            if queued is item:
                del queue[index]
                self._size -= 1
                if not queue:
                    self._queues.pop(key, None)
                    self._parked.pop(key, None)
                return True
        return False

    def queued(self, key: K) -> int:
        queue = self._queue_of(key)
        return 0 if queue is None else len(queue)

    def __len__(self) -> int:
        return self._size

    def statistics(self) -> FairQueueStatistics:
        queues = [*self._queues.values(), *self._parked.values()]
        longest = max((len(queue) for queue in queues), default=0)
        return FairQueueStatistics(self._size, len(queues), longest)

    def _queue_of(self, key: K) -> deque[T] | None:
        queue = self._queues.get(key)
        return self._parked.get(key) if queue is None else queue

    def _pop_from(self, key: K) -> T:
        queue = self._queues[key]
        item = queue.popleft()
        self._size -= 1
        if queue:
            self._queues.move_to_end(key)
        else:
            del self._queues[key]
        return item


class KeyedFifo(Generic[K, T]):
    """The waiting items of one call: FIFO, or, for a call with keys, a FairQueue (FIFO
    within a key, round robin across keys).  The local scheduler's queue of a call and the
    Dask driver's both are one.  `size`: what waits, as its owner counts it (push counts
    one; the local scheduler also puts blocks in `fifo` itself and counts their inputs)."""

    def __init__(self, keyed: bool, limit: KeyedLimit[K] | None = None) -> None:
        self.fifo: deque[T] = deque()
        self.by_key: FairQueue[K, T] | None = None
        self.limit = limit
        if keyed:
            # Tied to the call's limit, a key at its cap is parked until the limit frees it
            self.by_key = FairQueue(parks=limit is not None)
            if limit is not None:
                limit.when_free(self.by_key.unpark)
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def batch_share(self, workers: int, batches_per_worker: int = 1) -> int | None:
        """The keys one batch (or chunk) of a keyed call may take new places of, or None for
        no cap.  A batch holds a place per key it has items of until the last of them ends,
        though they run one after another in its worker; sized for short tasks, one batch
        took every place of a few keys and the call ran on one worker at a time.  At most
        the places of the keys that may start // (workers x the batches each holds at once),
        every batch can have a share.  (Counted as one batch per worker where each held two, a
        running one and one sent ahead: 1,024 keys of 4 on 64 workers, the first 64 batches
        took every place, and a sixth of the batches then went to workers already idle.)"""
        if self.by_key is None or self.limit is None:
            return None
        places = self.by_key.rotating_keys() * self.limit.concurrency_per_key
        return max(1, places // max(1, workers * batches_per_worker))

    def push(self, item: T, key: K, front: bool = False) -> None:
        """Queue `item` (of `key`, where the queue has keys), at the back or the front."""
        self.size += 1
        by_key = self.by_key
        if by_key is not None:
            if front:
                by_key.push_front(key, item)
            else:
                by_key.push(key, item)
        elif front:
            self.fifo.appendleft(item)
        else:
            self.fifo.append(item)

    def pop_startable(self, can_start: Callable[[K], bool] = _always) -> T | None:
        """The next item that may start now: the FIFO's first, or, with keys, the next of a
        key under its cap (`can_start`); None if none may."""
        if self.by_key is None:
            if not self.fifo:
                return None
            self.size -= 1
            return self.fifo.popleft()
        item = self.by_key.pop_next_item(can_start)
        if item is None:
            return None
        self.size -= 1
        return item

    def pop_of(self, key: K) -> T | None:
        """The next item of `key`, whether or not it may start (keyed queue only)."""
        assert self.by_key is not None
        item = self.by_key.pop_of(key)
        if item is not None:
            self.size -= 1
        return item

    def drain(self) -> list[T]:
        """Every waiting item, whatever its key, in the order they would have been served."""
        if self.by_key is None:
            items = list(self.fifo)
            self.fifo.clear()
        else:
            items = []
            self.by_key.unpark_all()
            while (got := self.by_key.pop_next()) is not None:
                items.append(got.item)
        self.size = 0
        return items
