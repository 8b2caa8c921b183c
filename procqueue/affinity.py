"""Which CPU each worker slot is pinned to, and the thread caps that keep N workers from
oversubscribing N CPUs.

The plan respects the CPUs this process may use (taskset, cgroup cpusets: os.sched_getaffinity),
spreads workers over distinct physical cores before putting two on SMT siblings, and wraps
round-robin when there are more workers than CPUs.
"""

from __future__ import annotations

import os

# Libraries that start one thread per CPU in every process unless told otherwise.  N workers
# times N BLAS threads on N CPUs is the classic oversubscription; a worker gets 1 by default.
THREAD_ENV_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)

_SYS_CPU = "/sys/devices/system/cpu"  # a str: pathlib costs ~9 ms to import


def usable_cpus() -> list[int]:
    """The CPUs this process may run on, sorted."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def usable_cpu_count() -> int:
    return len(usable_cpus())


def parse_cpu_list(text: str) -> list[int]:
    """Parse '0-3,8,10-11' (the kernel's and taskset's list format)."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            first, last = int(lo), int(hi)
            if last < first:
                raise ValueError(f"bad CPU range {part!r}: end before start")
            cpus.extend(range(first, last + 1))
        else:
            cpus.append(int(part))
    return cpus


def core_of(cpu: int) -> tuple[int, int] | None:
    """(package id, core id) of a CPU from sysfs, or None where the topology is unknown."""
    topology = os.path.join(_SYS_CPU, f"cpu{cpu}", "topology")
    try:
        package = int(_read(os.path.join(topology, "physical_package_id")))
        core = int(_read(os.path.join(topology, "core_id")))
    except (OSError, ValueError):
        return None
    return package, core


def _read(path: str) -> str:
    with open(path) as file:
        return file.read()


def order_cpus_by_core(cpus: list[int]) -> list[int]:
    """One CPU of each physical core first, then the SMT siblings, keeping numeric order
    inside each round."""
    rounds: list[list[int]] = []
    seen_on_core: dict[object, int] = {}
    for cpu in sorted(cpus):
        core = core_of(cpu)
        key: object = core if core is not None else ("cpu", cpu)
        depth = seen_on_core.get(key, 0)
        seen_on_core[key] = depth + 1
        while len(rounds) <= depth:
            rounds.append([])
        rounds[depth].append(cpu)
    return [cpu for round_ in rounds for cpu in round_]


def plan_cpus(processes: int, allowed: list[int] | None = None) -> list[tuple[int, ...]]:
    """The CPU set of each worker slot: one CPU each, distinct physical cores first,
    round-robin when there are more workers than CPUs."""
    if processes < 1:
        raise ValueError("processes must be at least 1")
    ordered = order_cpus_by_core(allowed if allowed is not None else usable_cpus())
    if not ordered:
        raise ValueError("no usable CPUs")
    return [(ordered[i % len(ordered)],) for i in range(processes)]


def worker_thread_env(overrides: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a worker: each thread-count variable the user has not set becomes 1."""
    env = {name: "1" for name in THREAD_ENV_VARS if name not in os.environ}
    env.update(overrides or {})
    return env


def pin_current_process(cpus: tuple[int, ...]) -> None:
    """Pin the calling process (its main thread and every thread it starts later)."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)
    else:  # pragma: no cover - non-Linux fallback
        import psutil

        psutil.Process().cpu_affinity(list(cpus))
