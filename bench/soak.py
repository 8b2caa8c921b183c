"""Soak run (not in CI): many tasks with a fraction of faults; nothing may be lost.

    python bench/soak.py [--tasks 200000] [--fault-rate 0.01] [--jobs 2]

Faults are split between exceptions and worker crashes (os._exit).  Checks that every input
has exactly one outcome, that healthy inputs have the right value and faulty ones the right
error, and reports restarts and the throughput cost of the faults against a fault-free run.
"""
from __future__ import annotations

import argparse
import os
import random
import time

from procqueue import Pool, WorkerCrashedError


def task(args):
    x, fault = args
    if fault == "raise":
        raise ValueError(f"fault at {x}")
    if fault == "crash":
        os._exit(3)
    return x * 2


def run(n: int, rate: float, jobs: int, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    inputs = [(i, rng.choice(["raise", "crash"]) if rng.random() < rate else None)
              for i in range(n)]
    seen = [0] * n
    started = time.perf_counter()
    with Pool(jobs, retries=0) as pool:
        for outcome in pool.imap_outcomes(task, inputs, ordered=False):
            i, fault = inputs[outcome.index]
            seen[outcome.index] += 1
            if fault is None:
                assert outcome.ok and outcome.value == i * 2, outcome
            elif fault == "raise":
                assert isinstance(outcome.error, ValueError), outcome
            else:
                assert isinstance(outcome.error, WorkerCrashedError), outcome
        stats = pool.stats()
    wall = time.perf_counter() - started
    assert seen == [1] * n, "an input had no outcome or more than one"
    return {"wall_s": wall, "tasks_per_s": n / wall, "restarts": stats.worker_restarts,
            "faults": sum(1 for _, f in inputs if f)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200_000)
    parser.add_argument("--fault-rate", type=float, default=0.01)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    clean = run(args.tasks, 0.0, args.jobs, seed=1)
    faulty = run(args.tasks, args.fault_rate, args.jobs, seed=1)
    print(f"{args.tasks} tasks, {faulty['faults']} faults ({args.fault_rate:.1%}), "
          f"{args.jobs} workers: every input had exactly one outcome, all correct")
    print(f"fault-free: {clean['wall_s']:.1f} s ({clean['tasks_per_s']:,.0f} tasks/s)")
    print(f"with faults: {faulty['wall_s']:.1f} s ({faulty['tasks_per_s']:,.0f} tasks/s), "
          f"{faulty['restarts']} worker restarts, throughput cost "
          f"{faulty['wall_s'] / clean['wall_s'] - 1:.0%}")


if __name__ == "__main__":
    main()
