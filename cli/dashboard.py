"""`procqueue dashboard STORE`: a live page about a task-queue store, served until Ctrl-C;
and `procqueue map ... --dashboard`: a live page about the batch, served while it runs.

The page is served by procqueue.Dashboard (the standard library's HTTP server, on a thread);
these commands open nothing else: they print the URL, with its token, as Jupyter does.
"""

from __future__ import annotations

import contextlib
import ipaddress
import signal
import threading
from typing import Any, Callable, ContextManager

import click

import procqueue

from .queue import open_queue, store_argument

LOOPBACK_NAMES = ("localhost",)


@click.command("dashboard", short_help="Serve a live page about a store's queues and tasks.")
@store_argument
@click.option("--host", default="127.0.0.1", show_default=True,
              help="The address to listen on.  Anything but loopback lets other machines "
                   "reach the page (they still need the token).")
@click.option("--port", type=click.IntRange(0, 65535), default=0, metavar="N",
              help="The port to listen on [default: a free one].")
def dashboard_command(store: str, host: str, port: int) -> None:
    """Serve a live page about STORE (an SQLite file or a PostgreSQL URL): each queue's
    tasks by status and the limits in use, the worker services, the throughput, the
    failures with their tracebacks, and every task, page by page; Retry and Cancel buttons.
    Every request needs the token printed in the URL.  Ctrl-C stops it."""
    _warn_if_reachable(host, "anyone with the URL can retry and cancel tasks")
    tq = open_queue(store)
    try:
        dashboard = procqueue.Dashboard.for_store(tq, host=host, port=port)
    except OSError as exc:
        tq.close()
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        with dashboard:
            click.echo(f"procqueue dashboard: serving {store}; open this URL (it holds the "
                       f"access token):\n    {dashboard.url}", err=True)
            stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        tq.close()
    click.echo("procqueue dashboard: stopped", err=True)


# ---- map --dashboard ----------------------------------------------------------------------------

def batch_dashboard(title: str, total: int, host: str, port: int) -> procqueue.Dashboard:
    """The dashboard of a `map` run, bound (so a port in use fails before any work) and its
    URL printed; it serves once the pool runs (serving())."""
    _warn_if_reachable(host, "anyone with the URL sees the inputs and errors")
    try:
        dashboard = procqueue.Dashboard.for_batch(total, title, host=host, port=port)
    except OSError as exc:
        raise click.UsageError(f"--dashboard cannot listen on {host}:{port}: "
                               f"{exc.strerror or exc}") from None
    click.echo(f"procqueue: dashboard of this run (the URL holds its access token):\n"
               f"    {dashboard.url}", err=True)
    return dashboard


def feeding(pool_options: dict[str, Any], dashboard: procqueue.Dashboard | None
            ) -> dict[str, Any]:
    """The pool's options with the dashboard listening to its task events too."""
    if dashboard is None:
        return pool_options
    listener: Callable[[Any], None] | None = pool_options.get("on_event")
    feed = dashboard.on_event
    if listener is None:
        return {**pool_options, "on_event": feed}

    def both(event: Any) -> None:
        listener(event)
        feed(event)
    return {**pool_options, "on_event": both}


def serving(dashboard: procqueue.Dashboard | None, pool: Any) -> ContextManager[Any]:
    """Serve the page about ``pool`` while the block runs (nothing without --dashboard)."""
    return contextlib.nullcontext() if dashboard is None else dashboard.watching(pool)


def _warn_if_reachable(host: str, risk: str) -> None:
    if not _is_loopback(host):
        click.echo(f"procqueue: warning: the dashboard listens on {host}: other machines can "
                   f"reach it; {risk}", err=True)


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
