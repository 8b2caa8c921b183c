"""Named machine-wide limits: the `Limit` value object, its live `LimitHandle`, and
`named_limits()`.  They only combine the modules beside them (procqueue.limits re-exports
them; it imports this module when one of them is first used)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Callable, TypeVar

from . import START_SKEW_MARGIN_S
from ._shm import SegmentKind, segment_names, validate_name
from .rate_gate import Rate, RateGate, RateGateStatistics
from .semaphore import Semaphore, SemaphoreStatistics

_Handle = TypeVar("_Handle", bound="LimitHandle")

__all__ = ["Limit", "LimitHandle", "LimitStatistics", "named_limits"]


@dataclass(frozen=True)
class Limit:
    """``Limit(name, *, concurrency=None, rate=None)``: a machine-wide limit by name.

    Every program that opens a Limit of the same name shares its `concurrency` permits
    (a `Semaphore` named `name`) and its `rate` window (a `RateGate` named `name`), so all
    openers must agree on both values.  At least one of them is required.
    """

    name: str
    concurrency: int | None = None
    rate: Rate | None = None

    def __post_init__(self) -> None:
        validate_name(self.name)
        if self.concurrency is None and self.rate is None:
            raise ValueError(f"Limit {self.name!r} needs concurrency= or rate= (or both)")
        if self.concurrency is not None:
            _validate_concurrency(self.concurrency)
        if self.rate is not None and not isinstance(self.rate, Rate):
            raise TypeError(f"Limit rate must be a Rate, not {type(self.rate).__name__}")

    @classmethod
    def parse(cls, text: str) -> Limit:
        """Parse the CLI form ``NAME=K``, ``NAME=RATE`` or ``NAME=K,RATE``, e.g.
        ``gpu=1``, ``geo-api=2,10/1s`` or ``api=50/30s`` (rates as in `Rate.parse`)."""
        name, sep, spec = text.partition("=")
        parts = [part.strip() for part in spec.split(",")] if sep else []
        if not parts or not all(parts) or len(parts) > 2:
            raise ValueError(
                f"a limit must look like NAME=K, NAME=RATE or NAME=K,RATE "
                f"(e.g. 'gpu=1', 'geo-api=2,10/1s'); got {text!r}"
            )
        rates = [Rate.parse(part) for part in parts if "/" in part]
        counts = [_parse_count(part, text) for part in parts if "/" not in part]
        if len(rates) > 1 or len(counts) > 1:
            raise ValueError(f"a limit takes at most one K and one RATE; got {text!r}")
        return cls(name.strip(), concurrency=counts[0] if counts else None,
                   rate=rates[0] if rates else None)

    def open(self) -> LimitHandle:
        """Open (or create) the shared objects; close the handle when done."""
        semaphore = None if self.concurrency is None else Semaphore(self.name, self.concurrency)
        try:
            rate_gate = None if self.rate is None else RateGate(
                self.rate.limit, self.rate.period_s + START_SKEW_MARGIN_S, name=self.name)
        except BaseException:
            if semaphore is not None:
                semaphore.close()
            raise
        return LimitHandle(self, semaphore, rate_gate)

    @staticmethod
    def unlink_name(name: str) -> bool:
        """Remove the named limit's semaphore and rate gate without opening them; True if
        there was either (same caveat as `Semaphore.unlink()`: only when no program uses it)."""
        removed = [Semaphore.unlink_name(name), RateGate.unlink_name(name)]
        return any(removed)


@dataclass(frozen=True)
class LimitStatistics:
    name: str
    semaphore: SemaphoreStatistics | None
    rate_gate: RateGateStatistics | None


@dataclass(frozen=True)
class LimitHandle:
    """The live objects of an open `Limit`.  One task start = `try_acquire()` returning 0.0
    (a permit, if there is a concurrency, and a recorded start, if there is a rate); the
    task's end = `release()` (returns the permit; a start once made stays in the window)."""

    limit: Limit
    semaphore: Semaphore | None
    rate_gate: RateGate | None

    def try_acquire(self, now: float | None = None) -> float:
        """Never blocks: 0.0 when the task may start (permit and start taken), else the
        seconds after which to try again.  The permit is taken first because it can be
        given back when the rate refuses; a recorded start cannot."""
        if self.semaphore is not None and not self.semaphore.acquire_nowait():
            return Semaphore.retry_interval_s
        wait_s = 0.0 if self.rate_gate is None else self.rate_gate.try_acquire(now)
        if wait_s > 0.0 and self.semaphore is not None:
            self.semaphore.release()
        return wait_s

    def acquire(self, timeout: float | None = None) -> bool:
        """Block until `try_acquire()` succeeds; False if `timeout` seconds pass first."""
        if timeout is not None and (math.isnan(timeout) or timeout < 0):
            raise ValueError(f"timeout must be >= 0 seconds or None; got {timeout}")
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        while (wait_s := self.try_acquire()) > 0.0:
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                return False
            time.sleep(min(wait_s, remaining_s))
        return True

    def release(self) -> None:
        if self.semaphore is not None:
            self.semaphore.release()

    def statistics(self) -> LimitStatistics:
        return LimitStatistics(
            self.limit.name,
            None if self.semaphore is None else self.semaphore.statistics(),
            None if self.rate_gate is None else self.rate_gate.statistics(),
        )

    def close(self) -> None:
        for part in (self.semaphore, self.rate_gate):
            if part is not None:
                part.close()

    def unlink(self) -> None:
        """Remove the limit's shared segments (only when no program uses the name)."""
        for part in (self.semaphore, self.rate_gate):
            if part is not None:
                part.unlink()

    def __enter__(self: _Handle) -> _Handle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


