"""Where procqueue's per-task time goes in the calling process on `tiny` (issue #6).

    python bench/profile_tiny.py [--api imap,map] [--tasks 100000] [--jobs 2] [--top 25]

cProfile only sees the thread that enabled it, and procqueue's work in the parent is spread
over three threads: the caller (pickling inputs for map, building futures, consuming results),
the supervisor (`Supervisor._run`: select, dispatch, result routing) and, for imap, a feeder
thread (`feeder.Feeder.run`: pickling inputs lazily).  So this script gives each thread its own
cProfile.Profile:

  * caller:     enabled around the timed call in the main thread;
  * supervisor: `Supervisor._step` is wrapped so the supervisor thread enables its own profiler
                at the first step after the timed call starts and disables it at the first
                step after it ends (the warm-up and pool start-up are not in the profile);
  * feeder:     `Feeder.run` is wrapped whole (a feeder lives only as long as its call).

Each thread's functions are reported by tottime, in microseconds per task, plus the thread's
CPU on its own CPU clock (unprofiled figure from a separate, unprofiled run of the same call,
so the profiler's overhead does not distort the split between threads).  .pstats files are
written to --out for snakeviz / pstats.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# E402 is expected: bench/ must be on sys.path (just above) before its own modules import
import harness  # noqa: E402
from cases import trivial, warm  # noqa: E402

PROFILING = threading.Event()  # set while the timed call runs
PROFILES: dict[str, cProfile.Profile] = {}
_lock = threading.Lock()


def _install_thread_profilers() -> None:
    from procqueue import feeder as feeder_mod
    from procqueue import supervisor as sup_mod

    original_step = sup_mod.Supervisor._step
    local = threading.local()

    def step(self: Any) -> None:
        on = getattr(local, "profiler", None)
        if PROFILING.is_set() and on is None:
            local.profiler = PROFILES.setdefault("supervisor", cProfile.Profile())
            local.profiler.enable()
        elif not PROFILING.is_set() and on is not None:
            on.disable()
            local.profiler = None
        original_step(self)

    sup_mod.Supervisor._step = step  # type: ignore[method-assign]

    original_feed = feeder_mod.Feeder.run

    def feed(self: Any, *args: Any, **kwargs: Any) -> None:
        if not PROFILING.is_set():
            return original_feed(self, *args, **kwargs)
        profiler = cProfile.Profile()
        with _lock:
            PROFILES[f"feeder-{len([k for k in PROFILES if k.startswith('feeder')])}"] = profiler
        profiler.enable()
        try:
            return original_feed(self, *args, **kwargs)
        finally:
            profiler.disable()

    feeder_mod.Feeder.run = feed  # type: ignore[method-assign]


def call_for(pool: Any, api: str) -> Callable[[list[int]], list[Any]]:
    if api == "map":
        return lambda xs: pool.map(trivial, xs)
    if api == "imap":
        return lambda xs: list(pool.imap(trivial, xs))
    if api == "imap_unordered":
        return lambda xs: list(pool.imap_unordered(trivial, xs))
    if api == "submit":
        return lambda xs: [f.result() for f in [pool.submit(trivial, x) for x in xs]]
    if api == "imap+key":  # bench/many_workers.py's keyed cell: 1,024 keys, 4 at once each
        return lambda xs: list(pool.imap(trivial, xs, key=key_of, key_concurrency=4))
    raise ValueError(api)


def key_of(x: int) -> int:
    return x % 1024


def unprofiled(api: str, tasks: int, jobs: int) -> harness.Measurement:
    from procqueue import Pool

    with Pool(jobs) as pool:
        call = call_for(pool, api)
        pool.map(warm, [1] * 8)  # workers up; the measured function stays unmeasured
        _, m = harness.measure_call(lambda: call(list(range(tasks))), "procqueue-supervisor",
                                    sample_rss=False)
    return m


def profiled(api: str, tasks: int, jobs: int) -> tuple[dict[str, cProfile.Profile], float]:
    from procqueue import Pool

    PROFILES.clear()
    with Pool(jobs) as pool:
        call = call_for(pool, api)
        pool.map(warm, [1] * 8)
        xs = list(range(tasks))
        caller = cProfile.Profile()
        PROFILING.set()
        t0 = time.perf_counter()
        caller.enable()
        call(xs)
        caller.disable()
        wall = time.perf_counter() - t0
        PROFILING.clear()
        pool.map(warm, [1] * 4)  # one more supervisor step: it disables its profiler
    PROFILES["caller"] = caller
    return dict(PROFILES), wall


def report(name: str, profile: cProfile.Profile, tasks: int, top: int) -> str:
    stats = pstats.Stats(profile)
    rows = []
    for (file, line, fn), (cc, nc, tt, ct, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append((tt, ct, nc, f"{Path(file).name}:{line}({fn})"))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    out = [f"### {name}: {total / tasks * 1e6:.2f} us/task of profiled time (tottime sum)", "",
           "| tottime us/task | cumtime us/task | calls/task | function |", "|---|---|---|---|"]
    for tt, ct, nc, label in rows[:top]:
        out.append(f"| {tt / tasks * 1e6:.3f} | {ct / tasks * 1e6:.3f} | {nc / tasks:.3f} | "
                   f"`{label}` |")
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--api", default="imap,map")
    p.add_argument("--tasks", type=int, default=100_000)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", type=Path, default=HERE / "results" / "profile")
    args = p.parse_args()
    _install_thread_profilers()
    args.out.mkdir(parents=True, exist_ok=True)
    text = [f"# procqueue `tiny` profile ({args.tasks} tasks, {args.jobs} workers)", ""]
    for api in args.api.split(","):
        m = unprofiled(api, args.tasks, args.jobs)
        other = m.parent_cpu_s - m.caller_cpu_s - (m.supervisor_cpu_s or 0)
        summary = (f"Unprofiled: {m.wall_s:.3f} s wall ({args.tasks / m.wall_s:,.0f} tasks/s); "
                   f"parent CPU {m.parent_cpu_s / args.tasks * 1e6:.2f} us/task = caller "
                   f"{m.caller_cpu_s / args.tasks * 1e6:.2f} + supervisor "
                   f"{(m.supervisor_cpu_s or 0) / args.tasks * 1e6:.2f} + other threads "
                   f"(feeder) {other / args.tasks * 1e6:.2f}.")
        text += [f"## {api}", "", summary, ""]
        profiles, wall = profiled(api, args.tasks, args.jobs)
        text += [f"Profiled run: {wall:.3f} s wall (cProfile slows every thread down).", ""]
        for name, prof in sorted(profiles.items()):
            prof.dump_stats(str(args.out / f"tiny_{api}_{name}.pstats"))
            text.append(report(f"{api} / {name} thread", prof, args.tasks, args.top))
    result = "\n".join(text)
    (args.out / "tiny.md").write_text(result)
    print(result)


if __name__ == "__main__":
    main()
