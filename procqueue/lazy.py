"""Names a package exports without importing their modules until first used (PEP 562), so
`import procqueue` (and its limits, and the Dask backend) costs only what a program uses."""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping


def lazy_getattr(module_globals: dict[str, Any], homes: Mapping[str, str]
                 ) -> Callable[[str], object]:
    """The module's __getattr__: `name` is imported from its submodule `homes[name]` (relative
    to the package) at its first use, then kept in the module's globals."""
    package = module_globals["__name__"]

    def __getattr__(name: str) -> object:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{home}", package), name)
        module_globals[name] = value
        return value

    return __getattr__
