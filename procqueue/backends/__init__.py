"""Backends that run a Pool's tasks somewhere other than local worker processes.

Each backend module is imported only when a pool asks for it (``Pool(backend="dask")``), so
its third-party dependencies (Dask distributed) stay optional extras.
"""

from __future__ import annotations

__all__: list[str] = []
