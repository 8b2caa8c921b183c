"""Start-up, cold (issue #24 part 2): import, create a pool of 2, run one trivial task, shut
down, in a fresh interpreter each time, for procqueue and every peer, interleaved by round.

    python3 bench/startup.py --rounds 8 [--before-python /tmp/bv/bin/python] [--out FILE]

Each cell is a script file run by a new interpreter (its pool made under the
`if __name__ == "__main__":` guard, as a user's script would); it reports its phases with
time.perf_counter: import (the import lines a user writes), pool (the constructor), first (the
first result), stop (shutdown: the workers are gone), and the cell's whole wall time as seen from
outside (interpreter start and exit included).  Every cell runs with `--python` (default: this
interpreter; use a venv with procqueue and the peers installed, no PYTHONPATH tricks), the
`procqueue-before` cells with `--before-python` (a venv with the earlier procqueue installed);
`procqueue-shared` is procqueue with the program's fork switched off (PROCQUEUE_FORK_PROGRAM=0:
multiprocessing's shared fork server, a fresh interpreter).  `procqueue map` on one input is
timed from outside too (until its output's reader has the end of it), beside its floor: a
click command that runs the same input on the standard library's fork pool and nothing else
(FLOOR_COMMAND).  Medians per cell; the ratio
column is procqueue's total over each system's, within a round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PHASES = ("import", "pool", "first", "stop")
JOBS = 2

# name -> (import lines, pool expression, one task, shutdown)
SYSTEMS: dict[str, tuple[str, str, str, str]] = {
    "procqueue": ("from procqueue import Pool", "Pool(2)", "p.apply(abs, (-1,))",
                  "p.terminate(); p.join()"),
    "mp-fork": ("import multiprocessing.pool", "multiprocessing.get_context('fork').Pool(2)",
                "p.apply(abs, (-1,))", "p.terminate(); p.join()"),
    "mp-forkserver": ("import multiprocessing.pool",
                      "multiprocessing.get_context('forkserver').Pool(2)",
                      "p.apply(abs, (-1,))", "p.terminate(); p.join()"),
    "ppe": ("from concurrent.futures import ProcessPoolExecutor",
            "ProcessPoolExecutor(2)", "p.submit(abs, -1).result()", "p.shutdown()"),
    "loky": ("from loky import get_reusable_executor", "get_reusable_executor(2)",
             "p.submit(abs, -1).result()", "p.shutdown(kill_workers=True)"),
    "pebble": ("from pebble import ProcessPool", "ProcessPool(2)",
               "p.schedule(abs, (-1,)).result()", "p.stop(); p.join()"),
    "mpire": ("from mpire import WorkerPool", "WorkerPool(2)", "p.map(abs, [-1])",
              "p.terminate()"),
}

CELL = """\
import time
t0 = time.perf_counter()
{imports}
t1 = time.perf_counter()
if __name__ == "__main__":
    import json, multiprocessing
    p = {pool}
    t2 = time.perf_counter()
    {task}
    t3 = time.perf_counter()
    {stop}
    t4 = time.perf_counter()
    print(json.dumps({{"import": t1 - t0, "pool": t2 - t1, "first": t3 - t2, "stop": t4 - t3}}))
