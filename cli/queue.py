"""The durable queue commands: `procqueue worker | enqueue | define | status | result | cancel |
retry | prune STORE ...`.  STORE is an SQLite file (created on first use) or a PostgreSQL URL.
Everything goes through procqueue.TaskQueue and Pool.serve: nothing here touches the store.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import time
from typing import Any, Iterator

import click

import procqueue

from .inputs import collect_inputs
from .script import check_arguments, resolve_script

EXIT_TASK_FAILED = 1  # `result`: the task failed or was cancelled
EXIT_USAGE = 2  # a store that cannot be used, an unknown id
_DURATION = re.compile(r"(\d+(?:\.\d*)?)\s*([smhdw]?)")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class StoreUnusable(click.ClickException):
    exit_code = EXIT_USAGE


class UnknownTask(click.ClickException):
    exit_code = EXIT_USAGE


def open_queue(store: str, create: bool = False) -> procqueue.TaskQueue:
    """The store's TaskQueue; only the commands that add to a store create it."""
    try:
        return procqueue.TaskQueue(store, create=create)
    except (procqueue.StoreError, OSError, ImportError) as exc:
        shown = procqueue.TaskQueue.shown_target(store)  # (a URL's password is not shown)
        text = str(exc).replace(store, shown)
        raise StoreUnusable(text if shown in text else f"{shown}: {text}") from None


