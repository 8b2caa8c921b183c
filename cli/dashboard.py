"""`procqueue dashboard STORE`: a live page about a task-queue store, served until Ctrl-C
(`procqueue map ... --dashboard`, the page about a batch: cli/batch_dashboard.py).

The page is served by procqueue.Dashboard (the standard library's HTTP server, on a thread);
these commands open nothing else: they print the URL, with its token, as Jupyter does.
"""

from __future__ import annotations

import signal
import threading

import click

import procqueue

from .batch_dashboard import warn_if_reachable
from .queue import open_queue, store_argument


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
    warn_if_reachable(host, "anyone with the URL can retry and cancel tasks")
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
            click.echo(f"procqueue dashboard: serving {procqueue.TaskQueue.shown_target(store)}; "
                       f"open this URL (it holds the "
                       f"access token):\n    {dashboard.url}", err=True)
            stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        tq.close()
    click.echo("procqueue dashboard: stopped", err=True)
