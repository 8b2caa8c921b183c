"""Pure parts of the CLI: input enumeration, script checks, records, halt policies."""
from __future__ import annotations

import io

import click
import pytest

import procqueue
from procqueue.cli.inputs import InputError, collect_inputs
from procqueue.cli.main import HaltPolicy
from procqueue.cli.output import line_of, record_of
from procqueue.cli.script import ScriptError, ScriptFunction, resolve_script


def test_directories_are_walked_recursively_and_sorted(tmp_path):
    for name in ["b.txt", "a.txt", "z/c.txt", "z/d.log", "y/e.txt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    found = collect_inputs([str(tmp_path)], glob="*.txt")
    assert [p[len(str(tmp_path)) + 1:] for p in found] == ["a.txt", "b.txt", "y/e.txt",
                                                            "z/c.txt"]


def test_stdin_and_lines_file(tmp_path):
    lines = tmp_path / "list"
    lines.write_text("one\n\ntwo\n")
    got = collect_inputs(["-"], lines_file=str(lines), stdin=io.StringIO("x\ny\n"))
    assert got == ["x", "y", "one", "two"]


def test_missing_input_is_a_usage_error(tmp_path):
    with pytest.raises(InputError) as info:
        collect_inputs([str(tmp_path / "nope")])
    assert info.value.exit_code == 2


def test_script_is_checked_without_running_it(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("raise SystemExit('never run at check time')\n"
                      "def process(x):\n    return x\nhelper = lambda x: x\n")
    fn = resolve_script(str(script), None)
    assert fn == ScriptFunction("process", path=str(script.resolve()))
    with pytest.raises(ScriptError, match="helper, process"):
        resolve_script(str(script), "missing")


def test_script_function_loads_once_and_skips_main_block(tmp_path):
    script = tmp_path / "t.py"
    script.write_text("CALLS = []\ndef process(x):\n    CALLS.append(x)\n    return len(CALLS)\n"
                      "if __name__ == '__main__':\n    raise SystemExit('main ran')\n")
    fn = ScriptFunction("process", path=str(script))
    assert [fn("a"), fn("b")] == [1, 2]  # one module, imported once


@pytest.mark.parametrize("text,failed,total,reached", [
    ("soon,fail=2", 1, 10, False), ("soon,fail=2", 2, 10, True),
    ("now,fail=10%", 1, 20, False), ("now,fail=10%", 2, 20, True),
])
def test_halt_policy(text, failed, total, reached):
    assert HaltPolicy.parse(text).reached(failed, total) is reached


def test_bad_halt_policy():
    assert HaltPolicy.parse(None) is None and HaltPolicy.parse("never") is None
    with pytest.raises(click.BadParameter):
        HaltPolicy.parse("later,fail=1")


def test_record_of_failure_and_non_json_result():
    err = ValueError("boom")
    err.__cause__ = procqueue.RemoteTraceback("Traceback...\nValueError: boom\n")
    rec = record_of(procqueue.TaskOutcome(0, "in", False, None, err, 1, 0.5, 42))
    assert rec["error"] == {"type": "ValueError", "message": "boom",
                            "traceback": "Traceback...\nValueError: boom\n"}
    rec = record_of(procqueue.TaskOutcome(0, "in", True, {1, 2}, None, 1, 0.1, 42))
    line = line_of(rec)
    assert not rec["ok"] and rec["error"]["type"] == "ResultNotJSONSerializable"
    assert '"ResultNotJSONSerializable"' in line and '"result"' not in line


def test_progress_bar_shows_failures_and_restarts():
    from procqueue.cli.progress import Progress

    out = io.StringIO()
    bar = Progress(4, out, enabled=True, restarts=lambda: 2)
    for ok in (True, False, True, True):
        bar.update(ok)
    bar.close()
    last = out.getvalue().split("\r\x1b[K")[-1]
    assert "4/4" in last and "failed: 1" in last and "restarts: 2" in last
