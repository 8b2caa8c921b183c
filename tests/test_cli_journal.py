"""`procqueue map --journal` and `procqueue journal`, run as the installed command on real files:
what a user resuming a stopped batch relies on (issue #21)."""
from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

PROCQUEUE = shutil.which("procqueue")

# Logs each input it finishes; "bad" fails; "hang" holds its worker while the hold file exists.
JOB = """
import os, time
def process(item):
    if item == "bad":
        raise ValueError("bad input")
    if item == "hang" and os.path.exists({hold!r}):
        open({started!r}, "w").close()
        time.sleep(30)
    with open({log!r}, "a") as f:  # one short O_APPEND write: atomic between workers
        f.write(item + "\\n")
    return item.upper()
"""


class Batch:
    def __init__(self, tmp_path: Path) -> None:
        self.log = tmp_path / "calls.log"
        self.hold = tmp_path / "hold"
        self.started = tmp_path / "hang-started"
        self.script = tmp_path / "job.py"
        self.script.write_text(JOB.format(log=str(self.log), hold=str(self.hold),
                                          started=str(self.started)))
        self.db = tmp_path / "run.db"

    def calls(self) -> Counter[str]:
        return Counter(self.log.read_text().split()) if self.log.exists() else Counter()

    def map_args(self, *args: str) -> list[str]:
        assert PROCQUEUE, "the procqueue command is not installed (pip install -e .)"
        return [PROCQUEUE, "map", str(self.script), "-q", "--journal", str(self.db), *args]


@pytest.fixture
def batch(tmp_path: Path) -> Batch:
    return Batch(tmp_path)


def procqueue(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    assert PROCQUEUE, "the procqueue command is not installed (pip install -e .)"
    return subprocess.run([PROCQUEUE, *args], capture_output=True, text=True, timeout=timeout)


def run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def interrupt_when_hanging(batch: Batch, args: list[str]) -> subprocess.CompletedProcess[str]:
    """Run `args` until input "hang" holds its worker, then press Ctrl-C twice (the second
    kills running tasks); the workers are gone when this returns."""
    batch.hold.touch()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not batch.started.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "hang never started"
            time.sleep(0.01)
        workers = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.2)  # the second press must come after the first was handled
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"left behind: {alive}"
    batch.hold.unlink()
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