_Part = TypeVar("_Part", Semaphore, RateGate)
_Snapshot = TypeVar("_Snapshot", SemaphoreStatistics, RateGateStatistics)


def named_limits() -> list[LimitStatistics]:
    """A snapshot of every named limit of this user on this machine, sorted by name: its
    semaphore (value, holders) and its rate gate (limit, window, starts in the window).

    Nothing is created: a limit removed while this runs is left out, as is a file its
    creator never finished.  Like `Semaphore.statistics()`, reading a semaphore frees the
    permits of holders that exited (listed in its `reclaimed`).  A Limit's rate gate shows
    a window `START_SKEW_MARGIN_S` longer than the Rate it was given."""
    names = set(segment_names(SegmentKind.SEMAPHORE)) | set(segment_names(SegmentKind.RATE_GATE))
    found = []
    for name in sorted(names):
        semaphore = _snapshot(Semaphore.attach, name, Semaphore.statistics)
        rate_gate = _snapshot(RateGate.attach, name, RateGate.statistics)
        if semaphore is not None or rate_gate is not None:
            found.append(LimitStatistics(name, semaphore, rate_gate))
    return found


def _snapshot(attach: Callable[[str], _Part], name: str,
              statistics: Callable[[_Part], _Snapshot]) -> _Snapshot | None:
    try:
        part = attach(name)
    except (FileNotFoundError, PermissionError):  # removed meanwhile; another user's
        return None
    try:
        return statistics(part)
    finally:
        part.close()


def _validate_concurrency(concurrency: object) -> None:
    if isinstance(concurrency, bool) or not isinstance(concurrency, int):
        raise TypeError(f"Limit concurrency must be an int, not {type(concurrency).__name__}")
    if concurrency < 1:
        raise ValueError(f"Limit concurrency must be >= 1; got {concurrency}")


def _parse_count(part: str, text: str) -> int:
    if not part.isdigit():
        raise ValueError(f"a limit's K must be a whole number >= 1; got {part!r} in {text!r}")
    return int(part)


# Known as before this module split procqueue.limits: pickles and help() name them there.
for _public in (Limit, LimitStatistics, LimitHandle, named_limits):
    _public.__module__ = "procqueue.limits"
del _public
