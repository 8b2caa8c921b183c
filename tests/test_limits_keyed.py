"""KeyedLimit and FairQueue: per-key caps, FIFO within a key, round-robin across keys."""

from __future__ import annotations

import pytest

from procqueue.limits import FairQueue, KeyedLimit, QueuedItem


def drain(queue: FairQueue[str, int], pops: int) -> list[tuple[str, int]]:
    out = []
    for _ in range(pops):
        popped = queue.pop_next()
        assert popped is not None
        out.append((popped.key, popped.item))
    return out


def test_one_key_with_ten_thousand_items_cannot_starve_a_key_with_five() -> None:
    queue: FairQueue[str, int] = FairQueue()
    for i in range(10_000):
        queue.push("big", i)
    for i in range(5):
        queue.push("small", i)
    first_ten = drain(queue, 10)
    assert [item for key, item in first_ten if key == "small"] == [0, 1, 2, 3, 4]
    assert len(queue) == 10_000 - 5


def test_keys_take_turns_and_items_keep_fifo_order_within_a_key() -> None:
    queue: FairQueue[str, int] = FairQueue()
    for key in "abc":
        for i in range(3):
            queue.push(key, i)
    assert drain(queue, 9) == [(key, i) for i in range(3) for key in "abc"]
    assert queue.pop_next() is None
    assert len(queue) == 0


def test_a_key_that_may_not_start_keeps_its_turn() -> None:
    queue: FairQueue[str, int] = FairQueue()
    for key in "abc":
        queue.push(key, 0)
        queue.push(key, 1)
    blocked = {"a"}

    def can_start(key: str) -> bool:
        return key not in blocked

    assert queue.pop_next(can_start) == QueuedItem("b", 0)
    assert queue.pop_next(can_start) == QueuedItem("c", 0)
    blocked.clear()
    assert queue.pop_next(can_start) == QueuedItem("a", 0)  # first once it may start
    assert queue.pop_next(lambda key: False) is None


def test_remove_takes_out_that_very_item() -> None:
    queue: FairQueue[str, list[int]] = FairQueue()
    twin_a, twin_b = [1], [1]  # equal, not identical
    queue.push("k", twin_a)
    queue.push("k", twin_b)
    assert queue.remove("k", twin_b)
    assert not queue.remove("k", twin_b)
    assert not queue.remove("other", twin_a)
    popped = queue.pop_next()
    assert popped is not None and popped.item is twin_a
    assert queue.remove("k", twin_a) is False
    assert queue.statistics().keys == 0


def test_fair_queue_statistics() -> None:
    queue: FairQueue[str, int] = FairQueue()
    for i in range(4):
        queue.push("a", i)
    queue.push("b", 0)
    stats = queue.statistics()
    assert (stats.queued, stats.keys, stats.longest_key_queue) == (5, 2, 4)
    assert (queue.queued("a"), queue.queued("zzz")) == (4, 0)


def test_keyed_limit_caps_running_per_key() -> None:
    limit: KeyedLimit[str] = KeyedLimit(2)
    limit.started("u1")
    limit.started("u1")
    assert not limit.can_start("u1")
    assert limit.can_start("u2")
    with pytest.raises(RuntimeError, match="already has 2 running"):
        limit.started("u1")
    limit.started("u2")
    stats = limit.statistics()
    assert (stats.concurrency_per_key, stats.running, stats.active_keys,
            stats.saturated_keys) == (2, 3, 2, 1)
    limit.finished("u1")
    assert limit.can_start("u1") and limit.running("u1") == 1


def test_idle_keys_are_forgotten_and_unbalanced_finish_raises() -> None:
    limit: KeyedLimit[int] = KeyedLimit(1)
    for key in range(1000):
        limit.started(key)
        limit.finished(key)
    assert limit.statistics().active_keys == 0
    with pytest.raises(RuntimeError, match="no task of that key is running"):
        limit.finished(7)


def test_scheduling_with_key_concurrency_one_is_fair_and_in_order() -> None:
    """A simulated scheduler: 2 workers, key_concurrency=1, a busy key and two small ones.
    Every task takes one tick.  Recorded starts must show <= 1 running per key, FIFO per
    key, and the small keys done long before the busy one."""
    queue: FairQueue[str, int] = FairQueue()
    limit: KeyedLimit[str] = KeyedLimit(1)
    for i in range(100):
        queue.push("busy", i)
    for key in ("x", "y"):
        for i in range(3):
            queue.push(key, i)
    starts: list[tuple[int, str, int]] = []  # (tick, key, item)
    tick = 0
    while len(queue):
        running: list[str] = []
        while len(running) < 2 and (popped := queue.pop_next(limit.can_start)) is not None:
            limit.started(popped.key)
            running.append(popped.key)
            starts.append((tick, popped.key, popped.item))
        for key in running:
            limit.finished(key)
        tick += 1
    for key in ("busy", "x", "y"):
        ticks = [t for t, k, _ in starts if k == key]
        assert len(ticks) == len(set(ticks))  # never two of one key in one tick
        assert [item for _, k, item in starts if k == key] == sorted(
            item for _, k, item in starts if k == key)
    last_small_tick = max(t for t, k, _ in starts if k != "busy")
    assert last_small_tick <= 4


