"""Soak run (not in CI): many tasks with a fraction of faults; nothing may be lost.

    python bench/soak.py [--tasks 200000] [--fault-rate 0.01] [--jobs 2]
                         [--api imap_outcomes|submit|keyed] [--keys 5] [--per-key 2]

Faults are split between exceptions and worker crashes (os._exit).  Checks that every input
has exactly one outcome, that healthy inputs have the right value and faulty ones the right
error, and reports restarts and the throughput cost of the faults against a fault-free run.
`--api imap_outcomes` (the default) runs the inputs as one call (they travel in blocks);
`--api submit` makes a submit() call per input, a future each (the calls of one function
travel several at a time as blocks of tasks); `--api keyed` runs them as one call with a key
(--keys 5 keys, --per-key 2 at once each: a batch holds one place per key, shared by its tasks
of that key; with many keys, busy workers get keyed batches ahead too), and also checks from
each input's recorded start and end that no key ran more than its cap at once.
"""
from __future__ import annotations

import argparse
import os
import random
import time
from collections.abc import Iterator
from concurrent.futures import as_completed

from procqueue import Pool, WorkerCrashedError


def task(args):
    x, fault = args
    if fault == "raise":
        raise ValueError(f"fault at {x}")
    if fault == "crash":
        os._exit(3)
    return x * 2


def task_of_two(x, fault):
    return task((x, fault))


def timed_task(args):
    start = time.time()
    value = task(args)
    return value, start, time.time()


KEYS, PER_KEY = 5, 2


def run(n: int, rate: float, jobs: int, seed: int, api: str = "imap_outcomes"
        ) -> dict[str, float]:
    rng = random.Random(seed)
    inputs = [(i, rng.choice(["raise", "crash"]) if rng.random() < rate else None)
              for i in range(n)]
    seen = [0] * n
    spans: list[list[tuple[float, float]]] = [[] for _ in range(KEYS)]
    started = time.perf_counter()
    with Pool(jobs, retries=0) as pool:
        for index, ok, value in _outcomes(pool, api, inputs):
            i, fault = inputs[index]
            seen[index] += 1
            if fault is None:
                if api == "keyed":
                    spans[i % KEYS].append(value[1:])
                    value = value[0]
                assert ok and value == i * 2, (index, value)
            elif fault == "raise":
                assert isinstance(value, ValueError), (index, value)
            else:
                assert isinstance(value, WorkerCrashedError), (index, value)
        stats = pool.stats()
    wall = time.perf_counter() - started
    assert seen == [1] * n, "an input had no outcome or more than one"
    assert all(_most_at_once(key_spans) <= PER_KEY for key_spans in spans), "a key over its cap"
    return {"wall_s": wall, "tasks_per_s": n / wall, "restarts": stats.worker_restarts,
            "faults": sum(1 for _, f in inputs if f)}


def _outcomes(pool: Pool, api: str, inputs: list) -> Iterator[tuple[int, bool, object]]:
    """(input index, ok, value or error) of each input, as they come."""
    if api == "imap_outcomes":
        for outcome in pool.imap_outcomes(task, inputs, ordered=False):
            yield outcome.index, outcome.ok, outcome.value if outcome.ok else outcome.error
        return
    if api == "keyed":
        for outcome in pool.imap_outcomes(timed_task, inputs, ordered=False,
                                          key=lambda args: args[0] % KEYS,
                                          key_concurrency=PER_KEY):
            yield outcome.index, outcome.ok, outcome.value if outcome.ok else outcome.error
        return
    futures = {pool.submit(task_of_two, *args): index for index, args in enumerate(inputs)}
    for future in as_completed(futures):
        error = future.exception()
        yield futures[future], error is None, future.result() if error is None else error


def _most_at_once(spans: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running = most = 0
    for _, step in events:
        running += step
        most = max(most, running)
    return most


def main() -> None:
    global KEYS, PER_KEY  # read by run() and the key function
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200_000)
    parser.add_argument("--fault-rate", type=float, default=0.01)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--api", choices=("imap_outcomes", "submit", "keyed"),
                        default="imap_outcomes")
    parser.add_argument("--keys", type=int, default=KEYS)
    parser.add_argument("--per-key", type=int, default=PER_KEY)
    args = parser.parse_args()
    KEYS, PER_KEY = args.keys, args.per_key
    clean = run(args.tasks, 0.0, args.jobs, seed=1, api=args.api)
    faulty = run(args.tasks, args.fault_rate, args.jobs, seed=1, api=args.api)
    print(f"{args.tasks} tasks through {args.api}, {faulty['faults']} faults "
          f"({args.fault_rate:.1%}), {args.jobs} workers: every input had exactly one "
          "outcome, all correct")
    print(f"fault-free: {clean['wall_s']:.1f} s ({clean['tasks_per_s']:,.0f} tasks/s)")
    print(f"with faults: {faulty['wall_s']:.1f} s ({faulty['tasks_per_s']:,.0f} tasks/s), "
          f"{faulty['restarts']} worker restarts, throughput cost "
          f"{faulty['wall_s'] / clean['wall_s'] - 1:.0%}")


if __name__ == "__main__":
    main()
