"""The `procqueue` command line (installed as procqueue.cli).  It uses only procqueue's public
API: whatever the CLI needs, users of the Python API can have too."""

from __future__ import annotations

import os
import sys


def main() -> None:
    """The `procqueue` command's entry point.  A local run's pool forks its fork server from
    this process when it is made (procqueue/program_fork.py), so nothing is started early."""
    from .main import main as run_command

    try:
        run_command()
    except SystemExit as finished:
        _exit_without_teardown(finished)
        raise


def _exit_without_teardown(finished: SystemExit) -> None:
    """Leave at once when the command has finished and left nothing running.

    The interpreter's teardown after a run (freeing every module the pool imported) took
    20-30 ms of a one-input `procqueue map`'s ~160 ms, and has nothing left to do: the
    command has closed its outputs and stopped its pool.  So, as mypy does, the exit
    handlers run (multiprocessing's and logging's among them), the standard streams are
    flushed, and the process ends with os._exit.  Whenever another thread or a child is
    still alive (a Dask cluster, a dashboard), the ordinary exit joins and reaps them."""
    code = finished.code
    if not isinstance(code, int) or not _nothing_left_running():
        return
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        if stream is None:  # started with that descriptor closed
            continue
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: the ordinary exit reports
            return
    os._exit(code)


def _nothing_left_running() -> bool:
    import threading

    if threading.active_count() > 1:
        return False
    multiprocessing = sys.modules.get("multiprocessing")
    return multiprocessing is None or not multiprocessing.active_children()
