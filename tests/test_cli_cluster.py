"""`procqueue map --cluster`: the command line on Dask distributed (issue #7), run as the
installed command on real files, against a LocalCluster it starts and against a scheduler and
workers started with Dask's own `dask scheduler` / `dask worker` commands."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from process_checks import wait_gone

pytest.importorskip("distributed")

PROCQUEUE = shutil.which("procqueue")
DASK = shutil.which("dask") or os.path.join(os.path.dirname(sys.executable), "dask")

SCRIPT = """
import os
def process(path):
    name = os.path.basename(path)
    if name.startswith("bad"):
        raise ValueError("bad input " + name)
    with open(path) as f:
        return {"chars": len(f.read()), "pid": os.getpid()}
"""


@pytest.fixture
def batch(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(12):
        (inputs / f"f{i:02d}.txt").write_text("x" * i)
    (inputs / "bad.txt").write_text("?")
    return script, inputs


def procqueue(*args, timeout=120, cwd=None):
    return subprocess.run([PROCQUEUE, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def records(stdout):
    return [json.loads(line) for line in stdout.splitlines()]


def check_batch_records(run, inputs):
    assert run.returncode == 1, run.stderr  # one input failed
    recs = records(run.stdout)
    assert [r["input"] for r in recs] == sorted(str(p) for p in inputs.iterdir())  # in order
    bad = [r for r in recs if not r["ok"]]
    assert len(bad) == 1 and bad[0]["error"]["type"] == "ValueError"
    assert "bad input bad.txt" in bad[0]["error"]["message"]
    assert "job.py" in bad[0]["error"]["traceback"]  # the remote traceback comes back
    good = [r for r in recs if r["ok"]]
    assert sorted(r["result"]["chars"] for r in good) == list(range(12))
    return recs


@pytest.mark.timeout(120)
def test_cluster_local_n_runs_the_batch_in_n_dask_worker_processes(batch):
    script, inputs = batch
    run = procqueue("map", script, inputs, "--cluster", "local:2")
    recs = check_batch_records(run, inputs)
    pids = {r["result"]["pid"] for r in recs if r["ok"]}
    assert 1 <= len(pids) <= 2 and run_pid_not_in(pids)
    assert wait_gone(pids, 5) == []  # the cluster was shut down


@pytest.mark.timeout(120)
def test_cluster_records_of_a_crash_and_an_exit_and_no_dask_log_lines(tmp_path):
    # One record per input, with the remote traceback for sys.exit too (Dask's workers pickle
    # exceptions with their causes: the traceback was lost), and stderr without Dask's own
    # lines about the worker it restarted: the record says what happened
    script = tmp_path / "job.py"
    script.write_text("import os, sys\n"
                      "def process(x):\n"
                      "    if x == 'crash':\n        os._exit(3)\n"
                      "    if x == 'exit':\n        sys.exit(4)\n"
                      "    return x\n")
    run = procqueue("map", script, "--cluster", "local:2", "-q", ":::", "a", "crash", "exit", "b")
    assert run.returncode == 1, run.stderr
    recs = {r["input"]: r for r in records(run.stdout)}
    assert recs["a"]["result"] == "a" and recs["b"]["result"] == "b"
    assert recs["crash"]["error"]["type"] == "WorkerCrashedError"
    assert recs["exit"]["error"]["type"] == "WorkerExitedError"
    assert "sys.exit(4)" in recs["exit"]["error"]["traceback"]
    assert "distributed." not in run.stderr, run.stderr


def run_pid_not_in(pids):
    return os.getpid() not in pids


@pytest.mark.timeout(150)
def test_cluster_address_uses_a_running_scheduler_and_its_workers(batch, tmp_path):
    script, inputs = batch
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    scheduler = subprocess.Popen(
        [DASK, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "scheduler.log", "w"),
        start_new_session=True)
    worker = subprocess.Popen(
        [DASK, "worker", address, "--nworkers", "2", "--nthreads", "1", "--no-dashboard",
         "--host", "127.0.0.1"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "worker.log", "w"),
        start_new_session=True)
    try:
        worker_pids = set()
        deadline = time.monotonic() + 60
        while len(worker_pids) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
            worker_pids = {c.pid for c in psutil.Process(worker.pid).children(recursive=True)}
        run = procqueue("map", script, inputs, "--cluster", address)
        recs = check_batch_records(run, inputs)
        used = {r["result"]["pid"] for r in recs if r["ok"]}
        # Read again: the first read may have caught a helper and one worker before the other.
        worker_pids |= {c.pid for c in psutil.Process(worker.pid).children(recursive=True)}
        assert used <= worker_pids  # the work ran in the cluster's workers
        assert worker.poll() is None  # a cluster the run did not start is left running
    finally:
        for process in (worker, scheduler):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(5)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("extra,message", [
    (["--cluster", "nowhere"], "give tcp://HOST:PORT or local:N"),
    (["--cluster", "local:0"], "local:N with N >= 1"),
    (["--cluster", "local:2", "-j", "3"], "disagree"),
    (["--cluster", "local:2", "--limit", "gpu=1"], "--limit cannot be used with --cluster"),
    (["--cluster", "local:2", "--timeout", "300%"], "--timeout N% cannot be used"),
])
def test_cluster_usage_errors_exit_2(batch, tmp_path, extra, message):
    script, inputs = batch
    run = procqueue("map", script, inputs, *extra, cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    assert message in run.stderr and "Traceback" not in run.stderr
    assert run.stdout == ""
    assert not (tmp_path / "run.db").exists()  # a refused run leaves nothing behind


COUNTING_SCRIPT = SCRIPT + """
def counted(path):
    # one file per call, in ran/ beside the inputs' directory: how often each input ran
    ran = os.path.join(os.path.dirname(os.path.dirname(path)), "ran")
    name = os.path.basename(path) + "-" + os.urandom(4).hex()
    with open(os.path.join(ran, name), "w"):
        pass
    return process(path)
