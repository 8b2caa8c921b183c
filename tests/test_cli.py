"""The installed `procqueue` command, run as a subprocess on real files: output records,
order, every error path, exit codes, halting, and Ctrl-C."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from process_checks import wait_gone

PROCQUEUE = shutil.which("procqueue")

SCRIPT = """
import os, sys, time
def process(path):
    name = os.path.basename(path)
    if "raise" in name:
        raise ValueError("bad input " + name)
    if "crash" in name:
        os._exit(7)
    if "slow" in name:
        time.sleep(0.3)
    if "set" in name:
        return {1, 2}
    with open(path) as f:
        return {"chars": len(f.read()), "name": name}
def shout(path):
    return path.upper()
if __name__ == "__main__":
    raise SystemExit("the __main__ block must never run")
"""


@pytest.fixture
def batch(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    inputs = tmp_path / "in"
    (inputs / "sub").mkdir(parents=True)
    for name in ["a.txt", "b.txt", "c.dat", "sub/d.txt"]:
        (inputs / name).write_text(name * 3)
    return script, inputs


def procqueue(*args, stdin=None, timeout=60, cwd=None, env=None):
    assert PROCQUEUE, "the procqueue command is not installed (pip install -e .)"
    return subprocess.run([PROCQUEUE, *map(str, args)], input=stdin, capture_output=True,
                          text=True, timeout=timeout, cwd=cwd,
                          env=None if env is None else {**os.environ, **env})


def records(stdout):
    return [json.loads(line) for line in stdout.splitlines()]


@pytest.mark.timeout(60)
def test_one_ordered_record_per_input(batch):
    script, inputs = batch
    run = procqueue("map", script, inputs, "-j", "2")
    assert run.returncode == 0, run.stderr
    recs = records(run.stdout)
    assert [Path(r["input"]).name for r in recs] == ["a.txt", "b.txt", "c.dat", "d.txt"]
    assert all(r["ok"] and r["attempts"] == 1 and r["worker"] for r in recs)
    assert recs[0]["result"] == {"chars": 15, "name": "a.txt"}
    assert all(r["seconds"] >= 0 for r in recs)


@pytest.mark.timeout(60)
def test_glob_fn_and_stdin_inputs(batch):
    script, inputs = batch
    run = procqueue("map", script, inputs, "--glob", "*.txt", "--fn", "shout", "-q")
    assert run.returncode == 0
    assert [r["result"].endswith(".TXT") for r in records(run.stdout)] == [True] * 3
    run = procqueue("map", script, "-", "--fn", "shout", stdin="x\ny\n\nz\n")
    assert [r["result"] for r in records(run.stdout)] == ["X", "Y", "Z"]
    run = procqueue("map", script, "--fn", "shout", "-q", "-P", "2", ":::", "m", "n o")
    assert [r["result"] for r in records(run.stdout)] == ["M", "N O"]
    run = procqueue("map", script, "-", "-0", "--fn", "shout", "-q", stdin="a\nb\0c\0")
    assert [r["input"] for r in records(run.stdout)] == ["a\nb", "c"]
    run = procqueue("map", script, "--fn", "shout", "--bar", ":::", "x")  # stderr: no tty
    assert run.returncode == 0 and "1/1" in run.stderr
    args = batch[1].parent / "args.txt"
    args.write_text("p q\r\n\n  r\n")  # GNU parallel's -a: a file of inputs
    run = procqueue("map", script, "-a", args, "--fn", "shout", "-q")
    assert [r["input"] for r in records(run.stdout)] == ["p q", "  r"]


@pytest.mark.timeout(60)
def test_no_inputs_reads_piped_stdin_as_gnu_parallel(batch):
    script, _ = batch
    run = procqueue("map", script, "--fn", "shout", "-q", stdin="x\ny\n\nz\n")
    assert run.returncode == 0, run.stderr
    assert [(r["input"], r["result"]) for r in records(run.stdout)] == [
        ("x", "X"), ("y", "Y"), ("z", "Z")]
    nothing = procqueue("map", script, "--fn", "shout", stdin="")  # empty: nothing to do
    assert nothing.returncode == 0
    assert nothing.stderr.strip() == "procqueue: no inputs" and not nothing.stdout


@pytest.mark.timeout(60)
def test_a_task_reading_stdin_takes_none_of_the_streamed_inputs(tmp_path):
    # GNU parallel gives its jobs /dev/null as stdin: a task running `cat` (or ffmpeg, ssh)
    # must not swallow input lines that then never run
    script = tmp_path / "reader.py"
    script.write_text("import subprocess\n"
                      "def process(x):\n"
                      "    if x == 'first':\n"
                      "        return subprocess.run(['cat'], capture_output=True, text=True,\n"
                      "                              timeout=20).stdout\n"
                      "    return x\n")
    proc = subprocess.Popen([PROCQUEUE, "map", str(script), "-j", "2", "-q"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdin.write("first\n")
    proc.stdin.flush()
    time.sleep(0.5)  # past inputs.STDIN_END_WAIT_S: the run starts on what came
    rest = [f"line{i}" for i in range(20)]
    for line in rest:  # one at a time, as a slow producer's: each read could be the task's
        proc.stdin.write(f"{line}\n")
        proc.stdin.flush()
        time.sleep(0.03)
    proc.stdin.close()
    proc.stdin = None  # communicate() must not flush it
    out, err = proc.communicate(timeout=50)
    assert proc.returncode == 0, err
    assert [(r["input"], r["result"]) for r in records(out)] == [
        ("first", ""), *[(x, x) for x in rest]]


def test_file_colon_function_and_a_function_defined_under_try(tmp_path, batch):
    _, inputs = batch
    script = tmp_path / "alt.py"
    script.write_text("try:\n    from not_installed import fast\nexcept ImportError:\n"
                      "    def fast(path):\n        return len(path)\n")
    run = procqueue("map", f"{script}:fast", inputs / "sub")
    assert run.returncode == 0, run.stderr
    assert records(run.stdout)[0]["result"] == len(str(inputs / "sub" / "d.txt"))


@pytest.mark.timeout(60)
def test_module_function_spec(tmp_path):
    (tmp_path / "mymod.py").write_text("def twice(x):\n    return x * 2\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    run = subprocess.run([PROCQUEUE, "map", "mymod:twice", "-"], input="ab\n",
                         capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 0, run.stderr
    assert records(run.stdout)[0]["result"] == "abab"


@pytest.mark.timeout(60)
def test_unordered_streams_in_completion_order(tmp_path, batch):
    script, _ = batch
    inputs = tmp_path / "u"
    inputs.mkdir()
    (inputs / "0-slow.txt").write_text("x")
    for i in range(1, 6):
        (inputs / f"{i}.txt").write_text("x")
    run = procqueue("map", script, inputs, "-j", "2", "--unordered")
    names = [Path(r["input"]).name for r in records(run.stdout)]
    assert sorted(names) == sorted(p.name for p in inputs.iterdir())
    assert names[-1] == "0-slow.txt"  # 0.3 s: the others overtake it


@pytest.mark.timeout(60)
def test_failing_inputs_get_error_records_and_exit_1(tmp_path, batch):
    script, inputs = batch
    for name in ["raise.txt", "crash.txt", "set.txt"]:
        (inputs / name).write_text("x")
    run = procqueue("map", script, inputs, "--retries", "0", "-o", tmp_path / "out.jsonl")
    assert run.returncode == 1
    recs = {Path(r["input"]).name: r for r in records((tmp_path / "out.jsonl").read_text())}
    assert len(recs) == 7
    assert recs["raise.txt"]["error"]["type"] == "ValueError"
    assert "bad input raise.txt" in recs["raise.txt"]["error"]["message"]
    assert "job.py" in recs["raise.txt"]["error"]["traceback"]
    crash = recs["crash.txt"]["error"]
    assert crash["type"] == "WorkerCrashedError" and "exit code 7" in crash["message"]
    assert recs["set.txt"]["error"]["type"] == "ResultNotJSONSerializable"
    assert recs["a.txt"]["ok"]


@pytest.mark.timeout(60)
def test_an_exception_class_of_the_script_fails_only_its_input(tmp_path):
    # The error keeps the class's name (not the private module the workers import the script
    # under), the message and the traceback, and the pool goes on.
    script = tmp_path / "own.py"
    script.write_text("class Mine(Exception):\n    pass\n\n\ndef process(x):\n"
                      "    if x == '2':\n        raise Mine(f'bad {x}')\n    return x\n")
    run = procqueue("map", script, ":::", "1", "2", "3")
    assert run.returncode == 1
    recs = {r["input"]: r for r in records(run.stdout)}
    assert recs["1"]["ok"] and recs["3"]["ok"]
    error = recs["2"]["error"]
    assert (error["type"], error["message"]) == ("Mine", "bad 2")
    assert "raise Mine(f'bad {x}')" in error["traceback"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args,message", [
    (["missing.py", "IN"], "script not found"),
    (["BAD", "IN"], "syntax error"),
    (["SCRIPT", "IN", "--fn", "nothere"], "process, shout"),
    (["SCRIPT", "no/such/dir"], "input not found"),
    (["SCRIPT", "IN", "--halt", "sometimes"], "--halt"),
    (["SCRIPT", "IN", "-j", "-1.5"], "-j"),
    (["SCRIPT", "IN", "-j", "many"], "-j"),
    (["SCRIPT", "IN", "-k", "--unordered"], "contradict"),
    (["SCRIPT:nothere", "IN"], "no top-level function 'nothere'"),
    (["no_such_module_pq:f", "IN"], "cannot find module"),
    (["SCRIPT", "IN", "-o", "no/such/dir/out.jsonl"], "cannot write --output"),
    (["SCRIPT", "--lines", "no/such/list"], "cannot read --lines"),
])
def test_usage_errors_exit_2_with_a_clear_message(tmp_path, batch, args, message):
    script, inputs = batch
    bad = tmp_path / "bad.py"
    bad.write_text("def process(x:\n")
    mapping = {"SCRIPT": str(script), "IN": inputs, "BAD": bad}
    args = [a.replace("SCRIPT", mapping["SCRIPT"]) if a.startswith("SCRIPT") else a
            for a in args]
    run = procqueue("map", *[mapping.get(a, a) for a in args], cwd=tmp_path)
    assert run.returncode == 2
    assert message in run.stderr
    assert "Traceback" not in run.stderr
    assert run.stdout == ""


FLAKY = """
import os, sys, time
COUNTS = os.environ["PQ_FLAKY_DIR"]
def process(name):
    # Each run of an input leaves a file: its attempt number is how many there are.
    attempt = len([f for f in os.listdir(COUNTS) if f.startswith(name + ".")]) + 1
    open(os.path.join(COUNTS, f"{name}.{attempt}"), "w").close()
    fails = int(name.split("-")[1])
    if attempt <= fails:
        if name.startswith("hang"):
            time.sleep(30)
        if name.startswith("crash"):
            os._exit(3)
        raise ConnectionError(f"{name}: attempt {attempt} failed")
    return attempt
