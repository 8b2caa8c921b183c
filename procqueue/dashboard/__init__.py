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

import contextlib
from typing import Any, Iterator

from ..stats import TaskEvent
from ..taskqueue import TaskQueue
from .batch_view import BatchView, WatchedPool
from .server import DashboardServer
from .store_view import StoreView

__all__ = ["Dashboard", "DashboardServer", "StoreView", "BatchView"]

BATCH_REFRESH_S = 3.0  # a batch's page updates every 3 s (a store's: every second); each update
# costs the browser CPU (~40 ms, measured in headless Chromium) that a CPU-bound batch gives up


class Dashboard(DashboardServer):
    """A live page about a source (a store, a pool's batch), served on ``host``:``port``
    (127.0.0.1 and a free port by default) from start() to close(); ``url`` carries the
    random token every request needs.  Build it with for_store() or for_batch()."""

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

    @classmethod
    def for_batch(cls, total: int | None = None, title: str = "procqueue batch",
                  refresh_s: float = BATCH_REFRESH_S, **options: Any) -> "Dashboard":
        """A dashboard of the batch a pool runs: give its on_event to the Pool, then serve
        while the pool runs with watching(pool)::

            dash = Dashboard.for_batch(total=len(inputs))
            with Pool(4, on_event=dash.on_event) as pool, dash.watching(pool):
                print(dash.url)
                pool.map(work, inputs)

        ``total``: the inputs the batch has, if known (the page shows done / total).
        ``refresh_s``: seconds between updates; each costs the browser showing the page some
        CPU, which a CPU-bound batch on the same machine gives up (bench/dashboard_overhead.py),
        hence a slower pace than a store's page."""
        return cls(BatchView(total, title), refresh_s=refresh_s, **options)

    def on_event(self, event: TaskEvent) -> None:
        """For Pool(on_event=...): a batch dashboard's feed (for_batch)."""
        if not isinstance(self.source, BatchView):
            raise TypeError("on_event feeds a batch dashboard (Dashboard.for_batch)")
        self.source.on_event(event)

    @contextlib.contextmanager
    def watching(self, pool: WatchedPool) -> Iterator["Dashboard"]:
        """Serve the page about ``pool`` for the block's duration (a batch dashboard)."""
        if not isinstance(self.source, BatchView):
            raise TypeError("watching(pool) is for a batch dashboard (Dashboard.for_batch)")
        self.source.attach(pool)
        with self:
            yield self
