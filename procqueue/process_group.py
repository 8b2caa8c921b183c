"""A worker process's own process group, which its tasks' subprocesses join and which dies
with it: a local pool's worker (worker.py) and a Dask worker of a LocalCluster the pool
started (backends/dask/cluster.py) lead one, so that no task's subprocess outlives them."""

from __future__ import annotations

import os
import signal
import sys


def become_group_leader() -> None:
    """Lead a process group of our own (the subprocesses we start join it)."""
    try:
        os.setpgid(0, 0)
    except OSError:  # already a group leader (or not permitted): keep going
        pass


def kill_own_group() -> None:
    # Never killpg a group we do not lead: that could be the user's shell job.
    if os.getpgid(0) == os.getpid():
        os.killpg(0, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


# The reaper: a process of the group that waits (pidfds: no polling) for the end of its leader
# or of the leader's parent, however they end, then SIGKILLs the group, leader and itself
# included.  The group's id cannot go to another process while the group has members, so the
# kill reaches only ours.
_REAPER = """
import os, select, sys
leader, parent = int(sys.argv[1]), int(sys.argv[2])
try:
    select.select([os.pidfd_open(leader), os.pidfd_open(parent)], [], [])
except ProcessLookupError:
    pass
os.killpg(leader, 9)
"""


def start_group_reaper() -> None:
    """Lead a process group of our own, killed when this process or its parent ends, however
    they end.  For a process whose end is not ours to arrange: a Dask worker exits at once
    (os._exit) when its nanny's process is gone, which a thread of its own would race, and
    neither its thread nor ours runs while a task holds the GIL.  Linux only (pidfds);
    elsewhere nothing is started."""
    parent = os.getppid()
    if not (sys.platform.startswith("linux") and hasattr(os, "pidfd_open")) or parent == 1:
        return
    become_group_leader()
    if os.getpgid(0) != os.getpid():
        return  # not a group of our own: never kill a group we do not lead
    import subprocess  # here: a local pool's worker imports this module, and never needs it

    subprocess.Popen([sys.executable, "-I", "-S", "-c", _REAPER, str(os.getpid()), str(parent)],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, close_fds=True)