"""


def _run_flaky(tmp_path, *args):
    script = tmp_path / "flaky.py"
    script.write_text(FLAKY)
    counts = tmp_path / f"counts{time.monotonic_ns()}"
    counts.mkdir()
    run = subprocess.run([PROCQUEUE, "map", str(script), *map(str, args)], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "PQ_FLAKY_DIR": str(counts)})
    runs = {}
    for f in counts.iterdir():
        name = f.name.rsplit(".", 1)[0]
        runs[name] = runs.get(name, 0) + 1
    return run, {r["input"]: r for r in records(run.stdout)}, runs


@pytest.mark.timeout(60)
def test_retries_rerun_inputs_that_raised_timed_out_or_crashed_as_gnu_parallel(tmp_path):
    # GNU parallel's --retries runs a failed job again, whatever made it fail.  One input
    # per batch: a worker that crashes would otherwise also run again the inputs of its batch
    # it had finished but not yet reported (README: tiny tasks), and the counts here are exact.
    run, recs, runs = _run_flaky(tmp_path, "--retries", "2", "--timeout", "1", "-j", "2",
                                 "--chunksize", "1", ":::", "ok-0", "raise-2", "raise-9",
                                 "hang-1", "crash-1")
    assert run.returncode == 1, run.stderr
    assert recs["ok-0"]["ok"] and recs["ok-0"]["attempts"] == 1
    assert recs["raise-2"]["ok"] and recs["raise-2"]["result"] == 3
    assert recs["raise-2"]["attempts"] == 3
    assert recs["hang-1"]["ok"] and recs["hang-1"]["attempts"] == 2
    assert recs["crash-1"]["ok"] and recs["crash-1"]["attempts"] == 2
    failed = recs["raise-9"]
    assert not failed["ok"] and failed["attempts"] == 3
    assert failed["error"]["type"] == "ConnectionError"
    assert "attempt 3 failed" in failed["error"]["message"]
    assert runs == {"ok-0": 1, "raise-2": 3, "raise-9": 3, "hang-1": 2, "crash-1": 2}


@pytest.mark.timeout(60)
def test_timeout_with_a_unit_kills_the_task_after_that_long(tmp_path):
    # --timeout took only a bare number of seconds; --delay 1m and --rate 5/500ms took units
    run, recs, runs = _run_flaky(tmp_path, "--timeout", "500ms", "-j", "2", ":::", "hang-1",
                                 "ok-0")
    assert run.returncode == 1, run.stderr
    assert recs["hang-1"]["error"]["type"] == "TaskTimeoutError"
    assert recs["hang-1"]["seconds"] < 5  # half a second, not 500 of them
    run, recs, runs = _run_flaky(tmp_path, "--timeout", "1m", ":::", "ok-0")
    assert run.returncode == 0, run.stderr


@pytest.mark.timeout(60)
def test_without_retries_only_a_crash_runs_again(tmp_path):
    run, recs, runs = _run_flaky(tmp_path, "--timeout", "0.5", "-j", "2", "--chunksize", "1",
                                 ":::", "raise-1", "crash-1", "hang-1")
    assert run.returncode == 1, run.stderr
    assert recs["raise-1"]["error"]["type"] == "ConnectionError"
    assert recs["hang-1"]["error"]["type"] == "TaskTimeoutError"
    assert recs["crash-1"]["ok"] and recs["crash-1"]["attempts"] == 2
    assert runs == {"raise-1": 1, "crash-1": 2, "hang-1": 1}
    run, recs, runs = _run_flaky(tmp_path, "--retries", "0", "--chunksize", "1",
                                 ":::", "raise-1", "crash-1")
    assert recs["crash-1"]["error"]["type"] == "WorkerCrashedError"
    assert runs == {"raise-1": 1, "crash-1": 1}


def _marked_processes(marker):
    """Live processes whose environment carries `marker` (what a command started inherits)."""
    found = []
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE \
                    and proc.environ().get("PQ_TEST_MARKER") == marker:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


@pytest.mark.timeout(60)
@pytest.mark.parametrize("bad", ["script", "input"])
def test_a_usage_error_after_the_early_fork_server_start_leaves_no_process(tmp_path, batch,
                                                                            bad):
    # `procqueue map` starts the fork server before it parses its arguments; a run that
    # then stops on a usage error must stop that server too, not leave it to finish alone.
    script, inputs = batch
    args = ["map", tmp_path / "missing.py", inputs] if bad == "script" \
        else ["map", script, tmp_path / "missing-dir"]
    marker = f"{os.getpid()}-{bad}-{time.monotonic_ns()}"
    run = subprocess.run([PROCQUEUE, *map(str, args)], capture_output=True, text=True,
                         timeout=30, env={**os.environ, "PQ_TEST_MARKER": marker})
    assert run.returncode == 2, run.stderr
    assert not [p for p in _marked_processes(marker) if "forkserver" in " ".join(p.cmdline())]
    deadline = time.monotonic() + 5  # the resource tracker sees the command's exit itself
    while _marked_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _marked_processes(marker)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("jobs", [["-j", "8"], []], ids=["-j 8", "default"])
def test_no_more_workers_start_than_there_are_inputs(tmp_path, jobs):
    # As GNU parallel (`parallel -j 8 ::: a b` runs two jobs): a worker with no input to run
    # would only be started and stopped.  Each task counts the workers its server forked.
    script = tmp_path / "job.py"
    script.write_text("import os, psutil\n"
                      "def process(x):\n"
                      "    return len(psutil.Process(os.getppid()).children())\n")
    run = procqueue("map", script, *jobs, "--stats", ":::", "a", "b")
    assert run.returncode == 0, run.stderr
    usable = min(2, len(os.sched_getaffinity(0))) if not jobs else 2
    assert [r["result"] for r in records(run.stdout)] == [usable, usable]
    assert f"workers:         {usable}\n" in run.stderr


@pytest.mark.timeout(60)
def test_halt_now_reports_inputs_that_never_ran(tmp_path, batch):
    script, inputs = batch
    (inputs / "0-raise.txt").write_text("x")  # sorts first
    run = procqueue("map", script, inputs, "-j", "1", "--halt", "now,fail=1", "--retries", "0")
    assert run.returncode == 1
    recs = records(run.stdout)
    assert len(recs) == 5  # every input has a record
    assert recs[0]["error"]["type"] == "ValueError"
    assert any(r["error"]["type"] == "TaskCancelledError" and r["attempts"] == 0
               for r in recs if not r["ok"])


@pytest.mark.timeout(60)
def test_halt_on_success_stops_early_and_exits_0(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    inputs = tmp_path / "slow"
    inputs.mkdir()
    for i in range(8):
        (inputs / f"slow-{i}.txt").write_text("x")  # 0.3 s each
    # A failure before the success does not change the exit code (GNU parallel's: the idiom
    # "try each mirror until one works")
    (inputs / "0-raise.txt").write_text("x")  # sorts first
    run = procqueue("map", script, inputs, "-j", "1", "--retries", "0",
                    "--halt", "now,success=1")
    assert run.returncode == 0, run.stderr
    recs = records(run.stdout)
    assert len(recs) == 9  # every input has a record
    assert recs[0]["error"]["type"] == "ValueError" and recs[1]["ok"]
    never_ran = [r for r in recs[1:] if not r["ok"]]
    assert len(never_ran) >= 4
    assert all(r["error"]["type"] in ("TaskCancelledError",) for r in never_ran)
    assert "--halt now,success=1 reached" in run.stderr


@pytest.mark.timeout(60)
def test_halt_does_not_wait_for_a_slow_first_input_in_ordered_output(tmp_path):
    # records come in input order, but the halt must act when the failure happens
    # ('bad' fails once 'slow' has started: on a loaded machine the worker given 'slow' may
    # not have started it yet when 'bad' fails, and a halt then rightly never runs it)
    script = tmp_path / "job.py"
    started = tmp_path / "slow-started"
    script.write_text("import os, time\ndef process(x):\n    if x == 'slow':\n"
                      f"        open({str(started)!r}, 'w').close()\n"
                      "        time.sleep(120)\n    if x == 'bad':\n"
                      "        deadline = time.monotonic() + 20\n"
                      f"        while not os.path.exists({str(started)!r}) "
                      "and time.monotonic() < deadline:\n"
                      "            time.sleep(0.01)\n"
                      "        raise ValueError(x)\n    return x\n")
    run = procqueue("map", script, "-j", "2", "--halt", "now,fail=1", "--retries", "0",
                    ":::", "slow", "bad", "c", "d", timeout=40)
    assert run.returncode == 1
    recs = records(run.stdout)
    assert [r["input"] for r in recs] == ["slow", "bad", "c", "d"]
    assert recs[0]["error"]["type"] == "TaskCancelledError" and recs[0]["attempts"] == 1
    assert recs[1]["error"]["type"] == "ValueError"


@pytest.mark.timeout(60)
def test_inputs_waiting_for_a_retry_at_a_halt_keep_their_error(tmp_path):
    # Every input raises; -j 1 runs each once before any retry (the retries back off), so
    # when the first has used its retries and halts the run, the others wait for theirs:
    # their records keep the error they failed with, not "cancelled before it started"
    script = tmp_path / "job.py"
    script.write_text("def process(x):\n    raise ValueError(f'bad {x}')\n")
    joblog = tmp_path / "joblog"
    run = procqueue("map", script, "-j", "1", "--retries", "2", "--halt", "now,fail=1",
                    "--joblog", joblog, ":::", "x", "y", "z")
    assert run.returncode == 1, run.stderr
    recs = records(run.stdout)
    assert [r["input"] for r in recs] == ["x", "y", "z"]
    for r in recs:
        assert r["error"]["type"] == "ValueError", r
        assert r["error"]["message"] == f"bad {r['input']}" and r["attempts"] >= 1
        assert "raise ValueError" in r["error"]["traceback"]
    # Only the input that used its retries is logged: --resume gives the others theirs
    exhausted = [r["input"] for r in recs if r["attempts"] == 3]
    assert len(exhausted) == 1
    logged = joblog.read_text().splitlines()[1:]
    assert [line.split("\t")[-1] for line in logged] == [f"{script}:process {exhausted[0]}"]


@pytest.mark.timeout(60)
def test_gnu_parallel_halt_2_is_now_fail_1(batch):
    script, inputs = batch
    (inputs / "0-raise.txt").write_text("x")  # sorts first
    run = procqueue("map", script, inputs, "-j", "1", "--halt", "2", "--retries", "0")
    assert run.returncode == 1
    recs = records(run.stdout)
    assert recs[0]["error"]["type"] == "ValueError"
    assert "--halt now,fail=1 reached: killing running tasks" in run.stderr


@pytest.mark.timeout(60)
def test_several_input_sources_call_the_function_with_each_combination(tmp_path):
    # GNU parallel: `parallel job ::: a b ::: 1 2` runs `job a 1`, `job a 2`, `job b 1`, ...
    script = tmp_path / "pairs.py"
    script.write_text("def process(word, count):\n    return word * int(count)\n")
    run = procqueue("map", script, "-j", "2", "-q", "--joblog", tmp_path / "log.tsv",
                    ":::", "a", "b", ":::", "1", "2")
    assert run.returncode == 0, run.stderr
    assert [(r["input"], r["result"]) for r in records(run.stdout)] == [
        (["a", "1"], "a"), (["a", "2"], "aa"), (["b", "1"], "b"), (["b", "2"], "bb")]
    commands = [line.split("\t")[-1] for line in (tmp_path / "log.tsv").read_text().splitlines()]
    assert commands[1:] == [f"{script}:process {w} {n}" for w in "ab" for n in "12"]
    dry = procqueue("map", script, "--dry-run", ":::", "a", "b", "c", ":::+", "1", "2", "3")
    assert dry.returncode == 0 and dry.stdout.splitlines() == ["a 1", "b 2", "c 3"]
    one_source = procqueue("map", script, "-q", ":::", "a", "b")
    assert one_source.returncode == 2 and not one_source.stdout  # checked before any run
    assert "takes 2 positional arguments, but one input source gives it 1" in one_source.stderr


@pytest.mark.timeout(60)
def test_a_worker_starts_without_importing_the_command_line(tmp_path):
    # A worker of multiprocessing's shared fork server (the command forks its own from itself
    # unless it has threads or the switch is off) loads only the user's script: click and the
    # command's modules (argument parsing, output, progress) would add tens of ms to each
    # worker's start.
    script = tmp_path / "probe.py"
    script.write_text("import sys\n"
                      "def process(x):\n"
                      "    return sorted(m for m in sys.modules\n"
                      "                  if m == 'click' or m.startswith('procqueue.cli.'))\n")
    run = procqueue("map", script, "-j", "2", ":::", "a", "b",
                    env={"PROCQUEUE_FORK_PROGRAM": "0"})
    assert run.returncode == 0, run.stderr
    assert [r["result"] for r in records(run.stdout)] == [["procqueue.cli.loader"]] * 2


@pytest.mark.timeout(60)
def test_what_the_script_prints_goes_to_stderr_not_into_the_records(tmp_path):
    script = tmp_path / "noisy.py"
    # one write() per message: two workers share stderr, so print()'s pieces interleave
    script.write_text("import sys\nsys.stdout.write('importing\\n')\n"
                      "def process(x):\n    sys.stdout.write('working on ' + x + '\\n')\n"
                      "    sys.stdout.write('no newline')\n    return x\n")
    run = procqueue("map", script, "-j", "2", ":::", "a", "b", "c")
    assert run.returncode == 0, run.stderr
    assert [r["input"] for r in records(run.stdout)] == ["a", "b", "c"]  # every line is JSON
    assert "importing" in run.stderr and "working on b" in run.stderr


@pytest.mark.timeout(60)
def test_colsep_passes_each_column_as_an_argument(tmp_path):
    script = tmp_path / "job.py"
    script.write_text("def process(name, count):\n    return name * int(count)\n")
    (tmp_path / "table.tsv").write_text("ab\t2\nc\t3\n")
    run = procqueue("map", script, "--colsep", "\t", "-q", "::::", tmp_path / "table.tsv")
    assert run.returncode == 0, run.stderr
    assert [(r["input"], r["result"]) for r in records(run.stdout)] == [
        (["ab", "2"], "abab"), (["c", "3"], "ccc")]
    wrong = procqueue("map", script, "--colsep", ",", "::::", tmp_path / "table.tsv")
    assert wrong.returncode == 2 and "argument" in wrong.stderr  # one column, two parameters


@pytest.mark.timeout(60)
def test_max_args_passes_n_inputs_per_call_as_gnu_parallel_minus_n(tmp_path):
    # parallel -N 2 echo {1}-{2} ::: a b c d e
    script = tmp_path / "job.py"
    script.write_text("def process(*parts):\n    return '-'.join(parts)\n"
                      "def pair(a, b):\n    return a + b\n")
    run = procqueue("map", script, "-N", "2", "-q", ":::", "a", "b", "c", "d", "e")
    assert run.returncode == 0, run.stderr
    assert [(r["input"], r["result"]) for r in records(run.stdout)] == [
        (["a", "b"], "a-b"), (["c", "d"], "c-d"), (["e"], "e")]
    # The last call gets what is left: a function that needs two fails there, alone.
    run = procqueue("map", script, "--fn", "pair", "-n", "2", "-q", ":::", "a", "b", "c")
    assert run.returncode == 1
    first, last = records(run.stdout)
    assert first["ok"] and first["result"] == "ab"
    assert last["input"] == ["c"] and last["error"]["type"] == "TypeError"
    wrong = procqueue("map", script, "--fn", "pair", "--max-args", "3", ":::", "a", "b", "c")
    assert wrong.returncode == 2 and "-N 3 gives it 3 per call" in wrong.stderr
    assert wrong.stdout == ""
    linked = procqueue("map", script, "--fn", "pair", "--link", "-q", ":::", "a", "b",
                       ":::", "1", "2")
    assert [r["result"] for r in records(linked.stdout)] == ["a1", "b2"]


@pytest.mark.timeout(60)
def test_header_passes_each_rows_columns_as_keyword_arguments(tmp_path):
    # parallel --header : --colsep , echo {size} {name} :::: table.csv
    script = tmp_path / "job.py"
    script.write_text("def process(size, name):\n    return name * int(size)\n"
                      "def one(name):\n    return name\n")
    (tmp_path / "table.csv").write_text("name,size\nab,2\nc,3\nd\n")
    run = procqueue("map", script, "--header", ":", "--colsep", ",", "-q", "::::",
                    tmp_path / "table.csv")
    assert run.returncode == 1, run.stderr
    recs = records(run.stdout)
    assert [(r["input"], r.get("result")) for r in recs] == [
        (["ab", "2"], "abab"), (["c", "3"], "ccc"), (["d"], None)]
    assert "the row has 1 column(s) and the header 2" in recs[2]["error"]["message"]
    wrong = procqueue("map", script, "--fn", "one", "--header", ":", "--colsep", ",", "::::",
                      tmp_path / "table.csv")
    assert wrong.returncode == 2 and "takes no 'size'" in wrong.stderr and not wrong.stdout


@pytest.mark.timeout(60)
def test_delay_spaces_the_starts_as_gnu_parallel_does(tmp_path):
    script = tmp_path / "job.py"
    script.write_text("def process(x):\n    return x\n")
    joblog = tmp_path / "jobs.tsv"
    run = procqueue("map", script, "--delay", "0.2", "-j", "2", "-q", "--joblog", joblog,
                    ":::", "a", "b", "c", "d")
    assert run.returncode == 0, run.stderr
    starts = sorted(float(line.split("\t")[2]) for line in joblog.read_text().splitlines()[1:])
    assert len(starts) == 4
    gaps = [later - earlier for earlier, later in zip(starts, starts[1:])]
    assert min(gaps) >= 0.2 - 0.002, gaps  # the joblog keeps milliseconds
    assert procqueue("map", script, "--delay", "soon", ":::", "a").returncode == 2
    # scripts written for GNU parallel often say --will-cite: accepted, nothing printed
    cited = procqueue("map", script, "--will-cite", "-q", ":::", "a")
    assert cited.returncode == 0 and not cited.stderr
    assert procqueue("map", script, "--delay", "1", "--rate", "2/s", ":::", "a").returncode == 2


@pytest.mark.timeout(60)
def test_resume_and_resume_failed_from_the_joblog_as_gnu_parallel(tmp_path):
    script = tmp_path / "job.py"
    script.write_text("def process(x):\n    if x == 'c':\n        raise ValueError(x)\n"
                      "    return x\n")
    joblog = tmp_path / "jobs.tsv"

    def logged():
        return [(line.split("\t")[0], line.split("\t")[6], line.split(" ")[-1])
                for line in joblog.read_text().splitlines()[1:]]

    first = procqueue("map", script, "--joblog", joblog, "-q", ":::", "a", "b", "c", "d")
    assert first.returncode == 1
    more = procqueue("map", script, "--joblog", joblog, "--resume", "-q",
                     ":::", "a", "b", "c", "d", "e", "f")
    assert more.returncode == 0, more.stderr
    assert [r["input"] for r in records(more.stdout)] == ["e", "f"]  # only what never ran
    again = procqueue("map", script, "--joblog", joblog, "--resume-failed", "-q",
                      ":::", "a", "b", "c", "d", "e", "f")
    assert [r["input"] for r in records(again.stdout)] == ["c"]  # the failed one, once more
    assert logged() == [("1", "0", "a"), ("2", "0", "b"), ("3", "1", "c"), ("4", "0", "d"),
                        ("5", "0", "e"), ("6", "0", "f"), ("3", "1", "c")]  # appended, one header
    assert procqueue("map", script, "--resume", ":::", "a").returncode == 2  # needs --joblog
    assert procqueue("map", script, "--resume", "--joblog", joblog, "--journal",
                     tmp_path / "j.db", ":::", "a").returncode == 2


KILLED_BY_THE_STOP = """
import os, time
def process(x):
    if x == "slow":  # runs until released (the resumed run releases it at once)
        open({started!r}, "w").close()
        while not os.path.exists({release!r}):
            time.sleep(0.01)
    if x == "bad":  # fails once "slow" is running
        while not os.path.exists({started!r}):
            time.sleep(0.01)
        raise ValueError(x)
    return x
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("stop", ["halt now", "SIGTERM"])
def test_joblog_leaves_out_tasks_the_run_killed_so_resume_runs_them(tmp_path, stop):
    # As GNU parallel, which does not log the jobs it kills itself (Ctrl-C, SIGTERM, halt
    # now): a killed input was not done, and --resume must run it again.
    started, release = tmp_path / "started", tmp_path / "release"
    script = tmp_path / "job.py"
    script.write_text(KILLED_BY_THE_STOP.format(started=str(started), release=str(release)))
    joblog = tmp_path / "jobs.tsv"
    command = [PROCQUEUE, "map", str(script), "-q", "--joblog", str(joblog)]
    if stop == "halt now":
        inputs = [":::", "slow", "bad", "later"]
        first = procqueue(*command[1:], "-j", "2", "--halt", "now,fail=1", *inputs)
        assert first.returncode == 1, first.stderr
    else:
        inputs = [":::", "slow", "later"]
        proc = subprocess.Popen([*command, "-j", "1", *inputs], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 143, err
        first = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    recs = {r["input"]: r for r in records(first.stdout)}
    assert recs["slow"]["error"]["type"] == "TaskCancelledError"  # the record stays
    logged = [line.split("\t")[8].rsplit(" ", 1)[1]
              for line in joblog.read_text().splitlines()[1:]] if joblog.exists() else []
    assert "slow" not in logged
    release.touch()
    resumed = procqueue(*command[1:], "--resume", *inputs)
    assert resumed.returncode == 0, resumed.stderr
    assert [r["input"] for r in records(resumed.stdout)] == ["slow", "later"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("cut", ["in the Command", "before the Command", "in the Seq"])
def test_resume_after_a_joblog_line_cut_short_runs_that_input_again(tmp_path, cut):
    # A run killed while writing, or met by a full disk, leaves its last line cut short.  That
    # input is not logged: --resume runs it again and starts its own lines on lines of their
    # own.  Cut in the Command, the line was taken for a changed input (refused, exit 2);
    # cut before it, the next line was appended to the fragment (13 fields, run again later).
    script = tmp_path / "job.py"
    script.write_text("def process(x):\n    return x\n")
    joblog = tmp_path / "jobs.tsv"
    assert procqueue("map", script, "--joblog", joblog, "-q", ":::", "a", "b", "c").returncode == 0
    text = joblog.read_text()
    last = text.rstrip("\n").rfind("\n") + 1
    keep = {"in the Command": len(text) - 3, "before the Command": text.rfind("\t0\t") + 2,
            "in the Seq": last + 1}[cut]
    joblog.write_text(text[:keep])
    resumed = procqueue("map", script, "--joblog", joblog, "--resume", "-q",
                        ":::", "a", "b", "c", "d")
    assert resumed.returncode == 0, resumed.stderr
    assert [r["input"] for r in records(resumed.stdout)] == ["c", "d"]
    header, *lines = joblog.read_text().splitlines()
    assert header.startswith("Seq\t")
    assert all(len(line.split("\t")) == 9 for line in lines), lines
    assert sorted(line.split("\t")[0] for line in lines) == ["1", "2", "3", "4"]
    again = procqueue("map", script, "--joblog", joblog, "--resume", "-q",
                      ":::", "a", "b", "c", "d")
    assert again.returncode == 0 and again.stdout == "", again.stderr


@pytest.mark.timeout(60)
def test_joblog_keeps_inputs_that_are_not_utf8_as_their_bytes(tmp_path):
    # GNU parallel writes its jobs' bytes as they are.  The log was opened as strict UTF-8: a
    # file name that is not UTF-8 made its line fail (a traceback and exit 1, or the flusher
    # thread died and ~20 lines were lost, which --resume then ran again).
    script = tmp_path / "job.py"
    script.write_text("import os\ndef process(path):\n    return os.path.getsize(path)\n")
    inputs = tmp_path / "in"
    inputs.mkdir()
    names = [b"a.txt", b"caf\xe9.txt", b"\xff\xfe.txt"]
    for name in names:
        (inputs / os.fsdecode(name)).write_bytes(b"xy")
    joblog = tmp_path / "jobs.tsv"
    command = [PROCQUEUE, "map", str(script), "-q", "--joblog", str(joblog), str(inputs)]
    run = subprocess.run(command, capture_output=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert [r["ok"] for r in records(run.stdout.decode())] == [True] * 3
    logged = joblog.read_bytes().splitlines()[1:]
    # the bytes themselves, in the quotes a shell would need: '.../caf\xe9.txt' (parallel's)
    assert sorted(line.rsplit(b"/", 1)[1].rstrip(b"'") for line in logged) == sorted(names)
    resumed = subprocess.run(command + ["--resume"], capture_output=True, timeout=60)
    assert resumed.returncode == 0 and resumed.stdout == b"", resumed.stderr
    to_stdout = subprocess.run([PROCQUEUE, "map", str(script), "-q", "--joblog", "-",
                                "-o", str(tmp_path / "out.jsonl"), str(inputs)],
                               capture_output=True, timeout=60)
    assert to_stdout.returncode == 0, to_stdout.stderr
    assert sorted(line.rsplit(b"/", 1)[1].rstrip(b"'")
                  for line in to_stdout.stdout.splitlines()[1:]) == sorted(names)


@pytest.mark.timeout(60)
def test_resume_refuses_a_joblog_written_for_other_inputs(tmp_path):
    # --resume matches the log by position (Seq): inputs that changed would be skipped
    # silently (here "c" would be taken as done, being where "a" was)
    script = tmp_path / "job.py"
    script.write_text("def process(x):\n    return x\n")
    joblog = tmp_path / "jobs.tsv"
    assert procqueue("map", script, "--joblog", joblog, "-q", ":::", "a", "b").returncode == 0
    logged = joblog.read_text()
    changed = procqueue("map", script, "--joblog", joblog, "--resume", "-q",
                        ":::", "c", "a", "b")
    assert changed.returncode == 2 and changed.stdout == ""
    assert changed.stderr.splitlines() == [
        f"Error: --resume: the inputs changed since {joblog} was written: Seq 1 is 'a' there "
        "but 'c' now (give the same inputs, or another --joblog)"]
    assert joblog.read_text() == logged
    # the same inputs, more after them, the script named by another path: resumed
    more = procqueue("map", "job.py", "--joblog", joblog, "--resume", "-q",
                     ":::", "a", "b", "c", cwd=tmp_path)
    assert more.returncode == 0, more.stderr
    assert [r["input"] for r in records(more.stdout)] == ["c"]


@pytest.mark.timeout(60)
def test_joblog_quotes_arguments_so_resume_refuses_inputs_split_otherwise(tmp_path):
    # parallel --joblog logs `echo 'a b' c`; the log said `a b c`, which is also ('a', 'b c'),
    # so --resume with ::: a ::: 'b c' took the changed inputs as done and ran nothing
    script = tmp_path / "job.py"
    script.write_text("def process(*args):\n    return list(args)\n")
    joblog = tmp_path / "jobs.tsv"
    first = procqueue("map", script, "--joblog", joblog, "-q", ":::", "a b", ":::", "c", "d\te")
    assert first.returncode == 0, first.stderr
    commands = [line.split("\t", 8)[8] for line in joblog.read_text().splitlines()[1:]]
    assert commands == [f"{script}:process 'a b' c", f"{script}:process 'a b' $'d\\te'"]
    logged = joblog.read_text()
    changed = procqueue("map", script, "--joblog", joblog, "--resume", "-q",
                        ":::", "a", ":::", "b c", "d\te")
    assert changed.returncode == 2 and changed.stdout == ""
    assert "Seq 1 is \"'a b' c\" there but \"a 'b c'\" now" in changed.stderr
    assert joblog.read_text() == logged
    same = procqueue("map", script, "--joblog", joblog, "--resume", "-q",
                     ":::", "a b", ":::", "c", "d\te")
    assert same.returncode == 0 and same.stdout == "", same.stderr


@pytest.mark.timeout(60)
def test_resume_of_a_log_of_untrimmed_columns_says_how(tmp_path):
    # A log written before --colsep trimmed its columns (as one with --trim n is) no longer
    # matches: the refusal says to give --trim n
    script = tmp_path / "job.py"
    script.write_text("def process(a, b):\n    return [a, b]\n")
    rows = tmp_path / "rows.csv"
    rows.write_text("a,  b\nc, d\n")
    joblog = tmp_path / "joblog"
    first = procqueue("map", script, "--colsep", ",", "--trim", "n", "--joblog", joblog,
                      "::::", rows)
    assert first.returncode == 0, first.stderr
    run = procqueue("map", script, "--colsep", ",", "--joblog", joblog, "--resume", "::::", rows)
    assert run.returncode == 2 and "give --trim n" in run.stderr, run.stderr
    again = procqueue("map", script, "--colsep", ",", "--trim", "n", "--joblog", joblog,
                      "--resume", "::::", rows)
    assert again.returncode == 0 and again.stdout == "", again.stderr


@pytest.mark.timeout(60)
def test_resume_accepts_a_joblog_written_before_arguments_were_quoted(tmp_path):
    # A log of an earlier procqueue joined the arguments by spaces (a tab made a space):
    # the same inputs still resume from it.
    script = tmp_path / "job.py"
    script.write_text("def process(*args):\n    return list(args)\n")
    joblog = tmp_path / "jobs.tsv"
    joblog.write_text("Seq\tHost\tStarttime\tJobRuntime\tSend\tReceive\tExitval\tSignal\t"
                      "Command\n"
                      f"1\t:\t1700000000.000\t   0.001\t0\t0\t0\t0\t{script}:process a b c\n"
                      f"2\t:\t1700000000.000\t   0.001\t0\t0\t0\t0\t{script}:process a b d e\n")
    resumed = procqueue("map", script, "--joblog", joblog, "--resume", "-q",
                        ":::", "a b", ":::", "c", "d\te", "f")
    assert resumed.returncode == 0, resumed.stderr
    assert [r["input"] for r in records(resumed.stdout)] == [["a b", "f"]]
    other = procqueue("map", script, "--joblog", joblog, "--resume", "-q",
                      ":::", "a b", ":::", "x", "d\te", "f")
    assert other.returncode == 2 and "Seq 1 is 'a b c' there but \"'a b' x\" now" in \
        other.stderr


@pytest.mark.timeout(60)
def test_joblog_in_gnu_parallels_format(tmp_path):
    script = tmp_path / "job.py"
    script.write_text("import os\ndef process(x):\n    if x == 'boom':\n"
                      "        raise ValueError(x)\n    if x == 'crash':\n"
                      "        os._exit(7)\n    return x\n")
    joblog = tmp_path / "jobs.tsv"
    run = procqueue("map", script, "--joblog", joblog, "--retries", "0", "-q",
                    ":::", "a", "boom", "crash", "b")
    assert run.returncode == 1
    header, *lines = joblog.read_text().splitlines()
    assert header.split("\t") == ["Seq", "Host", "Starttime", "JobRuntime", "Send", "Receive",
                                   "Exitval", "Signal", "Command"]
    rows = {row[8].rsplit(" ", 1)[1]: row for row in (line.split("\t") for line in lines)}
    assert sorted(rows) == ["a", "b", "boom", "crash"]
    assert [rows[x][0] for x in ("a", "boom", "crash", "b")] == ["1", "2", "3", "4"]
    assert [(rows[x][6], rows[x][7]) for x in ("a", "boom", "crash")] == [
        ("0", "0"), ("1", "0"), ("7", "0")]
    assert all(abs(float(row[2]) - time.time()) < 60 for row in rows.values())
    assert procqueue("map", script, "--joblog", tmp_path / "no" / "dir.tsv", ":::", "a"
                     ).returncode == 2


@pytest.mark.timeout(60)
def test_joblog_exit_values_follow_the_records(tmp_path):
    # as parallel derives them from a wait status: sys.exit(3) is 3, a SIGKILL 0 with Signal
    # 9; a result JSON cannot hold fails its record, so its line says 1 (--resume-failed
    # must run it again)
    script = tmp_path / "job.py"
    script.write_text("import dataclasses, os, signal, sys\n"
                      "@dataclasses.dataclass\nclass Point:\n    x: int\n"
                      "def process(x):\n"
                      "    if x == 'exit3':\n        sys.exit(3)\n"
                      "    if x == 'kill':\n        os.kill(os.getpid(), signal.SIGKILL)\n"
                      "    if x == 'point':\n        return Point(1)\n"
                      "    if x == 'bytes':\n        return b'x'\n    return x\n")
    joblog = tmp_path / "jobs.tsv"
    inputs = [":::", "a", "exit3", "kill", "bytes", "point"]
    run = procqueue("map", script, "--joblog", joblog, "--retries", "0", "-q", *inputs)
    assert run.returncode == 1
    recs = records(run.stdout)
    assert list(recs[3]) == ["input", "ok", "error", "attempts", "seconds", "worker"]
    # (a class of the script's own is as any object JSON cannot hold)
    assert [r["error"]["type"] for r in recs[3:]] == ["ResultNotJSONSerializable"] * 2
    assert "type Point" in recs[4]["error"]["message"]
    rows = [line.split("\t") for line in joblog.read_text().splitlines()[1:]]
    assert {row[8].rsplit(" ", 1)[1]: (row[6], row[7]) for row in rows} == {
        "a": ("0", "0"), "exit3": ("3", "0"), "kill": ("0", "9"), "bytes": ("1", "0"),
        "point": ("1", "0")}
    again = procqueue("map", script, "--joblog", joblog, "--resume-failed", "--retries", "0",
                      "-q", *inputs)
    assert [r["input"] for r in records(again.stdout)] == ["exit3", "kill", "bytes", "point"]


@pytest.mark.timeout(60)
def test_joblog_and_records_reach_their_files_while_the_run_goes_on(tmp_path):
    # a run killed with SIGKILL keeps what it logged, so --resume does not run it again
    script = tmp_path / "job.py"
    script.write_text("import time\ndef process(x):\n    time.sleep(float(x))\n"
                      "    return x\n")
    joblog, out = tmp_path / "jobs.tsv", tmp_path / "out.jsonl"
    inputs = [":::", "0.05", "0.05", "0.05", "0.05", "60", "60"]
    proc = subprocess.Popen([PROCQUEUE, "map", str(script), "-j", "2", "-q", "--joblog",
                             str(joblog), "-o", str(out), *inputs], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (
                joblog.exists() and len(joblog.read_text().splitlines()) == 5
                and out.exists() and len(out.read_text().splitlines()) == 4):
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert len(out.read_text().splitlines()) == 4
    assert [line.split("\t")[0] for line in joblog.read_text().splitlines()] == [
        "Seq", "1", "2", "3", "4"]
    resumed = procqueue("map", script, "--joblog", joblog, "--resume", "-q",
                        *inputs[:-2], "0", "0")
    assert [r["input"] for r in records(resumed.stdout)] == ["0", "0"]


@pytest.mark.timeout(60)
def test_a_script_that_does_not_load_leaves_an_earlier_runs_files_alone(tmp_path):
    script = tmp_path / "broken.py"
    script.write_text("raise RuntimeError('broken at import')\ndef process(x):\n    return x\n")
    out, joblog = tmp_path / "out.jsonl", tmp_path / "jobs.tsv"
    out.write_text("precious records\n")
    joblog.write_text("precious log\n")
    run = procqueue("map", script, "-o", out, "--joblog", joblog, ":::", "a")
    assert run.returncode == 2 and "broken at import" in run.stderr
    assert out.read_text() == "precious records\n" and joblog.read_text() == "precious log\n"


@pytest.mark.timeout(60)
def test_dash_as_output_or_joblog_is_stdout(tmp_path, batch):
    script, _ = batch
    run = procqueue("map", script, "--fn", "shout", "-o", "-", "--joblog", "-", ":::", "x",
                    cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert [json.loads(line)["result"] for line in lines if line.startswith("{")] == ["X"]
    assert [line.split("\t")[0] for line in lines if not line.startswith("{")] == ["Seq", "1"]
    assert not (tmp_path / "-").exists()


@pytest.mark.timeout(60)
def test_dry_run_lists_the_inputs_and_runs_nothing(tmp_path, batch):
    script, inputs = batch
    marker = tmp_path / "ran"
    script.write_text(f"def process(x):\n    open({str(marker)!r}, 'a').write(x)\n")
    run = procqueue("map", script, inputs, "--glob", "*.txt", "--dry-run")
    assert run.returncode == 0, run.stderr
    assert [Path(line).name for line in run.stdout.splitlines()] == ["a.txt", "b.txt", "d.txt"]
    assert not marker.exists()
    bad = procqueue("map", script, inputs, "--dry-run", "--halt", "sometimes")
    assert bad.returncode == 2  # options are still checked


@pytest.mark.timeout(60)
def test_stats_summary(batch):
    script, inputs = batch
    run = procqueue("map", script, inputs, "--stats", "-j", "2")
    assert "tasks:           4" in run.stderr and "efficiency:" in run.stderr


@pytest.mark.timeout(60)
def test_version_and_help():
    assert procqueue("--version").stdout.startswith("procqueue, version")
    help_text = procqueue("map", "--help").stdout
    assert "Examples:" in help_text and "--halt" in help_text


SLEEPY = """
import os, time
def process(item):
    with open(os.path.join({log!r}, f"{{os.getpid()}}"), "a") as f:
        f.write(item + "\\n")
    time.sleep(0.2 if int(item) < 4 else 30)
    return int(item)
"""


def _script_logging_to_a_folder(tmp_path, template, name):
    """A script made from `template`, whose tasks record themselves in a fresh folder
    (its {log}): returns (script, folder)."""
    log = tmp_path / "log"
    log.mkdir()
    script = tmp_path / name
    script.write_text(template.format(log=str(log)))
    return script, log


@pytest.mark.timeout(60)
@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_writes_finished_records_and_leaves_no_process(tmp_path, presses):
    script, log = _script_logging_to_a_folder(tmp_path, SLEEPY, "sleepy.py")
    proc = subprocess.Popen([PROCQUEUE, "map", str(script), "-", "-j", "2", "--unordered",
                             "--interrupt-grace", "1"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdin.write("\n".join(str(i) for i in range(20)) + "\n")
    proc.stdin.close()
    proc.stdin = None  # communicate() must not flush it
    # No proc.stdout.readline() here: communicate() reads the pipe itself, so lines that
    # readline() buffered beyond the first would be lost.
    deadline = time.monotonic() + 20
    while len(list(log.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # now the two workers are in 30 s tasks
    workers = [int(p.name) for p in log.iterdir()]
    started = time.monotonic()
    for _ in range(presses):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.1)
    out, err = proc.communicate(timeout=20)
    assert time.monotonic() - started < 5.0  # control returns promptly
    assert proc.returncode == 130
    recs = records(out)  # valid JSON Lines
    assert sum(r["ok"] for r in recs) >= 4, (recs, err)
    assert "Traceback" not in err
    assert len(recs) == 20  # every input accounted for (ok, killed or never started)
    assert wait_gone(workers, 2) == []


DRAINED = """
import os, time
def process(item):
    with open(os.path.join({log!r}, item), "w") as f:
        f.write(str(os.getpid()))
    time.sleep(1.0)
    return int(item)
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("to", ["command", "group"])
def test_sighup_lets_running_tasks_finish_and_starts_no_other(tmp_path, to):
    # The terminal went away: as GNU parallel, no new inputs, the running ones complete.  A
    # terminal (or ssh) hangs up the whole process group: the pool's fork server and the
    # resource tracker are in it, and the workers must not die with them.
    script, log = _script_logging_to_a_folder(tmp_path, DRAINED, "drained.py")
    proc = subprocess.Popen([PROCQUEUE, "map", str(script), "-j", "2", ":::",
                             *map(str, range(20))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=to == "group")
    deadline = time.monotonic() + 20
    while len(list(log.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    if to == "group":  # both workers are in 1 s tasks
        os.killpg(proc.pid, signal.SIGHUP)
    else:
        proc.send_signal(signal.SIGHUP)
    signalled = time.monotonic()
    out, err = proc.communicate(timeout=20)
    assert time.monotonic() - signalled < 5  # not the 10 s the whole batch takes
    assert proc.returncode == 129, err
    recs = {r["input"]: r for r in records(out)}
    assert len(recs) == 20  # every input accounted for
    started = {p.name for p in log.iterdir()}
    assert 2 <= len(started) <= 4  # those running then (one more each, at the very moment)
    assert all(recs[i]["ok"] and recs[i]["attempts"] == 1 for i in started)  # drained
    assert all(recs[i]["attempts"] == 0 for i in set(recs) - started)  # never started
    assert "Traceback" not in err
    pids = [int((log / name).read_text()) for name in started]
    assert wait_gone(pids, 2) == []


@pytest.mark.timeout(90)
def test_example_batch_from_the_readme(tmp_path):
    root = Path(__file__).resolve().parent.parent
    inputs = tmp_path / "inputs"
    subprocess.run([sys.executable, root / "examples" / "make_inputs.py", inputs, "--files",
                    "20", "--words", "2000"], check=True, capture_output=True)
    run = procqueue("map", root / "examples" / "wordstats.py", inputs, "-j", "2")
    assert run.returncode == 0, run.stderr
    recs = records(run.stdout)
    assert len(recs) == 20 and all(r["ok"] for r in recs)
    assert recs[0]["result"]["words"] == 2000


@pytest.mark.timeout(60)
def test_a_procqueue_directory_in_the_working_directory_does_not_shadow_ours(tmp_path, batch):
    # e.g. running the installed command from a source checkout: the fork server must not
    # import the checkout's package instead of the installed one
    script, inputs = batch
    fake = tmp_path / "cwd" / "procqueue"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('the shadowing package was imported')\n")
    run = procqueue("map", script, inputs, "-j", "2", cwd=tmp_path / "cwd")
    assert run.returncode == 0, run.stderr[-2000:]
    assert len(records(run.stdout)) == 4


COUNTING = """
import os
def process(path):
    with open({log!r}, "a") as f:
        f.write(os.path.basename(path) + "\\n")
    return os.path.basename(path)
"""


@pytest.mark.timeout(60)
def test_journal_resumes_without_recomputing(tmp_path, batch):
    _, inputs = batch
    log = tmp_path / "calls.log"
    script = tmp_path / "counting.py"
    script.write_text(COUNTING.format(log=str(log)))
    db = tmp_path / "run.db"
    first = procqueue("map", script, inputs / "sub", "--journal", db)
    assert first.returncode == 0 and len(records(first.stdout)) == 1
    second = procqueue("map", script, inputs, "--journal", db)
    assert second.returncode == 0, second.stderr
    assert "resuming: 1 of 4 inputs already done, 3 to run" in second.stderr
    assert len(records(second.stdout)) == 4  # complete output, in order
    assert sorted(log.read_text().split()) == ["a.txt", "b.txt", "c.dat", "d.txt"]
    summary = procqueue("journal", db)
    assert "done: 4" in summary.stdout
    script.write_text(COUNTING.format(log=str(log)).replace("return os.path.basename(path)",
                                                            "return path"))
    changed = procqueue("map", script, inputs, "--journal", db)
    assert changed.returncode == 2 and "different function" in changed.stderr


TIMED = """
import os, time
def process(path):
    start = time.time()
    time.sleep(0.05)
    return [start, time.time()]
"""


@pytest.mark.timeout(60)
def test_limit_options(tmp_path, batch):
    _, inputs = batch
    script = tmp_path / "timed.py"
    script.write_text(TIMED)
    name = f"pq-cli-{os.getpid()}"
    try:
        run = procqueue("map", script, inputs, "-j", "2", "--concurrency", "1",
                        "--rate", "100/1s", "--limit", f"{name}=1",
                        "--key-from", "x.split('/')[-1][0]", "--key-concurrency", "1")
        assert run.returncode == 0, run.stderr
        spans = sorted(r["result"] for r in records(run.stdout))
        assert len(spans) == 4
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # one at a time
        bad = procqueue("map", script, inputs, "--rate", "fast", "--limit", "x=y")
        assert bad.returncode == 2 and "--rate" in bad.stderr
    finally:
        for kind in ("sem", "rate"):
            path = f"/dev/shm/procqueue.{kind}.{name}"
            if os.path.exists(path):
                os.unlink(path)


@pytest.mark.timeout(60)
def test_sigterm_kills_running_tasks_now_and_exits_143(tmp_path):
    script, log = _script_logging_to_a_folder(tmp_path, SLEEPY, "sleepy.py")
    proc = subprocess.Popen([PROCQUEUE, "map", str(script), "-", "-j", "2",
                             "--interrupt-grace", "30"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdin.write("\n".join(str(i) for i in range(12)) + "\n")
    proc.stdin.close()
    proc.stdin = None
    deadline = time.monotonic() + 20
    while sum(len(p.read_text().split()) for p in log.iterdir()) < 6 and \
            time.monotonic() < deadline:  # inputs 4 and 5 have started their 30 s sleep
        time.sleep(0.05)
    workers = [int(p.name) for p in log.iterdir()]
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    assert time.monotonic() - started < 5.0  # SIGTERM does not wait for the grace period
    assert proc.returncode == 143
    recs = records(out)
    assert len(recs) == 12 and sum(r["ok"] for r in recs) == 4
    assert "Traceback" not in err
    assert wait_gone(workers, 2) == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_kill_keeps_what_the_killed_workers_batch_had_finished(tmp_path, sig):
    # One worker, one batch: a, b, c, d finish in microseconds, then "hang" runs.  Killing the
    # run (SIGTERM, or Ctrl-C twice) kills that worker: a-d were computed, so their records
    # are results, not "cancelled" (the worker sends them when it gets its SIGTERM).
    script = tmp_path / "job.py"
    started = tmp_path / "hang-started"
    script.write_text(f"import time\ndef process(name):\n    if name == 'hang':\n"
                      f"        open({str(started)!r}, 'w').close()\n        time.sleep(30)\n"
                      f"    return name\n")
    proc = subprocess.Popen([PROCQUEUE, "map", str(script), "-j", "1", "--chunksize", "5",
                             "-q", ":::", "a", "b", "c", "d", "hang", "e"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not started.exists() and time.monotonic() < deadline:  # a-d done, "hang" sleeping
        time.sleep(0.02)
    proc.send_signal(sig)
    if sig == signal.SIGINT:
        time.sleep(0.2)
        proc.send_signal(sig)  # the second press kills running tasks
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 128 + sig, err
    recs = {r["input"]: r for r in records(out)}
    assert [recs[n]["result"] for n in "abcd"] == ["a", "b", "c", "d"]
    assert recs["hang"]["error"]["type"] == recs["e"]["error"]["type"] == "TaskCancelledError"
    assert recs["e"]["attempts"] == 0


STAMPED = """
import os, time
def process(item):
    with open(os.path.join({log!r}, item), "w") as f:
        f.write(f"{{time.time()}} {{os.getpid()}}")
    time.sleep(1.5)
    return int(item)
"""


def _interrupt_once(tmp_path):
    """Runs 20 inputs of 1.5 s on 2 workers, presses Ctrl-C once while the second pair runs
    (by then the pool has measured task times and keeps a next task queued at each worker),
    default options (--interrupt-grace 3 s: enough for them to finish), and returns what
    happened."""
    script, log = _script_logging_to_a_folder(tmp_path, STAMPED, "stamped.py")
    proc = subprocess.Popen([PROCQUEUE, "map", str(script), "-", "-j", "2"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdin.write("\n".join(str(i) for i in range(20)) + "\n")
    proc.stdin.close()
    proc.stdin = None
    deadline = time.monotonic() + 20
    while len(list(log.iterdir())) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # both workers are inside their second task
    sigint_at = time.time()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    elapsed = time.time() - sigint_at
    starts = {p.name: p.read_text().split() for p in log.iterdir()}
    return proc.returncode, records(out), err, elapsed, sigint_at, {
        item: (float(t), int(pid)) for item, (t, pid) in starts.items()}


@pytest.mark.timeout(60)
def test_first_ctrl_c_lets_running_tasks_finish_and_cancels_the_rest(tmp_path):
    code, recs, err, elapsed, sigint_at, starts = _interrupt_once(tmp_path)
    assert code == 130 and elapsed < 6.0  # 1.5 s tasks: finish (+1 queued each, see below)
    assert "Press Ctrl-C again to kill them" in err and "Traceback" not in err
    assert len(recs) == 20  # every input accounted for
    by_input = {r["input"]: r for r in recs}
    running = [item for item, (t, _) in starts.items() if t < sigint_at]
    assert len(running) == 4 and all(by_input[i]["ok"] for i in running)  # finished, not killed
    for rec in recs:
        if rec["input"] not in starts:
            assert rec["attempts"] == 0 and rec["error"]["type"] == "TaskCancelledError"
    assert wait_gone((pid for _, pid in starts.values()), 2) == []


@pytest.mark.timeout(60)
def test_no_input_starts_after_the_first_ctrl_c(tmp_path):
    _, _, _, _, sigint_at, starts = _interrupt_once(tmp_path)
    assert sorted(item for item, (t, _) in starts.items() if t > sigint_at) == []


@pytest.mark.timeout(60)
def test_gnu_parallel_job_forms_and_keep_order(batch):
    script, inputs = batch
    run = procqueue("map", script, inputs, "-j", "0", "-k")
    assert run.returncode == 0, run.stderr
    assert [r["input"] for r in records(run.stdout)] == sorted(
        str(p) for p in inputs.rglob("*") if p.is_file())


@pytest.mark.timeout(120)
def test_a_module_in_the_working_directory_is_importable_by_map_and_by_a_queues_worker(tmp_path):
    """SCRIPT as `module:NAME`, and a queue's function by reference: found where the command
    runs, as `python -m` finds it (the console script's path starts with its bin directory)."""
    (tmp_path / "jobs_here.py").write_text("def double(x):\n    return 2 * int(x)\n")
    run = procqueue("map", "-q", "jobs_here:double", ":::", "1", "2", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert [r["result"] for r in records(run.stdout)] == [2, 4]
    queued = procqueue("enqueue", "jobs.db", "jobs_here:double", ":::", "5", cwd=tmp_path)
    assert queued.returncode == 0, queued.stderr
    worker = procqueue("worker", "jobs.db", "-j", "1", "--until-idle", cwd=tmp_path)
    assert worker.returncode == 0 and "1 succeeded" in worker.stderr, worker.stderr
    result = procqueue("result", "jobs.db", queued.stdout.split()[0], cwd=tmp_path)
    assert json.loads(result.stdout)["result"] == 10
