"""One self-contained HTML page about a run: where the time went.

A per-worker timeline (one bar per task attempt, coloured by outcome, hover for details), the
concurrency over time, the slowest inputs, the failures with their errors, and the summary
(efficiency, idle time, retries).  Inline SVG and CSS only: no script, no network, so the page
opens anywhere and can be archived with the run.
"""

from __future__ import annotations

import html
import math
from collections import defaultdict
from typing import Iterable

from .stats import TaskEvent, utilisation

COLOURS = {"ok": "#3a9d5d", "error": "#d9822b", "crash": "#c23030", "timeout": "#8f398f",
           "cancelled": "#8a9ba8"}
PLOT_WIDTH_PX = 1080
ROW_HEIGHT_PX = 22
LABEL_WIDTH_PX = 80
TOP_N = 10
CONCURRENCY_BUCKETS = 240  # time buckets of the concurrency chart
AXIS_TICKS = 5  # about this many intervals on a time axis
# (seconds per unit, unit) for axis labels, the largest unit first; an axis uses the first one
# its span reaches, so a 50 ms run reads 0 ms, 10 ms, ... and an hour-long one 0 min, 10 min.
TIME_UNITS = ((3600.0, "h"), (60.0, "min"), (1.0, "s"), (1e-3, "ms"), (1e-6, "µs"))
# A span reaches the next larger unit only from twice that unit on: 90 s reads 0 s, 20 s,...
# rather than 0 min, 0.5 min, ...
UNIT_REACHED_AT = 2.0

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1c2127}
h1{font-size:22px;margin:0 0 4px} h2{font-size:16px;margin:28px 0 8px}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:14px 0}
.card{background:#f5f8fa;border-radius:6px;padding:8px 14px;min-width:110px}
.card b{display:block;font-size:20px} .card span{color:#5c7080;font-size:12px}
table{border-collapse:collapse;font-size:13px} td,th{padding:4px 10px;text-align:left;
border-bottom:1px solid #e1e8ed} th{color:#5c7080;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums} .err{color:#c23030;max-width:700px}
.legend span{display:inline-block;margin-right:14px;font-size:12px}
.legend i{display:inline-block;width:12px;height:12px;border-radius:2px;margin-right:4px;
vertical-align:-1px} svg text{font-size:11px;fill:#5c7080} .muted{color:#5c7080}
"""


def render_report(events: Iterable[TaskEvent], title: str = "procqueue run") -> str:
    events = sorted(events, key=lambda e: (e.slot, e.start_s))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title>",
             f"<style>{CSS}</style></head><body><h1>{_e(title)}</h1>"]
    if not events:
        parts.append("<p class='muted'>No task ran.</p></body></html>")
        return "".join(parts)
    t0 = min(e.start_s for e in events)
    wall_s = max(max(e.end_s for e in events) - t0, 1e-9)
    parts += [_summary(events), _legend(), "<h2>Timeline</h2>",
              _timeline(events, t0, wall_s), "<h2>Concurrency</h2>",
              _concurrency(events, t0, wall_s), _workers_table(events, wall_s),
              _slowest_table(events), _failures_table(events), "</body></html>"]
    return "".join(parts)


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _summary(events: list[TaskEvent]) -> str:
    by_outcome: dict[str, int] = defaultdict(int)
    for e in events:
        by_outcome[e.outcome] += 1
    use = utilisation(events)  # the definition `procqueue map --stats` prints too
    inputs = len({(e.job, e.index) for e in events})
    retries = sum(1 for e in events if e.attempt > 1)
    cards = [("inputs", inputs), ("attempts", len(events)), ("ok", by_outcome["ok"]),
             ("errors", by_outcome["error"]), ("crashes", by_outcome["crash"]),
             ("timeouts", by_outcome["timeout"]), ("retries", retries),
             ("workers", use.workers), ("task span", f"{use.span_s:.2f} s"),
             ("busy time", f"{use.busy_s:.2f} s"), ("efficiency", f"{use.efficiency:.0%}"),
             ("idle time", f"{use.idle_s:.2f} s")]
    return "<div class='cards'>" + "".join(
        f"<div class='card'><b>{_e(v)}</b><span>{_e(k)}</span></div>" for k, v in cards) + "</div>"


def _legend() -> str:
    return "<div class='legend'>" + "".join(
        f"<span><i style='background:{c}'></i>{_e(o)}</span>"
        for o, c in COLOURS.items()) + "</div>"


def _x(t: float, t0: float, wall_s: float) -> float:
    return LABEL_WIDTH_PX + (t - t0) / wall_s * PLOT_WIDTH_PX


def _axis(t0: float, wall_s: float, y: float) -> str:
    ticks = []
    for t, label in axis_ticks(wall_s):
        x = _x(t0 + t, t0, wall_s)
        ticks.append(f"<line x1='{x:.1f}' x2='{x:.1f}' y1='0' y2='{y:.0f}' stroke='#e1e8ed'/>"
                     f"<text class='tick' x='{x:.1f}' y='{y + 13:.0f}' text-anchor='middle'>"
                     f"{_e(label)}</text>")
    return "".join(ticks)


def axis_ticks(span_s: float) -> list[tuple[float, str]]:
    """(offset in seconds, label) of the ticks of a time axis from 0 to `span_s`: round
    steps (1, 2 or 5 times a power of ten) in a unit the span makes readable, so that every
    label differs from its neighbours whatever the span (a fixed "0.00 s" format printed
    the same label on every tick of a 5 ms run)."""
    if not span_s > 0:  # also NaN
        return [(0.0, "0 s")]
    unit_s, unit = _time_unit(span_s)
    step = _round_step(span_s / unit_s / AXIS_TICKS)
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    count = math.floor(span_s / unit_s / step + 1e-9)
    return [(i * step * unit_s, f"{_trimmed(i * step, decimals)} {unit}")
            for i in range(count + 1)]


def _trimmed(value: float, decimals: int) -> str:
    """`value` to `decimals` places, without trailing zeros: 0.5, 1, 1.5 rather than 1.0."""
    text = f"{value:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def _time_unit(span_s: float) -> tuple[float, str]:
    for unit_s, unit in TIME_UNITS:
        if span_s >= UNIT_REACHED_AT * unit_s:
            return unit_s, unit
    return TIME_UNITS[-1]


def _round_step(raw: float) -> float:
    """The smallest of 1, 2, 5 x 10^k that is at least `raw`."""
    power = 10.0 ** math.floor(math.log10(raw))
    for factor in (1.0, 2.0, 5.0, 10.0):
        if factor * power >= raw * (1 - 1e-9):
            return factor * power
    return 10.0 * power


def _timeline(events: list[TaskEvent], t0: float, wall_s: float) -> str:
    slots = sorted({e.slot for e in events})
    row = {slot: i for i, slot in enumerate(slots)}
    height = len(slots) * ROW_HEIGHT_PX
    out = [f"<svg id='timeline' width='{LABEL_WIDTH_PX + PLOT_WIDTH_PX + 20}' "
           f"height='{height + 20}' role='img' aria-label='task timeline'>",
           _axis(t0, wall_s, height)]
    for slot in slots:
        y = row[slot] * ROW_HEIGHT_PX
        out.append(f"<text x='0' y='{y + 15}'>worker {slot}</text>")
    for e in events:
        x = _x(e.start_s, t0, wall_s)
        # a failure is often instantaneous: keep it visible
        width = max(e.seconds / wall_s * PLOT_WIDTH_PX, 1.0 if e.outcome == "ok" else 4.0)
        y = row[e.slot] * ROW_HEIGHT_PX + 3
        tip = f"{e.input_repr} — {e.seconds:.3f} s, attempt {e.attempt}, {e.outcome}"
        if e.error:
            tip += f": {e.error}"
        tip += f" (pid {e.pid})"
        out.append(f"<rect class='task-bar' data-outcome='{_e(e.outcome)}' x='{x:.2f}' "
                   f"y='{y}' width='{width:.2f}' height='{ROW_HEIGHT_PX - 6}' rx='2' "
                   f"fill='{COLOURS.get(e.outcome, '#999')}' stroke='#fff' stroke-width='0.5'>"
                   f"<title>{_e(tip)}</title></rect>")
    out.append("</svg>")
    return "".join(out)


def _concurrency(events: list[TaskEvent], t0: float, wall_s: float) -> str:
    """Average number of running tasks per time bucket (instantaneous counts flicker at
    every task boundary), as an area."""
    height, buckets = 90, CONCURRENCY_BUCKETS
    width_s = wall_s / buckets
    load = [0.0] * buckets
    for e in events:
        first = int((e.start_s - t0) / width_s)
        last = min(int((e.end_s - t0) / width_s), buckets - 1)
        for b in range(max(first, 0), last + 1):
            lo, hi = t0 + b * width_s, t0 + (b + 1) * width_s
            load[b] += max(0.0, min(hi, e.end_s) - max(lo, e.start_s)) / width_s
    peak = max(max(load), 1.0)
    scale = (height - 10) / peak
    points = [f"{_x(t0, t0, wall_s):.1f},{height}"]
    for b, value in enumerate(load):
        for edge in (b, b + 1):
            points.append(f"{_x(t0 + edge * width_s, t0, wall_s):.1f},{height - value * scale:.1f}")
    points.append(f"{_x(t0 + wall_s, t0, wall_s):.1f},{height}")
    return (f"<svg id='concurrency' width='{LABEL_WIDTH_PX + PLOT_WIDTH_PX + 20}' "
            f"height='{height + 20}' role='img' aria-label='running tasks over time'>"
            f"{_axis(t0, wall_s, height)}<text x='0' y='12'>peak {peak:.1f}</text>"
            f"<polygon fill='#bfd4ee' stroke='#2b6cb0' stroke-width='1' "
            f"points='{' '.join(points)}'/></svg>")


def _workers_table(events: list[TaskEvent], wall_s: float) -> str:
    rows = []
    for slot in sorted({e.slot for e in events}):
        mine = [e for e in events if e.slot == slot]
        busy = sum(e.seconds for e in mine)
        pids = len({e.pid for e in mine})
        rows.append(f"<tr><td>worker {slot}</td><td class='num'>{len(mine)}</td>"
                    f"<td class='num'>{busy:.2f} s</td>"
                    f"<td class='num'>{max(wall_s - busy, 0):.2f} s</td>"
                    f"<td class='num'>{pids - 1}</td></tr>")
    return ("<h2>Workers</h2><table><tr><th>slot</th><th>attempts</th><th>busy</th>"
            "<th>idle</th><th>restarts</th></tr>" + "".join(rows) + "</table>")


def _slowest_table(events: list[TaskEvent]) -> str:
    slowest = sorted(events, key=lambda e: e.seconds, reverse=True)[:TOP_N]
    rows = "".join(f"<tr><td class='num'>{e.seconds:.3f} s</td><td>{_e(e.input_repr)}</td>"
                   f"<td>{_e(e.outcome)}</td><td>worker {e.slot}</td></tr>" for e in slowest)
    return ("<h2>Slowest inputs</h2><table><tr><th>time</th><th>input</th><th>outcome</th>"
            "<th>where</th></tr>" + rows + "</table>")


def _failures_table(events: list[TaskEvent]) -> str:
    failed = [e for e in events if e.outcome != "ok"]
    if not failed:
        return "<h2>Failures</h2><p class='muted'>None.</p>"
    rows = "".join(f"<tr><td>{_e(e.input_repr)}</td><td>{_e(e.outcome)}</td>"
                   f"<td class='num'>{e.attempt}</td><td class='err'>{_e(e.error or '')}</td></tr>"
                   for e in failed)
    return ("<h2>Failures</h2><table><tr><th>input</th><th>outcome</th><th>attempt</th>"
            "<th>error</th></tr>" + rows + "</table>")
