"""The checks of a DaskPool's options and of each call's options.

The local pool's options that have no meaning on Dask are accepted and ignored, so that code
written for it runs unchanged; the ones tied to this machine's worker processes are refused
by name, so that nobody believes they hold; the rest is checked with the local pool's rules.
(journal=, trace= and on_event= are the front end's, kept by the pool as the local pool keeps
them, and the backend only reports each attempt: they are checked here, not refused.)
"""

from __future__ import annotations

import os
from typing import Any, Mapping, NamedTuple

from ...errors import exception_types
from ...limits import Limit, Rate
# A pool's queues= are procqueue.Queue values, the local pool's, checked by its rules here.
from ...pool import Queue
from .items import _KeySpec

DEFAULT_CRASH_RETRIES = 1  # as the local pool: one re-run covers a one-off OOM kill


class QueueSpec(NamedTuple):
    """A named queue's limits (a procqueue.Queue, checked, its rate parsed)."""

    concurrency: int | None
    rate: Rate | None


class PoolOptions(NamedTuple):
    """What a DaskPool keeps of its checked options, in the form it uses them."""

    rate: Rate | None
    worker_env: dict[str, str]
    retry_on: tuple[type[BaseException], ...]
    queues: dict[str, QueueSpec]


class CallSettings(NamedTuple):
    """One call's checked options, as the pool uses them."""

    timeout_s: float | None
    concurrency: int | None
    keys: _KeySpec | None
    queue: Any  # the name of one of the pool's queues (checked by the pool, which has them)
    limit: Limit | None  # a named limit, shared by every pool on the cluster using its name


def check_pool_options(processes: Any = None, initializer: Any = None, initargs: Any = (),
                       maxtasksperchild: Any = None, context: Any = None, *,
                       address: Any = None, client: Any = None,
                       retries: Any = DEFAULT_CRASH_RETRIES, retry_on: Any = (),
                       timeout: Any = None, chunksize: Any = None, concurrency: Any = None,
                       rate: Any = None, worker_env: Any = None, journal: Any = None,
                       trace: Any = None, on_event: Any = None, queues: Any = None,
                       **options: Any) -> PoolOptions:
    """Every check of DaskPool's arguments, in one place so that DaskPool() and
    DaskPool.check_options() raise the same errors; nothing is started or connected to.
    (initargs and context are named only to be accepted: context has no meaning on Dask;
    journal is checked where the pool opens it, as in the local pool.)"""
    _check_options(processes, retries, timeout, chunksize, concurrency, address, client)
    _check_local_options(maxtasksperchild, options)
    if initializer is not None and not callable(initializer):
        raise TypeError("initializer must be a callable")
    if on_event is not None and not callable(on_event):
        raise TypeError("on_event must be a callable taking a TaskEvent")
    if trace is not None:
        os.fspath(trace)  # TypeError unless a path, as the trace's writer would raise
    return PoolOptions(Rate.of(rate), _check_worker_env(worker_env), exception_types(retry_on),
                       _check_queues(queues))


def _check_options(processes: Any, retries: Any, timeout: Any, chunksize: Any,
                   concurrency: Any, address: Any, client: Any) -> None:
    for name, value, minimum in (("processes", processes, 1), ("retries", retries, 0),
                                 ("chunksize", chunksize, 1), ("concurrency", concurrency, 1)):
        if value is None and name != "retries":
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, not {type(value).__name__}")
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, not {value}")
    _check_timeout(timeout)
    if address is not None and client is not None:
        raise ValueError("give address= or client=, not both")


def _check_timeout(timeout: Any) -> None:
    if timeout is None:
        return
    if isinstance(timeout, str):
        raise ValueError("relative timeouts ('300%') are not supported on the Dask backend: "
                         "give seconds")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds or None, not {timeout!r}")
    if not timeout > 0:
        raise ValueError("timeout must be > 0 seconds")


# Options of the local Pool with no meaning on Dask: accepted, so that code written for the
# local pool runs unchanged, and ignored (maxtasksperchild and context are positional).
# pin: the worker processes are the cluster's, placed by whoever started them.
_IGNORED_POOL_OPTIONS = frozenset({"pin"})
# Options of the local Pool the Dask backend does not implement, with the reason the error
# gives: refused by name, so that nobody believes they hold.
_LOCAL_ONLY_POOL_OPTIONS = {
    "max_memory_per_child": "it recycles this machine's worker processes by their memory "
                            "(on Dask, the nanny restarts a worker over its --memory-limit)",
    "min_free_memory": "it admits tasks by this machine's free memory (on Dask, a worker "
                       "pauses near its --memory-limit)",
}