@pytest.mark.parametrize(("cap", "error"), [(0, ValueError), (True, TypeError), (1.5, TypeError)])
def test_keyed_limit_validation(cap: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="concurrency_per_key must be"):
        KeyedLimit(cap)  # type: ignore[arg-type]


def test_a_calls_queue_is_fifo_without_keys_and_fair_across_keys_with_them():
    from procqueue.limits.keyed import KeyedFifo

    plain: KeyedFifo[str, int] = KeyedFifo(keyed=False)
    for item in (1, 2, 3):
        plain.push(item, "ignored")
    plain.push(0, "ignored", front=True)  # a task given back goes first
    assert len(plain) == 4
    assert [plain.pop_startable(lambda key: False) for _ in range(2)] == [0, 1]  # no caps
    assert plain.drain() == [2, 3] and len(plain) == 0
    assert plain.pop_startable(lambda key: True) is None

    keyed: KeyedFifo[str, str] = KeyedFifo(keyed=True)
    for item in ("a1", "a2", "a3", "b1"):
        keyed.push(item, item[0])
    assert keyed.pop_startable(lambda key: True) == "a1"
    assert keyed.pop_startable(lambda key: True) == "b1"  # round robin across keys
    assert keyed.pop_startable(lambda key: key != "a") is None  # "a" is at its cap
    keyed.push("a0", "a", front=True)
    assert keyed.drain() == ["a0", "a2", "a3"] and len(keyed) == 0


def test_a_parked_key_leaves_the_rotation_until_its_limit_frees_it() -> None:
    """With many keys at their cap, a pop must not look at each of them again: a parked
    queue asks about a blocked key once, then not until KeyedLimit frees the key."""
    from procqueue.limits.keyed import KeyedFifo

    limit: KeyedLimit[str] = KeyedLimit(1)
    queue: KeyedFifo[str, str] = KeyedFifo(keyed=True, limit=limit)
    for key in ("a", "b", "c"):
        queue.push(f"{key}1", key)
        queue.push(f"{key}2", key)
    asked: list[str] = []

    def can_start(key: str) -> bool:
        asked.append(key)
        return limit.can_start(key)

    started = []
    while (item := queue.pop_startable(can_start)) is not None:
        limit.started(item[0])
        started.append(item)
    assert started == ["a1", "b1", "c1"]
    assert len(queue) == 3 and queue.by_key is not None
    stats = queue.by_key.statistics()
    assert (stats.queued, stats.keys, stats.longest_key_queue) == (3, 3, 1)
    assert queue.by_key.queued("b") == 1
    asked.clear()
    assert queue.pop_startable(can_start) is None
    assert asked == []  # every key parked: none asked about again
    limit.finished("b")  # b drops below its cap: back in the rotation, first
    assert queue.pop_startable(can_start) == "b2"
    assert asked == ["b"]
    queue.push("a3", "a")  # a parked key's new items wait with it, in order
    queue.push("a0", "a", front=True)
    assert queue.drain() == ["a0", "c2", "a2", "a3"] and len(queue) == 0  # round robin


def test_keyed_limit_tells_when_a_key_drops_below_its_cap() -> None:
    limit: KeyedLimit[str] = KeyedLimit(2)
    freed: list[str] = []
    limit.when_free(freed.append)
    for _ in range(2):
        limit.started("k")
    limit.started("other")
    limit.finished("other")  # never at its cap: nothing to tell
    limit.finished("k")  # 2 -> 1: may start again
    limit.finished("k")  # 1 -> 0: it already could
    assert freed == ["k"]
    limit.when_free(None)
    limit.started("k")
    limit.started("k")
    limit.finished("k")
    assert freed == ["k"]


def test_removing_a_parked_keys_item_and_the_fair_order_after_unparking() -> None:
    limit: KeyedLimit[str] = KeyedLimit(1)
    fair: FairQueue[str, int] = FairQueue(parks=True)
    limit.when_free(fair.unpark)
    for key in ("a", "b", "c"):
        fair.push(key, 1)
    limit.started("a")
    popped = fair.pop_next(limit.can_start)
    assert popped == QueuedItem("b", 1)  # a is parked, b served
    assert fair.remove("a", 1) and fair.queued("a") == 0 and len(fair) == 1
    fair.push("a", 2)  # a's queue was emptied: a joins again, parked or not
    limit.finished("a")
    assert [fair.pop_next(limit.can_start) for _ in range(2)] == [
        QueuedItem("c", 1), QueuedItem("a", 2)]
    assert fair.pop_next(limit.can_start) is None
