"""What code a function runs, as bytes to hash: the journal's check that a resumed run runs
the same function (journal.function_identity).

The fingerprint is the function pickled as cloudpickle pickles it for the workers, with two
things made stable:

- code objects are reduced to what runs (bytecode, constants, names, argument counts), without
  their line numbers and file name: a comment, a blank line or a function moved down the file
  is no change, a changed expression is;
- a class the script defines (cloudpickle copies it by value, under a tracker id drawn at random
  in each process) is reduced to its name, bases and attributes, so a function that uses one
  has the same fingerprint in every run.

A function pickled by reference (a module on the path) carries no code: its fingerprint adds the
module's source as its syntax tree (ast.dump: comments and layout left out).  Anything the
fingerprint cannot pickle falls back to the function's reference plus that source.
"""

from __future__ import annotations

import ast
import io
import pickle
import sys
import types
from collections import ChainMap
from typing import Any

from .protocol import PICKLE_PROTOCOL

# Class attributes that are the interpreter's bookkeeping, not the class's code.
_CLASS_BOOKKEEPING = frozenset({"__dict__", "__weakref__", "_abc_impl", "__slotnames__"})


def fingerprint(fn: Any) -> bytes:
    """Bytes that change when, and only when, the code `fn` runs changes (module docstring)."""
    try:
        pickled, carries_code = _stable_pickle(fn)
    except Exception:  # e.g. a bound method of an object holding a lock: name it
        pickled, carries_code = _reference_of(fn), False
    if carries_code:
        return pickled
    return pickled + b"\0" + module_source_tree(getattr(fn, "__module__", None))


def source_tree(source: bytes) -> bytes:
    """A Python source as its syntax tree, without comments, layout or line numbers; the
    bytes themselves if they do not parse."""
    try:
        return ast.dump(ast.parse(source)).encode("utf-8")
    except (SyntaxError, ValueError):
        return source


def module_source_tree(module_name: str | None) -> bytes:
    """source_tree() of a loaded module's .py file; b"" when it has none."""
    path = getattr(sys.modules.get(module_name or ""), "__file__", None)
    if not path or not path.endswith(".py"):
        return b""
    try:
        with open(path, "rb") as f:
            return source_tree(f.read())
    except OSError:
        return b""


def _stable_pickle(fn: Any) -> tuple[bytes, bool]:
    """The pickle of `fn` with stable code objects and classes, and whether it holds code."""
    import cloudpickle  # imported here: only a journaled run needs it in this process

    class StablePickler(cloudpickle.Pickler):  # type: ignore[misc]
        def __init__(self, file: io.BytesIO) -> None:
            # read by the C pickler when it is made: set before
            self.dispatch_table = ChainMap({types.CodeType: self._reduce_code},
                                           cloudpickle.Pickler.dispatch_table)
            super().__init__(file, protocol=PICKLE_PROTOCOL)
            self.carries_code = False
            self._expanded: set[int] = set()

        def _reduce_code(self, code: types.CodeType) -> tuple[Any, ...]:
            self.carries_code = True
            return _never_loaded, _code_parts(code)

        def persistent_id(self, obj: Any) -> Any:
            if not isinstance(obj, type) or _by_reference(obj):
                return None
            if id(obj) in self._expanded:  # a method that names its own class: no loop
                return ("class", obj.__module__, obj.__qualname__)
            self._expanded.add(id(obj))
            return ("class", obj.__module__, obj.__qualname__, obj.__bases__,
                    _class_attributes(obj))

    buffer = io.BytesIO()
    pickler = StablePickler(buffer)
    pickler.dump(fn)
    return buffer.getvalue(), pickler.carries_code


def _code_parts(code: types.CodeType) -> tuple[Any, ...]:
    """What of a code object runs: no line table, first line or file name.  (co_qualname and
    co_exceptiontable are Python 3.11's.)"""
    return (code.co_name, getattr(code, "co_qualname", code.co_name), code.co_argcount,
            code.co_posonlyargcount, code.co_kwonlyargcount, code.co_flags, code.co_code,
            code.co_consts, code.co_names, code.co_varnames, code.co_freevars,
            code.co_cellvars, getattr(code, "co_exceptiontable", b""))


def _class_attributes(cls: type) -> tuple[tuple[str, Any], ...]:
    """A class's own attributes by name; slot and attribute descriptors by their name only."""
    items = []
    for name, value in sorted(vars(cls).items()):
        if name in _CLASS_BOOKKEEPING:
            continue
        if isinstance(value, (types.MemberDescriptorType, types.GetSetDescriptorType)):
            value = f"<descriptor {name}>"
        items.append((name, value))
    return tuple(items)


def _by_reference(obj: Any) -> bool:
    """Whether cloudpickle names `obj` (its module is importable and holds it under its
    qualified name) rather than copying it; a script's (`__main__`) are copied."""
    module_name = getattr(obj, "__module__", None)
    if module_name in (None, "__main__", "__mp_main__"):
        return False
    target: Any = sys.modules.get(module_name)
    for part in getattr(obj, "__qualname__", "<none>").split("."):
        target = getattr(target, part, None)
    return target is obj


def _reference_of(fn: Any) -> bytes:
    name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
    return name.encode("utf-8")


def _never_loaded(*parts: Any) -> None:
    """The stand-in constructor of a fingerprinted code object: fingerprints are hashed,
    never unpickled."""
    raise pickle.UnpicklingError("a code fingerprint is not a pickle to load")
