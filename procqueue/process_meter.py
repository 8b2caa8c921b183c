"""CPU use and resident memory of worker processes, read by whoever watches them (a
dashboard, a worker service's report).  psutil measures CPU use between two readings of the
same process, so the meter keeps a process object per pid across readings."""

from __future__ import annotations

from typing import Iterable

import psutil


class ProcessMeter:
    def __init__(self) -> None:
        self._processes: dict[int, psutil.Process] = {}

    def measure(self, pid: int | None) -> tuple[float | None, int | None]:
        """(CPU percent since this pid's previous reading, None at its first; RSS bytes now);
        (None, None) for a process that is gone or unknown."""
        if pid is None:
            return None, None
        process = self._processes.get(pid)
        try:
            if process is None:
                process = self._processes[pid] = psutil.Process(pid)
                process.cpu_percent(None)  # starts the interval
                return None, int(process.memory_info().rss)
            return float(process.cpu_percent(None)), int(process.memory_info().rss)
        except psutil.Error:
            return None, None

    def keep_only(self, pids: Iterable[int | None]) -> None:
        """Forget the processes not in ``pids`` (replaced workers)."""
        alive = set(pids)
        for pid in [p for p in self._processes if p not in alive]:
            del self._processes[pid]
