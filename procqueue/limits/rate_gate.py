"""At most `limit` starts in any window of `period_s` seconds: a sliding-window log.

The gate remembers the times of the last `limit` starts in a ring, oldest first.  A new
start at time ``now`` is allowed when the oldest of them is at least `period_s` old::

    grant  <=>  now >= ring[cursor] + period_s

so for the sorted start times ``g``, ``g[i + limit] >= g[i] + period_s`` for every ``i``:
no window ``[t, t + period_s)`` ever holds more than `limit` starts.  There are no fixed
buckets, hence no burst of ``2 * limit`` around a bucket edge, and no under-use: a start is
refused only when `limit` starts really happened in the last `period_s`, so 100 starts at
20 per second finish 4 s after the first (5 bursts of 20, one per second).

`try_acquire()` never blocks: it grants (and records) a start and returns 0.0, or returns
the seconds until one may be granted.  That is the path for a scheduler with its own event
loop.  `acquire()` blocks by sleeping for exactly that long (with an injectable `sleep`).

Local vs shared: without `name` the ring is a Python list guarded by a threading.Lock.
With ``name=`` it lives in ``/dev/shm/procqueue.rate.<name>`` (layout in `_shm`) and every
process opening that name shares the window; the clock must then be one clock for the whole
machine (the default, time.monotonic, is CLOCK_MONOTONIC on Linux) and it is read under the
machine-wide lock, so the recorded starts stay in order across processes.
"""

from __future__ import annotations

import contextlib
import errno
import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from ._shm import Segment, SegmentKind, SegmentSpec, WindowRing, read_header, unlink_segment

Clock = Callable[[], float]
Sleep = Callable[[float], None]

MAX_RATE_LIMIT = 1_000_000  # 8 bytes of memory per remembered start


@dataclass(frozen=True)
class Rate:
    """``Rate(limit, per)``: at most `limit` starts in any window of `per` seconds."""

    limit: int
    per: float  # seconds

    def __post_init__(self) -> None:
        _validate_limit(self.limit, "Rate limit")
        # Normalise Rate(10, per=1) to per=1.0 (frozen, hence object.__setattr__).
        object.__setattr__(self, "per", _validate_period(self.per, "Rate per"))

    @property
    def period_s(self) -> float:
        return float(self.per)

    @classmethod
    def parse(cls, text: str) -> Rate:
        """Parse ``"50/30s"``, ``"10/s"``, ``"5/500ms"``, ``"100/2m"``, ``"1000/h"`` or
        ``"10/1.5"`` (seconds when no unit is given)."""
        match = _RATE_RE.fullmatch(text.strip()) if isinstance(text, str) else None
        if match is None:
            raise ValueError(
                f"a rate must look like LIMIT/PERIOD with an optional unit ms, s, m or h, "
                f"e.g. '50/30s', '10/s' or '5/500ms'; got {text!r}"
            )
        count, amount, unit = match.groups()
        period = float(amount) if amount else 1.0
        return cls(int(count), period * _UNIT_S[unit or "s"])

    @classmethod
    def of(cls, rate: "Rate | str | None") -> "Rate | None":
        """A pool's or a call's rate= option: a Rate, a string for parse(), or None."""
        if rate is None or isinstance(rate, Rate):
            return rate
        if isinstance(rate, str):
            return cls.parse(rate)
        raise TypeError(f"rate must be a procqueue.Rate or a string like '50/30s', "
                        f"not {rate!r}")

    def __str__(self) -> str:
        return f"{self.limit}/{self.per:g}s"


_RATE_RE = re.compile(r"(\d+)\s*/\s*(\d+(?:\.\d*)?|\.\d+)?\s*(ms|s|m|min|h)?")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


@dataclass(frozen=True)
class RateGateStatistics:
    """A snapshot at the gate's clock: `starts_in_window` of the last `period_s` seconds,
    and `wait_s` until the next start may be granted (0.0: now)."""

    name: str | None
    limit: int
    period_s: float
    starts_in_window: int
    wait_s: float


class _Ring(Protocol):
    """The ring of the last `limit` start times, ascending from the cursor."""

    def cursor(self) -> int: ...
    def set_cursor(self, cursor: int) -> None: ...
    def time_at(self, index: int) -> float: ...
    def set_time_at(self, index: int, when: float) -> None: ...


