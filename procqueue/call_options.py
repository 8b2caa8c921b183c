"""Per-call options: everything one call of a pool is given besides its function and inputs,
parsed and validated here, once per call.

    map(f, xs, chunksize, errors=, **options) ──► parse_call ──► ParsedCall (frozen) ──► JobMaker
    pool.options(**options)                   ──► CallOptions.build ──► PoolView ──► parsed()

CallOptions is the public, as-given form of the keyword-only options (limit=, queue=, ...): a
PoolView keeps one and passes it on as keywords.  ParsedCall adds what a call gives outside
them (chunksize, errors=) and the parsed forms (a HaltPolicy, a timeout in seconds or as a
multiple of the median), which is all the pool's front end reads.  No other module checks a
per-call option.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Hashable

from .calls import errors_mode
from .config import integer, parse_relative_timeout
from .records import FrozenRecord, replaced
from .scheduler import HaltPolicy

if TYPE_CHECKING:
    from .limits import Limit


class CallOptions(FrozenRecord):
    """Per-call options (keyword-only on every call, or through pool.options(...))."""

    # __match_args__ as Record sets it, spelled out for mypy (a caller's `case CallOptions(...)`)
    _fields = __match_args__ = ("limit", "queue", "concurrency", "key", "key_concurrency",
                                "timeout", "halt")

    limit: Limit | None  # a machine-wide named limit shared with other processes
    queue: str | None  # one of the pool's named queues
    concurrency: int | None  # at most this many of this call's tasks at once
    key: Callable[[Any], Hashable] | None  # input -> concurrency key
    key_concurrency: int | None  # at most this many running per key (default 1)
    timeout: float | str | None  # per-task seconds, or '300%' of the median so far
    halt: str | None  # 'soon,fail=N', 'now,success=1', 'soon,done=N%'... (GNU parallel)

    def __init__(self, limit: Limit | None = None, queue: str | None = None,
                 concurrency: int | None = None, key: Callable[[Any], Hashable] | None = None,
                 key_concurrency: int | None = None, timeout: float | str | None = None,
                 halt: str | None = None) -> None:
        set_ = object.__setattr__
        set_(self, "limit", limit)
        set_(self, "queue", queue)
        set_(self, "concurrency", concurrency)
        set_(self, "key", key)
        set_(self, "key_concurrency", key_concurrency)
        set_(self, "timeout", timeout)
        set_(self, "halt", halt)

    @classmethod
    def build(cls, options: dict[str, Any]) -> "CallOptions":
        """The options, validated (a PoolView checks them when it is made, not at its first
        call); no options at all is NO_OPTIONS."""
        return parse_call(options).options

    def validate(self) -> None:
        """Raise the ValueError or TypeError a call with these options would raise."""
        parsed(self)

    @property
    def rate_limited(self) -> bool:
        return self.limit is not None and self.limit.rate is not None

    def given(self) -> dict[str, Any]:
        """The options set (not None), as the keywords of a call."""
        return {name: getattr(self, name) for name in self._fields
                if getattr(self, name) is not None}

    def merged(self, options: dict[str, Any]) -> "CallOptions":
        return CallOptions.build({**self.given(), **options})


NO_OPTIONS = CallOptions()  # frozen: one shared instance, so "no options" is an identity test


# eq=False: compared and hashed by identity, as before (nothing compares or hashes one).
class ParsedCall(FrozenRecord, eq=False):
    """One call's options, validated and parsed."""

    _fields = ("options", "chunksize", "return_errors", "halt", "timeout_s", "timeout_factor")

    options: CallOptions  # as given (halt and timeout unparsed)
    chunksize: int | None  # inputs per batch, fixed by the call; None: the pool's
    return_errors: bool  # errors='return' (or return_exceptions=True)
    halt: HaltPolicy | None  # options.halt parsed; 'never' is None
    timeout_s: float | None  # options.timeout in seconds from each task's start...
    timeout_factor: float | None  # ...or as a multiple of the median run time ('300%')

    def __init__(self, options: CallOptions = NO_OPTIONS, chunksize: int | None = None,
                 return_errors: bool = False, halt: HaltPolicy | None = None,
                 timeout_s: float | None = None, timeout_factor: float | None = None) -> None:
        set_ = object.__setattr__
        set_(self, "options", options)
        set_(self, "chunksize", chunksize)
        set_(self, "return_errors", return_errors)
        set_(self, "halt", halt)
        set_(self, "timeout_s", timeout_s)
        set_(self, "timeout_factor", timeout_factor)

    def with_chunksize(self, chunksize: Any) -> "ParsedCall":
        """This call with a chunksize, validated: map takes it only for an input that is not
        empty, as multiprocessing.Pool ignores the chunksize of an empty one."""
        size = _checked_chunksize(chunksize)
        return self if size is None else replaced(self, chunksize=size)

    @property
    def sets_timeout(self) -> bool:
        """Whether the call sets its tasks' timeout (if not, the pool's applies)."""
        return self.options.timeout is not None


