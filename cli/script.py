"""Find the user's function without running their script in the parent, and load it in each
worker once.

SCRIPT is a path to a Python file (its `if __name__ == "__main__":` block never runs: it is
imported under another name) or `module:function`.  The parent only parses the file (ast), so
a missing function or a syntax error is reported at once, exit code 2, before any worker
starts; each worker imports the script the first time it runs one of its inputs.
"""

from __future__ import annotations

import ast
import enum
import importlib
import importlib.util
import os
from typing import Any, cast

import click

import procqueue

from .loader import ScriptFunction as ScriptFunction


class ScriptError(click.ClickException):
    """The script or function cannot be used (exit code 2, like a usage error)."""

    exit_code = 2


def function_identity(fn: ScriptFunction) -> str:
    """Changes when the script's code or the function name changes (journal checks): the
    script's syntax tree, so a comment, a blank line or a moved function is no change."""
    return _identity(_syntax_tree(_source_of(fn)), fn)


def format_1_function_identity(fn: ScriptFunction) -> str:
    """function_identity as procqueue computed it before, from the script's bytes: a journal
    stamped with it is this script's if its bytes are unchanged (Journal.open's
    former_identities)."""
    return _identity(_source_of(fn), fn)


def _identity(code: bytes, fn: ScriptFunction) -> str:
    import hashlib  # only with a journal: not on every run's start

    return hashlib.sha256(code + b"\0" + fn.describe().encode()).hexdigest()


def _source_of(fn: ScriptFunction) -> bytes:
    if fn.path:
        return _read_bytes(fn.path)
    spec = importlib.util.find_spec(fn.module or "")
    origin = spec.origin if spec else None
    return _read_bytes(origin) if origin and os.path.isfile(origin) else b""


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _syntax_tree(source: bytes) -> bytes:
    """The code of a Python source, without comments, layout or line numbers (a compiled
    module's bytes are kept as they are)."""
    try:
        return ast.dump(ast.parse(source)).encode()
    except (SyntaxError, ValueError):
        return source


def resolve_script(script: str, fn_name: str | None) -> ScriptFunction:
    """Check SCRIPT and the function in the parent, without executing the script.  SCRIPT is
    a file (`job.py`), a file and its function (`job.py:score`) or `module:function`."""
    if os.path.isfile(script):
        name = fn_name or "process"
        _check_source_defines(script, name)
        return _file_function(name, script)
    head, colon, tail = script.rpartition(":")
    if colon and os.path.isfile(head):  # job.py:score
        name = fn_name or tail or "process"
        _check_source_defines(head, name)
        return _file_function(name, head)
    if colon and not head.endswith(".py") and head:
        name = fn_name or tail or "process"
        _check_module_defines(head, name)
        return ScriptFunction(name, module=head)
    if os.path.exists(script) or (colon and os.path.exists(head)):
        raise ScriptError(f"script {script!r} is not a file")
    raise ScriptError(f"script not found: {script!r} (give a path to a .py file, "
                      f"file.py:function or module:function)")


def _file_function(name: str, script: str) -> ScriptFunction:
    path = os.path.realpath(script)
    # A FunctionRef made here lets this process import the script by the private name the
    # workers import it under, when a result's class (a dataclass) comes from it: the record
    # then says the result is not JSON, not that a module could not be found.
    procqueue.FunctionRef(path, name)
    return ScriptFunction(name, path=path)


def check_arguments(fn: ScriptFunction, count: int, given: str | None = None) -> None:
    """Usage error if the script's function cannot take `count` positional arguments (one
    per input source, or what `given` says gives them), as far as its source shows: a plain
    top-level `def` without decorators; anything else is left to the call (its error goes
    into each record)."""
    args = _plain_def_arguments(fn)
    if args is None:
        return
    positional = len(args.posonlyargs) + len(args.args)
    required = positional - len(args.defaults)
    if required <= count and (args.vararg is not None or count <= positional):
        return
    takes = f"{required}" if required == positional and args.vararg is None else (
        f"{required} or more" if args.vararg is not None else f"{required} to {positional}")
    if given is None:
        given = ("one input source gives it" if count == 1 else
                 f"{count} input sources give it") + " {count} per call (each ::: or :::: " \
            "starts another input source, as in GNU parallel)"
    raise ScriptError(f"{fn.describe()} takes {takes} positional argument"
                      f"{'' if takes == '1' else 's'}, but {given.format(count=count)}")


