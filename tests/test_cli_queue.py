"""The durable queue commands as a user types them: define, enqueue, worker, status, result,
cancel, retry, prune; and the errors a user can cause (bad store, bad script, unknown id)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from procqueue import TaskQueue

pytestmark = pytest.mark.timeout(120)

ROOT = str(Path(__file__).resolve().parent.parent)

SCRIPT = '''
import time

def score(text):
    return len(text)

def fail(text):
    raise RuntimeError(f"cannot score {text}")

def slow(text):
    time.sleep(30)
'''


def procqueue(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from procqueue.cli import main; main()",
                           *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": ROOT})


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "job.py").write_text(SCRIPT)
    return tmp_path


def test_enqueue_then_a_worker_runs_them_and_result_shows_each(work):
    out = procqueue("enqueue", "jobs.db", "job.py:score", ":::", "a", "bb", "ccc", cwd=work)
    assert out.returncode == 0, out.stderr
    ids = [int(line) for line in out.stdout.split()]
    assert len(ids) == 3 and "queued 3 task(s)" in out.stderr
    run = procqueue("worker", "jobs.db", "-j", "2", "--until-idle", cwd=work)
    assert run.returncode == 0, run.stderr
    assert "3 succeeded, 0 failed" in run.stderr
    records = [json.loads(procqueue("result", "jobs.db", str(i), cwd=work).stdout) for i in ids]
    assert [(r["input"], r["status"], r["result"]) for r in records] == [
        ("'a'", "succeeded", 1), ("'bb'", "succeeded", 2), ("'ccc'", "succeeded", 3)]


def test_a_failed_task_shows_its_error_and_exit_code_1(work):
    ids = procqueue("enqueue", "jobs.db", "job.py:fail", ":::", "x", cwd=work).stdout.split()
    procqueue("worker", "jobs.db", "-j", "1", "--until-idle", cwd=work)
    out = procqueue("result", "jobs.db", ids[0], cwd=work)
    assert out.returncode == 1
    record = json.loads(out.stdout)
    assert record["status"] == "failed" and record["error"]["type"] == "RuntimeError"
    assert "cannot score x" in record["error"]["message"]
    assert 'raise RuntimeError(f"cannot score {text}")' in record["error"]["traceback"]


def test_define_limits_show_in_status(work):
    assert procqueue("define", "jobs.db", "render", "--concurrency", "2", "--rate", "5/s",
                     cwd=work).returncode == 0
    procqueue("enqueue", "jobs.db", "job.py:score", "--queue", "render", ":::", "a", "b",
              cwd=work)
    status = json.loads(procqueue("status", "jobs.db", "--json", cwd=work).stdout)
    (render,) = [q for q in status["queues"] if q["queue"] == "render"]
    assert render["pending"] == 2 and "concurrency=2" in render["limits"]
    assert "rate=5/1s" in render["limits"] and status["services"] == []
    table = procqueue("status", "jobs.db", cwd=work).stdout
    assert "render" in table and "no worker service alive" in table


def test_cancel_retry_and_prune(work):
    ids = procqueue("enqueue", "jobs.db", "job.py:score", ":::", "a", "b", cwd=work
                    ).stdout.split()
    out = procqueue("cancel", "jobs.db", ids[0], cwd=work)
    assert out.returncode == 0 and "1 task(s) cancelled" in out.stderr
    assert procqueue("result", "jobs.db", ids[0], cwd=work).returncode == 1
    procqueue("worker", "jobs.db", "-j", "1", "--until-idle", cwd=work)
    out = procqueue("retry", "jobs.db", ids[0], ids[1], cwd=work)
    assert "1 task(s) put back" in out.stderr and f"task {ids[1]}: unchanged" in out.stderr
    procqueue("worker", "jobs.db", "-j", "1", "--until-idle", cwd=work)
    assert json.loads(procqueue("result", "jobs.db", ids[0], cwd=work).stdout)["result"] == 1
    out = procqueue("prune", "jobs.db", "--older-than", "0s", cwd=work)
    assert "pruned 2 task(s)" in out.stderr
    assert procqueue("result", "jobs.db", ids[0], cwd=work).returncode == 2


def test_result_wait_times_out_with_exit_code_3(work):
    ids = procqueue("enqueue", "jobs.db", "job.py:score", ":::", "a", cwd=work).stdout.split()
    out = procqueue("result", "jobs.db", ids[0], "--wait", "--timeout", "0.2", cwd=work)
    assert out.returncode == 3 and "still pending" in out.stderr


@pytest.mark.parametrize("args, message", [
    (("enqueue", "jobs.db", "nosuch.py", ":::", "a"), "nosuch.py"),
    (("enqueue", "jobs.db", "job.py:missing", ":::", "a"), "missing"),
    (("status", "job.py"), "not a procqueue store"),
    (("result", "jobs.db", "99"), "no task 99"),
    (("status", "nosuch.db"), "no such store"),
    (("prune", "jobs.db", "--older-than", "soon"), "not a duration"),
])
def test_a_users_mistake_is_one_clear_line_and_exit_code_2(work, args, message):
    procqueue("define", "jobs.db", "default", cwd=work)
    out = procqueue(*args, cwd=work)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


def test_a_store_urls_password_is_never_shown(work):
    url = "postgresql://someone:s3cret@127.0.0.1:1/jobs"  # nothing listens on port 1
    for command in ("status", "worker"):
        out = procqueue(command, url, cwd=work)
        assert out.returncode == 2 and "cannot connect" in out.stderr, out.stderr
        assert "s3cret" not in out.stderr and "someone:***@127.0.0.1:1" in out.stderr
    out = procqueue("status", "postgresql://someone@127.0.0.1:1/jobs?password=s3cret", cwd=work)
    assert out.returncode == 2 and "s3cret" not in out.stderr and "password=***" in out.stderr
    assert TaskQueue.shown_target(url) == "postgresql://someone:***@127.0.0.1:1/jobs"
    assert TaskQueue.shown_target("jobs.db") == "jobs.db"


def test_a_worker_stopped_by_sigterm_puts_its_tasks_back(work):
    ids = procqueue("enqueue", "jobs.db", "job.py:slow", ":::", "a", cwd=work).stdout.split()
    worker = subprocess.Popen([sys.executable, "-c", "from procqueue.cli import main; main()",
                               "worker", "jobs.db", "-j", "1"], cwd=work, text=True,
                              stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": ROOT})
    try:
        start = time.monotonic()
        while json.loads(procqueue("result", "jobs.db", ids[0], cwd=work).stdout)[
                "status"] != "running":
            assert time.monotonic() - start < 60, "the task never started"
            time.sleep(0.1)
        worker.terminate()
        _, err = worker.communicate(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert worker.returncode == 0, err
    record = json.loads(procqueue("result", "jobs.db", ids[0], cwd=work).stdout)
    assert record["status"] == "pending" and record["attempts"] == 0


def test_file_inputs_are_queued_as_absolute_paths_for_services_elsewhere(work):
    (work / "inputs").mkdir()
    (work / "inputs" / "a.txt").write_text("x")
    ids = procqueue("enqueue", "jobs.db", "job.py:score", "inputs", cwd=work).stdout.split()
    elsewhere = work / "elsewhere"
    elsewhere.mkdir()
    procqueue("worker", str(work / "jobs.db"), "-j", "1", "--until-idle", cwd=elsewhere)
    record = json.loads(procqueue("result", "jobs.db", ids[0], cwd=work).stdout)
    assert record["input"] == repr(str(work / "inputs" / "a.txt"))
    assert record["result"] == len(str(work / "inputs" / "a.txt"))