def _check_local_options(maxtasksperchild: Any, options: dict[str, Any]) -> None:
    if maxtasksperchild is not None and (isinstance(maxtasksperchild, bool)
                                         or not isinstance(maxtasksperchild, int)
                                         or maxtasksperchild < 1):
        raise ValueError("maxtasksperchild must be a positive int or None")
    refused = sorted(_given(options) & set(_LOCAL_ONLY_POOL_OPTIONS))
    if refused:
        reasons = "; ".join(f"{name}: {_LOCAL_ONLY_POOL_OPTIONS[name]}" for name in refused)
        raise TypeError(f"Pool option(s) {', '.join(refused)} not supported on the Dask "
                        f"backend: {reasons} (see docs/dask.md)")
    unknown = sorted(set(options) - _IGNORED_POOL_OPTIONS - set(_LOCAL_ONLY_POOL_OPTIONS))
    if unknown:
        raise TypeError(f"unexpected Pool option(s): {', '.join(unknown)}")


def _given(options: dict[str, Any]) -> set[str]:
    """The options given a value: None means "not set", as in the local pool, so code that
    passes the local pool's defaults (journal=None...) runs unchanged."""
    return {name for name, value in options.items() if value is not None}


def _check_queues(queues: Any) -> dict[str, QueueSpec]:
    """queues= with the local pool's rules: a mapping of names to procqueue.Queue."""
    if queues is None:
        return {}
    if not isinstance(queues, Mapping):
        raise TypeError(f"queues must be a mapping of names to procqueue.Queue, not {queues!r}")
    return {name: _queue_spec(name, spec) for name, spec in queues.items()}


def _queue_spec(name: Any, spec: Any) -> QueueSpec:
    if not isinstance(spec, Queue):
        raise TypeError(f"queue {name!r} must be a procqueue.Queue, not {spec!r}")
    return QueueSpec(_check_count("concurrency", spec.concurrency), Rate.of(spec.rate))


def _check_worker_env(env: Any) -> dict[str, str]:
    if env is None:
        return {}
    if not isinstance(env, Mapping):
        raise TypeError(f"worker_env must be a mapping of str to str, not {env!r}")
    for name, value in env.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise TypeError(f"worker_env must map str to str, got {name!r}: {value!r}")
    return dict(env)


_CALL_OPTIONS = frozenset({"timeout", "concurrency", "key", "key_concurrency", "queue",
                           "limit"})
# halt= is counted by the local supervisor as outcomes arrive; on Dask, the caller counts them
# and cancels the rest (as the procqueue command does with --cluster).
_LOCAL_ONLY_CALL_OPTIONS = frozenset({"halt"})


def _call_options(options: dict[str, Any], default_timeout_s: float | None) -> CallSettings:
    """One call's options, checked; the local pool's other per-call options are refused by
    name rather than silently ignored."""
    unsupported = _given(options) & _LOCAL_ONLY_CALL_OPTIONS
    if unsupported:
        raise TypeError(f"not supported on the Dask backend: {', '.join(sorted(unsupported))}")
    unknown = set(options) - _CALL_OPTIONS - _LOCAL_ONLY_CALL_OPTIONS
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    timeout = options.get("timeout", default_timeout_s)
    _check_timeout(timeout)
    concurrency = _check_count("concurrency", options.get("concurrency"))
    return CallSettings(None if timeout is None else float(timeout), concurrency,
                        _key_spec(options), options.get("queue"),
                        _check_limit(options.get("limit")))


def _check_limit(limit: Any) -> Limit | None:
    if limit is not None and not isinstance(limit, Limit):
        raise TypeError(f"limit must be a procqueue.Limit, not {limit!r}")
    return limit


def _key_spec(options: dict[str, Any]) -> _KeySpec | None:
    """key= and key_concurrency=, with the local pool's rules (CallOptions.validate)."""
    key, per_key = options.get("key"), _check_count("key_concurrency",
                                                    options.get("key_concurrency"))
    if key is None:
        if per_key is not None:
            raise ValueError("key_concurrency needs key=")
        return None
    if not callable(key):
        raise TypeError("key must be a callable mapping an input to its key")
    return _KeySpec(key, per_key or 1)


def _check_count(name: str, value: Any) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or value < 1):
        raise ValueError(f"{name} must be an int >= 1, not {value!r}")
    return value
