"use strict";
// The dashboard page: one event stream of snapshots (server-sent events) redraws the live
// parts; the task tables are fetched a page at a time, never whole.  Every value from the
// server goes into the page as text (textContent), never as markup.
(() => {
  const TOKEN = new URLSearchParams(location.search).get("token") || "";
  const KIND = document.body.dataset.kind;
  const PAGE_ROWS = 50;
  const MIN_TABLE_REFRESH_MS = 2000; // a live table refetches at most this often...
  const TABLE_COST_FACTOR = 10; // ...or, if a fetch is slow, at most 1/10 of the time
  const STATUSES = ["pending", "running", "succeeded", "failed", "cancelled"];
  const COLOURS = {ok: "#3a9d5d", error: "#d9822b", crash: "#c23030", timeout: "#8f398f",
                   cancelled: "#8a9ba8"};

  const $ = (id) => document.getElementById(id);
  let serverSkewS = 0; // server clock minus ours, from each snapshot
  const serverNow = () => Date.now() / 1000 + serverSkewS;

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "text") node.textContent = v;
      else if (k === "class") node.className = v;
      else if (k === "dataset") Object.assign(node.dataset, v);
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children) {
      if (c === null || c === undefined || c === false) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c));
    return node;
  }

  // Put `fresh` (new, detached nodes) in `parent`, keeping every child whose content and
  // attributes did not change: a redraw each second then touches only the cells that moved,
  // which is what the browser spends its time laying out and painting.
  function sync(parent, fresh) {
    const old = Array.from(parent.children);
    const same = old.length === fresh.length && old.every((n, i) =>
      n.tagName === fresh[i].tagName && n.children.length === fresh[i].children.length);
    if (!same) {
      parent.replaceChildren(...fresh);
      return;
    }
    old.forEach((node, i) => {
      const cells = Array.from(node.children), next = Array.from(fresh[i].children);
      if (!cells.length || node.attributes.length !== fresh[i].attributes.length ||
          Array.from(node.attributes).some((a) => fresh[i].getAttribute(a.name) !== a.value)) {
        if (!node.isEqualNode(fresh[i])) node.replaceWith(fresh[i]);
        return;
      }
      cells.forEach((cell, j) => { if (!cell.isEqualNode(next[j])) cell.replaceWith(next[j]); });
    });
  }

  // ---- formatting ------------------------------------------------------------------------

  // formatters made once: toLocaleString() builds one per call, the page's costliest script
  const INTEGER = new Intl.NumberFormat("en");
  const CLOCK = new Intl.DateTimeFormat(undefined, {hour: "numeric", minute: "2-digit",
                                                    second: "2-digit"});
  const fmtInt = (n) => (n === null || n === undefined) ? "–" : INTEGER.format(n);
  function fmtDuration(s) {
    if (s === null || s === undefined || !isFinite(s)) return "–";
    if (s < 1) return `${Math.round(s * 1000)} ms`;
    if (s < 60) return `${Number.isInteger(s) ? s : s.toFixed(s < 10 ? 2 : 1)} s`;
    const two = (big, bigUnit, small, smallUnit) =>
      `${big} ${bigUnit}` + (small ? ` ${small} ${smallUnit}` : "");
    if (s < 3600) return two(Math.floor(s / 60), "min", Math.floor(s % 60), "s");
    if (s < 86400) return two(Math.floor(s / 3600), "h", Math.floor((s % 3600) / 60), "min");
    return two(Math.floor(s / 86400), "d", Math.floor((s % 86400) / 3600), "h");
  }
  const fmtAgo = (t) => (t ? `${fmtDuration(Math.max(serverNow() - t, 0))} ago` : "–");
  function fmtBytes(n) {
    if (!n) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return `${n.toFixed(n < 10 && i ? 1 : 0)} ${units[i]}`;
  }
  const fmtWhen = (t) => (t ? CLOCK.format(new Date(t * 1000)) : "–");

  // ---- talking to the server -------------------------------------------------------------

  async function getJSON(path, params) {
    const query = new URLSearchParams();
    for (const [k, v] of Object.entries(params || {})) {
      if (v !== null && v !== undefined && v !== "") query.set(k, v);
    }
    const response = await fetch(`${path}?${query}`, {headers: {"X-Procqueue-Token": TOKEN}});
    if (!response.ok) throw new Error(`${response.status} ${await response.text()}`);
    return response.json();
  }

  async function act(action, ids) {
    // the token in a header and a same-origin POST: the server checks both, and the Origin
    const response = await fetch(`/api/${action}`, {
      method: "POST", headers: {"Content-Type": "application/json", "X-Procqueue-Token": TOKEN},
      body: JSON.stringify({ids})});
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(body.error || `${response.status}`);
    return body.changed || [];
  }

  let toastTimer = null;
  function toast(message) {
    const node = $("toast");
    node.textContent = message;
    node.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { node.hidden = true; }, 4000);
  }

  // ---- the live parts --------------------------------------------------------------------

  function setLive(state, text) {
    const node = $("live");
    node.className = `live ${state}`;
    node.querySelector("span").textContent = text;
  }

  function show(id, visible) { $(id).hidden = !visible; }

  function renderTotals(snap) {
    const cards = [];
    if (snap.queues) {
      const sum = Object.fromEntries(STATUSES.map((s) => [s, 0]));
      for (const q of snap.queues) for (const s of STATUSES) sum[s] += q[s];
      for (const s of STATUSES) cards.push([s, fmtInt(sum[s]), s]);
      cards.push(["services", fmtInt((snap.services || []).length), "services"]);
    }
    if (snap.batch) {
      const b = snap.batch;
      cards.push(["done", `${fmtInt(b.done)}${b.total !== null ? " / " + fmtInt(b.total) : ""}`,
                  "done"]);
      cards.push(["running", fmtInt(b.running), "running"]);
      cards.push(["failed", fmtInt(b.failed), "failed"]);
      cards.push(["retries", fmtInt(b.retries), "retries"]);
      cards.push(["workers", fmtInt(b.workers), "workers"]);
      cards.push(["elapsed", fmtDuration(b.elapsed_s), "elapsed"]);
      if (b.efficiency !== null) cards.push(["efficiency", `${Math.round(b.efficiency * 100)}%`,
                                             "efficiency"]);
    }
    const rate = rateNow(snap.throughput);
    if (rate !== null) cards.push(["tasks/s", rate.toFixed(rate < 10 ? 1 : 0), "rate"]);
    sync($("totals"), cards.map(([label, value, key]) =>
      el("div", {class: `card ${key}`, dataset: {total: key}}, el("b", {text: value}),
         el("span", {text: label}))));
  }

  function limitChips(q) {
    const chips = [];
    for (const limit of q.limits) {
      if (limit.kind === "concurrency") {
        chips.push(meterChip(`concurrency ${limit.used}/${limit.of}`, limit.used, limit.of));
      } else if (limit.kind === "worker_concurrency") {
        chips.push(el("span", {class: "chip", text: `≤ ${limit.of} per service`}));
      } else if (limit.kind === "rate") {
        chips.push(meterChip(`rate ${limit.used}/${limit.of} per ${fmtDuration(limit.per_s)}`,
                             limit.used, limit.of));
      } else if (limit.kind === "key_concurrency") {
        const busy = limit.busiest.map(([k, n]) => `${k} ${n}/${limit.of}`).join(", ");
        chips.push(el("span", {class: "chip", title: "running tasks of the busiest keys",
                               text: `≤ ${limit.of} per key${busy ? ": " + busy : ""}`}));
      }
    }
    if (q.retries) chips.push(el("span", {class: "chip", text: `retries ${q.retries}`}));
    return chips.length ? chips : [el("span", {class: "muted", text: "none"})];
  }

  function meterChip(text, used, of) {
    const meter = el("span", {class: "meter" + (used >= of ? " full" : "")}, el("i"));
    meter.firstChild.style.width = `${Math.min(100, (100 * used) / Math.max(of, 1))}%`;
    return el("span", {class: "chip"}, text, meter);
  }

  function renderQueues(queues) {
    $("queues").tBodies[0].replaceChildren(...queues.map((q) => el("tr", {dataset: {queue: q.name}},
      el("td", {text: q.name}),
      ...STATUSES.map((s) => el("td", {class: "num", dataset: {count: s}, text: fmtInt(q[s])})),
      el("td", {class: "limits"}, ...limitChips(q)))));
    if (!queues.length) {
      $("queues").tBodies[0].replaceChildren(el("tr", {}, el("td", {colspan: 7, class: "muted",
                                                               text: "no queue yet"})));
    }
    for (const id of ["failures-queue", "tasks-queue"]) fillQueueSelect($(id), queues);
  }

  function fillQueueSelect(select, queues) {
    const names = queues.map((q) => q.name);
    const have = Array.from(select.options).slice(1).map((o) => o.value);
    if (names.join("\n") === have.join("\n")) return;
    const chosen = select.value;
    select.replaceChildren(el("option", {value: "", text: "every queue"}),
                           ...names.map((n) => el("option", {value: n, text: n})));
    select.value = names.includes(chosen) ? chosen : "";
  }

  function renderServices(services) {
    const body = $("services").tBodies[0];
    if (!services.length) {
      body.replaceChildren(el("tr", {}, el("td", {colspan: 7, class: "muted",
                                                 text: "no worker service alive"})));
      return;
    }
    sync(body, services.map((s) => el("tr", {dataset: {service: s.id}},
      el("td", {text: s.host}), el("td", {class: "num", text: s.pid}),
      el("td", {class: "num", text: s.jobs}), el("td", {class: "num", text: s.running}),
      el("td", {text: s.queues.length ? s.queues.join(", ") : "every queue"}),
      el("td", {text: fmtDuration(serverNow() - s.started_at)}),
      el("td", {text: `${s.heartbeat_age_s.toFixed(1)} s ago`}))));
  }

  function renderWorkers(workers) {
    // a store's workers are named by service (host · service pid · slot); a pool's by slot
    sync($("workers").tBodies[0], workers.map((w) => el("tr", {dataset: {slot: w.slot}},
      el("td", {text: w.name ?? `worker ${w.slot}`}),
      el("td", {class: "num", text: w.pid ?? "–"}),
      el("td", {class: "input", text: w.task ?? "idle"}),
      el("td", {class: "num", text: w.task_s === null ? "" : fmtDuration(w.task_s)}),
      el("td", {class: "num", text: w.cpu_percent === null ? "–" : `${Math.round(w.cpu_percent)}%`}),
      el("td", {class: "num", text: fmtBytes(w.rss_bytes)}),
      el("td", {class: "num", text: fmtInt(w.tasks_done)}),
      el("td", {class: "num", text: w.restarts, title: w.last_exit || ""}))));
  }

  function rateNow(throughput) {
    if (!throughput) return null;
    const {bucket_s: bucket, series} = throughput;
    // the last complete bucket: the current one is still filling
    const current = Math.floor(serverNow() / bucket) * bucket;
    const complete = series.filter(([t]) => t < current);
    if (!complete.length && series.length) return null; // it all began in this bucket: unknown
    const last = complete.pop();
    return last && last[0] >= current - bucket ? (last[1] + last[2]) / bucket : 0;
  }

  function renderThroughput(throughput, current) {
    const {bucket_s: bucket, window_s: windowS, series} = throughput;
    // drawn at the width it is shown at, so that its text stays readable on a phone
    const W = Math.max(Math.min(chartWidth("throughput"), 1100), 300), H = 130;
    const left = 44, bottom = 18;
    const n = Math.round(windowS / bucket);
    const end = current * bucket; // the start of the bucket filling now
    const start = end - n * bucket;
    const byStart = new Map(series.map(([t, ok, failed]) => [Math.round(t / bucket), [ok, failed]]));
    let peak = 1;
    for (const [, [ok, failed]] of byStart) peak = Math.max(peak, ok + failed);
    const barW = (W - left) / n;
    const y = (v) => (H - bottom) * (1 - v / peak);
    const out = svg("svg", {viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img",
                            "aria-label": "tasks ended per interval"});
    out.append(svg("text", {x: 0, y: 10}, `${peak}`), svg("text", {x: 0, y: H - bottom}, "0"));
    out.append(svg("line", {x1: left, x2: W, y1: H - bottom, y2: H - bottom, stroke: "#8a9ba8",
                            "stroke-width": 0.5}));
    for (let i = 0; i < n; i++) {
      const t = start + i * bucket;
      const [ok, failed] = byStart.get(Math.round(t / bucket)) || [0, 0];
      if (!ok && !failed) continue;
      const x = left + i * barW;
      const title = `${fmtWhen(t)}: ${ok} succeeded, ${failed} failed`;
      if (ok) out.append(svg("rect", {x, y: y(ok), width: Math.max(barW - 1, 1),
        height: H - bottom - y(ok), fill: COLOURS.ok}, svg("title", {}, title)));
      if (failed) out.append(svg("rect", {x, y: y(ok + failed), width: Math.max(barW - 1, 1),
        height: y(ok) - y(ok + failed), fill: COLOURS.crash}, svg("title", {}, title)));
    }
    for (const frac of [0, 0.5, 1]) {
      const label = frac === 1 ? "now" : `−${fmtDuration(windowS * (1 - frac))}`;
      out.append(svg("text", {x: left + frac * (W - left), y: H - 3,
                              "text-anchor": frac === 0 ? "start" : frac === 1 ? "end" : "middle"},
                     label));
    }
    $("throughput").replaceChildren(out);
    const rate = rateNow(throughput);
    $("rate-now").textContent = `ended per ${fmtDuration(bucket)}, last ${fmtDuration(windowS)}` +
      (rate === null ? "" : ` · now ${rate.toFixed(1)}/s`);
  }

  const widths = {};
  function chartWidth(id) {
    if (!(id in widths)) { // read when it changes, not at each redraw (a read forces a layout)
      widths[id] = $(id).clientWidth || 1000;
      new ResizeObserver(([entry]) => {
        const width = Math.round(entry.contentRect.width);
        if (width && width !== widths[id]) {
          widths[id] = width;
          if (latest) { drawn.throughput = null; render(latest); }
        }
      }).observe($(id));
    }
    return widths[id];
  }

  // The timeline of recent task attempts, laid out as the HTML report draws a run: one row per
  // worker, one bar per attempt, coloured by outcome, details on hover (or tap).  Drawn on a
  // canvas: a thousand SVG elements rebuilt every second cost the browser more CPU than the
  // rest of the page together, CPU the batch being watched needs.
  const TIMELINE_ROW = 22, TIMELINE_LEFT = 80, TIMELINE_AXIS = 20;

  function renderTimeline(timeline) {
    const {events, slots, start, end} = timeline;
    const colours = timeline.colours || COLOURS;
    const canvas = timelineCanvas();
    const width = canvas.cssWidth || canvas.clientWidth || 1000;
    const height = slots.length * TIMELINE_ROW + TIMELINE_AXIS;
    const ratio = window.devicePixelRatio || 1;
    const [pixelsW, pixelsH] = [Math.round(width * ratio), Math.round(height * ratio)];
    if (canvas.width !== pixelsW || canvas.height !== pixelsH) { // a resize relayouts the page
      canvas.style.height = `${height}px`;
      canvas.width = pixelsW;
      canvas.height = pixelsH;
    }
    const g = canvas.getContext("2d");
    g.setTransform(ratio, 0, 0, ratio, 0, 0);
    g.clearRect(0, 0, width, height);
    const {muted, line} = themeColours();
    const span = Math.max(end - start, 1e-6);
    const plot = width - TIMELINE_LEFT - 4;
    const x = (t) => TIMELINE_LEFT + ((t - start) / span) * plot;
    const rowOf = new Map(slots.map((s, i) => [s, i]));
    g.font = "11px system-ui, sans-serif";
    g.fillStyle = muted;
    g.textAlign = "start"; // the context keeps its state between redraws
    const labels = timeline.labels || {}; // a store's rows are worker processes, by pid
    slots.forEach((s, i) => g.fillText(labels[s] ?? `worker ${s}`, 0, i * TIMELINE_ROW + 15));
    for (const frac of [0, 0.25, 0.5, 0.75, 1]) {
      const t = start + frac * span;
      g.fillStyle = line;
      g.fillRect(Math.round(x(t)), 0, 1, height - TIMELINE_AXIS);
      g.fillStyle = muted;
      g.textAlign = frac === 0 ? "start" : frac === 1 ? "end" : "center";
      g.fillText(frac === 1 ? "now" : `−${fmtDuration(end - t)}`, x(t), height - 6);
    }
    const bars = [];
    for (const event of events) {
      const [slot, t0, t1, outcome] = event;
      const left = x(Math.max(t0, start));
      // a failure is often instantaneous: keep it visible
      const w = Math.max(x(t1) - left, outcome === "ok" || outcome === "running" ? 1 : 4);
      const top = rowOf.get(slot) * TIMELINE_ROW + 3;
      g.fillStyle = colours[outcome] || "#999";
      g.fillRect(left, top, Math.max(w - 0.5, 0.5), TIMELINE_ROW - 6);
      bars.push({x: left, y: top, w, h: TIMELINE_ROW - 6, outcome, event});
    }
    canvas.bars = bars; // for the hover (and for tests: what was drawn where)
    canvas.dataset.bars = bars.length;
    $("timeline-span").textContent = `last ${fmtDuration(span)}, ${events.length} attempts`;
    renderLegend(colours);
  }

  function timelineCanvas() {
    let canvas = $("timeline").querySelector("canvas");
    if (canvas) return canvas;
    canvas = el("canvas", {role: "img", "aria-label": "task timeline"});
    canvas.style.width = "100%";
    const tip = el("div", {class: "tip", hidden: true});
    const hover = (e) => {
      const box = canvas.getBoundingClientRect();
      const px = e.clientX - box.left, py = e.clientY - box.top;
      const bar = (canvas.bars || []).find((b) => px >= b.x - 1 && px <= b.x + b.w + 1 &&
                                                  py >= b.y && py <= b.y + b.h);
      tip.hidden = !bar;
      if (bar) {
        const [, t0, t1, outcome, label, attempt, pid, error] = bar.event;
        const tries = attempt === null ? "" : `, attempt ${attempt}`; // (running: not known)
        tip.textContent = `${label} — ${fmtDuration(t1 - t0)}${tries}, ` +
          `${outcome}${error ? `: ${error}` : ""} (pid ${pid})`;
        tip.style.left = `${Math.min(px + 12, box.width - 260)}px`;
        tip.style.top = `${py + 14}px`;
      }
    };
    // its width read when it changes, not at each redraw (a read forces a layout)
    new ResizeObserver(([entry]) => { canvas.cssWidth = entry.contentRect.width; })
      .observe(canvas);
    canvas.addEventListener("mousemove", hover);
    canvas.addEventListener("click", hover);
    canvas.addEventListener("mouseleave", () => { tip.hidden = true; });
    $("timeline").replaceChildren(canvas, tip);
    return canvas;
  }

  let theme = null;
  function themeColours() {
    // read once (and again if the light/dark scheme changes): reading styles forces a layout
    if (!theme) {
      const styles = getComputedStyle(document.body);
      theme = {muted: styles.getPropertyValue("--muted").trim() || "#5c7080",
               line: styles.getPropertyValue("--line").trim() || "#e1e8ed"};
    }
    return theme;
  }
  matchMedia("(prefers-color-scheme: dark)").addEventListener("change", () => { theme = null; });

  let legendDrawn = "";
  function renderLegend(colours) {
    const key = JSON.stringify(colours);
    if (key === legendDrawn) return;
    legendDrawn = key;
    $("legend").replaceChildren(...Object.entries(colours).map(([outcome, colour]) => {
      const swatch = el("i");
      swatch.style.background = colour;
      return el("span", {}, swatch, outcome);
    }));
  }

  // ---- task tables: a page at a time -------------------------------------------------------

  const COLUMNS = {
    id: ["id", "num", (t) => t.id],
    queue: ["queue", "", (t) => t.queue],
    input: ["input", "input", (t) => t.input],
    status: ["status", "", (t) => el("span", {class: `status ${t.status}`, text: t.status})],
    error: ["error", "err", (t) => t.error || ""],
    attempts: ["attempts", "num", (t) => t.attempts],
    seconds: ["time", "num", (t) => (t.seconds === null ? "" : fmtDuration(t.seconds))],
    when: ["when", "", (t) => t.finished_at ? `ended ${fmtAgo(t.finished_at)}` :
                              t.started_at ? `started ${fmtAgo(t.started_at)}` :
                              `queued ${fmtAgo(t.enqueued_at)}`],
    finished: ["ended", "", (t) => fmtAgo(t.finished_at)],
  };

  class TaskTable {
    // A paged table of tasks (newest first, keyset paging: `before` is the last id shown).
    // On its first page it follows the store live; further pages stay still to be read.
    constructor(name, {status, columns}) {
      this.name = name;
      this.table = $(name);
      this.columns = columns;
      this.state = {status: status || "", queue: "", q: "", before: null};
      this.previous = []; // the `before` of each earlier page, for "newer"
      this.next = null;
      this.expanded = new Set(); // rows showing their details, kept across refreshes
      this.details = new Map();
      this.loading = false;
      this.lastLoad = 0;
      this.lastCost = 0;
      this.signature = "";
      this.table.tHead.replaceChildren(el("tr", {}, ...columns.map((c) =>
        el("th", {class: COLUMNS[c][1] === "num" ? "num" : "", text: COLUMNS[c][0]})),
        el("th", {text: ""})));
      let typing = null;
      $(`${name}-q`).addEventListener("input", (e) => {
        clearTimeout(typing);
        typing = setTimeout(() => this.filter({q: e.target.value.trim()}), 300);
      });
      $(`${name}-queue`).addEventListener("change", (e) => this.filter({queue: e.target.value}));
    }

    filter(change) {
      Object.assign(this.state, change, {before: null});
      this.previous = [];
      this.load();
    }

    // called with each snapshot: refetch the first page when what it shows may have changed
    follow(signature) {
      if (this.state.before !== null || this.loading || signature === this.signature) return;
      const gap = Math.max(MIN_TABLE_REFRESH_MS, this.lastCost * TABLE_COST_FACTOR);
      if (performance.now() - this.lastLoad < gap) return;
      this.signature = signature;
      this.load();
    }

    async load() {
      this.loading = true;
      const started = performance.now();
      try {
        const page = await getJSON("/api/tasks", {...this.state, limit: PAGE_ROWS});
        this.next = page.next;
        this.render(page.tasks);
      } catch (err) {
        toast(`could not load tasks: ${err.message}`);
      } finally {
        this.loading = false;
        this.lastLoad = performance.now();
        this.lastCost = this.lastLoad - started;
      }
    }

    render(tasks) {
      const rows = [];
      for (const t of tasks) {
        const row = el("tr", {class: "task", dataset: {taskId: t.id, status: t.status},
                              title: "show details", onclick: () => this.toggle(t.id)},
          ...this.columns.map((c) => el("td", {class: COLUMNS[c][1]}, COLUMNS[c][2](t))),
          el("td", {}, ...this.buttons(t)));
        rows.push(row);
        if (this.expanded.has(t.id)) rows.push(this.detailRow(t.id));
      }
      if (!rows.length) {
        rows.push(el("tr", {}, el("td", {colspan: this.columns.length + 1, class: "muted",
                                        text: "no task here"})));
      }
      this.table.tBodies[0].replaceChildren(...rows);
      this.renderPager(tasks.length);
    }

    buttons(t) {
      const out = [];
      if (t.status === "failed" || t.status === "cancelled") {
        out.push(el("button", {dataset: {action: "retry", id: t.id}, text: "Retry",
                               onclick: (e) => this.act(e, "retry", t.id)}));
      }
      if (t.status === "pending" || t.status === "running") {
        out.push(el("button", {dataset: {action: "cancel", id: t.id}, text: "Cancel",
                               onclick: (e) => this.act(e, "cancel", t.id)}));
      }
      return out;
    }

    async act(event, action, id) {
      event.stopPropagation(); // not a click on the row
      event.target.disabled = true;
      try {
        const changed = await act(action, [id]);
        toast(changed.length ? `task ${id}: ${action === "retry" ? "queued again" : "cancelled"}`
                             : `task ${id} was not changed (its status moved on)`);
      } catch (err) {
        toast(`${action} failed: ${err.message}`);
      }
      this.expanded.delete(id);
      refreshTables();
    }

    async toggle(id) {
      if (this.expanded.has(id)) this.expanded.delete(id);
      else {
        this.expanded.add(id);
        if (!this.details.has(id)) {
          try {
            this.details.set(id, await getJSON("/api/task", {id}));
          } catch (err) {
            this.details.set(id, {error_line: `could not load: ${err.message}`});
          }
        }
      }
      const row = this.table.querySelector(`tr.task[data-task-id="${id}"]`);
      if (!row) return;
      const shown = row.nextElementSibling;
      if (shown && shown.classList.contains("detail")) shown.remove();
      if (this.expanded.has(id)) row.after(this.detailRow(id));
    }

    detailRow(id) {
      const d = this.details.get(id) || {};
      const parts = [];
      if (d.function) parts.push(el("div", {}, el("b", {text: "function "}), d.function));
      if (d.input) parts.push(el("div", {}, el("b", {text: "input "}), d.input));
      if (d.key) parts.push(el("div", {}, el("b", {text: "key "}), d.key));
      if (d.status === "succeeded") {
        parts.push(el("div", {}, el("b", {text: "result "}), JSON.stringify(d.result)));
      }
      if (d.error_line) parts.push(el("div", {class: "err", text: d.error_line}));
      if (d.error && d.error.traceback) {
        parts.push(el("pre", {class: "traceback", text: d.error.traceback}));
      }
      if (d.attempts !== undefined) {
        parts.push(el("div", {class: "muted", text: `attempts ${d.attempts} · pid ${d.pid ?? "–"}` +
          ` · queued ${fmtWhen(d.enqueued_at)} · started ${fmtWhen(d.started_at)}` +
          ` · ended ${fmtWhen(d.finished_at)}`}));
      }
      return el("tr", {class: "detail", dataset: {detailOf: id}},
                el("td", {colspan: this.columns.length + 1}, ...parts));
    }

    renderPager(count) {
      const pager = $(`${this.name}-pager`);
      const newer = el("button", {text: "← newer", disabled: !this.previous.length,
        onclick: () => { this.state.before = this.previous.pop() ?? null; this.load(); }});
      const older = el("button", {text: "older →", disabled: this.next === null,
        onclick: () => { this.previous.push(this.state.before); this.state.before = this.next;
                         this.load(); }});
      const where = this.state.before === null ? "newest first, live" :
        `ids below ${this.state.before}`;
      pager.replaceChildren(newer, older, el("span", {text: `${count} shown · ${where}`}));
    }
  }

  const tables = [];
  function refreshTables() {
    for (const t of tables) {
      t.details.clear();
      t.load();
    }
  }

  function setupStoreTables() {
    const failures = new TaskTable("failures", {status: "failed",
      columns: ["id", "queue", "input", "error", "attempts", "finished"]});
    const tasks = new TaskTable("tasks", {status: "",
      columns: ["id", "queue", "input", "status", "attempts", "seconds", "when"]});
    const tabs = [["", "all"], ...STATUSES.map((s) => [s, s])];
    $("tasks-tabs").replaceChildren(...tabs.map(([value, label]) => el("button", {
      role: "tab", dataset: {status: value}, text: label, "aria-selected": value === "",
      onclick: (e) => {
        for (const b of $("tasks-tabs").children) b.setAttribute("aria-selected", b === e.target);
        tasks.filter({status: value});
      }})));
    tables.push(failures, tasks);
    failures.load();
    tasks.load();
  }

  // Pool runs keep their failures in the snapshot (the last few hundred): filtered here.
  function renderPoolFailures(failures) {
    const q = $("failures-q").value.trim().toLowerCase();
    const shown = failures.filter((f) => !q || `${f.input} ${f.error}`.toLowerCase().includes(q));
    const body = $("failures").tBodies[0];
    if (!$("failures").tHead.rows.length) {
      $("failures").tHead.append(el("tr", {}, ...["input", "outcome", "attempt", "worker", "error",
                                                  "when"].map((h) => el("th", {text: h}))));
    }
    body.replaceChildren(...shown.map((f) => el("tr", {dataset: {outcome: f.outcome}},
      el("td", {class: "input", text: f.input}), el("td", {text: f.outcome}),
      el("td", {class: "num", text: f.attempt}), el("td", {text: `worker ${f.slot}`}),
      el("td", {class: "err", text: f.error || ""}), el("td", {text: fmtAgo(f.end)}))));
    if (!shown.length) {
      body.replaceChildren(el("tr", {}, el("td", {colspan: 6, class: "muted",
                                                 text: failures.length ? "none matches" : "none"})));
    }
    $("failures-pager").textContent = failures.length ? `${shown.length} of the last ` +
      `${failures.length} failures` : "";
  }

  // ---- the stream ------------------------------------------------------------------------

  let lastPoolFailures = [];
  let latest = null; // the last snapshot, drawn when a hidden page shows again
  const drawn = {}; // section -> the JSON it was last drawn from

  // Redraw a section only when its data changed: most of a snapshot is the same as the last
  // one's, and rebuilding unchanged tables costs the browser for nothing.
  function changed(section, data) {
    const key = JSON.stringify(data);
    if (drawn[section] === key) return false;
    drawn[section] = key;
    return true;
  }

  function receive(snap) {
    latest = snap;
    if (!document.hidden) render(snap); // a background tab draws nothing
  }
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && latest) render(latest);
  });

  function render(snap) {
    if (snap.error) {
      $("error").textContent = `the dashboard cannot read its source: ${snap.error}`;
      $("error").hidden = false;
      return;
    }
    $("error").hidden = true;
    serverSkewS = snap.now - Date.now() / 1000;
    renderTotals(snap);
    if (snap.queues) {
      show("queues-section", true);
      if (changed("queues", snap.queues)) renderQueues(snap.queues);
    }
    if (snap.services) { show("services-section", true); renderServices(snap.services); }
    if (snap.workers) { show("workers-section", true); renderWorkers(snap.workers); }
    if (snap.throughput) {
      show("throughput-section", true);
      // Complete buckets only (the one filling now would look like a drop): the chart then
      // changes, and is redrawn, once per bucket, not at every update.
      const bucket = Math.floor(serverNow() / snap.throughput.bucket_s);
      const complete = snap.throughput.series.filter(
        ([t]) => Math.floor(t / snap.throughput.bucket_s + 1e-9) < bucket);
      if (changed("throughput", [complete, bucket])) {
        renderThroughput({...snap.throughput, series: complete}, bucket);
      }
    }
    if (snap.timeline) { show("timeline-section", true); renderTimeline(snap.timeline); }
    if (snap.failures) {
      lastPoolFailures = snap.failures;
      show("failures-section", true);
      if (changed("failures", snap.failures)) renderPoolFailures(snap.failures);
    }
    if (snap.queues) {
      // the tables follow the counts: a table refetches when they moved
      const signature = JSON.stringify(snap.queues.map((q) => STATUSES.map((s) => q[s])));
      for (const t of tables) t.follow(signature);
    }
  }

  function connect() {
    const events = new EventSource(`/events?token=${encodeURIComponent(TOKEN)}`);
    events.onopen = () => setLive("up", "live");
    events.onmessage = (e) => {
      setLive("up", `live · ${CLOCK.format(new Date())}`);
      receive(JSON.parse(e.data));
    };
    events.onerror = () => setLive("down", "disconnected: retrying…");
  }

  if (KIND === "store") {
    show("failures-section", true);
    show("tasks-section", true);
    setupStoreTables();
  } else {
    for (const node of document.querySelectorAll('[data-for="store"]')) node.hidden = true;
    $("failures-q").addEventListener("input", () => renderPoolFailures(lastPoolFailures));
  }
  connect();
})();
