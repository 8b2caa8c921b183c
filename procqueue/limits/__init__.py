"""Flow-control primitives: machine-wide named limits, a rate gate, per-key caps.

    Semaphore(name, value)          machine-wide counting semaphore in shared memory;
                                    a SIGKILLed holder's permits are reclaimed
    RateGate(limit, period_s, ...)  at most `limit` starts in any `period_s` window
                                    (local, or shared by name=)
    KeyedLimit(concurrency_per_key) per-key running counts (pure bookkeeping)
    FairQueue()                     waiting items per key, round-robin across keys
    Rate(limit, per)                value object: `limit` starts per `per` seconds
    Limit(name, concurrency=, rate=) value object for a named machine-wide limit;
                                    Limit.open() gives its live LimitHandle
    named_limits()                  snapshots of every named limit on the machine

Every live object has a ``statistics()`` returning a frozen snapshot.  Non-blocking paths
for a scheduler with its own event loop: ``Semaphore.acquire_nowait()``,
``RateGate.try_acquire()`` (returns the seconds to wait) and ``LimitHandle.try_acquire()``.

`Limit` and `LimitHandle` live here because they only combine the modules below.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_getattr

if TYPE_CHECKING:  # explicit re-exports for type checkers; loaded lazily at run time
    from .keyed import FairQueue as FairQueue
    from .keyed import FairQueueStatistics as FairQueueStatistics
    from .keyed import KeyedLimit as KeyedLimit
    from .keyed import KeyedLimitStatistics as KeyedLimitStatistics
    from .keyed import QueuedItem as QueuedItem
    from .named import Limit as Limit
    from .named import LimitHandle as LimitHandle
    from .named import LimitStatistics as LimitStatistics
    from .named import named_limits as named_limits
    from .rate_gate import Rate as Rate
    from .rate_gate import RateGate as RateGate
    from .rate_gate import RateGateStatistics as RateGateStatistics
    from .semaphore import Semaphore as Semaphore
    from .semaphore import SemaphoreStatistics as SemaphoreStatistics

# A scheduler records a start when it hands a task to a worker; the task starts a pipe hop
# later.  Gates for task starts widen their window by this much so that "at most L starts in
# any P seconds" holds for the starts the tasks themselves observe.  Every process opening a
# named Limit uses the same value, so they agree on the shared window.
START_SKEW_MARGIN_S = 0.02

__all__ = [
    "START_SKEW_MARGIN_S",
    "FairQueue",
    "FairQueueStatistics",
    "KeyedLimit",
    "KeyedLimitStatistics",
    "Limit",
    "LimitHandle",
    "LimitStatistics",
    "QueuedItem",
    "Rate",
    "RateGate",
    "RateGateStatistics",
    "Semaphore",
    "SemaphoreStatistics",
    "named_limits",
]

# name -> submodule, imported on first access (PEP 562): a pool that uses no limit needs only
# limits.keyed (its call queues), and the shared-memory modules' ~10 ms of imports and
# dataclasses would be spent on every Pool() otherwise.
_LAZY = {
    "FairQueue": "keyed",
    "FairQueueStatistics": "keyed",
    "KeyedLimit": "keyed",
    "KeyedLimitStatistics": "keyed",
    "QueuedItem": "keyed",
    "Limit": "named",
    "LimitHandle": "named",
    "LimitStatistics": "named",
    "named_limits": "named",
    "Rate": "rate_gate",
    "RateGate": "rate_gate",
    "RateGateStatistics": "rate_gate",
    "Semaphore": "semaphore",
    "SemaphoreStatistics": "semaphore",
}


__getattr__ = lazy_getattr(globals(), _LAZY)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
