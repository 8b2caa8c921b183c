"""`procqueue dashboard STORE` as a user meets it: started on a real SQLite store with a worker
service running tasks, its page driven in headless Chromium (tests/cdp_browser.py); and the
guard in front of it: the token, the Host header, the Origin of actions."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import psutil
import pytest

from procqueue import TaskQueue
from procqueue.dashboard.guard import Guard

pytestmark = pytest.mark.timeout(180)

TASKS = '''
import os
import time

def slow(x):
    time.sleep(0.25)
    return x

def first_run_fails(marker):
    """Fails the first time (leaving a marker file), succeeds from then on."""
    if not os.path.exists(marker):
        open(marker, "w").close()
        raise RuntimeError(f"first run fails: {marker}")
    return "second run ok"

def hold(path):
    """Runs until the file at path exists (a minute at most)."""
    deadline = time.time() + 60
    while not os.path.exists(path) and time.time() < deadline:
        time.sleep(0.05)
    return os.getpid()
'''


def procqueue_command(*args: str) -> list[str]:
    return [sys.executable, "-c", "from procqueue.cli import main; main()", *args]


def run(*args: str, cwd: Path) -> str:
    done = subprocess.run(procqueue_command(*args), cwd=cwd, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


class Served:
    """A `procqueue dashboard` process and the URL it printed."""

    def __init__(self, store: Path) -> None:
        self.proc = subprocess.Popen(procqueue_command("dashboard", str(store)),
                                     cwd=store.parent, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        lines = []
        for line in self.proc.stderr:  # the URL comes within a second; EOF if it failed
            lines.append(line)
            if "?token=" in line:
                break
        else:
            pytest.fail(f"the dashboard printed no URL: {''.join(lines)}")
        self.url = line.strip()
        parts = urllib.parse.urlsplit(self.url)
        self.host, self.port = parts.hostname or "", parts.port or 80
        self.token = urllib.parse.parse_qs(parts.query)["token"][0]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            assert self.proc.stderr is not None
            self.proc.stderr.close()

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            if response.getheader("Content-Type") == "text/event-stream":
                return response.status, response.readline()  # a stream: its first line
            return response.status, response.read()
        finally:
            conn.close()


@pytest.fixture
def store(tmp_path: Path) -> Path:
    (tmp_path / "tasks.py").write_text(TASKS)
    return tmp_path / "jobs.db"


@pytest.fixture
def dashboard(store: Path) -> Iterator[Served]:
    run("define", str(store), "default", cwd=store.parent)  # the store exists before
    served = Served(store)
    try:
        yield served
    finally:
        served.stop()


class Worker:
    """`procqueue worker STORE -j 2`, stopped with SIGTERM as its user would."""

    def __init__(self, store: Path) -> None:
        self.proc = subprocess.Popen(procqueue_command("worker", str(store), "-j", "2"),
                                     cwd=store.parent, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def worker(store: Path) -> Iterator[Worker]:
    w = Worker(store)
    try:
        yield w
    finally:
        w.stop()


def enqueue(store: Path, function: str, *inputs: str) -> list[int]:
    out = run("enqueue", str(store), f"tasks.py:{function}", ":::", *inputs, cwd=store.parent)
    return [int(line) for line in out.split()]


def count_cell(status: str, queue: str = "default") -> str:
    return (f"document.querySelector('#queues tr[data-queue=\"{queue}\"] "
            f"td[data-count=\"{status}\"]')?.textContent")


# ---- the page, live ---------------------------------------------------------------------------

def test_the_counts_change_while_tasks_finish(store, dashboard, browser):
    enqueue(store, "slow", *map(str, range(16)))  # 16 x 0.25 s on 2 workers: ~2 s
    page = browser.open(dashboard.url)
    assert page.wait_for(f"{count_cell('pending')} === '16'")
    assert page.text('#totals [data-total="services"] b') == "0"
    worker = Worker(store)
    try:
        seen = [page.evaluate(count_cell("succeeded"))]
        services_seen = False
        deadline = time.monotonic() + 60
        while seen[-1] != "16" and time.monotonic() < deadline:
            time.sleep(0.1)
            value = page.evaluate(count_cell("succeeded"))
            if value != seen[-1]:
                seen.append(value)
            pid = page.evaluate("document.querySelector('#services tbody td:nth-child(2)')"
                                "?.textContent")
            services_seen |= pid == str(worker.proc.pid)
    finally:
        worker.stop()
    counts = [int(v) for v in seen]
    assert counts[0] == 0 and counts[-1] == 16, seen
    assert counts == sorted(counts) and len(counts) >= 3, \
        f"the page showed no count between the first and the last: {seen}"
    assert services_seen, "the worker service never showed with its pid"
    assert page.wait_for(f"{count_cell('pending')} === '0'")
    # the throughput chart draws a bucket once it is complete (10 s buckets for a store)
    titles = page.wait_for("Array.from(document.querySelectorAll('#throughput rect title'))"
                           ".map((t) => t.textContent).join('|') || null", timeout_s=30)
    assert "succeeded" in titles


def test_a_failed_tasks_traceback_shows_and_retry_runs_it_again(store, dashboard, browser,
                                                                  worker):
    marker = store.parent / "ran-once"
    (task_id,) = enqueue(store, "first_run_fails", str(marker))
    page = browser.open(dashboard.url)
    row = f'#failures tr.task[data-task-id="{task_id}"]'
    page.wait_for(f"document.querySelector('{row}') !== null")
    assert "RuntimeError: first run fails" in page.text(f"{row} td.err")

    page.click(row)  # the row opens on its details
    traceback = page.wait_for("document.querySelector('#failures pre.traceback')?.textContent")
    assert traceback.startswith("Traceback (most recent call last)")
    assert 'raise RuntimeError(f"first run fails: {marker}")' in traceback
    assert f"RuntimeError: first run fails: {marker}" in traceback

    page.click(f'#failures button[data-action="retry"][data-id="{task_id}"]')
    assert page.wait_for(f"document.getElementById('toast').textContent === "
                         f"'task {task_id}: queued again'")  # the store took the retry
    with TaskQueue(store, create=False) as tq:
        record = tq.handle(task_id).wait(timeout=30)
    assert record.status == "succeeded"  # it ran again, and the marker made it pass
    # and the page follows: the failure is gone, the task shows as succeeded
    assert page.wait_for(f"{count_cell('failed')} === '0' && "
                         f"{count_cell('succeeded')} === '1'")
    assert page.wait_for(f"document.querySelector('{row}') === null")
    assert page.wait_for(f"document.querySelector('#tasks tr.task[data-task-id=\"{task_id}\"]')"
                         f"?.dataset.status === 'succeeded'")


WORKER_ROW_OF_TASK = """Array.from(document.querySelectorAll('#workers tbody tr'))
    .map((tr) => Array.from(tr.children).map((td) => td.textContent))
    .find((cells) => cells[2].startsWith('#%d ')) || null"""
TIMELINE_BARS = """Array.from(document.querySelector('#timeline canvas')?.bars || [])
    .map((b) => [b.outcome, b.event[4], b.event[0]])"""


def test_the_workers_and_the_timeline_show_which_process_runs_which_task(
        store, dashboard, browser, worker):
    release = store.parent / "release"
    (task_id,) = enqueue(store, "hold", str(release))
    page = browser.open(dashboard.url)
    # the worker running it: named by its service, with the task's id and input, its pid
    cells = page.wait_for(WORKER_ROW_OF_TASK % task_id)
    name, pid, task = cells[0], int(cells[1]), cells[2]
    assert name.endswith(f"{worker.proc.pid} · worker 0") or \
        name.endswith(f"{worker.proc.pid} · worker 1"), cells
    assert str(release) in task
    assert worker.proc.pid in [p.pid for p in psutil.Process(pid).parents()]
    # on the timeline: a running bar in that worker's row
    assert page.wait_for(f"({TIMELINE_BARS}).some(([outcome, label, row]) => "
                         f"outcome === 'running' && label.startsWith('#{task_id} ') && "
                         f"row === {pid})")
    release.touch()
    # once it ends: an ok bar of it in the same row, and its worker idle
    assert page.wait_for(f"({TIMELINE_BARS}).some(([outcome, label, row]) => "
                         f"outcome === 'ok' && label.startsWith('#{task_id} ') && "
                         f"row === {pid})")
    assert page.wait_for(f"({WORKER_ROW_OF_TASK % task_id}) === null")
    with TaskQueue(store, create=False) as tq:
        assert tq.handle(task_id).get_result(timeout=10) == pid


def test_cancel_on_a_pending_task_cancels_it(store, dashboard, browser):
    ids = enqueue(store, "slow", "a", "b")  # no worker: they stay pending
    page = browser.open(dashboard.url)
    button = f'#tasks button[data-action="cancel"][data-id="{ids[1]}"]'
    page.wait_for(f"document.querySelector('{button}') !== null")
    page.click(button)
    assert page.wait_for(f"{count_cell('cancelled')} === '1' && {count_cell('pending')} === '1'")
    with TaskQueue(store, create=False) as tq:
        assert [tq.handle(i).status() for i in ids] == ["pending", "cancelled"]


# ---- the guard --------------------------------------------------------------------------------

def test_a_request_without_the_token_gets_403(dashboard):
    for path in ("/", "/events", "/api/tasks", "/api/task?id=1", "/favicon.ico"):
        assert dashboard.request("GET", path)[0] == 403, path
        assert dashboard.request("GET", path + ("&" if "?" in path else "?") +
                                 "token=wrong")[0] == 403, path
    status, first_line = dashboard.request("GET", f"/events?token={dashboard.token}")
    assert status == 200 and first_line.startswith(b"retry:")  # the stream itself, with it
    assert dashboard.request("GET", f"/?token={dashboard.token}")[0] == 200
    assert dashboard.request("GET", "/api/tasks",
                             headers={"X-Procqueue-Token": dashboard.token})[0] == 200


def test_a_cross_origin_post_is_refused(store, dashboard):
    (task_id,) = enqueue(store, "first_run_fails", str(store.parent / "marker"))
    run("worker", str(store), "-j", "1", "--until-idle", cwd=store.parent)
    body = json.dumps({"ids": [task_id]}).encode()
    token = {"X-Procqueue-Token": dashboard.token, "Content-Type": "application/json"}
    for origin in ("http://evil.example", f"http://localhost:{dashboard.port + 1}", "null"):
        status, _ = dashboard.request("POST", "/api/retry", body, {**token, "Origin": origin})
        assert status == 403, origin
    assert dashboard.request("POST", "/api/retry", body, token)[0] == 403  # no Origin at all
    with TaskQueue(store, create=False) as tq:
        assert tq.handle(task_id).status() == "failed"  # none of them retried it
        status, reply = dashboard.request(
            "POST", "/api/retry", body, {**token, "Origin": f"http://127.0.0.1:{dashboard.port}"})
        assert status == 200 and json.loads(reply) == {"changed": [task_id]}
        assert tq.handle(task_id).status() == "pending"  # the page's own origin may


def test_a_form_on_another_site_cannot_retry_even_with_the_token(store, dashboard, browser):
    """A cross-site request as a browser makes it: a page on another origin (another port)
    submits a form to the dashboard's retry URL, token included."""
    (task_id,) = enqueue(store, "first_run_fails", str(store.parent / "marker"))
    run("worker", str(store), "-j", "1", "--until-idle", cwd=store.parent)
    action = f"http://127.0.0.1:{dashboard.port}/api/retry?token={dashboard.token}"
    page_html = (f"<form id=f method=post action='{action}' enctype='text/plain'>"
                 f"<input name='{{\"ids\": [{task_id}], \"x\": \"' value='\"}}'></form>"
                 f"<script>document.getElementById('f').submit()</script>").encode()

    class Evil(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(page_html)

        def log_message(self, *args: object) -> None:
            pass

    evil = ThreadingHTTPServer(("127.0.0.1", 0), Evil)
    thread = threading.Thread(target=evil.serve_forever, daemon=True)
    thread.start()
    try:
        page = browser.open(f"http://127.0.0.1:{evil.server_address[1]}/")
        # the form went: the browser now shows the dashboard's answer
        assert "cross-origin request refused" in page.wait_for(
            "location.port !== '" + str(evil.server_address[1]) + "' && document.body"
            "?.textContent")
    finally:
        evil.shutdown()
        evil.server_close()
    with TaskQueue(store, create=False) as tq:
        assert tq.handle(task_id).status() == "failed"


def test_a_wrong_host_header_is_refused(dashboard):
    path = f"/?token={dashboard.token}"
    # DNS rebinding: a name the attacker controls, resolving to 127.0.0.1
    for host in (f"evil.example:{dashboard.port}", "evil.example",
                 f"localhost.evil.example:{dashboard.port}"):
        assert dashboard.request("GET", path, headers={"Host": host})[0] == 403, host
    # the server's own names, at any port (an SSH tunnel's local port, say)
    for host in (f"127.0.0.1:{dashboard.port}", f"localhost:{dashboard.port}", "localhost:8080"):
        assert dashboard.request("GET", path, headers={"Host": host})[0] == 200, host


@pytest.mark.parametrize(("host", "ok"), [
    ("127.0.0.1:8000", True), ("localhost:8000", True), ("LOCALHOST:8000", True),
    ("[::1]:8000", True), ("10.1.2.3:8000", True), ("127.0.0.1", True),
    (f"{socket.gethostname()}:8000", True), ("dash.lan:8000", True),
    ("evil.example:8000", False), ("evil.example", False), ("localhost.evil.example:8000", False),
    ("127.0.0.1.evil.example:8000", False), ("user@127.0.0.1:8000", False), ("", False),
    (None, False), ("127.0.0.1:8000/x", False), ("[::1:8000", False),
    ("127.0.0.1:port", False)])
def test_the_host_check_takes_addresses_and_this_machines_names_only(host, ok):
    assert Guard("t", "dash.lan").host_ok(host) is ok  # dash.lan: the --host given


def test_the_origin_must_be_this_servers_own():
    guard = Guard("t", "127.0.0.1")
    assert guard.origin_ok("http://127.0.0.1:8000", "127.0.0.1:8000")
    assert not guard.origin_ok("http://127.0.0.1:8000", "localhost:8000")
    assert not guard.origin_ok("https://127.0.0.1:8000", "127.0.0.1:8000")
    assert not guard.origin_ok(None, "127.0.0.1:8000")
    assert not guard.origin_ok("null", "127.0.0.1:8000")
