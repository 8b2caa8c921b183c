"""Linux's /proc, read by the mechanisms that must tell processes apart: a named limit's
holders (limits/_shm.py) and the processes a killed worker's tasks left (worker_slots.py)."""

from __future__ import annotations


def stat_fields(pid: int) -> list[bytes] | None:
    """/proc/PID/stat's fields after the command's name (which may hold spaces and
    parentheses): [0] the state, [1] the parent's pid, [19] the start time in clock ticks since
    boot (fields 3, 4 and 22 of proc(5)); None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            line = stat.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return line.rsplit(b")", 1)[1].split()
