"""What a worker of `procqueue map` runs: the user's function, loaded once per worker.

Apart from script.py (which checks the script in the parent and imports click for its
errors) so that a worker imports only this; the `procqueue` command's fork server preloads
it, and each worker starts without importing anything of the command line.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

import procqueue


class _Value:
    """Compared, hashed and shown by its `__slots__`, as the frozen dataclasses these were:
    without importing dataclasses and building each class's methods, which took ~2.5 ms of
    every `procqueue map`'s start (issue #24).  Sent to the workers by pickle, which restores
    the slots."""

    __slots__: tuple[str, ...] = ()

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({shown})"


class ScriptFunction(_Value):
    """A picklable reference to the user's function: `path` (a file) or `module`, and the
    function's name.  Calling it loads the script once per process, then calls the function."""

    __slots__ = ("name", "path", "module")
    name: str
    path: str | None
    module: str | None

    def __init__(self, name: str, path: str | None = None, module: str | None = None) -> None:
        self.name = name
        self.path = path
        self.module = module

    def __call__(self, *args: Any) -> Any:
        return self.resolve()(*args)  # several arguments: a combination of input sources

    def resolve(self) -> Callable[..., Any]:
        key = (self.path, self.module, self.name)
        fn = _LOADED.get(key)
        if fn is None:
            module = procqueue.FunctionRef(self.path or self.module or "", self.name).module()
            fn = getattr(module, self.name, None)
            if not callable(fn):
                # The parent's source check passes names it cannot see (star imports,
                # module __getattr__); say plainly what is missing at run time.
                what = "no" if fn is None else f"a non-callable ({type(fn).__name__})"
                raise TypeError(f"{self.describe()}: the script defines {what} "
                                f"{self.name!r} to call")
            _LOADED[key] = fn
        return fn

    def describe(self) -> str:
        return f"{self.path or self.module}:{self.name}"


class NamedArguments(_Value):
    """The user's function called with keyword arguments named by a header (GNU parallel's
    --header): each input row's columns, in the header's order."""

    __slots__ = ("function", "names")
    function: ScriptFunction
    names: tuple[str, ...]

    def __init__(self, function: ScriptFunction, names: tuple[str, ...]) -> None:
        self.function = function
        self.names = names

    def __call__(self, *values: Any) -> Any:
        if len(values) != len(self.names):
            raise ValueError(f"the row has {len(values)} column(s) and the header "
                             f"{len(self.names)} ({', '.join(self.names)})")
        return self.function.resolve()(**dict(zip(self.names, values)))

    def describe(self) -> str:
        return self.function.describe()


_LOADED: dict[tuple[str | None, str | None, str], Callable[..., Any]] = {}


class WorkerStart(_Value):
    """The initializer of `procqueue map`'s workers: send the script's prints to stderr while
    the records go to stdout, and load the script's function.  A script that fails to import
    then fails the pool's start, once (the pool does not respawn a failing initializer in a
    loop), which the command reports as a usage error with the script's traceback, instead of
    one identical error record per input."""

    __slots__ = ("function", "prints_to_stderr")
    function: ScriptFunction | NamedArguments
    prints_to_stderr: bool

    def __init__(self, function: ScriptFunction | NamedArguments,
                 prints_to_stderr: bool = False) -> None:
        self.function = function
        self.prints_to_stderr = prints_to_stderr

    def __call__(self) -> None:
        if self.prints_to_stderr:
            send_prints_to_stderr()
        target = self.function
        script = target.function if isinstance(target, NamedArguments) else target
        try:
            script.resolve()
        except BaseException as exc:
            # The script's own frames: the loader's and the import machinery's say nothing.
            raise exc.with_traceback(_script_frames(exc.__traceback__))


def _script_frames(tb: Any) -> Any:
    first = tb
    while tb is not None and (tb.tb_frame.f_globals.get("__name__", "") == __name__
                              or tb.tb_frame.f_code.co_filename.startswith("<frozen ")):
        tb = tb.tb_next
    return tb if tb is not None else first


def send_prints_to_stderr() -> None:
    """Worker initializer while the records go to stdout: they own file descriptor 1, so what
    the script prints (at import or per input) goes to stderr instead of into the JSON Lines."""
    if sys.stdout is not None:  # None: the program was started with stdout closed
        sys.stdout.flush()
    try:
        os.dup2(2, 1)
    except OSError:  # stderr closed too: prints go nowhere, as in the program itself
        pass
