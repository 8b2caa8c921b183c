"""One JSON Lines record per input: what ran, and its result or its error."""

from __future__ import annotations

import json
import time
from typing import Any, TextIO

import procqueue


def record_of(outcome: procqueue.TaskOutcome) -> dict[str, Any]:
    """The JSON record of one input (see line_of for results that are not JSON)."""
    record: dict[str, Any] = {"input": outcome.input, "ok": outcome.ok}
    if outcome.ok:
        record["result"] = outcome.value
    else:
        record["error"] = error_of(outcome.error)
    record["attempts"] = outcome.attempts
    record["seconds"] = round(outcome.seconds, 6)
    record["worker"] = outcome.pid
    return record


def line_of(record: dict[str, Any]) -> str:
    """The record as one JSON line.  A result that is not JSON-serialisable becomes that
    input's error (the record is changed in place), never a crash of the run."""
    try:
        return json.dumps(record)
    except (TypeError, ValueError, OverflowError) as exc:
        value = record.pop("result", None)
        record["ok"] = False
        record["error"] = {
            "type": "ResultNotJSONSerializable",
            "message": f"the result of type {type(value).__qualname__} is not "
                       f"JSON-serialisable: {exc}",
            "traceback": "",
        }
        return json.dumps(record, default=repr)


def error_of(error: BaseException | None) -> dict[str, Any]:
    if error is None:
        return {"type": "UnknownError", "message": "", "traceback": ""}
    cause = error.__cause__
    traceback = cause.tb_text if isinstance(cause, procqueue.RemoteTraceback) else ""
    if not traceback and isinstance(error, procqueue.RemoteError):
        traceback = error.traceback_text
    message = getattr(error, "message", None) if isinstance(error, procqueue.TaskFailed) \
        else None
    if isinstance(error, procqueue.WorkerCrashedError):
        message = str(error)  # names the pid, exit code or signal
    return {"type": _type_name(error), "message": message or str(error),
            "traceback": traceback}


def _type_name(error: BaseException) -> str:
    if isinstance(error, procqueue.RemoteError):
        return error.type_name
    cls = type(error)
    return cls.__qualname__ if cls.__module__ in ("builtins", "__main__") or \
        cls.__module__.startswith("procqueue") else f"{cls.__module__}.{cls.__qualname__}"


FLUSH_INTERVAL_S = 0.1  # records reach the file at least this often (and at the end)


class RecordWriter:
    """Writes records as JSON Lines: whole lines only, flushed at least every
    FLUSH_INTERVAL_S (a flush per record costs the CPU the workers need)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._flushed_at = time.monotonic()

    def write(self, record: dict[str, Any]) -> None:
        self.stream.write(line_of(record) + "\n")
        now = time.monotonic()
        if now - self._flushed_at >= FLUSH_INTERVAL_S:
            self.stream.flush()
            self._flushed_at = now

    def flush(self) -> None:
        self.stream.flush()