def check_keyword_arguments(fn: ScriptFunction, names: tuple[str, ...]) -> None:
    """Usage error if the script's plain `def` cannot take these keyword arguments (--header)
    or needs one they do not give."""
    args = _plain_def_arguments(fn)
    if args is None:
        return
    named = [a.arg for a in args.args] + [a.arg for a in args.kwonlyargs]
    unknown = [n for n in names if n not in named] if args.kwarg is None else []
    required = [a.arg for a in args.args[:len(args.args) - len(args.defaults)]] + [
        a.arg for a, default in zip(args.kwonlyargs, args.kw_defaults) if default is None]
    missing = [n for n in required if n not in names]
    posonly_defaults = max(0, len(args.defaults) - len(args.args))
    missing = [a.arg for a in args.posonlyargs[:len(args.posonlyargs) - posonly_defaults]] \
        + missing  # a positional-only parameter without a default: no keyword can fill it
    if unknown or missing:
        why = "; ".join(part for part in (
            f"it takes no {', '.join(map(repr, unknown))}" if unknown else "",
            f"it needs {', '.join(map(repr, missing))}" if missing else "") if part)
        raise ScriptError(f"{fn.describe()} cannot take the header's columns "
                          f"({', '.join(names)}) as keyword arguments: {why}")


def _plain_def_arguments(fn: ScriptFunction) -> ast.arguments | None:
    """The parameters of the script's function when its source shows them for sure: a plain
    top-level `def`, the name's only binding, no decorators; else None."""
    if fn.path is None:
        return None
    try:
        tree = ast.parse(_read_bytes(fn.path), filename=fn.path)
    except (OSError, SyntaxError, ValueError):
        return None  # checked before: cannot happen unless the file changed meanwhile
    bindings = [node for node in tree.body if fn.name in _names_bound_by(node)]
    plain_def = len(bindings) == 1 and isinstance(bindings[0], ast.FunctionDef) \
        and not bindings[0].decorator_list and not TopLevelNames.of(tree).dynamic
    if not plain_def:
        return None
    return cast(ast.FunctionDef, bindings[0]).args


