"""How an outcome is kept in a store: results and exceptions as pickles plus readable text.

An exception is stored as four columns: its qualified type name, its message, the remote
traceback text and its pickle (NULL when it does not pickle).  Reading it back gives the
original exception when the pickle loads, else a RemoteError with the same type name and
text; either way the traceback text is its ``__cause__``, as for a live pool's errors.
"""

from __future__ import annotations

import json
import pickle
import traceback
from typing import Any

from ..errors import RemoteError, ServiceLostError, remote_traceback, remote_traceback_text

PICKLE_PROTOCOL = 5
REPR_MAX_CHARS = 500


def qualified_type_name(exc: BaseException) -> str:
    cls = type(exc)
    module = cls.__module__
    return (cls.__qualname__ if module in ("builtins", "__main__")
            else f"{module}.{cls.__qualname__}")


def _qualified(cls: type[BaseException]) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def error_columns(exc: BaseException) -> tuple[str, str, str, bytes | None]:
    """(type name, message, traceback text, pickle or None) of an exception."""
    tb_text = remote_traceback_text(exc.__cause__)
    if tb_text is None:
        tb_text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        message = str(exc)
    except Exception:
        message = f"<{type(exc).__name__} whose str() raised>"
    try:
        blob: bytes | None = pickle.dumps(exc, PICKLE_PROTOCOL)
    except Exception:
        blob = None
    return qualified_type_name(exc), message, tb_text, blob


def rebuild_error(type_name: str, message: str, tb_text: str,
                  blob: bytes | None) -> BaseException:
    """The stored exception (see the module docstring)."""
    error: BaseException | None = None
    if blob is not None:
        try:
            loaded = pickle.loads(blob)
            if isinstance(loaded, BaseException):
                error = loaded
        except Exception:
            pass
    if error is None and type_name == _qualified(ServiceLostError):
        error = ServiceLostError(message)  # written by the store itself, in SQL
    if error is None:
        error = RemoteError(type_name, message, tb_text)
    error.__cause__ = remote_traceback(tb_text)
    return error


def short_repr(value: Any, limit: int = REPR_MAX_CHARS) -> str:
    try:
        text = repr(value)
    except Exception as exc:
        text = f"<{type(value).__name__} whose repr() raised {exc!r}>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def json_or_repr(blob: bytes | None, fallback: str | None) -> Any:
    """A stored result as JSON would show it: the value if JSON can hold it, else its repr."""
    if blob is None:
        return fallback
    try:
        value = pickle.loads(blob)
    except Exception as exc:
        return f"<result that does not unpickle here: {exc!r}>"
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return short_repr(value)
