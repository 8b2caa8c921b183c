"""The `procqueue` command line (installed as procqueue.cli).  It uses only procqueue's public
API: whatever the CLI needs, users of the Python API can have too."""

from __future__ import annotations


def main() -> None:
    """The `procqueue` command's entry point.  A local run's pool forks its fork server from
    this process when it is made (procqueue/program_fork.py), so nothing is started early."""
    from .main import main as run_command

    run_command()