GOOD = [str(i) for i in range(1, 16)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stop", ["halt", "ctrl-c"])
def test_inputs_a_stopped_run_never_finished_run_when_the_command_is_run_again(batch, stop):
    if stop == "halt":  # "bad" fails first, and the halt kills or cancels every other input
        args = batch.map_args("-j", "1", "--halt", "now,fail=1", ":::", "bad", *GOOD)
        first = run(args)
    else:  # Ctrl-C while "hang" runs: it is killed, the inputs after it never start
        args = batch.map_args("-j", "1", ":::", "bad", *GOOD[:3], "hang", *GOOD[3:])
        first = interrupt_when_hanging(batch, args)
    inputs = args[args.index(":::") + 1:]
    cancelled = [r["input"] for r in records(first.stdout)
                 if not r["ok"] and r["error"]["type"] == "TaskCancelledError"]
    assert len(cancelled) >= 10, first.stdout + first.stderr
    finished = len(inputs) - len(cancelled)  # "bad" and what ran before the stop
    summary = procqueue("journal", str(batch.db)).stdout
    assert f"pending: {len(cancelled)}" in summary, summary

    again = run(args)
    assert f"resuming: {finished} of {len(inputs)} inputs already done, {len(cancelled)} to " \
           "run" in again.stderr, again.stderr
    recs = {r["input"]: r for r in records(again.stdout)}
    assert sorted(recs) == sorted(inputs)
    assert not recs["bad"]["ok"] and recs["bad"]["error"]["type"] == "ValueError"
    assert all(recs[x]["ok"] and recs[x]["result"] == x.upper() for x in inputs if x != "bad")
    # Every good input ran to its end exactly once over both runs.
    assert batch.calls() == Counter(x for x in inputs if x != "bad")
    assert "pending: 0" in procqueue("journal", str(batch.db)).stdout


@pytest.mark.timeout(60)
def test_inputs_of_a_script_that_failed_to_load_run_once_it_loads(tmp_path):
    # The script imports a module not installed yet: no input runs; the journal must not
    # hold that as the inputs' outcome, or the run fails the same way once it is installed.
    script, db = tmp_path / "job.py", tmp_path / "d.db"
    script.write_text("import helper_module\ndef process(x):\n    return helper_module.f(x)\n")
    args = [PROCQUEUE, "map", str(script), "-q", "--journal", str(db), ":::", "1", "2", "3"]
    first = run(args)
    assert first.returncode == 2 and "No module named 'helper_module'" in first.stderr
    (tmp_path / "helper_module.py").write_text("def f(x):\n    return x + x\n")
    again = run(args)
    assert again.returncode == 0, again.stderr
    assert [r["result"] for r in records(again.stdout)] == ["11", "22", "33"]


# Each call returns a value of its own (a fresh uuid), so a replayed result shows which run
# and which call it came from.
UNIQUE = """
import uuid
def process(item):
    with open({log!r}, "a") as f:
        f.write(item + "\\n")
    return item + ":" + uuid.uuid4().hex
"""


@pytest.mark.timeout(60)
def test_each_occurrence_of_a_repeated_input_is_a_task_of_its_own(tmp_path):
    log, db, script = tmp_path / "calls.log", tmp_path / "d.db", tmp_path / "job.py"
    script.write_text(UNIQUE.format(log=str(log)))
    args = [PROCQUEUE, "map", str(script), "-q", "--journal", str(db), ":::", "1", "1", "1",
            "1"]
    first = run(args)
    assert first.returncode == 0, first.stderr
    results = [r["result"] for r in records(first.stdout)]
    assert len(set(results)) == 4  # four calls
    summary = procqueue("journal", str(db)).stdout
    assert "done: 4" in summary and "pending: 0" in summary, summary

    again = run(args)
    assert "resuming: 4 of 4 inputs already done, 0 to run" in again.stderr, again.stderr
    assert [r["result"] for r in records(again.stdout)] == results  # each its own, in order
    more = run(args + ["1", "1"])  # two more occurrences: only they run
    assert "resuming: 4 of 6 inputs already done, 2 to run" in more.stderr, more.stderr
    assert [r["result"] for r in records(more.stdout)][:4] == results
    assert log.read_text().split() == ["1"] * 6


# Two input sources (each input a pair), a failure, a crash, a result JSON cannot hold.
PAIRS = """
import os
def process(name, number):
    if name == "crash":
        os._exit(3)
    if name == "bad":
        raise ValueError("bad input " + number)
    if name == "set":
        return {{1, 2}}
    return {{"name": name, "twice": int(number) * 2}}
"""


@pytest.mark.timeout(60)
def test_export_writes_the_records_procqueue_map_wrote(tmp_path):
    db, script = tmp_path / "d.db", tmp_path / "pairs.py"
    script.write_text(PAIRS.format())
    ran = run([PROCQUEUE, "map", str(script), "-q", "-j", "2", "--journal", str(db), ":::",
               "a", "bad", "set", "crash", "it's", ":::", "1", "2"])
    assert ran.returncode == 1 and len(records(ran.stdout)) == 10, ran.stderr
    export = procqueue("journal", str(db), "--export")
    assert export.returncode == 0, export.stderr
    assert records(export.stdout) == records(ran.stdout)
    assert records(export.stdout)[8]["input"] == ["it's", "1"]  # as given, not its repr
    again = run(ran.args)  # every record replayed: the crash's and the failure's as they were
    assert "resuming: 10 of 10 inputs already done, 0 to run" in again.stderr, again.stderr
    assert records(again.stdout) == records(ran.stdout)


@pytest.mark.timeout(60)
def test_a_comment_added_to_the_script_does_not_refuse_the_journal(batch):
    args = batch.map_args(":::", *GOOD)
    assert run(args).returncode == 0
    source = batch.script.read_text()
    batch.script.write_text("# tuned on Tuesday\n\n" + source.replace(
        "def process(item):", "# the job\ndef process(item):  # one input"))
    again = run(args)
    assert again.returncode == 0, again.stderr
    assert f"resuming: {len(GOOD)} of {len(GOOD)} inputs already done, 0 to run" in again.stderr
    assert batch.calls() == Counter(GOOD)  # nothing ran again
    batch.script.write_text(source.replace("item.upper()", "item.lower()"))  # the code changed
    changed = run(args)
    assert changed.returncode == 2 and "different function" in changed.stderr


@pytest.mark.timeout(60)
def test_a_journal_stamped_by_an_older_procqueue_resumes_the_unchanged_script(batch):
    import hashlib

    import procqueue

    # Before, the identity was the hash of the script's bytes and of path:function.
    source = batch.script.read_bytes()
    described = f"{batch.script.resolve()}:process".encode()
    former = hashlib.sha256(source + b"\0" + described).hexdigest()
    procqueue.Journal.open(str(batch.db), function_identity=former).close()
    ran = run(batch.map_args(":::", *GOOD))
    assert ran.returncode == 0, ran.stderr
    assert batch.calls() == Counter(GOOD)


# Computes for SPIN_S (a busy loop: the same time under load), then logs its input: one line
# per finished computation.
SPINNING = """
import os, time
def process(item):
    end = time.perf_counter() + {spin}
    while time.perf_counter() < end:
        pass
    fd = os.open({log!r}, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, (item + "\\n").encode())
    os.close(fd)
    return item
"""
SPIN_S = 0.005
JOBS = 2


def lines_in(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def sigkill_after(args: list[str], log: Path, finished: int) -> None:
    """Run `args`, SIGKILL it once `finished` computations are logged; its workers are gone
    when this returns."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 60
        while lines_in(log) < finished:
            assert proc.poll() is None and time.monotonic() < deadline, "it ended unkilled"
            if not workers and lines_in(log) >= finished // 2:  # listed now: kill fast later
                workers = psutil.Process(proc.pid).children(recursive=True)
            time.sleep(0.001)
    finally:
        proc.kill()
        proc.wait()
    _, alive = psutil.wait_procs(workers, timeout=10)  # they die with it (parent death)
    assert not alive, f"left behind: {alive}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kill_after", [60, 150, 240])
def test_a_sigkill_loses_the_running_tasks_and_a_bounded_amount_of_finished_work(tmp_path,
                                                                                 kill_after):
    from procqueue.journal import BATCH_WORK_S, FLUSH_COMPUTE_S

    log, db, script = tmp_path / "computed.log", tmp_path / "d.db", tmp_path / "spin.py"
    script.write_text(SPINNING.format(spin=SPIN_S, log=str(log)))
    inputs = [str(i) for i in range(300)]
    args = [PROCQUEUE, "map", str(script), "-q", "-j", str(JOBS), "--journal", str(db), ":::",
            *inputs]
    sigkill_after(args, log, kill_after)
    again = run(args)
    assert again.returncode == 0, again.stderr
    computed = Counter(log.read_text().split())
    assert sorted(computed) == sorted(inputs)
    # Tasks running at the kill never logged; what is counted here was finished, then lost.
    recomputed = sum(n - 1 for n in computed.values())
    # Per worker: a batch of finished tasks not sent yet, a commit's worth of compute not
    # committed yet, and one task more that finished while a commit was under way.
    per_worker = math.ceil((BATCH_WORK_S + FLUSH_COMPUTE_S) / SPIN_S) + 1
    assert recomputed <= JOBS * per_worker, f"{recomputed} of {len(inputs)} computed again"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("flag", ["--retry-failed", "--force"])
def test_journal_flags_without_a_journal_are_a_usage_error(tmp_path, flag):
    script = tmp_path / "job.py"
    script.write_text("def process(x):\n    return x\n")
    run = subprocess.run([shutil.which("procqueue"), "map", str(script), flag, ":::", "a"],
                         capture_output=True, text=True, timeout=50)
    assert run.returncode == 2 and f"{flag} goes with --journal FILE" in run.stderr
    assert run.stdout == ""
