"""RateGate on an injected clock: at most L starts in any P-second window, and no under-use.

No test here sleeps: the gate's clock is a FakeClock and `acquire()` "sleeps" by advancing
it.  (The gate shared across processes, on the real clock, is in test_limits_shm.py.)
"""

from __future__ import annotations

import math
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from procqueue.limits import RateGate


class FakeClock:
    def __init__(self, start_s: float = 0.0) -> None:
        self.now_s = start_s
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now_s

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now_s += seconds


def fake_gate(limit: int, period_s: float, start_s: float = 0.0) -> tuple[RateGate, FakeClock]:
    clock = FakeClock(start_s)
    return RateGate(limit, period_s, clock=clock, sleep=clock.sleep), clock


def assert_at_most_limit_per_window(grants: list[float], limit: int, period_s: float) -> None:
    """In sorted start times, any limit+1 consecutive starts span at least one period."""
    grants = sorted(grants)
    for i in range(len(grants) - limit):
        # start + period <= later start, as the gate computes it: (b - a) >= period can
        # differ from it by one rounding (0.9659 - 0.6659 == 0.29999999999999993)
        assert grants[i] + period_s <= grants[i + limit], (i, grants)


@given(
    limit=st.integers(1, 6),
    period_s=st.sampled_from([0.1, 0.3, 1.0, 2.5]),
    gaps_s=st.lists(st.floats(0.0, 0.7, allow_nan=False), min_size=1, max_size=80),
    start_s=st.sampled_from([0.0, 12345.678]),
)
def test_grants_exactly_when_fewer_than_limit_started_in_the_last_period(
    limit: int, period_s: float, gaps_s: list[float], start_s: float
) -> None:
    gate = RateGate(limit, period_s, clock=lambda: math.nan)  # the clock is never read
    grants: list[float] = []
    now = start_s
    for gap_s in gaps_s:
        now += gap_s
        recent = [g for g in grants if g + period_s > now]
        wait_s = gate.try_acquire(now=now)
        if len(recent) < limit:
            assert wait_s == 0.0  # no under-use: refused only with `limit` recent starts
            grants.append(now)
        else:
            oldest_recent = recent[-limit]
            assert wait_s == pytest.approx(oldest_recent + period_s - now, abs=1e-9)
            assert now + wait_s >= oldest_recent + period_s
    assert_at_most_limit_per_window(grants, limit, period_s)


def test_hundred_starts_at_twenty_per_second_take_four_seconds_not_ten() -> None:
    gate, clock = fake_gate(20, 1.0, start_s=500.0)
    grants = []
    for _ in range(100):
        assert gate.acquire()
        grants.append(clock())
    # Five bursts of 20, one per second: the 100th start is 4 s after the first.
    assert grants == [500.0 + second for second in range(5) for _ in range(20)]
    assert clock.sleeps == [1.0, 1.0, 1.0, 1.0]
    assert_at_most_limit_per_window(grants, 20, 1.0)


def test_waiting_exactly_the_returned_time_is_enough() -> None:
    # Float rounding: now + (deadline - now) can land one ulp short of the deadline.
    gate, clock = fake_gate(3, 0.1, start_s=1e5 + 0.3)
    grants = []
    for _ in range(300):
        wait_s = gate.try_acquire()
        if wait_s == 0.0:
            grants.append(clock())
        else:
            clock.sleep(wait_s)
            assert gate.try_acquire() == 0.0
            grants.append(clock())
    assert_at_most_limit_per_window(grants, 3, 0.1)
    assert grants[-1] - grants[0] == pytest.approx(99 * 0.1)


def test_window_slides_rather_than_resetting_in_buckets() -> None:
    # A fixed 1 s bucket would allow 2 at 0.9 and 2 more at 1.0: 4 within 0.1 s.
    gate, _ = fake_gate(2, 1.0)
    assert gate.try_acquire(now=0.9) == 0.0
    assert gate.try_acquire(now=0.9) == 0.0
    assert gate.try_acquire(now=1.0) == pytest.approx(0.9)
    assert gate.try_acquire(now=1.9) == 0.0


def test_count_takes_several_starts_at_once() -> None:
    gate, _ = fake_gate(4, 1.0)
    assert gate.try_acquire(now=0.0, count=3) == 0.0
    assert gate.available(now=0.5) == 1
    assert gate.try_acquire(now=0.5, count=2) == pytest.approx(0.5)  # needs one of the 3
    assert gate.try_acquire(now=0.5) == 0.0
    assert gate.try_acquire(now=1.0, count=3) == 0.0
    assert gate.try_acquire(now=1.2, count=1) == pytest.approx(0.3)


def test_acquire_gives_up_at_once_when_the_wait_exceeds_the_timeout() -> None:
    gate, clock = fake_gate(1, 10.0)
    assert gate.acquire(timeout=0)
    assert gate.acquire(timeout=5.0) is False
    assert clock.sleeps == []  # refused without sleeping: the wait could only grow
    assert gate.acquire(timeout=10.0)
    assert clock() == 10.0


def test_statistics_snapshot() -> None:
    gate, clock = fake_gate(3, 2.0)
    gate.try_acquire()
    clock.sleep(0.5)
    gate.try_acquire()
    stats = gate.statistics()
    assert (stats.name, stats.limit, stats.period_s) == (None, 3, 2.0)
    assert (stats.starts_in_window, stats.wait_s) == (2, 0.0)
    gate.try_acquire()
    assert gate.statistics().wait_s == pytest.approx(1.5)
    clock.sleep(1.6)
    assert gate.statistics().starts_in_window == 2


def test_a_stale_now_counts_as_the_newest_start() -> None:
    gate, _ = fake_gate(2, 1.0)
    assert gate.try_acquire(now=5.0) == 0.0
    assert gate.try_acquire(now=4.0) == 0.0  # recorded at 5.0, keeping the log in order
    assert gate.try_acquire(now=5.5) == pytest.approx(0.5)


def test_local_gate_does_not_pickle() -> None:
    with pytest.raises(TypeError, match="give it a name"):
        pickle.dumps(RateGate(1, 1.0))


@pytest.mark.parametrize(
    ("limit", "period_s", "error", "message"),
    [
        (0, 1.0, ValueError, "limit must be >= 1"),
        (True, 1.0, TypeError, "limit must be an int"),
        (2.0, 1.0, TypeError, "limit must be an int"),
        (1, 0.0, ValueError, "period_s must be a finite number of seconds > 0"),
        (1, -1.0, ValueError, "period_s must be a finite number of seconds > 0"),
        (1, math.inf, ValueError, "period_s must be a finite number of seconds > 0"),
        (1, math.nan, ValueError, "period_s must be a finite number of seconds > 0"),
        (1, "1", TypeError, "period_s must be a number of seconds"),
    ],
)
def test_rate_gate_validation(limit: object, period_s: object, error: type[Exception],
                              message: str) -> None:
    with pytest.raises(error, match=message):
        RateGate(limit, period_s)  # type: ignore[arg-type]


@pytest.mark.parametrize(("count", "error"), [(0, ValueError), (4, ValueError), (1.0, TypeError)])
def test_count_validation(count: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="count must be"):
        RateGate(3, 1.0).try_acquire(now=0.0, count=count)  # type: ignore[arg-type]


def test_acquire_rejects_a_negative_timeout() -> None:
    gate, _ = fake_gate(1, 1.0)
    with pytest.raises(ValueError, match="timeout must be >= 0"):
        gate.acquire(timeout=-0.5)
