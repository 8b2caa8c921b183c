"""Issue #6's benchmark suite: procqueue against the pools a user would pick instead.

    python bench/suite.py                                   # everything (~10 min on 2 cores)
    python bench/suite.py --workloads tiny --systems procqueue,mp,joblib --repeat 5
    python bench/suite.py --scale 0.3 --repeat 2            # a quick look

Every (workload, system, api) cell runs in a fresh interpreter (harness.run_in_fresh_process).
A *round* runs every selected cell once, in an order shuffled with a fixed seed (the same
order every run; noise spreads over all systems); ratios such as "procqueue.imap vs the best
peer" are computed inside each round, between cells minutes apart at most, then summarised
over rounds (median, min).  The busy loop's calibration is cached in
<out>/calibration.json, so reruns do the same work per task (--recalibrate to redo it).

Writes <out>/latest.md (tables, ratios, issue targets), <out>/latest.json (every raw row, the
summary, the environment) and <out>/latest.png.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

# E402 is expected: bench/ must be on sys.path (just above) before its own modules import
import harness  # noqa: E402
from cases import WORKLOADS, busy, warm  # noqa: E402
from systems import SLOW_ON_TINY, SLOW_TINY_TASKS, SYSTEMS, UNORDERED_APIS  # noqa: E402

DEFAULT_OUT = HERE / "results" / "suite"
WARM_UP_TASKS_PER_WORKER = 4
PEERS_EXCLUDED_FROM_BEST = {("tiny", "mp", "map")}  # mp.map pre-chunks a list: judged apart
IMPORTS = {"procqueue": ["procqueue", "procqueue.pool"], "mp": ["multiprocessing.pool"],
           "ppe": ["concurrent.futures.process"], "loky": ["loky"], "mpire": ["mpire"],
           "joblib": ["joblib", "joblib.externals.loky"], "serial": []}


# ---- one cell (in its own interpreter) ------------------------------------------------------

def run_cell(spec: dict[str, Any]) -> dict[str, Any]:
    workload = WORKLOADS[spec["workload"]](spec["scale"], spec["per_ms"])
    system = SYSTEMS[spec["system"]]()
    api, jobs = spec["api"], spec["jobs"]
    xs = workload.inputs
    if workload.name == "tiny" and (system.name, api) in SLOW_ON_TINY:
        xs = xs[:min(len(xs), SLOW_TINY_TASKS)]
    for module in IMPORTS[system.name]:
        importlib.import_module(module)  # imports are not the pool's start-up cost
    if workload.name == "startup":
        # No memory sampler: its thread would make procqueue's pool use the shared fork
        # server (a program with threads is not forked: procqueue/program_fork.py)
        _, m = harness.measure_call(lambda: system.startup(jobs, workload.fn), sample_rss=False)
        return _row(spec, len(xs), m)
    prepared = system.prepare(api, xs)
    system.open(jobs)
    try:
        warm_xs = xs[:1] * (WARM_UP_TASKS_PER_WORKER * jobs)  # numpy imported in workers too
        system.call(api, warm, system.prepare(api, warm_xs))
        results, m = harness.measure_call(lambda: system.call(api, workload.fn, prepared),
                                          system.supervisor_thread)
    finally:
        system.close()
    if api in UNORDERED_APIS:
        results, expected = sorted(results), sorted(workload.meta.get("check") or [])
        if expected and results != expected[:len(results)]:
            raise AssertionError("wrong results")
    elif "check" in workload.meta and (
            len(results) != len(xs) or results[::97] != workload.meta["check"][:len(xs)][::97]):
            raise AssertionError(f"wrong results ({len(results)} for {len(xs)} inputs)")
    if len(results) != len(xs):
        raise AssertionError(f"{len(results)} results for {len(xs)} inputs")
    return _row(spec, len(xs), m)


def _row(spec: dict[str, Any], tasks: int, m: harness.Measurement) -> dict[str, Any]:
    return {**{k: spec[k] for k in ("workload", "system", "api", "round")}, "tasks": tasks,
            "wall_s": m.wall_s, "parent_cpu_s": m.parent_cpu_s, "caller_cpu_s": m.caller_cpu_s,
            "supervisor_cpu_s": m.supervisor_cpu_s, "peak_rss_mb": m.peak_rss_bytes / 2**20,
            "loadavg_1min": os.getloadavg()[0]}


# ---- summary --------------------------------------------------------------------------------

def derive(rows: list[dict[str, Any]], jobs: int) -> None:
    """Per-row figures that need the same round's serial cell: efficiency, x serial."""
    serial = {(r["workload"], r["round"]): r["wall_s"] for r in rows
              if r["system"] == "serial" and "wall_s" in r}
    for r in rows:
        if "wall_s" not in r:
            continue
        r["tasks_per_s"] = r["tasks"] / r["wall_s"] if r["wall_s"] > 0 else float("inf")
        r["parent_cpu_us_per_task"] = r["parent_cpu_s"] / r["tasks"] * 1e6
        if r.get("supervisor_cpu_s") is not None:
            r["supervisor_cpu_us_per_task"] = r["supervisor_cpu_s"] / r["tasks"] * 1e6
        base = serial.get((r["workload"], r["round"]))
        if base and r["workload"] in ("cpu_1ms", "cpu_10ms", "uneven", "big_args"):
            per_task_serial = base / _serial_tasks(rows, r["workload"])
            r["efficiency"] = per_task_serial * r["tasks"] / (jobs * r["wall_s"])
            r["x_serial"] = r["wall_s"] / (per_task_serial * r["tasks"])


