"""Find the user's function without running their script in the parent, and load it in each
worker once.

SCRIPT is a path to a Python file (its `if __name__ == "__main__":` block never runs: it is
imported under another name) or `module:function`.  The parent only parses the file (ast), so
a missing function or a syntax error is reported at once, exit code 2, before any worker
starts; each worker imports the script the first time it runs one of its inputs.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import click


class ScriptError(click.ClickException):
    """The script or function cannot be used (exit code 2, like a usage error)."""

    exit_code = 2


@dataclass(frozen=True)
class ScriptFunction:
    """A picklable reference to the user's function: `path` (a file) or `module`, and the
    function's name.  Calling it loads the script once per process, then calls the function."""

    name: str
    path: str | None = None
    module: str | None = None

    def __call__(self, item: Any) -> Any:
        return self.resolve()(item)

    def resolve(self) -> Callable[[Any], Any]:
        key = (self.path, self.module, self.name)
        fn = _LOADED.get(key)
        if fn is None:
            module = _import_file(self.path) if self.path else importlib.import_module(
                self.module or "")
            fn = getattr(module, self.name)
            _LOADED[key] = fn
        return fn

    def describe(self) -> str:
        return f"{self.path or self.module}:{self.name}"


_LOADED: dict[tuple[str | None, str | None, str], Callable[[Any], Any]] = {}


def _import_file(path: str) -> Any:
    """Import a script by path under a private module name (so __name__ != "__main__")."""
    name = "_user_script_" + hashlib.sha1(path.encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    directory = str(Path(path).parent)
    if directory not in sys.path:
        sys.path.insert(0, directory)  # the script may import its neighbours
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def function_identity(fn: ScriptFunction) -> str:
    """Changes when the script's source or the function name changes (journal checks)."""
    if fn.path:
        source = Path(fn.path).read_bytes()
    else:
        spec = importlib.util.find_spec(fn.module or "")
        origin = spec.origin if spec else None
        source = Path(origin).read_bytes() if origin and Path(origin).is_file() else b""
    return hashlib.sha256(source + b"\0" + fn.describe().encode()).hexdigest()


def resolve_script(script: str, fn_name: str | None) -> ScriptFunction:
    """Check SCRIPT and the function in the parent, without executing the script."""
    path = Path(script)
    if path.is_file():
        name = fn_name or "process"
        _check_file_defines(path, name)
        return ScriptFunction(name, path=str(path.resolve()))
    if ":" in script and not path.suffix == ".py":
        module, _, name = script.partition(":")
        name = fn_name or name or "process"
        _check_module(module)
        return ScriptFunction(name, module=module)
    if path.exists():
        raise ScriptError(f"script {script!r} is not a file")
    raise ScriptError(f"script not found: {script!r} (give a path to a .py file or "
                      f"module:function)")


def _check_file_defines(path: Path, name: str) -> None:
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except SyntaxError as exc:
        raise ScriptError(f"syntax error in {path}, line {exc.lineno}: {exc.msg}") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ScriptError(f"cannot read script {path}: {exc}") from None
    defined = _top_level_names(tree)
    if name not in defined:
        callables = sorted(n for n, is_callable in defined.items() if is_callable)
        listing = ", ".join(callables) if callables else "none"
        raise ScriptError(f"{path} has no top-level function {name!r}; its top-level "
                          f"callables: {listing} (choose one with --fn NAME)")


def _top_level_names(tree: ast.Module) -> dict[str, bool]:
    """Top-level names -> whether they are (probably) callable: defs, classes, lambdas,
    imports."""
    names: dict[str, bool] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = True
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                names[(alias.asname or alias.name).split(".")[0]] = True
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            value_callable = isinstance(node.value, (ast.Lambda, ast.Call, ast.Name,
                                                     ast.Attribute))
            for target in targets:
                if isinstance(target, ast.Name):
                    names[target.id] = value_callable
    return names


def _check_module(module: str) -> None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError) as exc:
        raise ScriptError(f"cannot find module {module!r}: {exc}") from None
    if spec is None:
        raise ScriptError(f"cannot find module {module!r}")
