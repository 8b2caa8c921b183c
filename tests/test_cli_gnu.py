"""`procqueue map` under a GNU parallel / xargs user's hands (issue #22): inputs that look like
options, unreadable directories, empty input, bad options and paths, a script that does not
import, a closed stdout, a full disk, `timeout -s INT`, the bar sharing a terminal, help."""
from __future__ import annotations

import functools
import importlib
import json
import os
import platform
import pty
import re
import select
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import click
import pytest

# The module: `procqueue.cli.main` is also the name of the command's entry-point function.
cli_main = importlib.import_module("procqueue.cli.main")

PROCQUEUE = shutil.which("procqueue") or "procqueue"
README = Path(__file__).resolve().parent.parent / "README.md"


def procqueue(*args: Any, stdin: str | None = None, timeout: float = 60,
              **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROCQUEUE, *map(str, args)], input=stdin, capture_output=True,
                          text=True, timeout=timeout,
                          stdin=None if stdin is not None else subprocess.DEVNULL, **kwargs)


def records(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


@pytest.fixture
def echo(tmp_path: Path) -> Path:
    script = tmp_path / "echo.py"
    script.write_text("def process(*args):\n    return list(args)\n")
    return script


# ---- 1. words after ::: are inputs -------------------------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("words", [["2", "-1", "0.1"], ["-q"], ["--help"], ["-j", "3"]])
def test_every_word_after_a_separator_is_an_input(echo: Path, words: list[str]) -> None:
    run = procqueue("map", echo, "-q", ":::", *words)
    assert run.returncode == 0, run.stderr
    assert [r["input"] for r in records(run.stdout)] == words


@pytest.mark.timeout(60)
def test_options_before_the_separator_still_apply_and_later_sources_take_dashes(echo: Path
                                                                                ) -> None:
    run = procqueue("map", echo, "-q", "-j", "1", ":::", "a", ":::", "-x", "--y")
    assert run.returncode == 0, run.stderr
    assert [r["result"] for r in records(run.stdout)] == [["a", "-x"], ["a", "--y"]]
    assert len({r["worker"] for r in records(run.stdout)}) == 1  # -j 1 applied


# ---- 2. an unreadable directory is said, and fails the run ----------------------------------

def make_unreadable_tree(root: Path) -> Path:
    """`root/ok.txt`, and a directory nested so deep that its path is longer than PATH_MAX:
    the kernel refuses to open it by that path (ENAMETOOLONG), as it refuses an unreadable
    directory to a user, but for root too."""
    (root / "ok.txt").write_text("ok")
    fd = os.open(root, os.O_RDONLY)
    try:
        for level in range(18):  # 18 x 251 characters > 4096
            name = f"{level:02d}" + "d" * 248
            os.mkdir(name, dir_fd=fd)
            inner = os.open(name, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = inner
        leaf = os.open("lost.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.close(leaf)
    finally:
        os.close(fd)
    return root


@pytest.mark.timeout(60)
def test_a_directory_that_cannot_be_read_is_said_and_the_run_exits_1(tmp_path: Path,
                                                                     echo: Path) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    make_unreadable_tree(inputs)
    run = procqueue("map", echo, "-q", inputs)
    assert run.returncode == 1, run.stderr
    assert "cannot read directory" in run.stderr
    assert [Path(r["input"]).name for r in records(run.stdout)] == ["ok.txt"]  # the rest ran
    assert all(r["ok"] for r in records(run.stdout))


@pytest.mark.timeout(60)
@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any directory: the test above "
                    "makes one the kernel refuses to root as well")
def test_a_directory_without_read_permission_is_said_and_the_run_exits_1(tmp_path: Path,
                                                                         echo: Path) -> None:
    inputs = tmp_path / "inputs"
    (inputs / "locked").mkdir(parents=True)
    (inputs / "locked" / "hidden.txt").write_text("x")
    (inputs / "ok.txt").write_text("ok")
    (inputs / "locked").chmod(0)
    try:
        run = procqueue("map", echo, "-q", inputs)
    finally:
        (inputs / "locked").chmod(0o755)
    assert run.returncode == 1 and "cannot read directory" in run.stderr


# ---- 3. empty input is no error -------------------------------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["empty pipe", "/dev/null", "empty ::: source"])
def test_no_inputs_exits_0_saying_so(echo: Path, how: str) -> None:
    if how == "empty pipe":
        run = procqueue("map", echo, stdin="")
    elif how == "/dev/null":
        with open(os.devnull) as devnull:
            run = subprocess.run([PROCQUEUE, "map", str(echo)], stdin=devnull,
                                 capture_output=True, text=True, timeout=60)
    else:
        run = procqueue("map", echo, ":::", "a", ":::")
    assert run.returncode == 0, run.stderr
    assert run.stdout == "" and run.stderr.strip() == "procqueue: no inputs"
    quiet = procqueue("map", echo, "-q", stdin="")
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", "")


# ---- 4. bad option values and paths: exit 2, one line, before any work ---------------------

BAD_OPTIONS = [
    (["--timeout", "0%"], "--timeout"),
    (["--timeout", "50%"], "--timeout"),
    (["--timeout", "abc%"], "--timeout"),
    (["--max-memory-per-child", "2X"], "--max-memory-per-child"),
    (["--memfree", "lots"], "--memfree"),
    (["--journal", "/nonexistent/x.db"], "--journal"),
    (["--trace", "/nonexistent/x.json"], "--trace"),
    (["--joblog", "/nonexistent/x.tsv"], "--joblog"),
    (["-o", "/nonexistent/out.jsonl"], "--output"),
    (["--key-from", "y[0]"], "--key-from"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
@pytest.mark.parametrize("option, named", BAD_OPTIONS, ids=[" ".join(o) for o, _ in BAD_OPTIONS])
def test_a_bad_option_is_a_one_line_usage_error_before_any_work(
        tmp_path: Path, option: list[str], named: str, dry_run: bool) -> None:
    marker = tmp_path / "ran"
    script = tmp_path / "job.py"
    script.write_text(f"def process(x):\n    open({str(marker)!r}, 'a').write(x)\n")
    run = procqueue("map", script, *option, *(["--dry-run"] if dry_run else []),
                    ":::", "a", "b")
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and named in errors[0], run.stderr
    assert not marker.exists() and run.stdout == ""


@pytest.mark.timeout(60)
def test_a_key_expression_using_the_input_and_builtins_is_fine(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text("def process(x):\n    return x\n")
    run = procqueue("map", script, "-q", "--key-from", "len([c for c in x if c.isdigit()])",
                    ":::", "a1", "b22")
    assert run.returncode == 0, run.stderr


# ---- 5. a script that fails to import: exit 2, its traceback once ---------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("top_level", ["import nonexistent_mod_pq",
                                       "raise RuntimeError('broken at import')"])
def test_a_script_that_fails_to_import_is_a_usage_error_with_its_traceback_once(
        tmp_path: Path, top_level: str) -> None:
    script = tmp_path / "broken.py"
    script.write_text(f"{top_level}\n\ndef process(x):\n    return x\n")
    run = procqueue("map", script, "-j", "2", ":::", *map(str, range(10)))
    assert run.returncode == 2, run.stderr
    assert run.stdout == ""  # not one identical error record per input
    assert run.stderr.count("Traceback") == 1, run.stderr
    assert top_level in run.stderr and "broken.py" in run.stderr
    assert "procqueue/worker.py" not in run.stderr


@pytest.mark.timeout(60)
def test_dry_run_finds_a_script_that_fails_to_import(tmp_path: Path) -> None:
    script = tmp_path / "broken.py"
    script.write_text("print('imported')\nraise RuntimeError('broken at import')\n\n"
                      "def process(x):\n    return x\n")
    run = procqueue("map", script, "--dry-run", ":::", "a")
    assert run.returncode == 2 and run.stdout == ""  # its print went to stderr
    assert run.stderr.count("Traceback") == 1 and "broken at import" in run.stderr
    assert "procqueue/" not in run.stderr  # the script's own frames only
    script.write_text("def process(x):\n    return x\n")
    good = procqueue("map", script, "--dry-run", ":::", "a", "b")
    assert (good.returncode, good.stdout) == (0, "a\nb\n")


# ---- 6. the output going away or filling up -------------------------------------------------

@pytest.mark.timeout(60)
def test_a_reader_that_goes_away_ends_the_run_quietly_with_141(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    ran = tmp_path / "ran"
    ran.mkdir()
    script.write_text("import time, pathlib\n"
                      f"def process(x):\n    time.sleep(0.01)\n"
                      f"    pathlib.Path({str(ran)!r}, x).touch()\n    return x\n")
    proc = subprocess.Popen([PROCQUEUE, "map", str(script), "-j", "2", ":::",
                             *map(str, range(2000))], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    assert json.loads(first)["input"] == "0"
    proc.stdout.close()  # `| head -1`
    code = proc.wait(30)
    stderr = proc.stderr.read().decode()
    assert code == 141, stderr
    assert "Traceback" not in stderr and "Error" not in stderr, stderr
    time.sleep(0.5)
    count = len(list(ran.iterdir()))
    time.sleep(0.5)
    assert len(list(ran.iterdir())) == count < 2000  # stopped: nothing runs any more


@pytest.mark.timeout(60)
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full on this system")
@pytest.mark.parametrize("where", ["-o", "stdout", "--joblog"])
def test_a_full_disk_is_one_line_naming_the_output(echo: Path, where: str) -> None:
    if where == "--joblog":
        run = procqueue("map", echo, "-q", "--joblog", "/dev/full", ":::", "a", "b")
        assert run.returncode == 2, run.stderr
        assert run.stderr.strip().splitlines() == [
            "Error: cannot write --joblog: No space left on device"]
        return
    if where == "-o":
        run = procqueue("map", echo, "-q", "-o", "/dev/full", ":::", "a", "b")
    else:
        with open("/dev/full", "w") as full:
            run = subprocess.run([PROCQUEUE, "map", str(echo), "-q", ":::", "a", "b"],
                                 stdout=full, stderr=subprocess.PIPE, text=True, timeout=60,
                                 stdin=subprocess.DEVNULL)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines() == [
        f"Error: cannot write {'--output ' + repr('/dev/full') if where == '-o' else 'stdout'}"
        ": No space left on device"]


# ---- 7. timeout -s INT: one Ctrl-C, not two ------------------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.skipif(shutil.which("timeout") is None, reason="coreutils timeout not installed")
def test_timeout_s_int_gives_running_tasks_their_grace(tmp_path: Path) -> None:
    script = tmp_path / "slow.py"
    script.write_text("import time\ndef process(x):\n    time.sleep(3)\n    return x\n")
    # --preserve-status: timeout exits with the command's status, not its own 124
    run = subprocess.run(["timeout", "--preserve-status", "-s", "INT", "2", PROCQUEUE, "map",
                          str(script), "-j", "2", "--chunksize", "1", "--interrupt-grace", "30",
                          ":::", "a", "b", "c", "d"], capture_output=True, text=True,
                         timeout=50, stdin=subprocess.DEVNULL)
    assert run.returncode == 130, run.stderr
    assert "killing" not in run.stderr, run.stderr
    outcome = {r["input"]: r["ok"] for r in records(run.stdout)}
    assert outcome == {"a": True, "b": True, "c": False, "d": False}, run.stderr


# ---- 8. the bar and the records on one terminal ---------------------------------------------

def read_until_exit(fd: int, proc: subprocess.Popen[bytes], timeout_s: float) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the other end is closed
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    return out


@pytest.mark.timeout(60)
def test_records_on_the_bars_terminal_start_on_a_line_of_their_own(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text("import time\ndef process(x):\n    time.sleep(0.15)\n    return x\n")
    master, slave = pty.openpty()
    proc = subprocess.Popen([PROCQUEUE, "map", str(script), "-j", "2", "--chunksize", "1",
                             ":::", *map(str, range(8))], stdin=subprocess.DEVNULL,
                            stdout=slave, stderr=slave)
    os.close(slave)
    try:
        screen = read_until_exit(master, proc, 45).decode(errors="replace")
    finally:
        os.close(master)
        proc.wait(10)
    assert proc.returncode == 0, screen
    assert screen.count('{"input"') == 8, screen
    assert "it/s" in screen  # the bar was drawn
    for match in re.finditer(r'\{"input"', screen):
        before = screen[:match.start()]
        assert before.endswith(("\n", "\x1b[K")) or before == "", repr(before[-80:])


# ---- 10, 11. help -----------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_help_names_units_and_defaults_and_cuts_nothing() -> None:
    top = procqueue("--help").stdout
    assert "..." not in top.split("Commands:")[1].split("Examples")[0]
    text = procqueue("map", "--help").stdout
    assert "RANGE" not in text and "INTEGER" not in text and "FLOAT" not in text
    assert "never kills a task younger than 1 s" in " ".join(text.split())
    assert "--slowest N" in procqueue("journal", "--help").stdout
    ctx = click.Context(cli_main.cli)
    for command in map(functools.partial(cli_main.cli.get_command, ctx),
                       cli_main.cli.list_commands(ctx)):
        for param in command.params:
            if getattr(param, "is_flag", False) or param.name == "help" \
                    or param.param_type_name != "option":
                continue
            help_text = getattr(param, "help", "") or ""
            assert "[default:" in help_text or getattr(param, "show_default", False), \
                f"{command.name} {param.opts}: no default in its help"


# ---- 13. a task's sys.exit() shows the user's frames only ------------------------------------

@pytest.mark.timeout(60)
def test_a_sys_exit_record_shows_only_the_users_frames(tmp_path: Path) -> None:
    script = tmp_path / "leave.py"
    script.write_text("import sys\ndef process(x):\n    sys.exit(3)\n")
    run = procqueue("map", script, "-q", ":::", "a")
    (record,) = records(run.stdout)
    traceback = record["error"]["traceback"]
    assert record["error"]["type"] == "WorkerExitedError"
    assert "leave.py" in traceback and "sys.exit(3)" in traceback
    assert "procqueue" + os.sep not in traceback.replace("procqueue.errors", ""), traceback
    assert "cli" + os.sep + "loader.py" not in traceback, traceback


# ---- the documented exit codes are the command's ------------------------------------------

@pytest.mark.timeout(60)
def test_the_readme_and_help_list_exactly_the_commands_exit_codes() -> None:
    codes = {value for name, value in vars(cli_main).items()
             if name.startswith("EXIT_") and isinstance(value, int)}
    readme = README.read_text()
    section = readme.split("* Exit codes")[1].split("\n* ")[0]
    documented = {int(code) for code in re.findall(r"^  \* (\d+)", section, re.MULTILINE)}
    documented |= {int(c) for c in re.findall(r"(\d+) on (?:Ctrl-C|SIGTERM|SIGHUP)", section)}
    assert documented == codes
    help_codes = " ".join(procqueue("map", "--help").stdout.split()).split("Exit codes:")[1]
    assert {int(c) for c in re.findall(r"\b(\d{1,3}) ", help_codes)} >= codes


@pytest.mark.timeout(60)
def test_help_and_readme_say_where_gnu_parallels_meanings_differ() -> None:
    # -j 0, --retries N, --retries 0 and the exit codes mean other things in GNU parallel: a
    # parallel user must be told, not left to assume parallel's meaning
    help_text = " ".join(procqueue("map", "--help").stdout.split())
    assert "its 0 is as many jobs as possible" in help_text
    assert "N+1 runs in all" in help_text
    assert "its 0 is forever; here 0 is no retry" in help_text
    assert "number of failed jobs, at most 101, and 255 for a usage error" in help_text
    note = README.read_text().split("* For GNU parallel users")[1].split("\n* ")[0]
    note = " ".join(note.split())
    for fact in ("`-j 0` is every usable CPU", "at most N+1 times",
                 "`--retries 0` is no retry", "1 whatever the number of failed inputs",
                 "2 for a usage error (parallel's 255)", "whitespace-only lines"):
        assert fact in note, fact


@pytest.mark.timeout(60)
def test_every_option_of_map_is_in_the_readme() -> None:
    readme = README.read_text()
    missing = [opt for param in cli_main.map_command.params for opt in param.opts
               if opt.startswith("--") and opt not in readme
               and opt not in ("--help", "--will-cite", "--no-notice")]
    assert missing == []



@pytest.mark.timeout(60)
def test_no_inputs_and_stdin_a_terminal_is_a_usage_error_not_a_wait(echo: Path) -> None:
    master, slave = pty.openpty()
    try:
        run = subprocess.run([PROCQUEUE, "map", str(echo)], stdin=slave, capture_output=True,
                             text=True, timeout=60)
    finally:
        os.close(slave)
        os.close(master)
    assert run.returncode == 2 and "give at least one INPUT" in run.stderr


# ---- stdin that is still being written: each line runs as it comes (tail -f | parallel) ------

def read_line(proc: subprocess.Popen[bytes], timeout_s: float) -> bytes:
    """The next line of the command's stdout, or b"" if none came within timeout_s."""
    assert proc.stdout is not None
    line = b""
    deadline = time.monotonic() + timeout_s
    while not line.endswith(b"\n") and time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 0.1)[0]:
            byte = os.read(proc.stdout.fileno(), 1)
            if not byte:
                break
            line += byte
    return line


@pytest.mark.timeout(90)
@pytest.mark.parametrize("options, line, expected", [
    ([], b"a\n", "A"),
    (["--colsep", ","], b"a,b\n", "A+B"),
    (["-C", ","], b"a, b \n", "A+B")])  # columns trimmed as they come too
def test_a_line_piped_in_runs_before_stdin_ends(tmp_path: Path, options: list[str],
                                                 line: bytes, expected: str) -> None:
    # The command read stdin to its end before the first input started: a producer that is
    # still writing (`tail -f log | procqueue map ...`) got nothing back until it closed.
    script = tmp_path / "up.py"
    script.write_text("def process(*parts):\n    return '+'.join(parts).upper()\n")
    proc = subprocess.Popen([PROCQUEUE, "map", str(script), "-j", "2", *options],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stderr is not None
    try:
        proc.stdin.write(line)
        proc.stdin.flush()
        first = read_line(proc, 30)
        assert first, "no record while stdin was still open"
        assert json.loads(first)["result"] == expected
        proc.stdin.write(line.replace(b"a", b"c"))
        proc.stdin.close()
        rest = read_line(proc, 30)
        assert proc.wait(30) == 0, proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
    assert json.loads(rest)["result"] == expected.replace("A", "C")


def default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


READ_SYSCALL = {"x86_64": "0", "aarch64": "63"}.get(platform.machine())


def wait_reading_stdin(pid: int, timeout_s: float) -> None:
    """Until the process is blocked reading its stdin (read(2) on descriptor 0)."""
    if READ_SYSCALL is None:  # another architecture: its start-up is long over by then
        time.sleep(3)
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/syscall") as f:
            if f.read().split()[:2] == [READ_SYSCALL, "0x0"]:
                return
        time.sleep(0.02)
    raise AssertionError("the command never waited for stdin")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["ctrl-c", "halt", "ctrl-c before a line"])
def test_a_run_on_stdin_still_open_ends_at_ctrl_c_or_a_halt(tmp_path: Path, how: str) -> None:
    # Stopped while its producer still writes, the run ends then (it waited for the next
    # line, or stdin's end, before it could tell every input's outcome), with the exit code
    # of a Ctrl-C (130) even before the first line came.
    script = tmp_path / "job.py"
    script.write_text("def process(x):\n    if x == 'bad':\n        raise ValueError(x)\n"
                      "    return x\n")
    halt = ["--halt", "now,fail=1"] if how == "halt" else []
    # (SIGINT as a terminal's foreground job has it: a test run in the background, as `cmd &`
    # in a script, would pass its SIGINT on ignored, and Python then keeps it so)
    proc = subprocess.Popen([PROCQUEUE, "map", str(script), "-j", "1", *halt],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=default_sigint)
    assert proc.stdin is not None and proc.stderr is not None
    try:
        if how == "ctrl-c before a line":
            wait_reading_stdin(proc.pid, 30)
        else:
            proc.stdin.write(b"a\n" if how == "ctrl-c" else b"a\nbad\n")
            proc.stdin.flush()
            assert json.loads(read_line(proc, 30))["input"] == "a"
        if how.startswith("ctrl-c"):
            proc.send_signal(signal.SIGINT)
        code = proc.wait(20)  # stdin stays open
        stderr = proc.stderr.read().decode()
    finally:
        proc.kill()
        proc.wait()
    assert code == (130 if how.startswith("ctrl-c") else 1), stderr
    if how == "halt":
        assert "--halt now,fail=1 reached" in stderr


# ---- 12. GNU parallel's spellings: several -a, --delay 0, names that are not UTF-8 -----------

@pytest.mark.timeout(60)
def test_each_arg_file_is_an_input_source_of_its_own(echo: Path, tmp_path: Path) -> None:
    (tmp_path / "l.txt").write_text("l1\nl2\n")
    (tmp_path / "m.txt").write_text("m1\nm2\n")
    run = procqueue("map", echo, "-q", "-a", tmp_path / "l.txt", "-a", tmp_path / "m.txt")
    assert run.returncode == 0, run.stderr
    assert [r["input"] for r in records(run.stdout)] == [
        ["l1", "m1"], ["l1", "m2"], ["l2", "m1"], ["l2", "m2"]]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("delay", ["0", "0s", "0.0"])
def test_a_delay_of_zero_is_no_delay(echo: Path, delay: str) -> None:
    run = procqueue("map", echo, "-q", "--delay", delay, ":::", "a", "b")
    assert run.returncode == 0, run.stderr
    assert [r["result"] for r in records(run.stdout)] == [["a"], ["b"]]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["::::", "-a", "-0"])
def test_a_file_of_inputs_that_is_not_utf8_passes_names_through(echo: Path, tmp_path: Path,
                                                              how: str) -> None:
    # as stdin's lines do: the name's bytes come back as surrogate escapes, not a crash
    names = tmp_path / "names.bin"
    names.write_bytes(b"caf\xe9.txt\0plain\0" if how == "-0" else b"caf\xe9.txt\nplain\n")
    args = ["-0", "::::", names] if how == "-0" else [how, names] if how == "-a" \
        else ["::::", names]
    run = procqueue("map", echo, "-q", *args)
    assert run.returncode == 0, run.stderr
    assert [r["input"] for r in records(run.stdout)] == ["caf\udce9.txt", "plain"]


@pytest.mark.timeout(60)
def test_a_bad_size_names_the_flag_not_the_pools_parameter(echo: Path) -> None:
    run = procqueue("map", echo, "--memfree", "lots", ":::", "a")
    assert run.returncode == 2
    assert "--memfree" in run.stderr and "min_free_memory" not in run.stderr


@pytest.mark.timeout(60)
def test_a_closed_stdout_is_one_line_and_exit_2_unless_the_records_go_to_a_file(
        echo: Path, tmp_path: Path) -> None:
    def closed_stdout(*args: Any) -> subprocess.CompletedProcess[str]:
        command = " ".join([PROCQUEUE, "map", str(echo), *args, ">&-"])
        return subprocess.run(["sh", "-c", command], capture_output=True, text=True,
                              timeout=60, stdin=subprocess.DEVNULL)

    run = closed_stdout(":::", "a", "b")
    assert run.returncode == 2
    assert run.stderr.strip() == "Error: cannot write stdout: it is closed (give -o FILE)"
    out = tmp_path / "out.jsonl"
    run = closed_stdout("-o", str(out), ":::", "a", "b")
    assert run.returncode == 0 and run.stderr == ""
    assert [r["result"] for r in records(out.read_text())] == [["a"], ["b"]]


# ---- a stderr that cannot be written fails no record and keeps the exit code -----------------

STOPPABLE = """
import os, time
def process(x):
    if x == "bad":
        raise ValueError(x)
    if x == "slow":  # runs until the test stops the run
        open({started!r}, "w").close()
        time.sleep(60)
    return x
"""


def unwritable_stderr(how: str) -> dict[str, Any]:
    """Popen arguments giving the command a stderr it cannot write: closed (`2>&-`), or a
    pipe whose reader is gone (`2>&1 | tee` after tee died, a closed reader of --bar)."""
    if how == "closed":
        return {"preexec_fn": lambda: os.close(2)}
    read_end, write_end = os.pipe()
    os.close(read_end)
    return {"stderr": write_end, "pass_fds": (write_end,)}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["closed", "reader gone"])
def test_a_stderr_that_cannot_be_written_loses_no_record_and_keeps_the_exit_code(
        tmp_path: Path, how: str) -> None:
    started = tmp_path / "started"
    script = tmp_path / "job.py"
    script.write_text(STOPPABLE.format(started=str(started)))
    out = tmp_path / "out.jsonl"
    # a failure's run, with the bar (and the "failed" counts) on stderr
    kwargs = unwritable_stderr(how)
    run = subprocess.run([PROCQUEUE, "map", str(script), "-j", "2", "--bar", "-o", str(out),
                          ":::", "a", "bad", "b"], stdin=subprocess.DEVNULL, timeout=60,
                         **kwargs)
    if "stderr" in kwargs:
        os.close(kwargs["stderr"])
    assert run.returncode == 1
    assert [r["ok"] for r in records(out.read_text())] == [True, False, True]
    # a SIGTERM, whose note ("killing the running tasks") cannot be written
    kwargs = unwritable_stderr(how)
    proc = subprocess.Popen([PROCQUEUE, "map", str(script), "-j", "2", "--bar", "-o", str(out),
                             ":::", "a", "slow"], stdin=subprocess.DEVNULL, **kwargs)
    if "stderr" in kwargs:
        os.close(kwargs["stderr"])
    deadline = time.monotonic() + 30
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 143
    assert [r["input"] for r in records(out.read_text())] == ["a", "slow"]


# ---- linked input sources, as GNU parallel links them ----------------------------------------

@pytest.mark.timeout(60)
def test_plus_linked_sources_stop_at_the_shorter_while_link_starts_it_over(echo: Path,
                                                                             tmp_path: Path
                                                                             ) -> None:
    # parallel echo ::: a b c :::+ 1 2  ->  a 1, b 2 ("values do not wrap" with :::+)
    plus = procqueue("map", echo, "-q", ":::", "a", "b", "c", ":::+", "1", "2")
    assert plus.returncode == 0, plus.stderr
    assert [r["input"] for r in records(plus.stdout)] == [["a", "1"], ["b", "2"]]
    (tmp_path / "f1").write_text("a\nb\n")
    (tmp_path / "f2").write_text("1\n2\n3\n")
    files = procqueue("map", echo, "-q", "::::", tmp_path / "f1", "::::+", tmp_path / "f2")
    assert [r["input"] for r in records(files.stdout)] == [["a", "1"], ["b", "2"]]
    # parallel --link echo ::: a b c ::: 1 2  ->  a 1, b 2, c 1
    link = procqueue("map", echo, "-q", "--link", ":::", "a", "b", "c", ":::", "1", "2")
    assert [r["input"] for r in records(link.stdout)] == [["a", "1"], ["b", "2"], ["c", "1"]]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["::::+", "--link -a -a"])
def test_a_blank_line_of_a_linked_file_is_an_empty_input_so_rows_stay_paired(
        echo: Path, tmp_path: Path, how: str) -> None:
    # parallel echo {1}={2} :::: names ::::+ labels  ->  img1=cat, img2=, img3=dog
    names, labels = tmp_path / "names", tmp_path / "labels"
    names.write_text("img1\nimg2\nimg3\n")
    labels.write_text("cat\n\ndog\n")
    if how == "::::+":
        run = procqueue("map", echo, "-q", "::::", names, "::::+", labels)
    else:
        run = procqueue("map", echo, "-q", "--link", "-a", names, "-a", labels)
    assert run.returncode == 0, run.stderr
    assert [r["input"] for r in records(run.stdout)] == [
        ["img1", "cat"], ["img2", ""], ["img3", "dog"]]
    # not linked: a blank line is no input, as before
    crossed = procqueue("map", echo, "-q", "::::", labels, ":::", "x")
    assert [r["input"] for r in records(crossed.stdout)] == [["cat", "x"], ["dog", "x"]]


@pytest.mark.timeout(60)
def test_each_file_after_four_colons_is_an_input_source_of_its_own(echo: Path,
                                                                   tmp_path: Path) -> None:
    # parallel echo :::: f1 f2  ->  a 1, a 2, a 3, b 1, b 2, b 3 (as :::: f1 :::: f2)
    f1, f2 = tmp_path / "f1", tmp_path / "f2"
    f1.write_text("a\nb\n")
    f2.write_text("1\n2\n3\n")
    run = procqueue("map", echo, "-q", "::::", f1, f2)
    assert run.returncode == 0, run.stderr
    assert [r["input"] for r in records(run.stdout)] == [
        [x, n] for x in "ab" for n in "123"]
    # parallel echo ::: x y ::::+ f1 f2  ->  x a 1, y b 2 (each file linked to the one before)
    linked = procqueue("map", echo, "-q", ":::", "x", "y", "::::+", f1, f2)
    assert [r["input"] for r in records(linked.stdout)] == [["x", "a", "1"], ["y", "b", "2"]]


@pytest.mark.timeout(60)
def test_dry_run_quotes_each_argument_so_every_call_reads_back_as_it_is(echo: Path) -> None:
    # parallel --dry-run echo ::: a 'b c' ::: 1 2  ->  echo a 1 ... echo 'b c' 1
    run = procqueue("map", echo, "--dry-run", ":::", "a", "b c", ":::", "1", "2")
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["a 1", "a 2", "'b c' 1", "'b c' 2"]
    # a newline inside an input stays on its call's line; an empty input shows as ''
    run = procqueue("map", echo, "--dry-run", ":::", "x\ny", "", "it's")
    assert run.stdout.splitlines() == ["$'x\\ny'", "''", "'it'\"'\"'s'"]


@pytest.mark.timeout(60)
def test_an_arity_error_under_colsep_counts_columns_not_input_sources(tmp_path: Path) -> None:
    script = tmp_path / "two.py"
    script.write_text("def process(x, y):\n    return [x, y]\n")
    table = tmp_path / "t.csv"
    table.write_text("a,b,c\n")
    run = procqueue("map", script, "--colsep", ",", "::::", table)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f"Error: {script}:process takes 2 positional arguments, but the first input's columns "
        "(--colsep ',') give it 3 per call (one argument per column)"]


@pytest.mark.timeout(60)
def test_colsep_trims_the_columns_and_header_names_as_gnu_parallel_trim_rl(echo: Path,
                                                                          tmp_path: Path) -> None:
    # parallel --colsep , echo '[{1}]' '[{2}]' :::: spaced.csv  ->  [foo] [1], [bar] [2]
    table = tmp_path / "spaced.csv"
    table.write_text("foo, 1\nbar , 2\n")
    run = procqueue("map", echo, "-q", "-C", ",", "::::", table)
    assert run.returncode == 0, run.stderr
    assert [r["result"] for r in records(run.stdout)] == [["foo", "1"], ["bar", "2"]]
    kept = procqueue("map", echo, "-q", "--colsep", ",", "--trim", "n", "::::", table)
    assert [r["result"] for r in records(kept.stdout)] == [["foo", " 1"], ["bar ", " 2"]]
    named = tmp_path / "named.py"
    named.write_text("def process(name, size):\n    return [name, size]\n")
    headed = tmp_path / "headed.csv"
    headed.write_text("name , size\nfoo, 1\n")
    run = procqueue("map", named, "-q", "--header", ":", "-C", ",", "::::", headed)
    assert run.returncode == 0, run.stderr
    assert [r["result"] for r in records(run.stdout)] == [["foo", "1"]]
