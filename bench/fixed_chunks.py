"""An explicit `chunksize`, as multiprocessing users pass it: procqueue against
multiprocessing.Pool on the same shapes, in the same run.

    python bench/fixed_chunks.py [--rounds 3] [--before TREE] [--out FILE]

Shapes (1 ms `time.sleep` inputs, so the cores are not the limit):

  * one chunk per worker: 8 workers, 8,000 inputs, chunksize 1,000 (len / N, the usual
    hand-tuned choice): ideal wall 1 s;
  * four chunks per worker: 8 workers, 8,000 inputs, chunksize 250 (what multiprocessing's
    map picks by itself);
  * a slow first chunk: 2 workers, 40 inputs, chunksize 10, the first chunk's inputs 100 ms
    and the others 10 ms: ideal wall 1 s (the other worker runs the other three chunks).

Through `map`, `imap`, `imap_unordered`, and `imap` over a generator.  Each cell runs in a
fresh interpreter, its pool warmed up first; cells are interleaved round by round.  With
`--before TREE` (an unpacked older procqueue: `git archive <commit> procqueue | tar -x -C
TREE`) that version runs beside the current one.  Prints the median wall of each cell and
its ratio to multiprocessing's, and writes bench/results/fixed_chunks.md (and .json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import harness  # noqa: E402

# name -> (workers, inputs, chunksize)
SHAPES: dict[str, tuple[int, int, int]] = {
    "one chunk per worker": (8, 8_000, 1_000),
    "four chunks per worker": (8, 8_000, 250),
    "a slow first chunk": (2, 40, 10),
}
APIS = ("map", "imap", "imap_unordered", "imap over a generator")


def nap(x: int) -> int:
    time.sleep(0.001)
    return x


def slow_first_chunk(x: int) -> int:
    time.sleep(0.1 if x < 10 else 0.01)
    return x


# ---- one cell, in its own interpreter -------------------------------------------------------

def run_cell(spec: dict[str, Any]) -> dict[str, Any]:
    workers, n, chunksize = SHAPES[spec["shape"]]
    fn = slow_first_chunk if spec["shape"] == "a slow first chunk" else nap
    if spec["system"] == "multiprocessing":
        import multiprocessing

        pool: Any = multiprocessing.Pool(workers)
    else:
        if spec.get("tree"):
            sys.path.insert(0, spec["tree"])
        from procqueue import Pool

        pool = Pool(workers)
    try:
        pool.map(abs, range(4 * workers))  # every worker started
        started = time.perf_counter()
        results = _call(pool, spec["api"], fn, n, chunksize)
        wall = time.perf_counter() - started
    finally:
        pool.terminate()
        pool.join()
    if sorted(results) != list(range(n)):
        raise AssertionError(f"wrong results: {len(results)} for {n} inputs")
    return {"wall_s": wall}


def _call(pool: Any, api: str, fn: Any, n: int, chunksize: int) -> list[Any]:
    if api == "map":
        return list(pool.map(fn, range(n), chunksize=chunksize))
    if api == "imap":
        return list(pool.imap(fn, range(n), chunksize=chunksize))
    if api == "imap_unordered":
        return list(pool.imap_unordered(fn, range(n), chunksize=chunksize))
    return list(pool.imap(fn, (x for x in range(n)), chunksize=chunksize))


# ---- the run --------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", help="an older procqueue tree to run beside this one")
    parser.add_argument("--cell", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "fixed_chunks.md")
    args = parser.parse_args()
    if args.cell:
        print(json.dumps(run_cell(json.loads(args.cell))))
        return
    harness.compile_procqueue()
    env = harness.environment()
    systems = [("multiprocessing", None), ("procqueue", None)]
    if args.before:
        systems.append(("procqueue before", os.path.abspath(args.before)))
    rows: list[dict[str, Any]] = []
    for round_ in range(args.rounds):
        for shape in SHAPES:
            for api in APIS:
                for system, tree in systems:
                    spec = {"shape": shape, "api": api, "system": system, "tree": tree,
                            "round": round_}
                    row = {**spec, **harness.run_in_fresh_process(
                        [__file__, "--cell", json.dumps(spec)])}
                    rows.append(row)
                    shown = row.get("error") or f"{row['wall_s']:.3f} s"
                    print(f"round {round_ + 1} {shape:24} {api:22} {system:17} {shown}",
                          flush=True)
    harness.save_results(args.out, {"env": env, "rows": rows},
                         _report(rows, env, args, [s for s, _ in systems]))


def _report(rows: list[dict[str, Any]], env: dict[str, Any], args: argparse.Namespace,
            systems: list[str]) -> str:
    lines = [
        "# An explicit chunksize: procqueue against multiprocessing.Pool", "",
        f"{env['when']}, Python {env['python']}, {env['usable_cpus']} usable CPUs, load "
        f"{env['loadavg_start'][0]:.2f} at start, procqueue {env['procqueue_commit']}"
        f"{' (dirty)' if env['procqueue_dirty'] else ''}"
        f"{f', before: {args.before}' if args.before else ''}.  `python bench/fixed_chunks.py "
        f"--rounds {args.rounds}`: median wall of the rounds (each cell a fresh interpreter), "
        "and its ratio to multiprocessing's (1.00 = as fast; > 1 slower).", "",
        "| shape | API | " + " | ".join(systems) + " | " + " | ".join(
            f"{s} / multiprocessing" for s in systems[1:]) + " |",
        "|---|---|" + "---|" * (2 * len(systems) - 1)]
    for shape in SHAPES:
        for api in APIS:
            walls = []
            for system in systems:
                mine = [r["wall_s"] for r in rows if (r["shape"], r["api"], r["system"])
                        == (shape, api, system) and "wall_s" in r]
                walls.append(statistics.median(mine) if mine else None)
            shown = [f"{w:.3f} s" if w is not None else "error" for w in walls]
            ratios = [f"{w / walls[0]:.2f}" if w is not None and walls[0] else ""
                      for w in walls[1:]]
            lines.append(f"| {shape} | `{api}` | " + " | ".join(shown + ratios) + " |")
    failed = harness.failed_cells(rows, lambda r: f"{r['system']} {r['shape']} {r['api']}")
    if failed:
        lines += ["", failed]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