class _LocalRing:
    def __init__(self, limit: int) -> None:
        self._cursor = 0
        self._times = [-math.inf] * limit

    def cursor(self) -> int:
        return self._cursor

    def set_cursor(self, cursor: int) -> None:
        self._cursor = cursor

    def time_at(self, index: int) -> float:
        return self._times[index]

    def set_time_at(self, index: int, when: float) -> None:
        self._times[index] = when


class RateGate:
    """``RateGate(limit, period_s, *, name=None, clock=time.monotonic, sleep=time.sleep)``.

    `clock` is read exactly once per `try_acquire()`/`available()` call that gets no `now`;
    `sleep` is what `acquire()` waits with (tests pass a fake clock's advance).  A gate with
    a `name` pickles by name; `close()` unmaps it and `unlink()` removes the name; with
    ``create=False`` it only attaches to an existing one (FileNotFoundError if there is none).
    """

    def __init__(
        self,
        limit: int,
        period_s: float,
        *,
        name: str | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = time.sleep,
        create: bool = True,
    ) -> None:
        self._limit = _validate_limit(limit, "RateGate limit")
        self._period_s = _validate_period(period_s, "RateGate period_s")
        self._name = name
        self._clock = clock
        self._sleep = sleep
        self._segment = None if name is None else Segment(
            _spec(name, self._limit, self._period_s), create=create)
        self._local_ring = _LocalRing(self._limit)
        self._thread_lock = threading.Lock()

    @classmethod
    def attach(cls, name: str) -> RateGate:
        """Open the existing shared gate `name` with the limit and period it was created
        with, creating nothing: FileNotFoundError when there is none."""
        header = read_header(SegmentKind.RATE_GATE, name)
        if header is None:
            raise FileNotFoundError(errno.ENOENT, f"no rate gate {name!r}")
        limit, period_s = header
        return cls(limit, period_s, name=name, create=False)

    @property
    def name(self) -> str | None:
        return self._name

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def period_s(self) -> float:
        return self._period_s

    def try_acquire(self, now: float | None = None, *, count: int = 1) -> float:
        """Grant and record `count` starts at `now` (default: the clock) and return 0.0, or
        return the seconds until they could be granted.  A scheduler asks for ``count=k``
        to start a chunk of k tasks at once; `count` may not exceed `limit`."""
        self._validate_count(count)
        with self._ring() as ring:
            now = _not_before_newest(ring, self._limit, self._clock() if now is None else now)
            wait_s = _wait_for(ring, self._limit, self._period_s, now, count)
            if wait_s == 0.0:
                _record(ring, self._limit, now, count)
            return wait_s

    def acquire(self, timeout: float | None = None) -> bool:
        """Block until a start is granted; False at once when it could not be granted
        within `timeout` seconds (the wait only grows while we sleep)."""
        deadline = _deadline(self._clock(), timeout)
        while True:
            wait_s = self.try_acquire()
            if wait_s == 0.0:
                return True
            if self._clock() + wait_s > deadline:
                return False
            self._sleep(wait_s)

    def available(self, now: float | None = None) -> int:
        """How many starts could be granted at `now` (default: the clock), 0..limit."""
        with self._ring() as ring:
            now = _not_before_newest(ring, self._limit, self._clock() if now is None else now)
            return self._limit - _starts_in_window(ring, self._limit, self._period_s, now)

    def statistics(self, now: float | None = None) -> RateGateStatistics:
        with self._ring() as ring:
            now = _not_before_newest(ring, self._limit, self._clock() if now is None else now)
            in_window = _starts_in_window(ring, self._limit, self._period_s, now)
            wait_s = _wait_for(ring, self._limit, self._period_s, now, 1)
        return RateGateStatistics(self._name, self._limit, self._period_s, in_window, wait_s)

    def close(self) -> None:
        """Unmap a shared gate (idempotent); a local gate has nothing to close."""
        if self._segment is not None:
            self._segment.close()

    def unlink(self) -> bool:
        """Remove a shared gate's name from the machine (only when no program uses it;
        later openers start with an empty window).  False for a local gate."""
        return False if self._segment is None else self._segment.unlink()

    @staticmethod
    def unlink_name(name: str) -> bool:
        """Remove the shared gate `name` without opening it; True if it existed."""
        return unlink_segment(SegmentKind.RATE_GATE, name)

    def __reduce__(self) -> tuple[Callable[..., RateGate], tuple[object, ...]]:
        if self._name is None:
            raise TypeError("a RateGate without name= lives in one process; give it a name "
                            "to share it with other processes")
        return (_reopen, (self._limit, self._period_s, self._name, self._clock, self._sleep))

    def __repr__(self) -> str:
        named = "" if self._name is None else f", name={self._name!r}"
        return f"RateGate({self._limit}, {self._period_s}{named})"

    @contextlib.contextmanager
    def _ring(self) -> Iterator[_Ring]:
        if self._segment is None:
            with self._thread_lock:
                yield self._local_ring
        else:
            with self._segment.locked() as mapping:
                yield WindowRing(mapping, self._limit)

    def _validate_count(self, count: int) -> None:
        if isinstance(count, bool) or not isinstance(count, int):
            raise TypeError(f"count must be an int, not {type(count).__name__}")
        if not 1 <= count <= self._limit:
            raise ValueError(f"count must be >= 1 and <= limit ({self._limit}); got {count}")


