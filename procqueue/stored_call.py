"""A stored task's function, by reference, and what a worker runs for a stored task.

A durable queue outlives the program that enqueued: its tasks name their function as text,
``module:qualname`` (importable) or ``/abs/path/script.py:qualname`` (a script, imported under
a private name so its ``if __name__ == "__main__":`` block does not run), and each worker
process imports it once.  Arguments and results travel as pickles; the worker pickles the
result itself, so the service stores those bytes without unpickling them.

Light to import: workers load it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pickle
import sys
import zlib
from typing import Any, Callable

from .records import FrozenRecord

PICKLE_PROTOCOL = 5
SCRIPT_MODULE_PREFIX = "_procqueue_script_"  # (protocol.py names a script's classes by it)


class FunctionNotFoundError(LookupError):
    """A stored task's function cannot be loaded (the task fails with this; the service goes on)."""


class FunctionRef(FrozenRecord):
    """``module:qualname`` or ``path.py:qualname``."""

    _fields = __match_args__ = ("target", "qualname")
    target: str  # a module name, or an absolute path ending in .py
    qualname: str

    def __init__(self, target: str, qualname: str) -> None:
        object.__setattr__(self, "target", target)
        object.__setattr__(self, "qualname", qualname)
        if target.endswith(".py"):
            _importable_on_demand(target)

    @classmethod
    def parse(cls, text: str) -> "FunctionRef":
        target, colon, qualname = text.rpartition(":")
        if not colon or not target or not qualname:
            raise ValueError(f"a function reference looks like module:function or "
                             f"path/to/script.py:function, not {text!r}")
        if target.endswith(".py"):
            target = os.path.abspath(target)
        return cls(target, qualname)

    @classmethod
    def of(cls, fn: "Callable[..., Any] | str") -> "FunctionRef":
        """The reference of a function defined at a module's top level (or a class's)."""
        if isinstance(fn, str):
            return cls.parse(fn)
        module = getattr(fn, "__module__", None)
        qualname = getattr(fn, "__qualname__", None)
        if not module or not qualname or "<" in qualname:
            raise ValueError(f"{fn!r} cannot be stored by reference: a queued function must be "
                             f"defined at the top level of a module or script (not a lambda "
                             f"or a nested function)")
        if module == "__main__":
            main_file = getattr(sys.modules.get("__main__"), "__file__", None)
            if not main_file:
                raise ValueError(f"{fn!r} is defined in an interactive session: define it in a "
                                 f"module or script file to enqueue it")
            ref = cls(os.path.abspath(main_file), qualname)
        else:
            ref = cls(module, qualname)
        if module != "__main__" and _lookup(importlib.import_module(module), qualname) is not fn:
            raise ValueError(f"{fn!r} is not reachable as {ref}: enqueue a function by the name "
                             f"it has in its module")
        return ref

    def __str__(self) -> str:
        return f"{self.target}:{self.qualname}"

    def resolve(self) -> Callable[..., Any]:
        """The function, imported once per process."""
        key = str(self)
        fn = _LOADED.get(key)
        if fn is None:
            fn = self._load()
            _LOADED[key] = fn
        return fn

    def module(self) -> Any:
        """Import the script or module (once per process); its own exceptions propagate."""
        if self.target.endswith(".py"):
            return _import_script(self.target)
        return importlib.import_module(self.target)

    def _load(self) -> Callable[..., Any]:
        try:
            module = self.module()
        except FunctionNotFoundError:
            raise
        except Exception as exc:
            raise FunctionNotFoundError(f"cannot import {self.target} for {self}: "
                                        f"{type(exc).__name__}: {exc}") from exc
        fn = _lookup(module, self.qualname)
        if not callable(fn):
            what = "nothing" if fn is None else f"a non-callable {type(fn).__name__}"
            raise FunctionNotFoundError(f"{self}: {self.target} defines {what} named "
                                        f"{self.qualname!r}")
        return fn  # type: ignore[no-any-return]


_LOADED: dict[str, Callable[..., Any]] = {}


def _lookup(module: Any, qualname: str) -> Any:
    value = module
    for part in qualname.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value


def _script_module_name(path: str) -> str:
    return f"{SCRIPT_MODULE_PREFIX}{zlib.crc32(path.encode()):08x}"


_SCRIPTS: dict[str, str] = {}  # a script's private module name -> its path (_ScriptFinder)


class _ScriptFinder:
    """Finds a script's private module by its name, for a process that made a FunctionRef to
    it but never ran it: a result whose class the script defines (a dataclass) is pickled by
    that name in the worker, and unpickling it here imports the script then, once, instead of
    failing with "No module named '_procqueue_script_...'"."""

    @staticmethod
    def find_spec(name: str, path: Any = None, target: Any = None) -> Any:
        script = _SCRIPTS.get(name)
        if script is None or not os.path.isfile(script):
            return None
        directory = os.path.dirname(script)
        if directory not in sys.path:
            sys.path.insert(0, directory)  # the script may import its neighbours
        return importlib.util.spec_from_file_location(name, script)


def _importable_on_demand(path: str) -> None:
    """Let `path`'s private module be imported by name in this process (see _ScriptFinder)."""
    name = _script_module_name(path)
    if name in _SCRIPTS:
        return
    if not _SCRIPTS:
        sys.meta_path.append(_ScriptFinder)
    _SCRIPTS[name] = path


def _import_script(path: str) -> Any:
    if not os.path.isfile(path):
        raise FunctionNotFoundError(f"no such script: {path}")
    name = _script_module_name(path)
    if name in sys.modules:
        return sys.modules[name]
    directory = os.path.dirname(path)
    if directory not in sys.path:
        sys.path.insert(0, directory)  # the script may import its neighbours
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise FunctionNotFoundError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def pack_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    return pickle.dumps((args, kwargs), PICKLE_PROTOCOL)


def call_stored(function: str, payload: bytes, task_id: int | None = None) -> bytes:
    """Run a stored task in a worker: its function on its arguments; the result's pickle.
    ``task_id`` is not used here: it travels with the call so that the pool's statistics
    show which stored task each worker runs (service.py's report of its workers)."""
    fn = _LOADED.get(function) or FunctionRef.parse(function).resolve()
    args, kwargs = pickle.loads(payload)
    result = fn(*args, **kwargs)
    try:
        return pickle.dumps(result, PICKLE_PROTOCOL)
    except Exception as exc:
        raise TypeError(f"the result of {function} cannot be stored: it does not pickle "
                        f"({type(exc).__name__}: {exc})") from exc
