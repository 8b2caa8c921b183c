"""PoolConfig: every knob of a pool, validated once, frozen."""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import operator
from typing import TYPE_CHECKING, Any, Callable

from .affinity import plan_cpus, usable_cpu_count
from .errors import exception_types
from .program_fork import ProgramForkContext
from .records import FrozenRecord
from .fork_server import (FALLBACK_START_METHOD, default_start_method,
                          preload_worker_in_fork_server, program_start_method)

if TYPE_CHECKING:
    from .limits import Rate

DEFAULT_CRASH_RETRIES = 1  # issue #2: one retry on a fresh worker covers a one-off OOM kill


# eq=False: compared and hashed by identity, as before (nothing compares or hashes one, and
# its context and worker_env are no values to compare).
class PoolConfig(FrozenRecord, eq=False):
    """Every knob of a pool, validated once by build()."""

    _fields = ("processes", "initializer", "initargs", "maxtasksperchild", "context", "pin",
               "retries", "retry_on", "timeout_s", "chunksize", "worker_env", "cpus",
               "kill_grace_s", "on_event", "max_memory_per_child", "min_free_memory",
               "concurrency", "rate", "init_timeout_s")

    processes: int
    initializer: Callable[..., object] | None
    initargs: tuple[Any, ...]
    maxtasksperchild: int | None
    context: Any  # a multiprocessing context, resolved by build()
    pin: bool
    retries: int
    retry_on: tuple[type[BaseException], ...]
    timeout_s: float | str | None  # seconds, or '300%' of the median task time
    chunksize: int | None
    worker_env: dict[str, str]
    cpus: tuple[tuple[int, ...], ...]
    kill_grace_s: float  # SIGTERM -> SIGKILL grace for a timed-out or cancelled task
    on_event: Callable[[Any], None] | None  # gets a stats.TaskEvent per task attempt
    max_memory_per_child: int | None  # bytes: recycle a worker whose RSS exceeds it
    min_free_memory: int | None  # bytes: start a task only while this much is free
    concurrency: int | None  # at most this many tasks running at once (< processes)
    rate: Rate | None  # at most rate.limit task starts in any rate.per seconds
    init_timeout_s: float | None  # a worker's initializer running longer breaks the pool

    def __init__(self, processes: int, initializer: Callable[..., object] | None = None,
                 initargs: tuple[Any, ...] = (), maxtasksperchild: int | None = None,
                 context: Any = None, pin: bool = True, retries: int = DEFAULT_CRASH_RETRIES,
                 retry_on: tuple[type[BaseException], ...] = (),
                 timeout_s: float | str | None = None, chunksize: int | None = None,
                 worker_env: dict[str, str] | None = None, cpus: tuple[tuple[int, ...], ...] = (),
                 kill_grace_s: float = 0.5, on_event: Callable[[Any], None] | None = None,
                 max_memory_per_child: int | None = None, min_free_memory: int | None = None,
                 concurrency: int | None = None, rate: Rate | None = None,
                 init_timeout_s: float | None = None) -> None:
        set_ = object.__setattr__
        set_(self, "processes", processes)
        set_(self, "initializer", initializer)
        set_(self, "initargs", initargs)
        set_(self, "maxtasksperchild", maxtasksperchild)
        set_(self, "context", context)
        set_(self, "pin", pin)
        set_(self, "retries", retries)
        set_(self, "retry_on", retry_on)
        set_(self, "timeout_s", timeout_s)
        set_(self, "chunksize", chunksize)
        set_(self, "worker_env", {} if worker_env is None else worker_env)  # each its own
        set_(self, "cpus", cpus)
        set_(self, "kill_grace_s", kill_grace_s)
        set_(self, "on_event", on_event)
        set_(self, "max_memory_per_child", max_memory_per_child)
        set_(self, "min_free_memory", min_free_memory)
        set_(self, "concurrency", concurrency)
        set_(self, "rate", rate)
        set_(self, "init_timeout_s", init_timeout_s)

    @classmethod
    def build(cls, processes: int | None = None, initializer: Callable[..., object] | None = None,
              initargs: Any = (), maxtasksperchild: int | None = None, context: Any = None,
              **options: Any) -> "PoolConfig":
        if processes is None:
            processes = usable_cpu_count()
        processes = _checked_int("processes", processes, minimum=1,
                                 message="Number of processes must be at least 1")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if maxtasksperchild is not None and (not isinstance(maxtasksperchild, int)
                                             or maxtasksperchild < 1):
            # ValueError for a wrong type too, as multiprocessing.Pool raises
            raise ValueError("maxtasksperchild must be a positive int or None")
        retries = options.pop("retries", DEFAULT_CRASH_RETRIES)
        retries = _checked_int("retries", retries, minimum=0, message="retries must be >= 0")
        timeout_s = options.pop("timeout", None)
        _check_timeout(timeout_s)
        chunksize = options.pop("chunksize", None)
        if chunksize is not None:
            chunksize = _checked_int("chunksize", chunksize, minimum=1,
                                     message="Chunksize must be 1+")
        retry_on = exception_types(options.pop("retry_on", ()))
        pin = bool(options.pop("pin", True))
        worker_env = dict(options.pop("worker_env", None) or {})
        concurrency = options.pop("concurrency", None)
        if concurrency is not None:
            concurrency = _checked_int("concurrency", concurrency, minimum=1,
                                       message="concurrency must be >= 1")
        rate = options.pop("rate", None)
        if rate is not None:
            from .limits import Rate  # here: a pool without a rate never needs it (limits/__init__)

            rate = Rate.of(rate)
        max_memory = parse_bytes("max_memory_per_child", options.pop("max_memory_per_child", None))
        min_free = parse_bytes("min_free_memory", options.pop("min_free_memory", None))
        init_timeout_s = options.pop("init_timeout", None)
        if init_timeout_s is not None and (isinstance(init_timeout_s, bool) or not isinstance(
                init_timeout_s, (int, float)) or not init_timeout_s > 0):
            raise ValueError(f"init_timeout must be a number of seconds > 0, not "
                             f"{init_timeout_s!r}")
        on_event = options.pop("on_event", None)
        if on_event is not None and not callable(on_event):
            raise TypeError("on_event must be a callable taking a TaskEvent")
        if options:
            raise TypeError(f"unexpected Pool option(s): {', '.join(sorted(options))}")
        return cls(
            processes=processes, initializer=initializer, initargs=tuple(initargs),
            maxtasksperchild=maxtasksperchild, context=resolve_context(context), pin=pin,
            retries=retries, retry_on=retry_on, timeout_s=timeout_s, chunksize=chunksize,
            worker_env=worker_env, cpus=tuple(plan_cpus(processes)), on_event=on_event,
            concurrency=concurrency, rate=rate, max_memory_per_child=max_memory,
            min_free_memory=min_free, init_timeout_s=init_timeout_s,
        )


