"""`procqueue map ... --dashboard`: a live page about the batch, served while it runs (the
page is procqueue.Dashboard's).  Kept apart from the `dashboard` command (cli/dashboard.py),
whose queue store machinery a `map` run does not need to import."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager

import click

import procqueue

LOOPBACK_NAMES = ("localhost",)


def batch_dashboard(title: str, total: int, host: str, port: int) -> procqueue.Dashboard:
    """The dashboard of a `map` run, bound (so a port in use fails before any work) and its
    URL printed; it serves once the pool runs (serving())."""
    warn_if_reachable(host, "anyone with the URL sees the inputs and errors")
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


def warn_if_reachable(host: str, risk: str) -> None:
    if not _is_loopback(host):
        click.echo(f"procqueue: warning: the dashboard listens on {host}: other machines can "
                   f"reach it; {risk}", err=True)


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    import ipaddress  # only a run with a dashboard checks a host

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
