"""The `procqueue` command line (installed as procqueue.cli).  It uses only procqueue's public
API: whatever the CLI needs, users of the Python API can have too."""

from __future__ import annotations

import sys

import procqueue

# Arguments after which no local pool will run: the fork server would be started for nothing.
_NO_LOCAL_POOL = ("-h", "--help", "--version", "--dry-run", "--cluster")


def main() -> None:
    """The `procqueue` command's entry point.  A run of `map` on this machine starts the
    fork server before importing the rest of the command (click, the pool: ~60 ms), so the
    two overlap; then the command runs."""
    if _runs_a_local_pool(sys.argv[1:]):
        procqueue.start_fork_server()
    from .main import main as run_command

    run_command()


def _runs_a_local_pool(args: list[str]) -> bool:
    """A cheap look at the arguments, before click parses them: wrong only in the safe
    direction for odd inputs (an input named --help: no early start, the pool starts it).
    Words after the first ::: (or ::::) are inputs, never options."""
    if not args or args[0] != "map":
        return False
    options = args[:next((i for i, arg in enumerate(args) if arg.startswith(":::")), len(args))]
    return not any(arg.split("=", 1)[0] in _NO_LOCAL_POOL for arg in options)