def fork_instead_of_default() -> Any | None:
    """The fork context, where a pool that names no start method may fall back to it (see
    fork_server.FALLBACK_START_METHOD) and the program chose none with set_start_method(),
    else None."""
    if FALLBACK_START_METHOD is None or program_start_method() is not None:
        return None
    return multiprocessing.get_context(FALLBACK_START_METHOD)


def resolve_context(context: Any) -> Any:
    """None -> our default; a start-method name -> that context; a context object as is."""
    if context is None:
        context = default_start_method()
        if context == "forkserver":
            # multiprocessing's shared server is the fallback where the program cannot be
            # forked: its workers get the same preload as ever
            preload_worker_in_fork_server(multiprocessing.get_context("forkserver"))
            return ProgramForkContext()
    if isinstance(context, str):
        resolved = multiprocessing.get_context(context)
        if context == "forkserver":
            preload_worker_in_fork_server(resolved)
        return resolved
    if isinstance(context, multiprocessing.context.BaseContext) or hasattr(context, "Process"):
        return context
    raise TypeError(f"context must be None, a start method name or a multiprocessing context, "
                    f"not {type(context).__name__}")


def integer(value: Any) -> int | None:
    """`value` as an int if it is an integer (int, numpy's), not a bool; else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _checked_int(name: str, value: Any, *, minimum: int, message: str) -> int:
    """`value` as an int: an int or any integer (numpy's: Pool(np.int64(4)) works with
    multiprocessing), not a bool."""
    number = integer(value)
    if number is None:
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if number < minimum:
        raise ValueError(message)
    return number


def parse_relative_timeout(timeout: Any) -> float | None:
    """'300%' -> 3.0 (a multiple of the median task time so far, as GNU parallel's
    --timeout 300%); None for an absolute timeout."""
    if not isinstance(timeout, str):
        return None
    text = timeout.strip()
    if not text.endswith("%"):
        raise ValueError(
            f"timeout {timeout!r}: give seconds (a number) or a percentage like '300%'")
    try:
        factor = float(text[:-1]) / 100
    except ValueError:
        raise ValueError(f"timeout {timeout!r} is not a percentage like '300%'") from None
    if factor <= 1:
        raise ValueError(f"a relative timeout must be over 100% of the median, not {timeout!r}")
    return factor


def _check_timeout(timeout_s: Any) -> None:
    if timeout_s is None or parse_relative_timeout(timeout_s) is not None:
        return
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)):
        raise TypeError("timeout must be a number of seconds or None, "
                        f"not {type(timeout_s).__name__}")
    if not timeout_s > 0:
        raise ValueError("timeout must be > 0 seconds")


_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "M": 2**20, "MB": 2**20, "G": 2**30,
          "GB": 2**30, "T": 2**40, "TB": 2**40}


def parse_bytes(name: str, value: Any) -> int | None:
    """Bytes from an int or a string like '2G', '512M', '1.5GB' (powers of 1024)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{name} must be bytes (int) or a size like '2G', not {value!r}")
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        text = value.strip().upper()
        digits = text.rstrip("KMGTB")
        unit = text[len(digits):]
        if unit not in _UNITS:
            raise ValueError(f"{name}: unknown size unit in {value!r} (use K, M, G or T)")
        try:
            number = float(digits) * _UNITS[unit]
        except ValueError:
            raise ValueError(f"{name}: {value!r} is not a size like '2G'") from None
    else:
        raise TypeError(f"{name} must be bytes (int) or a size like '2G', not {value!r}")
    if number <= 0:
        raise ValueError(f"{name} must be > 0")
    return int(number)