# The parse of a call with no options: submit() and plain calls take it without a step of parsing
NO_CALL = ParsedCall()


def parse_call(options: dict[str, Any], *, chunksize: Any = None,
               errors: str | None = None) -> ParsedCall:
    """A call's keyword-only `options` (and its `chunksize` and `errors`), validated and
    parsed.  `errors` is None for a call that has no errors= (apply_async, submit,
    imap_outcomes): return_exceptions= is then an unknown option, as any other."""
    return_errors = errors is not None and errors_mode(errors, options) == "return"
    if not options:
        return parsed(NO_OPTIONS, chunksize, return_errors)
    unknown = set(options) - set(CallOptions._fields)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    return parsed(CallOptions(**options), chunksize, return_errors)


def parsed(options: CallOptions, chunksize: Any = None,
           return_errors: bool = False) -> ParsedCall:
    """`options` validated and parsed (pool.options(...).submit(): they come as CallOptions)."""
    if options is NO_OPTIONS and chunksize is None and not return_errors:
        return NO_CALL
    _check_admission(options)
    halt = HaltPolicy.parse(options.halt) if options.halt is not None else None
    timeout_s, timeout_factor = parse_timeout(options.timeout)
    return ParsedCall(options, _checked_chunksize(chunksize), return_errors, halt, timeout_s,
                      timeout_factor)


def parse_timeout(timeout: Any) -> tuple[float | None, float | None]:
    """(seconds, factor) of a timeout: a number of seconds from each task's start, or '300%'
    of the median run time so far (both None: no timeout)."""
    factor = parse_relative_timeout(timeout)  # a string not like '300%' raises ValueError
    if factor is not None or timeout is None:
        return None, factor
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"timeout must be > 0 seconds or a percentage, not {timeout!r}")
    return float(timeout), None


def _check_admission(options: CallOptions) -> None:
    """limit=, key=, concurrency= and key_concurrency=: what admits a call's tasks."""
    if options.limit is not None:
        from .limits import Limit  # here: a call without one never needs it (limits/__init__)

        if not isinstance(options.limit, Limit):
            raise TypeError(f"limit must be a procqueue.Limit, not {options.limit!r}")
    if options.key is not None and not callable(options.key):
        raise TypeError("key must be a callable mapping an input to its key")
    if options.key_concurrency is not None and options.key is None:
        raise ValueError("key_concurrency needs key=")
    for name in ("concurrency", "key_concurrency"):
        value = getattr(options, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise ValueError(f"{name} must be an int >= 1, not {value!r}")


def _checked_chunksize(chunksize: Any) -> int | None:
    """An int (a numpy integer too, as multiprocessing takes any integer), or None;
    ValueError whatever is wrong with it, in multiprocessing.Pool.imap's words."""
    if chunksize is None:
        return None
    size = integer(chunksize)
    if size is None or size < 1:
        raise ValueError(f"Chunksize must be 1+, not {chunksize!r}")
    return size
