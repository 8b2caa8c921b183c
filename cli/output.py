"""One JSON Lines record per input: what ran, and its result or its error."""

from __future__ import annotations

import json
from typing import Any, TextIO

import procqueue


def record_of(outcome: procqueue.TaskOutcome) -> dict[str, Any]:
    """The JSON record of one input.  A result that is not JSON-serialisable becomes that
    input's error, never a crash of the run."""
    record: dict[str, Any] = {"input": outcome.input, "ok": outcome.ok}
    if outcome.ok:
        try:
            json.dumps(outcome.value)
            record["result"] = outcome.value
        except (TypeError, ValueError, OverflowError) as exc:
            record["ok"] = False
            record["error"] = {
                "type": "ResultNotJSONSerializable",
                "message": f"the result of type {type(outcome.value).__qualname__} is not "
                           f"JSON-serialisable: {exc}",
                "traceback": "",
            }
    else:
        record["error"] = error_of(outcome.error)
    record["attempts"] = outcome.attempts
    record["seconds"] = round(outcome.seconds, 6)
    record["worker"] = outcome.pid
    return record


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


class RecordWriter:
    """Writes records as JSON Lines, flushing each, so that a killed run leaves valid lines."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, record: dict[str, Any]) -> None:
        self.stream.write(json.dumps(record, default=repr) + "\n")
        self.stream.flush()
