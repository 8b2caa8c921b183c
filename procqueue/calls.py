"""The multiprocessing.Pool call surface, written once for every pool.

A pool (the local Pool, the Dask backend's DaskPool) implements `apply_async`, `_map_async`
and `_imap`; the blocking, star and unordered forms are defined here in terms of them, so
both pools keep one set of names, signatures and defaults.  Every call also takes keyword-only
per-call options (`**options`), which the pool checks.
"""

from __future__ import annotations

import multiprocessing.pool
from typing import Any, Callable, Iterable, Mapping

from .protocol import CallKind, NotCallable
from .results import ApplyResult, IMapIterator, MapResult


class PoolCalls(multiprocessing.pool.Pool):
    """A subclass of multiprocessing's Pool only so that code checking isinstance(pool,
    multiprocessing.pool.Pool) keeps working: none of its machinery runs (its __init__ is
    never called), and every name of it a caller reaches is defined here or in the pool."""

    def __del__(self) -> None:
        """Not multiprocessing's (it reads its own pool's state): a pool that warns when it is
        collected while running says so in its own __del__."""

    # ---- what a pool implements ------------------------------------------------------------

    def apply_async(self, func: Callable[..., Any], args: Iterable[Any] = (),
                    kwds: Mapping[str, Any] | None = None,
                    callback: Callable[[Any], object] | None = None,
                    error_callback: Callable[[BaseException], object] | None = None,
                    **options: Any) -> ApplyResult:
        raise NotImplementedError

    def _map_async(self, func: Callable[..., Any], iterable: Iterable[Any],
                   chunksize: int | None, kind: CallKind, callback: Any, error_callback: Any,
                   *, errors: str, options: dict[str, Any]) -> MapResult:
        raise NotImplementedError

    def _imap(self, func: Callable[..., Any], iterable: Iterable[Any], chunksize: int | None,
              *, ordered: bool, errors: str, options: dict[str, Any]) -> IMapIterator:
        raise NotImplementedError

    @staticmethod
    def _apply_arguments(func: Callable[..., Any], args: Iterable[Any],
                         kwds: Mapping[str, Any] | None, result: ApplyResult
                         ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """apply_async's (args, kwargs); None once `result` failed with why they cannot be
        called (func not callable, args not iterable, kwds not a mapping): multiprocessing
        finds out in the worker, so get() raises it and error_callback gets it, not the call."""
        try:
            if not callable(func):
                raise NotCallable.error_of(func)
            return tuple(args), dict(kwds or {})
        except TypeError as exc:
            result.abort(exc)
            return None

    # ---- multiprocessing.Pool's names, in terms of those -----------------------------------

    def apply(self, func: Callable[..., Any], args: Iterable[Any] = (),
              kwds: Mapping[str, Any] | None = None, **options: Any) -> Any:
        return self.apply_async(func, args, kwds, **options).get()

    def map(self, func: Callable[[Any], Any], iterable: Iterable[Any],
            chunksize: int | None = None, *, errors: str = "raise", **options: Any) -> list[Any]:
        values: list[Any] = self._map_async(func, iterable, chunksize, CallKind.ONE, None, None,
                                            errors=errors, options=options).get()
        return values

    def map_async(self, func: Callable[[Any], Any], iterable: Iterable[Any],
                  chunksize: int | None = None, callback: Callable[[Any], object] | None = None,
                  error_callback: Callable[[BaseException], object] | None = None, *,
                  errors: str = "raise", **options: Any) -> MapResult:
        return self._map_async(func, iterable, chunksize, CallKind.ONE, callback,
                               error_callback, errors=errors, options=options)

    def starmap(self, func: Callable[..., Any], iterable: Iterable[Iterable[Any]],
                chunksize: int | None = None, *, errors: str = "raise", **options: Any
                ) -> list[Any]:
        values: list[Any] = self._map_async(func, iterable, chunksize, CallKind.STAR, None,
                                            None, errors=errors, options=options).get()
        return values

    def starmap_async(self, func: Callable[..., Any], iterable: Iterable[Iterable[Any]],
                      chunksize: int | None = None,
                      callback: Callable[[Any], object] | None = None,
                      error_callback: Callable[[BaseException], object] | None = None, *,
                      errors: str = "raise", **options: Any) -> MapResult:
        return self._map_async(func, iterable, chunksize, CallKind.STAR, callback,
                               error_callback, errors=errors, options=options)

    def imap(self, func: Callable[[Any], Any], iterable: Iterable[Any],
             chunksize: int | None = None, *, errors: str = "raise", **options: Any
             ) -> IMapIterator:
        return self._imap(func, iterable, chunksize, ordered=True, errors=errors,
                          options=options)

    def imap_unordered(self, func: Callable[[Any], Any], iterable: Iterable[Any],
                       chunksize: int | None = None, *, errors: str = "raise", **options: Any
                       ) -> IMapIterator:
        return self._imap(func, iterable, chunksize, ordered=False, errors=errors,
                          options=options)


def errors_mode(errors: str, options: dict[str, Any]) -> str:
    """'raise' or 'return'; return_exceptions=True (asyncio.gather's name) means 'return'."""
    if options.pop("return_exceptions", False):
        errors = "return"
    if errors not in ("raise", "return"):
        raise ValueError(f"errors must be 'raise' or 'return', not {errors!r}")
    return errors