def _serial_tasks(rows: list[dict[str, Any]], workload: str) -> int:
    return next(r["tasks"] for r in rows if r["workload"] == workload and r["system"] == "serial")


FIGURES = ["wall_s", "tasks_per_s", "efficiency", "x_serial", "parent_cpu_us_per_task",
           "supervisor_cpu_us_per_task", "peak_rss_mb"]
HIGHER_IS_BETTER = {"tasks_per_s": True, "efficiency": True, "wall_s": False, "x_serial": False}
JUDGED_BY = {"tiny": "tasks_per_s", "cpu_1ms": "efficiency", "cpu_10ms": "efficiency",
             "uneven": "efficiency", "big_args": "wall_s", "startup": "wall_s"}


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    cells: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        cells.setdefault((r["workload"], r["system"], r["api"]), []).append(r)
    table = []
    for (w, s, a), runs in sorted(cells.items()):
        ok = [r for r in runs if "wall_s" in r]
        entry: dict[str, Any] = {"workload": w, "system": s, "api": a,
                                 "ok_runs": len(ok), "runs": len(runs)}
        if not ok:
            entry["error"] = runs[0].get("error", "failed")
        else:
            entry["tasks"] = ok[0]["tasks"]
            for fig in FIGURES:
                stats = harness.spread(r.get(fig) for r in ok)
                if stats:
                    entry[fig] = stats
            errors = [r["error"] for r in runs if "error" in r]
            if errors:
                entry["error"] = errors[0]
        table.append(entry)
    return table


def ratio(a: float, b: float, higher_is_better: bool) -> float:
    """How many times better a is than b (>1: a is better)."""
    if higher_is_better:
        return a / b if b else float("inf")
    return b / a if a else float("inf")