"""


@pytest.mark.timeout(150)
def test_cluster_run_keeps_a_journal_trace_joblog_and_stats_and_resumes(batch, tmp_path):
    script, inputs = batch
    script.write_text(COUNTING_SCRIPT)
    ran_dir = inputs.parent / "ran"
    ran_dir.mkdir()
    args = ("map", f"{script}:counted", inputs, "--cluster", "local:2", "--journal",
            tmp_path / "run.db", "--trace", tmp_path / "trace.json", "--joblog",
            tmp_path / "jobs.log", "--stats")
    first = procqueue(*args)
    check_batch_records(first, inputs)
    assert "efficiency:" in first.stderr and "unknown" not in first.stderr
    assert len(list(ran_dir.iterdir())) == 13  # each input once
    import procqueue as pq
    events = pq.load_trace(tmp_path / "trace.json")
    assert sorted(e.input_repr for e in events) == sorted(repr(str(p)) for p in inputs.iterdir())
    assert all(e.end_s >= e.start_s > 0 for e in events)
    log = (tmp_path / "jobs.log").read_text().splitlines()
    assert len(log) == 1 + 13  # a header and a line per input
    # Run again: every input's outcome is in the journal, so nothing runs; with
    # --retry-failed, only the one that failed runs again.
    second = procqueue(*args[:-3])  # no joblog or stats this time
    assert second.returncode == 1, second.stderr
    assert records(second.stdout) == records(first.stdout)
    assert len(list(ran_dir.iterdir())) == 13
    third = procqueue(*args[:-3], "--retry-failed")
    assert third.returncode == 1, third.stderr
    assert sum(p.name.startswith("bad.txt-") for p in ran_dir.iterdir()) == 2
    assert len(list(ran_dir.iterdir())) == 14


@pytest.mark.timeout(60)
def test_a_cluster_that_cannot_be_reached_is_one_line_and_exit_3(batch):
    script, _ = batch
    with socket.socket() as closed:  # a free port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    run = subprocess.run([PROCQUEUE, "map", "-q", "--cluster", f"tcp://127.0.0.1:{port}",
                          str(script), ":::", "a"], capture_output=True, text=True, timeout=50,
                         env={**os.environ, "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "2s"})
    assert run.returncode == 3, run.stderr
    assert run.stderr.strip().splitlines() == [
        f"Error: cannot reach the Dask cluster at tcp://127.0.0.1:{port}: Timed out trying to "
        f"connect to tcp://127.0.0.1:{port} after 2 s"], run.stderr
    assert run.stdout == ""