def parse_duration(text: str) -> float:
    """'90', '90s', '15m', '12h', '7d', '2w' -> seconds."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise click.BadParameter(f"{text!r} is not a duration like 90s, 15m, 12h, 7d or 2w")
    return float(match.group(1)) * _SECONDS[match.group(2)]


store_argument = click.argument("store", metavar="STORE")


@click.command("worker", short_help="Run a worker service: run a store's queued tasks.")
@store_argument
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=None, metavar="N",
              help="Worker processes [default: one per usable CPU].")
@click.option("--queue", "queues", multiple=True, metavar="NAME",
              help="Serve this queue (repeatable) [default: every queue of the store].")
@click.option("--until-idle", is_flag=True,
              help="Exit once the served queues have no pending task and none runs here "
                   "[default: serve until Ctrl-C or SIGTERM].")
@click.option("--no-pin", is_flag=True, help="Do not pin workers to CPUs [default: pinned].")
@click.option("--max-tasks-per-child", type=click.IntRange(min=1), default=None, metavar="N",
              help="Replace a worker process after N tasks [default: never].")
def worker_command(store: str, jobs: int | None, queues: tuple[str, ...], until_idle: bool,
                   no_pin: bool, max_tasks_per_child: int | None) -> None:
    """Run the tasks queued in STORE on a pool of worker processes, under the queues' limits,
    which hold across every worker service of STORE.  Ctrl-C or SIGTERM stops it: tasks it
    was running go back to their queue, to run again here or in another service."""
    tq = open_queue(store, create=True)
    stop = threading.Event()
    # retries=0: a crashed task is re-run per its queue's retries (durably, maybe elsewhere),
    # not once more in this service first.
    options: dict[str, Any] = {"pin": not no_pin, "retries": 0}
    if max_tasks_per_child is not None:
        options["maxtasksperchild"] = max_tasks_per_child
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        with procqueue.Pool(jobs, **options) as pool:
            click.echo(f"procqueue worker: serving {', '.join(queues) or 'every queue'} of "
                       f"{tq.shown} on {pool._processes} worker(s)", err=True)
            summary = pool.serve(tq, list(queues) or None, until_idle=until_idle, stop=stop)
    except KeyboardInterrupt:
        click.echo("procqueue worker: interrupted; its unfinished tasks are back in their "
                   "queues", err=True)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, previous)
        tq.close()
    click.echo(f"procqueue worker: {summary.succeeded} succeeded, {summary.failed} failed",
               err=True)


@click.command("enqueue", short_help="Queue one task per input in a store; prints their ids.")
@store_argument
@click.argument("script")
@click.argument("inputs", nargs=-1)
@click.option("--fn", "fn_name", metavar="NAME",
              help="The function to call [default: the one SCRIPT:NAME names, else 'process'].")
@click.option("--queue", default="default", show_default=True, metavar="NAME",
              help="The queue to add the tasks to.")
@click.option("--glob", metavar="PATTERN",
              help="Only files matching PATTERN in directories [default: every file].")
@click.option("--lines", "-a", "lines_file", metavar="FILE",
              help="Read one input per line of FILE [default: none].")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              metavar="SECONDS",
              help="Kill a task running longer (start to completion) [default: no timeout].")
@click.option("--priority", type=int, default=0, show_default=True,
              help="Higher runs first; equal priorities run in enqueue order.")
@click.option("--retries", type=click.IntRange(min=0), default=None, metavar="N",
              help="Run a task again after a worker crash, N times [default: the queue's].")
def enqueue_command(store: str, script: str, inputs: tuple[str, ...], fn_name: str | None,
                    queue: str, glob: str | None, lines_file: str | None,
                    timeout: float | None, priority: int, retries: int | None) -> None:
    """Queue SCRIPT's function once per input of INPUTS (files, directories, or after :::
    the inputs themselves, as for `procqueue map`) in STORE, and print the tasks' ids.  Files
    are queued as absolute paths: the worker services may run in another directory."""
    fn = resolve_script(script, fn_name)
    items = collect_inputs(inputs, glob, lines_file)
    if not lines_file and not any(word.startswith(":::") for word in inputs):
        # files and directories' files: a worker service may run in another directory
        items = [os.path.abspath(item) if isinstance(item, str) else item for item in items]
    if items:
        check_arguments(fn, len(items[0]) if isinstance(items[0], tuple) else 1)
    tq = open_queue(store, create=True)
    try:
        handles = tq.enqueue_many(fn.describe(), items, star=bool(items) and isinstance(
            items[0], tuple), queue=queue, timeout=timeout, priority=priority, retries=retries)
    finally:
        tq.close()
    click.echo("\n".join(str(h.id) for h in handles))
    click.echo(f"queued {len(handles)} task(s) in {queue!r} of {tq.shown}", err=True)


@click.command("define", short_help="Create or change a queue's limits.")
@store_argument
@click.argument("queue")
@click.option("--concurrency", type=click.IntRange(min=1), default=None, metavar="K",
              help="At most K tasks of the queue running at once, across every service "
                   "[default: no limit].")
@click.option("--worker-concurrency", type=click.IntRange(min=1), default=None, metavar="K",
              help="At most K running at once in each worker service [default: no limit].")
@click.option("--rate", metavar="L/P", default=None,
              help="At most L task starts in any P seconds, across every service ('50/30s') "
                   "[default: no limit].")
@click.option("--key-concurrency", type=click.IntRange(min=1), default=None, metavar="K",
              help="At most K running at once per task key [default: no limit].")
@click.option("--retries", type=click.IntRange(min=0), default=0, show_default=True,
              metavar="N", help="Run a task again after a worker crash, N times.")
def define_command(store: str, queue: str, concurrency: int | None,
                   worker_concurrency: int | None, rate: str | None,
                   key_concurrency: int | None, retries: int) -> None:
    """Create QUEUE in STORE, or change its limits (every service applies them at once)."""
    tq = open_queue(store, create=True)
    try:
        tq.define(queue, concurrency=concurrency, worker_concurrency=worker_concurrency,
                  rate=rate, key_concurrency=key_concurrency, retries=retries)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    finally:
        tq.close()


@click.command("status", short_help="Queues' task counts and limits, and live services.")
@store_argument
@click.option("--json", "as_json", is_flag=True, help="One JSON object [default: tables].")
def status_command(store: str, as_json: bool) -> None:
    """Each queue's pending, running, succeeded, failed and cancelled tasks, its limits and
    the rate in use; the worker services alive on STORE."""
    tq = open_queue(store)
    try:
        counts, services = tq.counts(), tq.services()
    finally:
        tq.close()
    queues = [_queue_row(c) for c in counts]
    alive = [{"id": s.id, "host": s.host, "pid": s.pid, "jobs": s.jobs,
              "queues": s.queues or "*", "running": s.running,
              "heartbeat_age_s": round(time.time() - s.heartbeat_at, 2)} for s in services]
    if as_json:
        click.echo(json.dumps({"queues": queues, "services": alive}))
        return
    click.echo(_table(queues, ("queue", "pending", "running", "succeeded", "failed",
                               "cancelled", "limits")) if queues else "no queues")
    click.echo("")
    click.echo(_table(alive, ("id", "host", "pid", "jobs", "queues", "running"))
               if alive else "no worker service alive")


def _queue_row(c: Any) -> dict[str, Any]:
    spec = c.spec
    limits = []
    if spec.concurrency:
        limits.append(f"concurrency={spec.concurrency}")
    if spec.worker_concurrency:
        limits.append(f"worker_concurrency={spec.worker_concurrency}")
    if spec.key_concurrency:
        limits.append(f"key_concurrency={spec.key_concurrency}")
    if spec.rate_limit:
        limits.append(f"rate={spec.rate_limit}/{spec.rate_per:g}s "
                      f"({c.starts_in_window} in window)")
    if spec.retries:
        limits.append(f"retries={spec.retries}")
    return {"queue": spec.name, "pending": c.pending, "running": c.running,
            "succeeded": c.succeeded, "failed": c.failed, "cancelled": c.cancelled,
            "limits": ", ".join(limits) or "-"}


def _table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    cells = [[c.upper() for c in columns]] + [[str(r[c]) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip()
                     for row in cells)


@click.command("result", short_help="A task's record as JSON (--wait: once it has ended).")
@store_argument
@click.argument("task_id", type=int)
@click.option("--wait", is_flag=True, help="Wait until the task has ended.")
@click.option("--timeout", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
              help="With --wait: give up after SECONDS (exit code 3) [default: wait as long as "
                   "it takes].")
def result_command(store: str, task_id: int, wait: bool, timeout: float | None) -> None:
    """Print task TASK_ID's record as one JSON line: status, input, result or error, attempts.
    Exit code 1 if the task failed or was cancelled."""
    tq = open_queue(store)
    try:
        handle = tq.handle(task_id)
        record = handle.wait(timeout) if wait else handle.record()
    except KeyError as exc:
        raise UnknownTask(str(exc.args[0])) from None
    except TimeoutError as exc:
        click.echo(f"procqueue result: {exc}", err=True)
        sys.exit(3)
    finally:
        tq.close()
    click.echo(json.dumps(record.to_dict()))
    if record.status in (procqueue.TaskStatus.FAILED, procqueue.TaskStatus.CANCELLED):
        sys.exit(EXIT_TASK_FAILED)


@click.command("cancel", short_help="Cancel pending or running tasks.")
@store_argument
@click.argument("task_ids", nargs=-1, type=int, required=True)
def cancel_command(store: str, task_ids: tuple[int, ...]) -> None:
    """Cancel the tasks TASK_IDS (pending or running; a finished task keeps its outcome)."""
    _change(store, task_ids, "cancelled", lambda tq, ids: tq.cancel(*ids))


@click.command("retry", short_help="Run failed or cancelled tasks again.")
@store_argument
@click.argument("task_ids", nargs=-1, type=int)
@click.option("--failed", "all_failed", is_flag=True,
              help="Every failed task of the store (or of --queue).")
@click.option("--queue", default=None, metavar="NAME",
              help="With --failed: of this queue [default: every queue].")
def retry_command(store: str, task_ids: tuple[int, ...], all_failed: bool,
                  queue: str | None) -> None:
    """Put failed or cancelled tasks TASK_IDS back in their queue, to run from scratch."""
    if not task_ids and not all_failed:
        raise click.UsageError("give task ids, or --failed")
    tq = open_queue(store)
    try:
        ids = list(task_ids)
        if all_failed:
            ids += list(_failed_ids(tq, queue))
    finally:
        tq.close()
    _change(store, tuple(ids), "put back", lambda tq, ids: tq.retry(*ids))


def _failed_ids(tq: procqueue.TaskQueue, queue: str | None) -> Iterator[int]:
    yield from tq.ids(procqueue.TaskStatus.FAILED, queue)


def _change(store: str, task_ids: tuple[int, ...], done: str, change: Any) -> None:
    tq = open_queue(store)
    try:
        changed = change(tq, task_ids)
    finally:
        tq.close()
    for task_id in task_ids:
        if task_id not in changed:
            click.echo(f"task {task_id}: unchanged (no such task, or not in a state to be "
                       f"{done})", err=True)
    click.echo(f"{len(changed)} task(s) {done}", err=True)


@click.command("prune", short_help="Delete tasks that ended long ago.")
@store_argument
@click.option("--older-than", required=True, metavar="DURATION",
              help="Delete tasks that ended before this long ago: 90s, 15m, 12h, 7d, 2w "
                   "[default: none, it is required].")
def prune_command(store: str, older_than: str) -> None:
    """Delete the succeeded, failed and cancelled tasks of STORE that ended before
    --older-than; pending and running tasks are never pruned."""
    seconds = parse_duration(older_than)
    tq = open_queue(store)
    try:
        removed = tq.prune(seconds)
    finally:
        tq.close()
    click.echo(f"pruned {removed} task(s)", err=True)
