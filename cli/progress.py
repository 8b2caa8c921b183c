"""A progress bar on stderr (only when stderr is a terminal) and the --stats summary."""

from __future__ import annotations

import math
import time
from typing import Callable, TextIO

REDRAW_INTERVAL_S = 0.1  # redraw at most this often
BAR_WIDTH = 28  # characters


class Progress:
    def __init__(self, total: int | None, stream: TextIO, enabled: bool,
                 restarts: Callable[[], int] = lambda: 0) -> None:
        self.total = total  # None: not known (stdin's lines, still coming): no bar, no eta
        self.restarts = restarts  # live worker restarts (pool.stats), read at each redraw
        self.stream = stream
        self.enabled = enabled
        self.done = 0
        self.failed = 0
        self.started = time.monotonic()
        self._drawn_at = -math.inf  # the first update draws, however young the clock

    def update(self, ok: bool) -> None:
        self.done += 1
        self.failed += 0 if ok else 1
        now = time.monotonic()
        if self.enabled and (now - self._drawn_at >= REDRAW_INTERVAL_S or self.done == self.total):
            self._drawn_at = now
            self._draw(now)

    def note(self, message: str) -> None:
        """A line of its own (above the bar)."""
        if self.enabled:
            self.stream.write("\r\x1b[K")
        self.stream.write(message + "\n")
        self.stream.flush()

    def clear(self) -> None:
        """Take the bar off its line, for a record written to the same terminal; the next
        update draws it again, below the record."""
        if self.enabled and self._drawn_at > -math.inf:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn_at = -math.inf

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self, now: float) -> None:
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        if self.total is None:
            self.stream.write(f"\r\x1b[K{self.done} done  {rate:.0f} it/s  failed: {self.failed}"
                              f"  restarts: {self.restarts()}")
            self.stream.flush()
            return
        fraction = self.done / self.total if self.total else 1.0
        filled = int(BAR_WIDTH * fraction)
        left = (self.total - self.done) / rate if rate > 0 else 0.0
        eta = time.strftime("%H:%M:%S", time.gmtime(left)).lstrip("0:") or "0"
        line = (f"[{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {self.done:>{len(str(self.total))}}"
                f"/{self.total}  {fraction:4.0%}  {rate:.0f} it/s  eta {eta}  failed: {self.failed}"
                f"  restarts: {self.restarts()}")
        self.stream.write("\r\x1b[K" + line)
        self.stream.flush()
