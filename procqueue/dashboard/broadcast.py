"""One sampler for every open page: the snapshot is taken once per interval, on one thread,
and each page's event stream sends the latest one.

So the cost to what is watched does not grow with the number of pages open, and is nothing
while none is: the sampler sleeps until a page subscribes.  The interval adapts to what a
snapshot costs (a store of 100,000 tasks takes longer to count): a snapshot never takes more
than BUDGET of the sampler's time.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from typing import Any, Callable, Iterator

MIN_INTERVAL_S = 1.0  # a page updates at most this often...
BUDGET = 0.1  # ...and less often when a snapshot takes more than this share of the time
MAX_INTERVAL_S = 30.0


class Broadcaster:
    def __init__(self, sample: Callable[[], dict[str, Any]],
                 min_interval_s: float = MIN_INTERVAL_S) -> None:
        self._sample = sample
        self.min_interval_s = min_interval_s
        self._changed = threading.Condition()
        self._listeners = 0
        self._closed = False
        self._seq = 0
        self._latest = b""
        self._thread = threading.Thread(target=self._run, name="procqueue-dashboard-sampler",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def closed(self) -> bool:
        return self._closed

    @contextlib.contextmanager
    def listening(self) -> Iterator[int]:
        """While a page's stream is open, the sampler runs.  Yields the sequence number to
        wait past: the latest snapshot's if it is current (the sampler was running), else
        the one before, so that a page never starts with a snapshot from an idle spell."""
        with self._changed:
            fresh = self._listeners > 0
            self._listeners += 1
            self._changed.notify_all()
            start = self._seq - 1 if fresh else self._seq
        try:
            yield start
        finally:
            with self._changed:
                self._listeners -= 1

    def next_after(self, seq: int, timeout: float) -> tuple[int, bytes] | None:
        """The first snapshot newer than ``seq`` (as JSON), waiting up to ``timeout``; None
        on timeout or once closed."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._seq <= seq and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._changed.wait(left)
            if self._closed:
                return None
            return self._seq, self._latest

    def _run(self) -> None:
        while True:
            with self._changed:
                while self._listeners == 0 and not self._closed:
                    self._changed.wait()
                if self._closed:
                    return
            started = time.monotonic()
            data = self._take()
            cost = time.monotonic() - started
            with self._changed:
                self._seq += 1
                self._latest = data
                self._changed.notify_all()
                interval = min(max(self.min_interval_s, cost / BUDGET), MAX_INTERVAL_S)
                deadline = started + interval
                while not self._closed and (left := deadline - time.monotonic()) > 0:
                    self._changed.wait(left)  # a close() cuts it short

    def _take(self) -> bytes:
        try:
            snapshot = self._sample()
        except Exception as exc:  # a store that is busy or gone: say so, try again later
            snapshot = {"error": f"{type(exc).__name__}: {exc}", "now": time.time()}
        return json.dumps(snapshot, separators=(",", ":"), default=str).encode()
