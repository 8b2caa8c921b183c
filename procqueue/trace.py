"""Task traces in the Chrome trace-event format (open them in Perfetto or chrome://tracing).

One complete event ("ph": "X") per task attempt, on the row ("tid") of the worker slot that ran
it, named after its input, with its outcome, error, attempt and worker pid in "args"; metadata
events name the rows "worker 0", "worker 1", ...  Times are microseconds since the epoch.

TraceWriter is a Pool(on_event=...) listener: it runs on the supervisor thread, so it only
appends; the file is written (atomically) on flush() and close().
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from typing import Any

from .stats import TaskEvent

TRACE_PID = 1  # all rows belong to one "process" in the viewer: the pool


class TraceWriter:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._events: list[TaskEvent] = []
        self._lock = threading.Lock()
        self._closed = False

    def __call__(self, event: TaskEvent) -> None:
        with self._lock:
            self._events.append(event)

    @property
    def events(self) -> list[TaskEvent]:
        with self._lock:
            return list(self._events)

    def flush(self) -> None:
        """Write everything recorded so far (atomically: a reader never sees half a file)."""
        document = trace_document(self.events)
        directory = os.path.dirname(os.path.abspath(self.path))
        fd, tmp = tempfile.mkstemp(prefix=".trace-", suffix=".json", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(document, f)
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.flush()


def trace_document(events: list[TaskEvent]) -> dict[str, Any]:
    slots = sorted({e.slot for e in events})
    trace: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": TRACE_PID, "args": {"name": "procqueue pool"}}]
    trace += [{"name": "thread_name", "ph": "M", "pid": TRACE_PID, "tid": slot,
               "args": {"name": f"worker {slot}"}} for slot in slots]
    for e in events:
        trace.append({
            "name": e.input_repr, "cat": e.outcome, "ph": "X", "pid": TRACE_PID, "tid": e.slot,
            "ts": round(e.start_s * 1e6, 1), "dur": round(max(e.seconds, 0.0) * 1e6, 1),
            "args": {"job": e.job, "index": e.index, "attempt": e.attempt,
                     "outcome": e.outcome, "error": e.error, "worker_pid": e.pid},
        })
    return {"traceEvents": trace, "displayTimeUnit": "ms",
            "otherData": {"producer": "procqueue", "attempts": len(events)}}


def load_trace(path: str | os.PathLike[str]) -> list[TaskEvent]:
    """The TaskEvents of a trace written by TraceWriter."""
    with open(path, encoding="utf-8") as f:
        document = json.load(f)
    events = []
    for item in document.get("traceEvents", []):
        if item.get("ph") != "X":
            continue
        args = item.get("args", {})
        start_s = item["ts"] / 1e6
        events.append(TaskEvent(
            job=args.get("job", 0), index=args.get("index", 0), input_repr=item.get("name", ""),
            slot=item.get("tid", 0), pid=args.get("worker_pid"), attempt=args.get("attempt", 1),
            start_s=start_s, end_s=start_s + item.get("dur", 0) / 1e6,
            outcome=args.get("outcome", item.get("cat", "ok")), error=args.get("error")))
    return events
