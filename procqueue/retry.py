"""Which failures are run again, and after how long: one policy for every backend.

A task that crashed its worker is run again while it has retries left (a one-off OOM kill
should not fail a batch); one that raised, only if its exception is one of `retry_on`; one
that timed out, only if `retry_on` names TaskTimeoutError (a hung task usually hangs again).
The wait before each retry grows exponentially, with full jitter, so that many tasks failing
together (a database restarting) do not come back together.
"""

from __future__ import annotations

import enum
import random
from .errors import TaskTimeoutError
from .records import FrozenRecord

RETRY_BACKOFF_S = 0.05  # the wait before the first retry; doubles per attempt, with jitter
RETRY_BACKOFF_MAX_S = 5.0


class FailureKind(enum.Enum):
    CRASH = "crash"  # the worker died while running it
    TIMEOUT = "timeout"  # it ran past its timeout
    EXCEPTION = "exception"  # it raised


# eq=False: compared and hashed by identity, as before (nothing compares or hashes one).
class RetryPolicy(FrozenRecord, eq=False):
    """Which failed attempts run again, and after what backoff."""

    _fields = ("retries", "retry_on", "backoff_s", "backoff_max_s")

    retries: int  # extra attempts after the first
    retry_on: tuple[type[BaseException], ...]  # exception types that are retried
    backoff_s: float  # delay before the first retry
    backoff_max_s: float

    def __init__(self, retries: int, retry_on: tuple[type[BaseException], ...],
                 backoff_s: float = RETRY_BACKOFF_S,
                 backoff_max_s: float = RETRY_BACKOFF_MAX_S) -> None:
        set_ = object.__setattr__
        set_(self, "retries", retries)
        set_(self, "retry_on", retry_on)
        set_(self, "backoff_s", backoff_s)
        set_(self, "backoff_max_s", backoff_max_s)

    @property
    def retry_timeouts(self) -> bool:
        return any(issubclass(TaskTimeoutError, t) for t in self.retry_on)

    def should_retry(self, attempts: int, kind: FailureKind, error: BaseException | None
                     ) -> bool:
        """After a failure of a task that has run `attempts` times (this one included)."""
        if attempts > self.retries:
            return False
        if kind is FailureKind.CRASH:
            return True
        if kind is FailureKind.TIMEOUT:
            return self.retry_timeouts
        return error is not None and isinstance(error, self.retry_on)

    def backoff(self, attempts: int) -> float:
        """Seconds to wait before the next attempt (attempts >= 1 runs so far)."""
        ceiling = min(self.backoff_max_s, self.backoff_s * (2 ** max(attempts - 1, 0)))
        return float(ceiling / 2 + random.uniform(0, ceiling / 2))