def _reopen(limit: int, period_s: float, name: str, clock: Clock, sleep: Sleep) -> RateGate:
    return RateGate(limit, period_s, name=name, clock=clock, sleep=sleep)


def _not_before_newest(ring: _Ring, limit: int, now: float) -> float:
    # Time never runs backwards for the gate: a `now` older than the newest recorded start
    # (a caller's stale reading) counts as that start's time, which keeps the ring sorted.
    return max(now, ring.time_at((ring.cursor() - 1) % limit))


def _wait_for(ring: _Ring, limit: int, period_s: float, now: float, count: int) -> float:
    # `count` new starts overwrite the `count` oldest; the youngest of those must be old enough.
    deadline = ring.time_at((ring.cursor() + count - 1) % limit) + period_s
    return _time_until(now, deadline)


def _time_until(now: float, deadline: float) -> float:
    if now >= deadline:
        return 0.0
    wait_s = deadline - now
    # Round up so that now + wait_s >= deadline holds in floating point: a caller that
    # advances its clock by exactly the returned wait must be granted, not told to wait
    # another 1e-16 s forever.
    while now + wait_s < deadline:
        wait_s = math.nextafter(wait_s, math.inf)
    return wait_s


def _record(ring: _Ring, limit: int, now: float, count: int) -> None:
    cursor = ring.cursor()
    for offset in range(count):
        ring.set_time_at((cursor + offset) % limit, now)
    ring.set_cursor((cursor + count) % limit)


def _starts_in_window(ring: _Ring, limit: int, period_s: float, now: float) -> int:
    return sum(1 for index in range(limit) if ring.time_at(index) + period_s > now)


def _deadline(now: float, timeout: float | None) -> float:
    if timeout is None:
        return math.inf
    if math.isnan(timeout) or timeout < 0:
        raise ValueError(f"timeout must be >= 0 seconds or None; got {timeout}")
    return now + timeout


def _spec(name: str, limit: int, period_s: float) -> SegmentSpec:
    return SegmentSpec(
        kind=SegmentKind.RATE_GATE,
        name=name,
        capacity=limit,
        parameter=period_s,
        body_size=WindowRing.body_size(limit),
        label="rate gate",
        capacity_label="limit",
        parameter_label="period_s",
    )


def _validate_limit(limit: object, what: str) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise TypeError(f"{what} must be an int, not {type(limit).__name__}")
    if not 1 <= limit <= MAX_RATE_LIMIT:
        raise ValueError(f"{what} must be >= 1 and <= {MAX_RATE_LIMIT}; got {limit}")
    return limit


def _validate_period(period: object, what: str) -> float:
    if isinstance(period, bool) or not isinstance(period, (int, float)):
        raise TypeError(f"{what} must be a number of seconds, not {type(period).__name__}")
    if not (math.isfinite(period) and period > 0):
        raise ValueError(f"{what} must be a finite number of seconds > 0; got {period}")
    return float(period)