"""


def cell_script(folder: Path, system: str) -> Path:
    imports, pool, task, stop = SYSTEMS[system.split("@")[0]]
    path = folder / f"cell_{system.replace('@', '_').replace('-', '_')}.py"
    path.write_text(CELL.format(imports=imports, pool=pool, task=task, stop=stop))
    return path


def run_cell(python: str, script: Path, env: dict[str, str], cwd: Path) -> dict[str, float]:
    start = time.perf_counter()
    run = subprocess.run([python, str(script)], capture_output=True, text=True,
                         env=env, cwd=cwd, timeout=120)
    wall = time.perf_counter() - start
    if run.returncode != 0:
        raise RuntimeError(f"{script.name}: {run.stderr.strip()[-400:]}")
    phases = json.loads(run.stdout.strip().splitlines()[-1])
    phases["total"] = sum(phases[p] for p in PHASES)
    phases["process"] = wall
    return phases


def run_command(python: str, folder: Path, env: dict[str, str]) -> dict[str, float]:
    """`procqueue map` on one input, from outside (the command's whole run), with the
    console script installed beside `python`."""
    (folder / "one").mkdir(exist_ok=True)
    (folder / "one" / "a.txt").write_text("hello\n")
    (folder / "job.py").write_text("def process(path):\n    return len(open(path).read())\n")
    # The installed console script, as users run it: its main module is a file, so the
    # pool gets the default start method a script gets (under `python -c` it would be fork)
    script = os.path.join(os.path.dirname(python), "procqueue")
    command = [python, script, "map", "job.py", "one", "-j", "2", "-q"]
    return {"process": timed_one_input("procqueue map", command, folder, env)}


def timed_one_input(name: str, command: list[str], folder: Path, env: dict[str, str]) -> float:
    """The whole run of a command that writes one record for the input in one/, until its
    output's reader has the end of it (as `procqueue map ... | jq` would).  stderr goes to a
    file: multiprocessing's resource tracker keeps it open after the program has ended, so
    a pipe there would time the tracker's exit too, which no output reader waits for."""
    with tempfile.TemporaryFile("w+") as errors:
        start = time.perf_counter()
        run = subprocess.run(command, stdout=subprocess.PIPE, stderr=errors, text=True,
                             env=env, cwd=folder, timeout=120)
        wall = time.perf_counter() - start
        if run.returncode != 0 or '"ok": true' not in run.stdout:
            errors.seek(0)
            raise RuntimeError(f"{name}: {errors.read().strip()[-400:]}")
    return wall


# The least a command like `procqueue map` can take here: a click command that imports the
# script's function and runs its one input on the standard library's fork pool (no fork
# server, no supervisor, no checks), then prints the record.
FLOOR_COMMAND = """\
import importlib.util, json, multiprocessing, os, sys
import click

@click.command()
@click.argument("script")
@click.argument("folder")
@click.option("-j", "jobs", type=int, default=2)
def main(script, folder, jobs):
    spec = importlib.util.spec_from_file_location("job", script)
    job = importlib.util.module_from_spec(spec)
    sys.modules["job"] = job
    spec.loader.exec_module(job)
    paths = sorted(os.path.join(folder, name) for name in os.listdir(folder))
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        for path, result in zip(paths, pool.imap(job.process, paths)):
            print(json.dumps({"input": path, "ok": True, "result": result}))

if __name__ == "__main__":
    main()
"""


def run_floor_command(python: str, folder: Path, env: dict[str, str]) -> float:
    """FLOOR_COMMAND on the one input of run_command, whole process."""
    script = folder / "floor_command.py"
    script.write_text(FLOOR_COMMAND)
    return timed_one_input("floor command", [python, str(script), "job.py", "one", "-j", "2"],
                           folder, env)


def bare_interpreter(python: str, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([python, "-c", "pass"], env=env, check=True)
    return time.perf_counter() - start


def environments(python: str, before: str | None) -> dict[str, tuple[str, dict[str, str]]]:
    """name -> (interpreter, environment) of procqueue's cells."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("PROCQUEUE_FORK_PROGRAM", "PYTHONPATH")}
    envs = {"procqueue": (python, base),
            "procqueue-shared": (python, {**base, "PROCQUEUE_FORK_PROGRAM": "0"})}
    if before:
        envs["procqueue-before"] = (before, base)
    return envs


def available(python: str, system: str) -> bool:
    module = SYSTEMS[system][0].split()[1].split(".")[0]
    return subprocess.run([python, "-c", f"import {module}"],
                          capture_output=True).returncode == 0


def compile_installed(python: str) -> None:
    """Users' installs have bytecode; an editable one under PYTHONDONTWRITEBYTECODE may not."""
    subprocess.run([python, "-c", "import compileall, os, procqueue, procqueue.cli; "
                    "[compileall.compile_dir(os.path.dirname(m.__file__), quiet=1) "
                    "for m in (procqueue, procqueue.cli)]"], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--python", default=sys.executable,
                        help="the interpreter of every cell (procqueue and peers installed)")
    parser.add_argument("--before-python",
                        help="an interpreter with an earlier procqueue: procqueue-before")
    parser.add_argument("--out", type=Path, help="also write the table (markdown) here")
    args = parser.parse_args()
    envs = environments(args.python, args.before_python)
    for python, _ in envs.values():
        compile_installed(python)
    peers = [s for s in SYSTEMS if s != "procqueue" and available(args.python, s)]
    cells = [(name, "procqueue", python, env) for name, (python, env) in envs.items()]
    cells += [(peer, peer, args.python, envs["procqueue"][1]) for peer in peers]
    rows: dict[str, list[dict[str, float]]] = {name: [] for name, _, _, _ in cells}
    commands: dict[str, list[float]] = {name: [] for name in envs}
    commands["click + multiprocessing fork pool (the floor)"] = []
    bare: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        scripts = {system: cell_script(folder, system) for _, system, _, _ in cells}
        for round_no in range(args.rounds):
            order = cells if round_no % 2 == 0 else cells[::-1]
            bare.append(bare_interpreter(*envs["procqueue"]))
            for name, system, python, env in order:
                rows[name].append(run_cell(python, scripts[system], env, folder))
            for name, (python, env) in envs.items():
                commands[name].append(run_command(python, folder, env)["process"])
            python, env = envs["procqueue"]
            commands["click + multiprocessing fork pool (the floor)"].append(
                run_floor_command(python, folder, env))
            print(f"round {round_no + 1}/{args.rounds} done", file=sys.stderr)
    table = render(rows, commands, statistics.median(bare), args)
    print(table)
    if args.out:
        args.out.write_text(table)


def render(rows: dict[str, list[dict[str, float]]], commands: dict[str, list[float]],
           bare: float, args: argparse.Namespace) -> str:
    def ms(values: list[float]) -> str:
        return f"{1e3 * statistics.median(values):.0f}"

    ours = rows["procqueue"]
    python = "" if args.python == sys.executable else f" --python {args.python}"
    before = f" --before-python {args.before_python}" if args.before_python else ""
    lines = [f"Start-up, cold, {JOBS} workers: `python3 bench/startup.py --rounds {args.rounds}"
             f"{python}{before}` "
             f"({time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, load "
             f"{os.getloadavg()[0]:.1f} at the end). Medians in ms; `python -c pass` takes "
             f"{1e3 * bare:.0f} ms here.", "",
             "| system | import | pool | first task | stop | total | whole process "
             "| procqueue's total / this |", "|---|---|---|---|---|---|---|---|"]
    for name, cells in rows.items():
        ratio = statistics.median(o["total"] / c["total"] for o, c in zip(ours, cells))
        lines.append(f"| {name} | " + " | ".join(ms([c[p] for c in cells]) for p in PHASES)
                     + f" | {ms([c['total'] for c in cells])} | "
                     f"{ms([c['process'] for c in cells])} | {ratio:.2f} |")
    lines += ["", "`procqueue map job.py one/ -j 2` on one input, whole process: "
              + ", ".join(f"{name} {ms(values)} ms" for name, values in commands.items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