def _names_bound_by(node: ast.stmt) -> set[str]:
    """Names a top-level statement may bind (for check_arguments: is one `def` the only
    binding?).  Inside if/try/with blocks every def, class, import and assignment counts,
    nested ones too: more than binds, so a doubtful case is left to the call."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    names: set[str] = set()
    for inner in ast.walk(node):
        if isinstance(inner, ast.Name) and isinstance(inner.ctx, ast.Store):
            names.add(inner.id)
        elif isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(inner.name)
        elif isinstance(inner, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in inner.names)
    return names


def _check_source_defines(path: str, name: str) -> None:
    try:
        tree = ast.parse(_read_bytes(path), filename=path)
    except SyntaxError as exc:
        where = f"{exc.filename or path}:{exc.lineno}" if exc.lineno else str(path)
        raise ScriptError(f"syntax error in the script at {where}: {exc.msg}") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ScriptError(f"cannot read script {path}: {exc}") from None
    names = TopLevelNames.of(tree)
    kind = names.bound.get(name)
    if kind is None and not names.dynamic:
        callables = sorted(n for n, k in names.bound.items() if k is not Binding.VALUE)
        listing = ", ".join(callables) if callables else "none"
        raise ScriptError(f"{path} has no top-level function {name!r}; its top-level "
                          f"callables: {listing} (choose one with --fn NAME)")
    if kind is Binding.VALUE:
        raise ScriptError(f"{name!r} in {path} is not a function (it is bound to a value at "
                          f"module level); choose a function with --fn NAME")


class Binding(enum.Enum):
    """What a top-level name is bound to, as far as the source shows."""

    CALLABLE = "def, class, lambda or from-import"
    UNKNOWN = "the result of an expression (may be callable)"
    VALUE = "a literal, a display or a module: never callable"


# Statements whose bodies still run at module level: a `def` under `try:`/`if` is top-level.
_BLOCK_FIELDS = ("body", "orelse", "finalbody", "handlers", "cases")
_LITERALS = (ast.Constant, ast.List, ast.Tuple, ast.Set, ast.Dict, ast.ListComp, ast.SetComp,
             ast.DictComp, ast.GeneratorExp, ast.JoinedStr, ast.BinOp, ast.Compare)


class TopLevelNames:
    """The names a module binds at top level, and whether it may bind others we cannot see
    (`from x import *`, a module `__getattr__`, `globals()[...] = ...`)."""

    def __init__(self) -> None:
        self.bound: dict[str, Binding] = {}
        self.dynamic = False

    @classmethod
    def of(cls, tree: ast.Module) -> TopLevelNames:
        names = cls()
        names._visit(tree.body)
        return names

    def _bind(self, name: str, kind: Binding) -> None:
        # Alternatives (try/except, if/else): the most callable one decides.
        order = (Binding.VALUE, Binding.UNKNOWN, Binding.CALLABLE)
        previous = self.bound.get(name, Binding.VALUE)
        self.bound[name] = max(previous, kind, key=order.index)

    def _visit(self, statements: list[Any]) -> None:
        for node in statements:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                self._bind(node.name, Binding.CALLABLE)
                self.dynamic |= node.name == "__getattr__"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    self._bind((alias.asname or alias.name).split(".")[0], Binding.VALUE)
            elif isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if alias.name == "*":
                        self.dynamic = True
                    else:
                        self._bind(alias.asname or alias.name, Binding.CALLABLE)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                self._visit_assignment(node)
            else:
                self.dynamic |= "globals" in {getattr(n, "id", None) for n in ast.walk(node)}
                for field in _BLOCK_FIELDS:
                    self._visit(_statements_of(getattr(node, field, None) or []))

    def _visit_assignment(self, node: ast.Assign | ast.AnnAssign) -> None:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        if node.value is None:  # `x: int` binds nothing
            return
        if isinstance(node.value, ast.Lambda):
            kind = Binding.CALLABLE
        elif isinstance(node.value, _LITERALS):
            kind = Binding.VALUE
        else:
            kind = Binding.UNKNOWN
        for target in targets:
            if isinstance(target, ast.Name):
                self._bind(target.id, kind)
            elif isinstance(target, ast.Subscript):  # globals()["f"] = ...
                self.dynamic |= "globals" in {getattr(n, "id", None) for n in ast.walk(target)}
            else:  # a, b = ...
                for element in ast.walk(target):
                    if isinstance(element, ast.Name):
                        self._bind(element.id, Binding.UNKNOWN)


def _statements_of(block: list[Any]) -> list[Any]:
    """The statements of a block: except handlers and match cases hold theirs in .body."""
    statements: list[Any] = []
    for item in block:
        if isinstance(item, (ast.ExceptHandler, ast.match_case)):
            statements += item.body
        else:
            statements.append(item)
    return statements


def _check_module_defines(module: str, name: str) -> None:
    """find_spec (which imports the parent packages, not the module), then the same source
    check as for a file when the module is a plain .py file."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError) as exc:
        raise ScriptError(f"cannot find module {module!r}: {exc}") from None
    if spec is None:
        raise ScriptError(f"cannot find module {module!r}")
    if spec.origin and spec.origin.endswith(".py") and os.path.isfile(spec.origin):
        _check_source_defines(spec.origin, name)
