"""`procqueue limits`: the named limits on this machine (what `--limit NAME=...` and
procqueue.Limit leave in /dev/shm), how full they are and who holds them; `--remove NAME`
deletes one.  Everything is read through procqueue.named_limits(): no raw shared memory here."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import click

import procqueue

EXIT_IN_USE = 1  # --remove refused: live processes hold the limit's permits
EXIT_NO_SUCH_LIMIT = 2  # the usage-error code: NAME names nothing

COLUMNS = ("NAME", "KIND", "CAPACITY", "IN USE", "HOLDERS")


class NoSuchLimit(click.ClickException):
    exit_code = EXIT_NO_SUCH_LIMIT


class LimitInUse(click.ClickException):
    exit_code = EXIT_IN_USE


@click.command("limits", short_help="List or remove the named limits in /dev/shm.")
@click.option("--remove", metavar="NAME", default=None,
              help="Remove the named limit NAME (its concurrency and rate files) instead of "
                   "listing; refused while a live process holds one of its permits "
                   "[default: none: list every limit].")
@click.option("--force", is_flag=True,
              help="With --remove: remove NAME even while live processes hold its permits "
                   "(programs that have it open keep the old limit, programs started later "
                   "get a fresh one) [default: off].")
@click.option("--json", "as_json", is_flag=True,
              help="List as JSON: one object per limit and kind, times in seconds "
                   "[default: off: a table].")
def limits_command(remove: str | None, force: bool, as_json: bool) -> None:
    """List the named limits of this user on this machine: NAME, KIND (concurrency or
    rate), CAPACITY (permits; for a rate, starts per window in seconds), IN USE (permits
    held; for a rate, starts in the current window) and HOLDERS (the pid holding each
    permit; a holder that exited is shown as such, and its permit freed).  A Limit's rate
    window is 20 ms longer than its period: starts are counted as tasks are handed out."""
    if force and remove is None:
        raise click.UsageError("--force goes with --remove NAME")
    if remove is not None:
        _remove(remove, force)
        return
    rows = _rows(procqueue.named_limits())
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    elif rows:
        click.echo(_table(rows))
    else:
        click.echo("no named limits")


def _rows(limits: list[Any]) -> list[dict[str, Any]]:
    """One row per part of each limit: its semaphore ("concurrency"), its rate gate ("rate")."""
    rows: list[dict[str, Any]] = []
    for limit in limits:
        semaphore, gate = limit.semaphore, limit.rate_gate
        if semaphore is not None:
            holders = [{"pid": pid, "alive": True} for pid in semaphore.holders]
            holders += [{"pid": pid, "alive": False} for pid in semaphore.reclaimed]
            rows.append({"name": limit.name, "kind": "concurrency", "capacity": semaphore.value,
                         "in_use": semaphore.held, "holders": holders})
        if gate is not None:
            rows.append({"name": limit.name, "kind": "rate", "capacity": gate.limit,
                         "window_s": gate.period_s, "in_use": gate.starts_in_window,
                         "wait_s": gate.wait_s, "holders": []})
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    cells = [COLUMNS] + [(row["name"], row["kind"], _capacity(row), str(row["in_use"]),
                          _holders(row["holders"])) for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()
                     for line in cells)


def _capacity(row: dict[str, Any]) -> str:
    if row["kind"] == "rate":  # as --rate and --limit write it
        return f"{row['capacity']}/{row['window_s']:g}s"
    return str(row["capacity"])


def _holders(holders: list[dict[str, Any]]) -> str:
    """'4242, 4243 x2, 4250 (exited: freed)': a pid once however many permits it holds."""
    counts = Counter((h["pid"], h["alive"]) for h in holders)
    parts = []
    for (pid, alive), count in counts.items():
        text = f"{pid} x{count}" if count > 1 else str(pid)
        parts.append(text if alive else f"{text} (exited: freed)")
    return ", ".join(parts) or "-"


def _remove(name: str, force: bool) -> None:
    found = [limit for limit in procqueue.named_limits() if limit.name == name]
    if not found:
        raise NoSuchLimit(f"no named limit {name!r} (procqueue limits lists them)")
    semaphore = found[0].semaphore
    live = sorted(set(semaphore.holders)) if semaphore is not None else []
    if live and not force:
        # Programs holding it would keep counting on the old permits while new ones got a
        # fresh set: for a while the limit would allow twice its capacity.
        raise LimitInUse(f"limit {name!r} is held by pid(s) {', '.join(map(str, live))}: stop "
                         "them first, or add --force")
    procqueue.Limit.unlink_name(name)
    click.echo(f"removed limit {name!r}", err=True)
