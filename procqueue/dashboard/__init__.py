"""A live dashboard: a page served on a local port, updated as a store's tasks (or a pool's
batch) run.

    with procqueue.Dashboard.for_store("jobs.db") as dash:    # or a TaskQueue
        print(dash.url)          # http://127.0.0.1:PORT/?token=...: every request needs it
        ...                      # serves on a thread until the block ends

    guard.py       who may use it: the token, the Host header, the Origin of actions
    server.py      the HTTP server (standard library), its routes, the event stream
    broadcast.py   one sampler for every open page, paced by what a snapshot costs
    store_view.py  what it shows of a store (bounded reads) and its actions (retry, cancel)
    page.py        the page: page.html, page.css and page.js, served as one document
"""

from __future__ import annotations

from typing import Any

from ..taskqueue import TaskQueue
from .server import DashboardServer
from .store_view import StoreView

__all__ = ["Dashboard", "DashboardServer", "StoreView"]


class Dashboard(DashboardServer):
    """A live page about a source (a store, a pool's batch), served on ``host``:``port``
    (127.0.0.1 and a free port by default) from start() to close(); ``url`` carries the
    random token every request needs.  Build it with for_store()."""

    @classmethod
    def for_store(cls, store: TaskQueue | str, **options: Any) -> "Dashboard":
        """A dashboard of a task-queue store: a TaskQueue (left open at close()) or a store's
        target, an SQLite file or a PostgreSQL URL (opened here, never created, and closed
        with the dashboard).  ``options``: host, port, token, refresh_s."""
        view = StoreView(store)
        try:
            return cls(view, **options)
        except BaseException:
            view.close()
            raise