def per_round_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For every procqueue API and workload: its figure against the best peer and against each
    peer cell, computed inside each round, then median and min over the rounds."""
    by_round: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        if "wall_s" in r:
            by_round.setdefault((r["workload"], r["round"]), []).append(r)
    collected: dict[tuple[str, str, str], list[float]] = {}
    best_names: dict[str, set[str]] = {}
    for (w, _), rs in by_round.items():
        fig = JUDGED_BY[w]
        hib = HIGHER_IS_BETTER[fig]
        peers = [r for r in rs if r["system"] not in ("procqueue", "serial")
                 and (w, r["system"], r["api"]) not in PEERS_EXCLUDED_FROM_BEST and fig in r]
        if not peers:
            continue
        best = max(peers, key=lambda r: r[fig] if hib else -r[fig])
        best_names.setdefault(w, set()).add(f"{best['system']}.{best['api']}")
        for mine in (r for r in rs if r["system"] == "procqueue" and fig in r):
            collected.setdefault((w, mine["api"], "best peer"), []).append(
                ratio(mine[fig], best[fig], hib))
            for p in rs:
                if p["system"] not in ("procqueue", "serial") and fig in p:
                    collected.setdefault((w, mine["api"], f"{p['system']}.{p['api']}"), []).append(
                        ratio(mine[fig], p[fig], hib))
    out = []
    for (w, api, versus), values in sorted(collected.items()):
        out.append({"workload": w, "api": api, "versus": versus, "figure": JUDGED_BY[w],
                    **harness.spread(values),
                    "best_peer_was": (sorted(best_names.get(w, ()))
                                      if versus == "best peer" else None)})
    return out


def _med(table: list[dict[str, Any]], w: str, s: str, a: str, fig: str) -> float | None:
    for e in table:
        if (e["workload"], e["system"], e["api"]) == (w, s, a) and fig in e:
            return float(e[fig]["median"])
    return None


def _ratio_med(ratios: list[dict[str, Any]], w: str, api: str, versus: str) -> float | None:
    for r in ratios:
        if (r["workload"], r["api"], r["versus"]) == (w, api, versus):
            return float(r["median"])
    return None


def targets(table: list[dict[str, Any]], ratios: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue #6's targets, each checked on the medians of this run."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, goal: float, at_least: bool = True) -> None:
        if value is None:
            out.append({"target": name, "value": None, "goal": goal, "ok": None})
            return
        ok = value >= goal if at_least else value <= goal
        out.append({"target": name, "value": value, "goal": goal, "ok": ok,
                    "sense": ">=" if at_least else "<="})

    for api in ("imap", "imap_unordered"):
        add(f"tiny {api}: x mp.imap tasks/s", _ratio_med(ratios, "tiny", api, "mp.imap"), 10)
        add(f"tiny {api}: x best peer tasks/s (mp.map excluded)",
            _ratio_med(ratios, "tiny", api, "best peer"), 1.5)
    r = _ratio_med(ratios, "tiny", "map", "mp.map")
    add("tiny map: time / mp.map time", None if r is None else 1 / r, 1.5, at_least=False)
    add("tiny submit: x ppe.submit tasks/s", _ratio_med(ratios, "tiny", "submit", "ppe.submit"), 5)
    for w, goal in (("cpu_1ms", 0.95), ("cpu_10ms", 0.97)):
        for api in ("map", "imap", "submit"):
            add(f"{w} {api}: efficiency", _med(table, w, "procqueue", api, "efficiency"), goal)
    add("uneven map: efficiency", _med(table, "uneven", "procqueue", "map", "efficiency"), 0.95)
    for api in ("map", "imap", "submit"):
        add(f"big_args {api}: x fastest peer", _ratio_med(ratios, "big_args", api, "best peer"), 3)
    loky = _med(table, "startup", "loky", "startup", "wall_s")
    mine = _med(table, "startup", "procqueue", "startup", "wall_s")
    add("startup: time / loky's", None if not (loky and mine) else mine / loky, 1.0,
        at_least=False)
    for api in ("map", "imap"):
        add(f"tiny {api}: supervisor thread CPU us/task",
            _med(table, "tiny", "procqueue", api, "supervisor_cpu_us_per_task"), 5.0, False)
    mpire = _med(table, "tiny", "mpire", "map", "peak_rss_mb")
    mine = _med(table, "tiny", "procqueue", "imap", "peak_rss_mb")
    add("tiny imap: peak tree RSS / mpire.map's", None if not (mpire and mine) else mine / mpire,
        1.0, at_least=False)
    return out


# ---- reports --------------------------------------------------------------------------------

def _f(entry: dict[str, Any], fig: str, fmt: str = "{:.3g}") -> str:
    """median (best of the rounds): noise only ever makes a figure worse, so the best round
    is the least disturbed one."""
    if fig not in entry:
        return ""
    s = entry[fig]
    best = s["max"] if HIGHER_IS_BETTER.get(fig, False) else s["min"]
    return fmt.format(s["median"]) + (f" ({fmt.format(best)})" if s["n"] > 1 else "")


def markdown(result: dict[str, Any]) -> str:
    env, args = result["environment"], result["args"]
    title = (f"# procqueue benchmark suite ({args['jobs']} workers, {args['repeat']} rounds, "
             f"scale {args['scale']:g})")
    setting = (f"{env['when']}, Python {env['python']}, {env['cpus']} CPUs "
               f"(load at start {env['loadavg_start'][0]:.2f}), procqueue "
               f"{env['procqueue_commit']}{' +local changes' if env['procqueue_dirty'] else ''}; "
               f"busy loop {result['calibration']['iterations_per_ms']} iterations/ms.  "
               "Figures: median (best) over rounds; each cell in a fresh process on a warmed "
               "pool.")
    header = ("| workload | figure | procqueue api | vs best peer | best peer was | "
              "vs mp.Pool | vs ppe |")
    lines = [title, "", setting, "",
             "## Ratios, procqueue vs peers (computed within each round; median [min-max])", "",
             header, "|---|---|---|---|---|---|---|"]
    ratios = result["ratios"]
    for w in WORKLOADS:
        for api in ("map", "imap", "imap_unordered", "submit", "startup"):
            best = next((r for r in ratios if (r["workload"], r["api"], r["versus"])
                         == (w, api, "best peer")), None)
            if best is None:
                continue

            def vs(name: str, w: str = w, api: str = api) -> str:
                r = next((r for r in ratios if (r["workload"], r["api"], r["versus"])
                          == (w, api, name)), None)
                return "" if r is None else (f"{r['median']:.2f}x "
                                             f"[{r['min']:.2f}-{r['max']:.2f}]")
            mp_api = api if api in ("map", "startup") else "imap"
            ppe_api = api if api in ("submit", "startup") else "map"
            lines.append(f"| {w} | {JUDGED_BY[w]} | {api} | {best['median']:.2f}x "
                         f"[{best['min']:.2f}-{best['max']:.2f}] | "
                         f"{', '.join(best['best_peer_was'])} | "
                         f"{vs('mp.' + mp_api)} | {vs('ppe.' + ppe_api)} |")
    note = ("A ratio > 1 means procqueue is better (more tasks/s, higher efficiency, less "
            "time).  'best peer' excludes mp.map on tiny (judged separately: it pre-chunks the "
            "whole list).")
    lines += ["", note, "", "## Issue #6 targets", "",
              "| target | value | goal | met |", "|---|---|---|---|"]
    for t in result["targets"]:
        value = "n/a" if t["value"] is None else f"{t['value']:.3g}"
        met = "?" if t["ok"] is None else ("yes" if t["ok"] else "**no**")
        lines.append(f"| {t['target']} | {value} | {t.get('sense', '')} {t['goal']:g} | {met} |")
    header = ("| workload | system | api | tasks | wall s | tasks/s | efficiency | x serial | "
              "parent CPU us/task | supervisor CPU us/task | peak tree RSS MB |")
    lines += ["", "## All cells", "", header, "|" + "---|" * 11]
    for e in sorted(result["table"], key=lambda e: (list(WORKLOADS).index(e["workload"]),
                                                   e["system"] != "procqueue", e["system"],
                                                   e["api"])):
        if "tasks" not in e:
            lines.append(f"| {e['workload']} | {e['system']} | {e['api']} | error: "
                         f"{e['error'][:80]} |" + " |" * 7)
            continue
        err = f" ({e['runs'] - e['ok_runs']} failed)" if e["ok_runs"] < e["runs"] else ""
        lines.append(
            f"| {e['workload']} | {e['system']} | {e['api']}{err} | {e['tasks']} | "
            f"{_f(e, 'wall_s')} | {_f(e, 'tasks_per_s', '{:,.0f}')} | "
            f"{_f(e, 'efficiency', '{:.2f}')} | "
            f"{_f(e, 'x_serial', '{:.1f}')} | {_f(e, 'parent_cpu_us_per_task', '{:.1f}')} | "
            f"{_f(e, 'supervisor_cpu_us_per_task', '{:.1f}')} | {_f(e, 'peak_rss_mb', '{:.0f}')} |")
    legend = ("Parent CPU: the calling process, every thread (caller, supervisor, feeders, "
              "result handlers), during the timed call, per task; the RSS sampler's own CPU is "
              "subtracted.  Supervisor CPU: procqueue's supervisor thread alone.  Peak tree "
              "RSS: the calling process and all its descendants, sampled every 20 ms.  "
              "Efficiency: serial time / (workers x wall time), serial measured in the same "
              "round.")
    lines += ["", legend]
    return "\n".join(lines) + "\n"


def plot(table: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"tiny": "tiny: tasks/s (log, higher is better)",
              "cpu_1ms": "cpu_1ms: efficiency", "cpu_10ms": "cpu_10ms: efficiency",
              "uneven": "uneven: efficiency",
              "big_args": "big_args: wall s (lower is better)",
              "startup": "startup: wall s (lower is better)"}
    fig, axes = plt.subplots(2, 3, figsize=(17, 9))
    for ax, (w, title) in zip(axes.flat, titles.items()):
        key = JUDGED_BY[w]
        es = [e for e in table if e["workload"] == w and key in e and e["system"] != "serial"]
        es.sort(key=lambda e: e[key]["median"])
        if not es:
            ax.set_visible(False)
            continue
        med = [e[key]["median"] for e in es]
        lo = [m - e[key]["min"] for m, e in zip(med, es)]
        hi = [e[key]["max"] - m for m, e in zip(med, es)]
        ax.barh([f"{e['system']}.{e['api']}" for e in es], med, xerr=[lo, hi],
                color=["#2b6cb0" if e["system"] == "procqueue" else "#a0aec0" for e in es])
        if w == "tiny":
            ax.set_xscale("log")
        if key == "efficiency":
            ax.axvline(1.0, color="k", lw=0.5)
        ax.set_title(title, fontsize=10)
        ax.tick_params(labelsize=8)
    fig.suptitle("procqueue (blue) vs peers; bars: median, whiskers: min..max over rounds")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---- driver ---------------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--apis", default="", help="only these APIs, e.g. imap,map (serial kept)")
    p.add_argument("--repeat", type=int, default=3, help="rounds (each cell once per round)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--scale", type=float, default=1.0, help="multiply every task count")
    p.add_argument("--seed", type=int, default=6, help="cell order within rounds")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--recalibrate", action="store_true")
    p.add_argument("--report", type=Path, metavar="JSON",
                   help="only rewrite the .md and .png of <out> from a saved latest.json")
    p.add_argument("--cell", help=argparse.SUPPRESS)  # internal: run one cell, print JSON
    args = p.parse_args()
    if args.cell:
        print(json.dumps(run_cell(json.loads(args.cell))))
        return
    if args.report:
        write_reports(json.loads(args.report.read_text()), args.out)
        return
    workloads = args.workloads.split(",")
    systems = args.systems.split(",")
    for name in workloads:
        if name not in WORKLOADS:
            p.error(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    for name in systems:
        if name not in SYSTEMS:
            p.error(f"unknown system {name!r}; choose from {', '.join(SYSTEMS)}")
    if any(w in ("cpu_1ms", "cpu_10ms", "uneven", "big_args") for w in workloads) and \
            "serial" not in systems:
        systems.append("serial")  # efficiency needs the same round's serial time
    apis = set(filter(None, args.apis.split(",")))
    cells = [(w, s, a) for w in workloads for s in systems
             for a in (("startup",) if w == "startup" else SYSTEMS[s].apis)
             if not apis or a in apis or s == "serial" or w == "startup"]
    harness.compile_procqueue()
    calibration = harness.load_or_calibrate(args.out / "calibration.json", busy, args.recalibrate)
    env = harness.environment()
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for round_ in range(args.repeat):
        order = cells[:]
        random.Random(args.seed * 1000 + round_).shuffle(order)
        for w, s, a in order:
            spec = {"workload": w, "system": s, "api": a, "round": round_, "jobs": args.jobs,
                    "scale": args.scale, "per_ms": calibration["iterations_per_ms"]}
            row = harness.run_in_fresh_process([str(HERE / "suite.py"), "--cell", json.dumps(spec)])
            row = {**{k: spec[k] for k in ("workload", "system", "api", "round")}, **row}
            rows.append(row)
            print(f"[{round_ + 1}/{args.repeat} {time.perf_counter() - started:6.0f}s] "
                  f"{w:9s} {s:10s} {a:15s} "
                  + (f"{row['wall_s']:8.3f} s" if "wall_s" in row else row.get("error", "")),
                  file=sys.stderr, flush=True)
    derive(rows, args.jobs)
    table = summarise(rows)
    ratios = per_round_ratios(rows)
    env["loadavg_end"] = os.getloadavg()
    env["suite_wall_s"] = time.perf_counter() - started
    result = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "environment": env, "calibration": calibration, "rows": rows, "table": table,
              "ratios": ratios, "targets": targets(table, ratios)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(result, indent=1, default=str))
    write_reports(result, args.out)


def write_reports(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(result)
    (out / "latest.md").write_text(text)
    try:
        plot(result["table"], out / "latest.png")
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
    print(text)


if __name__ == "__main__":
    main()
